"""The `problem` diagnostic: on while the last run failed or the source database cannot be read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from homeiq_trainer.database import BoundedWait, NoAnswer, scrub
from homeiq_trainer.messages import RunStatus, utcnow
from homeiq_trainer.settings import Settings
from homeiq_trainer.training.data import DataError, SourceOptions, count_new_examples

_LOGGER = logging.getLogger(__name__)

SOURCE_CHECK_INTERVAL_S = 300.0
# The check must never hold HomeIQ's writers up, nor itself wait long for them.
SOURCE_CHECK_BUSY_TIMEOUT_S = 2.0
# Connecting and one query, each bounded at 2 s by the server or libpq; past this the server has
# taken the query and gone quiet (see `BoundedWait`).
SOURCE_CHECK_WAIT_S = 4 * SOURCE_CHECK_BUSY_TIMEOUT_S + 2.0


def probe_source(settings: Settings) -> str | None:
    """Why the source database cannot be read, or None when it can (reads no row: nothing is newer than now)."""
    data = settings.data
    url = data.source_url()
    try:
        count_new_examples(
            url,
            utcnow(),
            limit=1,
            options=SourceOptions(
                busy_timeout_s=min(data.busy_timeout_s, SOURCE_CHECK_BUSY_TIMEOUT_S),
                connect_timeout_s=min(data.connect_timeout_s, SOURCE_CHECK_BUSY_TIMEOUT_S),
                schema=data.source_schema or None,
                exclude_sources=frozenset(data.exclude_sources),
            ),
        )
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - what no reader expected still means it cannot be read now
        # Its message only, scrubbed: a traceback could quote the URL, password included.
        return scrub(f"checking it failed: {type(exc).__name__}: {exc}", url)
    return None


def problem_payload(last_run_status: str | None, source_error: str | None) -> dict[str, Any]:
    """The retained `<base>/problem` payload; `problem` is what the binary sensor shows."""
    reasons = []
    last_run_failed = last_run_status == RunStatus.FAILED.value
    if last_run_failed:
        reasons.append("the last run failed")
    if source_error is not None:
        reasons.append(f"the source database cannot be read: {source_error}")
    return {
        "problem": bool(reasons),
        "last_run_failed": last_run_failed,
        "source_error": source_error,
        "reasons": reasons,
    }


class SourceWatch:
    """Checks the source database at start and every `interval_s` in a thread; reports each change."""

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[str | None], None],
        interval_s: float = SOURCE_CHECK_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        self.interval_s = interval_s
        self.error: str | None = None
        self.stale = False
        """Set when the problem sensor could not be published: the next check publishes it again."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe = BoundedWait("source-probe")

    def start(self) -> None:
        """Start checking in the background."""
        self._thread = threading.Thread(target=self._loop, name="source-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SOURCE_CHECK_BUSY_TIMEOUT_S * 2)

    def check(self) -> str | None:
        """Check now; report to `on_change` when the answer changed."""
        try:
            error = self._probe.call(lambda: probe_source(self.settings), SOURCE_CHECK_WAIT_S)
        except NoAnswer as exc:
            error = str(exc)
        if error != self.error:
            self.error = error
            if error is None:
                _LOGGER.info("The source database can be read again")
            else:
                _LOGGER.warning("The source database cannot be read: %s", error)
        elif not self.stale:
            return error
        self.stale = False
        self.on_change(error)
        return error

    def _loop(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # this thread's outermost frame: a bug here must not end the checks
                _LOGGER.exception("Checking the source database failed")
            if self._stop.wait(self.interval_s):
                return

"""The bookkeeping around a run that the CLI and the daemon share: open its history row, close it."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from homeiq_trainer.database import BoundedWait, NoAnswer, masked, postgres_connect_args, sqlite_path
from homeiq_trainer.history import (
    HISTORY_TIMEOUT_S,
    HistoryStore,
    HistoryUnavailable,
    TrainingRun,
    history_unavailable,
)
from homeiq_trainer.homeiq_runs import HomeIQRuns
from homeiq_trainer.messages import RunResult, RunStatus, TrainParams
from homeiq_trainer.settings import Settings
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.run import hyperparameters, parameters_record


@dataclass(frozen=True)
class JobRequest:
    """What to run and on whose behalf."""

    params: TrainParams
    triggered_by: str = "cli"
    request_id: str | None = None


class InstanceBusy(Exception):
    """Another homeiq-trainer works on the same history and output dir."""


_LOGGER = logging.getLogger(__name__)

# The PostgreSQL advisory lock a history on a server is held by (one key per database: "HomeIQTr").
HISTORY_LOCK_KEY = 0x486F6D6549515472
# How often a daemon checks that the server still holds its session (and so the lock).
SERVER_LOCK_CHECK_S = 10.0
# Connecting and one statement, each bounded by libpq or the server; past this the server took the
# query and went quiet (see `BoundedWait`), and the check or the release gives up waiting.
LOCK_CHECK_WAIT_S = 2 * HISTORY_TIMEOUT_S + 5.0


class InstanceLock:
    """One homeiq-trainer at a time per history and per output dir: a daemon for its lifetime, `train` for its run.

    Without it a `train` started beside the daemon would mark the daemon's open run interrupted and
    withdraw its served adapter (same history), or delete its live staging directory (same output dir,
    any history). A SQLite history and the output dir are locked by files beside them, a history on
    PostgreSQL by a session advisory lock on a connection of its own. The kernel, or the server,
    drops them when the process dies, however it dies.
    """

    def __init__(self, settings: Settings) -> None:
        output_dir = settings.storage.output_dir.resolve()
        # Beside the output dir, not in it: a read-only output dir must still fail its run, not the start.
        paths = [output_dir.with_name(output_dir.name + ".lock")]
        history_url = settings.storage.history_url()
        history = sqlite_path(history_url)
        if history is not None:
            history = history.resolve()
            paths.insert(0, history.with_name(history.name + ".lock"))
        self.paths = tuple(paths)
        self._server_history = None if history is not None else history_url
        self._fds: list[int] = []
        self._session: Connection | None = None
        self._guard = threading.Lock()  # `ensure` runs on the keeper's thread and before each run opens
        self._check = BoundedWait("history-lock")  # bounds ensure's and release's waits on the server
        self._lost_to_another = False

    def acquire(self) -> None:
        """Take every lock or raise `InstanceBusy` (holding none)."""
        try:
            if self._server_history is not None:
                self._session = self._take_on_server(self._server_history)
            for path in self.paths:
                self._fds.append(self._take(path))
        except BaseException:
            self.release()
            raise

    def ensure(self) -> None:
        """Hold the history's server lock still: where the server ended our session (a restart,
        `idle_session_timeout`, `pg_terminate_backend`) the lock went with it, so take it again. Raises
        `InstanceBusy` where another homeiq-trainer took it meanwhile, and the history's own error where
        the server does not answer; nothing to do for a history in a file."""
        if self._server_history is None:
            return
        try:
            self._check.call(self._ensure, LOCK_CHECK_WAIT_S)
        except NoAnswer as exc:  # a server that took the query and went quiet: the run's start is refused
            raise HistoryUnavailable(f"the history at {masked(self._server_history)} does not answer: {exc}") from None

    def _ensure(self) -> None:
        assert self._server_history is not None
        with self._guard:
            if self._session is not None:
                try:
                    self._session.execute(text("SELECT 1"))
                    self._session.commit()
                    return
                except SQLAlchemyError:
                    _LOGGER.warning("The history server ended the session holding our lock; taking it again")
                    session, self._session = self._session, None
                    with contextlib.suppress(SQLAlchemyError):
                        session.close()
                    session.engine.dispose()
            try:
                self._session = self._take_on_server(self._server_history)
            except InstanceBusy:
                if not self._lost_to_another:  # said once, not every check
                    _LOGGER.error("Another homeiq-trainer took the history's lock meanwhile; runs are refused")
                self._lost_to_another = True
                raise
            if self._lost_to_another:
                _LOGGER.info("The history's lock is ours again")
            self._lost_to_another = False

    def keep(self, stop: threading.Event, every_s: float = SERVER_LOCK_CHECK_S) -> threading.Thread | None:
        """A daemon thread that runs `ensure` every `every_s` until `stop` is set (None for a file lock)."""
        if self._server_history is None:
            return None

        def check() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(InstanceBusy, HistoryUnavailable):  # said by `ensure`, or by the run
                    self.ensure()

        keeper = threading.Thread(target=check, name="history-lock", daemon=True)
        keeper.start()
        return keeper

    @staticmethod
    def _take_on_server(url: URL) -> Connection:
        engine = create_engine(
            url, poolclass=NullPool, connect_args=postgres_connect_args(HISTORY_TIMEOUT_S, HISTORY_TIMEOUT_S, False)
        )
        try:
            session = engine.connect()
        except SQLAlchemyError as exc:
            engine.dispose()
            raise history_unavailable(exc, url, masked(url)) from None
        try:
            taken = session.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": HISTORY_LOCK_KEY}).scalar()
            # The lock is the session's: no transaction may stay open (idle_in_transaction_session_timeout).
            session.commit()
        except SQLAlchemyError as exc:
            session.close()
            engine.dispose()
            raise history_unavailable(exc, url, masked(url)) from None
        if not taken:
            session.close()
            engine.dispose()
            raise InstanceBusy(
                f"another homeiq-trainer (the daemon, or a `train` in progress) is using the history at "
                f"{masked(url)}; start runs through it (MQTT `start`), or stop it first"
            )
        return session

    @staticmethod
    def _take(path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Read-only is enough for flock, and a descriptor open for writing would keep the filesystem
        # from being remounted read-only while the daemon runs.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceBusy(
                f"another homeiq-trainer (the daemon, or a `train` in progress) is using {path.with_suffix('')}; "
                "start runs through it (MQTT `start`), or stop it first"
            ) from None
        return fd

    def release(self) -> None:
        """Give the locks back."""
        while self._fds:
            os.close(self._fds.pop())
        if self._session is None:
            return
        try:
            self._check.call(self._close_session, LOCK_CHECK_WAIT_S)
        except NoAnswer as exc:  # the server drops the lock with our connection, when the process exits
            _LOGGER.warning("The history server does not answer (%s); its lock goes with this process", exc)

    def _close_session(self) -> None:
        with self._guard:
            if self._session is not None:
                session, self._session = self._session, None
                engine = session.engine
                with contextlib.suppress(SQLAlchemyError):  # a session the server ended already
                    session.close()  # the server releases a session's advisory locks when it ends
                engine.dispose()


def open_history(settings: Settings) -> HistoryStore:
    """The history store of these settings, recording into HomeIQ's `training_runs` too when asked."""
    homeiq_url = settings.homeiq_runs_url()
    return HistoryStore(settings.storage.history_url(), HomeIQRuns(homeiq_url) if homeiq_url else None)


def recover(store: HistoryStore, settings: Settings) -> list[TrainingRun]:
    """After a crash: fail runs left open, remove half-written run directories, finish a half-done switch."""
    from homeiq_trainer.promotion import reconcile

    artifacts.remove_stale_staging(settings.storage.output_dir)
    interrupted = store.mark_interrupted()
    reconcile(store, settings.storage.output_dir)
    return interrupted


def open_run(store: HistoryStore, settings: Settings, request: JobRequest) -> TrainingRun:
    """Create the queued history row, with a fresh run identifier."""
    from homeiq_trainer.promotion import reconcile

    output_dir = settings.storage.output_dir
    # A served directory deleted by hand: `latest` goes back to the adapter served before it now, so
    # the run is judged against what will be in use at its end, not against nothing.
    reconcile(store, output_dir)
    run_identifier = artifacts.new_run_identifier(store.identifiers(), output_dir)
    return store.create(
        run_identifier=run_identifier,
        base_model=hyperparameters(settings, request.params).base_model,
        output_dir=str(output_dir / run_identifier),
        triggered_by=request.triggered_by,
        parameters=parameters_record(settings, request.params),
        request_id=request.request_id,
    )


def crash_result(run: TrainingRun, error: BaseException | str) -> RunResult:
    """A failed result for a run whose training raised or whose process died."""
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    return RunResult(
        run_identifier=run.run_identifier,
        status=RunStatus.FAILED,
        base_model=run.base_model or "",
        error=text.strip() or "training failed",
    )


def record_result(
    store: HistoryStore, settings: Settings, run: TrainingRun, result: RunResult, serve: bool = False
) -> TrainingRun:
    """Close the history row from the run's result (the row and `training_run.json` agree)."""
    assert run.id is not None
    metadata_path = str(Path(result.run_dir) / artifacts.METADATA_FILE) if result.run_dir else None
    finished = store.finish(
        run.id,
        result.status,
        dataset_size=result.data.examples or None,
        final_loss=result.final_loss,
        eval_loss=result.eval_loss,
        loss_history=result.loss_history or None,
        metadata_path=metadata_path,
        output_dir=result.run_dir,
        base_model=result.base_model,
        data_report=result.data.model_dump(mode="json") if result.data.rows_read else None,
        error=result.error,
        decision=result.decision,
        decision_reason=result.decision_reason,
        evaluation={**result.evaluation, "samples": result.samples} if result.evaluation else None,
        serve=serve,
        peak_rss_mb=result.peak_rss_mb,
        parameters={**(run.parameters_json or {}), "cluster": result.cluster} if result.cluster else None,
    )
    return finished


def prune_history(store: HistoryStore, settings: Settings) -> int:
    """Keep the newest `storage.keep_history_rows` rows, and always those of runs that may be served.

    A run whose directory retention kept (`storage.keep_runs` may exceed the rows kept) keeps its row:
    without one it could be neither listed nor promoted, and would only take disk space.
    """
    from homeiq_trainer.promotion import protected_runs

    output_dir = settings.storage.output_dir
    served = artifacts.latest_run(output_dir)
    protect = {*protected_runs(store), *filter(None, [served]), *artifacts.run_directories(output_dir)}
    return store.prune(settings.storage.keep_history_rows, protect=protect)

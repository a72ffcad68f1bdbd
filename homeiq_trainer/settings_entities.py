"""Home Assistant's configuration and diagnostic entities, on the daemon's command thread.

Wires the settings panel (control.py) and the problem check (problem.py) to MQTT: the settings'
command topics and the Re-announce button are routed here by the app, and `settings` and `problem`
go out through the publisher as retained values.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from homeiq_trainer.commands import CommandError
from homeiq_trainer.control import SettingsPanel, apply_log_level
from homeiq_trainer.history import HistoryStore, TrainingRun
from homeiq_trainer.messages import ErrorInfo, Phase, ProgressEvent, Response, RunResult, first_line
from homeiq_trainer.overrides import OverridesStore, pinned_settings
from homeiq_trainer.problem import SourceWatch, problem_payload
from homeiq_trainer.publisher import Publisher
from homeiq_trainer.runner import RunnerListener
from homeiq_trainer.settings import Settings
from homeiq_trainer.topics import Topics

_LOGGER = logging.getLogger(__name__)


class SettingsEntities:
    """The values the next run uses, their changes from Home Assistant, Re-announce and `problem`."""

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        store: HistoryStore,
        publisher: Publisher,
        command_line: Mapping[str, Any] | None = None,
    ) -> None:
        self.topics = topics
        self.store = store
        self.publisher = publisher
        self.panel = SettingsPanel(settings, OverridesStore(store.engine), pinned_settings(os.environ, command_line))
        if self.panel.effective.log_level != settings.log_level:
            apply_log_level(self.panel.effective.log_level)
        self.source_watch = SourceWatch(settings, lambda _error: self.publish_problem())
        # Three threads publish it (start, the source check, a run's end): each reads and publishes
        # under the lock, so the last one published was also the last one read.
        self._problem_lock = threading.Lock()

    def run_settings(self) -> Settings:
        """The settings a run started now trains with."""
        return self.panel.effective

    def start(self) -> None:
        """Publish the initial values and start checking the source database."""
        self.publish_settings()
        self.publish_problem()
        self.source_watch.start()

    def stop(self) -> None:
        """Stop checking the source database."""
        self.source_watch.stop()

    def on_setting(self, topic: str, payload: bytes) -> None:
        """A value from Home Assistant for one setting; answered on `response`."""
        name = self.topics.setting_name(topic)
        if name is None:
            return
        response = self.panel.answer(name, payload)
        # Also after a refusal: the value in force again (Home Assistant's state never left it).
        self.publish_settings()
        self.publisher.respond(response.model_dump_json())

    def refused_setting(self, topic: str, error: CommandError) -> None:
        """A value dropped before it was read (too many messages): answered, nothing changed. On the
        network thread; the entity in Home Assistant never left the value in force."""
        name = self.topics.setting_name(topic)
        if name is not None:
            info = ErrorInfo(code=error.code, message=str(error))
            response = Response(request_id=None, action="set", status="error", data={"setting": name}, error=info)
            self.publisher.respond(response.model_dump_json())

    def on_reannounce(self, topic: str, payload: bytes) -> None:
        """The Re-announce button: discovery and every retained value again."""
        _LOGGER.info("Re-announcing, as asked from Home Assistant")
        self.publisher.announce()

    def publish_settings(self) -> None:
        """The retained `settings` value."""
        self.publisher.retain(self.topics.settings, json.dumps(self.panel.state()))

    def publish_problem(self) -> None:
        """The retained `problem` value (left as it was when the history cannot be read now)."""
        with self._problem_lock:
            self._publish_problem()

    def _publish_problem(self) -> None:
        try:
            last = self.store.latest_finished()
        except Exception as exc:  # the history's own database errors; the source check's thread lives on
            _LOGGER.warning(
                "Could not refresh the problem sensor (tried again at the next source check): %s: %s",
                type(exc).__name__,
                first_line(exc),
            )
            self.source_watch.stale = True
            return
        payload = problem_payload(last.status if last else None, self.source_watch.error)
        self.publisher.retain(self.topics.problem, json.dumps(payload))

    def listening_to(self, listener: RunnerListener) -> RunnerListener:
        """`listener`, then the problem sensor after each run."""
        return _ProblemAfterRuns(listener, self.publish_problem)


class _ProblemAfterRuns:
    """A runner listener that also re-publishes `problem` when a run ends (the run recorded by then)."""

    def __init__(self, listener: RunnerListener, publish_problem: Callable[[], None]) -> None:
        self.listener = listener
        self.publish_problem = publish_problem

    def run_state(self, run: TrainingRun, phase: Phase | None, message: str) -> None:
        self.listener.run_state(run, phase, message)

    def run_progress(self, run: TrainingRun, event: ProgressEvent) -> None:
        self.listener.run_progress(run, event)

    def run_finished(self, run: TrainingRun, result: RunResult) -> None:
        # First: after the final state, whoever starts the next run on it must find the runner free,
        # not one more history read away from it (refused `busy`).
        self.publish_problem()
        self.listener.run_finished(run, result)

"""What the runner reports becomes retained state: `state`, `progress`, `last_run`, `runs`, `model`.

The reporter is the runner's listener. It keeps the typed values it last published (so `status` is
answered without reading anything back) and the `runs` answer, refreshed when a run ends (so `runs`
never queries the history on the command path).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from homeiq_trainer.adapter_state import decision_payload, finished_events, update_payload
from homeiq_trainer.history import HistoryStore, TrainingRun, run_record
from homeiq_trainer.messages import (
    ModelInfo,
    Phase,
    ProgressEvent,
    ProgressPayload,
    RunRecord,
    RunResult,
    RunsAnswer,
    RunsPayload,
    RunStatus,
    State,
    StatePayload,
    StatusAnswer,
    TriggerEvent,
    first_line,
    known,
)
from homeiq_trainer.publisher import Publisher
from homeiq_trainer.settings import Settings
from homeiq_trainer.topics import Topics
from homeiq_trainer.training import artifacts

_LOGGER = logging.getLogger(__name__)

STATE_MESSAGE_MAX_CHARS = 500
QOS_PROGRESS = 0
LAST_RUN_MAX_BYTES = 12_000
"""`last_run` is the Last run sensor's attributes, and Home Assistant's recorder stores none of an
entity's attributes past 16 KiB (it logs and keeps `{}`): a long traceback or twenty probes in a
script of three bytes a character went over. The history's text (its last 5,000 characters) stays in `runs`."""
LAST_RUN_ERROR_CHARS = 2_000
"""A traceback's end (the exception) is what `last_run.error` keeps of it."""


def within_attribute_limit(record: RunRecord) -> RunRecord:
    """`record` clipped for `last_run`: the error's last `LAST_RUN_ERROR_CHARS`, then probes from the end."""
    if record.error and len(record.error) > LAST_RUN_ERROR_CHARS:
        record = record.model_copy(update={"error": "…" + record.error[-LAST_RUN_ERROR_CHARS:]})
    samples = list(record.samples)
    while samples and len(record.model_dump_json().encode()) > LAST_RUN_MAX_BYTES:
        samples.pop()
        record = record.model_copy(update={"samples": list(samples)})
    return record


class RunReporter:
    """Turns runner events into retained topics through the publisher."""

    def __init__(self, settings: Settings, topics: Topics, publisher: Publisher, store: HistoryStore) -> None:
        self.settings = settings
        self.topics = topics
        self.publisher = publisher
        self.store = store
        self._lock = threading.Lock()
        self._serving_lock = threading.Lock()
        self._state = StatePayload(state=State.IDLE, message="no run yet")
        self._progress = ProgressPayload()
        self._runs: list[RunRecord] = []
        self._last_progress_at = 0.0
        self._phase_message = ""
        self._offered: str | None = None

    # --- answers for commands --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `status` answer: the state and progress last published."""
        with self._lock:
            answer = StatusAnswer(state=self._state, progress=self._progress)
        return answer.model_dump(mode="json")

    def runs(self) -> dict[str, Any]:
        """The `runs` answer, as refreshed when the last run ended."""
        with self._lock:
            answer = RunsAnswer(runs=self._runs)
        return answer.model_dump(mode="json")

    # --- publishing ------------------------------------------------------------------------------

    def publish_initial(self, interrupted: list[TrainingRun]) -> None:
        """The state at start: the latest run's outcome (or idle), empty progress, history and model."""
        latest = self.store.recent(1)
        if latest:
            run = latest[0]
            message = (
                f"run {run.run_identifier} was interrupted when the daemon stopped"
                if any(r.id == run.id for r in interrupted)
                else f"last run {run.status}"
            )
            state = known(State, run.status)
            if state is None:  # written by a newer version, or by hand
                state, message = State.IDLE, f"last run {run.status!r}, a status this version does not know"
            self._publish_state(state, run.run_identifier, None, message)
        else:
            self._publish_state(State.IDLE, None, None, "no run yet")
        self._publish_progress(ProgressPayload())
        self.publish_serving()

    def _publish_state(self, state: State, run_id: str | None, phase: Phase | None, message: str) -> None:
        payload = StatePayload(state=state, run_id=run_id, phase=phase, message=message[:STATE_MESSAGE_MAX_CHARS])
        with self._lock:
            self._state = payload
        self.publisher.retain(self.topics.state, payload)

    def _publish_progress(self, payload: ProgressPayload) -> None:
        with self._lock:
            self._progress = payload
        self.publisher.retain(self.topics.progress, payload, qos=QOS_PROGRESS)

    def publish_history(self) -> None:
        """`last_run` and `runs` from the history (and the cached `runs` answer)."""
        last = self.store.latest_finished()
        self.publisher.retain(self.topics.last_run, within_attribute_limit(run_record(last)) if last else RunRecord())
        runs = [run_record(run) for run in self.store.recent(self.settings.daemon.runs_published)]
        with self._lock:
            self._runs = runs
        self.publisher.retain(self.topics.runs, RunsPayload(runs=list(runs)))

    def publish_model(self) -> None:
        """What `latest` points to."""
        output_dir = self.settings.storage.output_dir
        name = artifacts.latest_run(output_dir)
        if name is None:
            self.publisher.retain(self.topics.model, ModelInfo())
            return
        meta = artifacts.read_metadata(output_dir / name)
        known = meta.model_dump(include={"base_model", "trained_at", "samples_used", "final_loss", "eval_loss"})
        current = artifacts.read_current(output_dir)
        # What current.json says, plus the keys this topic carried before current.json existed.
        serving = current.model_dump(include={"directory", "metrics", "promoted_at"}) if current.run_id == name else {}
        model = ModelInfo(run_id=name, path=str((output_dir / name).resolve()), **known, **serving)
        self.publisher.retain(self.topics.model, model)

    def publish_serving(self) -> None:
        """The served adapter, the update entity, the last decision and the history that records them.

        A run's end and a promote publish them from two threads: each reads and publishes under one
        lock, so the last published is also the last read.
        """
        with self._serving_lock:
            self.publish_model()
            self.publish_history()
            update = update_payload(self.store, self.settings)
            with self._lock:
                self._offered = update.latest_version if update.latest_version != update.installed_version else None
            self.publisher.retain(self.topics.adapter, update)
            self.publisher.retain(self.topics.decision, decision_payload(self.store))

    def offered(self) -> str | None:
        """The candidate the update entity last showed for install (what its Install button means)."""
        with self._lock:
            return self._offered

    def refresh_serving(self) -> None:
        """`publish_serving` after a change already made (a run's end, a promote): a history that
        cannot be read now (a PostgreSQL restarting) leaves those topics as they were and is logged,
        and never keeps the caller from answering or from publishing the run's final state."""
        try:
            self.publish_serving()
        except Exception as exc:  # what reads the history raises its own database errors
            _LOGGER.warning(
                "Could not refresh last_run, runs, model and adapter (they are left as they were until the "
                "next run, promote or restart): %s: %s",
                type(exc).__name__,
                first_line(exc),
            )

    def event(self, event: TriggerEvent) -> None:
        """Fire one device trigger."""
        self.publisher.event(self.topics.event, event)

    # --- runner events ---------------------------------------------------------------------------

    def run_state(self, run: TrainingRun, phase: Phase | None, message: str) -> None:
        self._phase_message = message
        self._publish_state(State.QUEUED if phase is None else State.RUNNING, run.run_identifier, phase, message)
        if phase is None:
            self.event(TriggerEvent(event="run_started", run_id=run.run_identifier))
        if phase is None:
            self._publish_progress(ProgressPayload(run_id=run.run_identifier))

    def run_progress(self, run: TrainingRun, event: ProgressEvent) -> None:
        now = time.monotonic()
        final = event.step >= event.total_steps
        if not final and now - self._last_progress_at < self.settings.daemon.progress_interval_s:
            return
        self._last_progress_at = now
        if event.phase is Phase.EVALUATING:
            # The adapters' scoring after training counts its own steps: said in the state's message,
            # so `progress` (the run's percent) never falls back from 100 to a few.
            message = f"{self._phase_message}: {event.step} of {event.total_steps} scoring steps"
            self._publish_state(State.RUNNING, run.run_identifier, Phase.EVALUATING, message)
            return
        payload = ProgressPayload(
            run_id=run.run_identifier,
            percent=event.percent,
            **event.model_dump(include={"step", "total_steps", "epoch", "loss", "samples_per_s", "eta_s"}),
        )
        self._publish_progress(payload)

    def run_finished(self, run: TrainingRun, result: RunResult) -> None:
        if result.status is RunStatus.COMPLETED:
            with self._lock:
                previous = self._progress
            update = {"run_id": run.run_identifier, "percent": 100.0, "eta_s": 0.0}
            self._publish_progress(previous.model_copy(update=update))
        message = {
            RunStatus.COMPLETED: f"completed: {result.decision_reason or f'final loss {result.final_loss}'}",
            RunStatus.CANCELLED: "cancelled; the current model is unchanged",
        }.get(result.status) or result.reason()
        self.refresh_serving()
        # Before the final state, so whoever waits for the state has seen the triggers too.
        for event in finished_events(run, result):
            self.publisher.event(self.topics.event, event)
        self._publish_state(State(result.status.value), run.run_identifier, None, message)
        _LOGGER.info("Run %s %s", run.run_identifier, result.status.value)

"""The training child process: one run, events out as JSON lines on a private pipe.

The daemon starts it per run so that a crash, an out-of-memory kill or a hang in torch cannot
take the daemon down, and so that every byte torch allocated is returned when it exits.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import IO, Any

from pydantic import BaseModel, ConfigDict

from homeiq_trainer.messages import EventEnvelope, Phase, PhaseEvent, ProgressEvent, RunResult, RunStatus, TrainParams

_LOGGER = logging.getLogger(__name__)

PARENT_PID_ENV = "HOMEIQ_TRAINER_PARENT_PID"
# The child reports at most this often; the daemon throttles again for MQTT.
EVENT_MIN_INTERVAL_S = 0.2
_PR_SET_PDEATHSIG = 1


class WorkerJob(BaseModel):
    """What the daemon sends the child on stdin."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any]
    params: TrainParams
    run_identifier: str


class PipeObserver:
    """Writes training events to the daemon, throttled, each as one JSON line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last_progress = 0.0

    def send(self, event: Any) -> None:
        line = EventEnvelope(event=event).model_dump_json()
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def phase(self, phase: Phase, message: str = "") -> None:
        self.send(PhaseEvent(phase=phase, message=message))

    def progress(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.step < event.total_steps and now - self._last_progress < EVENT_MIN_INTERVAL_S:
            return
        self._last_progress = now
        self.send(event)


def _die_with_parent() -> None:
    """Ask the kernel to kill us when the daemon dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the stdin watcher below still notices
        pass
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)  # the parent died before prctl took effect


def main(event_fd: int) -> int:
    """Run the job read from stdin; always ends with a result event unless killed."""
    _die_with_parent()
    events = os.fdopen(event_fd, "w", encoding="utf-8", buffering=1)
    # Libraries print to stdout (the Trainer's final metrics); keep it off anything we parse.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    observer = PipeObserver(events)

    job = WorkerJob.model_validate_json(sys.stdin.readline())

    def watch_stdin() -> None:
        # The daemon holds our stdin open; EOF means it is gone or wants us to stop.
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    from homeiq_trainer.settings import Settings
    from homeiq_trainer.training.run import execute_run

    settings = Settings.model_validate(job.settings)
    logging.getLogger().setLevel(settings.log_level)
    observer.phase(Phase.STARTING, f"training process {os.getpid()}")
    try:
        result = execute_run(settings, job.params, job.run_identifier, observer, stop)
    except Exception as exc:  # the outermost frame of this process: report, never hang
        import traceback

        _LOGGER.exception("Training failed")
        result = RunResult(
            run_identifier=job.run_identifier,
            status=RunStatus.FAILED,
            base_model=job.params.base_model or settings.training.base_model,
            error="".join(traceback.format_exception(exc)).strip(),
        )
    observer.send(result)
    events.close()
    return 0


def job_payload(settings_dump: dict[str, Any], params: TrainParams, run_identifier: str) -> str:
    """The line the daemon writes to the child's stdin."""
    return WorkerJob(settings=settings_dump, params=params, run_identifier=run_identifier).model_dump_json() + "\n"


def parse_event(line: str) -> Any:
    """One event line from the child, validated."""
    return EventEnvelope.model_validate(json.loads(line)).event

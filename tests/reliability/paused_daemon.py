"""`python -m tests.reliability.paused_daemon <phase> <seconds>`: the daemon, holding runs at one phase.

`queued` and `saving` last microseconds with the tiny model; the crash tests hold them open to kill the
daemon there. The pause is injected through the launcher (and, for the child's phases, through a
wrapper of the worker's entry point), so production code reads no test switch.
"""

from __future__ import annotations

import sys
import time

from homeiq_trainer.app import serve
from homeiq_trainer.cli import _settings, _setup_logging, build_parser
from homeiq_trainer.history import TrainingRun
from homeiq_trainer.jobs import JobRequest
from homeiq_trainer.runner import WORKER_COMMAND, SubprocessLauncher, TrainingProcess
from homeiq_trainer.settings import Settings


class PausingLauncher(SubprocessLauncher):
    """Holds a run `queued` before its process starts, or has the child hold at one of its phases."""

    def __init__(self, phase: str, seconds: float) -> None:
        wrapped = (sys.executable, "-m", "tests.reliability.paused_worker", phase, str(seconds))
        super().__init__(WORKER_COMMAND if phase == "queued" else wrapped)
        self.phase, self.seconds = phase, seconds

    def start(self, settings: Settings, request: JobRequest, run: TrainingRun) -> TrainingProcess:
        if self.phase == "queued":
            time.sleep(self.seconds)
        return super().start(settings, request, run)


def main() -> int:
    phase, seconds = sys.argv[1], float(sys.argv[2])
    settings = _settings(build_parser().parse_args(["serve"]))
    _setup_logging(settings.log_level)
    return serve(settings, launcher=PausingLauncher(phase, seconds))


if __name__ == "__main__":
    sys.exit(main())

"""The training child, holding at one phase: `python -m tests.reliability.paused_worker <phase> <s> --event-fd N`."""

from __future__ import annotations

import sys
import time

from homeiq_trainer import worker
from homeiq_trainer.messages import Phase


def main() -> int:
    phase, seconds = Phase(sys.argv[1]), float(sys.argv[2])
    event_fd = int(sys.argv[sys.argv.index("--event-fd") + 1])
    report = worker.PipeObserver.phase

    def phase_then_pause(self: worker.PipeObserver, entered: Phase, message: str = "") -> None:
        report(self, entered, message)
        if entered is phase:
            time.sleep(seconds)

    worker.PipeObserver.phase = phase_then_pause  # type: ignore[method-assign]
    return worker.main(event_fd)


if __name__ == "__main__":
    sys.exit(main())

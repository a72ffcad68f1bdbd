"""The training child, crawling until released: `python -m tests.reliability.crawling_worker <file> <s> --event-fd N`.

Until `<file>` exists, every training step waits `<s>` seconds before it reports its progress, so a test
holds a run in `training`, still stepping and still publishing progress, for as long as the test needs;
once the file exists the run finishes at full speed. Injected through the launcher, like
`paused_worker`, so production code reads no test switch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from homeiq_trainer import worker
from homeiq_trainer.messages import ProgressEvent


def main() -> int:
    release, seconds = Path(sys.argv[1]), float(sys.argv[2])
    event_fd = int(sys.argv[sys.argv.index("--event-fd") + 1])
    report = worker.PipeObserver.progress

    def crawl_then_report(self: worker.PipeObserver, event: ProgressEvent) -> None:
        if not release.exists():
            time.sleep(seconds)
        report(self, event)

    worker.PipeObserver.progress = crawl_then_report  # type: ignore[method-assign]
    return worker.main(event_fd)


if __name__ == "__main__":
    sys.exit(main())

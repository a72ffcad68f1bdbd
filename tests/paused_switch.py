"""`homeiq-trainer` that holds before every switch of `latest`: `python -m tests.paused_switch <s> train ...`.

The run is recorded as served first; the pause lets a test kill the process before `latest` moves.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from homeiq_trainer import cli
from homeiq_trainer.training import artifacts


def main() -> int:
    seconds = float(sys.argv[1])
    switch = artifacts.promote

    def pause_then_switch(output_dir: Path, run_identifier: str) -> Path:
        time.sleep(seconds)
        return switch(output_dir, run_identifier)

    artifacts.promote = pause_then_switch  # type: ignore[assignment]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())

"""`homeiq-trainer` that holds after every switch of `latest`: `python -m tests.paused_switch <s> train ...`.

`latest` and `current.json` move first and the history records the run after; the pause lets a test
kill the process in between.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from homeiq_trainer import cli
from homeiq_trainer.training import artifacts


def main() -> int:
    seconds = float(sys.argv[1])
    write_current = artifacts.write_current

    def switch_then_pause(output_dir: Path, record: Any) -> None:
        write_current(output_dir, record)
        time.sleep(seconds)

    artifacts.write_current = switch_then_pause  # type: ignore[assignment]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())

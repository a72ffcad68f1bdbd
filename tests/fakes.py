"""Fake training processes for tests that need a run without torch: scripted events, no child process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from homeiq_trainer.history import TrainingRun
from homeiq_trainer.jobs import JobRequest
from homeiq_trainer.messages import RunResult, RunStatus
from homeiq_trainer.runner import Stalled, TrainingProcess
from homeiq_trainer.settings import Settings


class FakeProcess:
    """Scripted events; `hang` waits for a terminate, a `threading.Event` until it is set."""

    def __init__(self, script: list, run: TrainingRun) -> None:
        self.script = script
        self.run = run
        self.terminated = threading.Event()
        self.killed = False
        self.code: int | None = None

    def events(self, stall_timeout_s: float) -> Iterator:
        for item in self.script:
            if item == "hang":
                while not self.terminated.is_set() and not self.killed:
                    yield None
                    time.sleep(0.01)
                continue
            if isinstance(item, threading.Event):  # a gate: ticks until the test sets it
                while not item.is_set():
                    yield None
                    time.sleep(0.01)
                continue
            if item == "silent":
                raise Stalled(f"the training process said nothing for {stall_timeout_s:g} s")
            if item == "die":
                self.code = -9
                return
            if item == "result":
                status = RunStatus.CANCELLED if self.terminated.is_set() else RunStatus.COMPLETED
                yield RunResult(run_identifier=self.run.run_identifier, status=status, base_model="m", final_loss=1.5)
                continue
            if isinstance(item, tuple) and item[0] == "completed anyway":  # finished despite a terminate
                run_dir = item[1] / self.run.run_identifier
                run_dir.mkdir(parents=True)
                yield RunResult(
                    run_identifier=self.run.run_identifier,
                    status=RunStatus.COMPLETED,
                    base_model="m",
                    final_loss=1.5,
                    run_dir=str(run_dir),
                )
                continue
            yield item
        self.code = 0

    def terminate(self) -> None:
        self.terminated.set()

    def kill(self) -> None:
        self.killed = True
        self.code = -9

    def wait(self, timeout_s: float) -> int | None:
        return self.code if self.code is not None else 0

    def failure_text(self) -> str:
        return "boom\nthe training process was killed by SIGKILL"


class FakeLauncher:
    def __init__(self, script: list) -> None:
        self.script = script
        self.started: list[FakeProcess] = []
        self.calls: list[tuple[Settings, JobRequest]] = []
        """The settings and request of every run started, in order."""

    def start(self, settings: Settings, request: JobRequest, run: TrainingRun) -> FakeProcess:
        process = FakeProcess(self.script, run)
        self.started.append(process)
        self.calls.append((settings, request))
        return process


class RefusingLauncher:
    """Fails the test if any payload ever gets as far as starting a training process."""

    def start(self, settings: Settings, request: Any, run: Any) -> TrainingProcess:
        raise AssertionError(f"a fuzzed command started run {run.run_identifier}")

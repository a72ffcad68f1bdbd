"""The runner with a fake training process: lifecycle, busy, cancel, crash, stall. No broker, no torch."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from homeiq_trainer.history import HistoryStore, TrainingRun
from homeiq_trainer.jobs import JobRequest
from homeiq_trainer.messages import Phase, PhaseEvent, ProgressEvent, RunResult, RunStatus, TrainParams, utcnow
from homeiq_trainer.runner import Busy, NotRunning, Runner, ShuttingDown, SubprocessTraining
from homeiq_trainer.settings import Settings, load_settings
from homeiq_trainer.worker import PARENT_PID_ENV

from .fakes import FakeLauncher


class Listener:
    def __init__(self) -> None:
        self.states: list[tuple[str, Phase | None]] = []
        self.progress: list[int] = []
        self.finished: list[RunResult] = []
        self.done = threading.Event()

    def run_state(self, run: TrainingRun, phase: Phase | None, message: str) -> None:
        self.states.append((run.run_identifier, phase))

    def run_progress(self, run: TrainingRun, event: ProgressEvent) -> None:
        self.progress.append(event.step)

    def run_finished(self, run: TrainingRun, result: RunResult) -> None:
        self.finished.append(result)
        self.done.set()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        {
            "storage": {"history_db": str(tmp_path / "h.db"), "output_dir": str(tmp_path / "out")},
            "daemon": {"stop_timeout_s": 2, "stall_timeout_s": 10},
        },
    )


def make_runner(settings: Settings, script: list) -> tuple[Runner, Listener, FakeLauncher, HistoryStore]:
    store = HistoryStore(settings.storage.history_db)
    listener = Listener()
    launcher = FakeLauncher(script)
    return Runner(settings, store, listener, launcher), listener, launcher, store


def test_lifecycle_queued_running_completed(settings: Settings) -> None:
    script = [
        PhaseEvent(phase=Phase.TRAINING),
        ProgressEvent(step=1, total_steps=2, epoch=0.5),
        ProgressEvent(step=2, total_steps=2, epoch=1.0),
        "result",
    ]
    runner, listener, _, store = make_runner(settings, script)
    run = runner.submit(JobRequest(params=TrainParams(), triggered_by="test"))
    assert listener.done.wait(10)
    assert [phase for _, phase in listener.states] == [None, Phase.STARTING, Phase.TRAINING]
    assert listener.progress == [1, 2]
    row = store.by_identifier(run.run_identifier)
    assert row.status == "completed" and row.final_loss == 1.5 and row.triggered_by == "test"
    assert runner.active is None


def test_busy_then_cancel(settings: Settings) -> None:
    runner, listener, launcher, store = make_runner(settings, [PhaseEvent(phase=Phase.TRAINING), "hang", "result"])
    run = runner.submit(JobRequest(params=TrainParams()))
    with pytest.raises(Busy) as info:
        runner.submit(JobRequest(params=TrainParams()))
    assert info.value.run.run_identifier == run.run_identifier
    deadline = time.monotonic() + 5
    while not launcher.started and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.cancel()
    assert listener.done.wait(10)
    assert listener.finished[0].status is RunStatus.CANCELLED
    assert store.by_identifier(run.run_identifier).status == "cancelled"
    with pytest.raises(NotRunning):
        runner.cancel()


def saving_run_that_completes_anyway(settings: Settings) -> tuple[Runner, Listener, HistoryStore, TrainingRun]:
    """A run in its saving phase whose process completes even when told to stop."""
    script = [PhaseEvent(phase=Phase.SAVING), "hang", ("completed anyway", settings.storage.output_dir)]
    runner, listener, launcher, store = make_runner(settings, script)
    run = runner.submit(JobRequest(params=TrainParams()))
    deadline = time.monotonic() + 5
    while not launcher.started and time.monotonic() < deadline:
        time.sleep(0.01)
    return runner, listener, store, run


def test_a_run_that_completes_after_a_cancel_is_taken_back(settings: Settings) -> None:
    output_dir = settings.storage.output_dir
    runner, listener, store, run = saving_run_that_completes_anyway(settings)
    runner.cancel()
    assert listener.done.wait(10)
    assert listener.finished[0].status is RunStatus.CANCELLED and not listener.finished[0].promoted
    row = store.by_identifier(run.run_identifier)
    assert row.status == "cancelled" and not row.promoted
    assert not (output_dir / run.run_identifier).exists() and not (output_dir / "latest").exists()


def test_a_shutdown_keeps_a_run_that_completes_meanwhile(settings: Settings) -> None:
    output_dir = settings.storage.output_dir
    runner, listener, store, run = saving_run_that_completes_anyway(settings)
    runner.shutdown(timeout_s=5)
    assert listener.done.wait(10)
    assert listener.finished[0].status is RunStatus.COMPLETED
    assert store.by_identifier(run.run_identifier).status == "completed"
    assert (output_dir / run.run_identifier).is_dir()


def test_process_death_fails_the_run_with_its_reason(settings: Settings) -> None:
    runner, listener, _, store = make_runner(settings, [PhaseEvent(phase=Phase.TRAINING), "die"])
    run = runner.submit(JobRequest(params=TrainParams()))
    assert listener.done.wait(10)
    row = store.by_identifier(run.run_identifier)
    assert row.status == "failed" and "SIGKILL" in row.error_message and row.finished_at is not None


def test_stalled_process_is_killed_and_failed(settings: Settings) -> None:
    runner, listener, launcher, store = make_runner(settings, [PhaseEvent(phase=Phase.TRAINING), "silent"])
    run = runner.submit(JobRequest(params=TrainParams()))
    assert listener.done.wait(10)
    assert launcher.started[0].killed
    assert "said nothing" in store.by_identifier(run.run_identifier).error_message


def test_shutdown_cancels_and_refuses_new_work(settings: Settings) -> None:
    runner, listener, _, store = make_runner(settings, ["hang", "result"])
    runner.submit(JobRequest(params=TrainParams()))
    runner.shutdown(timeout_s=5)
    assert listener.finished and listener.finished[0].status is RunStatus.CANCELLED
    with pytest.raises(ShuttingDown, match="shutting down"):
        runner.submit(JobRequest(params=TrainParams()))


def test_a_launcher_that_raises_fails_the_run_not_the_daemon(settings: Settings) -> None:
    class Broken:
        def start(self, *args: object) -> None:
            raise OSError("cannot fork")

    store = HistoryStore(settings.storage.history_db)
    listener = Listener()
    runner = Runner(settings, store, listener, Broken())  # type: ignore[arg-type]
    run = runner.submit(JobRequest(params=TrainParams()))
    assert listener.done.wait(10)
    assert "cannot fork" in store.by_identifier(run.run_identifier).error_message
    assert runner.active is None


def test_slow_steps_still_publish_progress_every_few_seconds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import homeiq_trainer.runner as runner_module

    monkeypatch.setattr(runner_module, "PROGRESS_HEARTBEAT_S", 0.05)
    script = [PhaseEvent(phase=Phase.TRAINING), ProgressEvent(step=1, total_steps=9, epoch=0.1), "hang", "result"]
    runner, listener, launcher, _ = make_runner(settings, script)
    runner.submit(JobRequest(params=TrainParams()))
    deadline = time.monotonic() + 5
    while len(listener.progress) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.cancel()
    assert listener.done.wait(10)
    assert listener.progress[:3] == [1, 1, 1]  # the same step repeated while the next one is slow


def test_training_process_gets_only_an_allow_listed_environment(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "SUPERVISOR_TOKEN": "supervisor-secret",
        "HASSIO_TOKEN": "hassio-secret",
        "HOMEIQ_MQTT__PASSWORD": "mqtt-secret",
        "HOMEIQ_MQTT": '{"password": "json-secret"}',
        "homeiq_mqtt__password": "lower-case-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env.json"
    # A child that writes down what it inherited (the real worker's command line, another program).
    command = (sys.executable, "-c", f"import json, os; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))")
    run = TrainingRun(run_identifier="run_20250101_000000", started_at=utcnow())
    child = SubprocessTraining(settings, JobRequest(params=TrainParams()), run, command)
    assert child.wait(30) == 0
    env = json.loads(dump.read_text())
    assert not set(secrets) & set(env)
    assert not [value for value in secrets.values() if value in json.dumps(env)]
    # What Python and Hugging Face need still arrives.
    assert env["PATH"] == os.environ["PATH"] and env["HF_HUB_OFFLINE"] == "1"
    assert env[PARENT_PID_ENV] == str(os.getpid())

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
from homeiq_trainer.runner import (
    SHUTDOWN_CANCEL_REASON,
    Busy,
    NotRunning,
    Runner,
    ShuttingDown,
    Stalled,
    SubprocessTraining,
)
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
    cancelled = store.by_identifier(run.run_identifier)
    assert cancelled is not None and (cancelled.status, cancelled.error_message) == ("cancelled", None)
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
    # Said in the history (and in HomeIQ's table, where a user's cancel reads "cancelled on request").
    assert [(r.status, r.error_message) for r in store.recent(5)] == [("cancelled", SHUTDOWN_CANCEL_REASON)]
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
    # Ray Client's TLS set-up and Ray Train's knobs are read from the environment of the process that
    # connects: without them a daemon's run met a TLS head in clear and failed as a wrong token.
    ray = {"RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": "/ssl/ca.pem", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    for name, value in ray.items():
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
    assert {name: env.get(name) for name in ray} == ray
    assert env[PARENT_PID_ENV] == str(os.getpid())


def _child(script: str) -> tuple[str, ...]:
    """A training-process stand-in: `script` with `fd`, its event pipe, and `say(event)`; the real
    worker's command line gets `--event-fd N` appended."""
    prelude = (
        "import os, signal, sys, time\n"
        "from homeiq_trainer.worker import EventEnvelope\n"
        "fd = int(sys.argv[sys.argv.index('--event-fd') + 1])\n"
        "def say(event):\n"
        "    os.write(fd, (EventEnvelope(event=event).model_dump_json() + '\\n').encode())\n"
    )
    return (sys.executable, "-c", prelude + script)


def _events(child: SubprocessTraining) -> list:
    """What the stand-in said, without the ticks `events` adds each quiet second (a slow start has some)."""
    return [event for event in child.events(stall_timeout_s=60) if event is not None]


def _training(settings: Settings, script: str) -> SubprocessTraining:
    run = TrainingRun(run_identifier="run_20250101_000000", started_at=utcnow())
    return SubprocessTraining(settings, JobRequest(params=TrainParams()), run, _child(script))


def _gone(pid: int, timeout_s: float = 5) -> bool:
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_child_killed_while_what_it_forked_holds_its_pipe_ends_the_run_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    """Its end came only from the pipe's EOF: a forked helper kept the pipe open, so the run waited out
    the stall timeout (900 s by default) and failed as silent, and the helper lived on, orphaned."""
    pid_file = tmp_path / "helper.pid"
    child = _training(
        settings,
        "helper = os.fork()\n"  # a fork-started data worker: it inherits every descriptor
        "if helper == 0:\n"
        "    time.sleep(3600)\n"
        "    os._exit(0)\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    started = time.monotonic()
    assert _events(child) == []
    assert time.monotonic() - started < 10
    assert child.wait(10) == -9
    assert "killed by SIGKILL (out of memory" in child.failure_text()
    assert _gone(int(pid_file.read_text())), "the helper outlived the run"


def test_what_the_training_process_started_is_killed_with_it(settings: Settings, tmp_path: Path) -> None:
    """A helper it started (its own pipes closed) was orphaned to init when the run ended, holding memory."""
    pid_file = tmp_path / "helper.pid"
    child = _training(
        settings,
        "import subprocess\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    assert _events(child) == []
    assert child.wait(10) == -9
    assert _gone(int(pid_file.read_text())), "the helper outlived the run"


def test_a_child_that_closes_its_pipe_and_keeps_running_is_not_called_out_of_memory(settings: Settings) -> None:
    child = _training(settings, "os.close(fd)\ntime.sleep(3600)\n")
    assert _events(child) == []
    assert child.wait(0.5) is None
    child.kill()
    assert child.wait(10) == -9
    text = child.failure_text()
    assert "stopped reporting without a result and was killed" in text and "out of memory" not in text


def test_an_event_line_without_end_is_dropped_not_buffered_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each read copied the whole unfinished line: 32 MB took 10.8 s and +97 MiB in the daemon."""
    from homeiq_trainer import runner as runner_module

    monkeypatch.setattr(runner_module, "MAX_EVENT_LINE_BYTES", 256 * 1024)
    child = _training(
        settings,
        "from homeiq_trainer.messages import Phase, PhaseEvent\n"
        "for _ in range(64):\n"
        "    os.write(fd, b'x' * 65536)\n"  # 4 MiB, no newline
        "os.write(fd, b'xx\\n')\n"
        "say(PhaseEvent(phase=Phase.TRAINING, message='after it'))\n",
    )
    caplog.set_level("WARNING", logger="homeiq_trainer.runner")
    events = _events(child)
    assert [(e.phase, e.message) for e in events] == [(Phase.TRAINING, "after it")]
    assert len(child._pending) == 0
    # Dropped at the cap as it came, not buffered whole and then refused as malformed.
    assert "Dropping an event line over 262144 bytes" in caplog.text and "malformed" not in caplog.text
    assert child.wait(10) == 0


def test_a_process_that_says_nothing_is_stalled(settings: Settings) -> None:
    child = _training(settings, "time.sleep(3600)\n")
    with pytest.raises(Stalled, match="said nothing for 1.5 s"):
        list(child.events(stall_timeout_s=1.5))
    child.kill()
    assert child.wait(10) == -9


def test_a_process_killed_mid_save_leaves_no_staging_folders(settings: Settings) -> None:
    from homeiq_trainer.training import artifacts

    runner, listener, launcher, store = make_runner(settings, [PhaseEvent(phase=Phase.SAVING), "die"])
    real_start = launcher.start

    def start(run_settings: Settings, request: JobRequest, run: TrainingRun) -> object:
        staging = artifacts.staging_dir(run_settings.storage.output_dir, run.run_identifier)
        (staging / "adapter").mkdir(parents=True)  # what the child had saved when it was killed
        artifacts.trainer_scratch_dir(staging).mkdir()
        return real_start(run_settings, request, run)

    launcher.start = start  # type: ignore[method-assign]
    runner.submit(JobRequest(params=TrainParams()))
    assert listener.done.wait(10)
    assert listener.finished[0].status is RunStatus.FAILED
    assert list(settings.storage.output_dir.iterdir()) == []
    store.close()


def test_a_shutdown_while_queued_is_still_being_published_stops_cleanly(settings: Settings) -> None:
    """`submit` starts its thread after publishing `queued`; a shutdown then joined a thread not yet
    started, and the daemon's stop ended in a RuntimeError (no clean offline, the lock kept)."""
    runner, listener, _, store = make_runner(settings, ["hang", "result"])
    publishing = threading.Event()
    real_state = listener.run_state

    def slow_state(run: TrainingRun, phase: Phase | None, message: str) -> None:
        if phase is None:  # `queued`, held as a reconnect's announce holds the publisher
            publishing.set()
            time.sleep(0.5)
        real_state(run, phase, message)

    listener.run_state = slow_state  # type: ignore[method-assign]
    submitter = threading.Thread(target=runner.submit, args=(JobRequest(params=TrainParams()),))
    submitter.start()
    assert publishing.wait(5)
    runner.shutdown(timeout_s=2)
    submitter.join(5)
    assert listener.done.is_set() and listener.finished[0].status is RunStatus.CANCELLED
    store.close()


def test_the_result_written_just_before_the_process_exits_is_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty wait that ended just as the process wrote its result and exited: the exit was seen
    first, and a completed run was recorded as failed, "exited with code 0 without a result"."""
    import selectors

    from homeiq_trainer import runner as runner_module

    real_selector = selectors.DefaultSelector

    class LateSelector:
        def __init__(self) -> None:
            self.inner = real_selector()
            self.first = True

        def register(self, *args: object) -> object:
            return self.inner.register(*args)

        def select(self, timeout: float | None = None) -> list:
            if self.first and timeout == runner_module.TICK_S:
                self.first = False
                assert _gone(child.proc.pid, 30)  # meanwhile the process writes and exits
                return []
            return self.inner.select(timeout)

        def close(self) -> None:
            self.inner.close()

    child = _training(
        settings,
        "time.sleep(0.5)\nsay(PhaseEvent(phase=Phase.SAVING, message='done'))\n".replace(
            "say(", "from homeiq_trainer.messages import Phase, PhaseEvent\nsay("
        ),
    )
    monkeypatch.setattr(runner_module.selectors, "DefaultSelector", LateSelector)
    events = _events(child)
    assert [(e.phase, e.message) for e in events] == [(Phase.SAVING, "done")]
    assert child.wait(10) == 0


def test_a_shutdown_does_not_wait_out_the_retries_of_an_unrecorded_end(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retries slept through the stop's whole wait: the run's end was published after the daemon
    had closed its connection, and a run the gate chose was announced as promoted although unserved."""
    from homeiq_trainer import runner as runner_module
    from homeiq_trainer.messages import Decision

    def refused(*_args: object, **_kwargs: object) -> None:
        raise OSError("the history refuses")

    monkeypatch.setattr(runner_module, "conclude", refused)
    monkeypatch.setattr(runner_module, "RECORD_RETRY_DELAYS_S", (60.0,))
    chosen = RunResult(
        run_identifier="x", status=RunStatus.COMPLETED, base_model="m", decision=Decision.PROMOTED, decision_reason="ok"
    )
    runner, listener, _, store = make_runner(settings, ["hang", chosen])
    run = runner.submit(JobRequest(params=TrainParams()))
    while runner.active is None or runner.active.process is None:
        time.sleep(0.01)
    started = time.monotonic()
    runner.shutdown(timeout_s=2)
    assert time.monotonic() - started < 30  # not the 60 s retry pause
    assert listener.done.is_set()
    assert (
        listener.finished[0].decision is Decision.KEPT_CURRENT and "not served" in listener.finished[0].decision_reason
    )
    assert store.get(run.id).status == "running"  # still refused at shutdown; the next start records it
    store.close()

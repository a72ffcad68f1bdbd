"""Training on a Ray cluster: a real local cluster on loopback, the tiny model, the daemon's own path.

The cluster is started once for this module (`ray start --head --block`, token authentication on,
every address 127.0.0.1) and killed process by process afterwards. Runs go through the daemon or the
CLI, so Ray lives in a training process, as in production, and never in the test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.settings import REVEAL_SECRETS, ConfigError, Settings, load_settings
from homeiq_trainer.training import ray_backend
from homeiq_trainer.training.data import load_examples
from homeiq_trainer.training.engine import _LossMeter
from homeiq_trainer.training.evaluate import split_examples
from homeiq_trainer.training.ray_backend import ClusterError, check_fits

from .conftest import Broker, SettingsFactory, free_port
from .losses import independent_token_loss
from .mqtt_client import Watcher
from .ray_cluster import RayHead

BASE = "homeiq/trainer"
CMD, RESP, STATE, PROGRESS = f"{BASE}/command", f"{BASE}/response", f"{BASE}/state", f"{BASE}/progress"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A running local Ray cluster for the module's tests."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Ray is not installed; scripts/test.sh installs the [ray] extra")
    head = RayHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()


def ray_settings(make_settings: SettingsFactory, broker: Broker, head: RayHead, **sections: dict) -> Settings:
    """The daemon's settings with training on the test cluster (two CPU workers)."""
    # A generous connect timeout: on a 2-core machine shared with other work, the head takes its time
    # to start the per-client server (2-4 s when quiet).
    ray = {"address": head.address, "num_workers": 2, "auth_token": head.token, "connect_timeout_s": 90}
    ray.update(sections.pop("ray", {}))
    return make_settings(
        mqtt={"host": "127.0.0.1", "port": broker.port, "client_id": "homeiq-trainer-test"},
        training={"backend": "ray", **sections.pop("training", {})},
        ray=ray,
        **sections,
    )


def running_app(settings: Settings) -> TrainerApp:
    app = TrainerApp(settings)
    app.start()
    assert app.link.wait_connected(10)
    return app


def finished(state: dict) -> bool:
    return state["state"] in ("completed", "failed", "cancelled")


def start_long_run(watcher: Watcher, epochs: int = 100) -> str:
    """Start a run that would train for minutes and wait until its workers report a step."""
    run_id = watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": epochs}})["data"]["run_id"]
    # Generous: a job placed right after another's teardown may wait for its workers' CPUs first.
    watcher.wait_for(PROGRESS, lambda p: p.get("run_id") == run_id and p["step"] > 0, timeout=300)
    return run_id


# --- pure -----------------------------------------------------------------------------------------


def test_reported_losses_sum_tokens_over_workers() -> None:
    # Two workers whose batches differ in length: the exact figure is the sum of losses over the sum
    # of tokens, 320 / 110, not the mean of the workers' means, (2 + 3) / 2.
    other_worker = [300.0, 100.0]  # its loss sum and tokens: mean 3
    meter = _LossMeter(reduce=lambda values: [a + b for a, b in zip(values, other_worker, strict=True)])
    meter.add(20.0, 10)  # this worker's: mean 2
    assert meter.take_window() == pytest.approx(320.0 / 110.0)
    meter.close_epoch()
    assert meter.last_epoch_mean == pytest.approx(320.0 / 110.0)


def test_ray_settings_are_checked_and_the_token_stays_secret() -> None:
    settings = load_settings(None, {"ray": {"address": "ray://gpu-host:10001", "auth_token": "s3cret-token"}})
    assert settings.training.backend == "local" and settings.ray.num_workers == 1
    assert "s3cret" not in repr(settings) and "s3cret" not in json.dumps(settings.model_dump(mode="json"))
    # Only the daemon's private pipe to its training process carries it in clear.
    revealed = settings.model_dump(mode="json", context={REVEAL_SECRETS: True})
    assert Settings.model_validate(revealed).ray.auth_token.get_secret_value() == "s3cret-token"  # type: ignore[union-attr]
    for bad in ({"address": "gpu-host:10001"}, {"address": "ray://gpu-host"}, {"resources_per_worker": {"GPU": 0}}):
        with pytest.raises(ConfigError, match="ray"):
            load_settings(None, {"ray": bad})


def test_a_job_the_cluster_cannot_place_is_refused() -> None:
    cluster = load_settings(None, {"ray": {"num_workers": 2, "use_gpu": True}}).ray
    with pytest.raises(ClusterError, match=r"has 0 GPU, but 2 worker\(s\) need 2"):
        check_fits(cluster, [{"CPU": 16.0}])
    check_fits(cluster, [{"CPU": 16.0, "GPU": 2.0}])
    check_fits(cluster, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])


def test_a_worker_no_single_node_can_hold_is_refused() -> None:
    """Totals were all that was checked: 2 nodes of 4 CPUs passed a worker of 6, which Ray waits for forever."""
    cluster = load_settings(None, {"ray": {"num_workers": 1, "resources_per_worker": {"CPU": 6}}}).ray
    with pytest.raises(ClusterError, match=r"can place 0 of 1 worker\(s\): each needs 6 CPU on one node"):
        check_fits(cluster, [{"CPU": 4.0}, {"CPU": 4.0}])
    check_fits(cluster, [{"CPU": 4.0}, {"CPU": 6.0}])
    # Three workers of 3 CPUs and 1 GPU: the GPU node holds two, the CPU-only node none.
    three = load_settings(None, {"ray": {"num_workers": 3, "resources_per_worker": {"CPU": 3, "GPU": 1}}}).ray
    with pytest.raises(ClusterError, match=r"can place 2 of 3"):
        check_fits(three, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}])
    # With use_gpu and no resources_per_worker Ray asks for 1 GPU and no CPU: a GPU node without CPUs holds both.
    gpus = load_settings(None, {"ray": {"num_workers": 2, "use_gpu": True}}).ray
    check_fits(gpus, [{"CPU": 8.0}, {"CPU": 0.0, "GPU": 2.0}])
    fractional = load_settings(None, {"ray": {"num_workers": 3, "resources_per_worker": {"CPU": 0.1}}}).ray
    check_fits(fractional, [{"CPU": 0.3}])


def test_a_worker_group_that_cannot_start_is_not_retried_without_end() -> None:
    """Ray Train retries a worker group that timed out starting forever unless told otherwise (read in Ray's
    `failure_handling/default.py`); a busy cluster then hung the run until the daemon's stall timeout."""
    from ray.train import FailureConfig

    config = ray_backend._failure_config(FailureConfig, load_settings(None, {"ray": {"max_failures": 2}}).ray)
    assert (config.max_failures, config.controller_failure_limit) == (2, 0)


CLIENT_SERVER_EXITED = (
    f"RuntimeError: {ray_backend.CLIENT_SERVER_FAILED}. See ray_client_server_23000.err for detailed logs."
)
# Seen in this project's slow tests: the per-client server exited while the head was reading its command line.
CLIENT_SERVER_ZOMBIE = (
    '  File "/usr/lib/python3/site-packages/ray/util/client/server/proxier.py", line 396, in start_specific_server\n'
    "    cmd = psutil_proc.cmdline()\n"
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=13774)"
)

RUNTIME_ENV_REFUSED = (
    '  File "/usr/lib/python3/site-packages/ray/util/client/server/proxier.py", line 352, in start_specific_server\n'
    "    serialized_runtime_env_context = self._create_runtime_env(\n"
    "RuntimeError: Failed to create runtime_env for Ray client server: No module named 'homeiq_trainer'"
)


class FlakyHead:
    """Stands in for the `ray` module: its head fails to start this many client servers, then connects."""

    def __init__(self, failures: int, error: str = CLIENT_SERVER_EXITED) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def init(self, address: str, **_: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            # As Ray Client raises it: the head's whole traceback, what went wrong on its last line.
            raise ConnectionAbortedError(
                f"Initialization failure from server:\nTraceback (most recent call last):\n  ...\n{self.error}"
            )


@pytest.mark.parametrize("error", [CLIENT_SERVER_EXITED, CLIENT_SERVER_ZOMBIE], ids=["exited", "zombie"])
def test_a_client_server_that_fails_to_start_is_asked_for_again(error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "CONNECT_RETRY_PAUSE_S", 0.01)
    cluster = load_settings(None, {"ray": {"address": "ray://127.0.0.1:10001"}}).ray
    head = FlakyHead(failures=ray_backend.CONNECT_ATTEMPTS - 1, error=error)
    ray_backend.connect(head, cluster)
    assert head.calls == ray_backend.CONNECT_ATTEMPTS

    # A head that never manages it fails the run in one line after the last attempt.
    head = FlakyHead(failures=ray_backend.CONNECT_ATTEMPTS, error=error)
    last_line = re.escape(error.splitlines()[-1][:20])
    with pytest.raises(ClusterError, match=f"^cannot connect to the Ray cluster at ray://127.0.0.1:10001: {last_line}"):
        ray_backend.connect(head, cluster)
    assert head.calls == ray_backend.CONNECT_ATTEMPTS

    # Any other refusal (a wrong token, another Ray version, a runtime_env the head cannot build,
    # even one raised inside start_specific_server) is final at once.
    for refusal in ("RuntimeError: Authentication failed", RUNTIME_ENV_REFUSED):
        head = FlakyHead(failures=1, error=refusal)
        with pytest.raises(ClusterError, match=re.escape(refusal.splitlines()[-1][:40])):
            ray_backend.connect(head, cluster)
        assert head.calls == 1


def test_jobs_started_in_the_same_second_get_their_own_folders_on_the_cluster() -> None:
    names = {ray_backend.job_name() for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith("homeiq-trainer-") for name in names)


def test_idle_daemon_imports_neither_torch_nor_ray() -> None:
    # Everything the daemon imports, including the run's bookkeeping and the Ray backend module itself.
    code = (
        "import sys, homeiq_trainer.cli, homeiq_trainer.app, homeiq_trainer.jobs, homeiq_trainer.training.run, "
        "homeiq_trainer.training.ray_backend; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --- failing fast, without a cluster --------------------------------------------------------------


def train_cli(settings: Settings, env: dict[str, str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """`homeiq-trainer train` as a subprocess with the given settings in its environment."""
    full_env = {
        **os.environ,
        "HOMEIQ_TRAINING__BACKEND": "ray",
        "HOMEIQ_TRAINING__BASE_MODEL": settings.training.base_model,
        "HOMEIQ_DATA__SOURCE_DB": str(settings.data.source_db),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(settings.storage.output_dir),
        "HOMEIQ_STORAGE__HISTORY_DB": str(settings.storage.history_db),
        **env,
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "homeiq_trainer", "train", "--no-progress", "--epochs", "1"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return proc, time.monotonic() - started


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The reasons in the CLI's `error: <run> failed: <reason>` lines."""
    return [line.partition(" failed: ")[2] for line in proc.stderr.splitlines() if line.startswith("error:")]


def no_answer(address: str, timeout_s: float) -> str:
    return (
        f"the Ray cluster at {address} did not answer within {timeout_s:g} s "
        "(a wrong or missing ray.auth_token, not a Ray Client port, or a head too busy to answer)"
    )


def test_unreachable_address_fails_the_run_in_one_line(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    closed = free_port()
    proc, _ = train_cli(settings, {"HOMEIQ_RAY__ADDRESS": f"ray://127.0.0.1:{closed}"}, timeout_s=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    expected = f"cannot reach the Ray cluster at ray://127.0.0.1:{closed} within 15 s: Connection refused"
    assert error_lines(proc) == [expected]
    row = HistoryStore(settings.storage.history_db).recent(1)[0]
    assert row.status == "failed" and row.error_message == expected
    assert (row.parameters_json or {})["backend"] == "ray"
    assert not (settings.storage.output_dir / "latest").exists()


def test_a_port_that_never_answers_fails_within_the_connect_timeout(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    with socket.socket() as silent:
        # Accepts TCP connections (the kernel completes them from the backlog) and never says a word.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"ray://127.0.0.1:{silent.getsockname()[1]}"
        proc, elapsed = train_cli(
            settings, {"HOMEIQ_RAY__ADDRESS": address, "HOMEIQ_RAY__CONNECT_TIMEOUT_S": "3"}, timeout_s=90
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert error_lines(proc) == [no_answer(address, 3)]
    # Reading the data and importing Ray come on top of the 3 s, on a busy 2-core machine.
    assert elapsed < 3 + 40, elapsed


# --- on the cluster, through the daemon ------------------------------------------------------------


def test_start_button_trains_on_two_ray_workers_and_serves_the_adapter(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = running_app(ray_settings(make_settings, broker, ray_head, training={"epochs": 2}))
    try:
        watcher.publish(CMD, "start")
        run_id = watcher.wait_for(RESP, timeout=10)["data"]["run_id"]
        state = watcher.wait_for(STATE, finished, timeout=RUN_TIMEOUT_S)
        assert state["state"] == "completed", (state, ray_head.errors())
    finally:
        app.stop()
    settings, out = app.settings, app.settings.storage.output_dir

    # Home Assistant sees where it trained: the state messages while running, last_run, the sensor.
    messages = [json.loads(p)["message"] for p in watcher.messages(STATE)]
    assert any(f"connecting to the Ray cluster at {ray_head.address}" in m for m in messages)
    assert any(m.endswith("(Ray at 127.0.0.1: 2 CPU worker(s))") and "steps" in m for m in messages)
    last_run = watcher.wait_for(f"{BASE}/last_run", lambda r: r.get("run_id") == run_id, timeout=10)
    assert last_run["backend"] == "ray"
    assert last_run["cluster"] == {
        "address": ray_head.address,
        "workers": 2,
        "use_gpu": False,
        "cpus": float(ray_head.num_cpus),
        "gpus": 0.0,
    }
    sensor = watcher.json(f"homeassistant/device/{settings.daemon.instance_id}/config")["components"]["backend"]
    assert sensor["entity_category"] == "diagnostic" and sensor["state_topic"] == f"{BASE}/last_run"
    progress = [json.loads(p) for p in watcher.messages(PROGRESS) if json.loads(p).get("run_id") == run_id]
    assert any(0 < p["step"] < p["total_steps"] for p in progress) and progress[-1]["percent"] == 100.0

    # Served exactly as a local run's: the same files, `latest`, the model topic, nothing half-written.
    run_dir = out / run_id
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_run.json", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert os.readlink(out / "latest") == run_id
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trainer-*"))
    assert watcher.wait_for(f"{BASE}/model", lambda m: m.get("run_id") == run_id, timeout=10)["path"]
    meta = json.loads((run_dir / "training_run.json").read_text())
    row = HistoryStore(settings.storage.history_db).by_identifier(run_id)
    assert row is not None and row.status == "completed"
    # The held-out set is chosen by a hash of each instruction, so its size is the split's, not 10% exactly.
    examples, _ = load_examples(settings.data.source_db, settings.data.max_samples)
    train_set, held_out = split_examples(examples, 0.1, 20)
    assert row.dataset_size == meta["samples_used"] == 175 == len(examples)
    assert meta["eval_examples"] == len(held_out) > 0
    assert row.final_loss == pytest.approx(meta["final_loss"]) and row.eval_loss == pytest.approx(meta["eval_loss"])
    assert row.iteration_history_json == meta["loss_history"] and len(meta["loss_history"]) >= 2
    assert meta["backend"] == "ray" and meta["cluster"]["workers"] == 2
    assert meta["loss_history"][-1]["loss"] < meta["loss_history"][0]["loss"]
    # Both workers' examples are counted (summed, not averaged), in rounds of one token-budget batch
    # per worker. The last round's top-up (a batch repeated from the start, as DDP needs the same
    # steps everywhere) trains nothing and counts nowhere: each training example once per epoch.
    processed = meta["train_samples_per_second"] * meta["train_runtime_s"]
    assert meta["train_examples"] == len(train_set) and processed == pytest.approx(len(train_set) * 2, rel=0.01)

    # The adapter that came back is the one that was evaluated: same held-out loss, computed here.
    pairs = [(e.instruction, e.response) for e in held_out]
    assert independent_token_loss(settings.training.base_model, pairs, adapter=run_dir) == pytest.approx(
        meta["eval_loss"], rel=1e-4
    )


def test_cancel_reaches_the_cluster_within_seconds(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = running_app(ray_settings(make_settings, broker, ray_head))
    try:
        start_long_run(watcher)
        cancelled_at = time.monotonic()
        assert watcher.request(CMD, RESP, {"action": "cancel"})["status"] == "ok"
        state = watcher.wait_for(STATE, finished, timeout=60)
        took = time.monotonic() - cancelled_at
        # The daemon kept answering while the cluster stopped.
        assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"
    finally:
        app.stop()
    assert state["state"] == "cancelled"
    # Stopped by the cluster at a step boundary, not by killing the training process at the deadline.
    assert took < app.settings.daemon.stop_timeout_s, took
    rows = HistoryStore(app.settings.storage.history_db).recent(5)
    assert [r.status for r in rows] == ["cancelled"]
    assert (rows[0].parameters_json or {}).get("cluster") is None  # it did not train there: not "Trained on"
    assert not (app.settings.storage.output_dir / "latest").exists()
    deadline = time.monotonic() + 30
    while ray_head.train_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_head.train_workers(), "the cluster's training workers outlived the cancel"


def test_a_killed_worker_fails_the_run_with_one_line(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = running_app(ray_settings(make_settings, broker, ray_head))
    try:
        run_id = start_long_run(watcher)
        workers = ray_head.train_workers()
        assert len(workers) == 2
        workers[-1].kill()  # as the OOM killer would
        state = watcher.wait_for(STATE, finished, timeout=120)
        assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"
    finally:
        app.stop()
    assert state["state"] == "failed"
    assert state["message"].startswith("Ray worker ") and f"at {ray_head.address} failed: " in state["message"]
    assert "died" in state["message"] and "\n" not in state["message"] and len(state["message"]) < 300
    row = HistoryStore(app.settings.storage.history_db).by_identifier(run_id)
    assert row is not None and row.status == "failed" and row.error_message == state["message"]
    assert not (app.settings.storage.output_dir / "latest").exists()


def test_wrong_token_and_a_cluster_too_small_fail_in_one_line(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    wrong = ray_settings(make_settings, broker, ray_head, ray={"auth_token": "0" * 32, "connect_timeout_s": 5})
    too_small = ray_settings(make_settings, broker, ray_head, ray={"use_gpu": True})
    expected = [
        no_answer(ray_head.address, 5),
        f"the Ray cluster at {ray_head.address} has 0 GPU, but 2 worker(s) need 2 "
        "(ray.num_workers, ray.use_gpu, ray.resources_per_worker)",
    ]
    for settings, message in zip((wrong, too_small), expected, strict=True):
        app = running_app(settings)
        try:
            run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
            state = watcher.wait_for(STATE, lambda s, r=run_id: s.get("run_id") == r and finished(s), timeout=90)
        finally:
            app.stop()
        assert (state["state"], state["message"]) == ("failed", message)
        row = HistoryStore(settings.storage.history_db).by_identifier(run_id)
        assert row is not None and row.error_message == message


@pytest.mark.slow
def test_losses_are_exact_per_token_over_two_workers(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    # One optimizer step at the very end of the epoch (54 examples make at most 27 token-budget
    # batches per worker, accumulated 27; the top-up repeat counts nowhere) and no dropout: every loss
    # of the epoch is the untouched model's, so the epoch's loss must be the plain per-token loss over
    # the whole training split, computed in fp32 here too.
    params: dict[str, Any] = {"lora_dropout": 0.0, "max_samples": 60}
    training = {"batch_size": 3, "gradient_accumulation_steps": 27, "precision": "fp32"}
    app = running_app(ray_settings(make_settings, broker, ray_head, training=training))
    try:
        run_id = watcher.request(CMD, RESP, {"action": "start", "params": params})["data"]["run_id"]
        state = watcher.wait_for(STATE, finished, timeout=RUN_TIMEOUT_S)
    finally:
        app.stop()
    assert state["state"] == "completed", (state, ray_head.errors())
    row = HistoryStore(app.settings.storage.history_db).by_identifier(run_id)
    assert row is not None and row.final_loss is not None
    examples, _ = load_examples(app.settings.data.source_db, 60)
    train, _ = split_examples(examples, 0.1, 20)
    expected = independent_token_loss(app.settings.training.base_model, [(e.instruction, e.response) for e in train])
    assert row.final_loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_a_killed_worker_is_retried_up_to_max_failures(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = running_app(ray_settings(make_settings, broker, ray_head, ray={"max_failures": 1}))
    try:
        run_id = start_long_run(watcher, epochs=6)
        ray_head.train_workers()[0].kill()
        watcher.wait_for(STATE, lambda s: "starting again (attempt 2)" in s["message"], timeout=120)
        state = watcher.wait_for(STATE, finished, timeout=RUN_TIMEOUT_S)
    finally:
        app.stop()
    assert state["state"] == "completed", (state, ray_head.errors())
    assert os.readlink(app.settings.storage.output_dir / "latest") == run_id


@pytest.mark.slow
def test_resume_ships_the_adapter_to_the_workers(
    ray_head: RayHead, make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = running_app(ray_settings(make_settings, broker, ray_head))
    runs = []
    try:
        for params in ({"lora_r": 8}, {"resume_from": "latest"}):
            run_id = watcher.request(CMD, RESP, {"action": "start", "params": params})["data"]["run_id"]
            state = watcher.wait_for(STATE, lambda s, r=run_id: s.get("run_id") == r and finished(s), RUN_TIMEOUT_S)
            assert state["state"] == "completed", (state, ray_head.errors())
            runs.append(json.loads((app.settings.storage.output_dir / run_id / "training_run.json").read_text()))
    finally:
        app.stop()
    first, resumed = runs
    assert resumed["hyperparameters"]["resume_from"] == "latest" and resumed["hyperparameters"]["lora_r"] == 8
    # The workers started from the trained adapter, not from a fresh one.
    assert resumed["loss_history"][0]["loss"] < first["loss_history"][0]["loss"]

"""Training on a Ray cluster: the engine's own `train_adapter`, run on every worker by Ray Train.

The training process on the Home Assistant box stays the driver. It has read the examples and ships
them with the job (workers never see the database), forwards rank 0's events to its observer, passes
a cancel on, and writes the adapter that comes back into its own staging directory, from where the
run promotes it exactly as a local run's. Ray is imported here only, and only when a run uses it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import homeiq_trainer
from homeiq_trainer.messages import Phase, ProgressEvent
from homeiq_trainer.settings import RaySettings
from homeiq_trainer.training.engine import (
    Hyperparameters,
    NullObserver,
    SumAcrossWorkers,
    TrainingObserver,
    TrainOutcome,
    train_adapter,
)

if TYPE_CHECKING:
    from homeiq_trainer.training.data import Example

_LOGGER = logging.getLogger(__name__)

# How often the driver collects events and every worker looks for a cancel.
POLL_INTERVAL_S = 0.25
# After a cancel, how long the cluster gets to stop at a step boundary before we disconnect from it
# (which ends the job on the cluster too).
CANCEL_GRACE_S = 20.0
# Rank 0 sends progress at most this often; the training process and the daemon throttle again.
EVENT_MIN_INTERVAL_S = 0.2
# A worker that cannot ask the channel for this long assumes the driver is gone and stops.
CHANNEL_TIMEOUT_S = 30.0
# Set in the training process, travel to every worker: offline mode and quiet progress bars.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM")
# Not on PyPI: from the release tag's archive (as the add-on installs it) or a checkout.
INSTALL_HINT = "pip install 'homeiq-trainer[ray] @ <this version's release archive or a checkout>'"
# Ray's words when the head's per-client server died while starting: worth asking again, briefly.
# It says so plainly when the process exits before the head looks at it, and with psutil's error
# when it exits while the head reads its command line (a zombie, or already gone).
CLIENT_SERVER_FAILED = "Starting Ray client server failed"
CLIENT_SERVER_DIED = (CLIENT_SERVER_FAILED, "psutil.ZombieProcess", "psutil.NoSuchProcess")
CONNECT_ATTEMPTS = 3
CONNECT_RETRY_PAUSE_S = 2.0


class ClusterError(Exception):
    """The Ray cluster could not run the job; the message is one line that says why."""


class RunChannel:
    """The one actor between driver and workers: events up, a cancel down, the adapter back."""

    def __init__(self) -> None:
        self._events: list[tuple[str, Any]] = []
        self._stop = False
        self._attempts = 0
        self._result: tuple[dict[str, Any], dict[str, bytes]] | None = None

    def push(self, kind: str, payload: Any) -> None:
        self._events.append((kind, payload))

    def begin(self) -> int:
        """Rank 0 starts (again, after a worker failure): which attempt this is."""
        self._attempts += 1
        return self._attempts

    def drain(self) -> list[tuple[str, Any]]:
        events, self._events = self._events, []
        return events

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def finish(self, outcome: dict[str, Any], files: dict[str, bytes]) -> None:
        self._result = (outcome, files)

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]] | None:
        return self._result


class _ChannelObserver:
    """Rank 0's observer: events go to the channel without waiting for an answer."""

    def __init__(self, channel: Any, label: str, workers: int) -> None:
        self._channel = channel
        self._label = label
        self._workers = workers
        self._last_progress = 0.0

    def phase(self, phase: Phase, message: str = "") -> None:
        self._channel.push.remote("phase", (phase.value, f"{message} ({self._label})"))

    def progress(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.step < event.total_steps and now - self._last_progress < EVENT_MIN_INTERVAL_S:
            return
        self._last_progress = now
        if event.samples_per_s is not None:
            # Rank 0 counts its own batches; the workers go at the pace of the slowest, so this is the run's.
            event = event.model_copy(update={"samples_per_s": round(event.samples_per_s * self._workers, 2)})
        self._channel.push.remote("progress", event.model_dump(mode="json"))


def _sum_over_workers(device: Any) -> SumAcrossWorkers:
    import torch
    import torch.distributed as dist

    def reduce(values: list[float]) -> list[float]:
        # float64: token counts stay exact far beyond what float32 holds.
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    return reduce


def _watch_for_cancel(channel: Any, stop: threading.Event, done: threading.Event) -> None:
    import ray

    while not done.wait(POLL_INTERVAL_S):
        try:
            if ray.get(channel.stop_requested.remote(), timeout=CHANNEL_TIMEOUT_S):
                stop.set()
                return
        except ray.exceptions.RayError:
            _LOGGER.warning("Lost the run's channel; stopping this worker")
            stop.set()
            return


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the engine's `train_adapter` under DDP; rank 0 reports and returns."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    channel = config["channel"]
    stop, done = threading.Event(), threading.Event()
    threading.Thread(target=_watch_for_cancel, args=(channel, stop, done), name="cancel-watch", daemon=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="homeiq-trainer-ray-"))
    try:
        resume_dir = _unpack(config["resume_files"], workdir / "resume") if config["resume_files"] else None
        observer: TrainingObserver = (
            _ChannelObserver(channel, config["label"], workers) if rank == 0 else NullObserver()
        )
        if rank == 0 and (attempt := ray.get(channel.begin.remote())) > 1:
            observer.phase(Phase.LOADING_MODEL, f"a worker died; starting again (attempt {attempt})")
        save_dir = workdir / "adapter"
        outcome = train_adapter(
            config["examples"],
            config["hp"],
            save_dir,
            observer=observer,
            stop=stop,
            resume_adapter=resume_dir,
            sum_across_workers=_sum_over_workers(ray.train.torch.get_device()),
        )
        if rank == 0:
            files = {} if outcome.cancelled else _pack(save_dir)
            ray.get(channel.finish.remote(dataclasses.asdict(outcome), files))
    finally:
        done.set()
        shutil.rmtree(workdir, ignore_errors=True)


def train_on_ray(
    examples: Sequence[Example],
    hp: Hyperparameters,
    save_dir: Path,
    cluster: RaySettings,
    *,
    observer: TrainingObserver | None = None,
    stop: threading.Event | None = None,
    resume_adapter: Path | None = None,
) -> tuple[TrainOutcome, dict[str, Any] | None]:
    """`train_adapter` on the Ray cluster in `cluster`, with the adapter written to `save_dir` here.

    Returns the outcome and what trained it (address, workers, the cluster's CPUs and GPUs). Every
    way the cluster can fail (unreachable, refused, too small, a worker that died) raises
    `ClusterError` with one line.
    """
    watcher: TrainingObserver = observer or NullObserver()
    stopper = stop or threading.Event()
    watcher.phase(Phase.LOADING_MODEL, f"connecting to the Ray cluster at {cluster.address}")
    check_reachable(cluster)
    use_token(cluster)
    ray = _import_ray()
    connect(ray, cluster)
    try:
        if stopper.is_set():  # cancelled while connecting
            return _nothing(cancelled=True), None
        resources = ray.cluster_resources()
        check_fits(cluster, [node["Resources"] for node in ray.nodes() if node.get("Alive")])
        cpus = cluster.resources_per_worker.get("CPU", 1)
        if hp.threads == 0:
            # Ray reserves this many CPUs per worker; more torch threads would fight the neighbours.
            hp = dataclasses.replace(hp, threads=max(1, int(cpus)))
        channel = ray.remote(num_cpus=0)(RunChannel).remote()
        label = f"Ray at {_host(cluster)}: {cluster.num_workers} {'GPU' if cluster.use_gpu else 'CPU'} worker(s)"
        config = {
            "channel": channel,
            "examples": list(examples),
            "hp": hp,
            "label": label,
            "resume_files": _pack(resume_adapter) if resume_adapter is not None else None,
        }
        try:
            trainer = _trainer(cluster, config, _scratch_on_cluster(ray))
        except ValueError as exc:  # Ray Train's own checks of the scaling settings
            raise ClusterError(f"Ray Train refused the job: {_last_line(exc)}") from None
        outcome = _fit(ray, trainer, channel, watcher, stopper, cluster, save_dir)
        return outcome, None if outcome.cancelled else _where(cluster, resources)
    finally:
        ray.shutdown()


def _where(cluster: RaySettings, resources: dict[str, float]) -> dict[str, Any]:
    """What trained a run, for the history and Home Assistant."""
    _LOGGER.info(
        "Trained on the Ray cluster at %s (%s CPUs, %s GPUs): %d workers",
        cluster.address,
        _figure(resources.get("CPU")),
        _figure(resources.get("GPU")),
        cluster.num_workers,
    )
    return {
        "address": cluster.address,
        "workers": cluster.num_workers,
        "use_gpu": cluster.use_gpu,
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def _fit(
    ray: Any,
    trainer: Any,
    channel: Any,
    watcher: TrainingObserver,
    stop: threading.Event,
    cluster: RaySettings,
    save_dir: Path,
) -> TrainOutcome:
    """Run `trainer.fit()` while forwarding events and a cancel; the adapter lands in `save_dir`."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except Exception as exc:  # the thread's outermost frame: the driver reports it
            box["error"] = exc

    thread = threading.Thread(target=fit, name="ray-fit", daemon=True)
    thread.start()
    cancel_sent: float | None = None
    while thread.is_alive():
        thread.join(POLL_INTERVAL_S)
        _forward(ray.get(channel.drain.remote()), watcher)
        if stop.is_set() and cancel_sent is None:
            channel.request_stop.remote()
            cancel_sent = time.monotonic()
        if cancel_sent is not None and time.monotonic() - cancel_sent > CANCEL_GRACE_S:
            _LOGGER.warning("The Ray cluster did not stop within %.0f s; disconnecting from it", CANCEL_GRACE_S)
            return _nothing(cancelled=True)
    _forward(ray.get(channel.drain.remote()), watcher)
    if "error" in box:
        raise ClusterError(describe_failure(box["error"], cluster)) from None
    returned = ray.get(channel.result.remote())
    if returned is None:
        raise ClusterError(f"the Ray workers at {cluster.address} finished without returning an adapter")
    outcome, files = returned
    if files:
        _unpack(files, save_dir)
    return TrainOutcome(**outcome)


def _import_ray() -> Any:
    try:
        import ray
        import ray.train.torch  # noqa: F401  (the extra is ray[train]; fail here, not mid-run)
    except ImportError:
        raise ClusterError(f"training.backend is 'ray' but Ray is not installed here: {INSTALL_HINT}") from None
    return ray


def _host(cluster: RaySettings) -> str:
    return cluster.address.removeprefix("ray://").rpartition(":")[0].strip("[]")


def _port(cluster: RaySettings) -> int:
    return int(cluster.address.rpartition(":")[2])


def check_reachable(cluster: RaySettings) -> None:
    """A plain TCP connect first: a wrong host or port fails at once, in one line, within the timeout."""
    try:
        with socket.create_connection((_host(cluster), _port(cluster)), timeout=cluster.connect_timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ClusterError(
            f"cannot reach the Ray cluster at {cluster.address} within {cluster.connect_timeout_s:g} s: {why}"
        ) from None


def use_token(cluster: RaySettings) -> None:
    """Hand the token to Ray, which reads it from this process's environment when it is imported."""
    if cluster.auth_token is not None:
        # Only this process (the driver) needs it; the workers never see it.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = cluster.auth_token.get_secret_value()


def connect(ray: Any, cluster: RaySettings) -> None:
    """`ray.init` as a Ray Client, given up after `connect_timeout_s` (Ray itself retries for 30 s and more).

    A head that fails to start this client's own server (its per-client process died while starting,
    as it can on a busy or just-restarted head) is asked again, within the same deadline.
    """
    runtime_env = {
        # Our own code travels with the job, so the cluster always runs the daemon's version of the engine;
        # its dependencies (torch, transformers, peft) are installed there once (see the README).
        "py_modules": [str(Path(homeiq_trainer.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
    }
    deadline = time.monotonic() + cluster.connect_timeout_s
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        error = _init_within(ray, cluster, runtime_env, deadline)
        if error is None:
            return
        again = attempt < CONNECT_ATTEMPTS and time.monotonic() + CONNECT_RETRY_PAUSE_S < deadline
        if not (again and any(words in str(error) for words in CLIENT_SERVER_DIED)):
            raise ClusterError(f"cannot connect to the Ray cluster at {cluster.address}: {_last_line(error)}")
        _LOGGER.warning("the Ray head could not start a client server (attempt %d); asking again", attempt)
        time.sleep(CONNECT_RETRY_PAUSE_S)


def _init_within(ray: Any, cluster: RaySettings, runtime_env: dict[str, Any], deadline: float) -> Exception | None:
    """One `ray.init` in a thread of its own, waited for until `deadline`: the error it raised, or None."""
    box: dict[str, Exception] = {}
    done = threading.Event()

    def init() -> None:
        try:
            ray.init(cluster.address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=init, name="ray-connect", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise ClusterError(
            f"the Ray cluster at {cluster.address} did not answer within {cluster.connect_timeout_s:g} s "
            "(a wrong or missing ray.auth_token, not a Ray Client port, or a head too busy to answer)"
        )
    return box.get("error")


def check_fits(cluster: RaySettings, nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse a job the cluster can never place (Ray would wait for it forever).

    `nodes` holds each live node's resources. Every worker must fit on one node: a cluster whose
    totals suffice may still have no node that holds a worker.
    """
    # Ray's own defaults: 1 CPU, or with use_gpu 1 GPU and no CPU.
    per_worker = dict(cluster.resources_per_worker) or ({"GPU": 1.0} if cluster.use_gpu else {"CPU": 1.0})
    if cluster.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    for name, amount in per_worker.items():
        needed, available = amount * cluster.num_workers, sum(node.get(name, 0.0) for node in nodes)
        if needed > available + 1e-9:  # 3 × 0.1 CPU is 0.30000000000000004, and fits in 0.3
            raise ClusterError(
                f"the Ray cluster at {cluster.address} has {_figure(available)} {name}, but "
                f"{cluster.num_workers} worker(s) need {_figure(needed)} (ray.num_workers, ray.use_gpu, "
                "ray.resources_per_worker)"
            )
    # Workers alike: each node holds as many as its scarcest resource allows (1e-9 as above).
    placeable = sum(
        min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items()) for node in nodes
    )
    if placeable < cluster.num_workers:
        wanted = ", ".join(f"{_figure(amount)} {name}" for name, amount in per_worker.items())
        shown = "; ".join(
            ", ".join(f"{_figure(node.get(name, 0.0))} {name}" for name in per_worker) for node in nodes[:4]
        )
        raise ClusterError(
            f"the Ray cluster at {cluster.address} can place {placeable} of {cluster.num_workers} worker(s): "
            f"each needs {wanted} on one node, and its nodes have {shown}"
            f"{'; …' if len(nodes) > 4 else ''} (ray.num_workers, ray.use_gpu, ray.resources_per_worker)"
        )


def _scratch_on_cluster(ray: Any) -> str:
    # Ray Train keeps a little run state on disk; a path from this machine may not exist there.
    return str(ray.get(ray.remote(num_cpus=0)(_cluster_temp_dir).remote()))


def _cluster_temp_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "homeiq-trainer-ray")


def job_name() -> str:
    """Ray Train's name for a job, and its folder on the cluster: unique even when several daemons
    (`instance_id`) start jobs on one cluster in the same second."""
    return f"homeiq-trainer-{int(time.time())}-{uuid.uuid4().hex[:8]}"


def _trainer(cluster: RaySettings, config: dict[str, Any], storage_path: str) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker=dict(cluster.resources_per_worker) or None,
        ),
        run_config=RunConfig(
            name=job_name(),
            storage_path=storage_path,
            failure_config=_failure_config(FailureConfig, cluster),
        ),
    )


def _failure_config(kind: Any, cluster: RaySettings) -> Any:
    """Retry a dead worker `ray.max_failures` times; never retry a worker group that could not start.

    One that cannot start within Ray Train's start timeout (60 s; `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`),
    because the cluster is busy with another job, say, is a controller failure, which Ray Train
    retries without end by default: the run would hang until the daemon's stall timeout.
    """
    fields = {field.name for field in dataclasses.fields(kind)}
    extra = {"controller_failure_limit": 0} if "controller_failure_limit" in fields else {}  # Ray Train v2
    return kind(max_failures=cluster.max_failures, **extra)


def _forward(events: list[tuple[str, Any]], watcher: TrainingObserver) -> None:
    for kind, payload in events:
        if kind == "phase":
            watcher.phase(Phase(payload[0]), payload[1])
        else:
            watcher.progress(ProgressEvent.model_validate(payload))


def describe_failure(exc: BaseException, cluster: RaySettings) -> str:
    """One line for a failed `fit()`: which worker, and the last line of what it raised."""
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    if failures:
        # A worker that died takes its peers down with it (their collectives fail); name the dead one.
        ranked = sorted(failures.items(), key=lambda item: ("died" not in str(item[1]).lower(), item[0]))
        rank, error = ranked[0]
        return f"Ray worker {rank} at {cluster.address} failed: {_last_line(error)}"[:500]
    return f"training on the Ray cluster at {cluster.address} failed: {_last_line(exc)}"[:500]


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # Ray's own explanations run to a paragraph on one line; its first sentence says what happened.
    return lines[-1] if len(lines[-1]) <= 200 else lines[-1].split(". ")[0] + "."


def _pack(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def _unpack(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name.startswith("."):
            raise ClusterError(f"refusing adapter file name {name[:60]!r}")
        with (directory / name).open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return directory


def _nothing(cancelled: bool) -> TrainOutcome:
    return TrainOutcome(
        cancelled=cancelled,
        train_examples=0,
        eval_examples=0,
        final_loss=None,
        eval_loss=None,
        loss_history=[],
        train_runtime_s=0.0,
        train_samples_per_second=0.0,
        padding_efficiency=None,
        device="",
        steps=0,
    )


def _figure(value: float | None) -> str:
    return f"{value or 0:g}"

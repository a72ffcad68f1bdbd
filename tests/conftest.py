"""Shared fixtures: a tiny local T5, HomeIQ-shaped databases, settings, and a real Mosquitto."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tests must never pick up a developer's configuration.
for _key in [k for k in os.environ if k.startswith("HOMEIQ_")]:
    del os.environ[_key]

from homeiq_trainer.demo import build_tiny_model, create_source_db  # noqa: E402
from homeiq_trainer.settings import Settings, load_settings  # noqa: E402
from tests import postgres  # noqa: E402
from tests.mqtt_client import Watcher  # noqa: E402

# Every core this session may use, read before a pytest-xdist worker pins itself to its share.
ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pytest_configure(config: pytest.Config) -> None:
    _own_cores_under_xdist()


def _own_cores_under_xdist() -> None:
    """Under pytest-xdist (scripts/test.sh runs one worker per core), pin each worker to its own cores.

    Every process a test starts inherits the pinning, so a training process sizes torch's thread
    pool to its worker's share (`cpu_threads`) instead of each of two runs taking every core and
    both spinning on the same ones.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    index = int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, ALL_CORES[index::count] or [ALL_CORES[index % len(ALL_CORES)]])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised T5 of ~100k parameters and its tokenizer, saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture
def source_db(tmp_path: Path) -> Path:
    """A HomeIQ-shaped ask_ai_queries database with 200 rows, 10% of them bad."""
    return create_source_db(tmp_path / "homeiq" / "ai_automation.db", rows=200)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, tiny_model: Path, source_db: Path) -> SettingsFactory:
    """Settings pointing at temp paths and the tiny model; sections can be overridden."""

    def factory(**sections: dict[str, Any]) -> Settings:
        overrides: dict[str, dict[str, Any]] = {
            "data": {"source_db": str(source_db)},
            "storage": {"output_dir": str(tmp_path / "out"), "history_db": str(tmp_path / "history.db")},
            "training": {"base_model": str(tiny_model), "epochs": 1, "batch_size": 8, "learning_rate": 0.01},
            "daemon": {"announce_delay_max_s": 0.0},
            # A random tiny model never says EOS: keep its generations short.
            "evaluation": {"max_new_tokens": 16},
            # Tests start long runs over MQTT to cancel or kill them; the ceilings have their own tests.
            "limits": {"max_epochs": 100},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return load_settings(None, overrides)

    return factory


def on_test_broker(make_settings: SettingsFactory, port: int, **sections: dict[str, Any]) -> Settings:
    """`make_settings` for a daemon on the test broker at `port` (its `mqtt` section merged in)."""
    mqtt = {"host": "127.0.0.1", "port": port, "client_id": "homeiq-trainer-test"}
    mqtt.update(sections.pop("mqtt", {}))
    return make_settings(mqtt=mqtt, **sections)


def wait_idle(app: Any, timeout_s: float = 10) -> None:
    """Until `app`'s runner takes runs again (a run's end is published, then the runner lets go of it)."""
    deadline = time.monotonic() + timeout_s
    while app.runner.active is not None:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.02)


def train_and_serve(settings: Settings) -> Path:
    """One run trained at `settings` and served, as the daemon does it; returns `<output_dir>/latest`."""
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.jobs import JobRequest, open_run, recover
    from homeiq_trainer.messages import RunStatus, TrainParams
    from homeiq_trainer.promotion import conclude
    from homeiq_trainer.training.run import execute_run

    store = HistoryStore(settings.storage.history_db)
    recover(store, settings)
    row = open_run(store, settings, JobRequest(params=TrainParams(), triggered_by="test"))
    result = execute_run(settings, TrainParams(), row.run_identifier)
    assert result.status is RunStatus.COMPLETED, result.error
    assert conclude(store, settings, row, result).promoted
    store.close()
    return settings.storage.output_dir / "latest"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A private Mosquitto on a free port: no persistence, so no retained state leaks between tests."""

    def __init__(self, directory: Path, port: int | None = None, extra_config: str = "") -> None:
        self.directory = directory
        self._own_port = port is None  # chosen here, and free to change until the broker first runs
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = directory / "mosquitto.conf"

    def start(self, attempts: int = 3) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.extra_config:
            listener = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        else:
            listener = self.extra_config
        self.config.write_text(f"user root\npersistence false\n{listener}")
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # its port was taken, say by another test worker's broker
                if self._own_port and not self.extra_config and attempts > 1:
                    self.port = free_port()
                    self.start(attempts - 1)
                    return
                raise RuntimeError(f"mosquitto exited with code {self.proc.returncode} on port {self.port}")
            if self._listening():
                self._own_port = False  # clients know it now: a restart keeps it
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def _listening(self) -> bool:
        """Whether this mosquitto itself listens on the port (a connect could reach another process)."""
        assert self.proc is not None
        try:
            sockets = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == self.port for s in sockets)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def _mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running private broker."""
    if not _mosquitto_available():
        pytest.fail("mosquitto is not installed; run the README's test command, which installs it")
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def watcher(broker: Broker) -> Iterator[Watcher]:
    """A real MQTT client on the test broker that records everything."""
    w = Watcher(broker.port)
    yield w
    w.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throwaway database on the tests' PostgreSQL, dropped at the end of the session."""
    try:
        postgres.connect().close()
    except Exception as exc:  # any reason it cannot be reached fails, never skips
        pytest.fail(f"PostgreSQL does not answer at {postgres.admin_url()} ({exc}); scripts/test.sh starts one")
    with postgres.throwaway_database() as name:
        yield name


# --- figures for the README's Reliability section ---------------------------------------------------

FIGURES: dict[str, Any] = {}
_FIGURE = "reliability figure"
_UNREPORTED: list[tuple[str, Any, bool]] = []


def record(name: str, value: Any) -> None:
    """Keep a figure from this run; printed at the end of the session."""
    _UNREPORTED.append((name, value, False))


def tally(name: str, count: int) -> None:
    """Add to a count that several tests share; the sum is printed at the end of the session."""
    _UNREPORTED.append((name, count, True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Figures travel in the test's report: under pytest-xdist the summary is printed by the
    # controller, which never sees a worker's module globals (and collects nothing, so these hooks
    # live in this top-level conftest, the only one it loads).
    report = yield
    if report.when == "teardown":
        report.user_properties.extend((_FIGURE, figure) for figure in _UNREPORTED)
        _UNREPORTED.clear()
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, figure in report.user_properties:
        if key == _FIGURE:
            name, value, add = figure
            FIGURES[name] = FIGURES.get(name, 0) + value if add else value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")

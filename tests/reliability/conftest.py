"""Fixtures for the reliability and security tests: daemons as subprocesses, brokers with TLS, logins
and ACLs, a certificate authority made with openssl, and small tmpfs mounts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.settings import Settings
from tests.conftest import Broker, SettingsFactory, free_port, on_test_broker
from tests.mqtt_client import Watcher

BASE = "homeiq/trainer"
CMD, RESP, STATE, PROGRESS = f"{BASE}/command", f"{BASE}/response", f"{BASE}/state", f"{BASE}/progress"
AVAILABILITY, LAST_RUN, RUNS, MODEL = f"{BASE}/availability", f"{BASE}/last_run", f"{BASE}/runs", f"{BASE}/model"
DISCOVERY = "homeassistant/device/homeiq_trainer/config"
DONE = ("completed", "failed", "cancelled")


def is_done(state: Any) -> bool:
    return isinstance(state, dict) and state.get("state") in DONE


def daemon_settings(make_settings: SettingsFactory, port: int, **sections: dict[str, Any]) -> Settings:
    """Settings for a daemon on the test broker; runs are kept short (64 samples, one epoch)."""
    data = {"max_samples": 64}
    data.update(sections.pop("data", {}))
    # These tests are about surviving faults: a run trains exactly what it is asked (no early stop)
    # and every completed run is served; the quality gate and early stopping have their own tests.
    training = {"early_stopping_patience": 0}
    training.update(sections.pop("training", {}))
    promotion = {"policy": "always"}
    promotion.update(sections.pop("promotion", {}))
    return on_test_broker(make_settings, port, data=data, training=training, promotion=promotion, **sections)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as HOMEIQ_* environment variables, for a daemon subprocess."""
    env: dict[str, str] = {}
    dump = settings.model_dump(mode="json")
    for section, values in dump.items():
        if not isinstance(values, dict):
            env[f"HOMEIQ_{section.upper()}"] = str(values)
            continue
        for key, value in values.items():
            if value is None:
                continue
            name = f"HOMEIQ_{section.upper()}__{key.upper()}"
            if section == "mqtt" and key == "password":
                value = settings.mqtt.password.get_secret_value()  # type: ignore[union-attr]
            env[name] = json.dumps(value) if isinstance(value, list | bool) else str(value)
    return env


class Daemon:
    """`homeiq-trainer serve` as a subprocess, its output in a file (a pipe nobody reads would fill up)."""

    def __init__(self, env: dict[str, str], log_path: Path, pause: tuple[str, float] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        base = {k: v for k, v in os.environ.items() if not k.startswith("HOMEIQ_")}
        # A pause holds runs at one phase (tests/reliability/paused_daemon.py), injected via the launcher.
        command = ["-m", "homeiq_trainer", "serve"]
        if pause is not None:
            command = ["-m", "tests.reliability.paused_daemon", pause[0], str(pause[1])]
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            env={**base, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a power cut for this process."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class Client(Watcher):
    """A Watcher that counts (it can log in and speak TLS like any Watcher)."""

    def count(self, topic: str) -> int:
        return len(self.messages(topic))


@pytest.fixture
def app(make_settings: SettingsFactory, broker: Broker) -> Iterator[TrainerApp]:
    a = TrainerApp(daemon_settings(make_settings, broker.port))
    a.start()
    assert a.link.wait_connected(10)
    yield a
    a.stop()


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


# --- openssl ----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        cwd=directory,
    )
    return cert, key


def issue_cert(directory: Path, ca: tuple[Path, Path], name: str, san: str | None = None) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        cwd=directory,
    )
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        str(cert),
        "-extfile",
        str(ext),
        cwd=directory,
    )
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA with a server and a client certificate, and a second CA nobody trusts."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "test-ca")
    rogue = make_ca(directory, "rogue-ca")
    return {
        "ca": ca,
        "server": issue_cert(directory, ca, "server", "IP:127.0.0.1,DNS:localhost"),
        "client": issue_cert(directory, ca, "homeiq-trainer"),
        "rogue_server": issue_cert(directory, rogue, "rogue", "IP:127.0.0.1,DNS:localhost"),
    }


# --- mounts -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (tests run as root; skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]

"""No secret (the MQTT password, the Supervisor token) in any log line, MQTT message, response,
training_run.json, history row or other file the daemon wrote: everything it produced is grepped.

The daemon runs as the add-on does: it asks a (fake) Supervisor for the broker and its login, so both
secrets really pass through it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
from pathlib import Path

import psutil
import pytest

from homeiq_trainer.settings import Settings

from ..conftest import Broker, SettingsFactory, free_port, record
from ..supervisor import FakeSupervisor
from .conftest import AVAILABILITY, CMD, RESP, STATE, Client, Daemon, is_done, settings_env

PASSWORD = "pw-" + secrets.token_hex(12)
TOKEN = "tok-" + secrets.token_hex(16)


def _service(port: int):  # type: ignore[no-untyped-def]
    def respond(handler):  # type: ignore[no-untyped-def]
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, b'{"result": "error", "message": "Unauthorized"}'
        data = {"host": "127.0.0.1", "port": port, "ssl": False, "username": "addons", "password": PASSWORD}
        return 200, json.dumps({"result": "ok", "data": data}).encode()

    return respond


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_no_secret_anywhere(make_settings: SettingsFactory, tmp_path: Path) -> None:
    directory = tmp_path / "auth"
    directory.mkdir()
    passwords = directory / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "addons", PASSWORD], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "homeassistant", "ha-pw"], check=True)
    port = free_port()
    broker_log = tmp_path / "mosquitto.log"
    broker = Broker(
        directory,
        port,
        extra_config=(
            f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
            f"log_dest file {broker_log}\nlog_type all\n"
        ),
    )
    broker.start()
    settings: Settings = make_settings(data={"max_samples": 64})
    addon_dir = tmp_path / "addon-data"
    addon_dir.mkdir()
    options = addon_dir / "options.json"
    options.write_text(
        json.dumps(
            {
                "source_db": str(settings.data.source_db),
                "output_dir": str(settings.storage.output_dir),
                "history_db": str(settings.storage.history_db),
                "base_model": settings.training.base_model,
                "log_level": "DEBUG",
            }
        )
    )
    env = {k: v for k, v in settings_env(settings).items() if not k.startswith("HOMEIQ_MQTT__")}
    env.pop("HOMEIQ_LOG_LEVEL", None)
    for key in (
        "HOMEIQ_DATA__SOURCE_DB",
        "HOMEIQ_STORAGE__OUTPUT_DIR",
        "HOMEIQ_STORAGE__HISTORY_DB",
        "HOMEIQ_TRAINING__BASE_MODEL",
    ):
        env.pop(key, None)
    ha = Client(port, username="homeassistant", password="ha-pw")
    child_envs: list[dict[str, str]] = []
    try:
        with FakeSupervisor(_service(port)) as supervisor:
            env |= {
                "HOMEIQ_ADDON_OPTIONS": str(options),
                "HOMEIQ_SUPERVISOR_URL": supervisor.url,
                "SUPERVISOR_TOKEN": TOKEN,
                "HF_HOME": str(addon_dir / "hf"),
            }
            daemon = Daemon(env, tmp_path / "daemon.log")
            try:
                ha.wait_for(AVAILABILITY, lambda v: v == "online", timeout=30)
                done = ha.request(CMD, RESP, {"action": "start"}, timeout=20)
                run_id = done["data"]["run_id"]
                ha.wait_for(STATE, lambda s: s.get("phase") in ("training", "saving") or is_done(s), timeout=60)
                for child in psutil.Process(daemon.pid).children(recursive=True):
                    child_envs.append(child.environ())
                assert (
                    ha.wait_for(STATE, lambda s: s.get("run_id") == run_id and is_done(s), timeout=120)["state"]
                    == "completed"
                )
                cancelled = ha.request(CMD, RESP, {"action": "start", "params": {"epochs": 100}})["data"]["run_id"]
                ha.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
                ha.request(CMD, RESP, {"action": "cancel"})
                ha.wait_for(STATE, lambda s: s.get("run_id") == cancelled and is_done(s), timeout=60)
                for body in (
                    {"action": "status"},
                    {"action": "runs"},
                    {"action": "start", "params": {"x": PASSWORD}},
                    {"action": "start", "params": {"base_model": TOKEN}},
                ):
                    ha.request(CMD, RESP, body)
            finally:
                assert daemon.stop() == 0
        assert supervisor.requests, "the daemon never asked the Supervisor: the test proves nothing"
    finally:
        ha.close()
        broker.stop()

    assert child_envs, "no training process was seen"
    haystacks: dict[str, bytes] = {
        "daemon log": (tmp_path / "daemon.log").read_bytes(),
        "mosquitto log": broker_log.read_bytes(),
        "child environment": json.dumps(child_envs).encode(),
    }
    # What the daemon published, minus what the test itself sent on the command topic.
    haystacks["mqtt"] = b"\n".join(t.encode() + b" " + p for _, t, p in ha.log if t != CMD)
    for path in _files(settings.storage.output_dir) + _files(addon_dir):
        if path != options:
            haystacks[str(path)] = path.read_bytes()
    history = sqlite3.connect(settings.storage.history_db)
    rows = history.execute("SELECT * FROM training_runs").fetchall()
    history.close()
    assert len(rows) == 2
    haystacks["history rows"] = repr(rows).encode()
    haystacks["history file"] = settings.storage.history_db.read_bytes()
    assert len(haystacks["daemon log"]) > 1000 and b"DEBUG" in haystacks["daemon log"]
    assert any(name.endswith("training_run.json") for name in haystacks)
    found = {name: [s for s in (PASSWORD, TOKEN) if s.encode() in data] for name, data in haystacks.items()}
    found = {name: hits for name, hits in found.items() if hits}
    assert found == {}
    record("secrets found", f"0 in {len(haystacks)} places ({sum(len(v) for v in haystacks.values())} bytes)")

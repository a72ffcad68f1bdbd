"""The daemon against a real Mosquitto and the tiny model: discovery, commands, runs, faults."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.messages import Phase, PhaseEvent
from homeiq_trainer.overrides import OverridesStore
from homeiq_trainer.settings import Settings

from .conftest import Broker, SettingsFactory, on_test_broker, wait_idle
from .fakes import FakeLauncher
from .mqtt_client import Watcher

BASE = "homeiq/trainer"
CMD, RESP, STATE, PROGRESS = f"{BASE}/command", f"{BASE}/response", f"{BASE}/state", f"{BASE}/progress"
DISCOVERY = "homeassistant/device/homeiq_trainer/config"


def daemon_settings(make_settings: SettingsFactory, broker: Broker, **sections: dict) -> Settings:
    return on_test_broker(make_settings, broker.port, **sections)


@pytest.fixture
def app(make_settings: SettingsFactory, broker: Broker) -> Iterator[TrainerApp]:
    a = TrainerApp(daemon_settings(make_settings, broker))
    a.start()
    assert a.link.wait_connected(10)
    yield a
    a.stop()


def is_done(state: dict) -> bool:
    return state["state"] in ("completed", "failed", "cancelled")


def test_discovery_and_online(app: TrainerApp, broker: Broker) -> None:
    watcher = Watcher(broker.port)
    watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
    watcher.close()
    # A client that arrives after `online` gets everything as retained messages.
    watcher = Watcher(broker.port)
    payload = watcher.wait_for(DISCOVERY, timeout=10)
    assert payload["device"]["identifiers"] == ["homeiq_trainer"]
    assert payload["origin"]["name"] == "homeiq-trainer"
    components = payload["components"]
    assert components["start"]["payload_press"] == "start" and components["start"]["command_topic"] == CMD
    assert components["status"]["device_class"] == "enum"
    assert components["training"]["device_class"] == "running"
    for component in components.values():
        if component["platform"] == "device_automation":
            continue
        assert component["default_entity_id"].endswith(component["object_id"])
    assert watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10) == "online"
    assert watcher.retained[DISCOVERY] and watcher.retained[STATE]
    assert watcher.json(STATE)["state"] == "idle"
    watcher.close()


def test_start_button_runs_to_completed(app: TrainerApp, watcher: Watcher) -> None:
    watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
    watcher.publish(CMD, "start")
    response = watcher.wait_for(RESP, timeout=10)
    assert response["status"] == "ok" and response["action"] == "start"
    run_id = response["data"]["run_id"]
    state = watcher.wait_for(STATE, is_done, timeout=120)
    assert state == {**state, "state": "completed", "run_id": run_id}
    assert datetime.fromisoformat(state["updated_at"]).tzinfo is not None  # HA timestamp sensors need a zone
    assert datetime.fromisoformat(watcher.json(f"{BASE}/last_run")["finished_at"]).tzinfo is not None
    progress = watcher.wait_for(PROGRESS, lambda p: p["percent"] == 100.0, timeout=10)
    assert progress["run_id"] == run_id and progress["step"] == progress["total_steps"] > 0
    # The scoring after training counts its own steps in the state's message; `progress` never left
    # training's count (before: it fell from 100% to a few and climbed again, in scoring steps).
    ours = [p for p in map(json.loads, watcher.messages(PROGRESS)) if p["run_id"] == run_id and p["total_steps"]]
    assert {p["total_steps"] for p in ours} == {progress["total_steps"]}
    assert [p["percent"] for p in ours] == sorted(p["percent"] for p in ours)
    messages = [json.loads(p)["message"] for p in watcher.messages(STATE)]
    assert any(m.endswith(" scoring steps") for m in messages), messages
    last_run = watcher.wait_for(f"{BASE}/last_run", lambda r: r.get("run_id") == run_id, timeout=10)
    assert last_run["status"] == "completed" and last_run["final_loss"] > 0 and last_run["dataset_size"] == 175
    assert last_run["triggered_by"] == "button"
    model = watcher.wait_for(f"{BASE}/model", lambda m: m.get("run_id") == run_id, timeout=10)
    assert Path(model["path"]).is_dir()
    runs = watcher.json(f"{BASE}/runs")["runs"]
    assert runs[0]["run_id"] == run_id and len(watcher.latest[f"{BASE}/runs"]) < 16_000
    states = [json.loads(p)["state"] for p in watcher.messages(STATE)]
    assert states.index("queued") < states.index("running") < states.index("completed")
    row = HistoryStore(app.settings.storage.history_db).by_identifier(run_id)
    assert row is not None and row.status == "completed"


def test_busy_duplicate_and_cancel(app: TrainerApp, watcher: Watcher) -> None:
    first = watcher.request(CMD, RESP, {"action": "start", "request_id": "r-1", "params": {"epochs": 50}})
    assert first["status"] == "ok"
    run_id = first["data"]["run_id"]
    busy = watcher.request(CMD, RESP, {"action": "start"})
    assert busy["status"] == "error" and busy["error"]["code"] == "busy" and busy["data"]["run_id"] == run_id
    again = watcher.request(CMD, RESP, {"action": "start", "request_id": "r-1", "params": {"epochs": 50}})
    assert again == first  # the same answer, not a second run
    watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
    cancel = watcher.request(CMD, RESP, {"action": "cancel"})
    assert cancel["status"] == "ok" and cancel["data"]["run_id"] == run_id
    state = watcher.wait_for(STATE, is_done, timeout=60)
    assert state["state"] == "cancelled"
    nothing = watcher.request(CMD, RESP, {"action": "cancel"})
    assert nothing["error"]["code"] == "not_running"
    rows = HistoryStore(app.settings.storage.history_db).recent(10)
    assert [r.status for r in rows] == ["cancelled"]
    assert not (app.settings.storage.output_dir / "latest").exists()


def test_retained_command_is_ignored(make_settings: SettingsFactory, broker: Broker, watcher: Watcher) -> None:
    watcher.publish(CMD, "start", retain=True)  # acknowledged: the broker holds it
    a = TrainerApp(daemon_settings(make_settings, broker))
    a.start()
    try:
        watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
        # Commands are answered in order: once a later one is answered, the retained one was skipped.
        marker = watcher.request(CMD, RESP, {"action": "status", "request_id": "marker"})
        assert [json.loads(p)["request_id"] for p in watcher.messages(RESP)] == [marker["request_id"]]
        assert a.runner.active is None
        assert watcher.json(STATE)["state"] == "idle"
    finally:
        watcher.publish(CMD, b"", retain=True)
        a.stop()


def test_status_runs_and_bad_params(app: TrainerApp, watcher: Watcher) -> None:
    status = watcher.request(CMD, RESP, {"action": "status"})
    assert status["status"] == "ok" and status["data"]["state"]["state"] == "idle"
    runs = watcher.request(CMD, RESP, {"action": "runs"})
    assert runs["data"]["runs"] == []
    for body, code in [
        ({"action": "start", "params": {"base_model": "evil/model"}}, "base_model_not_allowed"),
        ({"action": "start", "params": {"resume_from": "latest"}}, "unknown_run"),
        ({"action": "start", "params": {"epochs": 0}}, "invalid_command"),
        ({"action": "start", "params": {"resume_from": "../../etc/passwd"}}, "invalid_command"),
        ({"action": "explode"}, "invalid_command"),
        ({"action": "start", "extra": 1}, "invalid_command"),
        ({"action": "cancel", "params": {"epochs": 1}}, "invalid_command"),
        ({"action": "start", "params": {"min_new_samples": 100_000}}, "not_enough_new_data"),
    ]:
        response = watcher.request(CMD, RESP, body)
        assert response["status"] == "error" and response["error"]["code"] == code, (body, response)
    assert app.runner.active is None
    assert HistoryStore(app.settings.storage.history_db).recent(5) == []


def test_min_new_samples_counts_since_last_completed(app: TrainerApp, watcher: Watcher) -> None:
    ok = watcher.request(CMD, RESP, {"action": "start", "params": {"min_new_samples": 10}})
    assert ok["status"] == "ok"
    watcher.wait_for(STATE, is_done, timeout=120)
    refused = watcher.request(CMD, RESP, {"action": "start", "params": {"min_new_samples": 1}})
    assert refused["error"]["code"] == "not_enough_new_data" and refused["data"]["new_samples"] == 0


def test_malformed_payloads_are_answered_and_harmless(app: TrainerApp, watcher: Watcher) -> None:
    payloads: list[bytes] = [
        b"",
        b"   ",
        b"stop",
        b"\xff\xfe\x00",
        b"{",
        b"[]",
        b"null",
        b'{"action": 5}',
        b'{"action": "start", "params": []}',
        b'{"action": "start", "params": {"epochs": "many"}}',
        b'{"action": "start", "request_id": ""}',
        b"x" * 20_000,
        b'{"a":' * 5000,
        b'{"action": "start", "params": {"learning_rate": 1e309}}',
    ]
    payloads += [json.dumps({"action": "start", "params": {"batch_size": n}}).encode() for n in (-1, 0, 10**9)]
    payloads += [json.dumps({"action": "start", "triggered_by": "x" * n}).encode() for n in (0, 65, 1000)]
    payloads += [bytes([i]) * (i + 1) for i in range(0, 256, 3)]
    payloads *= 3
    for payload in payloads:
        watcher.publish(CMD, payload)
    deadline = time.monotonic() + 30
    while len(watcher.messages(RESP)) < len(payloads) and time.monotonic() < deadline:
        time.sleep(0.05)
    responses = [json.loads(p) for p in watcher.messages(RESP)]
    assert len(responses) == len(payloads)
    assert all(r["status"] == "error" and r["error"]["code"] and r["error"]["message"] for r in responses)
    assert app.runner.active is None
    assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"  # still serving


def test_birth_message_triggers_reannounce(app: TrainerApp, watcher: Watcher) -> None:
    watcher.wait_for(DISCOVERY, timeout=10)
    before = len(watcher.messages(DISCOVERY))
    watcher.publish("homeassistant/status", "online")
    deadline = time.monotonic() + 10
    while len(watcher.messages(DISCOVERY)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(watcher.messages(DISCOVERY)) > before
    assert watcher.latest[f"{BASE}/availability"] == b"online"


def test_broker_restart_during_run(app: TrainerApp, watcher: Watcher, broker: Broker) -> None:
    ok = watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": 8}})
    run_id = ok["data"]["run_id"]
    watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
    watcher.close()
    broker.restart(down_s=1.0)  # no persistence: every retained message is gone
    fresh = Watcher(broker.port)
    try:
        state = fresh.wait_for(STATE, lambda s: s["run_id"] == run_id and is_done(s), timeout=300)
        assert state["state"] == "completed"
        assert fresh.wait_for(f"{BASE}/availability", timeout=10) == "online"
        assert fresh.wait_for(DISCOVERY, timeout=10)["components"]
        assert fresh.wait_for(f"{BASE}/model", lambda m: m.get("run_id") == run_id, timeout=10)
        assert fresh.request(CMD, RESP, {"action": "status"})["status"] == "ok"
    finally:
        fresh.close()


def test_a_run_that_ends_while_the_broker_is_away_still_fires_its_triggers(
    make_settings: SettingsFactory, broker: Broker
) -> None:
    """A run ending during a Mosquitto restart (an add-on update at night) fired no `run_completed` or
    `adapter_promoted`, so an automation restarting HomeIQ on the new adapter never ran."""
    gate = threading.Event()
    launcher = FakeLauncher([PhaseEvent(phase=Phase.TRAINING), gate, "result"])
    app = TrainerApp(daemon_settings(make_settings, broker), launcher=launcher)
    app.start()
    try:
        assert app.link.wait_connected(10)
        assert json.loads(app.handle_command(b'{"action": "start"}'))["status"] == "ok"
        while not launcher.started:
            time.sleep(0.01)
        broker.stop()
        while app.link.connected:
            time.sleep(0.01)
        gate.set()  # the run ends with no broker
        wait_idle(app)
        broker.start()  # no persistence: nothing retained survives
        fresh = Watcher(broker.port)
        try:
            state = fresh.wait_for(STATE, is_done, timeout=60)
            assert state["state"] == "completed"
            fresh.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=30)
            assert fresh.retained.get(f"{BASE}/availability") is False  # subscribed before the daemon was back
            events = [json.loads(raw) for raw in fresh.messages(f"{BASE}/event")]
            # `run_started` too where the broker went before it was acknowledged (QoS 1: at least once).
            assert [e["event"] for e in events][-1:] == ["run_completed"]  # before: none
            assert {e["run_id"] for e in events} == {state["run_id"]}
        finally:
            fresh.close()
    finally:
        app.stop()


def test_training_child_killed_fails_run_daemon_lives(app: TrainerApp, watcher: Watcher) -> None:
    watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": 50}})
    watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
    child = app.runner.active.process.proc  # type: ignore[union-attr]
    os.kill(child.pid, signal.SIGKILL)
    state = watcher.wait_for(STATE, is_done, timeout=30)
    assert state["state"] == "failed" and "SIGKILL" in state["message"]
    last = watcher.wait_for(f"{BASE}/last_run", lambda r: r.get("status") == "failed", timeout=10)
    assert "killed by SIGKILL" in last["error"]
    again = watcher.request(CMD, RESP, {"action": "start"})
    assert again["status"] == "ok"
    new_run = again["data"]["run_id"]
    final = watcher.wait_for(STATE, lambda s: s["run_id"] == new_run and is_done(s), timeout=120)
    assert final["state"] == "completed"


def serve_process(settings_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env}
    return subprocess.Popen(
        [sys.executable, "-m", "homeiq_trainer", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "HOMEIQ_MQTT__HOST": "127.0.0.1",
        "HOMEIQ_MQTT__PORT": str(settings.mqtt.port),
        "HOMEIQ_DATA__SOURCE_DB": str(settings.data.source_db),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(settings.storage.output_dir),
        "HOMEIQ_STORAGE__HISTORY_DB": str(settings.storage.history_db),
        "HOMEIQ_TRAINING__BASE_MODEL": settings.training.base_model,
        "HOMEIQ_TRAINING__EPOCHS": "100",
        "HOMEIQ_TRAINING__LEARNING_RATE": "0.01",
        "HOMEIQ_DAEMON__ANNOUNCE_DELAY_MAX_S": "0",
        "HOMEIQ_EVALUATION__MAX_NEW_TOKENS": "16",
        "HOMEIQ_LIMITS__MAX_EPOCHS": "100",
    }


def test_sigterm_cancels_publishes_offline_and_exits_zero(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    settings = daemon_settings(make_settings, broker)
    proc = serve_process(env_for(settings))
    try:
        watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=20)
        watcher.publish(CMD, "start")
        watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert watcher.wait_for(STATE, is_done, timeout=5)["state"] == "cancelled"
    assert watcher.wait_for(f"{BASE}/availability", lambda v: v == "offline", timeout=5) == "offline"
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    ended = HistoryStore(settings.storage.history_db).recent(5)
    assert [(r.status, r.error_message) for r in ended] == [("cancelled", "cancelled because the daemon stopped")]


def test_daemon_sigkilled_mid_run_then_restarted(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    settings = daemon_settings(make_settings, broker)
    proc = serve_process(env_for(settings))
    watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=20)
    watcher.publish(CMD, "start")
    watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the training process
    proc.kill()
    proc.wait(timeout=10)
    # The will says offline, and no training process outlives the daemon.
    assert watcher.wait_for(f"{BASE}/availability", lambda v: v == "offline", timeout=60) == "offline"
    psutil.wait_procs(children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)

    env = env_for(settings) | {"HOMEIQ_TRAINING__EPOCHS": "1"}
    proc = serve_process(env)
    try:
        state = watcher.wait_for(STATE, lambda s: s["state"] == "failed", timeout=20)
        assert "interrupted" in state["message"]
        rows = HistoryStore(settings.storage.history_db).recent(5)
        assert rows[0].status == "failed" and "interrupted" in rows[0].error_message
        assert not list(settings.storage.output_dir.glob(".staging-*"))
        watcher.publish(CMD, "start")
        assert watcher.wait_for(STATE, lambda s: s["state"] == "completed", timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)


def test_discovery_remove_clears_every_retained_topic(make_settings: SettingsFactory, broker: Broker) -> None:
    settings = daemon_settings(make_settings, broker)
    daemon = TrainerApp(settings)
    daemon.start()
    first = Watcher(broker.port)
    first.wait_for(DISCOVERY, timeout=10)
    first.close()
    daemon.stop()  # leaves `offline`, discovery and every state retained
    env = {**os.environ, "HOMEIQ_MQTT__HOST": "127.0.0.1", "HOMEIQ_MQTT__PORT": str(broker.port)}
    live = Watcher(broker.port)  # as Home Assistant, subscribed while the topics are cleared
    live.wait_for(DISCOVERY, timeout=10)
    done = subprocess.run(
        [sys.executable, "-m", "homeiq_trainer", "discovery", "--remove"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    live.close()
    cleared = {topic: at for at, topic, payload in live.log if payload == b""}
    # The device is removed before its states empty (before: all in one burst, so Home Assistant's
    # entities, still subscribed, rendered empty states).
    assert len(cleared) == 11 and min(cleared.values()) == cleared[DISCOVERY]
    assert min(at for topic, at in cleared.items() if topic != DISCOVERY) - cleared[DISCOVERY] >= 1.0
    late = Watcher(broker.port)
    try:
        # Retained messages arrive right after subscribing, before anything published later.
        late.publish("test/marker", "after")
        late.wait_for("test/marker", timeout=10)
        left = {topic for topic, payload in late.latest.items() if payload and topic != "test/marker"}
        assert left == set(), left
    finally:
        late.close()


def test_rate_limit_answers_rate_limited(make_settings: SettingsFactory, broker: Broker, watcher: Watcher) -> None:
    a = TrainerApp(daemon_settings(make_settings, broker, daemon={"command_burst": 3, "commands_per_s": 0.01}))
    a.start()
    try:
        assert a.link.wait_connected(10)
        for i in range(6):
            watcher.publish(CMD, json.dumps({"action": "status", "request_id": f"s-{i}"}))
        deadline = time.monotonic() + 10
        while len(watcher.messages(RESP)) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        answers = {r["request_id"]: r for r in map(json.loads, watcher.messages(RESP))}
        assert [answers[f"s-{i}"]["status"] for i in range(3)] == ["ok"] * 3
        assert [answers[f"s-{i}"]["error"]["code"] for i in range(3, 6)] == ["rate_limited"] * 3
    finally:
        a.stop()


def test_full_queue_answers_overloaded_and_routes_run_on_the_command_thread(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    a = TrainerApp(daemon_settings(make_settings, broker, daemon={"command_queue_size": 1}))
    release = threading.Event()
    seen: list[tuple[str, bytes, str]] = []

    def slow_setting(topic: str, payload: bytes) -> None:
        seen.append((topic, payload, threading.current_thread().name))
        release.wait(20)

    a.route(f"{BASE}/settings/+/set", slow_setting)
    a.start()
    try:
        assert a.link.wait_connected(10)
        watcher.publish(f"{BASE}/settings/epochs/set", "5")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [(f"{BASE}/settings/epochs/set", b"5", "commands")]
        watcher.publish(CMD, json.dumps({"action": "status", "request_id": "waits"}))  # fills the queue
        watcher.publish(CMD, json.dumps({"action": "status", "request_id": "refused"}))
        refused = watcher.wait_for(RESP, lambda r: r["request_id"] == "refused", timeout=10)
        assert refused["error"]["code"] == "overloaded"
        release.set()
        waited = watcher.wait_for(RESP, lambda r: r["request_id"] == "waits", timeout=10)
        assert waited["status"] == "ok"
    finally:
        release.set()
        a.stop()


def test_broken_rows_in_its_own_history_do_not_stop_the_daemon(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    """A row edited by hand, damaged, or written by a newer version: the daemon starts and serves."""
    settings = daemon_settings(make_settings, broker)
    store = HistoryStore(settings.storage.history_db)
    OverridesStore(store.engine)  # creates its table
    store.close()
    with sqlite3.connect(settings.storage.history_db) as conn:
        conn.execute(
            "INSERT INTO training_runs (training_type, status, started_at, finished_at, run_identifier, triggered_by,"
            " decision, parameters_json, evaluation_json, iteration_history_json) VALUES ('soft_prompt', 'weird', "
            "'2026-01-01 00:00:00', '2026-01-01 00:10:00', 'run_20260101_000000', 'admin', 'maybe', '{bad', '[1]', "
            "'5')"
        )
        conn.execute(
            "INSERT INTO trainer_setting_overrides (key, value, updated_at) VALUES ('training.epochs', '{bad', "
            "'2026-01-01 00:00:00')"
        )
    app = TrainerApp(settings)
    app.start()
    try:
        assert app.link.wait_connected(10)
        state = watcher.wait_for(STATE)
        assert state["state"] == "idle" and "'weird', a status this version does not know" in state["message"]
        run = watcher.wait_for(f"{BASE}/runs")["runs"][0]
        assert run["run_id"] == "run_20260101_000000" and run["status"] is None and run["decision"] is None
        assert watcher.wait_for(f"{BASE}/last_run")["evaluation"] is None
        assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"
        assert watcher.wait_for(f"{BASE}/settings")["epochs"] == 1  # the configured value: the stored one is not JSON
    finally:
        app.stop()


def test_last_run_stays_within_what_home_assistant_records_as_attributes(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    """`last_run` is the Last run sensor's attributes; Home Assistant's recorder keeps none past 16 KiB."""
    from homeiq_trainer.messages import RunStatus
    from homeiq_trainer.reporter import LAST_RUN_MAX_BYTES

    settings = daemon_settings(make_settings, broker)
    store = HistoryStore(settings.storage.history_db)
    run = store.create("run_20260101_000000", "m", "out", "test", {})
    traceback = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 2_000 + "ValueError: boom"
    probe = "日落时打开门廊灯，晚上十一点关闭所有客厅的灯并锁上前门" * 6  # 3 bytes a character
    samples = [{"query": f"{i} {probe}", "in_use": probe, "candidate": probe} for i in range(20)]
    store.finish(run.id, RunStatus.FAILED, error=traceback, evaluation={"metric": "chrf", "samples": samples})  # type: ignore[arg-type]
    store.close()
    app = TrainerApp(settings)
    app.start()
    try:
        assert app.link.wait_connected(10)
        last = watcher.wait_for(f"{BASE}/last_run")
        raw = watcher.messages(f"{BASE}/last_run")[-1]
        stored = watcher.request(CMD, RESP, {"action": "runs"})["data"]["runs"][0]["error"]
    finally:
        app.stop()
    assert len(raw) <= LAST_RUN_MAX_BYTES < 16_384
    assert last["error"].endswith("ValueError: boom") and len(last["error"]) < len(traceback)
    assert 0 < len(last["samples"]) < 20 and last["samples"] == samples[: len(last["samples"])]
    assert stored.endswith("ValueError: boom") and len(stored) > len(last["error"])  # the history keeps more

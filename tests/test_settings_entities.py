"""Home Assistant's configuration entities against a real Mosquitto: set, persist, pin, refuse, log level.

Runs use a fake launcher (no training): what matters is the settings and parameters a run gets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.settings import Settings

from .conftest import Broker, SettingsFactory, on_test_broker, wait_idle
from .fakes import FakeLauncher
from .mqtt_client import Watcher

BASE = "homeiq/trainer"
CMD, RESP, STATE = f"{BASE}/command", f"{BASE}/response", f"{BASE}/state"
SETTINGS, PROBLEM = f"{BASE}/settings", f"{BASE}/problem"
DISCOVERY = "homeassistant/device/homeiq_trainer/config"
OTHER_MODEL = "google/flan-t5-base"
COMPLETES, FAILS = ["result"], ["die"]  # fake training processes' scripts


def app_settings(make_settings: SettingsFactory, broker: Broker, **sections: dict) -> Settings:
    training = {"allowed_base_models": [OTHER_MODEL], **sections.pop("training", {})}
    return on_test_broker(make_settings, broker.port, training=training, **sections)


def start_app(settings: Settings, launcher: FakeLauncher) -> TrainerApp:
    app = TrainerApp(settings, launcher=launcher)
    app.start()
    assert app.link.wait_connected(10)
    return app


@pytest.fixture(autouse=True)
def _restore_root_log_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def set_value(watcher: Watcher, name: str, payload: str) -> dict[str, Any]:
    """Send one value as Home Assistant does and return the daemon's answer."""
    before = len(watcher.messages(RESP))
    watcher.publish(f"{SETTINGS}/{name}/set", payload)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for raw in watcher.messages(RESP)[before:]:
            response = json.loads(raw)
            if response["action"] == "set":
                return response
        time.sleep(0.02)
    raise AssertionError(f"no answer to {name} = {payload!r}")


def run_once(app: TrainerApp, watcher: Watcher, payload: str = "start") -> dict[str, Any]:
    """Start a run, wait until the runner has let it go, and return its `last_run` record."""
    before = len(watcher.messages(RESP))
    watcher.publish(CMD, payload)
    deadline = time.monotonic() + 10
    while len(watcher.messages(RESP)) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    response = json.loads(watcher.messages(RESP)[before])
    assert response["status"] == "ok", response
    run_id = response["data"]["run_id"]
    last_run = watcher.wait_for(f"{BASE}/last_run", lambda r: r.get("run_id") == run_id, timeout=30)
    wait_idle(app)
    return last_run


def test_each_entity_sets_the_next_run_and_survives_a_restart(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, caplog: pytest.LogCaptureFixture
) -> None:
    settings = app_settings(make_settings, broker)
    launcher = FakeLauncher(COMPLETES)
    app = start_app(settings, launcher)
    try:
        assert watcher.wait_for(SETTINGS)["epochs"] == 1
        changes = {
            "epochs": ("5", 5),
            "max_samples": ("120", 120),
            "learning_rate": ("3e-4", 0.0003),
            "batch_size": ("4", 4),
            "base_model": (OTHER_MODEL, OTHER_MODEL),
            "min_new_samples": ("100000", 100000),
            "log_level": ("WARNING", "WARNING"),
        }
        kept = {**{name: value for name, (_, value) in changes.items()}, "min_new_samples": 0}
        for name, (payload, value) in changes.items():
            response = set_value(watcher, name, payload)
            assert response["status"] == "ok" and response["data"]["value"] == value, response
            assert response["data"]["setting"] == name, response  # the topic's name, as a refusal says it
            assert watcher.wait_for(SETTINGS, lambda s, n=name, v=value: s[n] == v, timeout=5)[name] == value
        late = Watcher(broker.port)  # what Home Assistant gets when it (re)subscribes
        retained = late.wait_for(SETTINGS, timeout=5)
        assert late.retained[SETTINGS] and {key: retained[key] for key in changes} == {
            name: value for name, (_, value) in changes.items()
        }
        late.close()

        run_once(app, watcher)  # the Start button: no threshold
        used, request = launcher.calls[-1]
        assert (used.training.epochs, used.data.max_samples, used.training.batch_size) == (5, 120, 4)
        assert (used.training.learning_rate, used.training.base_model) == (0.0003, OTHER_MODEL)
        row = HistoryStore(settings.storage.history_db).recent(1)[0]
        params = row.parameters_json or {}
        assert (params["epochs"], params["max_samples"], params["learning_rate"]) == (5, 120, 0.0003)
        assert (params["batch_size"], params["base_model"]) == (4, OTHER_MODEL)

        # Automation-started (anything but the button) waits for the threshold set from Home Assistant...
        refused = watcher.request(CMD, RESP, {"action": "start", "triggered_by": "nightly"})
        assert refused["error"]["code"] == "not_enough_new_data"
        assert refused["data"]["required"] == 120  # clamped to max_samples, also Home Assistant's
        assert refused["data"]["required_by"] == "daemon.min_new_samples"
        assert "daemon.min_new_samples" in refused["error"]["message"]
        # ...unless it names its own...
        own = watcher.request(CMD, RESP, {"action": "start", "params": {"min_new_samples": 1}})
        assert own["error"]["code"] == "not_enough_new_data" and own["data"]["required"] == 1
        assert "required_by" not in own["data"]
        # ...or asks for none (0), from an automation: it trains with the threshold still set.
        nightly = {"action": "start", "triggered_by": "nightly", "params": {"min_new_samples": 0}}
        assert run_once(app, watcher, json.dumps(nightly))["triggered_by"] == "nightly"
        # ...and a start's own params win over Home Assistant's values.
        assert set_value(watcher, "min_new_samples", "0")["status"] == "ok"
        run_once(app, watcher, json.dumps({"action": "start", "params": {"epochs": 2}}))
        assert launcher.calls[-1][1].params.epochs == 2
        assert (HistoryStore(settings.storage.history_db).recent(1)[0].parameters_json or {})["epochs"] == 2
    finally:
        app.stop()

    # A restart: the values come back from homeiq-trainer's own database, not from the broker.
    broker.restart()
    fresh = Watcher(broker.port)
    launcher = FakeLauncher(COMPLETES)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="homeiq_trainer.control"):
        app = start_app(settings, launcher)
    try:
        # An option edited in the configuration that seems to do nothing is explained at start.
        assert "training.epochs is 5, set from Home Assistant; the configuration's 1 applies again" in caplog.text
        assert "daemon.min_new_samples is" not in caplog.text  # set back to the configuration's own 0
        state = fresh.wait_for(SETTINGS, timeout=10)
        assert {key: state[key] for key in changes} == kept
        assert logging.getLogger().level == logging.WARNING
        run_once(app, fresh)
        assert launcher.calls[-1][0].training.epochs == 5
    finally:
        app.stop()
        fresh.close()


def test_pinned_value_is_refused_and_snaps_back(
    make_settings: SettingsFactory,
    broker: Broker,
    watcher: Watcher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HOMEIQ_TRAINING__EPOCHS", "4")
    settings = app_settings(make_settings, broker, training={"epochs": 4})
    launcher = FakeLauncher(COMPLETES)
    caplog.set_level(logging.WARNING)
    app = start_app(settings, launcher)
    try:
        state = watcher.wait_for(SETTINGS)
        assert state["epochs"] == 4 and state["pinned"]["epochs"] == "the environment variable HOMEIQ_TRAINING__EPOCHS"
        published = len(watcher.messages(SETTINGS))
        for _ in range(3):
            response = set_value(watcher, "epochs", "9")
            assert response["status"] == "error" and response["error"]["code"] == "setting_pinned"
            assert "HOMEIQ_TRAINING__EPOCHS" in response["error"]["message"]
        # Each refusal re-publishes the value in force, so Home Assistant's entity snaps back.
        deadline = time.monotonic() + 5
        while len(watcher.messages(SETTINGS)) < published + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [json.loads(p)["epochs"] for p in watcher.messages(SETTINGS)[published:]] == [4, 4, 4]
        assert caplog.text.count("training.epochs is pinned") == 1
        run_once(app, watcher)
        assert launcher.calls[-1][0].training.epochs == 4
    finally:
        app.stop()


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("epochs", "many", "training.epochs: Input should be a valid integer"),
        ("epochs", "0", "training.epochs: Input should be greater than or equal to 1"),
        ("epochs", "2.5", "training.epochs: Input should be a valid integer, got a number with a fractional part"),
        ("epochs", "NaN", "training.epochs: Input should be a finite number"),
        ("learning_rate", "NaN", "training.learning_rate: Input should be a finite number"),
        ("learning_rate", "Infinity", "training.learning_rate: Input should be a finite number"),
        ("learning_rate", "-1e-3", "training.learning_rate: Input should be greater than or equal to 0.000001"),
        ("max_samples", "", "data.max_samples: Input should be a valid integer"),
        ("batch_size", "1e9", "training.batch_size: Input should be less than or equal to 512"),
        ("log_level", "LOUD", "log_level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ("base_model", "evil/model", "training.base_model: must be one of"),
        ("colour", "red", "unknown setting 'colour'"),
    ],
)
def test_bad_value_is_refused_with_the_schemas_message_and_changes_nothing(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, name: str, payload: str, message: str
) -> None:
    settings = app_settings(make_settings, broker)
    app = start_app(settings, FakeLauncher(COMPLETES))
    try:
        before = watcher.wait_for(SETTINGS)
        response = set_value(watcher, name, payload)
        assert response["status"] == "error" and response["error"]["code"] == "invalid_setting"
        assert message in response["error"]["message"], response
        assert response["data"] == {"setting": name}
        assert watcher.wait_for(SETTINGS) == before
        assert app.panel.store.load() == {}
        assert app.panel.effective == settings
    finally:
        app.stop()


def test_log_level_changes_at_once(make_settings: SettingsFactory, broker: Broker, watcher: Watcher) -> None:
    logging.getLogger().setLevel(logging.INFO)
    app = start_app(app_settings(make_settings, broker), FakeLauncher(COMPLETES))
    try:
        assert not logging.getLogger("homeiq_trainer.app").isEnabledFor(logging.DEBUG)
        assert set_value(watcher, "log_level", "debug")["data"]["value"] == "DEBUG"
        assert logging.getLogger("homeiq_trainer.app").isEnabledFor(logging.DEBUG)
        assert set_value(watcher, "log_level", "ERROR")["status"] == "ok"
        assert not logging.getLogger("homeiq_trainer.app").isEnabledFor(logging.WARNING)
    finally:
        app.stop()


def test_retained_setting_command_is_ignored(make_settings: SettingsFactory, broker: Broker, watcher: Watcher) -> None:
    watcher.publish(f"{SETTINGS}/epochs/set", "7", retain=True)
    app = start_app(app_settings(make_settings, broker), FakeLauncher(COMPLETES))
    try:
        watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
        time.sleep(0.5)
        assert watcher.json(SETTINGS)["epochs"] == 1 and watcher.messages(RESP) == []
    finally:
        watcher.publish(f"{SETTINGS}/epochs/set", b"", retain=True)
        app.stop()


def test_discovery_off_clears_it_and_reannounce_button(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    app = start_app(app_settings(make_settings, broker, mqtt={"default_entity_ids": False}), FakeLauncher(COMPLETES))
    try:
        components = watcher.wait_for(DISCOVERY)["components"]
        assert components["epochs"]["entity_category"] == "config" and "default_entity_id" not in components["epochs"]
        published = len(watcher.messages(DISCOVERY))
        watcher.publish(f"{BASE}/reannounce", "PRESS")
        deadline = time.monotonic() + 5
        while len(watcher.messages(DISCOVERY)) == published and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(watcher.messages(DISCOVERY)) > published
    finally:
        app.stop()
    app = start_app(app_settings(make_settings, broker, mqtt={"discovery": False}), FakeLauncher(COMPLETES))
    try:
        watcher.wait_for(DISCOVERY, lambda v: v == "", timeout=10)
        late = Watcher(broker.port)
        late.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
        time.sleep(0.3)
        assert DISCOVERY not in late.latest  # no retained discovery left for Home Assistant to find
        late.close()
        # Cleared once per start: again at each announce, Home Assistant logged "No device components to
        # cleanup" every time.
        cleared = len(watcher.messages(DISCOVERY))
        announced = len(watcher.messages(f"{BASE}/availability"))
        watcher.publish(f"{BASE}/reannounce", "PRESS")
        watcher.wait_for(f"{BASE}/availability", timeout=10)
        while len(watcher.messages(f"{BASE}/availability")) == announced:
            time.sleep(0.02)
        assert len(watcher.messages(DISCOVERY)) == cleared
    finally:
        app.stop()


def test_problem_sensor_follows_failed_runs_and_the_source(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, tmp_path: Any
) -> None:
    settings = app_settings(make_settings, broker)
    launcher = FakeLauncher(FAILS)
    app = start_app(settings, launcher)
    try:
        assert watcher.wait_for(PROBLEM)["problem"] is False
        run_once(app, watcher)
        problem = watcher.wait_for(PROBLEM, lambda p: p["problem"], timeout=10)
        assert problem["last_run_failed"] and problem["source_error"] is None
        launcher.script = COMPLETES
        run_once(app, watcher)
        watcher.wait_for(PROBLEM, lambda p: not p["problem"], timeout=10)
    finally:
        app.stop()
    missing = app_settings(make_settings, broker, data={"source_db": str(tmp_path / "gone.db")})
    app = start_app(missing, FakeLauncher(COMPLETES))
    try:
        problem = watcher.wait_for(PROBLEM, lambda p: p["source_error"] is not None, timeout=10)
        assert problem["problem"] and "not found" in problem["source_error"]
    finally:
        app.stop()


def test_garbage_on_every_setting_topic_is_answered_and_changes_nothing(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    settings = app_settings(make_settings, broker)
    app = start_app(settings, FakeLauncher(COMPLETES))
    try:
        before = watcher.wait_for(SETTINGS)
        payloads = [b"", b"\xff\xfe\x00", b"{}", b"[1]", b"null", b"1e309", b"-Infinity", b"\x00", b"x" * 5000]
        names = [*app.panel.controls, "nope", "../epochs"]
        for name in names:
            for payload in payloads:
                watcher.publish(f"{SETTINGS}/{name}/set", payload)
        sent = (len(names) - 1) * len(payloads)  # `../epochs` is no setting's topic: not ours to answer
        deadline = time.monotonic() + 30
        while len(watcher.messages(RESP)) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        responses = [json.loads(p) for p in watcher.messages(RESP)]
        assert len(responses) == sent
        assert all(r["status"] == "error" and r["error"]["message"] for r in responses)
        assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"  # still serving
        assert watcher.json(SETTINGS) == before and app.panel.store.load() == {}
    finally:
        app.stop()


def test_limits_that_allow_one_value_still_bring_the_device_online(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher
) -> None:
    """min == max made discovery raise on every announce: no retained state and never `online`."""
    settings = app_settings(make_settings, broker, training={"epochs": 1}, limits={"max_epochs": 1})
    app = start_app(settings, FakeLauncher(COMPLETES))
    try:
        assert watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10) == "online"
        epochs = watcher.wait_for(DISCOVERY)["components"]["epochs"]
        assert (epochs["min"], epochs["max"]) == (1, 2)
        watcher.wait_for(SETTINGS)
        watcher.publish(f"{SETTINGS}/epochs/set", b"2")  # shown, and refused by the limit
        answer = watcher.wait_for(RESP, lambda r: r.get("status") == "error", timeout=10)
        assert "limits.max_epochs (1)" in answer["error"]["message"]
    finally:
        app.stop()


def test_state_and_online_are_published_even_when_discovery_cannot_be_built(
    make_settings: SettingsFactory,
    broker: Broker,
    watcher: Watcher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A discovery that raised ended the announce before any retained value and before `online`."""
    from homeiq_trainer import app as app_module

    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("a number needs min below max")

    monkeypatch.setattr(app_module, "build_discovery", broken)
    app = start_app(app_settings(make_settings, broker), FakeLauncher(COMPLETES))
    try:
        assert watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10) == "online"
        assert watcher.wait_for(STATE, timeout=10)["state"] == "idle"
        assert DISCOVERY not in watcher.latest
        assert "Building the discovery message failed" in caplog.text
    finally:
        app.stop()

"""Done-means for serving, end to end: the daemon, a real broker, real training processes, the tiny model.

The tiny random model's generations are noise, so these tests compare adapters by held-out loss
(`promotion.metric = eval_loss`); chrF itself is checked against sacrebleu in test_evaluation.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.messages import NOT_SERVED
from homeiq_trainer.training import artifacts

from .conftest import Broker, SettingsFactory
from .mqtt_client import Watcher

BASE = "homeiq/trainer"
CMD, RESP, STATE = f"{BASE}/command", f"{BASE}/response", f"{BASE}/state"
MODEL, ADAPTER, DECISION, EVENT = f"{BASE}/model", f"{BASE}/adapter", f"{BASE}/decision", f"{BASE}/event"
LAST_RUN = f"{BASE}/last_run"
DONE = ("completed", "failed", "cancelled")


def _app(make_settings: SettingsFactory, broker: Broker, policy: str) -> TrainerApp:
    settings = make_settings(
        mqtt={"host": "127.0.0.1", "port": broker.port, "client_id": "homeiq-trainer-test"},
        data={"max_samples": 120},
        promotion={"policy": policy, "metric": "eval_loss"},
        limits={"max_learning_rate": 1.0, "max_epochs": 10},
        evaluation={"max_generate_examples": 4, "max_new_tokens": 8},
    )
    app = TrainerApp(settings)
    app.start()
    assert app.link.wait_connected(10)
    return app


@pytest.fixture
def if_better(make_settings: SettingsFactory, broker: Broker) -> Iterator[TrainerApp]:
    app = _app(make_settings, broker, "if_better")
    yield app
    app.stop()


@pytest.fixture
def manual(make_settings: SettingsFactory, broker: Broker) -> Iterator[TrainerApp]:
    app = _app(make_settings, broker, "manual")
    yield app
    app.stop()


def _train(watcher: Watcher, **params: Any) -> tuple[str, dict[str, Any]]:
    response = watcher.request(CMD, RESP, {"action": "start", "params": params}, timeout=20)
    assert response["status"] == "ok", response
    run_id = response["data"]["run_id"]
    state = watcher.wait_for(STATE, lambda s: s.get("run_id") == run_id and s["state"] in DONE, timeout=240)
    last = watcher.wait_for(LAST_RUN, lambda r: r.get("run_id") == run_id, timeout=10)
    assert state["state"] in ("completed", "failed"), state
    return run_id, last


def _events(watcher: Watcher, run_id: str) -> list[str]:
    return [json.loads(p)["event"] for p in watcher.messages(EVENT) if json.loads(p).get("run_id") == run_id]


def _assert_no_nan(watcher: Watcher) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a payload")

    for _, topic, payload in watcher.log:
        text = payload.decode("utf-8", "replace")
        assert "NaN" not in text and "Infinity" not in text, topic
        if text.startswith("{"):
            json.loads(text, parse_constant=refuse)


def test_if_better_promotes_the_better_run_and_keeps_out_a_harmful_one(if_better: TrainerApp, watcher: Watcher) -> None:
    out = if_better.settings.storage.output_dir
    watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)

    # Ceilings refuse and name the limit; nothing starts.
    refused = watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": 50}}, timeout=10)
    assert refused["status"] == "error" and refused["error"]["code"] == "invalid_command"
    assert "limits.max_epochs" in refused["error"]["message"]
    assert watcher.json(STATE)["state"] == "idle"

    bad, last = _train(watcher, learning_rate=1.0)  # nothing in use: any finite result is served
    assert last["decision"] == "promoted" or last["status"] == "failed"
    good, last = _train(watcher, learning_rate=0.01, epochs=2)
    assert last["promoted"] is True and last["decision"] == "promoted", last
    assert artifacts.latest_run(out) == good and artifacts.read_current(out).run_id == good
    assert watcher.wait_for(MODEL, lambda m: m.get("run_id") == good, timeout=10)["metrics"]["eval_loss"] is not None
    assert "adapter_promoted" in _events(watcher, good)
    model_before = watcher.json(MODEL)
    current_before = (out / "current.json").read_bytes()

    harmful, last = _train(watcher, learning_rate=1.0, epochs=2)
    assert last["promoted"] is False and last["decision"] in ("kept_current", "not_promoted_invalid"), last
    assert last["decision_reason"] and ("in use" in last["decision_reason"] or "diverged" in last["decision_reason"])
    assert artifacts.latest_run(out) == good and (out / "current.json").read_bytes() == current_before
    assert watcher.json(MODEL) == model_before
    update = watcher.wait_for(ADAPTER, timeout=10)
    assert update["installed_version"] == update["latest_version"] == good  # nothing offered to install
    assert len(update["release_summary"]) <= 255
    assert watcher.wait_for(DECISION, lambda d: d.get("run_id") == harmful)["decision"] == last["decision"]
    assert "adapter_rejected" in _events(watcher, harmful)
    assert _events(watcher, harmful)[0] == "run_started"
    # A rejected candidate is not offered, so the install payload has nothing to install.
    nothing = watcher.request(CMD, RESP, {"action": "promote", "request_id": "install-1"}, timeout=10)
    assert nothing["status"] == "error" and nothing["error"]["code"] in ("nothing_to_install", "not_promotable")
    assert artifacts.latest_run(out) == good
    _assert_no_nan(watcher)
    assert bad != good != harmful


def test_manual_candidate_waits_install_promotes_rollback_restores(manual: TrainerApp, watcher: Watcher) -> None:
    out = manual.settings.storage.output_dir
    watcher.wait_for(f"{BASE}/availability", lambda v: v == "online", timeout=10)
    discovery = watcher.wait_for(f"homeassistant/device/{manual.settings.daemon.instance_id}/config", timeout=10)
    install = discovery["components"]["adapter"]["payload_install"]
    press_rollback = discovery["components"]["rollback"]["payload_press"]

    first, last = _train(watcher, learning_rate=0.01)
    assert last["decision"] == "awaiting_approval" and last["promoted"] is False
    assert artifacts.latest_run(out) is None
    update = watcher.wait_for(ADAPTER, lambda u: u.get("latest_version") == first, timeout=10)
    assert update["installed_version"] == NOT_SERVED and None not in update.values()  # HA drops null versions

    # What Home Assistant sends when Install is pressed.
    watcher.publish(CMD, install)
    watcher.wait_for(ADAPTER, lambda u: u.get("installed_version") == first, timeout=10)
    assert artifacts.latest_run(out) == first and artifacts.read_current(out).run_id == first
    # The trigger an automation restarts HomeIQ's service on: it fired only when a run served itself.
    served = watcher.wait_for(EVENT, lambda e: e["event"] == "adapter_promoted", timeout=10)
    assert served["run_id"] == first and served["reason"].startswith("installed by ")

    second, last = _train(watcher, learning_rate=0.01, epochs=2)
    assert last["decision"] == "awaiting_approval" and artifacts.latest_run(out) == first
    watcher.wait_for(ADAPTER, lambda u: u.get("latest_version") == second and u.get("installed_version") == first)
    promoted = watcher.request(CMD, RESP, {"action": "promote", "run_id": second}, timeout=10)
    assert promoted["status"] == "ok", promoted
    assert artifacts.latest_run(out) == second
    watcher.wait_for(MODEL, lambda m: m.get("run_id") == second, timeout=10)

    watcher.publish(CMD, press_rollback)  # the "Roll back adapter" button
    watcher.wait_for(MODEL, lambda m: m.get("run_id") == first, timeout=10)
    back = watcher.wait_for(EVENT, lambda e: e["event"] == "adapter_promoted" and e["run_id"] == first, timeout=10)
    assert back["reason"].startswith("rolled back by ")
    assert artifacts.latest_run(out) == first and artifacts.read_current(out).run_id == first
    update = watcher.wait_for(ADAPTER, lambda u: u.get("installed_version") == first, timeout=10)
    assert update["latest_version"] == first  # the rolled-back run is not offered again by itself
    _assert_no_nan(watcher)


def test_install_serves_the_candidate_home_assistant_showed(
    manual: TrainerApp, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Install sends a plain `promote`; it installed whichever candidate ranked first when it arrived,
    one a run had recorded but not yet shown."""
    from homeiq_trainer import promotion

    out = manual.settings.storage.output_dir
    shown, _ = _train(watcher, learning_rate=0.01)
    watcher.wait_for(ADAPTER, lambda u: u.get("latest_version") == shown, timeout=10)
    reporter = manual._started().reporter
    monkeypatch.setattr(reporter, "refresh_serving", lambda: None)  # the next run's end is not shown yet
    started = watcher.request(CMD, RESP, {"action": "start", "params": {"learning_rate": 0.01}}, timeout=20)
    unseen = started["data"]["run_id"]
    watcher.wait_for(STATE, lambda s: s.get("run_id") == unseen and s["state"] in DONE, timeout=240)
    unseen_row = manual.store.by_identifier(unseen)
    monkeypatch.setattr(promotion, "offered", lambda *_args: unseen_row)  # and ranks first
    install = watcher.request(CMD, RESP, {"action": "promote"}, timeout=10)
    assert install["status"] == "ok" and install["data"]["served"] == shown, install
    assert artifacts.latest_run(out) == shown

"""Home Assistant discovery payload, topics and templates: pure, no broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pytest
from pydantic import ValidationError

from homeiq_trainer.adapter_state import update_payload
from homeiq_trainer.control import SettingsPanel
from homeiq_trainer.discovery import Component, DeviceDiscovery, build_discovery
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.messages import (
    NOT_SERVED,
    Decision,
    DecisionInfo,
    ModelInfo,
    Phase,
    ProgressPayload,
    RunRecord,
    RunStatus,
    State,
    StatePayload,
    TriggerEvent,
)
from homeiq_trainer.overrides import OverridesStore
from homeiq_trainer.problem import problem_payload
from homeiq_trainer.settings import load_settings
from homeiq_trainer.topics import Topics


def test_topics_follow_settings() -> None:
    s = load_settings(
        None, {"mqtt": {"base_topic": "/house/ai/", "discovery_prefix": "ha"}, "daemon": {"instance_id": "nuc"}}
    )
    t = Topics.from_settings(s)
    assert t.command == "house/ai/command" and t.availability == "house/ai/availability"
    assert t.discovery == "ha/device/nuc/config"
    assert t.ha_status == "homeassistant/status"  # HA keeps its birth topic when the prefix changes


def test_payload_has_every_entity_the_issue_names() -> None:
    payload = build_discovery(load_settings()).payload()
    components = payload["components"]
    by_platform = {(c["platform"], c.get("name")) for c in components.values()}
    for expected in [
        ("button", "Start training"),
        ("button", "Cancel training"),
        ("sensor", "Status"),
        ("sensor", "Progress"),
        ("binary_sensor", "Training"),
        ("sensor", "Final loss"),
        ("sensor", "Current loss"),
        ("sensor", "Samples"),
        ("sensor", "Last run"),
        ("sensor", "Last error"),
        ("sensor", "Current model"),
        ("update", "Ask AI adapter"),
        ("button", "Roll back adapter"),
        ("sensor", "Adapter chrF"),
        ("sensor", "Last decision"),
    ]:
        assert expected in by_platform, expected
    assert components["status"]["options"] == ["idle", "queued", "running", "completed", "failed", "cancelled"]
    assert components["progress"]["unit_of_measurement"] == "%"
    assert components["last_run"]["device_class"] == "timestamp"
    assert components["final_loss"]["state_class"] == "measurement"
    assert components["last_error"]["entity_category"] == "diagnostic"
    assert {c["unique_id"] for c in components.values()} == {f"homeiq_trainer_{k}" for k in components}
    for component in components.values():
        if component["platform"] == "device_automation":
            continue
        assert component["default_entity_id"] == f"{component['platform']}.{component['object_id']}"
    assert payload["device"]["identifiers"] and payload["origin"]["support_url"].startswith("https://")
    assert payload["availability"][0]["topic"] == "homeiq/trainer/availability"
    assert len(json.dumps(payload)) < 16_000
    # Round trip: what we publish validates against the strict model (no unknown keys anywhere).
    DeviceDiscovery.model_validate(payload)


def test_every_entity_asks_for_qos_1_itself() -> None:
    """Home Assistant copies only topics and availability from the device level into components
    (`SHARED_OPTIONS` in its mqtt/schemas.py): with `qos` at the top only, it subscribed to every state
    and sent every button press and setting at QoS 0."""
    payload = build_discovery(load_settings()).payload()
    assert {key: component.get("qos") for key, component in payload["components"].items()} == dict.fromkeys(
        payload["components"], 1
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"platform": "button", "unique_id": "a", "name": "x", "default_entity_id": "button.x", "object_id": "x"},
        {
            "platform": "sensor",
            "unique_id": "a",
            "name": "x",
            "default_entity_id": "sensor.x",
            "object_id": "x",
            "state_topic": "t",
            "device_class": "enum",
        },
        {
            "platform": "sensor",
            "unique_id": "a",
            "name": "x",
            "default_entity_id": "sensor.x",
            "object_id": "x",
            "state_topic": "t",
            "payload_press": "start",
        },
        {
            "platform": "sensor",
            "unique_id": "a",
            "name": "x",
            "default_entity_id": "sensor.y",
            "object_id": "x",
            "state_topic": "t",
        },
        {
            "platform": "sensor",
            "unique_id": "a",
            "name": "x",
            "default_entity_id": "sensor.x",
            "object_id": "x",
            "state_topic": "t",
            "colour": "red",
        },
        {"platform": "light", "unique_id": "a", "name": "x", "default_entity_id": "light.x", "object_id": "x"},
    ],
)
def test_component_validation_refuses_what_home_assistant_would(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Component.model_validate(bad)


def test_device_needs_identifiers_and_unique_ids() -> None:
    payload = build_discovery(load_settings()).payload()
    payload["device"]["identifiers"] = []
    with pytest.raises(ValidationError):
        DeviceDiscovery.model_validate(payload)
    payload = build_discovery(load_settings()).payload()
    payload["components"]["cancel"]["unique_id"] = payload["components"]["start"]["unique_id"]
    with pytest.raises(ValidationError, match="unique"):
        DeviceDiscovery.model_validate(payload)


def test_update_entity_and_device_triggers_follow_home_assistants_schemas() -> None:
    from homeiq_trainer.discovery import DECISION_OPTIONS, TRIGGER_EVENTS

    components = build_discovery(load_settings()).payload()["components"]
    update = components["adapter"]
    # HA's MQTT update: state_topic JSON carries the versions; Install sends payload_install to command_topic.
    assert update["state_topic"] == "homeiq/trainer/adapter" and update["command_topic"] == "homeiq/trainer/command"
    assert update["payload_install"] == "promote" and components["rollback"]["payload_press"] == "rollback"
    assert set(update) <= {
        "platform", "unique_id", "name", "default_entity_id", "object_id", "icon", "state_topic", "command_topic",
        "payload_install", "device_class", "entity_picture", "qos",
    }  # fmt: skip
    assert components["last_decision"]["options"] == DECISION_OPTIONS == [
        "promoted", "kept_current", "awaiting_approval", "not_promoted_invalid",
    ]  # fmt: skip
    triggers = {c["type"]: c for c in components.values() if c["platform"] == "device_automation"}
    assert set(triggers) == set(TRIGGER_EVENTS) == {
        "run_started", "run_completed", "run_failed", "adapter_promoted", "adapter_rejected", "not_enough_data",
    }  # fmt: skip
    for event, trigger in triggers.items():
        # Device-based discovery needs a unique_id; HA matches `payload` against the rendered template.
        assert trigger["automation_type"] == "trigger" and trigger["unique_id"].endswith(event)
        assert trigger["topic"] == "homeiq/trainer/event" and trigger["payload"] == event
        assert set(trigger) == {
            "platform", "unique_id", "automation_type", "topic", "type", "subtype", "payload", "value_template", "qos",
        }  # fmt: skip
    with pytest.raises(ValidationError):
        Component(
            platform="update", unique_id="u", name="x", default_entity_id="update.x", object_id="x",
            state_topic="t", payload_press="p",
        )  # fmt: skip


def _retained_samples(topics: Topics, tmp_path: Path) -> dict[str, list[str]]:
    """What the daemon retains on each templated topic, empty and filled, built from its own models."""
    run_id = "run_20260101_120000"
    finished = datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    store = HistoryStore(tmp_path / "history.db")
    settings_state = SettingsPanel(load_settings(), OverridesStore(store.engine), {}).state()
    store.close()
    return {
        topics.state: [
            StatePayload(state=State.IDLE).model_dump_json(),
            StatePayload(state=State.RUNNING, run_id=run_id, phase=Phase.TRAINING).model_dump_json(),
        ],
        topics.progress: [
            ProgressPayload().model_dump_json(),
            ProgressPayload(
                run_id=run_id, percent=42.5, step=10, total_steps=24, epoch=1.2, loss=0.12
            ).model_dump_json(),
        ],
        topics.last_run: [
            RunRecord().model_dump_json(),
            RunRecord(
                run_id=run_id,
                status=RunStatus.COMPLETED,
                finished_at=finished,
                dataset_size=120,
                final_loss=0.5,
                eval_loss=0.6,
                decision=Decision.PROMOTED,
                backend="ray",
                cluster={"address": "ray://10.0.0.2:10001", "workers": 2},
            ).model_dump_json(),
            RunRecord(run_id=run_id, status=RunStatus.FAILED, finished_at=finished, error="x" * 600).model_dump_json(),
        ],
        topics.model: [
            ModelInfo().model_dump_json(),
            ModelInfo(run_id=run_id, metrics={"chrf": 55.1, "eval_loss": 0.6}).model_dump_json(),
            ModelInfo(run_id=run_id, metrics={"eval_loss": 0.6}).model_dump_json(),  # nothing generated
        ],
        topics.decision: [
            DecisionInfo().model_dump_json(),
            DecisionInfo(decision=Decision.KEPT_CURRENT, reason="r", run_id=run_id, promoted=False).model_dump_json(),
        ],
        topics.problem: [json.dumps(problem_payload(None, None)), json.dumps(problem_payload("failed", "locked"))],
        topics.settings: [json.dumps(settings_state)],
        topics.event: [TriggerEvent(event="run_started", run_id=run_id).model_dump_json()],
    }


def _check_state(component: dict, state: str) -> None:
    """What Home Assistant would accept as this entity's state ('None' makes a sensor unknown)."""
    assert len(state) <= 255
    platform, device_class = component["platform"], component.get("device_class")
    if platform == "binary_sensor":
        assert state in ("ON", "OFF")
    elif platform == "select" or device_class == "enum":
        assert state in [*component["options"], *(["None"] if platform == "sensor" else [])]
    elif platform == "number" or "state_class" in component:
        assert state == "None" and platform == "sensor" or float(state) == float(state)
    elif device_class == "timestamp":
        assert state == "None" or datetime.fromisoformat(state).tzinfo is not None
    else:
        assert state.strip()


def test_every_template_renders_on_what_the_daemon_retains(tmp_path: Path) -> None:
    # Home Assistant renders an undefined key as '' with a warning, and a numeric sensor then keeps
    # its old value; StrictUndefined turns that into a failure here.
    settings = load_settings()
    topics = Topics.from_settings(settings)
    samples = _retained_samples(topics, tmp_path)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    components = build_discovery(settings).payload()["components"]
    rendered = 0
    for component in components.values():
        for template_key, topic_key in (
            ("value_template", "state_topic"),
            ("json_attributes_template", "json_attributes_topic"),
        ):
            if template_key not in component:
                continue
            topic = component["topic"] if component["platform"] == "device_automation" else component[topic_key]
            for payload in samples[topic]:
                out = env.from_string(component[template_key]).render(value_json=json.loads(payload), value=payload)
                if template_key == "json_attributes_template":
                    assert isinstance(json.loads(out), dict), out
                elif component["platform"] != "device_automation":
                    _check_state(component, out)
                rendered += 1
    assert rendered > 60
    last_error = env.from_string(components["last_error"]["value_template"])
    traceback_text = 'Traceback (most recent call last):\n  File "x.py", line 1\nSafetensorError: incomplete metadata\n'
    assert last_error.render(value_json={"error": traceback_text}) == "SafetensorError: incomplete metadata"
    assert last_error.render(value_json={"error": None}) == "none"
    chrf = components["adapter_chrf"]["value_template"]
    model = samples[topics.model]
    assert [env.from_string(chrf).render(value_json=json.loads(p)) for p in model] == ["None", "55.1", "None"]


def test_the_update_entity_never_gets_a_null_version(tmp_path: Path) -> None:
    # Home Assistant throws the whole update message away when a version is null (a served adapter
    # and a candidate awaiting approval: tests/test_serving_daemon.py, through the broker).
    settings = load_settings(None, {"storage": {"output_dir": str(tmp_path / "out")}})
    store = HistoryStore(tmp_path / "history.db")
    try:
        nothing = json.loads(update_payload(store, settings).model_dump_json())
    finally:
        store.close()
    assert nothing["installed_version"] == nothing["latest_version"] == NOT_SERVED
    assert None not in nothing.values()


def test_a_removal_that_never_left_counts_as_unconfirmed_not_as_a_crash() -> None:
    """`discovery --remove` ended in a traceback when the connection dropped between connect and publish."""
    from paho.mqtt.client import MQTTMessageInfo
    from paho.mqtt.enums import MQTTErrorCode

    from homeiq_trainer.app import _confirmed

    never_sent = MQTTMessageInfo(1)
    never_sent.rc = MQTTErrorCode.MQTT_ERR_NO_CONN
    assert _confirmed(never_sent) is False
    sent = MQTTMessageInfo(2)
    sent._set_as_published()
    assert _confirmed(sent) is True

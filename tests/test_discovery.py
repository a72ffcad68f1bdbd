"""Home Assistant discovery payload and topics: pure, no broker."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from homeiq_trainer.discovery import Component, DeviceDiscovery, build_discovery
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
    by_platform = {(c["platform"], c["name"]) for c in components.values()}
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
    ]:
        assert expected in by_platform, expected
    assert components["status"]["options"] == ["idle", "queued", "running", "completed", "failed", "cancelled"]
    assert components["progress"]["unit_of_measurement"] == "%"
    assert components["last_run"]["device_class"] == "timestamp"
    assert components["final_loss"]["state_class"] == "measurement"
    assert components["last_error"]["entity_category"] == "diagnostic"
    assert {c["unique_id"] for c in components.values()} == {f"homeiq_trainer_{k}" for k in components}
    for component in components.values():
        assert component["default_entity_id"] == f"{component['platform']}.{component['object_id']}"
    assert payload["device"]["identifiers"] and payload["origin"]["support_url"].startswith("https://")
    assert payload["availability"][0]["topic"] == "homeiq/trainer/availability"
    assert len(json.dumps(payload)) < 16_000
    # Round trip: what we publish validates against the strict model (no unknown keys anywhere).
    DeviceDiscovery.model_validate(payload)


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

"""Home Assistant MQTT device discovery: one retained message that describes the whole device.

Home Assistant drops the whole device payload for one key it does not know in `device`, `origin`,
`availability` or at the top, and silently drops one inside a component; so the payload is built from
models that forbid unknown keys and check each platform's required options. Checked against Home
Assistant 2026.11's own schemas and templates (README, Home Assistant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from homeiq_trainer import __version__
from homeiq_trainer.control import Control, active_controls, number_limits, select_options
from homeiq_trainer.messages import Decision, State
from homeiq_trainer.settings import Settings
from homeiq_trainer.topics import AVAILABLE, NOT_AVAILABLE, Topics

QOS = 1  # what Home Assistant subscribes to our states and sends commands with

SUPPORT_URL = "https://github.com/homeiq/homeiq-trainer"
STATE_OPTIONS = [state.value for state in State]
# A configuration entity reads its value from `<base>/settings`, and what pins it as an attribute.
_SETTING_VALUE = "{{ value_json.%s }}"
_SETTING_PINNED_BY = "{{ {'pinned_by': value_json.pinned.%s} | tojson }}"
# Home Assistant refuses states longer than 255 characters.
MAX_STATE_CHARS = 250


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceInfo(_Strict):
    """The `device` block."""

    identifiers: list[str] = Field(min_length=1)
    name: str
    manufacturer: str
    model: str
    sw_version: str


class OriginInfo(_Strict):
    """The `origin` block: who publishes this discovery."""

    name: str
    sw_version: str
    support_url: str


class Availability(_Strict):
    """One availability topic."""

    topic: str
    payload_available: str = AVAILABLE
    payload_not_available: str = NOT_AVAILABLE


Platform = Literal["button", "sensor", "binary_sensor", "number", "select", "update"]
_STATE_KEYS = {"state_topic", "value_template", "json_attributes_topic", "json_attributes_template"}
_PLATFORM_KEYS: dict[str, set[str]] = {
    "button": {"command_topic", "payload_press"},
    "sensor": {
        *_STATE_KEYS,
        "device_class",
        "state_class",
        "unit_of_measurement",
        "options",
        "suggested_display_precision",
    },
    # Home Assistant reads installed_version, latest_version, title and release_summary from the
    # state topic's JSON; `payload_install` goes to `command_topic` when Install is pressed.
    "update": {"state_topic", "command_topic", "payload_install", "device_class", "entity_picture"},
    "binary_sensor": {*_STATE_KEYS, "device_class", "payload_on", "payload_off"},
    "number": {*_STATE_KEYS, "command_topic", "min", "max", "step", "mode", "unit_of_measurement"},
    "select": {*_STATE_KEYS, "command_topic", "options"},
}
_COMMAND_PLATFORMS = {"button", "number", "select"}
_COMMON_KEYS = {
    "platform",
    "unique_id",
    "name",
    "default_entity_id",
    "object_id",
    "icon",
    "entity_category",
    "enabled_by_default",
    "qos",
}


class Component(_Strict):
    """One entity of the device."""

    platform: Platform
    unique_id: str = Field(min_length=1)
    name: str
    default_entity_id: str | None = Field(None, pattern=r"^[a-z_]+\.[a-z0-9_]+$")
    object_id: str | None = Field(None, pattern=r"^[a-z0-9_]+$")
    icon: str | None = None
    entity_category: Literal["diagnostic", "config"] | None = None
    enabled_by_default: bool | None = None
    qos: int | None = Field(None, ge=0, le=2)
    command_topic: str | None = None
    payload_press: str | None = None
    state_topic: str | None = None
    value_template: str | None = None
    device_class: str | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    unit_of_measurement: str | None = None
    options: list[str] | None = None
    suggested_display_precision: int | None = None
    payload_install: str | None = None
    entity_picture: str | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = Field(None, ge=0.001)
    mode: Literal["auto", "box", "slider"] | None = None
    payload_on: str | None = None
    payload_off: str | None = None
    json_attributes_topic: str | None = None
    json_attributes_template: str | None = None

    @model_validator(mode="after")
    def _fits_platform(self) -> Component:
        given = {key for key, value in self if value is not None}
        unknown = given - _COMMON_KEYS - _PLATFORM_KEYS[self.platform]
        if unknown:
            raise ValueError(f"{self.platform} does not take {sorted(unknown)}")
        if self.platform in _COMMAND_PLATFORMS and not self.command_topic:
            raise ValueError(f"a {self.platform} needs a command_topic")
        if self.platform != "button" and not self.state_topic:
            raise ValueError(f"a {self.platform} needs a state_topic")
        if (self.device_class == "enum" or self.platform == "select") and not self.options:
            raise ValueError("an enum sensor or a select needs options")
        if self.state_class is not None and self.device_class in ("enum", "timestamp"):
            raise ValueError(f"a {self.device_class} sensor cannot have a state_class")
        if self.platform == "number" and (self.min is None or self.max is None or self.min >= self.max):
            raise ValueError("a number needs min below max")
        if (self.default_entity_id is None) != (self.object_id is None):
            raise ValueError("default_entity_id and object_id go together (both, or neither)")
        if self.default_entity_id is not None and self.default_entity_id != f"{self.platform}.{self.object_id}":
            raise ValueError("default_entity_id must be <platform>.<object_id>")
        return self


class DeviceTrigger(_Strict):
    """An MQTT device trigger: an event on `topic` that automations can start from."""

    platform: Literal["device_automation"] = "device_automation"
    unique_id: str = Field(min_length=1)  # ignored by Home Assistant for triggers; keeps components distinct
    automation_type: Literal["trigger"] = "trigger"
    topic: str
    type: str = Field(pattern=r"^[a-z_]+$")
    subtype: str = Field(pattern=r"^[a-z_]+$")
    payload: str
    value_template: str
    qos: int | None = Field(None, ge=0, le=2)


class DeviceDiscovery(_Strict):
    """The whole device-based discovery payload."""

    device: DeviceInfo
    origin: OriginInfo
    availability: list[Availability] = Field(min_length=1)
    qos: int = Field(1, ge=0, le=2)
    components: dict[str, Component | DeviceTrigger] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> DeviceDiscovery:
        ids = [component.unique_id for component in self.components.values()]
        if len(ids) != len(set(ids)):
            raise ValueError("unique_id values must be unique")
        return self

    def payload(self) -> dict[str, Any]:
        """The JSON object to publish."""
        return self.model_dump(exclude_none=True)


def build_discovery(settings: Settings, topics: Topics | None = None) -> DeviceDiscovery:
    """The device and its entities for this instance."""
    topics = topics or Topics.from_settings(settings)
    instance = settings.daemon.instance_id
    slug = instance.lower().replace("-", "_")

    def component(key: str, platform: Platform, name: str, **options: Any) -> tuple[str, Component]:
        if settings.mqtt.default_entity_ids:
            # Both keys until Home Assistant before 2025.10 (object_id only) is gone.
            options.update(default_entity_id=f"{platform}.{slug}_{key}", object_id=f"{slug}_{key}")
        # QoS on each entity: Home Assistant copies only topics and availability from the device level
        # into its components, so the top-level `qos` alone left every state and command at QoS 0.
        options.setdefault("qos", QOS)
        return key, Component(platform=platform, unique_id=f"{instance}_{key}", name=name, **options)

    controls = [control_entity(control, settings, topics) for control in active_controls()]
    none_if_missing = "{{ value_json.%s if value_json.%s is not none else 'None' }}"
    components: dict[str, Component | DeviceTrigger] = dict(
        [
            component(
                "start",
                "button",
                "Start training",
                command_topic=topics.command,
                payload_press="start",
                icon="mdi:play",
            ),
            component(
                "cancel",
                "button",
                "Cancel training",
                command_topic=topics.command,
                payload_press="cancel",
                icon="mdi:stop",
            ),
            component(
                "status",
                "sensor",
                "Status",
                state_topic=topics.state,
                value_template="{{ value_json.state }}",
                device_class="enum",
                options=STATE_OPTIONS,
                json_attributes_topic=topics.state,
                icon="mdi:school",
            ),
            component(
                "progress",
                "sensor",
                "Progress",
                state_topic=topics.progress,
                value_template="{{ value_json.percent }}",
                unit_of_measurement="%",
                state_class="measurement",
                icon="mdi:progress-clock",
                json_attributes_topic=topics.progress,
            ),
            component(
                "training",
                "binary_sensor",
                "Training",
                state_topic=topics.state,
                value_template="{{ 'ON' if value_json.state in ['queued', 'running'] else 'OFF' }}",
                device_class="running",
                payload_on="ON",
                payload_off="OFF",
            ),
            component(
                "final_loss",
                "sensor",
                "Final loss",
                state_topic=topics.last_run,
                value_template=none_if_missing % ("final_loss", "final_loss"),
                state_class="measurement",
                suggested_display_precision=4,
                icon="mdi:chart-bell-curve",
            ),
            component(
                "eval_loss",
                "sensor",
                "Evaluation loss",
                state_topic=topics.last_run,
                value_template=none_if_missing % ("eval_loss", "eval_loss"),
                state_class="measurement",
                suggested_display_precision=4,
                icon="mdi:chart-bell-curve-cumulative",
            ),
            component(
                "current_loss",
                "sensor",
                "Current loss",
                state_topic=topics.progress,
                value_template=none_if_missing % ("loss", "loss"),
                state_class="measurement",
                suggested_display_precision=4,
                icon="mdi:chart-line",
            ),
            component(
                "samples",
                "sensor",
                "Samples",
                state_topic=topics.last_run,
                value_template=none_if_missing % ("dataset_size", "dataset_size"),
                state_class="measurement",
                unit_of_measurement="samples",
                icon="mdi:database",
            ),
            component(
                "last_run",
                "sensor",
                "Last run",
                state_topic=topics.last_run,
                value_template=none_if_missing % ("finished_at", "finished_at"),
                device_class="timestamp",
                json_attributes_topic=topics.last_run,
            ),
            component(
                "last_error",
                "sensor",
                "Last error",
                state_topic=topics.last_run,
                # A traceback's last line is the exception: that line, not "Traceback (most recent…".
                value_template=(
                    "{{ ((value_json.error or 'none') | string).strip().split('\\n') | last "
                    f"| truncate({MAX_STATE_CHARS}) }}}}"
                ),
                entity_category="diagnostic",
                icon="mdi:alert-circle-outline",
            ),
            component(
                "backend",
                "sensor",
                "Training backend",
                state_topic=topics.last_run,
                value_template="{{ value_json.backend or 'local' }}",
                json_attributes_topic=topics.last_run,
                # The cluster's address, workers, CPUs and GPUs; nothing for a local run.
                json_attributes_template="{{ (value_json.cluster or {}) | tojson }}",
                entity_category="diagnostic",
                icon="mdi:server-network",
            ),
            component(
                "model",
                "sensor",
                "Current model",
                state_topic=topics.model,
                value_template="{{ value_json.run_id or 'none' }}",
                json_attributes_topic=topics.model,
                entity_category="diagnostic",
                icon="mdi:brain",
            ),
            component(
                "reannounce",
                "button",
                "Re-announce",
                command_topic=topics.reannounce,
                payload_press="PRESS",
                entity_category="diagnostic",
                icon="mdi:bullhorn",
            ),
            component(
                "problem",
                "binary_sensor",
                "Problem",
                state_topic=topics.problem,
                value_template="{{ 'ON' if value_json.problem else 'OFF' }}",
                json_attributes_topic=topics.problem,
                device_class="problem",
                payload_on="ON",
                payload_off="OFF",
                entity_category="diagnostic",
            ),
            *(component(key, platform, name, **options) for key, platform, name, options in controls),
        ]
    )
    components.update(_adapter_components(topics, component))
    components.update(_triggers(topics, instance))
    return DeviceDiscovery(
        device=DeviceInfo(
            identifiers=[instance],
            name="HomeIQ Trainer",
            manufacturer="HomeIQ",
            model="LoRA trainer for Ask AI",
            sw_version=__version__,
        ),
        origin=OriginInfo(name="homeiq-trainer", sw_version=__version__, support_url=SUPPORT_URL),
        availability=[Availability(topic=topics.availability)],
        qos=QOS,
        components=components,
    )


DECISION_OPTIONS = [decision.value for decision in Decision]
TRIGGER_EVENTS = (
    "run_started",
    "run_completed",
    "run_failed",
    "adapter_promoted",
    "adapter_rejected",
    "not_enough_data",
)


def _adapter_components(topics: Topics, component: Callable[..., tuple[str, Component]]) -> dict[str, Component]:
    """The served adapter: an update entity to install a waiting candidate, rollback, its metric, the last decision."""
    return dict(
        [
            component(
                "adapter",
                "update",
                "Ask AI adapter",
                state_topic=topics.adapter,
                command_topic=topics.command,
                payload_install="promote",
                icon="mdi:brain",
            ),
            component(
                "rollback",
                "button",
                "Roll back adapter",
                command_topic=topics.command,
                payload_press="rollback",
                icon="mdi:undo-variant",
            ),
            component(
                "adapter_chrf",
                "sensor",
                "Adapter chrF",
                state_topic=topics.model,
                # 'None' makes it unknown: nothing served, or no chrF (an undefined key would render '' and
                # leave the old value standing, with a template warning in Home Assistant's log).
                value_template="{% set v = (value_json.metrics or {}).get('chrf') %}{{ 'None' if v is none else v }}",
                state_class="measurement",
                suggested_display_precision=1,
                icon="mdi:text-box-check-outline",
            ),
            component(
                "last_decision",
                "sensor",
                "Last decision",
                state_topic=topics.decision,
                value_template="{{ value_json.decision or 'None' }}",
                device_class="enum",
                options=DECISION_OPTIONS,
                json_attributes_topic=topics.decision,
                icon="mdi:scale-balance",
            ),
        ]
    )


def _triggers(topics: Topics, instance: str) -> dict[str, DeviceTrigger]:
    """One device trigger per event on `<base>/event` (payload `{"event": ..., ...}`)."""
    return {
        f"trigger_{event}": DeviceTrigger(
            unique_id=f"{instance}_trigger_{event}",
            topic=topics.event,
            type=event,
            subtype="ask_ai_adapter" if event.startswith("adapter") else "training",
            payload=event,
            value_template="{{ value_json.event }}",
            qos=QOS,
        )
        for event in TRIGGER_EVENTS
    }


def control_entity(control: Control, settings: Settings, topics: Topics) -> tuple[str, Platform, str, dict[str, Any]]:
    """The configuration entity of one control."""
    options: dict[str, Any] = {
        "command_topic": topics.setting_command(control.name),
        "state_topic": topics.settings,
        "value_template": _SETTING_VALUE % control.name,
        "json_attributes_topic": topics.settings,
        "json_attributes_template": _SETTING_PINNED_BY % control.name,
        "entity_category": "config",
        "icon": control.icon,
    }
    if control.platform == "number":
        # Box mode: a slider cannot reach 0.0003 or 200,000, and a box takes scientific notation.
        options.update(number_limits(control, settings), mode="box", unit_of_measurement=control.unit)
    else:
        options["options"] = select_options(control, settings)
    return control.name, control.platform, control.label, options

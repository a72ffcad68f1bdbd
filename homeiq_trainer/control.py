"""The settings Home Assistant shows and changes: one table of controls, and the panel that applies them.

Each control is a setting of the one settings schema: its range, choices and error messages come from
there. Knows nothing about paho: the app hands it a payload and publishes what it returns.
"""

from __future__ import annotations

import json
import logging
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import SimpleNamespace
from typing import Any, Literal

import annotated_types

from homeiq_trainer.messages import ErrorInfo, Response
from homeiq_trainer.overrides import (
    OverridesStore,
    SettingRefused,
    apply_overrides,
    field_info,
    value_at,
    with_value,
)
from homeiq_trainer.settings import Settings

_LOGGER = logging.getLogger(__name__)

# Home Assistant's MQTT number refuses a smaller step; box mode still takes any value typed in.
NUMBER_STEP_MIN = 0.001
MAX_SETTING_PAYLOAD_BYTES = 1024


class SettingPinned(SettingRefused):
    """The command line or the environment fixes this setting."""


@dataclass(frozen=True)
class Control:
    """One configuration entity: a setting of the schema shown as a number or a select."""

    name: str
    """Entity key, unique-id suffix and topic segment (`<base>/settings/<name>/set`)."""
    path: str
    """The setting it changes, as a dotted path of the settings schema."""
    platform: Literal["number", "select"]
    label: str
    icon: str
    unit: str | None = None
    options: Callable[[Settings], Sequence[str]] | None = None
    """Choices of a select, from the configured settings; default: the field's `Literal` values."""


def _allowed_base_models(settings: Settings) -> Sequence[str]:
    return settings.allowed_base_models()


# The whole list of configuration entities. An entry whose setting does not exist in this version
# is skipped, so an entity can be listed here before the setting it controls is built.
CONTROLS: tuple[Control, ...] = (
    Control("epochs", "training.epochs", "number", "Epochs", "mdi:repeat"),
    Control("max_samples", "data.max_samples", "number", "Max samples", "mdi:database-arrow-down", unit="samples"),
    Control("learning_rate", "training.learning_rate", "number", "Learning rate", "mdi:speedometer"),
    Control("batch_size", "training.batch_size", "number", "Batch size", "mdi:view-grid-outline", unit="examples"),
    Control("batch_tokens", "training.batch_tokens", "number", "Token budget", "mdi:view-grid", unit="tokens"),
    Control(
        "min_new_samples",
        "daemon.min_new_samples",
        "number",
        "Min new samples (automations)",
        "mdi:database-plus",
        unit="samples",
    ),
    Control("base_model", "training.base_model", "select", "Base model", "mdi:brain", options=_allowed_base_models),
    Control("promotion_policy", "promotion.policy", "select", "Promotion policy", "mdi:check-decagram"),
    Control("log_level", "log_level", "select", "Log level", "mdi:math-log"),
)


def active_controls() -> tuple[Control, ...]:
    """The controls whose setting exists in this version."""
    return tuple(control for control in CONTROLS if field_info(control.path) is not None)


def select_options(control: Control, configured: Settings) -> list[str]:
    """The choices of a select control."""
    if control.options is not None:
        return [str(option) for option in control.options(configured)]
    field = field_info(control.path)
    annotation = field.annotation if field else None
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    if typing.get_origin(annotation) is not Literal:
        raise TypeError(f"{control.path} is neither a Literal nor an Enum; give its control an options function")
    return [str(option) for option in typing.get_args(annotation)]


def number_limits(control: Control, configured: Settings) -> dict[str, float]:
    """`min`, `max` and `step` of a number control: the schema's bounds, narrowed by `limits.*` where they apply."""
    field = field_info(control.path)
    assert field is not None
    whole = field.annotation is int or set(typing.get_args(field.annotation)) == {int, type(None)}
    limits: dict[str, float] = {"step": 1 if whole else NUMBER_STEP_MIN}
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            limits["min"] = bound.ge  # type: ignore[assignment]
        elif isinstance(bound, annotated_types.Gt):
            limits["min"] = bound.gt  # type: ignore[assignment]
        elif isinstance(bound, annotated_types.Le):
            limits["max"] = bound.le  # type: ignore[assignment]
        elif isinstance(bound, annotated_types.Lt):
            limits["max"] = bound.lt  # type: ignore[assignment]
    low, high = configured.limits.range_of(control.name)
    own = value_at(configured, control.path)  # the configured value may lie beyond them: it stays showable
    if low is not None:
        limits["min"] = min(max(limits.get("min", low), low), own)
    if high is not None:
        limits["max"] = max(min(limits.get("max", high), high), own)
    if "min" in limits and "max" in limits and limits["max"] <= limits["min"]:
        # Limits that allow one value (`limits.max_epochs = 1` with `training.epochs = 1`): Home
        # Assistant refuses a number whose min is not below its max, and so did our discovery. One step
        # more is shown, and refused by the limit when set.
        limits["max"] = limits["min"] + limits["step"]
    return limits


def beyond_limits(control: Control, value: Any, configured: Settings) -> str | None:
    """Which `limits.*` a value of this control breaks, or None: Home Assistant's settings are MQTT
    input too, and a plain `start` trains with them, so they get the ceilings a `start` gets. The
    configured value itself (the owner's, as the CLI's) passes; what is not a number is the schema's to refuse."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value == value_at(configured, control.path):
        return None
    return configured.limits.refusal(SimpleNamespace(**{control.name: value}))


def apply_log_level(level: str) -> None:
    """Change the daemon's logging threshold at once (the root logger's, which every handler follows)."""
    logging.getLogger().setLevel(level)


def parse_value(payload: bytes) -> Any:
    """A command payload as the schema should see it: a JSON number (`3e-4`, `NaN` too) or the text."""
    if len(payload) > MAX_SETTING_PAYLOAD_BYTES:
        raise SettingRefused(f"value is longer than {MAX_SETTING_PAYLOAD_BYTES} bytes")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingRefused("value is not valid UTF-8") from None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float) and not isinstance(value, bool) else text


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        value = value.value
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


class SettingsPanel:
    """The values the next run uses, which of them are pinned, and changes from Home Assistant."""

    def __init__(self, configured: Settings, store: OverridesStore, pinned: Mapping[str, str]) -> None:
        self.configured = configured
        self.store = store
        self.pinned = dict(pinned)
        self.controls = {control.name: control for control in active_controls()}
        self._lock = threading.Lock()
        self._pinned_refusals_logged: set[str] = set()
        stored = store.load()
        ignored = {}
        for control in self.controls.values():
            value = stored.get(control.path)
            if control.platform == "select" and value is not None and str(value) not in self.options(control):
                # Chosen when it was allowed; the configuration has taken it off the list since.
                ignored[control.path] = f"{value!r} is no longer one of the choices"
                del stored[control.path]
            elif control.platform == "number" and (beyond := beyond_limits(control, value, configured)):
                ignored[control.path] = beyond  # set before the limit was lowered (or before limits applied here)
                del stored[control.path]
        self.effective, refused = apply_overrides(configured, stored, self.pinned)
        ignored.update(refused)
        for path, why in ignored.items():
            _LOGGER.warning("Ignoring the value set from Home Assistant for %s: %s", path, why)
        for path in sorted(stored.keys() - ignored.keys()):
            wins, configured_value = value_at(self.effective, path), value_at(configured, path)
            if wins != configured_value:  # so an edited option that seems to do nothing is explained
                _LOGGER.info(
                    "%s is %s, set from Home Assistant; the configuration's %s applies again once it is set there",
                    path,
                    _jsonable(wins),
                    _jsonable(configured_value),
                )

    def options(self, control: Control) -> list[str]:
        """The choices of a select control, from the configured (not the changed) settings."""
        return select_options(control, self.configured)

    def state(self) -> dict[str, Any]:
        """The retained `<base>/settings` payload: each control's value, and what pins it (or null)."""
        with self._lock:
            settings = self.effective
        state: dict[str, Any] = {name: _jsonable(value_at(settings, c.path)) for name, c in self.controls.items()}
        state["pinned"] = {name: self.pinned.get(c.path) for name, c in self.controls.items()}
        return state

    def change(self, name: str, payload: bytes) -> tuple[Control, Any]:
        """Validate, store and apply one value; returns the control and the value now in force."""
        control = self.controls.get(name)
        if control is None:
            raise SettingRefused(f"unknown setting {name!r}; known: {', '.join(self.controls)}")
        if control.path in self.pinned:
            message = (
                f"{control.path} is pinned by {self.pinned[control.path]}; remove it there and restart "
                "to change it from Home Assistant"
            )
            if control.path not in self._pinned_refusals_logged:
                self._pinned_refusals_logged.add(control.path)
                _LOGGER.warning("Refused a change from Home Assistant: %s", message)
            raise SettingPinned(message)
        value = parse_value(payload)
        with self._lock:
            changed = with_value(self.effective, control.path, value)
            new_value = value_at(changed, control.path)
            if control.platform == "select":
                options = self.options(control)
                if str(_jsonable(new_value)) not in options:
                    raise SettingRefused(f"invalid setting: {control.path}: must be one of {', '.join(options)}")
            elif beyond := beyond_limits(control, new_value, self.configured):
                raise SettingRefused(f"invalid setting: {control.path}: {beyond}")
            self.store.set(control.path, _jsonable(new_value))
            self.effective = changed
        _LOGGER.info("%s set to %s from Home Assistant", control.path, new_value)
        return control, new_value

    def answer(self, name: str, payload: bytes) -> Response:
        """`change`, applied (the log level at once) or refused, as the response to publish.

        `data.setting` is the name of the topic the value came on, whatever the answer; an applied value
        also says its configuration `path` and the `value` as stored.
        """
        try:
            control, value = self.change(name, payload)
        except SettingRefused as exc:
            code = "setting_pinned" if isinstance(exc, SettingPinned) else "invalid_setting"
            if code == "invalid_setting":  # a pinned refusal is logged once, by `change`
                _LOGGER.warning("Refused a change from Home Assistant: %s", exc)
            error = ErrorInfo(code=code, message=str(exc))
            return Response(request_id=None, action="set", status="error", data={"setting": name}, error=error)
        except Exception as exc:  # the history database refused the write (locked, server gone): nothing changed
            _LOGGER.exception("Could not store %s from Home Assistant", name)
            error = ErrorInfo(code="internal_error", message=f"not stored: {type(exc).__name__}; nothing changed")
            return Response(request_id=None, action="set", status="error", data={"setting": name}, error=error)
        if control.path == "log_level":
            apply_log_level(value)
        data = {"setting": name, "path": control.path, "value": value}
        return Response(request_id=None, action="set", status="ok", data=data)

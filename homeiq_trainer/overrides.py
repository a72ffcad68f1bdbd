"""Settings changed from Home Assistant: kept in our own database, checked by the settings schema.

Precedence, first wins: command line, environment, values set from Home Assistant (stored here),
add-on options, TOML file, defaults. A value the command line or the environment gives is *pinned*:
Home Assistant cannot change it, and a stored value for it is ignored while it is pinned.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from sqlalchemy import JSON, Column
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from homeiq_trainer.history import create_safely, create_tables
from homeiq_trainer.messages import utcnow
from homeiq_trainer.settings import Settings, describe_validation_error

_LOGGER = logging.getLogger(__name__)

ENV_PREFIX = "HOMEIQ_"
ENV_NESTED_DELIMITER = "__"


class SettingRefused(Exception):
    """A value for a setting that cannot be taken; the message says why (the schema's words)."""


class SettingOverride(SQLModel, table=True):
    """One setting changed from Home Assistant."""

    __tablename__ = "trainer_setting_overrides"

    key: str = Field(primary_key=True, max_length=128)
    """Dotted settings path, such as `training.epochs`."""
    value: Any = Field(sa_column=Column(JSON, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class OverridesStore:
    """The stored values, in the history database beside `training_runs` (never in the user's TOML)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        table = SettingOverride.__table__  # type: ignore[attr-defined]
        create_safely(lambda: create_tables(engine, [table]))
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        """Every stored value by settings path."""
        with self._lock, Session(self._engine) as session:
            return {row.key: row.value for row in session.exec(select(SettingOverride))}

    def set(self, key: str, value: Any) -> None:
        """Store (or replace) one value."""
        with self._lock, Session(self._engine) as session:
            session.merge(SettingOverride(key=key, value=value, updated_at=utcnow()))
            session.commit()

    def remove(self, key: str) -> None:
        """Forget one value (the configured one applies again)."""
        with self._lock, Session(self._engine) as session:
            row = session.get(SettingOverride, key)
            if row is not None:
                session.delete(row)
                session.commit()


# --- the settings schema, addressed by dotted path ----------------------------------------------


def _section_model(name: str) -> type[BaseModel] | None:
    field = Settings.model_fields.get(name)
    annotation = field.annotation if field else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def field_info(path: str) -> FieldInfo | None:
    """The schema's field for a dotted path (`training.epochs`, `log_level`), or None if there is none."""
    *sections, name = path.split(".")
    model: type[BaseModel] = Settings
    for section in sections:
        field = model.model_fields.get(section)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model.model_fields.get(name)


def value_at(settings: Settings, path: str) -> Any:
    """The value of one setting."""
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def with_value(settings: Settings, path: str, value: Any) -> Settings:
    """A copy with one value changed, validated by the same schema as the TOML; `SettingRefused` if invalid."""
    data = settings.model_dump()
    *sections, name = path.split(".")
    target = data
    for section in sections:
        target = target[section]
    target[name] = value
    try:
        # model_validate checks the data alone: no environment, add-on or TOML source is read again.
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingRefused(describe_validation_error(exc, "invalid setting")) from None


# --- pinned values ------------------------------------------------------------------------------


def pinned_settings(env: Mapping[str, str], command_line: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Settings paths the command line or the environment fix, each with what fixes it."""
    pinned: dict[str, str] = {}
    for key in env:
        upper = key.upper()  # pydantic-settings matches names in any case
        if not upper.startswith(ENV_PREFIX):
            continue
        rest = upper[len(ENV_PREFIX) :].lower()
        source = f"the environment variable {key}"
        if ENV_NESTED_DELIMITER in rest:
            pinned[rest.replace(ENV_NESTED_DELIMITER, ".")] = source
        elif _section_model(rest) is not None:
            # A whole section as JSON, e.g. HOMEIQ_TRAINING='{"epochs": 5}'.
            try:
                values = json.loads(env[key])
            except ValueError:
                continue
            if isinstance(values, dict):
                pinned.update({f"{rest}.{name}": source for name in values})
        elif rest in Settings.model_fields:
            pinned[rest] = source
    for path in _flatten(command_line or {}):
        pinned[path] = "the command line"
    return pinned


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            paths += _flatten(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def apply_overrides(
    settings: Settings, overrides: Mapping[str, Any], pinned: Mapping[str, str]
) -> tuple[Settings, dict[str, str]]:
    """The settings with each stored value applied, and the values left out with why."""
    ignored: dict[str, str] = {}
    for path, value in overrides.items():
        if path in pinned:
            ignored[path] = f"pinned by {pinned[path]}"
        elif field_info(path) is None:
            ignored[path] = "no such setting in this version"
        else:
            try:
                settings = with_value(settings, path, value)
            except SettingRefused as exc:
                ignored[path] = str(exc)
    return settings, ignored

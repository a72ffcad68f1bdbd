"""One declaration per training parameter: settings, command params, CLI and add-on all take its bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from homeiq_trainer.addon import OPTION_MAP
from homeiq_trainer.cli import build_parser
from homeiq_trainer.messages import TrainParams
from homeiq_trainer.parameters import PARAMETERS, TrainingParameter
from homeiq_trainer.settings import ConfigError, load_settings

ADDON_CONFIG = Path(__file__).resolve().parents[1] / "addon" / "config.yaml"


def _edges(declared: TrainingParameter) -> tuple[float, float, float, float]:
    """The lowest and highest allowed values, and the nearest refused ones on each side."""
    low = declared.ge if declared.ge is not None else 0
    if declared.kind is int:
        return low, declared.le, low - 1, declared.le + 1  # type: ignore[operator,return-value]
    high = declared.le if declared.le is not None else declared.lt * 0.999  # type: ignore[operator]
    above = declared.lt if declared.lt is not None else declared.le * 1.001  # type: ignore[operator]
    return low, high, low - 1e-9, above


@pytest.mark.parametrize("declared", PARAMETERS, ids=lambda p: p.name)
def test_command_params_and_settings_take_the_declared_bounds(declared: TrainingParameter) -> None:
    low, high, below, above = _edges(declared)
    for value in (low, high):
        assert getattr(TrainParams(**{declared.name: declared.kind(value)}), declared.name) == declared.kind(value)
        settings = load_settings(None, {declared.section: {declared.key: declared.kind(value)}})
        assert getattr(getattr(settings, declared.section), declared.key) == declared.kind(value)
    for value in (below, above):
        with pytest.raises(ValidationError):
            TrainParams(**{declared.name: declared.kind(value)})
        with pytest.raises(ConfigError, match=f"{declared.section}.{declared.key}"):
            load_settings(None, {declared.section: {declared.key: declared.kind(value)}})


@pytest.mark.parametrize("declared", PARAMETERS, ids=lambda p: p.name)
def test_train_has_an_option_for_every_parameter(declared: TrainingParameter) -> None:
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    option = f"--{declared.name.replace('_', '-')}"
    action = next(a for a in train._actions if option in a.option_strings)
    assert action.type is declared.kind and declared.bounds_text() in (action.help or "")


@pytest.mark.parametrize("declared", [p for p in PARAMETERS if p.addon_option], ids=lambda p: p.name)
def test_the_add_on_form_has_the_declared_bounds(declared: TrainingParameter) -> None:
    schema = yaml.safe_load(ADDON_CONFIG.read_text(encoding="utf-8"))["schema"]
    assert OPTION_MAP[declared.addon_option] == (declared.section, declared.key)  # type: ignore[index]
    match = re.fullmatch(r"(int|float)\(([^,]*),([^)]*)\)", schema[declared.addon_option])
    assert match, schema[declared.addon_option]
    kind, low, high = match.groups()
    assert kind == declared.kind.__name__
    assert (float(low), float(high)) == (declared.ge, declared.le)

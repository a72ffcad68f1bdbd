"""Every per-run training parameter, declared once: its settings key, its bounds and its help.

The settings fields, a command's `params`, the `train` CLI options and the add-on's form are built
from (or, for the add-on's YAML, checked against) this one table, so a bound cannot drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field


@dataclass(frozen=True)
class TrainingParameter:
    """One parameter a run may override."""

    name: str
    """Its name in a command's `params` and, with dashes, as a `train` option."""
    section: str
    """The settings section that holds its configured value."""
    key: str
    """Its key in that section."""
    kind: type[int] | type[float]
    help: str
    ge: float | None = None
    le: float | None = None
    lt: float | None = None
    addon_option: str | None = None
    """The add-on form's option for it, if the form offers it."""

    def field(self, default: Any) -> Any:
        """A pydantic field with these bounds and this help."""
        return Field(default, ge=self.ge, le=self.le, lt=self.lt, description=self.help)

    def bounds_text(self) -> str:
        """The bounds as a person reads them."""
        low = "" if self.ge is None else f"{self.ge:g} ≤ "
        high = f" ≤ {self.le:g}" if self.le is not None else (f" < {self.lt:g}" if self.lt is not None else "")
        return f"{low}{self.name}{high}"

    def addon_schema(self) -> str:
        """The Supervisor's schema element for it (inclusive bounds only)."""
        if self.lt is not None or self.ge is None or self.le is None:
            raise ValueError(f"{self.name} has no inclusive bounds the add-on schema can say")
        return f"{self.kind.__name__}({self.ge:g},{self.le:g})"


PARAMETERS: tuple[TrainingParameter, ...] = (
    TrainingParameter("epochs", "training", "epochs", int, "passes over the training split",
                      ge=1, le=100, addon_option="epochs"),
    TrainingParameter("max_samples", "data", "max_samples", int, "most usable examples per run, newest first",
                      ge=1, le=1_000_000, addon_option="max_samples"),
    TrainingParameter("learning_rate", "training", "learning_rate", float, "peak AdamW learning rate",
                      ge=1e-6, le=1.0, addon_option="learning_rate"),
    TrainingParameter("batch_size", "training", "batch_size", int, "most examples per micro-batch",
                      ge=1, le=512, addon_option="batch_size"),
    TrainingParameter("lora_r", "lora", "r", int, "rank of the LoRA update matrices",
                      ge=1, le=256, addon_option="lora_rank"),
    TrainingParameter("lora_alpha", "lora", "alpha", int, "LoRA scaling numerator (alpha / r)", ge=1, le=1024),
    TrainingParameter("lora_dropout", "lora", "dropout", float, "dropout on the LoRA path", ge=0.0, lt=1.0),
)  # fmt: skip
BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}


def parameter(name: str) -> TrainingParameter:
    """The declaration of one parameter."""
    return BY_NAME[name]


def section_overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"epochs": 2, "lora_r": 8}` as settings updates: `{"training": {"epochs": 2}, "lora": {"r": 8}}`."""
    updates: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        declared = BY_NAME[name]
        updates.setdefault(declared.section, {})[declared.key] = value
    return updates

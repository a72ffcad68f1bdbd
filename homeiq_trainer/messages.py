"""The shapes that travel: run statuses, phases, training events and results.

Everything that crosses a process boundary (training child → daemon), goes out on MQTT or is written
beside an adapter (`training_run.json`, `current.json`) is defined here, so the JSON shapes live in one
place.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from homeiq_trainer.parameters import parameter

RUN_ID_PATTERN = r"^run_\d{8}_\d{6}(_\d{1,6})?$"  # the suffix: same-second runs, or a clock set back
RESUME_FROM_PATTERN = rf"^(latest|{RUN_ID_PATTERN[1:-1]})$"
# One rule for request ids everywhere (commands, answers to refused commands, the idempotency memory):
# printable ASCII only, so every answer serialises whatever a sender put in the id.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:@/+-]{1,128}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity (at any depth) replaced by None: JSON never carries NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


E = TypeVar("E", bound=StrEnum)


def first_line(error: BaseException) -> str:
    """An exception's first line: libraries put the cause there and details (or more) after it."""
    return (str(error).strip().splitlines() or [""])[0]


def known(kind: type[E], value: str | None) -> E | None:
    """`value` as a member of `kind`; None when empty or none of them (a stored row from a newer version)."""
    try:
        return kind(value) if value else None
    except ValueError:
        return None


class RunStatus(StrEnum):
    """Where a run stands; the first two are active."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (RunStatus.QUEUED, RunStatus.RUNNING)


class Decision(StrEnum):
    """What became of a finished run's adapter."""

    PROMOTED = "promoted"
    KEPT_CURRENT = "kept_current"
    AWAITING_APPROVAL = "awaiting_approval"
    NOT_PROMOTED_INVALID = "not_promoted_invalid"


class Phase(StrEnum):
    """What a running run is doing."""

    STARTING = "starting"
    LOADING_DATA = "loading_data"
    LOADING_MODEL = "loading_model"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainParams(_Wire):
    """Per-run overrides of the configured training settings (from the CLI or a command)."""

    # Strict: a command saying "epochs": "3" is a mistake worth naming, not something to guess at;
    # and NaN, which fails every range check, is named as what it is.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Bounds and help from the one declaration (parameters.py); a test checks every one is here.
    epochs: int | None = parameter("epochs").field(None)
    max_samples: int | None = parameter("max_samples").field(None)
    learning_rate: float | None = parameter("learning_rate").field(None)
    batch_size: int | None = parameter("batch_size").field(None)
    lora_r: int | None = parameter("lora_r").field(None)
    lora_alpha: int | None = parameter("lora_alpha").field(None)
    lora_dropout: float | None = parameter("lora_dropout").field(None)
    resume_from: str | None = Field(None, pattern=RESUME_FROM_PATTERN, max_length=32)
    base_model: str | None = Field(None, min_length=1, max_length=512)

    @model_validator(mode="after")
    def _lora_shape_comes_from_the_resumed_adapter(self) -> TrainParams:
        if self.resume_from is not None and (self.lora_r, self.lora_alpha, self.lora_dropout) != (None, None, None):
            raise ValueError("lora_r, lora_alpha and lora_dropout come from the resumed adapter; leave them out")
        return self


class DataReport(_Wire):
    """What the data step found."""

    rows_read: int = 0
    examples: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    newest_created_at: datetime | None = None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class PhaseEvent(_Wire):
    """A run entered a phase."""

    kind: Literal["phase"] = "phase"
    phase: Phase
    message: str = ""


class ProgressEvent(_Wire):
    """A training step finished, or (phase `evaluating`) a share of the final scoring of the adapters,
    counted in its own steps: the daemon shows that one in the state's message, never as the run's
    progress, which stays where training left it."""

    kind: Literal["progress"] = "progress"
    step: int
    total_steps: int
    epoch: float
    phase: Literal[Phase.TRAINING, Phase.EVALUATING] = Phase.TRAINING
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None

    @property
    def percent(self) -> float:
        return round(100.0 * self.step / self.total_steps, 1) if self.total_steps else 0.0


class RunResult(_Wire):
    """How a training run ended, as the engine reports it."""

    kind: Literal["result"] = "result"
    run_identifier: str
    status: RunStatus
    base_model: str
    run_dir: str | None = None
    promoted: bool = False
    data: DataReport = Field(default_factory=DataReport)
    train_examples: int = 0
    eval_examples: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    # None where a loss was not finite: JSON has no NaN, and a NaN line would not parse back.
    loss_history: list[dict[str, float | None]] = Field(default_factory=list)
    train_runtime_s: float | None = None
    train_samples_per_second: float | None = None
    padding_efficiency: float | None = None
    device: str | None = None
    cluster: dict[str, Any] | None = None
    """Where a run trained when not here: the Ray cluster's address, workers, CPUs and GPUs."""
    error: str | None = None
    decision: Decision | None = None
    decision_reason: str | None = None
    evaluation: dict[str, Any] | None = None
    samples: list[dict[str, str | None]] = Field(default_factory=list)
    peak_rss_mb: float | None = None

    def reason(self) -> str:
        """The last line of the error (a traceback's is the exception), for one-line displays."""
        lines = (self.error or "").strip().splitlines()
        return lines[-1] if lines else "training failed"


TrainingEvent = Annotated[PhaseEvent | ProgressEvent | RunResult, Field(discriminator="kind")]


class EventEnvelope(_Wire):
    """One line on the child's event pipe."""

    event: TrainingEvent


# --- MQTT commands and state -------------------------------------------------------------------

# `promote` alone serves the candidate offered for install (the update entity's install payload).
PLAIN_COMMANDS = ("start", "cancel", "status", "runs", "promote", "rollback")


def is_request_id(value: object) -> bool:
    """Whether `value` is a well-formed request id."""
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


class StartParams(TrainParams):
    """What a `start` command may set: the per-run overrides plus a new-data threshold."""

    # 0: this start trains whatever arrived, whatever daemon.min_new_samples says.
    min_new_samples: int | None = Field(None, ge=0, le=1_000_000)

    def train_params(self) -> TrainParams:
        return TrainParams.model_validate(self.model_dump(exclude={"min_new_samples"}))


class Command(_Wire):
    """A command on `<base>/command` (plain words become this too)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["start", "cancel", "status", "runs", "promote", "rollback"]
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN)
    triggered_by: str = Field("mqtt", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@ -]+$")
    params: StartParams | None = None
    run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)
    """For `promote`: the run to serve; without it, the candidate offered for install."""

    @model_validator(mode="after")
    def _params_only_for_start(self) -> Command:
        if self.params is not None and self.action != "start":
            raise ValueError(f"params are only accepted with action 'start', not {self.action!r}")
        if self.run_id is not None and self.action != "promote":
            raise ValueError(f"run_id is only accepted with action 'promote', not {self.action!r}")
        return self


class ErrorInfo(_Wire):
    code: str
    message: str


class Response(_Wire):
    """The one answer to every command, on `<base>/response`."""

    request_id: str | None
    action: str | None
    status: Literal["ok", "error"]
    data: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class State(StrEnum):
    """`<base>/state`'s `state`: `idle` before the first run, else the latest run's status."""

    IDLE = "idle"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StatePayload(_Wire):
    """Retained on `<base>/state`."""

    state: State
    run_id: str | None = None
    phase: Phase | None = None
    message: str = ""
    updated_at: datetime = Field(default_factory=utcnow)


class ProgressPayload(_Wire):
    """Retained on `<base>/progress`."""

    run_id: str | None = None
    percent: float = 0.0
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None


class RunSummary(_Wire):
    """One run in the retained `runs` list (compact: the list stays around 2 KB)."""

    run_id: str | None = None
    status: RunStatus | None = None
    triggered_by: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    dataset_size: int | None = None
    final_loss: float | None = None
    promoted: bool | None = None
    decision: Decision | None = None


class RunRecord(RunSummary):
    """One run as `last_run`, the `runs` answer and `homeiq-trainer runs --json` show it.

    Every key is present even before the first run (all null), so Home Assistant's templates find them.
    """

    id: int | None = None
    base_model: str | None = None
    output_dir: str | None = None
    eval_loss: float | None = None
    error: str | None = None
    decision_reason: str | None = None
    evaluation: dict[str, Any] | None = None
    """Both adapters on the held-out examples: `metric`, `candidate`, `served` (see training_run.json)."""
    samples: list[dict[str, str | None]] = Field(default_factory=list)
    """Probe queries with the answers of the adapter in use and of the candidate, clipped."""
    backend: str | None = None
    """Where it trained: `local`, or `ray`."""
    cluster: dict[str, Any] | None = None
    """With `ray`: the cluster's address, workers, CPUs and GPUs."""


class RunsPayload(_Wire):
    """Retained on `<base>/runs`: the newest runs, compact."""

    runs: list[RunSummary]


class RunsAnswer(_Wire):
    """The `runs` command's data: the newest runs in full."""

    runs: list[RunRecord]


class ModelInfo(_Wire):
    """Retained on `<base>/model`: what `latest` points to (`run_id` null when nothing does)."""

    run_id: str | None = None
    path: str | None = None
    base_model: str | None = None
    trained_at: str | None = None
    samples_used: int | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    directory: str | None = None
    metrics: dict[str, float | None] | None = None
    promoted_at: str | None = None


class _File(BaseModel):
    # Files outlive versions: keys a newer or older version wrote are ignored, and any may be missing.
    model_config = ConfigDict(extra="ignore")


class RunMetadata(_File):
    """`training_run.json`, written beside the adapter when a run completes and read back by this model."""

    run_id: str | None = None
    base_model: str | None = None
    samples_used: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    run_directory: str | None = None
    trained_at: str | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    train_runtime_s: float | None = None
    train_samples_per_second: float | None = None
    padding_efficiency: float | None = None
    device: str | None = None
    precision: str | None = None
    backend: str | None = None
    cluster: dict[str, Any] | None = None
    steps: int | None = None
    peak_rss_mb: float | None = None
    eval_history: list[dict[str, float | None]] = Field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool | None = None
    data: DataReport | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    loss_history: list[dict[str, float | None]] = Field(default_factory=list)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    samples: list[dict[str, str | None]] = Field(default_factory=list)
    decision: Decision | None = None
    decision_reason: str | None = None
    trainer_version: str | None = None


class ServedAdapter(_File):
    """`current.json`: the adapter `latest` serves, for readers that cannot follow symlinks."""

    run_id: str | None = None
    directory: str | None = None
    base_model: str | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)
    trained_at: str | None = None
    samples_used: int | None = None
    promoted_at: str | None = None


NOT_SERVED = "none"
"""The update entity's version while no adapter is served: Home Assistant rejects a null version."""


class AdapterUpdate(_Wire):
    """Retained on `<base>/adapter`: the "Ask AI adapter" update entity (Home Assistant reads these keys).

    Home Assistant throws away the whole message when a version is null, and shows no Install button
    while the installed version is unknown; so "none" stands in, and differs from any run identifier.
    """

    installed_version: str = NOT_SERVED
    latest_version: str = NOT_SERVED
    title: str = "Ask AI adapter"
    release_summary: str = Field("", max_length=255)


class DecisionInfo(_Wire):
    """Retained on `<base>/decision`: the newest run's decision (all null before the first)."""

    decision: Decision | None = None
    reason: str | None = None
    run_id: str | None = None
    promoted: bool | None = None


TriggerName = Literal[
    "run_started", "run_completed", "run_failed", "adapter_promoted", "adapter_rejected", "not_enough_data"
]


class TriggerEvent(_Wire):
    """One message on `<base>/event` (not retained): what the device triggers fire on."""

    event: TriggerName
    run_id: str | None = None
    reason: str | None = None
    new_samples: int | None = None
    required: int | None = None


class StatusAnswer(_Wire):
    """The `status` command's data: the state and progress last published."""

    state: StatePayload
    progress: ProgressPayload

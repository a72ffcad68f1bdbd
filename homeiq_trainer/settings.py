"""Settings: one root object from TOML, the environment and (in the add-on) the UI options."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL

from homeiq_trainer.database import database_url, is_postgres, same_database
from homeiq_trainer.parameters import parameter

CONFIG_ENV = "HOMEIQ_CONFIG"
REVEAL_SECRETS = "reveal_secrets"
"""`model_dump(context={REVEAL_SECRETS: True})` writes secrets that a training process needs in clear."""

_LOGGER = logging.getLogger(__name__)


def _reveal_if_asked(value: SecretStr, info: SerializationInfo) -> str:
    return value.get_secret_value() if (info.context or {}).get(REVEAL_SECRETS) else str(value)


Secret = Annotated[SecretStr, PlainSerializer(_reveal_if_asked, when_used="json")]
"""A secret setting: masked in repr and in JSON dumps, in clear only in a JSON dump with `REVEAL_SECRETS`
(the daemon's to its training process, which reads the database URLs and the Ray token from it)."""

DEFAULT_BASE_MODEL = "google/flan-t5-small"
DEFAULT_INSTANCE_ID = "homeiq_trainer"
DEFAULT_BASE_TOPIC = "homeiq/trainer"


def _default_client_id() -> str:
    return f"homeiq-trainer-{socket.gethostname()}"


class _Section(BaseModel):
    # NaN passes no range check ("NaN <= 1" is false), so say what it is: not a finite number.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any, info: Any) -> Any:
        # Path("") is Path("."): an empty path would silently mean the working directory.
        field = cls.model_fields[info.field_name]
        if isinstance(value, str) and not value.strip() and field.annotation in (Path, Path | None):
            raise ValueError("must not be empty (leave the key out for the default)")
        return value


class DataSettings(_Section):
    """Where the training examples come from."""

    source: Secret = SecretStr("")
    """HomeIQ's database as a SQLAlchemy URL or SQLite path; wins over `source_db` when set. Opened read-only."""
    source_db: Path = Path("data/ai_automation.db")
    """HomeIQ's SQLite database holding `ask_ai_queries`; opened read-only."""
    source_password: Secret = SecretStr("")
    """Password for a `source` URL that carries none (the add-on's password field)."""
    source_schema: str = Field("", pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,62})?$")
    """PostgreSQL schema of `ask_ai_queries`; empty: `automation`, then `public`."""
    exclude_sources: tuple[str, ...] = ("keyword_match",)
    """Suggestion sources never used as targets (`keyword_match` is HomeIQ's canned template text)."""
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    """How long to wait for a PostgreSQL server to answer, in seconds."""
    max_samples: int = parameter("max_samples").field(2000)
    eval_fraction: float = Field(0.1, ge=0.0, le=0.5)
    """Share of examples held out (never trained on) for eval_loss and the quality gate; 0 needs a policy
    other than if_better."""
    min_eval_examples: int = Field(20, ge=1, le=100_000)
    """Below this many examples there is no evaluation (the held-out examples are still left out of training)."""
    busy_timeout_s: float = Field(10.0, gt=0, le=600)
    """How long to wait for HomeIQ's writers (PostgreSQL: for each statement) before a clear error, in seconds."""

    @field_validator("source")
    @classmethod
    def _source_url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            database_url(value.get_secret_value())  # fails early on a URL we cannot read
        return value

    def source_url(self) -> URL:
        """The source as a SQLAlchemy URL (password included: show it only through `database.masked`)."""
        if not self.source.get_secret_value():
            return database_url(self.source_db)
        return database_url(self.source.get_secret_value(), self.source_password.get_secret_value() or None)


class StorageSettings(_Section):
    """Where homeiq-trainer keeps what it writes."""

    history: Secret = SecretStr("")
    """homeiq-trainer's own history as a SQLAlchemy URL or SQLite path; wins over `history_db`."""
    history_db: Path = Path("data/homeiq_trainer.db")
    """homeiq-trainer's own SQLite database with the `training_runs` table."""
    homeiq_runs: bool = False
    """Also record each finished run in HomeIQ's own `automation.training_runs` (its admin page)."""
    homeiq_runs_url: Secret = SecretStr("")
    """PostgreSQL URL for `homeiq_runs` (a role with INSERT there); empty: the source's database."""
    output_dir: Path = Path("data/ask_ai_soft_prompt")
    """Run directories and the `latest` symlink go here."""
    keep_runs: int = Field(5, ge=1, le=1000)
    """Newest run directories kept; the one `latest` points to is never deleted."""
    keep_history_rows: int = Field(1000, ge=10, le=1_000_000)
    """Newest history rows kept; older ones are pruned when a run ends (never the served run's)."""

    @field_validator("history", "homeiq_runs_url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            database_url(value.get_secret_value())
        return value

    def history_url(self) -> URL:
        """The history as a SQLAlchemy URL."""
        return database_url(self.history.get_secret_value() or self.history_db)


class LoraSettings(_Section):
    """LoRA adapter shape (HomeIQ's defaults)."""

    r: int = parameter("lora_r").field(16)
    alpha: int = parameter("lora_alpha").field(16)
    dropout: float = parameter("lora_dropout").field(0.0)
    target_modules: tuple[str, ...] = ("q", "v")
    """Module names that get adapters (T5: q, k, v, o, wi, wo)."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not name.strip() for name in value):
            raise ValueError("needs at least one non-empty module name")
        return value


class TrainingSettings(_Section):
    """How a run trains."""

    base_model: str = DEFAULT_BASE_MODEL
    """Hugging Face hub id or local directory of a seq2seq model."""
    allowed_base_models: tuple[str, ...] = ()
    """Extra base models a command may ask for; `base_model` is always allowed."""
    epochs: int = parameter("epochs").field(3)
    learning_rate: float = parameter("learning_rate").field(1e-3)
    batch_size: int = parameter("batch_size").field(64)
    batch_tokens: int = Field(512, ge=64, le=1_048_576)
    """Padded tokens (source + target, rows × longest) per micro-batch.

    Length-grouped examples fill each batch up to this budget, so short examples make big batches and
    long ones small batches of bounded memory; an example longer than the budget trains alone. The
    loss is the mean over a step's target tokens, so a step averages ~batch_tokens / 3 tokens whatever
    the example count: when you raise batch_tokens k-fold, raise `learning_rate` by about √k (Adam's
    square-root rule) or expect slower progress per epoch; lowering it works the other way round.
    """
    gradient_accumulation_steps: int = Field(1, ge=1, le=128)
    """Micro-batches per optimizer step."""
    source_max_tokens: int = Field(256, ge=8, le=4096)
    """Instructions are truncated to this many tokens (never padded to it)."""
    target_max_tokens: int = Field(256, ge=8, le=4096)
    """Responses are truncated to this many tokens (never padded to it)."""
    seed: int = Field(42, ge=0, le=2**32 - 1)
    """Seed for the split, the sampler and the weights of the adapter."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA where available, else the CPU (see `precision`)."""
    threads: int = Field(0, ge=0, le=1024)
    """Torch CPU threads; 0 means the cores this process may use."""
    group_by_length: bool = True
    """Batch examples of similar source and target length to avoid padding."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on CUDA where supported, and on CPUs with avx512_bf16 or AMX where a 30 ms probe finds
    bf16 matrix multiplies at least 1.5× as fast as fp32 (bf16 autocast) and at least 6 GiB of memory is
    there (a CPU bf16 run peaks about 0.3 GB higher); else fp32. `fp32` and `bf16` are taken as asked."""
    early_stopping_patience: int = Field(2, ge=0, le=1000)
    """Stop after this many held-out evaluations without a new best; 0 never stops early. The best adapter is kept."""
    eval_every_steps: int = Field(0, ge=0, le=1_000_000)
    """Held-out loss every this many optimizer steps; 0 means at the end of every epoch."""
    backend: Literal["local", "ray"] = "local"
    """`local`: train in the training process on this machine; `ray`: on the Ray cluster in `[ray]`."""


_RAY_BUILTIN = {"cpu": "CPU", "gpu": "GPU"}


class RaySettings(_Section):
    """The Ray cluster that trains when `training.backend` is `ray` (needs `homeiq-trainer[ray]`)."""

    address: str = "ray://localhost:10001"
    """Ray Client address of the cluster's head node, `ray://<host>:<port>`."""
    num_workers: int = Field(1, ge=1, le=256)
    """Training workers (processes under PyTorch DDP), each with its own copy of the model."""
    use_gpu: bool = False
    """Give every worker one GPU (NCCL between workers) instead of CPUs only (gloo)."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Ray resources per worker, e.g. {"CPU": 4, "GPU": 1}; empty: Ray's default (1 CPU, or with use_gpu
    1 GPU and no CPU)."""
    max_failures: int = Field(0, ge=0, le=100)
    """How often a run is restarted from the beginning after a worker died, before it fails."""
    connect_timeout_s: float = Field(15.0, gt=0, le=600)
    """How long to wait for the cluster to accept and answer a connection, in seconds."""
    auth_token: Secret | None = None
    """The cluster's token (`ray get-auth-token` on the head); never logged or published."""

    @field_validator("auth_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        # `auth_token = ""` (the example TOML's line uncommented) would switch Ray's token mode on with no token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("address")
    @classmethod
    def _ray_client_address(cls, value: str) -> str:
        host, _, port = value.removeprefix("ray://").rpartition(":")
        if (
            not value.startswith("ray://")
            or not host
            or not port.isascii()
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            raise ValueError("must be a Ray Client address, ray://<host>:<port>")
        return value

    @field_validator("resources_per_worker")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not name.strip() or amount <= 0 for name, amount in value.items()):
            raise ValueError("needs resource names with amounts above 0")
        # Environment variable names arrive lower-cased (HOMEIQ_RAY__RESOURCES_PER_WORKER__CPU=4 gives
        # "cpu"), and Ray's resource names are case-sensitive: "cpu" would be a custom resource no node has.
        return {_RAY_BUILTIN.get(name.lower(), name): amount for name, amount in value.items()}


class EvaluationSettings(_Section):
    """How a new adapter and the one in use are measured on the held-out examples."""

    max_generate_examples: int = Field(100, ge=0, le=100_000)
    """Held-out examples each adapter generates for the text metric; 0 measures the loss only."""
    max_new_tokens: int = Field(96, ge=1, le=1024)
    """Longest greedy generation, in tokens."""
    probe_queries: tuple[str, ...] = ()
    """Queries shown side by side (in use vs new); empty means the first 5 held-out examples."""

    @field_validator("probe_queries")
    @classmethod
    def _short_queries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > 20 or any(not q.strip() or len(q) > 500 for q in value):
            raise ValueError("at most 20 non-empty queries of at most 500 characters")
        return value


class PromotionSettings(_Section):
    """When a new adapter replaces the one in use."""

    policy: Literal["if_better", "always", "manual"] = "if_better"
    """`if_better`: when its metric beats the one in use; `always`: every finite run; `manual`: never by itself."""
    metric: Literal["chrf", "exact_match", "eval_loss"] = "chrf"
    """What `if_better` compares: chrF (0-100, higher is better), exact match (%), or held-out loss (lower)."""
    min_improvement: float = Field(0.0, ge=0.0, le=100.0)
    """How much better (in the metric's own unit) a new adapter must be; any gain when 0."""


class MqttSettings(_Section):
    """The broker connection and topic layout."""

    host: str = "localhost"
    """Broker host name or address."""
    port: int = Field(1883, ge=1, le=65535)
    """Broker TCP port."""
    username: str | None = None
    """User name, if the broker wants one."""
    password: Secret | None = None
    """Password; never logged or published."""
    tls: bool = False
    """Connect with TLS."""
    ca_certs: Path | None = None
    """CA bundle that signed the broker's certificate (system store when unset)."""
    certfile: Path | None = None
    """Client certificate for mutual TLS."""
    keyfile: Path | None = None
    """Key of the client certificate."""
    tls_insecure: bool = False
    """Skip the broker host name check (not the chain); for self-signed set-ups only."""
    client_id: str = Field(default_factory=lambda: _default_client_id(), min_length=1)
    """MQTT client id; stable and unique per instance (`-<instance_id>` is added to the default where
    `daemon.instance_id` is not the default: two instances with one id would push each other off)."""
    base_topic: str = DEFAULT_BASE_TOPIC
    """Every topic of this instance lives under this prefix; a second instance needs its own."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's MQTT discovery prefix."""
    discovery: bool = True
    """Announce entities to Home Assistant; off clears the retained discovery message."""
    default_entity_ids: bool = True
    """Suggest entity ids (`default_entity_id`, `object_id`); off lets Home Assistant's own entity-id format apply."""
    ha_status_topic: str = "homeassistant/status"
    """Home Assistant's birth/will topic; `online` there makes us re-announce."""
    keepalive_s: int = Field(30, ge=5, le=3600)
    """MQTT keepalive, in seconds."""
    max_queued_messages: int = Field(1000, ge=10, le=100_000)
    """Outgoing messages paho holds while the broker is away; retained state is re-sent on reconnect anyway."""

    @field_validator("base_topic", "discovery_prefix", "ha_status_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        value = value.strip("/")
        if not value or any(ch in value for ch in "#+\0"):
            raise ValueError("must be a non-empty topic without wildcards")
        return value

    @model_validator(mode="after")
    def _tls_options_need_tls(self) -> MqttSettings:
        # Certificates without `tls` would silently connect in plaintext.
        stray = [name for name in ("ca_certs", "certfile", "keyfile", "tls_insecure") if getattr(self, name)]
        if stray and not self.tls:
            raise ValueError(f"{', '.join(stray)} set but tls is false: set mqtt.tls = true, or remove them")
        return self


class LimitsSettings(_Section):
    """Ceilings on what an MQTT `start` may ask for (the CLI may go up to the schema's own bounds)."""

    max_epochs: int = Field(10, ge=1, le=100)
    """Most epochs a command may ask for."""
    max_samples: int = Field(5000, ge=1, le=1_000_000)
    """Most examples a command may ask for."""
    max_batch_size: int = Field(64, ge=1, le=512)
    """Largest batch a command may ask for."""
    min_learning_rate: float = Field(1e-6, gt=0.0, le=1.0)
    """Smallest learning rate a command may ask for."""
    max_learning_rate: float = Field(1e-2, gt=0.0, le=1.0)
    """Largest learning rate a command may ask for."""

    @model_validator(mode="after")
    def _ordered(self) -> LimitsSettings:
        if self.min_learning_rate > self.max_learning_rate:
            raise ValueError("min_learning_rate must not be above max_learning_rate")
        return self

    def range_of(self, parameter: str) -> tuple[float | None, float | None]:
        """(lowest, highest) value of a run parameter (`epochs`, ...) that MQTT may ask for; None: no limit."""
        low, high = _LIMITED.get(parameter, (None, None))
        return (getattr(self, low) if low else None, getattr(self, high) if high else None)

    def refusal(self, params: Any) -> str | None:
        """Which limit a command's parameters break (the first one), or None."""
        for field, names in _LIMITED.items():
            value = getattr(params, field, None)
            if value is None:
                continue
            low, high = self.range_of(field)
            if high is not None and value > high:
                return f"{field} {value:g} is beyond limits.{names[1]} ({high:g})"
            if low is not None and value < low:
                return f"{field} {value:g} is beyond limits.{names[0]} ({low:g})"
        return None


# The run parameters `limits` bounds: (its field for the lowest value, for the highest), None where unbounded.
_LIMITED: dict[str, tuple[str | None, str | None]] = {
    "epochs": (None, "max_epochs"),
    "max_samples": (None, "max_samples"),
    "batch_size": (None, "max_batch_size"),
    "learning_rate": ("min_learning_rate", "max_learning_rate"),
}


class DaemonSettings(_Section):
    """How the MQTT daemon behaves."""

    instance_id: str = Field(DEFAULT_INSTANCE_ID, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Identifies this instance in Home Assistant (device identifier and unique ids)."""
    progress_interval_s: float = Field(0.5, ge=0.1, le=60)
    """Fastest rate of progress messages, in seconds between two."""
    max_payload_bytes: int = Field(16384, ge=64, le=1_048_576)
    """Commands larger than this are refused."""
    stop_timeout_s: float = Field(30.0, ge=1, le=600)
    """How long a cancelled or stopping run may take before its process is killed, in seconds."""
    stall_timeout_s: float = Field(900.0, ge=10, le=86400)
    """A training process silent for this long is considered hung and killed, in seconds."""
    runs_published: int = Field(10, ge=1, le=50)
    """How many runs the retained `runs` topic lists."""
    announce_delay_max_s: float = Field(3.0, ge=0, le=60)
    """Upper bound of the random delay before re-announcing after Home Assistant's birth, in seconds."""
    min_new_samples: int = Field(0, ge=0, le=1_000_000)
    """New usable examples a `start` not sent by the Start button needs when it names none; 0: no threshold."""
    command_queue_size: int = Field(1000, ge=1, le=100_000)
    """Commands waiting for the command thread; beyond this they are answered `overloaded`."""
    commands_per_s: float = Field(50.0, gt=0, le=100_000)
    """Command rate limit: tokens refilled per second; without one a command is answered `rate_limited`."""
    command_burst: int = Field(500, ge=1, le=100_000)
    """Command rate limit: commands accepted at once before the rate applies."""


class Settings(BaseSettings):
    """Everything homeiq-trainer can be told."""

    model_config = SettingsConfigDict(
        env_prefix="HOMEIQ_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging threshold."""
    data: DataSettings = DataSettings()
    storage: StorageSettings = StorageSettings()
    training: TrainingSettings = TrainingSettings()
    lora: LoraSettings = LoraSettings()
    ray: RaySettings = RaySettings()
    mqtt: MqttSettings = MqttSettings()
    daemon: DaemonSettings = DaemonSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    promotion: PromotionSettings = PromotionSettings()
    limits: LimitsSettings = LimitsSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        addon_options = _CONTEXT.get("addon_options")
        if addon_options:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=addon_options))
        toml_file = _CONTEXT.get("toml_file")
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _client_id_per_instance(cls, data: Any) -> Any:
        """A second instance (its own `instance_id`) on the same host gets its own default client id.

        With one id the broker drops one daemon whenever the other connects, and both reconnect each
        second for ever. The default instance keeps the id it always had.
        """
        if not isinstance(data, dict):
            return data
        mqtt, daemon = data.get("mqtt") or {}, data.get("daemon") or {}
        instance = daemon.get("instance_id") if isinstance(daemon, dict) else None
        # The sections arrive with their defaults filled in: the default id is recognised by its value.
        default = isinstance(mqtt, dict) and mqtt.get("client_id", _default_client_id()) == _default_client_id()
        if default and isinstance(instance, str) and instance != DEFAULT_INSTANCE_ID:
            data = {**data, "mqtt": {**mqtt, "client_id": f"{_default_client_id()}-{instance}"}}
        return data

    @model_validator(mode="after")
    def _metric_needs_generations(self) -> Settings:
        # chrF and exact match score generated answers: with none, no run could ever beat the one in use.
        generated = self.promotion.metric in ("chrf", "exact_match")
        if generated and self.evaluation.max_generate_examples == 0 and self.promotion.policy == "if_better":
            raise ValueError(
                f"promotion.metric {self.promotion.metric} scores generated answers, but "
                "evaluation.max_generate_examples is 0: no run could be promoted; generate some, "
                "or use promotion.metric = eval_loss"
            )
        if self.data.eval_fraction == 0 and self.promotion.policy == "if_better":
            raise ValueError(
                "data.eval_fraction is 0 but promotion.policy is if_better: with nothing held out no run "
                "after the first could be compared, so none would be served; hold some out, or use "
                "promotion.policy = always or manual"
            )
        return self

    @model_validator(mode="after")
    def _never_write_homeiqs_database(self) -> Settings:
        if same_database(self.storage.history_url(), self.data.source_url()):
            raise ValueError(
                "storage.history must not be HomeIQ's database (data.source): HomeIQ's database is never written"
            )
        target = self.homeiq_runs_url()
        if self.storage.homeiq_runs and (target is None or not is_postgres(target)):
            raise ValueError("storage.homeiq_runs needs a PostgreSQL data.source or storage.homeiq_runs_url")
        if target is not None and same_database(self.storage.history_url(), target):
            raise ValueError(
                "storage.history must not be HomeIQ's database (storage.homeiq_runs_url): our history tables "
                "would be created there, and only the run record may be written to it"
            )
        return self

    def homeiq_runs_url(self) -> URL | None:
        """Where HomeIQ's own `training_runs` is written, when `storage.homeiq_runs` is on."""
        if not self.storage.homeiq_runs:
            return None
        password = self.data.source_password.get_secret_value() or None
        if self.storage.homeiq_runs_url.get_secret_value():
            return database_url(self.storage.homeiq_runs_url.get_secret_value(), password)
        source = self.data.source_url()
        return source if is_postgres(source) else None

    def allowed_base_models(self) -> tuple[str, ...]:
        """Base models a command may ask for."""
        return (self.training.base_model, *self.training.allowed_base_models)


# Sources need per-call input that pydantic-settings gives no argument for; load_settings sets
# it for the duration of one construction.
_CONTEXT: dict[str, Any] = {}
_CONTEXT_LOCK = threading.Lock()


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    addon_options: dict[str, Any] | None = None,
) -> Settings:
    """Load settings: overrides > environment > add-on options > TOML file > defaults."""
    path = config_file or os.environ.get(CONFIG_ENV) or None
    toml_file = Path(path) if path else None
    if toml_file is not None and not toml_file.is_file():
        what = "is not a file" if toml_file.exists() else "not found"
        raise ConfigError(f"configuration file {what}: {toml_file}")
    for name in os.environ:
        section = name.upper().removeprefix("HOMEIQ_").split("__")[0].lower()
        if name.upper().startswith("HOMEIQ_") and "__" in name and section not in Settings.model_fields:
            # Warned, not refused: another program's HOMEIQ_ variable must not stop the daemon.
            _LOGGER.warning("Ignoring the environment variable %s: %r is no configuration section", name, section)
    with _CONTEXT_LOCK:
        _CONTEXT.update(toml_file=toml_file, addon_options=addon_options)
        try:
            return Settings(**(overrides or {}))
        except ValidationError as exc:
            message = describe_validation_error(exc, "invalid configuration")
            raise ConfigError(message if addon_options is None else _with_addon_option_names(message)) from None
        except SettingsError as exc:  # an environment variable that is not the JSON its list or table needs
            raise ConfigError(
                f"invalid configuration: {exc}: a list or table set as HOMEIQ_<SECTION>__<KEY> must be JSON, "
                'e.g. HOMEIQ_LORA__TARGET_MODULES=\'["q", "v"]\''
            ) from None
        except ValueError as exc:  # TOML syntax errors arrive as tomllib.TOMLDecodeError
            raise ConfigError(f"cannot read {toml_file}: {exc}") from None
        finally:
            _CONTEXT.clear()


def _with_addon_option_names(message: str) -> str:
    """`message` with each settings key an add-on option sets followed by that option's name in the form."""
    from homeiq_trainer.addon import OPTION_MAP

    message = re.sub(r" \(HOMEIQ_\w+\)", "", message)  # an add-on's user sets no environment variables
    for option, path in OPTION_MAP.items():
        key = re.escape(".".join(path))
        # The whole key only: `mqtt.tls` but not inside `mqtt.tls_insecure`.
        message = re.sub(rf"(?<![\w.]){key}(?![\w.])", rf"\g<0> (add-on option {option})", message)
    return message


def _environment_names() -> set[str]:
    """The environment's variable names in upper case, as the settings read them (case-insensitively)."""
    return {name.upper() for name in os.environ}


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One line naming every offending key, without echoing input values (they may be secrets)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc) or "(root)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        env = f"HOMEIQ_{'__'.join(loc).upper()}"
        # The variable is named where it set the value: the same key in a TOML file is named alone.
        shown = f" ({env})" if len(loc) == 2 and what == "invalid configuration" and env in _environment_names() else ""
        parts.append(f"{key}{shown}: {message}")
    return f"{what}: " + "; ".join(parts)

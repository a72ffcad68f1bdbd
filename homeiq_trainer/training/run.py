"""A whole training run as a job: data → training → artifacts → `latest`, the same from CLI and daemon."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homeiq_trainer import __version__
from homeiq_trainer.database import masked
from homeiq_trainer.messages import (
    Decision,
    Phase,
    RunMetadata,
    RunResult,
    RunStatus,
    TrainParams,
    json_safe,
    utcnow,
)
from homeiq_trainer.parameters import section_overrides
from homeiq_trainer.promotion import decide
from homeiq_trainer.settings import Settings
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.artifacts import ArtifactError
from homeiq_trainer.training.data import DataError, SourceOptions, load_examples
from homeiq_trainer.training.engine import (
    Hyperparameters,
    NullObserver,
    RunInputError,
    TrainingObserver,
    TrainOutcome,
    peak_rss_mb,
)
from homeiq_trainer.training.evaluate import split_examples

if TYPE_CHECKING:
    from homeiq_trainer.training.data import Example
    from homeiq_trainer.training.evaluate import Evaluation

_LOGGER = logging.getLogger(__name__)
DIVERGED = "loss diverged"


class RunRefused(Exception):
    """The run's inputs are unusable (bad resume target, base model mismatch); nothing was trained."""


def effective_settings(settings: Settings, params: TrainParams) -> Settings:
    """The configured settings with a run's overrides applied (only the ones it sets)."""
    overrides = params.model_dump(exclude_none=True, exclude={"resume_from", "base_model"})
    sections = section_overrides(overrides)
    if params.base_model is not None:
        sections.setdefault("training", {})["base_model"] = params.base_model
    # The overrides were validated against the same bounds (parameters.py) when `params` was made.
    update = {name: getattr(settings, name).model_copy(update=values) for name, values in sections.items()}
    return settings.model_copy(update=update)


def hyperparameters(settings: Settings, params: TrainParams) -> Hyperparameters:
    """Configured training settings with the per-run overrides applied."""
    effective = effective_settings(settings, params)
    t, lora, data = effective.training, effective.lora, effective.data
    return Hyperparameters(
        base_model=t.base_model,
        epochs=t.epochs,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        source_max_tokens=t.source_max_tokens,
        target_max_tokens=t.target_max_tokens,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
        seed=t.seed,
        device=t.device,
        threads=t.threads,
        eval_fraction=data.eval_fraction,
        min_eval_examples=data.min_eval_examples,
        group_by_length=t.group_by_length,
        batch_tokens=t.batch_tokens,
        precision=t.precision,
        early_stopping_patience=t.early_stopping_patience,
        eval_every_steps=t.eval_every_steps,
    )


REPORTED_FIELDS: set[str] = {
    "final_loss",
    "eval_loss",
    "train_runtime_s",
    "train_samples_per_second",
    "padding_efficiency",
    "decision",
    "decision_reason",
    "evaluation",
    "samples",
    "peak_rss_mb",
}
"""What a completed run's result carries from its `training_run.json`."""


def parameters_record(settings: Settings, params: TrainParams) -> dict[str, Any]:
    """The hyperparameters as stored in the history and `training_run.json`."""
    hp = hyperparameters(settings, params)
    record = {key: getattr(hp, key) for key in hp.__dataclass_fields__}
    record["lora_target_modules"] = list(hp.lora_target_modules)
    record["max_samples"] = effective_settings(settings, params).data.max_samples
    record["resume_from"] = params.resume_from
    record["backend"] = settings.training.backend
    return record


def _train(
    settings: Settings,
    examples: list[Example],
    hp: Hyperparameters,
    save_dir: Path,
    observer: TrainingObserver,
    stop: threading.Event,
    resume_dir: Path | None,
) -> tuple[TrainOutcome, dict[str, Any] | None]:
    """The configured backend trains: this process, or the Ray cluster (then also says which cluster)."""
    if settings.training.backend == "ray":
        from homeiq_trainer.training.ray_backend import train_on_ray

        cluster = settings.ray
        return train_on_ray(examples, hp, save_dir, cluster, observer=observer, stop=stop, resume_adapter=resume_dir)
    from homeiq_trainer.training.engine import train_adapter

    outcome = train_adapter(examples, hp, save_dir, observer=observer, stop=stop, resume_adapter=resume_dir)
    return outcome, None


def _resume_target(settings: Settings, params: TrainParams) -> tuple[Path | None, str | None]:
    if params.resume_from is None:
        return None, None
    try:
        run_dir = artifacts.resolve_run_dir(settings.storage.output_dir, params.resume_from)
    except ArtifactError as exc:
        raise RunRefused(str(exc)) from None
    return run_dir, artifacts.read_metadata(run_dir).base_model


def execute_run(
    settings: Settings,
    params: TrainParams,
    run_identifier: str,
    observer: TrainingObserver | None = None,
    stop: threading.Event | None = None,
) -> RunResult:
    """Run one training job to its end and say how it ended.

    Known failures (bad data, unusable resume target, files that cannot be written, a model that
    cannot be loaded) come back as a `failed` result with a one-line reason; anything else rises.
    """
    # Cheap: the module imports Ray only when a run trains on it.
    from homeiq_trainer.training.ray_backend import ClusterError

    observer = observer or NullObserver()
    stop = stop or threading.Event()
    output_dir = settings.storage.output_dir
    hp = hyperparameters(settings, params)
    result = RunResult(run_identifier=run_identifier, status=RunStatus.RUNNING, base_model=hp.base_model)
    staging = artifacts.staging_dir(output_dir, run_identifier)
    trainer_scratch = artifacts.trainer_scratch_dir(staging)
    try:
        resume_dir, resumed_base = _resume_target(settings, params)
        if resume_dir is not None and resumed_base and params.base_model is None:
            hp = hyperparameters(settings, params.model_copy(update={"base_model": resumed_base}))
            result.base_model = hp.base_model
        elif resume_dir is not None and resumed_base and resumed_base != hp.base_model:
            raise RunRefused(
                f"cannot resume {params.resume_from}: it was trained on {resumed_base}, not {hp.base_model}"
            )
        lora_record: dict[str, Any] = {}
        if resume_dir is not None:
            # The adapter keeps its own shape; record that, not the configured one.
            config = json.loads((resume_dir / "adapter_config.json").read_text(encoding="utf-8"))
            lora_record = {
                "lora_r": config.get("r"),
                "lora_alpha": config.get("lora_alpha"),
                "lora_dropout": config.get("lora_dropout"),
                "lora_target_modules": sorted(config.get("target_modules") or []),
            }

        source = settings.data.source_url()
        observer.phase(Phase.LOADING_DATA, f"reading {masked(source)}")
        examples, report = load_examples(
            source,
            effective_settings(settings, params).data.max_samples,
            options=SourceOptions.from_settings(settings.data),
        )
        result.data = report
        if stop.is_set():
            return result.model_copy(update={"status": RunStatus.CANCELLED})

        output_dir.mkdir(parents=True, exist_ok=True)
        outcome, cluster = _train(settings, examples, hp, staging, observer, stop, resume_dir)
        result = result.model_copy(
            update={
                "cluster": cluster,
                "train_examples": outcome.train_examples,
                "eval_examples": outcome.eval_examples,
                "loss_history": json_safe(outcome.loss_history),
                "device": outcome.device,
            }
        )
        if outcome.cancelled:
            return result.model_copy(update={"status": RunStatus.CANCELLED})

        if not _all_finite(outcome.final_loss, outcome.eval_loss):
            return _diverged(result)
        # Resumed: what the parent learned, this adapter learned too. The gate must not score either
        # adapter on it, so the share held out in the whole lineage is recorded and judged by.
        parent = held_out_fraction(artifacts.read_metadata(resume_dir)) if resume_dir is not None else None
        lineage = hp.eval_fraction if parent is None else min(hp.eval_fraction, parent)
        evaluation = _evaluate(settings, hp, examples, run_identifier, staging, observer, stop, lineage)
        if stop.is_set():
            return result.model_copy(update={"status": RunStatus.CANCELLED})
        if evaluation is not None and not _all_finite(evaluation.candidate.eval_loss):
            return _diverged(result)
        # The adapter the evaluation scored beside this one (`latest` may have moved since, by a promote).
        served_run = evaluation.in_use if evaluation is not None else artifacts.latest_run(output_dir)
        candidate_metrics: dict[str, float | None]
        served_metrics: dict[str, float | None] | None
        if evaluation is None:  # nothing held out: nothing to compare with whatever is in use
            candidate_metrics, served_metrics = {"eval_loss": None}, ({} if served_run else None)
        else:
            candidate_metrics = evaluation.candidate.metrics()
            served_metrics = evaluation.served.metrics() if evaluation.served else None
        not_compared = evaluation.served_note if evaluation is not None else None
        decision, reason = decide(settings.promotion, candidate_metrics, served_metrics, served_run, not_compared)
        evaluation_record = {
            "metric": settings.promotion.metric,
            "compared_with": served_run,
            **(evaluation.record() if evaluation else {}),
        }
        final_dir = output_dir / run_identifier
        metadata = RunMetadata(
            run_id=run_identifier,
            base_model=hp.base_model,
            samples_used=report.examples,
            train_examples=outcome.train_examples,
            eval_examples=outcome.eval_examples,
            epochs=hp.epochs,
            learning_rate=hp.learning_rate,
            run_directory=str(final_dir.resolve()),
            trained_at=utcnow().isoformat(),
            final_loss=outcome.final_loss,
            eval_loss=outcome.eval_loss,
            train_runtime_s=outcome.train_runtime_s,
            train_samples_per_second=outcome.train_samples_per_second,
            padding_efficiency=outcome.padding_efficiency,
            device=outcome.device,
            precision=outcome.precision,
            backend=settings.training.backend,
            cluster=cluster,
            steps=outcome.steps,
            # The larger of this process (evaluation included) and, with Ray, the first worker.
            peak_rss_mb=max(outcome.peak_rss_mb or 0.0, peak_rss_mb()),
            eval_history=outcome.eval_history,
            best_step=outcome.best_step,
            stopped_early=outcome.stopped_early,
            data=report,
            hyperparameters={
                **parameters_record(settings, params.model_copy(update={"base_model": hp.base_model})),
                **lora_record,
                LINEAGE_KEY: lineage,
            },
            loss_history=outcome.loss_history,
            evaluation=evaluation_record,
            samples=evaluation.samples if evaluation else [],
            decision=decision,
            decision_reason=reason,
            trainer_version=__version__,
        )
        artifacts.write_metadata(staging, metadata)
        if stop.is_set():  # asked to stop while the run was being written up: none of it is kept
            return result.model_copy(update={"status": RunStatus.CANCELLED})
        # Only the staged directory is ours to write: the daemon (or `train`) points `latest` at it,
        # if it is chosen, and records the result.
        final_dir = artifacts.finalize(staging, output_dir, run_identifier)
        reported = metadata.model_dump(include=REPORTED_FIELDS)  # the result and the file agree
        return result.model_copy(update={"status": RunStatus.COMPLETED, "run_dir": str(final_dir), **reported})
    except (DataError, ArtifactError, RunRefused, ClusterError, RunInputError) as exc:
        return result.model_copy(update={"status": RunStatus.FAILED, "error": str(exc)})
    except OSError as exc:
        # Disk full, permissions, or a base model that is neither a local directory nor reachable.
        return result.model_copy(update={"status": RunStatus.FAILED, "error": _os_error_line(exc)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trainer_scratch, ignore_errors=True)


def _all_finite(*losses: float | None) -> bool:
    return all(loss is None or math.isfinite(loss) for loss in losses)


def _diverged(result: RunResult) -> RunResult:
    """A run whose loss is not finite: failed, never kept, never promotable."""
    return result.model_copy(
        update={
            "status": RunStatus.FAILED,
            "error": DIVERGED,
            "decision": Decision.NOT_PROMOTED_INVALID,
            "decision_reason": DIVERGED,
        }
    )


def _served_adapter(output_dir: Path, name: str | None, base_model: str) -> tuple[tuple[str, Path] | None, str | None]:
    """(the adapter in use, `name`, if it shares the base model and can be read; a note when not).

    Its base model comes from `training_run.json`, else from peft's `adapter_config.json` (a metadata
    file of another version may not read); where neither names one, it is compared all the same.
    """
    if name is None:
        return None, None
    run_dir = output_dir / name
    base = artifacts.read_metadata(run_dir).base_model or artifacts.adapter_base_model(run_dir)
    if base is not None and base != base_model:
        return None, f"{name} in use was trained on {base}, not {base_model}"
    try:
        artifacts.check_safetensors(run_dir / artifacts.ADAPTER_WEIGHTS)
    except (artifacts.ArtifactError, OSError) as exc:
        return None, f"{name} in use cannot be loaded ({exc})"
    return (name, run_dir), None


def _evaluate(
    settings: Settings,
    hp: Hyperparameters,
    examples: Sequence[Example],
    run_identifier: str,
    staging: Path,
    observer: TrainingObserver,
    stop: threading.Event,
    lineage: float,
) -> Evaluation | None:
    """Both adapters on the held-out examples (the same ones the engine held out, less those its
    lineage learned: `lineage` is `held_out_fraction` of the candidate), or None without any."""
    from homeiq_trainer.training.evaluate import comparable, evaluate_adapters

    _, eval_set = split_examples(examples, hp.eval_fraction, hp.min_eval_examples)
    if not eval_set:
        return None
    fraction = hp.eval_fraction
    if lineage < fraction:
        unseen_by_lineage = comparable(eval_set, lineage)
        _LOGGER.info(
            "It continues an adapter trained with data.eval_fraction %g: scored on the %d of %d held-out "
            "examples none of them trained on",
            lineage,
            len(unseen_by_lineage),
            len(eval_set),
        )
        if unseen_by_lineage:  # else it learned every one: its scores say little, and nothing is fairer
            eval_set, fraction = unseen_by_lineage, lineage
    in_use = artifacts.latest_run(settings.storage.output_dir)
    served, note = _served_adapter(settings.storage.output_dir, in_use, hp.base_model)
    if served is not None:
        unseen, note = _unseen_by(served, eval_set, fraction)
        if unseen:
            eval_set = unseen
        else:  # no fair comparison: judged as if none were in use, so retraining never sticks
            served = None
    evaluation = evaluate_adapters(eval_set, hp, settings.evaluation, (run_identifier, staging), served, observer, stop)
    evaluation.served_note, evaluation.in_use = note or evaluation.served_note, in_use
    return evaluation


LINEAGE_KEY = "lineage_eval_fraction"


def held_out_fraction(meta: RunMetadata) -> float | None:
    """The `data.eval_fraction` under which no adapter in this one's lineage trained on an example: its
    own, or a parent's smaller one where it was resumed from it (`LINEAGE_KEY`); 0 where it trained on
    every example it had (a small run of an earlier version); None where its metadata does not say."""
    if not meta.eval_examples and meta.train_examples is not None and meta.train_examples == meta.samples_used:
        return 0.0
    recorded = meta.hyperparameters.get(LINEAGE_KEY, meta.hyperparameters.get("eval_fraction"))
    if not isinstance(recorded, int | float) or isinstance(recorded, bool):
        return None
    return float(recorded)


def _unseen_by(served: tuple[str, Path], eval_set: list[Example], fraction: float) -> tuple[list[Example], str | None]:
    """The held-out examples the adapter in use did not train on (all of them unless it was trained
    with a smaller `data.eval_fraction`), and a note when none are left."""
    from homeiq_trainer.training.evaluate import comparable

    trained = held_out_fraction(artifacts.read_metadata(served[1]))
    if trained is None or trained >= fraction:
        return eval_set, None
    common = comparable(eval_set, trained)
    _LOGGER.info(
        "%s in use was trained with data.eval_fraction %g: both are scored on the %d of %d held-out examples "
        "it did not train on",
        served[0],
        trained,
        len(common),
        len(eval_set),
    )
    if common:
        return common, None
    return [], f"{served[0]} in use was trained on every held-out example (data.eval_fraction {trained:g} then)"


def _os_error_line(exc: OSError) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first}"[:500]

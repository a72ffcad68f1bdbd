"""Which adapter is served: the decision after a run, promote, roll back, and finishing a half-done switch.

`latest` and `current.json` move first and the history records the switch after: a disk that refuses
(full, read-only) then leaves `latest` where it was and the history untouched, and a crash in between
leaves a history that `reconcile` makes them agree with again at the next start (the history wins).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from homeiq_trainer.history import HistoryStore, TrainingRun
from homeiq_trainer.history import ServedAdapter as ServedAdapterRow
from homeiq_trainer.messages import Decision, RunResult, RunStatus, ServedAdapter, first_line, utcnow
from homeiq_trainer.settings import PromotionSettings, Settings
from homeiq_trainer.training import artifacts

_LOGGER = logging.getLogger(__name__)

# name → (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "chrf": ("chrF", True),
    "exact_match": ("exact match", True),
    "eval_loss": ("eval loss", False),
}
# One switch at a time: a run's conclusion, a promote and a rollback never interleave.
_SWITCH_LOCK = threading.Lock()


class PromotionError(Exception):
    """A promote or rollback that cannot be done; `code` is machine-readable, nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def fmt_metric(value: float) -> str:
    """A metric as the decision and the update entity show it: three decimals below 1."""
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3f}"


def decide(
    options: PromotionSettings,
    candidate: Mapping[str, Any] | None,
    served: Mapping[str, Any] | None,
    served_run: str | None,
    not_compared: str | None = None,
) -> tuple[Decision, str]:
    """Whether a finite candidate replaces the served adapter, and a one-line reason.

    `not_compared` says why an adapter in use was not scored (another base model, unreadable).
    """
    label, higher = METRICS[options.metric]
    mine = (candidate or {}).get(options.metric)
    theirs = (served or {}).get(options.metric)
    versus = (
        f"{label} {fmt_metric(mine)} vs {fmt_metric(theirs)} in use" if mine is not None and theirs is not None else ""
    )
    if options.policy == "manual":
        return Decision.AWAITING_APPROVAL, f"waiting for approval ({versus or 'policy manual'})"
    if options.policy == "always":
        return Decision.PROMOTED, f"promoted by policy always ({versus or 'nothing to compare'})"
    if served_run is None:
        return Decision.PROMOTED, "promoted: no adapter was in use"
    if served is None:
        return (
            Decision.PROMOTED,
            f"promoted: {not_compared or f'{served_run} in use was trained on another base model'}",
        )
    if mine is None or theirs is None:
        return Decision.KEPT_CURRENT, f"kept {served_run}: no held-out {label} to compare"
    if not math.isfinite(theirs) and math.isfinite(mine):
        # Weights gone bad (NaN) score NaN, which no gain exceeds: judged as one that cannot be loaded.
        return Decision.PROMOTED, f"promoted: {served_run} in use scores no finite {label} ({versus})"
    gain = mine - theirs if higher else theirs - mine
    if gain > 0 and gain >= options.min_improvement:
        return Decision.PROMOTED, versus
    return Decision.KEPT_CURRENT, versus + (f" (needs +{options.min_improvement:g})" if gain > 0 else "")


def current_record(output_dir: Path, run_identifier: str, promoted_at: str) -> ServedAdapter:
    """What `current.json` and the `model` topic say about the served adapter."""
    meta = artifacts.read_metadata(output_dir / run_identifier)
    candidate = meta.evaluation.get("candidate") or {}
    return ServedAdapter(
        run_id=run_identifier,
        directory=str((output_dir / run_identifier).resolve()),
        base_model=meta.base_model,
        metrics={key: candidate.get(key) for key in METRICS} | {"final_loss": meta.final_loss},
        trained_at=meta.trained_at,
        samples_used=meta.samples_used,
        promoted_at=promoted_at,
    )


def _switch(output_dir: Path, run_identifier: str, promoted_at: str) -> None:
    artifacts.promote(output_dir, run_identifier)
    artifacts.write_current(output_dir, current_record(output_dir, run_identifier, promoted_at))
    _LOGGER.info("Serving %s", run_identifier)


def _serve_nothing(output_dir: Path) -> None:
    """No `latest` and no `current.json`, so neither names a run that is not served."""
    if (output_dir / artifacts.LATEST).is_symlink():
        (output_dir / artifacts.LATEST).unlink()
    if artifacts.read_current(output_dir).run_id is not None:
        artifacts.write_current(output_dir, None)


def _put_back(output_dir: Path, served: ServedAdapterRow | None) -> None:
    """Best effort: `latest` and `current.json` as they were, serving `served` (or nothing)."""
    with contextlib.suppress(OSError, artifacts.ArtifactError):
        if served is None:
            _serve_nothing(output_dir)
        else:
            _switch(output_dir, served.run_identifier, served.served_at.isoformat())


@contextlib.contextmanager
def _switched(output_dir: Path, run_identifier: str, served: ServedAdapterRow | None) -> Iterator[None]:
    """`latest` and `current.json` point at a run while the block records it in the history.

    Both move before the history records the switch, and are put back when either fails: a disk that
    refuses (full, read-only: PromotionError `io_error`) or a history that cannot be written. The
    history never says one adapter is served while `latest` serves another; a crash between the
    switch and the record is mended at the next start (`reconcile`, where the history wins).
    """
    try:
        _switch(output_dir, run_identifier, utcnow().isoformat())
    except OSError as exc:
        _put_back(output_dir, served)
        raise PromotionError(
            "io_error", f"cannot serve {run_identifier} in {output_dir}: {exc.strerror or exc}"
        ) from None
    try:
        yield
    except BaseException:
        _put_back(output_dir, served)
        raise


def protected_runs(store: HistoryStore) -> set[str]:
    """Runs retention must keep: the served one, the one before it, and candidates awaiting a decision."""
    stack = store.served_stack()
    return {row.run_identifier for row in stack[:2]} | {run.run_identifier for run in store.awaiting()}


def conclude(store: HistoryStore, settings: Settings, run: TrainingRun, result: RunResult) -> TrainingRun:
    """Switch `latest` to a run that was chosen, then record how it ended (kept out where the disk refuses)."""
    from homeiq_trainer.jobs import prune_history, record_result

    output_dir = settings.storage.output_dir
    serve = result.status is RunStatus.COMPLETED and result.decision is Decision.PROMOTED
    with _SWITCH_LOCK:
        # A served directory deleted by hand left `latest` dangling and the history naming it: every
        # run was then compared with nothing and refused as decided against another adapter.
        _reconciled(store, output_dir)
        stack = store.served_stack() if serve else []
        in_use = stack[0] if stack else None
        in_use_id = in_use.run_identifier if in_use else None
        compared = (result.evaluation or {}).get("compared_with", in_use_id)
        if serve and compared != in_use_id:  # promoted or rolled back by hand while the run was being decided
            serve = False
            reason = f"offered, not served: {in_use_id} was put in use after it was compared with {compared or 'none'}"
            result = result.model_copy(update={"decision": Decision.AWAITING_APPROVAL, "decision_reason": reason})
        if serve:
            try:
                with _switched(output_dir, run.run_identifier, in_use):
                    finished = record_result(store, settings, run, result, serve=True)
            except PromotionError as exc:
                serve = False
                _LOGGER.error("Run %s was chosen but cannot be served: %s", run.run_identifier, exc)
                result = result.model_copy(update={"decision": Decision.KEPT_CURRENT, "decision_reason": str(exc)})
        if not serve:
            finished = record_result(store, settings, run, result, serve=False)
        # Outside the switch: housekeeping that fails must not put `latest` back under a recorded serve.
        try:
            prune_history(store, settings)
        except SQLAlchemyError as exc:
            _LOGGER.warning("Pruning the history failed (retried after the next run): %s", first_line(exc))
        artifacts.apply_retention(output_dir, settings.storage.keep_runs, protected_runs(store))
    return finished


def promote(store: HistoryStore, settings: Settings, run_identifier: str, triggered_by: str) -> TrainingRun:
    """Serve a completed run's adapter on request (whatever its decision was); the run as read before."""
    output_dir = settings.storage.output_dir
    with _SWITCH_LOCK:
        run = store.by_identifier(run_identifier)
        if run is None:
            raise PromotionError("unknown_run", f"no run {run_identifier} in the history")
        if run.status != RunStatus.COMPLETED.value:
            raise PromotionError("not_promotable", f"run {run_identifier} is {run.status}; only completed runs")
        if not artifacts.is_complete(output_dir / run_identifier):
            raise PromotionError("not_promotable", f"run {run_identifier} has no complete adapter (removed?)")
        stack = store.served_stack()
        if stack and stack[0].run_identifier == run_identifier:
            raise PromotionError("already_served", f"run {run_identifier} is already served")
        with _switched(output_dir, run_identifier, stack[0] if stack else None):
            store.serve(run_identifier, action="promote", triggered_by=triggered_by)
    # Not read again: a read failing after the commit would answer an error for a switch that took effect.
    return run


def offered(store: HistoryStore, settings: Settings) -> TrainingRun | None:
    """The best candidate awaiting approval (what the update entity offers to install), if any.

    Each candidate was scored on its own held-out set, beside the adapter then in use: they rank by
    their margin over it, not by raw scores from different sets. One compared with nothing has a
    margin of 0; on equal margins the newest wins.
    """
    name, higher = settings.promotion.metric, METRICS[settings.promotion.metric][1]

    def margin(run: TrainingRun) -> float:
        evaluation = run.evaluation_json or {}
        mine = (evaluation.get("candidate") or {}).get(name)
        theirs = (evaluation.get("served") or {}).get(name)
        if not isinstance(mine, int | float):
            return float("-inf")
        if not isinstance(theirs, int | float):
            return 0.0
        return float(mine - theirs) if higher else float(theirs - mine)

    candidates = [
        run for run in store.awaiting() if artifacts.is_complete(settings.storage.output_dir / run.run_identifier)
    ]
    # awaiting() is newest first, and max() keeps the first of equals.
    return max(candidates, key=margin, default=None)


def promote_requested(store: HistoryStore, settings: Settings, run_identifier: str | None, by: str) -> dict[str, Any]:
    """`promote` from a command: the named run, or without a name the candidate offered for install."""
    if run_identifier is None:
        candidate = offered(store, settings)
        if candidate is None:
            raise PromotionError("nothing_to_install", "no candidate is awaiting approval; name a run_id")
        run_identifier = candidate.run_identifier
    promote(store, settings, run_identifier, triggered_by=by)
    return {"run_id": run_identifier, "served": run_identifier}


def rollback(store: HistoryStore, settings: Settings, triggered_by: str) -> str:
    """Serve the adapter served before the current one again; returns its run identifier."""
    output_dir = settings.storage.output_dir
    with _SWITCH_LOCK:
        stack = store.served_stack()
        if len(stack) < 2:
            raise PromotionError("nothing_to_roll_back", "no adapter was served before the current one")
        previous = stack[1].run_identifier
        if not artifacts.is_complete(output_dir / previous):
            raise PromotionError("not_promotable", f"the previous adapter {previous} is gone from {output_dir}")
        with _switched(output_dir, previous, stack[0]):
            store.withdraw(stack[0].id, triggered_by=triggered_by)  # type: ignore[arg-type]
    return previous


def reconcile(store: HistoryStore, output_dir: Path) -> str | None:
    """At start: make `latest` and `current.json` agree with the history; returns the served run."""
    with _SWITCH_LOCK:
        return _reconciled(store, output_dir)


def _reconciled(store: HistoryStore, output_dir: Path) -> str | None:
    """`reconcile` with the switch lock held; a disk that refuses the repair is logged, not raised."""
    try:
        return _make_agree(store, output_dir)
    except OSError as exc:
        _LOGGER.error(
            "Cannot make %s agree with the history (%s): %s", output_dir / artifacts.LATEST, store.display, exc
        )
        stack = store.served_stack()
        return stack[0].run_identifier if stack else None


def _make_agree(store: HistoryStore, output_dir: Path) -> str | None:
    on_disk = artifacts.latest_run(output_dir)
    stack = store.served_stack()
    if stack and not output_dir.is_dir():
        # Not mounted yet (the add-on's /share), or `storage.output_dir` mistyped: withdrawing every adapter
        # would lose the served list, and each roll-back, for good. Serve nothing now; the history stays.
        _LOGGER.error(
            "The output directory %s is not there; serving no adapter, and the history's served list is kept",
            output_dir,
        )
        return None
    while stack and not artifacts.is_complete(output_dir / stack[0].run_identifier):
        _LOGGER.warning("Served run %s has no complete directory; withdrawing it", stack[0].run_identifier)
        store.withdraw(stack[0].id, triggered_by="recovery")  # type: ignore[arg-type]
        stack = store.served_stack()
    if not stack and on_disk is not None:
        row = store.by_identifier(on_disk)
        if row is None or row.status == RunStatus.COMPLETED.value:
            # Promoted before the history kept a served list (or by hand): adopt it.
            stack = [store.serve(on_disk, action="adopt", triggered_by="recovery")]
        else:  # switched to as its run ended, and the process died before the history recorded the end
            _LOGGER.warning("Run %s was never recorded as completed; not serving it", on_disk)
    if not stack:
        _serve_nothing(output_dir)  # nothing servable is left
        return None
    target = stack[0].run_identifier
    if target != on_disk:
        _LOGGER.warning("Finishing a promotion a crash interrupted: serving %s (latest was %s)", target, on_disk)
    if target != on_disk or artifacts.read_current(output_dir).run_id != target:
        _switch(output_dir, target, stack[0].served_at.isoformat())
    return target

"""What Home Assistant shows about the served adapter: the update entity, the last decision, device triggers."""

from __future__ import annotations

from homeiq_trainer.history import HistoryStore, TrainingRun
from homeiq_trainer.messages import (
    NOT_SERVED,
    AdapterUpdate,
    Decision,
    DecisionInfo,
    RunResult,
    RunStatus,
    TriggerEvent,
    known,
)
from homeiq_trainer.promotion import METRICS, fmt_metric, offered
from homeiq_trainer.settings import Settings

# Home Assistant refuses a longer release_summary.
RELEASE_SUMMARY_MAX_CHARS = 255
UPDATE_TITLE = "Ask AI adapter"
DECIDED_LOOKBACK_RUNS = 25


def _clip(text: str, limit: int = RELEASE_SUMMARY_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def update_payload(store: HistoryStore, settings: Settings) -> AdapterUpdate:
    """The update entity's state: installed = served run, latest = the candidate awaiting approval (or served)."""
    stack = store.served_stack()
    served = stack[0].run_identifier if stack else None
    candidate = offered(store, settings)
    if candidate is not None:
        summary = f"{candidate.run_identifier}: {candidate.decision_reason or 'awaiting approval'}"
    elif served is not None:
        row = store.by_identifier(served)
        value = (((row.evaluation_json if row else None) or {}).get("candidate") or {}).get(settings.promotion.metric)
        label = METRICS[settings.promotion.metric][0]
        summary = f"serving {served}" + (f" ({label} {fmt_metric(value)})" if isinstance(value, int | float) else "")
    else:
        summary = "no adapter served yet"
    installed = served or NOT_SERVED
    return AdapterUpdate(
        installed_version=installed,
        latest_version=candidate.run_identifier if candidate is not None else installed,
        title=UPDATE_TITLE,
        release_summary=_clip(summary),
    )


def decision_payload(store: HistoryStore) -> DecisionInfo:
    """The newest run's decision (every key present before the first one, for templates)."""
    decided = next((run for run in store.recent(DECIDED_LOOKBACK_RUNS) if run.decision), None)
    if decided is None:
        return DecisionInfo()
    return DecisionInfo(
        decision=known(Decision, decided.decision),
        reason=decided.decision_reason,
        run_id=decided.run_identifier,
        promoted=decided.promoted,
    )


def finished_events(run: TrainingRun, result: RunResult) -> list[TriggerEvent]:
    """The device-trigger events a finished run fires, in order."""
    run_id = run.run_identifier
    events: list[TriggerEvent] = []
    if result.status is RunStatus.COMPLETED:
        events.append(TriggerEvent(event="run_completed", run_id=run_id, reason=result.decision_reason))
    elif result.status is RunStatus.FAILED:
        events.append(TriggerEvent(event="run_failed", run_id=run_id, reason=result.reason()))
        if result.error and result.error.startswith("no usable examples"):
            events.append(TriggerEvent(event="not_enough_data", run_id=run_id, reason=result.reason()))
    if run.promoted:
        events.append(TriggerEvent(event="adapter_promoted", run_id=run_id, reason=result.decision_reason))
    elif result.decision in (Decision.KEPT_CURRENT, Decision.NOT_PROMOTED_INVALID):
        events.append(TriggerEvent(event="adapter_rejected", run_id=run_id, reason=result.decision_reason))
    return events

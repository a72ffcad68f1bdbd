"""One command, start to answer, on the command thread: parse, recall, dispatch by action, answer.

`HANDLERS` maps each action to one method, so a new action is one entry and one method. A handler
returns the answer's data, raises `CommandError`, or returns `Later` when the answer needs slow work
(counting new examples): that work runs on its own thread and the rest of the handler comes back to
the command thread, so a `status` or a `cancel` sent meanwhile is answered at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from homeiq_trainer import promotion
from homeiq_trainer.commands import (
    BUTTON,
    CommandError,
    parse_json_object,
    refusal,
    request_id_in,
    request_id_of,
    validate_command,
)
from homeiq_trainer.database import BoundedWait, NoAnswer
from homeiq_trainer.history import HistoryStore, HistoryUnavailable
from homeiq_trainer.idempotency import RequestIdConflict, RequestMemory, fingerprint
from homeiq_trainer.jobs import InstanceBusy, JobRequest
from homeiq_trainer.messages import Command, ErrorInfo, Response, RunStatus, StartParams, TriggerEvent
from homeiq_trainer.reporter import RunReporter
from homeiq_trainer.runner import Busy, NotRunning, Runner, ShuttingDown
from homeiq_trainer.settings import Settings
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.data import DataError, SourceOptions, count_new_examples

_LOGGER = logging.getLogger(__name__)

# Refusals that depend on the command alone: the same command gets the same answer, so remember it.
# Everything else (busy, not_enough_new_data, rate_limited, ...) may succeed on a retry.
REMEMBERED_ERRORS = frozenset({"invalid_command", "base_model_not_allowed"})
INTERNAL_ERROR_MAX_CHARS = 200
# A new-data count runs off the command thread, but a start should not wait for it forever.
NEW_DATA_CHECK_DEADLINE_S = 120.0
# Beyond the deadline and the source's own timeouts: a count not back by then waits on a server that
# took its query and went quiet, and the start is answered instead of waiting for good.
NEW_DATA_WAIT_MARGIN_S = 5.0
THRESHOLD_SETTING = "daemon.min_new_samples"

Reply = Callable[[str], None]
Data = dict[str, Any]


@dataclass
class Later:
    """Slow work first (`work`, off the command thread), then the rest of the answer (`then`, back on it)."""

    work: Callable[[], Any]
    then: Callable[[Any], Data]


@dataclass
class _Context:
    reply: Reply
    request_id: str | None
    digest: str
    inline: bool = False
    action: str | None = None
    replayed: str | None = field(default=None)
    holds_id: bool = False
    """This command put its request id in `_in_progress` (a start counting): only its own answer frees it."""


class Dispatcher:
    """Executes commands for the daemon; runs only on the command thread."""

    def __init__(
        self,
        settings: Settings,
        runner: Runner,
        reporter: RunReporter,
        store: HistoryStore,
        memory: RequestMemory,
        respond: Reply,
        post: Callable[[Callable[[], None]], None],
        run_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        # The configured settings with Home Assistant's values applied: what a run started now uses.
        self.run_settings = run_settings or (lambda: settings)
        self.runner = runner
        self.reporter = reporter
        self.store = store
        self.memory = memory
        self._respond = respond
        self._post = post
        self._checking = False
        self._count_wait = BoundedWait("new-data-count")
        # A `cancel` that came while a start was counting: that start ends refused, no run begins.
        self._start_cancelled = False
        # Request ids of commands still being worked on (a start counting), with their digests: the
        # same id may not run another command meanwhile, nor the same one twice.
        self._in_progress: dict[str, str] = {}
        self.handlers: dict[str, Callable[[Command], Data | Later]] = {
            "start": self._start,
            "cancel": self._cancel,
            "status": lambda _command: self.reporter.status(),
            "runs": lambda _command: self.reporter.runs(),
            "promote": self._promote,
            "rollback": self._rollback,
        }

    # --- one command -----------------------------------------------------------------------------

    def execute(self, payload: bytes, reply: Reply | None = None, inline: bool = False) -> None:
        """Parse, execute and answer one raw command; never raises. `inline` does slow work in place."""
        reply = reply or self._respond
        try:
            parsed = parse_json_object(payload, self.settings.daemon.max_payload_bytes)
        except CommandError as exc:
            reply(refusal(request_id_of(payload, self.settings.daemon.max_payload_bytes), None, exc))
            return
        if isinstance(parsed, Command):
            request_id, digest = None, ""  # a plain word carries no request id
        else:
            request_id = request_id_in(parsed)
            digest = fingerprint({k: v for k, v in parsed.items() if k != "request_id"}) if request_id else ""
        context = _Context(reply=reply, request_id=request_id, digest=digest, inline=inline)
        self._run(context, lambda: self._dispatch(context, parsed))

    def handle(self, payload: bytes) -> str:
        """The answer to one raw command, computed on the caller's thread (for tests and tools)."""
        answers: list[str] = []
        self.execute(payload, answers.append, inline=True)
        return answers[0]

    def _dispatch(self, context: _Context, parsed: dict[str, Any] | Command) -> Data | Later:
        if context.request_id is not None:
            pending = self._in_progress.get(context.request_id)
            if pending is not None and pending != context.digest:
                message = f"request_id {context.request_id!r} is in use by a command still being worked on"
                raise CommandError("request_id_conflict", message)
            if pending is not None:
                raise CommandError(
                    "busy", f"the command with request_id {context.request_id!r} is still being worked on"
                )
            try:
                context.replayed = self.memory.recall(context.request_id, context.digest)
            except RequestIdConflict as exc:
                raise CommandError("request_id_conflict", str(exc)) from None
            if context.replayed is not None:
                return {}
        command = parsed if isinstance(parsed, Command) else validate_command(parsed)
        context.action = command.action
        return self.handlers[command.action](command)

    def _run(self, context: _Context, step: Callable[[], Data | Later]) -> None:
        """Run one step of a command and answer it, unless it continues `Later`."""
        try:
            outcome = step()
        except CommandError as exc:
            remember = exc.code in REMEMBERED_ERRORS and not exc.of_state
            self._answer(context, refusal(context.request_id, context.action, exc), remember)
            return
        except Exception as exc:  # the command's outermost frame: answer, log, carry on
            _LOGGER.exception("Command failed")
            error = ErrorInfo(
                code="internal_error", message=f"{type(exc).__name__}: {str(exc)[:INTERNAL_ERROR_MAX_CHARS]}"
            )
            response = Response(request_id=context.request_id, action=context.action, status="error", error=error)
            self._answer(context, response.model_dump_json(), remember=False)
            return
        if context.replayed is not None:
            context.reply(context.replayed)
        elif isinstance(outcome, Later):
            if context.request_id is not None:
                self._in_progress[context.request_id] = context.digest
                context.holds_id = True
            if context.inline:
                self._later(context, outcome, post=lambda task: task())
            else:
                # A daemon thread: a count still running at shutdown must not hold the exit (one at a
                # time: `start` is refused while `_checking`).
                threading.Thread(
                    target=self._later, args=(context, outcome, self._post), name="new-data", daemon=True
                ).start()
        else:
            response = Response(request_id=context.request_id, action=context.action, status="ok", data=outcome)
            self._answer(context, response.model_dump_json(), remember=True)

    def _later(self, context: _Context, later: Later, post: Callable[[Callable[[], None]], None]) -> None:
        """The slow part of a command (its own thread), then its rest back on the command thread."""
        try:
            result = later.work()
        except Exception as exc:
            failure = exc

            def fail() -> Data:
                raise failure

            post(lambda: self._resume(context, fail))
            return
        post(lambda: self._resume(context, lambda: later.then(result)))

    def _resume(self, context: _Context, step: Callable[[], Data | Later]) -> None:
        self._checking = False
        self._run(context, step)

    def _answer(self, context: _Context, text: str, remember: bool) -> None:
        if context.holds_id and context.request_id is not None:  # its own answer, not a repeat's `busy`
            self._in_progress.pop(context.request_id, None)  # the id is free again
            context.holds_id = False
        if remember and context.request_id is not None:
            self.memory.remember(context.request_id, context.action, context.digest, text)
        context.reply(text)

    # --- handlers --------------------------------------------------------------------------------

    def _cancel(self, _command: Command) -> Data:
        try:
            run = self.runner.cancel()
        except NotRunning as exc:
            if self._checking:  # a start is counting new examples: it will not start a run
                self._start_cancelled = True
                return {"run_id": None, "start_cancelled": True}
            raise CommandError("not_running", str(exc)) from None
        return {"run_id": run.run_identifier}

    def _promote(self, command: Command) -> Data:
        run_id = command.run_id
        if run_id is None:
            # Install: the candidate Home Assistant showed, not one that a run ending meanwhile ranks higher.
            run_id = self.reporter.offered()
            if run_id is None:
                raise CommandError("nothing_to_install", "no candidate is awaiting approval; name a run_id")
        try:
            data = promotion.promote_requested(self.store, self.settings, run_id, command.triggered_by)
        except promotion.PromotionError as exc:
            raise CommandError(exc.code, str(exc)) from None
        self._served(data["served"], f"installed by {command.triggered_by}")
        return data

    def _rollback(self, command: Command) -> Data:
        try:
            served = promotion.rollback(self.store, self.settings, command.triggered_by)
        except promotion.PromotionError as exc:
            raise CommandError(exc.code, str(exc)) from None
        self._served(served, f"rolled back by {command.triggered_by}")
        return {"served": served}

    def _served(self, run_id: str, reason: str) -> None:
        """After a switch by hand: the topics, and `adapter_promoted`, on which an automation restarts
        HomeIQ's service so it loads the adapter now served (a history read failing now is no error)."""
        self.reporter.refresh_serving()
        self.reporter.event(TriggerEvent(event="adapter_promoted", run_id=run_id, reason=reason))

    def _start(self, command: Command) -> Data | Later:
        self._refuse_if_busy()
        params = command.params or StartParams()
        beyond = self.settings.limits.refusal(params)
        if beyond is not None:
            raise CommandError("invalid_command", beyond)
        self._check_base_model(params)
        settings = self.run_settings()
        wanted, from_settings = params.min_new_samples, False
        if wanted is None and command.triggered_by != BUTTON:
            # Automation-started (anything but the Start button): the threshold set in Home Assistant.
            wanted, from_settings = settings.daemon.min_new_samples or None, True
        if not wanted:  # none asked for, or 0: this start trains on whatever arrived
            return self._submit(command, {})
        # More new examples than one run may use can never be required: clamp, and say so.
        limit = settings.data.max_samples
        required = min(wanted, limit)
        note: Data = {"required": required}
        if from_settings:
            note["required_by"] = THRESHOLD_SETTING
        if required < wanted:
            note["notice"] = f"min_new_samples {wanted} is above data.max_samples ({limit}); {required} required"
        self._checking, self._start_cancelled = True, False
        return Later(
            work=lambda: self._count_new(required),
            then=lambda found: self._after_count(command, note, found),
        )

    def _count_new(self, required: int) -> int:
        data = self.settings.data
        wait_s = NEW_DATA_CHECK_DEADLINE_S + data.connect_timeout_s + data.busy_timeout_s + NEW_DATA_WAIT_MARGIN_S
        try:
            return self._count_wait.call(
                lambda: count_new_since_last_completed(self.settings, self.store, required), wait_s
            )
        except NoAnswer as exc:
            raise CommandError("data_unavailable", f"counting new examples: {exc}; try again later") from None

    def _after_count(self, command: Command, note: Data, found: int) -> Data:
        if self._start_cancelled:
            self._start_cancelled = False
            raise CommandError("cancelled", "cancelled while counting new examples; no run started")
        if found < note["required"]:
            message = f"{found} new usable examples since the last completed run; {note['required']} required"
            if "required_by" in note:
                message += f" ({THRESHOLD_SETTING}, for starts not from the Start button)"
            event = TriggerEvent(event="not_enough_data", new_samples=found, required=note["required"], reason=message)
            self.reporter.event(event)
            raise CommandError("not_enough_new_data", message, {"new_samples": found, **note})
        return self._submit(command, {"new_samples": found, **note})

    def _refuse_if_busy(self) -> None:
        active = self.runner.active
        if active is not None:
            run = active.run
            raise CommandError("busy", f"run {run.run_identifier} is {run.status}", {"run_id": run.run_identifier})
        if self._checking:
            raise CommandError("busy", "another start is counting new examples")

    def _check_base_model(self, params: StartParams) -> None:
        allowed = self.settings.allowed_base_models()
        if params.base_model and params.base_model not in allowed:
            raise CommandError(
                "base_model_not_allowed",
                "base_model must be one of the configured models (training.base_model, training.allowed_base_models)",
            )
        if params.resume_from:
            try:
                run_dir = artifacts.resolve_run_dir(self.settings.storage.output_dir, params.resume_from)
            except artifacts.ArtifactError as exc:
                raise CommandError("unknown_run", str(exc)) from None
            # Resuming trains on the run's own base model: the allow-list applies to it too.
            resumed_base = artifacts.read_metadata(run_dir).base_model
            if params.base_model is None and resumed_base not in allowed:
                raise CommandError(
                    "base_model_not_allowed",
                    f"run {params.resume_from} was trained on a base model that is not allowed any more",
                    of_state=params.resume_from == artifacts.LATEST,  # `latest` moves with a promote or rollback
                )

    def _submit(self, command: Command, extra: Data) -> Data:
        self._refuse_if_busy()
        params = command.params or StartParams()
        request = JobRequest(
            params=params.train_params(), triggered_by=command.triggered_by, request_id=command.request_id
        )
        try:
            run = self.runner.submit(request, self.run_settings())
        except Busy as exc:
            raise CommandError("busy", str(exc), {"run_id": exc.run.run_identifier}) from None
        except ShuttingDown as exc:
            raise CommandError("shutting_down", str(exc)) from None
        except InstanceBusy as exc:  # a history on a server whose lock another homeiq-trainer took meanwhile
            raise CommandError("busy", str(exc), of_state=True) from None
        except HistoryUnavailable as exc:  # its lock's server does not answer: no run opened
            raise CommandError("history_unavailable", str(exc), of_state=True) from None
        return {"run_id": run.run_identifier, "state": RunStatus.QUEUED.value, **extra}


def count_new_since_last_completed(settings: Settings, store: HistoryStore, required: int) -> int:
    """New usable examples since the last completed run (its own thread; bounded by a deadline)."""
    last = store.latest_completed()
    since = None
    if last is not None:
        report = last.data_report_json or {}
        newest = report.get("newest_created_at")
        since = last.started_at
        if isinstance(newest, str):
            try:
                since = datetime.fromisoformat(newest)
            except ValueError:  # edited by hand, or written by another version: the run's start will do
                _LOGGER.warning(
                    "Run %s records no readable newest example; counting since it started", last.run_identifier
                )
    try:
        return count_new_examples(
            settings.data.source_url(),
            since,
            limit=required,
            deadline_s=NEW_DATA_CHECK_DEADLINE_S,
            options=SourceOptions.from_settings(settings.data),
        )
    except DataError as exc:
        raise CommandError("data_unavailable", str(exc)) from None

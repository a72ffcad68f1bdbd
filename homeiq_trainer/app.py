"""The daemon: MQTT commands in → runner → retained state out.

Data flows one way: a message is validated into a `Command`, the runner owns the job, and what the
runner reports becomes retained state. Nothing here imports torch.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import re
import signal
import threading
import time
from datetime import datetime
from typing import Any

import paho.mqtt.client as paho
from pydantic import ValidationError

from homeiq_trainer.discovery import IDLE, build_discovery
from homeiq_trainer.history import TrainingRun, run_to_dict
from homeiq_trainer.jobs import InstanceLock, JobRequest, open_history, recover
from homeiq_trainer.messages import (
    PLAIN_COMMANDS,
    Command,
    ErrorInfo,
    Phase,
    ProgressEvent,
    ProgressPayload,
    Response,
    RunResult,
    RunStatus,
    StatePayload,
    TrainParams,
    utcnow,
)
from homeiq_trainer.mqtt import MqttLink
from homeiq_trainer.runner import Busy, Launcher, NotRunning, Runner, ShuttingDown
from homeiq_trainer.settings import Settings, describe_validation_error
from homeiq_trainer.topics import Topics
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.data import DataError, SourceOptions, count_new_examples

_LOGGER = logging.getLogger(__name__)

REMEMBERED_REQUESTS = 1000
NEW_DATA_CHECK_TIMEOUT_S = 2.0
REQUEST_ID_SCAN_BYTES = 1024
_REQUEST_ID_NEAR_START = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9_.:@/+-]{1,128})"')
COMPACT_RUN_KEYS = (
    "run_id",
    "status",
    "triggered_by",
    "started_at",
    "finished_at",
    "dataset_size",
    "final_loss",
)


class CommandError(Exception):
    """A command that is refused; `code` is machine-readable."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


def parse_command(payload: bytes, max_bytes: int) -> Command:
    """A validated command from raw bytes, or `CommandError` naming the problem."""
    if len(payload) > max_bytes:
        raise CommandError("payload_too_large", f"command is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("invalid_payload", "command is not valid UTF-8") from None
    if text.lower() in PLAIN_COMMANDS:
        return Command.model_validate({"action": text.lower(), "triggered_by": "button"})
    if not text.startswith("{"):
        raise CommandError("invalid_payload", f"expected one of {', '.join(PLAIN_COMMANDS)} or a JSON object")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise CommandError("invalid_json", "command is not valid JSON") from None
    try:
        return Command.model_validate(raw)
    except ValidationError as exc:
        raise CommandError("invalid_command", describe_validation_error(exc, "invalid command")) from None


def _request_id_of(payload: bytes, max_bytes: int) -> str | None:
    # Best effort, so that even a refused command's answer can be matched to its request.
    if len(payload) > max_bytes:
        # Parsing an oversized payload would cost what the limit is there to refuse (the broker
        # allows up to 256 MB): look for the id near the start only.
        match = _REQUEST_ID_NEAR_START.search(payload[:REQUEST_ID_SCAN_BYTES])
        return match.group(1).decode("ascii") if match else None
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    value = raw.get("request_id") if isinstance(raw, dict) else None
    if isinstance(value, str) and 0 < len(value) <= 128:
        return value
    return None


class TrainerApp:
    """Everything the daemon does, wired together."""

    def __init__(self, settings: Settings, launcher: Launcher | None = None) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.instance_lock = InstanceLock(settings)
        self.instance_lock.acquire()
        self.store = open_history(settings)
        interrupted = recover(self.store, settings)
        self.runner = Runner(settings, self.store, listener=self, launcher=launcher)
        self._lock = threading.RLock()
        self._retained: dict[str, tuple[str, int]] = {}
        self._responses: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._last_progress_at = 0.0
        self._announce_timer: threading.Timer | None = None
        self._stopping = False
        self.link = MqttLink(
            settings.mqtt,
            availability_topic=self.topics.availability,
            subscriptions={self.topics.command: 1, self.topics.ha_status: 1},
            on_connected=self.announce,
            on_message=self.on_message,
        )
        self._set_initial_state(interrupted)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background) and start serving."""
        self.link.start()

    def stop(self) -> None:
        """Stop accepting, cancel a running run, publish the final state and `offline`."""
        self.runner.shutdown(self.settings.daemon.stop_timeout_s)
        with self._lock:
            # After this no birth message can schedule an `online` behind our `offline`.
            self._stopping = True
            if self._announce_timer is not None:
                self._announce_timer.cancel()
        self.link.stop()
        self.close()

    def close(self) -> None:
        """Release the history and the instance lock (after `stop`, or for an app never started)."""
        self.store.close()
        self.instance_lock.release()

    # --- publishing ------------------------------------------------------------------------------

    def _retain(self, topic: str, payload: Any, qos: int = 1) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, default=str)
        # Store and publish under one lock, so a re-announce can never publish an older value last.
        with self._lock:
            self._retained[topic] = (text, qos)
            if self.link.connected:
                self.link.publish(topic, text, qos=qos, retain=True)

    def announce(self) -> None:
        """Publish discovery and every retained state, then `online` last (on every connect)."""
        with self._lock:
            if self._stopping or not self.link.connected:
                return
            if self.settings.mqtt.discovery:
                discovery = build_discovery(self.settings, self.topics).payload()
                self.link.publish(self.topics.discovery, json.dumps(discovery), qos=1, retain=True)
            for topic, (text, qos) in self._retained.items():
                self.link.publish(topic, text, qos=qos, retain=True)
            self.link.announce_online()

    def _schedule_announce(self) -> None:
        # Home Assistant's birth reaches every integration at once; spread the replies.
        delay = random.uniform(0, self.settings.daemon.announce_delay_max_s)
        with self._lock:
            if self._stopping:
                return
            if self._announce_timer is not None:
                self._announce_timer.cancel()
            self._announce_timer = threading.Timer(delay, self.announce)
            self._announce_timer.daemon = True
            self._announce_timer.start()

    def _publish_state(self, state: str, run_id: str | None, phase: str | None, message: str) -> None:
        payload = StatePayload(state=state, run_id=run_id, phase=phase, message=message[:500])
        self._retain(self.topics.state, payload.model_dump(mode="json"))

    def _publish_history(self) -> None:
        last = self.store.latest_finished()
        # Every key present even before the first run, so Home Assistant's templates find them.
        self._retain(
            self.topics.last_run,
            run_to_dict(last)
            if last
            else dict.fromkeys(run_to_dict(TrainingRun(run_identifier="", started_at=utcnow())), None),
        )
        runs = [
            {key: value for key, value in run_to_dict(run).items() if key in COMPACT_RUN_KEYS}
            for run in self.store.recent(self.settings.daemon.runs_published)
        ]
        self._retain(self.topics.runs, {"runs": runs})

    def _publish_model(self) -> None:
        output_dir = self.settings.storage.output_dir
        name = artifacts.latest_run(output_dir)
        if name is None:
            self._retain(self.topics.model, {"run_id": None})
            return
        meta = artifacts.read_metadata(output_dir / name)
        self._retain(
            self.topics.model,
            {
                "run_id": name,
                "path": str((output_dir / name).resolve()),
                "base_model": meta.get("base_model"),
                "trained_at": meta.get("trained_at"),
                "samples_used": meta.get("samples_used"),
                "final_loss": meta.get("final_loss"),
                "eval_loss": meta.get("eval_loss"),
            },
        )

    def _set_initial_state(self, interrupted: list[TrainingRun]) -> None:
        latest = self.store.recent(1)
        if not latest:
            self._publish_state(IDLE, None, None, "no run yet")
        else:
            run = latest[0]
            message = (
                f"run {run.run_identifier} was interrupted when the daemon stopped"
                if any(r.id == run.id for r in interrupted)
                else f"last run {run.status}"
            )
            self._publish_state(run.status, run.run_identifier, None, message)
        self._retain(self.topics.progress, ProgressPayload().model_dump(mode="json"), qos=0)
        self._publish_history()
        self._publish_model()

    # --- runner events ---------------------------------------------------------------------------

    def run_state(self, run: TrainingRun, phase: Phase | None, message: str) -> None:
        status = RunStatus.QUEUED.value if phase is None else RunStatus.RUNNING.value
        self._publish_state(status, run.run_identifier, phase.value if phase else None, message)
        if phase is None:
            self._retain(
                self.topics.progress,
                ProgressPayload(run_id=run.run_identifier).model_dump(mode="json"),
                qos=0,
            )

    def run_progress(self, run: TrainingRun, event: ProgressEvent) -> None:
        now = time.monotonic()
        final = event.step >= event.total_steps
        if not final and now - self._last_progress_at < self.settings.daemon.progress_interval_s:
            return
        self._last_progress_at = now
        payload = ProgressPayload(
            run_id=run.run_identifier,
            percent=event.percent,
            **event.model_dump(include={"step", "total_steps", "epoch", "loss", "samples_per_s", "eta_s"}),
        )
        self._retain(self.topics.progress, payload.model_dump(mode="json"), qos=0)

    def run_finished(self, run: TrainingRun, result: RunResult) -> None:
        if result.status is RunStatus.COMPLETED:
            with self._lock:
                previous = json.loads(self._retained.get(self.topics.progress, ("{}", 0))[0])
            previous.update(run_id=run.run_identifier, percent=100.0, eta_s=0.0)
            self._retain(self.topics.progress, previous, qos=0)
        message = {
            RunStatus.COMPLETED: f"completed with final loss {result.final_loss}",
            RunStatus.CANCELLED: "cancelled; the current model is unchanged",
        }.get(result.status) or result.reason()
        self._publish_history()
        if result.promoted:
            self._publish_model()
        self._publish_state(result.status.value, run.run_identifier, None, message)
        _LOGGER.info("Run %s %s", run.run_identifier, result.status.value)

    # --- commands --------------------------------------------------------------------------------

    def on_message(self, message: paho.MQTTMessage) -> None:
        """Route one incoming message."""
        if message.topic == self.topics.ha_status:
            if message.payload.strip() == b"online":
                _LOGGER.info("Home Assistant came online; re-announcing")
                self._schedule_announce()
            return
        if message.topic != self.topics.command:
            return
        if message.retain:
            # A retained command would re-run on every reconnect; honour only live ones.
            _LOGGER.warning("Ignoring a retained command on %s", message.topic)
            return
        self.link.publish(self.topics.response, self.handle_command(bytes(message.payload)), qos=1)

    def handle_command(self, payload: bytes) -> str:
        """The JSON response to one raw command; never raises."""
        request_id: str | None = None
        action: str | None = None
        try:
            command = parse_command(payload, self.settings.daemon.max_payload_bytes)
            request_id, action = command.request_id, command.action
            if request_id is not None:
                with self._lock:
                    earlier = self._responses.get(request_id)
                if earlier is not None:
                    return earlier
            data = self._execute(command)
            response = Response(request_id=request_id, action=action, status="ok", data=data)
        except CommandError as exc:
            request_id = request_id or _request_id_of(payload, self.settings.daemon.max_payload_bytes)
            response = Response(
                request_id=request_id,
                action=action,
                status="error",
                data=exc.data,
                error=ErrorInfo(code=exc.code, message=str(exc)),
            )
        except Exception as exc:  # the command loop's outermost frame: answer, log, carry on
            _LOGGER.exception("Command failed")
            response = Response(
                request_id=request_id,
                action=action,
                status="error",
                error=ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {str(exc)[:200]}"),
            )
        text = response.model_dump_json()
        if request_id is not None:
            with self._lock:
                self._responses[request_id] = text
                while len(self._responses) > REMEMBERED_REQUESTS:
                    self._responses.popitem(last=False)
        return text

    def _execute(self, command: Command) -> dict[str, Any]:
        if command.action == "start":
            return self._start(command)
        if command.action == "cancel":
            try:
                run = self.runner.cancel()
            except NotRunning as exc:
                raise CommandError("not_running", str(exc)) from None
            return {"run_id": run.run_identifier}
        if command.action == "status":
            with self._lock:
                state = json.loads(self._retained[self.topics.state][0])
                progress = json.loads(self._retained[self.topics.progress][0])
            return {"state": state, "progress": progress}
        limit = self.settings.daemon.runs_published
        return {"runs": [run_to_dict(run) for run in self.store.recent(limit)]}

    def _start(self, command: Command) -> dict[str, Any]:
        active = self.runner.active
        if active is not None:
            raise CommandError(
                "busy",
                f"run {active.run.run_identifier} is {active.run.status}",
                {"run_id": active.run.run_identifier},
            )
        params = command.params
        train_params = params.train_params() if params else None
        if params and params.base_model and params.base_model not in self.settings.allowed_base_models():
            raise CommandError(
                "base_model_not_allowed",
                "base_model must be one of the configured models (training.base_model, training.allowed_base_models)",
            )
        if params and params.resume_from:
            try:
                run_dir = artifacts.resolve_run_dir(self.settings.storage.output_dir, params.resume_from)
            except artifacts.ArtifactError as exc:
                raise CommandError("unknown_run", str(exc)) from None
            # Resuming trains on the run's own base model: the allow-list applies to it too.
            resumed_base = artifacts.read_metadata(run_dir).get("base_model")
            if params.base_model is None and resumed_base not in self.settings.allowed_base_models():
                raise CommandError(
                    "base_model_not_allowed",
                    f"run {params.resume_from} was trained on a base model that is not allowed any more",
                )
        if params and params.min_new_samples:
            self._require_new_data(params.min_new_samples)
        request = JobRequest(
            params=train_params or TrainParams(),
            triggered_by=command.triggered_by,
            request_id=command.request_id,
        )
        try:
            run = self.runner.submit(request)
        except Busy as exc:
            raise CommandError("busy", str(exc), {"run_id": exc.run.run_identifier}) from None
        except ShuttingDown as exc:
            raise CommandError("shutting_down", str(exc)) from None
        return {"run_id": run.run_identifier, "state": RunStatus.QUEUED.value}

    def _require_new_data(self, required: int) -> None:
        last = self.store.latest_completed()
        since = None
        if last is not None:
            report = last.data_report_json or {}
            newest = report.get("newest_created_at")
            since = datetime.fromisoformat(newest) if isinstance(newest, str) else last.started_at
        try:
            data = self.settings.data
            found = count_new_examples(
                data.source_url(),
                since,
                limit=required,
                # This runs on the MQTT network thread: never wait long enough to miss a keepalive.
                options=SourceOptions(
                    busy_timeout_s=min(data.busy_timeout_s, NEW_DATA_CHECK_TIMEOUT_S),
                    connect_timeout_s=min(data.connect_timeout_s, NEW_DATA_CHECK_TIMEOUT_S),
                    schema=data.source_schema or None,
                    exclude_sources=frozenset(data.exclude_sources),
                ),
            )
        except DataError as exc:
            raise CommandError("data_unavailable", str(exc)) from None
        if found < required:
            raise CommandError(
                "not_enough_new_data",
                f"{found} new usable examples since the last completed run; {required} required",
                {"new_samples": found, "required": required},
            )


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM or SIGINT; exits 0 after a clean stop."""
    app = TrainerApp(settings)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        _LOGGER.info("Signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    app.start()
    _LOGGER.info("homeiq-trainer serving on %s (commands on %s)", settings.mqtt.base_topic, app.topics.command)
    while not stop.wait(1.0):
        pass
    app.stop()
    _LOGGER.info("Stopped")
    return 0


def _one_shot_link(settings: Settings) -> MqttLink:
    link = MqttLink(
        settings.mqtt,
        availability_topic=Topics.from_settings(settings).availability,
        subscriptions={},
        on_connected=lambda: None,
        on_message=lambda message: None,
        # Its own id, so it never takes over a running daemon's session; no will, so a dropped
        # connection cannot bring back the `availability` it came to remove.
        client_id=f"{settings.mqtt.client_id}-cli-{os.getpid()}",
        will=False,
    )
    link.start()
    return link


def remove_retained(settings: Settings, timeout_s: float = 10.0) -> int:
    """Clear this instance's retained discovery and state topics (Home Assistant removes the device)."""
    topics = Topics.from_settings(settings)
    link = _one_shot_link(settings)
    if not link.wait_connected(timeout_s):
        _LOGGER.error("Could not reach the MQTT broker %s:%d", settings.mqtt.host, settings.mqtt.port)
        link.stop()
        return 1
    infos = [link.publish(topic, b"", qos=1, retain=True) for topic in topics.retained_state_topics()]
    with contextlib.suppress(RuntimeError, ValueError):  # raised when the connection drops meanwhile
        for info in infos:
            info.wait_for_publish(timeout=timeout_s)
    link.stop(announce_offline=False)
    if not all(info.is_published() for info in infos):
        _LOGGER.error("The broker did not confirm every removal; run the command again")
        return 1
    print(f"removed {len(infos)} retained topics under {topics.base} and {topics.discovery}")
    return 0


def show_discovery(settings: Settings) -> int:
    """Print the discovery payload this instance publishes."""
    topics = Topics.from_settings(settings)
    print(topics.discovery)
    print(json.dumps(build_discovery(settings, topics).payload(), indent=2))
    return 0

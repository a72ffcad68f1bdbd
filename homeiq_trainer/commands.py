"""Commands in: paho's callback checks size and rate and enqueues; one command thread runs them in order.

Nothing here waits on anything slow: the network thread only looks at a payload's length, takes a
token from the rate limit and puts the payload in a bounded queue (a full queue answers `overloaded`).
The command thread takes payloads out one at a time and hands each to the dispatcher
(`dispatcher.py`), which parses, executes and answers it.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from pydantic import ValidationError

from homeiq_trainer.messages import PLAIN_COMMANDS, Command, ErrorInfo, Response, is_request_id
from homeiq_trainer.settings import describe_validation_error

_LOGGER = logging.getLogger(__name__)

REQUEST_ID_SCAN_BYTES = 1024
_REQUEST_ID_NEAR_START = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9_.:@/+-]{1,128})"')
STOP_JOIN_TIMEOUT_S = 10.0
# What a routed message (a setting's value, a Re-announce press) may bring to the command thread.
ROUTE_PAYLOAD_BYTES = 4096

Task = Callable[[], None]
TopicHandler = Callable[[str, bytes], None]
# Told, on the network thread, of a routed message dropped for the rate limit or a full queue.
TopicRefusal = Callable[[str, "CommandError"], None]
BUTTON = "button"
"""`triggered_by` of a plain-word command: what Home Assistant's buttons send."""


class CommandError(Exception):
    """A command that is refused; `code` is machine-readable.

    `of_state`: the refusal depends on the daemon's state, not the command alone, so a retry with the same
    request id is judged again rather than given this answer back.
    """

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None, *, of_state: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.data = data
        self.of_state = of_state


def parse_json_object(payload: bytes, max_bytes: int) -> dict[str, Any] | Command:
    """A plain word as its `Command`, or the JSON object to validate; `CommandError` naming the problem."""
    if len(payload) > max_bytes:
        raise CommandError("payload_too_large", f"command is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("invalid_payload", "command is not valid UTF-8") from None
    if text.lower() in PLAIN_COMMANDS:
        return Command.model_validate({"action": text.lower(), "triggered_by": BUTTON})
    if not text.startswith("{"):
        raise CommandError("invalid_payload", f"expected one of {', '.join(PLAIN_COMMANDS)} or a JSON object")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise CommandError("invalid_json", "command is not valid JSON") from None
    if not isinstance(raw, dict):
        raise CommandError("invalid_payload", "a JSON command must be an object")
    return raw


def validate_command(raw: dict[str, Any]) -> Command:
    """The JSON object as a `Command`, or `CommandError` naming every offending key."""
    try:
        return Command.model_validate(raw)
    except ValidationError as exc:
        raise CommandError("invalid_command", describe_validation_error(exc, "invalid command")) from None


def parse_command(payload: bytes, max_bytes: int) -> Command:
    """A validated command from raw bytes, or `CommandError` naming the problem."""
    parsed = parse_json_object(payload, max_bytes)
    return parsed if isinstance(parsed, Command) else validate_command(parsed)


def request_id_near_start(payload: bytes) -> str | None:
    """A request id in the payload's first KiB, without parsing it (for oversized or unread payloads)."""
    match = _REQUEST_ID_NEAR_START.search(payload[:REQUEST_ID_SCAN_BYTES])
    return match.group(1).decode("ascii") if match else None


def request_id_of(payload: bytes, max_bytes: int) -> str | None:
    """Best effort, so that even a refused command's answer can be matched to its request."""
    if len(payload) > max_bytes:
        return request_id_near_start(payload)
    try:
        raw = json.loads(payload)  # bytes: json lets encoded surrogates through, where strict UTF-8 refused
    except (ValueError, RecursionError):
        return None
    return request_id_in(raw if isinstance(raw, dict) else None)


def request_id_in(raw: dict[str, Any] | None) -> str | None:
    """The request id of a parsed JSON object, if it is well-formed (one rule for every answer)."""
    value = raw.get("request_id") if raw is not None else None
    return value if is_request_id(value) else None


def refusal(request_id: str | None, action: str | None, error: CommandError) -> str:
    """The JSON answer to a refused command."""
    response = Response(
        request_id=request_id,
        action=action,
        status="error",
        data=error.data,
        error=ErrorInfo(code=error.code, message=str(error)),
    )
    return response.model_dump_json()


class TokenBucket:
    """A command rate limit: `burst` commands at once, refilled at `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spend one token; False when none is left."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class CommandQueue:
    """A bounded queue of tasks and the one thread that runs them, in order."""

    def __init__(self, max_items: int) -> None:
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_items)
        self._thread = threading.Thread(target=self._loop, name="commands", daemon=True)

    def start(self) -> None:
        """Start the command thread."""
        self._thread.start()

    def offer(self, task: Task) -> bool:
        """Queue a task from outside (the network thread); False when the queue is full."""
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            return False
        return True

    def post(self, task: Task) -> None:
        """Queue our own follow-up work (waits for room: it must not be dropped)."""
        self._queue.put(task)

    def stop(self) -> None:
        """Let the thread finish what it runs now, then end it; tasks still queued are dropped."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_JOIN_TIMEOUT_S)

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # the command thread's outermost frame: log, carry on with the next
                _LOGGER.exception("A command task failed")


class Intake:
    """paho's `on_message`: routes by topic, refuses what is too large, too fast or too many, enqueues."""

    def __init__(
        self,
        *,
        command_topic: str,
        max_payload_bytes: int,
        bucket: TokenBucket,
        commands: CommandQueue,
        execute: Callable[[bytes], None],
        respond: Callable[[str], None],
        on_birth: Callable[[], None],
        birth_topic: str,
    ) -> None:
        self.command_topic = command_topic
        self.max_payload_bytes = max_payload_bytes
        self.bucket = bucket
        self.commands = commands
        self._execute = execute
        self._respond = respond
        self._on_birth = on_birth
        self.birth_topic = birth_topic
        self.routes: dict[str, TopicHandler] = {}
        self.refusals: dict[str, TopicRefusal] = {}

    def route(self, subscription: str, handler: TopicHandler, refused: TopicRefusal | None = None) -> None:
        """Run `handler(topic, payload)` on the command thread for messages matching `subscription`;
        `refused(topic, error)`, where given, answers one dropped as too fast or too many."""
        self.routes[subscription] = handler
        if refused is not None:
            self.refusals[subscription] = refused

    def on_message(self, message: paho.MQTTMessage) -> None:
        """Route one incoming message (the network thread: nothing slow here)."""
        topic, payload = message.topic, bytes(message.payload)
        if topic == self.birth_topic:
            if payload.strip() == b"online":
                _LOGGER.info("Home Assistant came online; re-announcing")
                self._on_birth()
            return
        if message.retain:
            # A retained command would re-run on every reconnect; honour only live ones.
            _LOGGER.warning("Ignoring a retained message on %s", topic)
            return
        if topic == self.command_topic:
            self._command(payload)
            return
        for subscription, handler in self.routes.items():
            if paho.topic_matches_sub(subscription, topic):
                # Settings and Re-announce share the commands' rate and queue, and never need more than
                # a few bytes: a flood or a huge payload must not starve commands or fill memory.
                refused = self.refusals.get(subscription)
                if not self.bucket.take():
                    _LOGGER.warning("Too many messages; dropped one on %s", topic)
                    if refused is not None:
                        refused(topic, CommandError("rate_limited", "too many messages; try again in a moment"))
                    return
                kept = payload[: ROUTE_PAYLOAD_BYTES + 1]  # longer is refused as longer, without the bulk
                if not self.commands.offer(lambda h=handler, p=kept: h(topic, p)):  # type: ignore[misc]
                    _LOGGER.warning("Command queue full; dropped a message on %s", topic)
                    if refused is not None:
                        refused(topic, CommandError("overloaded", "too many commands waiting; try again in a moment"))
                return

    def _command(self, payload: bytes) -> None:
        if len(payload) > self.max_payload_bytes:
            # Parsing an oversized payload would cost what the limit is there to refuse (the broker
            # allows up to 256 MB): look for the id near the start only.
            self._refuse(payload, CommandError("payload_too_large", self._too_large(payload)))
        elif not self.bucket.take():
            self._refuse(payload, CommandError("rate_limited", "too many commands; try again in a moment"))
        elif not self.commands.offer(lambda: self._execute(payload)):
            self._refuse(payload, CommandError("overloaded", "too many commands waiting; try again in a moment"))

    def _too_large(self, payload: bytes) -> str:
        return f"command is {len(payload)} bytes; the limit is {self.max_payload_bytes}"

    def _refuse(self, payload: bytes, error: CommandError) -> None:
        self._respond(refusal(request_id_near_start(payload), None, error))

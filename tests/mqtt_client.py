"""A real MQTT client for tests: records every message and waits for conditions."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Watcher:
    """Subscribes to everything and keeps the latest payload per topic plus the full log."""

    def __init__(
        self,
        port: int,
        topics: tuple[str, ...] = ("#",),
        client_id: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_certs: Path | None = None,
    ) -> None:
        self.port = port
        self.latest: dict[str, bytes] = {}
        self.retained: dict[str, bool] = {}
        self.log: list[tuple[float, str, bytes]] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.topics = topics
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_certs is not None:
            self.client.tls_set(ca_certs=str(ca_certs))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "test client could not connect"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.latest[msg.topic] = bytes(msg.payload)
            self.retained[msg.topic] = bool(msg.retain)
            self.log.append((time.monotonic(), msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def json(self, topic: str) -> Any:
        with self._cond:
            return json.loads(self.latest[topic])

    def wait_for(self, topic: str, predicate: Callable[[Any], bool] = lambda _: True, timeout: float = 60) -> Any:
        """The first (latest) JSON payload on `topic` that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                raw = self.latest.get(topic)
                if raw is not None:
                    try:
                        value: Any = json.loads(raw)
                    except ValueError:
                        value = raw.decode("utf-8", "replace")
                    if predicate(value):
                        return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting on {topic}; last: {raw!r}")
                self._cond.wait(remaining)

    def messages(self, topic: str) -> list[bytes]:
        with self._cond:
            return [payload for _, t, payload in self.log if t == topic]

    def request(self, command_topic: str, response_topic: str, body: dict[str, Any], timeout: float = 10) -> Any:
        """Send a JSON command with a fresh request_id and return its response."""
        body = dict(body)
        body.setdefault("request_id", uuid.uuid4().hex)
        start = len(self.messages(response_topic))
        self.publish(command_topic, json.dumps(body))
        deadline = time.monotonic() + timeout
        with self._cond:
            while time.monotonic() < deadline:
                for payload in self.messages(response_topic)[start:]:
                    response = json.loads(payload)
                    if response.get("request_id") == body["request_id"]:
                        return response
                self._cond.wait(0.1)
        raise AssertionError(f"no response to {body}")

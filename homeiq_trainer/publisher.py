"""Retained topics out: the publisher stores and publishes every retained value under one lock.

On every (re)connect, and after Home Assistant's birth message, it announces: discovery, then every
retained value it holds, then `online` last. Storing and publishing under the same lock means a
re-announce can never publish an older value after a newer one. Anyone may publish a retained value
by topic (`retain`); what the values mean is the reporter's business (`reporter.py`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from pydantic import BaseModel

_LOGGER = logging.getLogger(__name__)

QOS_RELIABLE = 1


class Link(Protocol):
    """What the publisher needs of the broker connection (`mqtt.MqttLink`)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo: ...

    def announce_online(self) -> None: ...


class Publisher:
    """Owns the retained topics, their replay on connect, the announce and the command answers."""

    def __init__(
        self,
        link: Link,
        response_topic: str,
        discovery: Callable[[], tuple[str, dict[str, Any] | None] | None],
        announce_delay_max_s: float,
    ) -> None:
        self.link = link
        self.response_topic = response_topic
        self._discovery = discovery
        self.announce_delay_max_s = announce_delay_max_s
        self._lock = threading.RLock()
        self._retained: dict[str, tuple[str, int]] = {}
        self._announce_timer: threading.Timer | None = None
        self._stopping = False

    def retain(self, topic: str, payload: str | BaseModel, qos: int = QOS_RELIABLE) -> None:
        """Keep `payload` as the retained value of `topic` and publish it if connected."""
        text = payload if isinstance(payload, str) else payload.model_dump_json()
        # Store and publish under one lock, so a re-announce can never publish an older value last.
        with self._lock:
            self._retained[topic] = (text, qos)
            if self.link.connected:
                self.link.publish(topic, text, qos=qos, retain=True)

    def event(self, topic: str, payload: BaseModel) -> None:
        """Publish one event (not retained: a trigger fires once). While the broker is away it waits
        in the client's bounded queue (`mqtt.max_queued_messages`) and goes out on the reconnect, as
        answers do: a run ending during a broker restart still fires `run_completed`."""
        with self._lock:
            self.link.publish(topic, payload.model_dump_json(), qos=QOS_RELIABLE)

    def respond(self, text: str) -> None:
        """Publish one command answer (not retained)."""
        self.link.publish(self.response_topic, text, qos=QOS_RELIABLE)

    def announce(self) -> None:
        """Publish discovery and every retained value, then `online` last (on every connect)."""
        with self._lock:
            if self._stopping or not self.link.connected:
                return
            try:
                discovery = self._discovery()
            except Exception:  # a bug there must not keep the state and `online` from Home Assistant
                _LOGGER.exception("Building the discovery message failed; publishing the state without it")
                discovery = None
            if discovery is not None:
                topic, payload = discovery
                # No payload: clear the retained message (an empty retained message deletes it).
                text = b"" if payload is None else json.dumps(payload)
                self.link.publish(topic, text, qos=QOS_RELIABLE, retain=True)
            for topic, (text, qos) in self._retained.items():
                self.link.publish(topic, text, qos=qos, retain=True)
            self.link.announce_online()

    def schedule_announce(self) -> None:
        """Announce after a random delay (Home Assistant's birth reaches every integration at once)."""
        delay = random.uniform(0, self.announce_delay_max_s)
        with self._lock:
            if self._stopping:
                return
            if self._announce_timer is not None:
                self._announce_timer.cancel()
            self._announce_timer = threading.Timer(delay, self.announce)
            self._announce_timer.daemon = True
            self._announce_timer.start()

    def close(self) -> None:
        """No more announces: after this no birth message can put an `online` behind our `offline`."""
        with self._lock:
            self._stopping = True
            if self._announce_timer is not None:
                self._announce_timer.cancel()

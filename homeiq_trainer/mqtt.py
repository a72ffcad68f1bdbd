"""The paho client: connect with backoff, will, subscribe, re-announce, publish through one lock.

Knows nothing about training: the app hands it callbacks for "connected" and "message".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from homeiq_trainer.settings import MqttSettings
from homeiq_trainer.topics import AVAILABLE, NOT_AVAILABLE

_LOGGER = logging.getLogger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
OFFLINE_PUBLISH_TIMEOUT_S = 3.0

MessageHandler = Callable[[paho.MQTTMessage], None]


class MqttLink:
    """One broker connection that keeps itself up."""

    def __init__(
        self,
        settings: MqttSettings,
        availability_topic: str,
        subscriptions: dict[str, int],
        on_connected: Callable[[], None],
        on_message: MessageHandler,
        client_id: str | None = None,
        will: bool = True,
    ) -> None:
        self.settings = settings
        self.availability_topic = availability_topic
        self.subscriptions = subscriptions
        self._on_connected = on_connected
        self._on_message = on_message
        self._publish_lock = threading.Lock()
        self._connected = threading.Event()
        self._last_failure: str | None = None
        self._subscribe_mid: int | None = None
        # paho restarts its backoff at every CONNACK, so a broker that accepts the connection and then
        # drops it (an ACL refusing a subscription by closing, as AWS IoT does) got a reconnect every
        # second for ever: such drops double this floor, and being ready resets it.
        self._early_drop_delay_s = RECONNECT_MIN_S
        self._accepted = False  # this connection got its CONNACK
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or settings.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if will:
            client.will_set(availability_topic, NOT_AVAILABLE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        # Bounded: while the broker is away, answers and progress must not pile up without limit.
        client.max_queued_messages_set(settings.max_queued_messages)
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            client.tls_set(
                ca_certs=str(settings.ca_certs) if settings.ca_certs else None,
                certfile=str(settings.certfile) if settings.certfile else None,
                keyfile=str(settings.keyfile) if settings.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(settings.tls_insecure)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_message = self._handle_message
        client.on_socket_open = self._handle_socket_open
        self._client = client

    @property
    def connected(self) -> bool:
        """Whether the broker accepted us and our subscriptions, and we have not lost it since."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or the timeout passes."""
        return self._connected.wait(timeout_s)

    def start(self) -> None:
        """Connect in the background; retries with backoff until stopped."""
        _LOGGER.info("Connecting to MQTT broker %s:%d", self.settings.host, self.settings.port)
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self._client.loop_start()

    def stop(self, announce_offline: bool = True) -> None:
        """Say `offline` ourselves (the broker sends no will on a clean disconnect), then disconnect."""
        if announce_offline and self.connected:
            info = self.publish(self.availability_topic, NOT_AVAILABLE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=OFFLINE_PUBLISH_TIMEOUT_S)
            except (RuntimeError, ValueError):
                _LOGGER.warning("Could not confirm the offline message before disconnecting")
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        """Publish from any thread."""
        with self._publish_lock:
            return self._client.publish(topic, payload, qos=qos, retain=retain)

    def announce_online(self) -> None:
        """Publish `online`; call after every retained state is out."""
        self.publish(self.availability_topic, AVAILABLE, qos=1, retain=True)

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle's algorithm on, which delays each small QoS 1 exchange on loopback by ~40 ms.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _log_failure(self, what: str, reason: str) -> None:
        # Once per distinct reason, so a wrong password or a bad certificate is one clear line, not a flood.
        if reason != self._last_failure:
            _LOGGER.error(
                "MQTT broker %s:%d %s: %s; retrying with backoff up to %d s",
                self.settings.host,
                self.settings.port,
                what,
                reason,
                RECONNECT_MAX_S,
            )
            self._last_failure = reason

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho passes no reason, but calls this from inside its `except OSError`: a refused TCP
        # connection or a TLS handshake that failed (an untrusted certificate) would otherwise be silent.
        error = sys.exc_info()[1]
        self._log_failure("could not be reached", str(error) if error else "connection failed")

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._log_failure("refused the connection", str(reason_code))
            return
        self._accepted = True
        _LOGGER.info("Connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        if not self.subscriptions:
            self._ready()
            return
        # Ready (and `online`) only once the broker confirmed the subscriptions: a command sent the
        # moment we look connected must not fall into the gap before the broker subscribed us.
        _, self._subscribe_mid = client.subscribe(list(self.subscriptions.items()))

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            _LOGGER.error("The broker refused a subscription (%s); check its ACL", refused[0])
        self._ready()

    def _ready(self) -> None:
        self._last_failure = None
        if self._early_drop_delay_s != RECONNECT_MIN_S:
            self._early_drop_delay_s = RECONNECT_MIN_S
            self._client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        self._connected.set()
        try:
            self._on_connected()
        except Exception:  # a callback bug must not kill paho's network thread
            _LOGGER.exception("Announcing after connect failed")

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        was_connected, accepted = self._connected.is_set(), self._accepted
        self._connected.clear()
        self._accepted = False
        if was_connected and reason_code.is_failure:
            _LOGGER.warning("Lost the MQTT broker (%s); reconnecting", reason_code)
        elif accepted and not was_connected and reason_code.is_failure:
            # Accepted, then dropped before confirming the subscriptions: never `online`, so back off.
            self._log_failure("closed the connection before confirming the subscriptions (its ACL?)", str(reason_code))
            self._early_drop_delay_s = min(self._early_drop_delay_s * 2, RECONNECT_MAX_S)
            client.reconnect_delay_set(min_delay=self._early_drop_delay_s, max_delay=RECONNECT_MAX_S)

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._on_message(message)
        except Exception:  # never let one message take the network thread down
            _LOGGER.exception("Handling a message on %s failed", message.topic)

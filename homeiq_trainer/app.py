"""The daemon, wired: paho callback → command queue → command thread → runner → reporter → publisher.

Follow a `start` from the broker to the history and back:

1. `MqttLink` (mqtt.py) receives it on paho's network thread and hands it to `Intake.on_message`
   (commands.py), which only checks its size and the rate limit and puts it in the bounded
   `CommandQueue`, or answers `payload_too_large`, `rate_limited` or `overloaded` at once.
2. The command thread runs `Dispatcher.execute` (dispatcher.py): parse and validate into a
   `Command` (messages.py), recall an earlier answer by request id (idempotency.py), then call the
   action's handler from the dispatcher's table. `start` checks the allow-list, counts new examples
   off the command thread when asked to, and calls `Runner.submit`.
3. The runner (runner.py) writes the `queued` history row (history.py, through jobs.py), starts the
   training process (worker.py → training/run.py), follows its events and records the result.
4. Everything the runner says goes to the `RunReporter` (reporter.py), which turns it into typed
   retained values and hands them to the `Publisher` (publisher.py): stored and published under one
   lock, replayed on every reconnect with discovery, `online` last.
5. The dispatcher's answer goes out on `<base>/response` through the same publisher.

`TrainerApp` only builds these and starts and stops them; nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from homeiq_trainer.commands import CommandQueue, Intake, TokenBucket, TopicHandler, TopicRefusal
from homeiq_trainer.control import SettingsPanel
from homeiq_trainer.discovery import build_discovery
from homeiq_trainer.dispatcher import Dispatcher
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.idempotency import RequestMemory
from homeiq_trainer.jobs import InstanceLock, open_history, recover
from homeiq_trainer.mqtt import MqttLink
from homeiq_trainer.publisher import Publisher
from homeiq_trainer.reporter import RunReporter
from homeiq_trainer.runner import Launcher, Runner
from homeiq_trainer.settings import DEFAULT_BASE_TOPIC, DEFAULT_INSTANCE_ID, Settings
from homeiq_trainer.settings_entities import SettingsEntities
from homeiq_trainer.topics import Topics

_LOGGER = logging.getLogger(__name__)

DISCOVERY_REMOVAL_GRACE_S = 2.0
"""`discovery --remove`: time for Home Assistant to drop the entities before their state topics are
cleared (an empty state reaching a live entity is a template warning in its log)."""


class NotStarted(RuntimeError):
    """The app was asked for a part that only exists between `start()` and `stop()`."""


@dataclass
class _Parts:
    store: HistoryStore
    runner: Runner
    link: MqttLink
    publisher: Publisher
    reporter: RunReporter
    dispatcher: Dispatcher
    commands: CommandQueue
    entities: SettingsEntities


class TrainerApp:
    """Builds the daemon's parts in `start()` and takes them down in `stop()`."""

    def __init__(
        self, settings: Settings, launcher: Launcher | None = None, command_line: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.command_line = command_line
        """Settings the command line gave: pinned, so Home Assistant cannot change them."""
        self.topics = Topics.from_settings(settings)
        self.launcher = launcher
        self.memory = RequestMemory()
        self._routes: dict[str, TopicHandler] = {}
        self._discovery_cleared = False
        self._parts: _Parts | None = None
        self._cleanup = contextlib.ExitStack()

    def route(self, subscription: str, handler: TopicHandler) -> None:
        """Before `start()`: subscribe to `subscription` and run `handler(topic, payload)` on the command thread."""
        self._routes[subscription] = handler

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, connect: bool = True) -> None:
        """Take the instance lock, recover, open the history, publish the initial state, connect.

        Whatever was taken is given back if any step fails. `connect=False` serves commands given to
        `handle_command` only (tests and tools).
        """
        mqtt, instance = self.settings.mqtt, self.settings.daemon.instance_id
        if instance != DEFAULT_INSTANCE_ID and mqtt.base_topic == DEFAULT_BASE_TOPIC:
            # Its own device and client id, but the default instance's topics: beside it, a press of
            # either's Start button would start a run in both.
            _LOGGER.warning(
                "daemon.instance_id is %r but mqtt.base_topic is the default %r: a second instance needs its "
                "own base_topic (say %s/%s), or both obey each other's commands and overwrite each other's state",
                instance,
                DEFAULT_BASE_TOPIC,
                DEFAULT_BASE_TOPIC,
                instance,
            )
        with contextlib.ExitStack() as stack:
            lock = InstanceLock(self.settings)
            lock.acquire()
            stack.callback(lock.release)
            keeping = threading.Event()
            lock.keep(keeping)  # a history on a server: its lock is taken again when the server ends our session
            stack.callback(keeping.set)
            store = open_history(self.settings)
            stack.callback(store.close)
            interrupted = recover(store, self.settings)
            parts = self._build(store, lock)
            parts.reporter.publish_initial(interrupted)
            parts.entities.start()
            stack.callback(parts.entities.stop)
            parts.commands.start()
            stack.callback(parts.commands.stop)
            if connect:
                parts.link.start()
                stack.callback(parts.link.stop)
            self._parts = parts
            self._cleanup = stack.pop_all()

    def _build(self, store: HistoryStore, lock: InstanceLock) -> _Parts:
        settings, topics = self.settings, self.topics
        commands = CommandQueue(settings.daemon.command_queue_size)
        intake = Intake(
            command_topic=topics.command,
            max_payload_bytes=settings.daemon.max_payload_bytes,
            bucket=TokenBucket(settings.daemon.commands_per_s, settings.daemon.command_burst),
            commands=commands,
            execute=lambda payload: dispatcher.execute(payload),
            respond=lambda text: publisher.respond(text),
            on_birth=lambda: publisher.schedule_announce(),
            birth_topic=topics.ha_status,
        )
        routes: dict[str, TopicHandler] = {
            topics.setting_commands: lambda topic, payload: entities.on_setting(topic, payload),
            topics.reannounce: lambda topic, payload: entities.on_reannounce(topic, payload),
            **self._routes,  # a route given to `route()` wins
        }
        # A setting dropped for the rate is answered like one refused, so an automation can retry it.
        refusals: dict[str, TopicRefusal] = {
            topics.setting_commands: lambda topic, error: entities.refused_setting(topic, error),
        }
        for subscription, handler in routes.items():
            intake.route(subscription, handler, refusals.get(subscription))
        subscriptions = {topics.command: 1, topics.ha_status: 1} | dict.fromkeys(routes, 1)
        link = MqttLink(
            settings.mqtt,
            availability_topic=topics.availability,
            subscriptions=subscriptions,
            on_connected=lambda: publisher.announce(),
            on_message=intake.on_message,
        )
        publisher = Publisher(
            link,
            topics.response,
            discovery=self._discovery,
            announce_delay_max_s=settings.daemon.announce_delay_max_s,
        )
        reporter = RunReporter(settings, topics, publisher, store)
        entities = SettingsEntities(settings, topics, store, publisher, self.command_line)
        runner = Runner(
            settings, store, listener=entities.listening_to(reporter), launcher=self.launcher, before_open=lock.ensure
        )
        dispatcher = Dispatcher(
            settings,
            runner,
            reporter,
            store,
            self.memory,
            publisher.respond,
            commands.post,
            run_settings=entities.run_settings,
        )
        return _Parts(store, runner, link, publisher, reporter, dispatcher, commands, entities)

    def _discovery(self) -> tuple[str, dict[str, Any] | None] | None:
        if not self.settings.mqtt.discovery:
            # Cleared: an earlier announcement stays retained otherwise, and Home Assistant keeps the device.
            # Once per start: Home Assistant logs a warning for each removal of a device it no longer has.
            if self._discovery_cleared:
                return None
            self._discovery_cleared = True
            return self.topics.discovery, None
        return self.topics.discovery, build_discovery(self.settings, self.topics).payload()

    def stop(self) -> None:
        """Stop accepting, cancel a running run, publish the final state and `offline`, release everything."""
        parts = self._parts
        if parts is None:
            return
        parts.runner.shutdown(self.settings.daemon.stop_timeout_s)
        parts.publisher.close()
        self._parts = None
        self._cleanup.close()

    # --- the parts, while started ----------------------------------------------------------------

    def _started(self) -> _Parts:
        if self._parts is None:
            raise NotStarted("TrainerApp.start() has not been called, or stop() has")
        return self._parts

    @property
    def store(self) -> HistoryStore:
        return self._started().store

    @property
    def runner(self) -> Runner:
        return self._started().runner

    @property
    def link(self) -> MqttLink:
        return self._started().link

    @property
    def publisher(self) -> Publisher:
        return self._started().publisher

    @property
    def panel(self) -> SettingsPanel:
        """The settings Home Assistant shows and changes."""
        return self._started().entities.panel

    def handle_command(self, payload: bytes) -> str:
        """The answer to one raw command, on the caller's thread (tests and tools; the daemon queues them)."""
        return self._started().dispatcher.handle(payload)


def serve(settings: Settings, launcher: Launcher | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; exits 0 after a clean stop."""
    app = TrainerApp(settings, launcher=launcher)
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
    discovery, *states = topics.retained_state_topics()
    infos = [link.publish(discovery, b"", qos=1, retain=True)]
    with contextlib.suppress(RuntimeError, ValueError):  # raised when the connection drops meanwhile
        infos[0].wait_for_publish(timeout=timeout_s)
        time.sleep(DISCOVERY_REMOVAL_GRACE_S)
        infos += [link.publish(topic, b"", qos=1, retain=True) for topic in states]
        for info in infos:
            info.wait_for_publish(timeout=timeout_s)
    link.stop(announce_offline=False)
    if not all(_confirmed(info) for info in infos):
        _LOGGER.error("The broker did not confirm every removal; run the command again")
        return 1
    print(f"removed {len(infos)} retained topics under {topics.base} and {topics.discovery}")
    return 0


def _confirmed(info: Any) -> bool:
    """Whether the broker confirmed a publish (paho raises for one that never left: no connection)."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return False


def show_discovery(settings: Settings) -> int:
    """Print the discovery payload this instance publishes."""
    topics = Topics.from_settings(settings)
    print(topics.discovery)
    print(json.dumps(build_discovery(settings, topics).payload(), indent=2))
    return 0

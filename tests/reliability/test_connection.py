"""Security of the connection: TLS with a CA made here, client certificates, logins, backoff, ACL."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.mqtt import MqttLink
from homeiq_trainer.settings import MqttSettings
from homeiq_trainer.topics import Topics

from ..conftest import Broker, SettingsFactory, free_port
from .conftest import AVAILABILITY, CMD, RESP, STATE, Client, daemon_settings

HERE = Path(__file__).parent
NOT_CONNECTED_WAIT_S = 2.5


def _link(port: int, **mqtt: Any) -> MqttLink:
    settings = MqttSettings(host="127.0.0.1", port=port, client_id="homeiq-trainer-link", **mqtt)
    return MqttLink(settings, "homeiq/trainer/availability", {}, lambda: None, lambda _m: None)


def _broker(tmp_path: Path, name: str, config: str, port: int) -> Broker:
    log = tmp_path / f"{name}.log"
    return Broker(tmp_path / name, port, extra_config=f"{config}log_dest file {log}\nlog_type all\n")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Any]) -> Iterator[tuple[Broker, int, int]]:
    """TLS on one port (server cert from the test CA), mutual TLS on another, plain on a third for checks."""
    plain, tls, mtls = free_port(), free_port(), free_port()
    ca, (cert, key) = pki["ca"][0], pki["server"]
    config = (
        f"allow_anonymous true\nlistener {plain} 127.0.0.1\n"
        f"listener {tls} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"listener {mtls} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n"
    )
    broker = _broker(tmp_path, "tls", config, plain)
    broker.start()
    yield broker, tls, mtls
    broker.stop()


def test_tls_with_the_test_ca_carries_commands(
    make_settings: SettingsFactory, tls_broker: tuple[Broker, int, int], pki: dict[str, Any]
) -> None:
    broker, tls_port, _ = tls_broker
    ca = pki["ca"][0]
    app = TrainerApp(daemon_settings(make_settings, tls_port, mqtt={"tls": True, "ca_certs": str(ca)}))
    app.start()
    try:
        assert app.link.wait_connected(10)
        client = Client(tls_port, ca_certs=ca)
        try:
            assert client.wait_for(AVAILABILITY, lambda v: v == "online", timeout=10) == "online"
            assert client.request(CMD, RESP, {"action": "status"})["status"] == "ok"
        finally:
            client.close()
    finally:
        app.stop()


def test_mutual_tls_needs_the_client_certificate(tls_broker: tuple[Broker, int, int], pki: dict[str, Any]) -> None:
    _, _, mtls_port = tls_broker
    ca = pki["ca"][0]
    cert, key = pki["client"]
    with_cert = _link(mtls_port, tls=True, ca_certs=ca, certfile=cert, keyfile=key)
    without = _link(mtls_port, tls=True, ca_certs=ca)
    with_cert.start()
    without.start()
    try:
        assert with_cert.wait_connected(10)
        assert not without.wait_connected(NOT_CONNECTED_WAIT_S)
    finally:
        with_cert.stop()
        without.stop()


def test_untrusted_server_certificate_is_refused_with_a_clear_line(
    tmp_path: Path, pki: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    cert, key = pki["rogue_server"]
    broker = _broker(
        tmp_path, "rogue", f"allow_anonymous true\nlistener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n", port
    )
    broker.start()
    link = _link(port, tls=True, ca_certs=pki["ca"][0])
    caplog.set_level(logging.INFO, logger="homeiq_trainer")
    try:
        link.start()
        assert not link.wait_connected(NOT_CONNECTED_WAIT_S)
    finally:
        link.stop()
        broker.stop()
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, failures
    assert "certificate verify failed" in failures[0]


def test_host_name_is_checked_unless_tls_insecure(tmp_path: Path, pki: dict[str, Any]) -> None:
    # The server certificate names 127.0.0.1 and localhost; "127.0.0.2" is the same broker by another name.
    port = free_port()
    ca, (cert, key) = pki["ca"][0], pki["server"]
    config = f"allow_anonymous true\nlistener {port}\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    broker = _broker(tmp_path, "name", config, port)
    broker.start()
    strict = MqttLink(
        MqttSettings(host="127.0.0.2", port=port, tls=True, ca_certs=ca, client_id="strict"),
        "t/a",
        {},
        lambda: None,
        lambda _m: None,
    )
    lax = MqttLink(
        MqttSettings(host="127.0.0.2", port=port, tls=True, ca_certs=ca, tls_insecure=True, client_id="lax"),
        "t/a",
        {},
        lambda: None,
        lambda _m: None,
    )
    strict.start()
    lax.start()
    try:
        assert lax.wait_connected(10)
        assert not strict.wait_connected(NOT_CONNECTED_WAIT_S)
    finally:
        strict.stop()
        lax.stop()
        broker.stop()


def test_a_broker_that_drops_us_after_accepting_is_backed_off_and_named(caplog: pytest.LogCaptureFixture) -> None:
    """One that closes on a SUBSCRIBE its ACL refuses (AWS IoT does) got a reconnect every second for
    ever (paho restarts its backoff at each CONNACK), with no line above INFO saying why."""
    server = socket.create_server(("127.0.0.1", 0))
    connections: list[float] = []

    def accept_then_drop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                connections.append(time.monotonic())
                conn.recv(65536)  # CONNECT
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted
                conn.recv(65536)  # SUBSCRIBE, answered by closing

    threading.Thread(target=accept_then_drop, daemon=True).start()
    caplog.set_level(logging.INFO, logger="homeiq_trainer")
    link = MqttLink(
        MqttSettings(host="127.0.0.1", port=server.getsockname()[1], client_id="dropped"),
        "t/availability",
        {"t/command": 1},
        lambda: None,
        lambda _m: None,
    )
    link.start()
    try:
        time.sleep(9)
        assert not link.connected
    finally:
        link.stop()
        server.close()
    gaps = [round(b - a, 1) for a, b in zip(connections, connections[1:], strict=False)]
    assert 2 <= len(connections) <= 4 and gaps == sorted(gaps), gaps  # 0, 2, 6 s; before: every second
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and "before confirming the subscriptions" in failures[0], failures


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    directory = tmp_path / "auth"
    directory.mkdir()
    passwords = directory / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "homeiq-trainer", "s3cret-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "homeassistant", "ha-pw"], check=True)
    port = free_port()
    broker = _broker(
        tmp_path, "auth", f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n", port
    )
    broker.start()
    yield broker
    broker.stop()


def test_login_with_the_right_password(auth_broker: Broker) -> None:
    link = _link(auth_broker.port, username="homeiq-trainer", password="s3cret-pw")
    link.start()
    try:
        assert link.wait_connected(10)
    finally:
        link.stop()


def test_wrong_password_logs_one_line_and_backs_off(auth_broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="homeiq_trainer")
    log = auth_broker.directory.parent / "auth.log"
    link = _link(auth_broker.port, username="homeiq-trainer", password="wrong")
    started = time.time()
    link.start()
    try:
        assert not link.wait_connected(6.0)
    finally:
        link.stop()
    attempts = [int(line.split(":", 1)[0]) for line in log.read_text().splitlines() if "New connection from" in line]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Not authorized" in errors[0], errors
    assert "wrong" not in errors[0]
    # A tight loop would connect hundreds of times in 8 s; backoff from 1 s doubling allows about 5.
    assert 2 <= len(attempts) <= 5, attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert max(gaps) >= 2, gaps  # the delay grows
    assert attempts[0] >= int(started) - 1


def test_acl_example_lets_home_assistant_command_and_only_the_daemon_publish_state(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "acl"
    directory.mkdir()
    passwords = directory / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "homeiq-trainer", "daemon-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "homeassistant", "ha-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "intruder", "lan-pw"], check=True)
    port = free_port()
    config = (
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"acl_file {HERE / 'acl_example.conf'}\n"
    )
    broker = _broker(tmp_path, "acl", config, port)
    broker.start()
    settings = daemon_settings(make_settings, port, mqtt={"username": "homeiq-trainer", "password": "daemon-pw"})
    app = TrainerApp(settings)
    app.start()
    ha = intruder = None
    try:
        assert app.link.wait_connected(10)
        ha = Client(port, username="homeassistant", password="ha-pw")
        intruder = Client(port, username="intruder", password="lan-pw")
        # First half: Home Assistant may command, sees the daemon's state and gets the answer.
        assert ha.wait_for(AVAILABILITY, lambda v: v == "online", timeout=10) == "online"
        assert ha.wait_for(STATE, timeout=10)["state"] == "idle"
        # The update entity and the last decision too: the example once left them out, and Mosquitto
        # acknowledges a refused QoS 1 publish of an MQTT 3.1.1 client, so nothing said so.
        assert "installed_version" in ha.wait_for("homeiq/trainer/adapter", timeout=10)
        ha.wait_for("homeiq/trainer/decision", timeout=10)
        topics = Topics.from_settings(settings)
        daemon_lines = (HERE / "acl_example.conf").read_text().split("user homeiq-trainer", 1)[1].splitlines()
        written = {line.split()[2] for line in daemon_lines if line.startswith("topic write ")}
        assert {*topics.retained_state_topics(), topics.response, topics.event} <= written
        assert ha.request(CMD, RESP, {"action": "status"})["status"] == "ok"
        ha.publish("homeiq/trainer/settings/epochs/set", "2")  # a configuration entity
        assert ha.wait_for("homeiq/trainer/settings", lambda s: s["epochs"] == 2, timeout=10)["epochs"] == 2
        # Second half: nobody but the daemon can write the daemon's topics, not even Home Assistant.
        forged = json.dumps({"state": "completed", "run_id": "run_20990101_000000", "message": "forged"})
        for client in (ha, intruder):
            for topic in (
                STATE,
                AVAILABILITY,
                "homeiq/trainer/model",
                "homeiq/trainer/settings",
                "homeassistant/device/homeiq_trainer/config",
            ):
                client.publish(topic, forged, retain=True)
        # ...and a user other than Home Assistant cannot command it (the daemon never answers this id).
        intruder.publish(CMD, json.dumps({"action": "status", "request_id": "from-intruder"}))
        intruder.publish("homeiq/trainer/settings/epochs/set", "50")
        # Commands are handled in order, and the broker delivers to `ha` in order: once this answer
        # is here, anything forged that got through would be here too.
        marker = ha.request(CMD, RESP, {"action": "status"})
        assert marker["status"] == "ok"
        assert all(b"forged" not in payload for _, _, payload in ha.log)
        assert all(json.loads(p).get("request_id") != "from-intruder" for p in ha.messages(RESP))
        assert ha.json(STATE)["state"] == "idle" and ha.json("homeiq/trainer/settings")["epochs"] == 2
        assert intruder.messages(STATE) == [] and intruder.messages(RESP) == []  # it may not even read them
        checker = Client(port, username="homeassistant", password="ha-pw")  # what a newcomer sees retained
        try:
            assert checker.wait_for(STATE, timeout=5)["state"] == "idle"
            assert checker.wait_for(AVAILABILITY, timeout=5) == "online"
        finally:
            checker.close()
    finally:
        for client in (ha, intruder):
            if client is not None:
                client.close()
        app.stop()
        broker.stop()
    assert re.search(r"Denied PUBLISH", (tmp_path / "acl.log").read_text())


def test_two_instances_on_one_host_keep_their_own_connections(
    make_settings: SettingsFactory, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default client id ignored `instance_id`: each daemon's connect made the broker drop the other."""
    apps = []
    for instance in ("attic", "cellar"):
        settings = make_settings(
            mqtt={"host": "127.0.0.1", "port": broker.port, "base_topic": f"homeiq/{instance}"},
            daemon={"instance_id": instance},
            storage={"output_dir": str(tmp_path / instance), "history_db": str(tmp_path / f"{instance}.db")},
        )
        assert settings.mqtt.client_id.endswith(f"-{instance}")
        apps.append(TrainerApp(settings))
    caplog.set_level(logging.WARNING, logger="homeiq_trainer.mqtt")
    try:
        for app in apps:
            app.start()
            assert app.link.wait_connected(10)
        time.sleep(3)  # with one id, each reconnect (every second) would push the other off
        assert all(app.link.connected for app in apps)
        assert "Lost the MQTT broker" not in caplog.text
    finally:
        for app in apps:
            app.stop()


def test_a_second_instance_on_the_default_topics_is_warned_about(
    make_settings: SettingsFactory, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Its own instance_id but the default base topic: beside the first, one press started a run in both."""
    caplog.set_level(logging.WARNING, logger="homeiq_trainer.app")
    for base_topic, warned in (("homeiq/trainer", True), ("homeiq/cellar", False)):
        caplog.clear()
        mqtt = {"host": "127.0.0.1", "port": broker.port, "base_topic": base_topic}
        app = TrainerApp(make_settings(mqtt=mqtt, daemon={"instance_id": "cellar"}))
        app.start(connect=False)
        app.stop()
        assert ("a second instance needs its own base_topic (say homeiq/trainer/cellar)" in caplog.text) is warned

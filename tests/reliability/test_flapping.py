"""The broker stopped and started five times during one run: the run completes, commands after each
reconnect are answered, and every retained topic is right afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.runner import SubprocessLauncher

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import (
    AVAILABILITY,
    CMD,
    DISCOVERY,
    LAST_RUN,
    MODEL,
    PROGRESS,
    RESP,
    RUNS,
    STATE,
    Client,
    daemon_settings,
    is_done,
    wait_until,
)

FLAPS = 5
STEP_WAIT_S = 1.0
"""How long each training step waits until the test releases the run (tests/reliability/crawling_worker.py)."""


@pytest.fixture
def crawling_app(make_settings: SettingsFactory, broker: Broker, tmp_path: Path) -> Iterator[tuple[TrainerApp, Path]]:
    """A daemon whose runs crawl (one step per STEP_WAIT_S) until the returned file exists."""
    release = tmp_path / "release"
    command = (sys.executable, "-m", "tests.reliability.crawling_worker", str(release), str(STEP_WAIT_S))
    app = TrainerApp(daemon_settings(make_settings, broker.port), launcher=SubprocessLauncher(command))
    app.start()
    assert app.link.wait_connected(10)
    yield app, release
    app.stop()


@pytest.mark.slow
def test_broker_flapping_during_a_run(crawling_app: tuple[TrainerApp, Path], broker: Broker, watcher: Watcher) -> None:
    app, release = crawling_app
    # The run steps slowly, publishing progress all along, until the flaps are over: 12 steps an epoch
    # at the reliability tests' 64 samples, two minutes of runway for five flaps (~4 s each, 20 s in
    # all when quiet); once released, the rest takes seconds.
    response = watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": 10}})
    run_id = response["data"]["run_id"]
    first = watcher.wait_for(PROGRESS, lambda p: p.get("run_id") == run_id and p.get("step", 0) >= 1, timeout=60)
    watcher.close()
    answered, last_step = 0, first["step"]
    for flap in range(FLAPS):
        assert app.runner.active is not None, f"the run ended before flap {flap + 1}: make it longer"
        broker.restart(down_s=1.0)  # no persistence: every retained message is gone each time
        assert wait_until(lambda: app.link.connected, 40), f"no reconnect after flap {flap + 1}"
        client = Client(broker.port)
        try:
            status = client.request(CMD, RESP, {"action": "status"}, timeout=10)
            assert status["status"] == "ok" and status["data"]["state"]["run_id"] == run_id
            # The re-announce put the retained state back on the empty broker.
            assert client.wait_for(AVAILABILITY, timeout=10) == "online"
            assert client.wait_for(STATE, timeout=10)["run_id"] == run_id
            # Training went on through the flap, and its progress reaches the broker again.
            progress = client.wait_for(PROGRESS, lambda p, s=last_step: p.get("step", 0) > s, timeout=10)
            last_step, total_steps = progress["step"], progress["total_steps"]
            answered += 1
        finally:
            client.close()
    release.touch()
    fresh = Client(broker.port)
    try:
        state = fresh.wait_for(STATE, lambda s: s.get("run_id") == run_id and is_done(s), timeout=240)
        assert state["state"] == "completed"
        assert fresh.wait_for(AVAILABILITY, timeout=5) == "online"
        assert fresh.wait_for(PROGRESS, lambda p: p.get("run_id") == run_id, timeout=5)["percent"] == 100.0
        assert fresh.wait_for(LAST_RUN, lambda r: r.get("run_id") == run_id, timeout=5)["status"] == "completed"
        assert fresh.wait_for(RUNS, timeout=5)["runs"][0]["run_id"] == run_id
        assert fresh.wait_for(MODEL, lambda m: m.get("run_id") == run_id, timeout=5)
        assert fresh.wait_for(DISCOVERY, timeout=5)["components"]
        # A client connecting now gets all of it as retained messages, not just live ones.
        late = Client(broker.port)
        try:
            for topic in (AVAILABILITY, STATE, PROGRESS, LAST_RUN, RUNS, MODEL, DISCOVERY):
                late.wait_for(topic, timeout=5)
                assert late.retained[topic], topic
            assert late.json(STATE)["run_id"] == run_id and late.json(MODEL)["run_id"] == run_id
        finally:
            late.close()
    finally:
        fresh.close()
    rows = HistoryStore(app.settings.storage.history_db).recent(5)
    assert [(r.run_identifier, r.status) for r in rows] == [(run_id, "completed")]
    record(
        "broker restarts during one run",
        f"{FLAPS}, {answered} post-reconnect commands answered, training went on through each "
        f"(at steps {first['step']} to {last_step} of {total_steps})",
    )

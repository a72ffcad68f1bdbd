"""The broker stopped and started five times during one run: the run completes, commands after each
reconnect are answered, and every retained topic is right afterwards."""

from __future__ import annotations

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore

from ..conftest import Broker
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
    is_done,
    record,
    wait_until,
)

FLAPS = 5


@pytest.mark.slow
def test_broker_flapping_during_a_run(app: TrainerApp, broker: Broker, watcher: Watcher) -> None:
    # Long enough to outlast five flaps (~4 s each) on a quiet machine, where 100 epochs in batches of
    # 8 took ~20 s (batches of 2 make 4x the steps); short enough to finish in the wait below when loaded.
    response = watcher.request(CMD, RESP, {"action": "start", "params": {"epochs": 100, "batch_size": 2}})
    run_id = response["data"]["run_id"]
    watcher.wait_for(STATE, lambda s: s.get("phase") == "training", timeout=60)
    watcher.close()
    answered = 0
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
            answered += 1
        finally:
            client.close()
    fresh = Client(broker.port)
    try:
        state = fresh.wait_for(STATE, lambda s: s.get("run_id") == run_id and is_done(s), timeout=480)
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
    record("broker restarts during one run", f"{FLAPS}, {answered} post-reconnect commands answered")

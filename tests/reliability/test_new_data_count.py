"""A `min_new_samples` count over 200,000 rows runs off the command thread: `status` keeps answering in
under a second while it runs, and the daemon's resident memory grows by under 20 MB."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from homeiq_trainer.demo import create_source_db

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import AVAILABILITY, CMD, RESP, Daemon, daemon_settings, settings_env

ROWS = 200_000
STATUS_MAX_S = 1.0
RSS_GROWTH_MAX_BYTES = 20 * 2**20


@pytest.mark.slow
def test_count_over_200k_rows_keeps_status_fast_and_memory_flat(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, tmp_path: Path
) -> None:
    db = create_source_db(tmp_path / "big" / "ai_automation.db", rows=ROWS)
    # No clamp: ask for more new examples than exist, so the count reads every row.
    settings = daemon_settings(make_settings, broker.port, data={"source_db": str(db), "max_samples": 1_000_000})
    daemon = Daemon(settings_env(settings), tmp_path / "daemon.log")
    try:
        watcher.wait_for(AVAILABILITY, lambda v: v == "online", timeout=30)
        process = psutil.Process(daemon.pid)
        assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"
        before = process.memory_info().rss
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = {"action": "start", "request_id": "count", "params": {"min_new_samples": 10**6}}
        watcher.publish(CMD, json.dumps(start))
        latencies: list[float] = []
        deadline = time.monotonic() + 240
        while not any(json.loads(p)["request_id"] == "count" for p in watcher.messages(RESP)):
            assert time.monotonic() < deadline, "the count never ended"
            asked = time.monotonic()
            assert watcher.request(CMD, RESP, {"action": "status"}, timeout=5)["status"] == "ok"
            latencies.append(time.monotonic() - asked)
            time.sleep(0.1)
        sampling.set()
        sampler.join(5)
        answer = next(json.loads(p) for p in watcher.messages(RESP) if json.loads(p)["request_id"] == "count")
        assert answer["error"]["code"] == "not_enough_new_data", answer
        assert answer["data"]["new_samples"] > 10_000  # it really counted (the demo rows repeat, so fewer)
        assert len(latencies) >= 5, "the statuses did not overlap the count"
        assert max(latencies) < STATUS_MAX_S, max(latencies)
        growth = peak[0] - before
        assert growth < RSS_GROWTH_MAX_BYTES, f"RSS grew {growth / 2**20:.1f} MB"
        record(
            "new-data count over 200,000 rows",
            f"{answer['data']['new_samples']} distinct new examples; {len(latencies)} statuses meanwhile, "
            f"slowest {max(latencies) * 1000:.0f} ms; daemon RSS +{growth / 2**20:.1f} MB",
        )
    finally:
        assert daemon.stop() == 0

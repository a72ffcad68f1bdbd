"""Soak: 30 back-to-back runs through one daemon lifetime, with no growth in memory, threads or files."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from homeiq_trainer.history import HistoryStore
from homeiq_trainer.training import artifacts

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import (
    AVAILABILITY,
    CMD,
    LAST_RUN,
    MODEL,
    PROGRESS,
    RESP,
    RUNS,
    STATE,
    Daemon,
    daemon_settings,
    is_done,
    settings_env,
)

RUNS_TOTAL = 30
WARMUP_RUNS = 5
RSS_GROWTH_MAX_MB = 20.0
THREADS_GROWTH_MAX = 2
FDS_GROWTH_MAX = 4


def _usage(proc: psutil.Process) -> tuple[float, int, int]:
    return proc.memory_info().rss / 2**20, proc.num_threads(), proc.num_fds()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_30_runs(make_settings: SettingsFactory, broker: Broker, watcher: Watcher, tmp_path: Path) -> None:
    settings = daemon_settings(make_settings, broker.port, data={"max_samples": 24}, storage={"keep_runs": 3})
    daemon = Daemon(settings_env(settings), tmp_path / "daemon.log")
    samples: list[tuple[float, int, int]] = []
    try:
        watcher.wait_for(AVAILABILITY, lambda v: v == "online", timeout=30)
        proc = psutil.Process(daemon.pid)
        for n in range(RUNS_TOTAL):
            response = watcher.request(CMD, RESP, {"action": "start", "request_id": f"soak-{n}"}, timeout=20)
            assert response["status"] == "ok", response
            run_id = response["data"]["run_id"]
            state = watcher.wait_for(STATE, lambda s, r=run_id: s.get("run_id") == r and is_done(s), timeout=120)
            assert state["state"] == "completed", (n, state)
            # Retained state right after each run.
            assert watcher.wait_for(LAST_RUN, lambda r, i=run_id: r.get("run_id") == i, timeout=10)["status"] == (
                "completed"
            )
            assert watcher.wait_for(MODEL, lambda m, i=run_id: m.get("run_id") == i, timeout=10)
            assert watcher.wait_for(PROGRESS, lambda p, i=run_id: p.get("run_id") == i, timeout=10)["percent"] == 100
            assert watcher.wait_for(RUNS, lambda r, i=run_id: r["runs"][0]["run_id"] == i, timeout=10)
            assert artifacts.latest_run(settings.storage.output_dir) == run_id
            assert (
                not proc.children(recursive=True)
                or all(c.status() == psutil.STATUS_ZOMBIE for c in proc.children(recursive=True))
                or psutil.wait_procs(proc.children(recursive=True), timeout=10)[1] == []
            )
            samples.append(_usage(proc))
        base, end = samples[WARMUP_RUNS - 1], samples[-1]
        peak = (
            max(s[0] for s in samples[WARMUP_RUNS:]),
            max(s[1] for s in samples[WARMUP_RUNS:]),
            max(s[2] for s in samples[WARMUP_RUNS:]),
        )
        assert peak[0] - base[0] < RSS_GROWTH_MAX_MB, samples
        assert peak[1] - base[1] <= THREADS_GROWTH_MAX, samples
        assert peak[2] - base[2] <= FDS_GROWTH_MAX, samples
    finally:
        assert daemon.stop() == 0
    rows = HistoryStore(settings.storage.history_db).recent(100)
    assert len(rows) == RUNS_TOTAL and {r.status for r in rows} == {"completed"}
    kept = [p for p in settings.storage.output_dir.iterdir() if p.name.startswith("run_")]
    assert len(kept) == 3  # retention kept up
    record("runs soaked", RUNS_TOTAL)
    record(
        "soak daemon usage after run 5 -> 30 (RSS MB, threads, fds)",
        f"{base[0]:.1f}/{base[1]}/{base[2]} -> {end[0]:.1f}/{end[1]}/{end[2]}",
    )

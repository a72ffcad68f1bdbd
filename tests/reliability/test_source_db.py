"""HomeIQ keeps writing `ask_ai_queries` while we read it: the writer is never locked out because of
us, each read is consistent, and a database locked for too long fails fast with a clear error."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.demo import create_source_db
from homeiq_trainer.training.data import DataError, load_examples

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import CMD, RESP, STATE, daemon_settings, is_done

ROOT = Path(__file__).resolve().parents[2]
READ_FOR_S = 3.0


@contextmanager
def homeiq_writer(db: Path, tmp_path: Path) -> Iterator[dict]:
    stop, stats_file = tmp_path / "stop-writer", tmp_path / "writer-stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.homeiq_writer", str(db), str(stop), str(stats_file)], cwd=ROOT
    )
    stats: dict = {}
    try:
        time.sleep(0.3)
        yield stats
    finally:
        stop.touch()
        proc.wait(timeout=30)
        stats.update(json.loads(stats_file.read_text()))


def _count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM ask_ai_queries WHERE suggestions IS NOT NULL").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("wal", [True, False], ids=["wal", "rollback-journal"])
def test_reads_while_homeiq_writes(tmp_path: Path, wal: bool) -> None:
    db = create_source_db(tmp_path / "ai_automation.db", rows=20_000, wal=wal)
    reads = 0
    with homeiq_writer(db, tmp_path) as stats:
        deadline = time.monotonic() + READ_FOR_S
        while time.monotonic() < deadline:
            before = _count(db)
            examples, report = load_examples(db, max_samples=1_000_000, busy_timeout_s=10)
            after = _count(db)
            # A consistent view: every row that existed when the read began, each once, plus at most
            # the rows written while it ran; newest first.
            assert before <= report.rows_read <= after, (before, report.rows_read, after)
            stamps = [e.created_at for e in examples]
            assert stamps == sorted(stamps, reverse=True)
            reads += 1
    assert stats["locked"] == 0 and stats["other"] == 0, stats
    assert stats["commits"] >= 50, stats  # the writer really wrote throughout
    assert stats["worst_s"] < 2.0, stats
    record(
        f"source reads while writing ({'wal' if wal else 'rollback'})",
        f"{reads} full reads, writer {stats['commits']} commits, 0 locked, worst wait {stats['worst_s']:.3f} s",
    )


def test_locked_too_long_fails_fast_and_clearly(tmp_path: Path) -> None:
    db = create_source_db(tmp_path / "ai_automation.db", rows=200)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # a HomeIQ migration, say
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match=r"locked") as caught:
            load_examples(db, max_samples=100, busy_timeout_s=1.0)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.9 <= waited < 3.0, waited
    assert "\n" not in str(caught.value)
    examples, _ = load_examples(db, max_samples=100, busy_timeout_s=1.0)  # and fine once it is released
    assert examples


def test_daemon_run_while_homeiq_writes(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, tmp_path: Path
) -> None:
    db = create_source_db(tmp_path / "busy" / "ai_automation.db", rows=5_000)  # rollback journal: the harder case
    # 2,000 rows read from under the writer; batches of up to 64 (token budget and all) keep the
    # training that follows to ~45 steps (44 measured): the reads are what this test is about.
    settings = daemon_settings(
        make_settings,
        broker.port,
        data={"source_db": str(db), "max_samples": 2000},
        training={"batch_size": 64, "batch_tokens": 16_384},
    )
    app = TrainerApp(settings)
    app.start()
    try:
        assert app.link.wait_connected(10)
        with homeiq_writer(db, tmp_path) as stats:
            response = watcher.request(CMD, RESP, {"action": "start"})
            run_id = response["data"]["run_id"]
            state = watcher.wait_for(STATE, lambda s: s.get("run_id") == run_id and is_done(s), timeout=180)
        assert state["state"] == "completed", state
    finally:
        app.stop()
    assert stats["locked"] == 0 and stats["other"] == 0 and stats["commits"] > 0, stats

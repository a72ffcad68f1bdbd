"""The daemon SIGKILLed in each phase of a run, then restarted: nothing is left open or half-promoted.

`queued` lasts microseconds and `saving` milliseconds with the tiny model, so those two are held open
by a pausing launcher (`paused_daemon.py`) that production code knows nothing about.
`loading_data` is held the honest way: the test locks HomeIQ's database as a writer would, and
`training` needs no help. Half-written files a crash mid-write would leave are planted as well.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psutil
import pytest

from homeiq_trainer.history import INTERRUPTED_MESSAGE, HistoryStore
from homeiq_trainer.settings import Settings
from homeiq_trainer.training import artifacts

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import AVAILABILITY, CMD, MODEL, RESP, STATE, Daemon, daemon_settings, is_done, settings_env


def _start_daemon(settings: Settings, watcher: Watcher, log: Path, pause: tuple[str, float] | None = None) -> Daemon:
    daemon = Daemon(settings_env(settings), log, pause)
    watcher.wait_for(AVAILABILITY, lambda v: v == "online", timeout=30)
    return daemon


def _kill(daemon: Daemon, watcher: Watcher) -> None:
    children = psutil.Process(daemon.pid).children(recursive=True)
    daemon.kill()
    assert watcher.wait_for(AVAILABILITY, lambda v: v == "offline", timeout=30) == "offline"
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "a training process outlived the daemon"


def _assert_recovered(settings: Settings, killed_run: str, latest_before: str | None, watcher: Watcher) -> None:
    """What a restart must leave: the killed run failed as interrupted, nothing half-written anywhere."""
    state = watcher.wait_for(STATE, lambda s: s.get("run_id") == killed_run and s["state"] == "failed", timeout=30)
    assert "interrupted" in state["message"]
    store = HistoryStore(settings.storage.history_db)
    try:
        rows = store.recent(100)
        assert not [r.run_identifier for r in rows if r.status in ("queued", "running")]
        killed = store.by_identifier(killed_run)
        assert killed is not None and killed.status == "failed" and killed.error_message == INTERRUPTED_MESSAGE
    finally:
        store.close()
    out = settings.storage.output_dir
    assert artifacts.latest_run(out) == latest_before  # unchanged, and complete
    assert not list(out.glob(".staging-*")) and not list(out.glob(".latest.*.tmp"))
    assert not (out / killed_run).exists()  # never finalized
    model = watcher.wait_for(MODEL, timeout=10)
    assert model.get("run_id") == latest_before


def _start_run(watcher: Watcher, **params: object) -> str:
    body: dict = {"action": "start"}
    if params:
        body["params"] = params
    response = watcher.request(CMD, RESP, body, timeout=20)
    assert response["status"] == "ok", response
    return str(response["data"]["run_id"])


@pytest.mark.slow
def test_sigkill_in_every_phase_then_restart(
    make_settings: SettingsFactory, broker: Broker, watcher: Watcher, source_db: Path, tmp_path: Path
) -> None:
    settings = daemon_settings(make_settings, broker.port)
    out = settings.storage.output_dir
    log = tmp_path / "daemon.log"
    restarts = 0

    # A completed run first, so that "latest unchanged" means something.
    daemon = _start_daemon(settings, watcher, log)
    baseline = _start_run(watcher)
    assert watcher.wait_for(STATE, lambda s: s.get("run_id") == baseline and is_done(s), timeout=120)["state"] == (
        "completed"
    )
    assert artifacts.latest_run(out) == baseline

    # training
    run = _start_run(watcher, epochs=100)
    watcher.wait_for(STATE, lambda s: s.get("run_id") == run and s.get("phase") == "training", timeout=60)
    _kill(daemon, watcher)

    # queued (held by the test hook), after the restart has cleaned up the previous kill
    daemon = _start_daemon(settings, watcher, log, pause=("queued", 60))
    restarts += 1
    _assert_recovered(settings, run, baseline, watcher)
    run = _start_run(watcher)
    watcher.wait_for(STATE, lambda s: s.get("run_id") == run and s["state"] == "queued", timeout=20)
    row = HistoryStore(settings.storage.history_db).by_identifier(run)
    assert row is not None and row.status == "queued"
    _kill(daemon, watcher)

    # loading_data: HomeIQ holds its database locked, the loader waits (bounded) for it
    daemon = _start_daemon(settings, watcher, log)
    restarts += 1
    _assert_recovered(settings, run, baseline, watcher)
    writer = sqlite3.connect(source_db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        run = _start_run(watcher)
        watcher.wait_for(STATE, lambda s: s.get("run_id") == run and s.get("phase") == "loading_data", timeout=30)
        _kill(daemon, watcher)
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    # saving (held by the test hook right after the child reported it)
    daemon = _start_daemon(settings, watcher, log, pause=("saving", 60))
    restarts += 1
    _assert_recovered(settings, run, baseline, watcher)
    run = _start_run(watcher)
    watcher.wait_for(STATE, lambda s: s.get("run_id") == run and s.get("phase") == "saving", timeout=120)
    _kill(daemon, watcher)

    # What a kill in the middle of a write leaves, planted: a staging dir with half an adapter, a stray
    # temporary `latest` link, and a run directory without its training_run.json.
    staging = out / ".staging-run_20990101_000000"
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    (staging / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (out / ".latest.4242.tmp").symlink_to("run_20990101_000000")
    half = out / "run_20990101_000001"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 10)

    daemon = _start_daemon(settings, watcher, log)
    restarts += 1
    try:
        _assert_recovered(settings, run, baseline, watcher)
        refused = watcher.request(CMD, RESP, {"action": "start", "params": {"resume_from": half.name}})
        assert refused["error"]["code"] == "unknown_run"
        final = _start_run(watcher)
        state = watcher.wait_for(STATE, lambda s: s.get("run_id") == final and is_done(s), timeout=120)
        assert state["state"] == "completed"
        assert artifacts.latest_run(out) == final and artifacts.is_complete(out / final)
        meta = json.loads((out / final / artifacts.METADATA_FILE).read_text())
        assert meta["run_id"] == final
        rows = HistoryStore(settings.storage.history_db).recent(10)
        assert [r.status for r in rows] == ["completed", "failed", "failed", "failed", "failed", "completed"]
    finally:
        assert daemon.stop() == 0
    record("crash phases survived", "queued, loading_data, training, saving")
    record("restarts survived", restarts)

"""The output directory full or read-only (a small tmpfs): the run fails with a clear message, `latest`
is untouched, the daemon keeps serving, and the next run after the fault clears succeeds."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.training import artifacts

from ..conftest import Broker, SettingsFactory, record
from ..mqtt_client import Watcher
from .conftest import CMD, LAST_RUN, MODEL, RESP, STATE, daemon_settings, is_done, remount, tmpfs


@pytest.fixture
def disk_app(make_settings: SettingsFactory, broker: Broker, tmp_path: Path) -> Iterator[TrainerApp]:
    with tmpfs(tmp_path / "mnt", "8m") as mount:
        # Every completed run is served (`always`), so `latest` shows the last good run; the quality gate
        # has its own tests.
        settings = daemon_settings(
            make_settings, broker.port, storage={"output_dir": str(mount / "out")}, promotion={"policy": "always"}
        )
        app = TrainerApp(settings)
        app.start()
        assert app.link.wait_connected(10)
        try:
            yield app
        finally:
            app.stop()
            with contextlib.suppress(Exception):
                remount(mount, "rw")


def _run(watcher: Watcher) -> dict:
    response = watcher.request(CMD, RESP, {"action": "start"}, timeout=20)
    assert response["status"] == "ok", response
    run_id = response["data"]["run_id"]
    return watcher.wait_for(STATE, lambda s: s.get("run_id") == run_id and is_done(s), timeout=120)


def _fill(directory: Path, leave_bytes: int) -> Path:
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\x00" * 4096)
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


def _assert_unharmed(app: TrainerApp, watcher: Watcher, latest: str, failed: dict, reason: str) -> None:
    out = app.settings.storage.output_dir
    assert failed["state"] == "failed"
    assert reason in failed["message"] and len(failed["message"]) < 300 and "Traceback" not in failed["message"]
    assert artifacts.latest_run(out) == latest and artifacts.is_complete(out / latest)
    assert not (out / failed["run_id"]).exists() and not list(out.glob(".staging-*"))
    assert watcher.wait_for(MODEL, timeout=5)["run_id"] == latest
    last = watcher.wait_for(LAST_RUN, lambda r: r.get("run_id") == failed["run_id"], timeout=5)
    assert last["status"] == "failed" and reason in last["error"] and "\n" not in last["error"].strip()
    assert watcher.request(CMD, RESP, {"action": "status"})["status"] == "ok"  # still serving
    row = HistoryStore(app.settings.storage.history_db).by_identifier(failed["run_id"])
    assert row is not None and row.status == "failed"


@pytest.mark.slow
def test_output_dir_read_only_or_full(disk_app: TrainerApp, watcher: Watcher) -> None:
    out = disk_app.settings.storage.output_dir
    first = _run(watcher)
    assert first["state"] == "completed"
    latest = first["run_id"]

    remount(out.parent, "ro")
    _assert_unharmed(disk_app, watcher, latest, _run(watcher), "Read-only file system")
    remount(out.parent, "rw")

    # Room for the trainer's scratch files, not for the ~100 KB adapter: the disk fills while saving.
    filler = _fill(out.parent, leave_bytes=64 * 1024)
    _assert_unharmed(disk_app, watcher, latest, _run(watcher), "No space left on device")
    filler.unlink()
    # Full before the run even starts.
    filler = _fill(out.parent, leave_bytes=0)
    _assert_unharmed(disk_app, watcher, latest, _run(watcher), "No space left on device")
    filler.unlink()

    after = _run(watcher)
    assert after["state"] == "completed" and artifacts.latest_run(out) == after["run_id"]
    record("disk faults survived", "read-only, full while saving, full before start")

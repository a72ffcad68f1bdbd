"""Serving: crash-consistent switches, promote, rollback, retention that keeps what may be served."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.history import HistoryStore
from homeiq_trainer.jobs import JobRequest, open_run, recover
from homeiq_trainer.messages import Decision, RunMetadata, RunResult, RunStatus, TrainParams
from homeiq_trainer.promotion import (
    PromotionError,
    conclude,
    offered,
    promote,
    protected_runs,
    reconcile,
    rollback,
)
from homeiq_trainer.settings import Settings
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.run import execute_run

from .conftest import SettingsFactory, train_and_serve


def _fake_run(
    store: HistoryStore,
    settings: Settings,
    run_id: str,
    decision: Decision,
    serve: bool = False,
    evaluation: dict[str, Any] | None = None,
) -> None:
    """A completed run: a directory with a valid (tiny) safetensors file and its history row."""
    import torch
    from safetensors.torch import save_file

    out = settings.storage.output_dir
    run_dir = out / run_id
    run_dir.mkdir(parents=True)
    save_file({"w": torch.zeros(2, 3)}, str(run_dir / "adapter_model.safetensors"))
    (run_dir / "adapter_config.json").write_text("{}")
    artifacts.write_metadata(
        run_dir, RunMetadata(run_id=run_id, base_model="tiny", evaluation={"candidate": {"chrf": 1.5}})
    )
    row = store.create(run_id, "tiny", str(run_dir), "test", {})
    ended = {"decision": decision, "decision_reason": "test", "serve": serve, "evaluation": evaluation}
    store.finish(row.id, RunStatus.COMPLETED, **ended)
    if serve:
        artifacts.promote(out, run_id)


def test_promote_rollback_and_what_retention_keeps(make_settings: SettingsFactory) -> None:
    settings = make_settings(storage={"keep_runs": 1})
    out = settings.storage.output_dir
    store = HistoryStore(settings.storage.history_db)
    names = [f"run_20250101_00000{i}" for i in range(5)]
    _fake_run(store, settings, names[0], Decision.PROMOTED, serve=True)
    _fake_run(store, settings, names[1], Decision.KEPT_CURRENT)
    _fake_run(store, settings, names[2], Decision.AWAITING_APPROVAL)
    assert reconcile(store, out) == names[0]
    assert artifacts.read_current(out).run_id == names[0]

    # A rejected candidate may still be served on purpose.
    promote(store, settings, names[1], triggered_by="test")
    assert artifacts.latest_run(out) == names[1] and artifacts.read_current(out).run_id == names[1]
    assert store.by_identifier(names[1]).promoted
    with pytest.raises(PromotionError) as already:
        promote(store, settings, names[1], triggered_by="test")
    assert already.value.code == "already_served"
    with pytest.raises(PromotionError) as unknown:
        promote(store, settings, "run_20990101_000000", triggered_by="test")
    assert unknown.value.code == "unknown_run"

    # Retention keeps the served run, the one before it and the candidate awaiting approval.
    _fake_run(store, settings, names[3], Decision.AWAITING_APPROVAL)
    _fake_run(store, settings, names[4], Decision.KEPT_CURRENT)
    assert protected_runs(store) == {names[1], names[0], names[3]}
    removed = artifacts.apply_retention(out, 1, protected_runs(store))
    assert sorted(removed) == [names[2]]  # an older candidate, superseded by the promotion after it

    assert rollback(store, settings, triggered_by="test") == names[0]
    assert artifacts.latest_run(out) == names[0] and artifacts.read_current(out).run_id == names[0]
    with pytest.raises(PromotionError) as nothing:
        rollback(store, settings, triggered_by="test")
    assert nothing.value.code == "nothing_to_roll_back"
    store.close()


@pytest.fixture
def serving(make_settings: SettingsFactory) -> Iterator[tuple[Settings, Path, HistoryStore]]:
    """Settings, their output dir and their history store (closed afterwards): where serving tests start."""
    settings = make_settings()
    store = HistoryStore(settings.storage.history_db)
    yield settings, settings.storage.output_dir, store
    store.close()


def test_restart_finishes_a_switch_a_crash_interrupted(serving: tuple[Settings, Path, HistoryStore]) -> None:
    settings, out, store = serving
    _fake_run(store, settings, "run_20250101_000000", Decision.PROMOTED, serve=True)
    reconcile(store, out)
    # Recorded as served, then the process died before `latest` moved.
    _fake_run(store, settings, "run_20250102_000000", Decision.PROMOTED)
    store.serve("run_20250102_000000", action="promote", triggered_by="test")
    assert artifacts.latest_run(out) == "run_20250101_000000"
    assert reconcile(store, out) == "run_20250102_000000"
    assert artifacts.latest_run(out) == "run_20250102_000000"
    assert artifacts.read_current(out).run_id == "run_20250102_000000"
    # A served directory that vanished is withdrawn; the one before it is served again.
    import shutil

    shutil.rmtree(out / "run_20250102_000000")
    assert reconcile(store, out) == "run_20250101_000000" == artifacts.latest_run(out)
    # The last one gone too: nothing is served, and neither `latest` nor `current.json` says otherwise.
    shutil.rmtree(out / "run_20250101_000000")
    assert reconcile(store, out) is None and store.served_stack() == []
    assert not (out / "latest").is_symlink() and artifacts.read_current(out).run_id is None


def test_damaged_times_in_the_history_do_not_stop_a_start(serving: tuple[Settings, Path, HistoryStore]) -> None:
    """Every start closes the open runs and reconciles the served list; one time edited by hand failed each."""
    settings, out, store = serving
    _fake_run(store, settings, "run_20250101_000000", Decision.PROMOTED, serve=True)
    reconcile(store, out)
    _fake_run(store, settings, "run_20250102_000000", Decision.AWAITING_APPROVAL)
    open_run = store.create("run_20250103_000000", "tiny", str(out), "test", {})
    with contextlib.closing(sqlite3.connect(settings.storage.history_db)) as conn:
        conn.execute("UPDATE served_adapters SET served_at = 'garbage'")
        conn.execute("UPDATE training_runs SET started_at = '2025-13-45 99:00:00'")
        conn.commit()
    assert [run.id for run in store.mark_interrupted()] == [open_run.id]
    assert store.get(open_run.id).status == RunStatus.FAILED.value  # type: ignore[arg-type,union-attr]
    assert reconcile(store, out) == "run_20250101_000000" == artifacts.latest_run(out)
    assert store.latest_completed() is not None
    store.awaiting()  # read without an error; whether a row without times counts is the row's loss


def test_an_output_dir_not_there_keeps_the_served_list(serving: tuple[Settings, Path, HistoryStore]) -> None:
    """The add-on's /share not mounted yet withdrew every served adapter, and each roll-back, for good."""
    settings, out, store = serving
    _fake_run(store, settings, "run_20250101_000000", Decision.PROMOTED, serve=True)
    _fake_run(store, settings, "run_20250102_000000", Decision.PROMOTED, serve=True)
    assert reconcile(store, out) == "run_20250102_000000"
    served = [row.run_identifier for row in store.served_stack()]
    assert served[:2] == ["run_20250102_000000", "run_20250101_000000"]
    assert reconcile(store, out.parent / "not-mounted") is None
    assert [row.run_identifier for row in store.served_stack()] == served
    assert reconcile(store, out) == "run_20250102_000000"


def test_every_file_is_fsynced_before_the_rename(make_settings: SettingsFactory, monkeypatch) -> None:
    settings = make_settings()
    out = settings.storage.output_dir
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_id = "run_20250101_000000"
    result = execute_run(settings, TrainParams(), run_id)
    assert result.status is RunStatus.COMPLETED, result.error
    staging = str(artifacts.staging_dir(out, run_id).resolve())
    rename = events.index(("replace", f"{artifacts.staging_dir(out, run_id)} -> {out / run_id}"))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    files = [p for p in (out / run_id).rglob("*")]
    assert len(files) >= 5
    for path in files:
        assert staging + str(path)[len(str(out / run_id)) :] in synced_before, path
    assert staging in synced_before
    # The training process never switches `latest`: that is the recorder's job.
    assert not (out / "latest").exists()


def test_a_kill_between_switching_and_recording_is_consistent_after_restart(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(data={"max_samples": 64})
    out = settings.storage.output_dir
    env = {
        **os.environ,
        "HOMEIQ_DATA__SOURCE_DB": str(settings.data.source_db),
        "HOMEIQ_DATA__MAX_SAMPLES": "64",
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(out),
        "HOMEIQ_STORAGE__HISTORY_DB": str(settings.storage.history_db),
        "HOMEIQ_TRAINING__BASE_MODEL": settings.training.base_model,
        "HOMEIQ_TRAINING__EPOCHS": "1",
        "HOMEIQ_EVALUATION__MAX_NEW_TOKENS": "8",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.paused_switch", "120", "train", "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and artifacts.read_current(out).run_id is None and proc.poll() is None:
            time.sleep(0.5)
        run_id = artifacts.read_current(out).run_id
        assert run_id is not None, "latest never moved"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert artifacts.latest_run(out) == run_id
    store = HistoryStore(settings.storage.history_db)
    assert store.served_stack() == [] and store.by_identifier(run_id).status == "running"
    recover(store, settings)  # what the daemon and `train` do at start
    # The run never ended in the history, so it is not served: `latest` and `current.json` agree.
    assert store.by_identifier(run_id).status == "failed" and store.served_stack() == []
    assert artifacts.latest_run(out) is None and not (out / "latest").is_symlink()
    assert not (out / "current.json").exists()
    store.close()


def test_run_files_round_trip_and_foreign_or_broken_ones_read_as_unknown(tmp_path: Path) -> None:
    written = RunMetadata(run_id="run_20250101_000000", base_model="tiny", final_loss=float("nan"), eval_loss=1.5)
    artifacts.write_metadata(tmp_path, written)
    raw = json.loads((tmp_path / artifacts.METADATA_FILE).read_text())
    assert raw["final_loss"] is None and raw["eval_loss"] == 1.5  # JSON never carries NaN
    assert artifacts.read_metadata(tmp_path) == written.model_copy(update={"final_loss": None})

    # Another version's file: keys we do not know are ignored, those missing are unknown.
    (tmp_path / artifacts.METADATA_FILE).write_text(json.dumps({"base_model": "tiny", "added_later": [1, 2]}))
    older = artifacts.read_metadata(tmp_path)
    assert older.base_model == "tiny" and older.run_id is None and older.evaluation == {}

    for broken in ("{not json", "[1, 2]", json.dumps({"base_model": ["a list"]}), ""):
        (tmp_path / artifacts.METADATA_FILE).write_text(broken)
        assert artifacts.read_metadata(tmp_path) == RunMetadata(), broken
    (tmp_path / artifacts.CURRENT_FILE).write_text(json.dumps({"run_id": 7}))
    assert artifacts.read_current(tmp_path).run_id is None
    assert artifacts.read_metadata(tmp_path / "absent").base_model is None


FIRST, SECOND, THIRD = "run_20250101_000000", "run_20250102_000000", "run_20250103_000000"


def _chosen(out: Path, run_id: str, reason: str = "promoted: test", **evaluation: Any) -> RunResult:
    """A completed run the gate chose, as the training process reports it (`compared_with=` and so on)."""
    return RunResult(
        run_identifier=run_id,
        status=RunStatus.COMPLETED,
        base_model="tiny",
        decision=Decision.PROMOTED,
        decision_reason=reason,
        run_dir=str(out / run_id),
        evaluation=evaluation,
    )


def _served_then_rejected(store: HistoryStore, settings: Settings) -> None:
    """FIRST served, SECOND completed and kept out."""
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    _fake_run(store, settings, SECOND, Decision.KEPT_CURRENT)


def test_a_disk_that_refuses_the_switch_changes_nothing(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, out, store = serving
    first, second, third = FIRST, SECOND, THIRD
    _served_then_rejected(store, settings)
    reconcile(store, out)
    write_current = artifacts.write_current

    def refuse(*_args: object) -> None:  # `latest` has moved by then: it must move back
        raise OSError(errno.EROFS, "Read-only file system")

    def served() -> list[str]:
        return [row.run_identifier for row in store.served_stack()]

    monkeypatch.setattr(artifacts, "write_current", refuse)
    with pytest.raises(PromotionError, match="Read-only file system") as refused:
        promote(store, settings, second, triggered_by="test")
    assert refused.value.code == "io_error"
    assert artifacts.latest_run(out) == first and served() == [first] and not store.by_identifier(second).promoted

    monkeypatch.setattr(artifacts, "write_current", write_current)
    promote(store, settings, second, triggered_by="test")
    monkeypatch.setattr(artifacts, "write_current", refuse)
    with pytest.raises(PromotionError, match="Read-only file system"):
        rollback(store, settings, triggered_by="test")
    assert artifacts.latest_run(out) == second and served() == [second, first]

    # A history that cannot record the switch: `latest` goes back too.
    monkeypatch.setattr(artifacts, "write_current", write_current)

    def history_gone(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the history database went away")

    monkeypatch.setattr(store, "withdraw", history_gone)
    with pytest.raises(RuntimeError, match="went away"):
        rollback(store, settings, triggered_by="test")
    assert artifacts.latest_run(out) == second == artifacts.read_current(out).run_id
    assert served() == [second, first]
    monkeypatch.undo()
    monkeypatch.setattr(artifacts, "write_current", refuse)

    # A run the gate chose is recorded as kept out, not as served.
    _fake_run(store, settings, third, Decision.PROMOTED)
    row = store.by_identifier(third)
    finished = conclude(store, settings, row, _chosen(out, third, "promoted: better"))
    assert not finished.promoted and finished.decision == Decision.KEPT_CURRENT.value
    assert "cannot serve run_20250103_000000" in (finished.decision_reason or "")
    assert artifacts.latest_run(out) == second and served() == [second, first]
    assert artifacts.read_current(out).run_id == second


def test_nothing_reads_the_history_again_after_a_serve_is_committed(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read after the commit that failed (a PostgreSQL connection dropped just then) put `latest`
    back under a serve the history had recorded: `adapter` and `model` disagreed until a restart."""
    from sqlalchemy.exc import OperationalError
    from sqlmodel import Session

    settings, out, store = serving
    _served_then_rejected(store, settings)
    reconcile(store, out)

    def gone(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "refresh", gone)
    promote(store, settings, SECOND, triggered_by="test")
    assert store.create("run_20250109_000000", "tiny", str(out), "test", {}).id is not None  # nor after a create
    monkeypatch.undo()
    assert [row.run_identifier for row in store.served_stack()][:1] == [SECOND] == [artifacts.latest_run(out)]


def test_a_run_decided_against_an_adapter_no_longer_in_use_is_offered_not_served(
    serving: tuple[Settings, Path, HistoryStore],
) -> None:
    settings, out, store = serving
    first, second, third = FIRST, SECOND, THIRD
    _served_then_rejected(store, settings)
    _fake_run(store, settings, third, Decision.PROMOTED)
    reconcile(store, out)
    # `third` was compared with `first` and found better; meanwhile `second` is served by hand.
    promote(store, settings, second, triggered_by="test")
    chosen = _chosen(out, third, f"promoted: better than {first}", compared_with=first)
    finished = conclude(store, settings, store.by_identifier(third), chosen)
    assert not finished.promoted and finished.decision == Decision.AWAITING_APPROVAL.value
    assert f"{second} was put in use after it was compared with {first}" in (finished.decision_reason or "")
    assert artifacts.latest_run(out) == second and [row.run_identifier for row in store.served_stack()][0] == second
    assert offered(store, settings).run_identifier == third  # the update entity offers it


def test_a_refused_first_switch_leaves_nothing_served(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, out, store = serving
    _fake_run(store, settings, "run_20250101_000000", Decision.KEPT_CURRENT)

    def refuse(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "write_current", refuse)
    with pytest.raises(PromotionError, match="No space left") as refused:
        promote(store, settings, "run_20250101_000000", triggered_by="test")
    assert refused.value.code == "io_error"
    assert not (out / "latest").is_symlink() and store.served_stack() == []
    monkeypatch.undo()
    assert reconcile(store, out) is None  # nothing for the next start to adopt either


@pytest.mark.parametrize("damage", ["truncated", "foreign shapes"])
def test_an_adapter_in_use_that_cannot_be_loaded_is_replaced(make_settings: SettingsFactory, damage: str) -> None:
    """Its load raised, failing every later run, so unattended retraining could never replace it."""
    import torch
    from safetensors.torch import load_file, save_file

    settings = make_settings(data={"max_samples": 60})
    latest = train_and_serve(settings)
    first = os.readlink(latest)
    weights = settings.storage.output_dir / first / artifacts.ADAPTER_WEIGHTS
    if damage == "truncated":  # a partial copy: the header promises more than the file holds
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # a whole file whose tensors do not fit the model (another adapter's, copied in by hand)
        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
        save_file(tensors, weights)
    train_and_serve(settings)  # completed and promoted, or it raises
    second = os.readlink(latest)
    store = HistoryStore(settings.storage.history_db)
    run = store.by_identifier(second)
    store.close()
    assert second != first and run is not None
    assert run.decision_reason is not None and f"promoted: {first} in use cannot be loaded" in run.decision_reason


@pytest.mark.parametrize("header", [b"[]", b'{"w": 1}', b'{"w": {"dtype": "F32", "shape": [2]}}', b'{"w": {}}'])
def test_a_weights_header_that_parses_but_is_no_safetensors_table_is_an_artifact_error(
    tmp_path: Path, header: bytes
) -> None:
    """Such a header raised AttributeError, TypeError or KeyError, which the check for an adapter in use
    does not catch, so every later run failed with a traceback."""
    weights = tmp_path / artifacts.ADAPTER_WEIGHTS
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(artifacts.ArtifactError, match=artifacts.ADAPTER_WEIGHTS):
        artifacts.check_safetensors(weights)


def test_the_base_model_of_an_adapter_in_use_comes_from_peft_where_its_metadata_does_not_read(
    make_settings: SettingsFactory,
) -> None:
    """Unread, it counted as another base model, and any candidate was promoted without a comparison."""
    from homeiq_trainer.training.run import _served_adapter

    settings = make_settings(data={"max_samples": 60})
    latest = train_and_serve(settings)
    run_dir = latest.resolve()
    meta = json.loads((run_dir / artifacts.METADATA_FILE).read_text())
    (run_dir / artifacts.METADATA_FILE).write_text(json.dumps({**meta, "samples_used": "many"}))  # another version's
    assert artifacts.read_metadata(run_dir).base_model is None
    served, note = _served_adapter(settings.storage.output_dir, run_dir.name, settings.training.base_model)
    assert served == (run_dir.name, settings.storage.output_dir / run_dir.name) and note is None
    other, note = _served_adapter(settings.storage.output_dir, run_dir.name, "another/base-model")
    assert other is None and note is not None and "trained on" in note


def _first_served(serving: tuple[Settings, Path, HistoryStore]) -> tuple[Settings, Path, HistoryStore]:
    """`serving` with FIRST trained and served, as after a restart."""
    settings, out, store = serving
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    reconcile(store, out)
    return settings, out, store


def test_a_failed_prune_leaves_the_new_adapter_served(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prune ran inside the switch: its failure put `latest` back under a serve the history had recorded."""
    from sqlalchemy.exc import OperationalError

    settings, out, store = serving
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    _fake_run(store, settings, SECOND, Decision.PROMOTED)

    def locked(*_args: object, **_kwargs: object) -> int:
        raise OperationalError("DELETE FROM training_runs", {}, Exception("database is locked"))

    monkeypatch.setattr(store, "prune", locked)
    finished = conclude(store, settings, store.by_identifier(SECOND), _chosen(out, SECOND, compared_with=FIRST))
    assert finished.promoted and artifacts.latest_run(out) == SECOND == artifacts.read_current(out).run_id
    assert store.served_stack()[0].run_identifier == SECOND


def test_a_served_directory_deleted_by_hand_does_not_block_later_promotions(
    serving: tuple[Settings, Path, HistoryStore],
) -> None:
    """`latest` dangled, the history named the deleted run: each run compared with nothing was refused."""
    import shutil

    settings, out, store = _first_served(serving)
    shutil.rmtree(out / FIRST)
    _fake_run(store, settings, SECOND, Decision.PROMOTED)
    finished = conclude(store, settings, store.by_identifier(SECOND), _chosen(out, SECOND, compared_with=None))
    assert finished.promoted and finished.decision == Decision.PROMOTED.value
    assert artifacts.latest_run(out) == SECOND and [row.run_identifier for row in store.served_stack()] == [SECOND]


def test_a_run_opened_after_the_served_directory_was_deleted_is_compared_with_the_one_before(
    serving: tuple[Settings, Path, HistoryStore],
) -> None:
    """With an older adapter behind the deleted one, the run compared with nothing (`latest` dangled
    until its end), and was then held back as compared with the wrong adapter: FIRST came back into use
    at the run's end, unannounced, and the new adapter waited for approval."""
    import shutil

    settings, out, store = serving
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    _fake_run(store, settings, SECOND, Decision.PROMOTED, serve=True)
    reconcile(store, out)
    shutil.rmtree(out / SECOND)
    opened = open_run(store, settings, JobRequest(params=TrainParams()))
    # What the training process will compare with is in place before it starts.
    assert artifacts.latest_run(out) == FIRST and [row.run_identifier for row in store.served_stack()] == [FIRST]
    store.finish(opened.id, RunStatus.FAILED)  # type: ignore[arg-type]
    _fake_run(store, settings, THIRD, Decision.PROMOTED)
    finished = conclude(store, settings, store.by_identifier(THIRD), _chosen(out, THIRD, compared_with=FIRST))
    assert finished.promoted and artifacts.latest_run(out) == THIRD


def test_a_read_only_disk_that_needs_a_repair_does_not_stop_the_start(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings, out, store = serving
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    _fake_run(store, settings, SECOND, Decision.PROMOTED)
    store.serve(SECOND, action="promote", triggered_by="test")  # recorded, then the process died before the switch

    def refuse(*_args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(artifacts, "promote", refuse)
    assert reconcile(store, out) == SECOND  # before: OSError, and the daemon, train, promote never started
    assert artifacts.latest_run(out) == FIRST
    assert any("Cannot make" in r.getMessage() and "Read-only file system" in r.getMessage() for r in caplog.records)


def test_the_offered_candidate_is_the_one_that_beat_the_adapter_in_use_by_most(
    serving: tuple[Settings, Path, HistoryStore],
) -> None:
    """Raw scores of different held-out sets ranked them: one worse than the adapter in use was offered."""
    settings, out, store = _first_served(serving)
    assert settings.promotion.metric == "chrf"
    worse = {"compared_with": FIRST, "candidate": {"chrf": 60.0}, "served": {"chrf": 62.0}}  # on 12 easy examples
    better = {"compared_with": FIRST, "candidate": {"chrf": 45.0}, "served": {"chrf": 30.0}}  # on 300 hard ones
    _fake_run(store, settings, SECOND, Decision.AWAITING_APPROVAL, evaluation=worse)
    _fake_run(store, settings, THIRD, Decision.AWAITING_APPROVAL, evaluation=better)
    chosen = offered(store, settings)
    assert chosen is not None and chosen.run_identifier == THIRD


def test_a_candidate_that_ended_while_the_clock_was_behind_is_offered_and_kept(
    serving: tuple[Settings, Path, HistoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newer than the adapter in use was told by clock times: one that ended while a Raspberry Pi's clock
    was a day behind (before NTP) was never offered to install, nor kept from retention."""
    from datetime import timedelta

    from homeiq_trainer import history
    from homeiq_trainer.messages import utcnow

    settings, out, store = _first_served(serving)
    monkeypatch.setattr(history, "utcnow", lambda: utcnow() - timedelta(days=1))
    _fake_run(store, settings, SECOND, Decision.AWAITING_APPROVAL)
    monkeypatch.undo()
    chosen = offered(store, settings)
    assert chosen is not None and chosen.run_identifier == SECOND and SECOND in protected_runs(store)
    # And one that ended before the adapter now in use was served is still passed over, whatever the clocks.
    _fake_run(store, settings, THIRD, Decision.KEPT_CURRENT)
    promote(store, settings, THIRD, triggered_by="test")
    assert offered(store, settings) is None and SECOND not in protected_runs(store)

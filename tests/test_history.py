"""The history store: pruning keeps the newest rows and the served run's; processes may open a new one together."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from homeiq_trainer import history
from homeiq_trainer.history import HistoryStore, HistoryUnavailable, run_record
from homeiq_trainer.jobs import prune_history
from homeiq_trainer.messages import RunStatus
from homeiq_trainer.settings import load_settings

from . import postgres


def test_prune_keeps_the_newest_rows_and_the_served_run(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.db")
    names = []
    for i in range(15):
        run = store.create(f"run_20250101_0000{i:02d}", "m", str(tmp_path), "test", {})
        store.finish(run.id, RunStatus.COMPLETED)  # type: ignore[arg-type]
        names.append(run.run_identifier)
    open_run = store.create("run_20250101_000099", "m", str(tmp_path), "test", {})
    assert store.prune(10, protect={names[0]}) == 5
    # The newest ten (the open one among them), and the served run although it is the oldest.
    assert store.identifiers() == {names[0], *names[6:], open_run.run_identifier}
    assert store.prune(10, protect={names[0]}) == 0
    store.close()


@pytest.mark.parametrize(
    ("damage", "published"),
    [
        ("started_at = '2025-13-45 99:00:00'", 3),  # a time that is no time reads as none
        ("finished_at = 'garbage'", 3),
        ("final_loss = 'n/a'", 2),  # a loss that is no number: the row is left out
        ("evaluation_json = '" + "[" * 50_000 + "]" * 50_000 + "'", 3),  # JSON that cannot be read: none
    ],
)
def test_a_row_damaged_by_hand_is_left_out_not_fatal(tmp_path: Path, damage: str, published: int) -> None:
    """Every daemon start reads the newest rows; one such value failed the whole read, and the start."""
    store = HistoryStore(tmp_path / "history.db")
    names = []
    for i in range(3):
        run = store.create(f"run_20250101_00000{i}", "m", str(tmp_path), "test", {})
        store.finish(run.id, RunStatus.FAILED, error="x")  # type: ignore[arg-type]
        names.append(run.run_identifier)
    with contextlib.closing(sqlite3.connect(tmp_path / "history.db")) as conn:
        conn.execute(f"UPDATE training_runs SET {damage} WHERE run_identifier = ?", (names[2],))
        conn.commit()
    readable = [run_record(run).run_id for run in store.recent(10)]  # what the daemon publishes
    assert set(readable) >= {names[0], names[1]} and len(readable) == published
    latest = store.latest_finished()
    assert latest is not None and latest.run_identifier == (names[2] if published == 3 else names[1])
    newer = store.create("run_20250101_000009", "m", str(tmp_path), "test", {})
    store.finish(newer.id, RunStatus.FAILED, error="x")  # type: ignore[arg-type]
    assert store.latest_finished().run_identifier == newer.run_identifier  # type: ignore[union-attr]
    store.close()


def test_a_clock_set_back_neither_prunes_nor_hides_the_newest_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Raspberry Pi starts with an old clock until NTP answers: its runs began 'before' older ones."""
    store = HistoryStore(tmp_path / "history.db")
    for i in range(4):
        run = store.create(f"run_20260101_00000{i}", "m", str(tmp_path), "test", {})
        store.finish(run.id, RunStatus.COMPLETED)  # type: ignore[arg-type]
    monkeypatch.setattr(history, "utcnow", lambda: datetime(2020, 1, 1, tzinfo=UTC))
    newest = store.create("run_20260101_000004", "m", str(tmp_path), "test", {})
    store.finish(newest.id, RunStatus.COMPLETED)  # type: ignore[arg-type]
    assert store.recent(1)[0].run_identifier == newest.run_identifier
    assert store.latest_completed().run_identifier == newest.run_identifier  # type: ignore[union-attr]
    assert store.prune(2) == 3 and store.by_identifier(newest.run_identifier) is not None
    store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_runs_times_keep_their_zone_and_non_finite_numbers_are_stored_as_null(engine: str, tmp_path: Path) -> None:
    """`timestamptz` on PostgreSQL, as SQLModel made the columns, and UTC on every read; PostgreSQL's JSON
    refuses Infinity, so the end of a CLI run whose served adapter's loss was infinite was not recorded."""
    with contextlib.ExitStack() as stack:
        target, _ = _new_history_target(engine, tmp_path / "history.db", stack)
        store = HistoryStore(target)
        run = store.create("run_20260101_000000", "m", str(tmp_path), "test", {})
        evaluation = {"served": {"eval_loss": float("inf")}, "candidate": {"eval_loss": 1.5}}
        ended = store.finish(run.id, RunStatus.COMPLETED, evaluation=evaluation, loss_history=[{"loss": float("nan")}])  # type: ignore[arg-type]
        assert ended is not None and ended.status == RunStatus.COMPLETED.value
        row = store.get(run.id)  # type: ignore[arg-type]
        assert row is not None and row.evaluation_json == {
            "served": {"eval_loss": None},
            "candidate": {"eval_loss": 1.5},
        }
        assert row.started_at.utcoffset() is not None and row.finished_at is not None
        assert row.started_at.tzinfo == UTC and row.finished_at.tzinfo == UTC
        if engine == "postgresql":
            columns = {c["name"]: c["type"] for c in inspect(create_engine(target)).get_columns("training_runs")}
            assert columns["started_at"].timezone and columns["finished_at"].timezone  # type: ignore[attr-defined]
        store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_nul_in_a_failure_is_stored(engine: str, tmp_path: Path) -> None:
    """PostgreSQL text cannot hold NUL, which a crashed process's stderr may: the run stayed `running`."""
    with contextlib.ExitStack() as stack:
        target, _ = _new_history_target(engine, tmp_path / "history.db", stack)
        store = HistoryStore(target)
        stack.callback(store.close)
        run = store.create("run_20250101_000000", "m", str(tmp_path), "test", {})
        failed = store.finish(run.id, RunStatus.FAILED, error="died\x00here", decision_reason="no\x00why")  # type: ignore[arg-type]
        assert (failed.status, failed.error_message, failed.decision_reason) == (
            "failed",
            "died\ufffdhere",
            "no\ufffdwhy",
        )


def test_a_run_whose_directory_is_kept_keeps_its_row(tmp_path: Path) -> None:
    """With `keep_runs` above `keep_history_rows`, pruning left directories that no row listed or could promote."""
    out = tmp_path / "out"
    settings = load_settings(None, {"storage": {"output_dir": str(out), "keep_runs": 15, "keep_history_rows": 10}})
    store = HistoryStore(tmp_path / "history.db")
    names = []
    for i in range(15):
        run = store.create(f"run_20250101_0000{i:02d}", "m", str(out), "test", {})
        store.finish(run.id, RunStatus.COMPLETED)  # type: ignore[arg-type]
        (out / run.run_identifier).mkdir(parents=True)
        names.append(run.run_identifier)
    assert prune_history(store, settings) == 0
    assert store.identifiers() == set(names)
    for name in names[:3]:  # retention (or a person) removed the oldest directories: their rows may go
        (out / name).rmdir()
    assert prune_history(store, settings) == 3
    assert store.identifiers() == set(names[3:])
    store.close()


def _new_history_target(engine: str, sqlite_path: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    """(what `HistoryStore` opens, its SQLAlchemy URL) for a history that does not exist yet.

    PostgreSQL: a throwaway database, dropped when `stack` closes.
    """
    if engine == "sqlite":
        return str(sqlite_path), f"sqlite:///{sqlite_path}"
    name = stack.enter_context(postgres.throwaway_database())
    url = postgres.sqlalchemy_url(name).render_as_string(hide_password=False)
    return url, url


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_processes_opening_a_new_history_together_all_get_it(engine: str, tmp_path: Path) -> None:
    # The daemon, `homeiq-trainer train` and a reader may open a history that does not exist yet at
    # the same moment: each checks for the tables, then creates those missing, so the slower CREATE
    # used to fail ("table training_runs already exists") and took its process down; and SQLite's
    # switch to WAL answered "database is locked" without waiting.
    script = (
        "import sys, time\n"
        "from homeiq_trainer.history import HistoryStore\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "HistoryStore(sys.argv[1]).close()\n"
    )
    for attempt in range(4):
        with contextlib.ExitStack() as stack:
            target, _ = _new_history_target(engine, tmp_path / f"history-{attempt}.db", stack)
            start_at = f"{time.time() + 1.5:.3f}"  # after every process has imported (0.5 s each)
            procs = [
                subprocess.Popen([sys.executable, "-c", script, target, start_at], stderr=subprocess.PIPE, text=True)
                for _ in range(4)
            ]
            errors = [p.communicate(timeout=60)[1] for p in procs]
            failures = [f"exit {p.returncode}: {err}" for p, err in zip(procs, errors, strict=True) if p.returncode]
            assert failures == [], "\n".join(failures)
            store = HistoryStore(target)
            assert store.served_stack() == []
            store.close()


def _index_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {index["name"] for index in inspect(engine).get_indexes("training_runs")}
    finally:
        engine.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_an_index_missing_from_an_existing_history_is_made_again(engine: str, tmp_path: Path) -> None:
    # create_all makes a table's indexes only with the table: a process that found the table made by
    # another one a moment earlier (or a history from a release without the index) went on without it.
    with contextlib.ExitStack() as stack:
        target, url = _new_history_target(engine, tmp_path / "history.db", stack)
        HistoryStore(target).close()
        full = _index_names(url)
        assert {"idx_training_runs_run_identifier", "idx_training_runs_status"} <= full
        dropper = create_engine(url)
        with dropper.begin() as connection:
            connection.execute(text("DROP INDEX idx_training_runs_run_identifier"))
        dropper.dispose()
        assert "idx_training_runs_run_identifier" not in _index_names(url)
        HistoryStore(target).close()
        assert _index_names(url) == full


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_history_of_the_release_before_gains_the_served_order_and_its_candidates_keep_their_place(
    engine: str, tmp_path: Path
) -> None:
    """`served_id_at_finish` is new: rows ended before it read NULL and are told by the clock, as before."""
    from homeiq_trainer.messages import Decision

    with contextlib.ExitStack() as stack:
        target, url = _new_history_target(engine, tmp_path / "history.db", stack)
        store = HistoryStore(target)
        for name, decision, serve in [
            ("run_20250101_000000", Decision.AWAITING_APPROVAL, False),  # passed over by what was served next
            ("run_20250102_000000", Decision.PROMOTED, True),
            ("run_20250103_000000", Decision.AWAITING_APPROVAL, False),
        ]:
            row = store.create(name, "m", f"/out/{name}", "test", {})
            store.finish(row.id, RunStatus.COMPLETED, decision=decision, serve=serve)  # type: ignore[arg-type]
            time.sleep(0.01)  # distinct clock times for the rows told by them
        assert [run.served_id_at_finish for run in store.recent(3)] == [1, 0, 0]
        store.close()
        older = create_engine(url)
        with older.begin() as connection:
            connection.execute(text("ALTER TABLE training_runs DROP COLUMN served_id_at_finish"))
        older.dispose()
        store = HistoryStore(target)  # the column is added again, NULL in every row
        assert [run.served_id_at_finish for run in store.recent(3)] == [None, None, None]
        assert [run.run_identifier for run in store.awaiting()] == ["run_20250103_000000"]
        store.close()


def test_an_index_name_another_table_holds_is_an_error_not_skipped(tmp_path: Path) -> None:
    # SQLite's index names are global: an index left on an old, renamed table would make CREATE INDEX
    # fail with "already exists", which must not pass for another process having made it.
    path = tmp_path / "history.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE training_runs_old (id INTEGER)")
    connection.execute("CREATE INDEX idx_training_runs_status ON training_runs_old (id)")
    connection.commit()
    connection.close()
    with pytest.raises(HistoryUnavailable, match="idx_training_runs_status already exists"):
        HistoryStore(path)


def test_one_homeiq_trainer_per_history_on_a_server_whatever_its_output_dir(tmp_path: Path) -> None:
    """A `train` beside the daemon marked the daemon's live run failed and withdrew its served adapter."""
    from homeiq_trainer.jobs import InstanceBusy, InstanceLock

    with postgres.throwaway_database() as name:
        history = postgres.sqlalchemy_url(name).render_as_string(hide_password=False)

        def lock(output: str) -> InstanceLock:
            storage = {"history": history, "output_dir": str(tmp_path / output)}
            return InstanceLock(load_settings(None, {"storage": storage}))

        daemon = lock("daemon-out")
        daemon.acquire()
        beside = lock("cli-out")
        with pytest.raises(InstanceBusy, match=f"is using the history at .*/{name}"):
            beside.acquire()
        daemon.release()
        beside.acquire()  # free once the daemon is gone
        beside.release()


def test_a_server_lock_lost_with_its_session_is_taken_again_or_refuses_runs(tmp_path: Path) -> None:
    """A PostgreSQL restart (or `idle_session_timeout`) ends the session holding the daemon's lock; the
    daemon carried on unlocked, so a `train` beside it could mark its live run interrupted."""
    from homeiq_trainer.jobs import HISTORY_LOCK_KEY, InstanceBusy, InstanceLock

    def end_the_holders_session(name: str) -> None:
        with postgres.connect(name) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = (%s::bigint & x'ffffffff'::bigint)",
                (HISTORY_LOCK_KEY,),
            ).fetchall()
        assert ended == [(True,)]

    with postgres.throwaway_database() as name:
        history = postgres.sqlalchemy_url(name).render_as_string(hide_password=False)

        def lock(output: str) -> InstanceLock:
            storage = {"history": history, "output_dir": str(tmp_path / output)}
            return InstanceLock(load_settings(None, {"storage": storage}))

        daemon, beside = lock("daemon-out"), lock("cli-out")
        daemon.acquire()
        end_the_holders_session(name)
        daemon.ensure()  # noticed and taken again
        with pytest.raises(InstanceBusy):
            beside.acquire()  # before: got it
        end_the_holders_session(name)
        beside.acquire()  # in the moment before the daemon looks again
        with pytest.raises(InstanceBusy):
            daemon.ensure()  # so the daemon refuses runs (a `start` is answered `busy`)
        beside.release()
        daemon.ensure()
        with pytest.raises(InstanceBusy):
            beside.acquire()
        daemon.release()


def test_a_history_server_gone_quiet_cannot_hold_up_the_lock_check_a_start_or_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that took the lock's `SELECT 1` and went quiet held the check's guard for good: a
    `start` waited on it holding the runner's lock, and the daemon's SIGTERM never finished."""
    import threading
    import time

    from homeiq_trainer import jobs
    from homeiq_trainer.history import HistoryUnavailable
    from homeiq_trainer.jobs import InstanceLock, JobRequest
    from homeiq_trainer.messages import TrainParams
    from homeiq_trainer.runner import Runner

    monkeypatch.setattr(jobs, "LOCK_CHECK_WAIT_S", 1.0)
    proxy = postgres.StallingProxy(after_startup=False)
    with postgres.throwaway_database() as name:
        quiet = proxy.url(name).replace("postgresql://", "postgresql+psycopg://")
        lock = InstanceLock(load_settings(None, {"storage": {"history": quiet, "output_dir": str(tmp_path / "o")}}))
        lock.acquire()
        settings = load_settings(None, {"storage": {"history_db": str(tmp_path / "h.db"), "output_dir": str(tmp_path)}})
        store = HistoryStore(settings.storage.history_db)

        class Listener:
            def run_state(self, *_args: object) -> None: ...
            def run_progress(self, *_args: object) -> None: ...
            def run_finished(self, *_args: object) -> None: ...

        runner = Runner(settings, store, Listener(), before_open=lock.ensure)  # type: ignore[arg-type]
        proxy.frozen.set()  # the server goes quiet (stopped, paused, a dead disk)
        stop = threading.Event()
        lock.keep(stop, every_s=0.2)
        time.sleep(0.5)  # the keeper's check is waiting by now
        with pytest.raises(HistoryUnavailable, match="does not answer"):
            runner.submit(JobRequest(params=TrainParams()))  # before: waited for good
        assert runner.active is None
        stopped = threading.Thread(target=lambda: (runner.shutdown(1.0), stop.set(), lock.release()), daemon=True)
        started = time.monotonic()
        stopped.start()
        stopped.join(30)
        assert not stopped.is_alive(), "the stop waited on the quiet server"  # before: for good
        assert time.monotonic() - started < 10
        store.close()
    proxy.close()

"""storage.homeiq_runs: our runs in HomeIQ's own automation.training_runs, with the README's roles."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.jobs import JobRequest, open_history, open_run, record_result
from homeiq_trainer.messages import RunResult, RunStatus, TrainParams
from homeiq_trainer.settings import Settings
from homeiq_trainer.training.run import execute_run
from tests import postgres
from tests.postgres import suggestion

from .conftest import SettingsFactory

PASSWORD = "runs-s3cret-pw"


def role(dbname: str) -> str:
    """The README's role for this test database: roles are server-wide, and test workers share the server."""
    return f"homeiq_trainer_t_{dbname[-8:]}"


def readme_role_sql(name: str) -> str:
    """The README's read-only role, plus the INSERT that storage.homeiq_runs needs (README, same words)."""
    return f"""
CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}';
ALTER ROLE {name} SET default_transaction_read_only = on;
GRANT USAGE ON SCHEMA automation TO {name};
GRANT SELECT ON automation.ask_ai_queries TO {name};
GRANT INSERT ON automation.training_runs TO {name};
GRANT USAGE ON SEQUENCE automation.training_runs_id_seq TO {name};
"""


@pytest.fixture
def homeiq_db(pg_database: str) -> Iterator[str]:
    """HomeIQ's current Ask AI table with 60 good rows, its training_runs table, and the README's role."""
    postgres.reset_schema(pg_database, postgres.CURRENT_DDL + postgres.TRAINING_RUNS_DDL)
    rows = [
        (f"Turn on light {i} at {i % 24}:00", [suggestion(f"Light {i} on at {i % 24}:00")], "complete")
        for i in range(60)
    ]
    postgres.insert_current(pg_database, rows)
    with postgres.connect(pg_database) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role(pg_database)}")
        conn.execute(readme_role_sql(role(pg_database)))
    yield pg_database
    with postgres.connect(pg_database) as conn:
        conn.execute(f"DROP OWNED BY {role(pg_database)}")
        conn.execute(f"DROP ROLE {role(pg_database)}")


def role_url(dbname: str) -> str:
    url = postgres.sqlalchemy_url(dbname).set(username=role(dbname), password=PASSWORD)
    return url.render_as_string(hide_password=False)


def train(settings: Settings) -> RunResult:
    store = open_history(settings)
    try:
        row = open_run(store, settings, JobRequest(params=TrainParams(), triggered_by="home_assistant"))
        store.mark_running(row.id)  # type: ignore[arg-type]
        result = execute_run(settings, TrainParams(), row.run_identifier)
        record_result(store, settings, row, result)
    finally:
        store.close()
    return result


def homeiq_runs(dbname: str) -> list[dict[str, Any]]:
    with postgres.connect(dbname) as conn, conn.cursor() as cur:
        cur.execute(postgres.HOMEIQ_RUNS_QUERY)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_homeiq_lists_our_run(homeiq_db: str, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = postgres.checksum(homeiq_db)
    settings = make_settings(data={"source": role_url(homeiq_db)}, storage={"homeiq_runs": True})
    result = train(settings)
    assert result.status is RunStatus.COMPLETED, result.error
    runs = homeiq_runs(homeiq_db)
    assert len(runs) == 1
    run = runs[0]
    assert run["run_identifier"] == result.run_identifier and run["status"] == "completed"
    assert run["dataset_size"] == result.data.examples == 60
    assert run["final_loss"] == pytest.approx(result.final_loss)
    assert run["triggered_by"] == "home_assistant"
    assert run["finished_at"] >= run["started_at"]
    assert postgres.checksum(homeiq_db) == before  # the Ask AI history itself is untouched
    assert PASSWORD not in caplog.text


def test_off_leaves_homeiq_runs_untouched(homeiq_db: str, make_settings: SettingsFactory) -> None:
    before = postgres.checksum(homeiq_db, "automation.training_runs")
    settings = make_settings(data={"source": role_url(homeiq_db)})
    assert train(settings).status is RunStatus.COMPLETED
    assert postgres.checksum(homeiq_db, "automation.training_runs") == before == (0, postgres.EMPTY_DIGEST)


def test_refused_write_is_logged_once_and_the_run_completes(
    homeiq_db: str, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with postgres.connect(homeiq_db) as conn:
        conn.execute(f"REVOKE INSERT ON automation.training_runs FROM {role(homeiq_db)}")
    settings = make_settings(data={"source": role_url(homeiq_db)}, storage={"homeiq_runs": True})
    caplog.set_level(logging.WARNING)
    result = train(settings)
    assert result.status is RunStatus.COMPLETED
    warnings = [r.getMessage() for r in caplog.records if "not recorded in HomeIQ" in r.getMessage()]
    assert len(warnings) == 1
    assert "no INSERT permission on automation.training_runs" in warnings[0]
    assert PASSWORD not in warnings[0]
    assert homeiq_runs(homeiq_db) == []


def test_a_server_that_stops_answering_cannot_hold_up_the_runs_end(
    homeiq_db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server took the connection, then went quiet (a hung disk at COMMIT)."""
    import time

    from homeiq_trainer import homeiq_runs as module
    from homeiq_trainer.history import TrainingRun

    proxy = postgres.StallingProxy()
    monkeypatch.setattr(module, "RECORD_WAIT_S", 3.0)
    url = postgres.sqlalchemy_url(homeiq_db).set(host="127.0.0.1", port=proxy.port)
    caplog.set_level(logging.WARNING)
    runs = module.HomeIQRuns(url)
    started = time.monotonic()
    recorded = runs.record(TrainingRun(run_identifier="run_stalled", status="completed"))
    waited = time.monotonic() - started
    assert recorded is False and waited < 10  # before: blocked for good
    assert any("no answer within 3 s" in r.getMessage() for r in caplog.records)
    # The next run's record waits for the first, which still hangs, and opens no second connection.
    assert runs.record(TrainingRun(run_identifier="run_next", status="completed")) is False
    assert any("still waiting" in r.getMessage() and "run_next" in r.getMessage() for r in caplog.records)
    assert proxy.accepted == 1
    proxy.close()


def test_a_run_a_stopped_process_left_is_recorded_when_it_is_marked_failed(homeiq_db: str, tmp_path: Path) -> None:
    from homeiq_trainer.database import database_url
    from homeiq_trainer.history import INTERRUPTED_MESSAGE, HistoryStore
    from homeiq_trainer.homeiq_runs import HomeIQRuns

    url = database_url(role_url(homeiq_db))
    store = HistoryStore(tmp_path / "history.db", HomeIQRuns(url))
    try:
        row = store.create("run_20990202_000000", "m", "/out/run_20990202_000000", "home_assistant", {})
        store.mark_running(row.id)  # type: ignore[arg-type]
        assert [run.run_identifier for run in store.mark_interrupted()] == ["run_20990202_000000"]
    finally:
        store.close()
    recorded = homeiq_runs(homeiq_db)
    assert [(r["run_identifier"], r["status"]) for r in recorded] == [("run_20990202_000000", "failed")]
    with postgres.connect(homeiq_db) as conn:
        said = conn.execute("SELECT error_message FROM automation.training_runs").fetchall()
    assert said == [(INTERRUPTED_MESSAGE,)]


def test_a_cancelled_run_is_failed_in_homeiqs_table_with_the_reason(homeiq_db: str, tmp_path: Path) -> None:
    """HomeIQ's admin page knows queued, running, completed and failed; `cancelled` is none of them."""
    from homeiq_trainer.database import database_url
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.homeiq_runs import HomeIQRuns

    store = HistoryStore(tmp_path / "history.db", HomeIQRuns(database_url(role_url(homeiq_db))))
    try:
        row = store.create("run_20990303_000000", "m", "/out/run_20990303_000000", "home_assistant", {})
        store.finish(row.id, RunStatus.CANCELLED)  # type: ignore[arg-type]
    finally:
        store.close()
    assert [r["status"] for r in homeiq_runs(homeiq_db)] == ["failed"]
    with postgres.connect(homeiq_db) as conn:
        said = conn.execute("SELECT error_message FROM automation.training_runs").fetchall()
    assert said == [("cancelled on request",)]
    ours = HistoryStore(tmp_path / "history.db")
    assert ours.get(row.id).status == RunStatus.CANCELLED.value  # type: ignore[arg-type,union-attr]
    ours.close()

"""HomeIQ on PostgreSQL (2026): both table shapes, read-only sessions, clear errors, timestamps with zones."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from homeiq_trainer.database import database_url, server
from homeiq_trainer.training import data
from homeiq_trainer.training.data import (
    SKIP_DUPLICATE,
    SKIP_EMPTY_LIST,
    SKIP_EMPTY_QUERY,
    SKIP_EXCLUDED_SOURCE,
    SKIP_INVALID_JSON,
    SKIP_NO_DESCRIPTION,
    SKIP_NOT_A_LIST,
    SKIP_NOT_COMPLETE,
    DataError,
    SourceOptions,
    count_new_examples,
    load_examples,
)
from homeiq_trainer.training.source import connect_source, source_error
from tests import postgres
from tests.postgres import SQL_NULL, suggestion

PASSWORD = "pg-s3cret-Passw0rd"

# One row of every kind the issue lists, newest first: (user_query, suggestions, status).
EVERY_KIND: list[tuple[str, object, str]] = [
    ("Turn on the porch light at sunset", [suggestion("Porch light on at sunset", 0.9)], "complete"),
    ("Turn on the porch light at sunset", [suggestion("Porch light on at sunset", 0.9)], "complete"),  # duplicate
    (
        "Heizung um 6 Uhr an 🌅",
        [suggestion("canned", 0.85, "keyword_match"), suggestion("Heizung 06:00 an", "0.7")],  # numeric string
        "complete",
    ),
    ("Lights on or off", [suggestion("Turn lights on or off", 0.85, "keyword_match")], "complete"),  # excluded
    ("json null", None, "complete"),
    ("sql null", SQL_NULL, "complete"),
    ("an object", {"description": "x"}, "complete"),
    ("a scalar", "just text", "complete"),
    ("empty", [], "complete"),
    ("non-objects", [1, "two", None], "complete"),
    ("no description", [suggestion("   ")], "complete"),
    ("numeric description", [suggestion(42)], "complete"),
    ("   ", [suggestion("fine")], "complete"),
    ("still thinking", [suggestion("not yet")], "pending"),
    ("processing", None, "processing"),
    ("broke", [suggestion("never shown")], "failed"),
    ("Open the garage when I arrive", [suggestion("Garage opens on arrival", None)], "complete"),
]
EXPECTED_SKIPS = {
    SKIP_DUPLICATE: 1,
    SKIP_EXCLUDED_SOURCE: 1,
    SKIP_NOT_A_LIST: 4,  # JSONB null, SQL NULL, an object, a scalar
    SKIP_EMPTY_LIST: 2,
    SKIP_NO_DESCRIPTION: 2,
    SKIP_EMPTY_QUERY: 1,
    SKIP_NOT_COMPLETE: 3,
}


@pytest.fixture
def current_db(pg_database: str) -> str:
    """The session's database holding HomeIQ's current table, empty."""
    postgres.reset_schema(pg_database, postgres.CURRENT_DDL)
    return pg_database


@pytest.fixture
def legacy_db(pg_database: str) -> str:
    """The session's database holding the legacy table inside PostgreSQL, empty."""
    postgres.reset_schema(pg_database, postgres.LEGACY_DDL)
    return pg_database


def test_current_shape_counts_every_skip_reason(current_db: str) -> None:
    postgres.insert_current(current_db, EVERY_KIND)
    before = postgres.checksum(current_db)
    examples, report = load_examples(postgres.sqlalchemy_url(current_db), max_samples=100)
    assert [(e.instruction, e.response) for e in examples] == [
        ("Turn on the porch light at sunset", "Porch light on at sunset"),
        ("Heizung um 6 Uhr an 🌅", "Heizung 06:00 an"),
        ("Open the garage when I arrive", "Garage opens on arrival"),
    ]
    assert report.rows_read == len(EVERY_KIND)
    assert report.skipped == EXPECTED_SKIPS
    assert report.newest_created_at == postgres.BASE_TIME
    assert postgres.checksum(current_db) == before


def test_jsonb_that_python_cannot_decode_skips_its_row_not_the_read(current_db: str) -> None:
    """PostgreSQL stores both; Python's json refuses them (recursion limit, int digits limit)."""
    postgres.insert_current(current_db, [("Porch light at sunset", [suggestion("Porch light on", 0.9)], "complete")])
    deep = "[" * 3000 + "]" * 3000
    huge = json.dumps([suggestion("x", 0.5)]).replace("0.5", "1" + "0" * 5000)
    with postgres.connect(current_db) as conn:
        for query, value in (("deep", deep), ("huge", huge)):
            conn.execute(
                "INSERT INTO automation.ask_ai_queries (id, user_query, status, suggestions, created_at, updated_at) "
                "VALUES (%s, %s, 'complete', %s::jsonb, now(), now())",
                (query, query, value),
            )
    examples, report = load_examples(postgres.sqlalchemy_url(current_db), max_samples=10)
    assert [e.instruction for e in examples] == ["Porch light at sunset"]
    assert report.skipped == {SKIP_INVALID_JSON: 2}
    assert count_new_examples(postgres.sqlalchemy_url(current_db), since=None, limit=10) == 1


def test_exclude_sources_empty_takes_canned_text(current_db: str) -> None:
    postgres.insert_current(current_db, EVERY_KIND[3:4])
    examples, _ = load_examples(
        postgres.sqlalchemy_url(current_db), 10, options=SourceOptions(exclude_sources=frozenset())
    )
    assert [e.response for e in examples] == ["Turn lights on or off"]


def test_legacy_shape_in_postgres_reads_as_sqlite_does(legacy_db: str) -> None:
    rows: list[tuple[str, object]] = [
        ("same", json.dumps([{"description": "answer", "confidence": 0.9}])),
        ("same", json.dumps([{"description": "answer", "confidence": 0.9}])),
        ("x", "not json"),
        ("x", "null"),
        ("x", "[]"),
        ("x", json.dumps([{"description": ""}])),
        ("", json.dumps([{"description": "y"}])),
        ("x", None),  # suggestions IS NULL: never read, as in HomeIQ
        ("canned", json.dumps([{"description": "Turn lights on or off", "source": "keyword_match"}])),
    ]
    postgres.insert_legacy(legacy_db, rows)
    examples, report = load_examples(postgres.sqlalchemy_url(legacy_db), max_samples=100)
    assert [(e.instruction, e.response) for e in examples] == [("same", "answer")]
    assert report.rows_read == 8
    # One row of each reason, in the order of `rows`.
    reasons = [SKIP_DUPLICATE, SKIP_INVALID_JSON, SKIP_NOT_A_LIST, SKIP_EMPTY_LIST, SKIP_NO_DESCRIPTION]
    assert report.skipped == dict.fromkeys([*reasons, SKIP_EMPTY_QUERY, SKIP_EXCLUDED_SOURCE], 1)
    # Legacy TIMESTAMP columns hold UTC: the newest row's time comes back as that instant.
    assert report.newest_created_at is not None
    assert report.newest_created_at.replace(tzinfo=UTC) == postgres.BASE_TIME


def test_paging_across_many_pages_loses_no_row(current_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_PAGE_ROWS", 90)
    rows = [(f"q{i}", [suggestion(f"a{i}")] if i % 4 else [], "complete") for i in range(1000)]
    # Equal timestamps in runs of ten: the key breaks the ties across page boundaries.
    postgres.insert_current(current_db, rows, step_s=0)
    examples, report = load_examples(postgres.sqlalchemy_url(current_db), max_samples=10_000)
    assert report.rows_read == 1000 and len(examples) == 750
    assert len({e.instruction for e in examples}) == 750


def test_count_new_examples_compares_timestamps_with_zones(current_db: str) -> None:
    base = postgres.BASE_TIME
    postgres.insert_current(current_db, [(f"q{i}", [suggestion(f"a{i}")], "complete") for i in range(5)], base)
    url = postgres.sqlalchemy_url(current_db)
    _, report = load_examples(url, 10)
    assert count_new_examples(url, report.newest_created_at, limit=100) == 0
    # The same instant written in another zone is not newer; one microsecond later is.
    berlin = timezone(timedelta(hours=1))
    assert count_new_examples(url, base.astimezone(berlin), limit=100) == 0
    assert count_new_examples(url, base - timedelta(microseconds=1), limit=100) == 1
    assert count_new_examples(url, base.replace(tzinfo=None), limit=100) == 0  # naive means UTC
    # A row written in +05:00 that is newer in UTC, though its wall clock reads earlier than base's.
    later = (base + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=-5)))
    postgres.insert_current(current_db, [("fresh", [suggestion("new answer")], "complete")], later)
    postgres.insert_current(current_db, [("pending", [suggestion("x")], "pending")], later)
    assert count_new_examples(url, report.newest_created_at, limit=100) == 1


def test_legacy_count_new_examples(legacy_db: str) -> None:
    postgres.insert_legacy(legacy_db, [(f"q{i}", json.dumps([{"description": f"a{i}"}])) for i in range(5)])
    url = postgres.sqlalchemy_url(legacy_db)
    assert count_new_examples(url, postgres.BASE_TIME, limit=100) == 0
    assert count_new_examples(url, postgres.BASE_TIME.astimezone(timezone(timedelta(hours=2))), limit=100) == 0
    assert count_new_examples(url, postgres.BASE_TIME - timedelta(seconds=90), limit=100) == 2


def test_reader_session_is_read_only(current_db: str) -> None:
    postgres.insert_current(current_db, EVERY_KIND[:1])
    before = postgres.checksum(current_db)
    url = postgres.sqlalchemy_url(current_db)
    with connect_source(url, 5.0, 5.0) as conn:
        settings = dict(
            conn.execute(
                text(
                    "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('application_name', 'statement_timeout', 'transaction_read_only')"
                )
            ).all()
        )
        assert settings == {
            "application_name": "homeiq-trainer",
            "statement_timeout": "5000",
            "transaction_read_only": "on",
        }
        # A server whose host dies mid-session is given up in seconds, not after the kernel's two hours.
        dsn = conn.connection.driver_connection.info.dsn  # type: ignore[union-attr]
        assert "keepalives=1" in dsn and "keepalives_idle=10" in dsn and "keepalives_count=3" in dsn
        conn.rollback()
        with pytest.raises(DBAPIError) as caught:
            conn.execute(text("INSERT INTO automation.ask_ai_queries (id, user_query) VALUES ('x', 'y')"))
        assert isinstance(caught.value.orig, psycopg.errors.ReadOnlySqlTransaction)
        conn.rollback()
        with pytest.raises(DBAPIError):
            conn.execute(text("UPDATE automation.ask_ai_queries SET status = 'failed'"))
        conn.rollback()
    assert postgres.checksum(current_db) == before


def test_writer_never_waits_for_the_reader(current_db: str, tmp_path: Path) -> None:
    rows = [(f"q{i}", [suggestion(f"a{i}")] if i % 10 else "bad", "complete") for i in range(20_000)]
    postgres.insert_current(current_db, rows)
    stop_file, stats_file = tmp_path / "stop", tmp_path / "stats.json"
    # Its own process, as HomeIQ's service is: a thread here would measure our GIL, not PostgreSQL.
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.homeiq_pg_writer", current_db, str(stop_file), str(stats_file)],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        url = postgres.sqlalchemy_url(current_db)
        for _ in range(3):
            examples, _ = load_examples(url, max_samples=15_000)
            assert len(examples) == 15_000
    finally:
        stop_file.touch()
        writer.wait(timeout=30)
    stats = json.loads(stats_file.read_text())
    # No insert waited 50 ms for a lock (the writer's lock_timeout would have failed it)...
    assert stats["errors"] == []
    assert stats["inserts"] > 10
    # ...and the inserts stayed fast. Not the maximum: one slow disk flush on a busy VM took 191 ms.
    assert stats["p99_s"] < 0.1, (
        f"the writer's p99 was {stats['p99_s'] * 1000:.0f} ms (worst {stats['max_s'] * 1000:.0f} ms)"
    )


def test_server_gone_mid_read_is_one_line(current_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres.insert_current(current_db, [(f"q{i}", [suggestion(f"a{i}")], "complete") for i in range(2000)])
    monkeypatch.setattr(data, "MAX_PAGE_ROWS", 600)
    real = data.example_from_row
    calls = 0

    def kill_after_first_page(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 700:  # inside the second page: end our session from the server's side
            with postgres.connect() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'homeiq-trainer' AND datname = %s",
                    (current_db,),
                )
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "example_from_row", kill_after_first_page)
    url = postgres.sqlalchemy_url(current_db, PASSWORD)
    with pytest.raises(DataError) as caught:
        load_examples(url, max_samples=100_000)
    message = str(caught.value)
    assert "server closed the connection" in message
    assert f"automation.ask_ai_queries from database {current_db} on {server(url)}" in message
    assert PASSWORD not in message and "\n" not in message


def test_a_source_that_took_the_connection_and_went_quiet_is_a_problem_not_a_hang(
    current_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq bounds the connecting and the server its own work, nothing the wait for an answer: the
    source check waited for good, and the problem sensor said the source was fine all the while."""
    from homeiq_trainer import problem
    from homeiq_trainer.settings import load_settings

    proxy = postgres.StallingProxy()
    monkeypatch.setattr(problem, "SOURCE_CHECK_WAIT_S", 2.0)
    settings = load_settings(None, {"data": {"source": proxy.url(current_db)}})
    seen: list[str | None] = []
    watch = problem.SourceWatch(settings, seen.append)
    checked = threading.Thread(target=watch.check, daemon=True)
    checked.start()
    checked.join(10)
    assert not checked.is_alive()  # before: still waiting
    assert seen == ["no answer within 2 s"]
    # The next check waits for the hung one again instead of opening a connection per check.
    assert watch.check() is not None and proxy.accepted == 1
    assert seen == ["no answer within 2 s", watch.error] and "still waiting" in str(watch.error)
    proxy.close()


@pytest.mark.parametrize(
    ("make_url", "expected"),
    [
        (lambda db: f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/{db}", "connection refused"),
        (lambda db: f"postgresql://postgres:{PASSWORD}@no-such-host.invalid:5432/{db}", "unknown host"),
        (lambda db: postgres.sqlalchemy_url(f"{db}_missing", PASSWORD), "database does not exist"),
    ],
    ids=["refused", "unknown-host", "missing-database"],
)
def test_connection_errors_are_one_line_without_password(current_db: str, make_url, expected: str) -> None:
    url = make_url(current_db)
    with pytest.raises(DataError) as caught:
        load_examples(url, 10, options=SourceOptions(connect_timeout_s=3))
    message = str(caught.value)
    assert expected in message and "ask_ai_queries" in message and "database " in message
    assert PASSWORD not in message and "\n" not in message


def test_missing_table_names_the_schemas_searched(pg_database: str) -> None:
    with postgres.connect(pg_database) as conn:
        conn.execute("DROP SCHEMA IF EXISTS automation CASCADE")
    url = postgres.sqlalchemy_url(pg_database, PASSWORD)
    with pytest.raises(DataError, match=r"no ask_ai_queries table in schema automation, public of database"):
        load_examples(url, 10)
    with pytest.raises(DataError, match=r"no ask_ai_queries table in schema homeiq of database"):
        load_examples(url, 10, options=SourceOptions(schema="homeiq"))


def test_table_in_public_schema_is_found(pg_database: str) -> None:
    postgres.reset_schema(
        pg_database,
        "DROP TABLE IF EXISTS public.ask_ai_queries;" + postgres.CURRENT_DDL.replace("automation.", "public."),
    )
    postgres.insert_current(pg_database, [], postgres.BASE_TIME)
    with postgres.connect(pg_database) as conn:
        conn.execute(
            "INSERT INTO public.ask_ai_queries (id, user_query, status, suggestions) VALUES "
            "('1', 'q', 'complete', '[{\"description\": \"a\"}]')"
        )
    try:
        examples, _ = load_examples(postgres.sqlalchemy_url(pg_database), 10)
        assert [e.response for e in examples] == ["a"]
    finally:
        with postgres.connect(pg_database) as conn:
            conn.execute("DROP TABLE public.ask_ai_queries")


def test_missing_column_is_named(pg_database: str) -> None:
    postgres.reset_schema(
        pg_database, postgres.CURRENT_DDL + "ALTER TABLE automation.ask_ai_queries DROP COLUMN status;"
    )
    with pytest.raises(DataError, match=r"automation.ask_ai_queries in database .* lacks column\(s\) status"):
        load_examples(postgres.sqlalchemy_url(pg_database), 10)


def test_no_select_permission_is_named(current_db: str) -> None:
    with postgres.login_role(current_db, "homeiq_noselect", "GRANT USAGE ON SCHEMA automation TO {role}") as role:
        url = postgres.sqlalchemy_url(current_db, PASSWORD).set(username=role)
        with pytest.raises(DataError) as caught:
            load_examples(url, 10)
    message = str(caught.value)
    assert "no SELECT permission on automation.ask_ai_queries" in message
    assert f"database {current_db} on {server(url)}" in message and PASSWORD not in message


def test_select_without_usage_on_the_schema_names_the_missing_grant(current_db: str) -> None:
    grant = "GRANT SELECT ON automation.ask_ai_queries TO {role}"
    missing = r"no USAGE permission on schema automation \(GRANT USAGE ON SCHEMA"
    with postgres.login_role(current_db, "homeiq_nousage", grant) as role, pytest.raises(DataError, match=missing):
        load_examples(postgres.sqlalchemy_url(current_db).set(username=role), 10)


def test_a_history_role_that_may_not_create_its_tables_is_told_what_to_grant(pg_database: str) -> None:
    """On PostgreSQL 15 a role may not create tables in `public` of a database it does not own."""
    from homeiq_trainer.history import HistoryStore, HistoryUnavailable

    revoke = "REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}"
    with postgres.login_role(postgres.without_homeiq(pg_database), "homeiq_nocreate", revoke) as role:
        url = postgres.sqlalchemy_url(pg_database, PASSWORD).set(username=role)
        with pytest.raises(HistoryUnavailable) as caught:
            HistoryStore(url)
    message = str(caught.value)
    assert "may not create training_runs" in message and "GRANT CREATE ON SCHEMA public" in message
    assert f"{role}:***@" in message and PASSWORD not in message


def test_wrong_password_is_one_line_without_it() -> None:
    # The tests' server trusts 127.0.0.1 (pg_hba.conf) and never asks for a password, so a stand-in
    # server asks for one and rejects it: the real driver, connection and error path end to end.
    server_ = postgres.PasswordRejectingServer()
    try:
        url = f"postgresql+asyncpg://homeiq@127.0.0.1:{server_.port}/homeiq"
        with pytest.raises(DataError) as caught:
            load_examples(database_url(url, PASSWORD), 10, options=SourceOptions(connect_timeout_s=5))
    finally:
        server_.close()
    assert server_.passwords and server_.passwords[-1] == PASSWORD  # source_password reached the server
    assert str(caught.value) == (
        f"cannot read ask_ai_queries from database homeiq on 127.0.0.1:{server_.port}: password authentication failed"
    )


def test_wrong_password_maps_from_the_drivers_error() -> None:
    url = database_url(f"postgresql://homeiq:{PASSWORD}@postgres:5432/homeiq")
    driver = psycopg.OperationalError(
        'connection failed: connection to server at "172.18.0.2", port 5432 failed: '
        'FATAL:  password authentication failed for user "homeiq"'
    )
    error = source_error(OperationalError("connect", {}, driver), url, None, 10.0)
    assert str(error) == (
        "cannot read ask_ai_queries from database homeiq on postgres:5432: password authentication failed"
    )


def test_training_run_on_postgres_keeps_password_out(current_db: str, make_settings, tmp_path: Path, caplog) -> None:
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.jobs import JobRequest, open_history, open_run, record_result
    from homeiq_trainer.messages import RunStatus, TrainParams
    from homeiq_trainer.training.run import execute_run

    good = [
        (f"Turn on light {i} at {i % 24}:00", [suggestion(f"Light {i} on at {i % 24}:00")], "complete")
        for i in range(60)
    ]
    postgres.insert_current(current_db, EVERY_KIND + good)
    before = postgres.checksum(current_db)
    url = postgres.sqlalchemy_url(current_db).render_as_string(hide_password=False).replace("+psycopg", "+asyncpg")
    settings = make_settings(data={"source": url, "source_password": PASSWORD})
    caplog.set_level("DEBUG")
    store = open_history(settings)
    row = open_run(store, settings, JobRequest(params=TrainParams(), triggered_by="test"))
    result = execute_run(settings, TrainParams(), row.run_identifier)
    row = record_result(store, settings, row, result)
    store.close()
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.data.skipped == EXPECTED_SKIPS
    assert result.data.examples == 63
    assert postgres.checksum(current_db) == before
    metadata = (Path(result.run_dir or "") / "training_run.json").read_text()
    assert json.loads(metadata)["data"]["skipped"] == EXPECTED_SKIPS
    history = settings.storage.history_db.read_bytes()
    stored = HistoryStore(settings.storage.history_db).get(row.id)  # type: ignore[arg-type]
    assert stored is not None and stored.status == "completed"
    for haystack in (metadata, history.decode("latin-1"), caplog.text, repr(settings)):
        assert PASSWORD not in haystack


def test_training_run_on_the_legacy_shape_in_postgres(legacy_db: str, make_settings) -> None:
    from homeiq_trainer.messages import RunStatus, TrainParams
    from homeiq_trainer.training.run import execute_run

    good: list[tuple[str, object]] = [
        (f"Dim lamp {i} at {i % 24}:30", json.dumps([{"description": f"Lamp {i} dims at {i % 24}:30"}]))
        for i in range(40)
    ]
    bad: list[tuple[str, object]] = [("x", "not json"), ("x", "[]"), ("", json.dumps([{"description": "y"}]))]
    postgres.insert_legacy(legacy_db, good + bad)
    before = postgres.checksum(legacy_db)
    settings = make_settings(data={"source": postgres.sqlalchemy_url(legacy_db).render_as_string(hide_password=False)})
    result = execute_run(settings, TrainParams(), "run_20261201_000000")
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.data.examples == 40
    assert result.data.skipped == {SKIP_INVALID_JSON: 1, SKIP_EMPTY_LIST: 1, SKIP_EMPTY_QUERY: 1}
    assert (Path(result.run_dir or "") / "adapter_model.safetensors").is_file()
    assert postgres.checksum(legacy_db) == before


def test_the_daemon_trains_from_postgres_and_publishes_no_password(
    current_db: str, make_settings, broker, watcher, caplog
) -> None:
    """The daemon hands the source URL to its training process in clear (it once sent asterisks), to no one else."""
    from homeiq_trainer.app import TrainerApp

    good = [
        (f"Close blind {i} at {i % 24}:15", [suggestion(f"Blind {i} closes at {i % 24}:15")], "complete")
        for i in range(50)
    ]
    postgres.insert_current(current_db, good)
    url = postgres.sqlalchemy_url(current_db, PASSWORD).render_as_string(hide_password=False)
    assert PASSWORD in url
    mqtt = {"host": "127.0.0.1", "port": broker.port, "client_id": "homeiq-trainer-pg-test"}
    caplog.set_level("DEBUG")
    app = TrainerApp(make_settings(data={"source": url}, mqtt=mqtt))
    app.start()
    try:
        assert app.link.wait_connected(10)
        watcher.publish("homeiq/trainer/command", "start")
        state = watcher.wait_for("homeiq/trainer/state", lambda s: s["state"] in ("completed", "failed"), timeout=120)
    finally:
        app.stop()
    assert state["state"] == "completed", state
    assert watcher.json("homeiq/trainer/last_run")["dataset_size"] == 50
    published = b"".join(payload for _, _, payload in watcher.log)
    assert PASSWORD.encode() not in published and PASSWORD not in caplog.text

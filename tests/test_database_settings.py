"""data.source / storage.history as URLs: normalised, masked everywhere, never HomeIQ's database for writing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from homeiq_trainer.database import database_url, masked, same_database, scrub, where
from homeiq_trainer.history import HistoryStore, HistoryUnavailable
from homeiq_trainer.settings import ConfigError, load_settings
from tests import postgres

PASSWORD = "url-s3cret-pw"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("data/ai_automation.db", "sqlite:///data/ai_automation.db"),
        ("sqlite:////share/homeiq/ai_automation.db", "sqlite:////share/homeiq/ai_automation.db"),
        ("postgresql+asyncpg://homeiq:pw@postgres:5432/homeiq", "postgresql+psycopg://homeiq:***@postgres:5432/homeiq"),
        ("postgres://homeiq@postgres/homeiq", "postgresql+psycopg://homeiq@postgres/homeiq"),
        ("postgresql+psycopg2://homeiq@postgres/homeiq", "postgresql+psycopg://homeiq@postgres/homeiq"),
    ],
)
def test_urls_are_normalised(given: str, expected: str) -> None:
    assert database_url(given).render_as_string(hide_password=True) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("mysql://u:pw@h/db", "unsupported database 'mysql'"),
        ("postgresql://u:pw@h", "needs a database name"),
        ("sqlite://", "needs a file"),
        # An unencoded @ in the password: the port is read from the rest of it, and its error quoted it.
        ("postgresql://u:p@ss:pw@h/db", "not a database URL"),
        # ... and without a colon after it, the rest of the password was read, and shown, as the host.
        ("postgresql://u:p@sspw@h:5432/db", "password contains '@': write it as %40"),
    ],
)
def test_unusable_source_names_the_key_never_the_password(
    given: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOMEIQ_DATA__SOURCE", given.replace("pw", PASSWORD))  # and the variable that set it
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "data.source (HOMEIQ_DATA__SOURCE)" in str(caught.value) and message in str(caught.value)
    assert PASSWORD not in str(caught.value)
    monkeypatch.delenv("HOMEIQ_DATA__SOURCE")
    with pytest.raises(ConfigError) as caught:  # given some other way: the key alone
        load_settings(None, {"data": {"source": given.replace("pw", PASSWORD)}})
    assert "data.source: " in str(caught.value) and message in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_password_option_fills_a_url_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEIQ_DATA__SOURCE", "postgresql+asyncpg://homeiq@postgres:5432/homeiq")
    monkeypatch.setenv("HOMEIQ_DATA__SOURCE_PASSWORD", PASSWORD)
    settings = load_settings()
    url = settings.data.source_url()
    assert url.password == PASSWORD and url.drivername == "postgresql+psycopg"
    assert masked(url) == "postgresql+psycopg://homeiq:***@postgres:5432/homeiq"
    assert where(url) == "database homeiq on postgres:5432"
    assert PASSWORD not in repr(settings) and PASSWORD not in settings.model_dump_json()
    # A URL's own password wins.
    monkeypatch.setenv("HOMEIQ_DATA__SOURCE", "postgresql://homeiq:own@postgres/homeiq")
    assert load_settings().data.source_url().password == "own"


def test_a_password_in_the_query_is_masked_too() -> None:
    url = database_url(f"postgresql://homeiq@postgres/homeiq?sslmode=require&password={PASSWORD}")
    assert url.query["password"] == PASSWORD  # still what the driver gets
    assert masked(url) == "postgresql+psycopg://homeiq@postgres/homeiq?password=***&sslmode=require"
    assert scrub(f"FATAL: password {PASSWORD} rejected", url) == "FATAL: password *** rejected"


def test_source_db_still_works_and_source_wins(tmp_path: Path) -> None:
    settings = load_settings(None, {"data": {"source_db": str(tmp_path / "a.db")}})
    assert masked(settings.data.source_url()) == str(tmp_path / "a.db")
    settings = load_settings(None, {"data": {"source_db": str(tmp_path / "a.db"), "source": str(tmp_path / "b.db")}})
    assert masked(settings.data.source_url()) == str(tmp_path / "b.db")


@pytest.mark.parametrize(
    ("source", "history"),
    [
        ("postgresql://homeiq@db.lan/homeiq", "postgresql://trainer:pw@db.lan:5432/homeiq"),
        ("{tmp}/homeiq.db", "sqlite:///{tmp}/./homeiq.db"),
        # One server by two loopback names: they compared as two.
        ("postgresql://homeiq@localhost/homeiq", "postgresql://trainer@127.0.0.1:5432/homeiq"),
    ],
)
def test_history_never_in_homeiqs_database(tmp_path: Path, source: str, history: str) -> None:
    with pytest.raises(ConfigError, match="storage.history must not be HomeIQ's database"):
        load_settings(
            None,
            {"data": {"source": source.format(tmp=tmp_path)}, "storage": {"history": history.format(tmp=tmp_path)}},
        )


def test_history_never_where_homeiqs_runs_are_recorded(tmp_path: Path) -> None:
    """With a SQLite source, HomeIQ's database is named only by storage.homeiq_runs_url: it was not compared."""
    storage = {
        "homeiq_runs": True,
        "homeiq_runs_url": "postgresql://w@db/homeiq",
        "history": "postgresql://t@db/homeiq",
    }
    with pytest.raises(ConfigError, match=r"must not be HomeIQ's database \(storage.homeiq_runs_url\)"):
        load_settings(None, {"data": {"source_db": str(tmp_path / "old.db")}, "storage": storage})


def test_a_history_in_a_database_holding_homeiqs_table_is_refused(pg_database: str) -> None:
    """Whatever name reached it (a container's name, the host's address): HomeIQ's tables tell."""
    postgres.reset_schema(pg_database, postgres.CURRENT_DDL)
    with pytest.raises(HistoryUnavailable, match="is HomeIQ's database \\(it holds automation.ask_ai_queries\\)"):
        HistoryStore(postgres.sqlalchemy_url(pg_database, PASSWORD))
    with postgres.connect(pg_database) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'served_adapters'").fetchone()
        conn.execute("DROP SCHEMA automation CASCADE")
    assert tables == (0,)  # nothing of ours was created there


def test_history_on_another_database_of_the_server_is_fine() -> None:
    a, b = database_url("postgresql://h/homeiq"), database_url("postgresql://h:5432/trainer")
    assert not same_database(a, b)
    settings = load_settings(
        None, {"data": {"source": "postgresql://h/homeiq"}, "storage": {"history": "postgresql://h/trainer"}}
    )
    assert settings.storage.history_url().database == "trainer"


def test_a_unix_socket_url_is_named_by_its_socket_and_counts_as_this_machine() -> None:
    """libpq's `?host=/run/postgresql` was named `localhost:5432`, a server the URL never reaches."""
    socket_url = database_url("postgresql://homeiq@/homeiq?host=/run/postgresql&port=5433")
    assert where(socket_url) == "database homeiq on the socket in /run/postgresql (port 5433)"
    assert where(database_url("postgresql://homeiq@/homeiq?host=db.lan")) == "database homeiq on db.lan:5432"
    assert same_database(socket_url, database_url("postgresql://t@127.0.0.1:5433/homeiq"))
    assert not same_database(socket_url, database_url("postgresql://t@127.0.0.1:5432/homeiq"))


def test_homeiq_runs_needs_postgres(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="homeiq_runs needs a PostgreSQL"):
        load_settings(None, {"data": {"source_db": str(tmp_path / "a.db")}, "storage": {"homeiq_runs": True}})
    settings = load_settings(
        None,
        {
            "data": {"source": "postgresql://ro@h/homeiq", "source_password": PASSWORD},
            "storage": {"homeiq_runs": True, "homeiq_runs_url": "postgresql://writer@h/homeiq"},
        },
    )
    runs_url = settings.homeiq_runs_url()
    assert runs_url is not None and runs_url.username == "writer" and runs_url.password == PASSWORD
    assert load_settings(None, {"data": {"source": "postgresql://ro@h/homeiq"}}).homeiq_runs_url() is None


def test_history_on_postgres(pg_database: str) -> None:
    url = postgres.sqlalchemy_url(postgres.without_homeiq(pg_database), PASSWORD)
    store = HistoryStore(url)
    try:
        assert PASSWORD not in store.display
        run = store.create("run_20260301_120000", "google/flan-t5-small", "/out/run", "test", {"epochs": 1})
        assert store.by_identifier("run_20260301_120000") == run
        assert [r.run_identifier for r in store.recent(5)] == ["run_20260301_120000"]
    finally:
        store.close()
        with postgres.connect(pg_database) as conn:
            conn.execute("DROP TABLE IF EXISTS training_runs")


def test_cli_failure_on_unreachable_server_is_one_line_without_password(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HOMEIQ_DATA__SOURCE": "postgresql://homeiq@127.0.0.1:1/homeiq",
        "HOMEIQ_DATA__SOURCE_PASSWORD": PASSWORD,
        "HOMEIQ_STORAGE__HISTORY_DB": str(tmp_path / "history.db"),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(tmp_path / "out"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "homeiq_trainer", "train", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot read ask_ai_queries from database homeiq on 127.0.0.1:1: connection refused" in last
    assert PASSWORD not in done.stderr + done.stdout
    assert PASSWORD.encode() not in (tmp_path / "history.db").read_bytes()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

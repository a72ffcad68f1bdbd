"""A real PostgreSQL for tests: a throwaway database per session, HomeIQ's DDL, rows written as HomeIQ does."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy.engine import URL, make_url

ADMIN_URL_ENV = "TEST_POSTGRES_URL"
"""Where the tests' server is; libpq form. The default is the development and CI server."""
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# HomeIQ's current table, exactly as its infrastructure/postgres/init-schemas.sql creates it (issue #10).
CURRENT_DDL = """
CREATE SCHEMA IF NOT EXISTS automation;
CREATE TABLE automation.ask_ai_queries (
    id VARCHAR(36) PRIMARY KEY,
    user_query TEXT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'pending',
    entities JSONB,
    suggestions JSONB,
    confidence_score DOUBLE PRECISION,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
"""
# The legacy shape HomeIQ's simulation creates inside PostgreSQL: suggestions as text.
LEGACY_DDL = """
CREATE SCHEMA IF NOT EXISTS automation;
CREATE TABLE IF NOT EXISTS automation.ask_ai_queries (
    query_id TEXT PRIMARY KEY,
    original_query TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT 'anonymous',
    parsed_intent TEXT,
    extracted_entities TEXT,
    suggestions TEXT,
    confidence REAL,
    processing_time_ms INTEGER,
    failure_reason TEXT,
    created_at TIMESTAMP
);
"""
# HomeIQ's run history (its ai-training-service's model, `id SERIAL`, timestamps without zone).
TRAINING_RUNS_DDL = """
CREATE SCHEMA IF NOT EXISTS automation;
CREATE TABLE automation.training_runs (
    id SERIAL PRIMARY KEY,
    training_type VARCHAR(20) NOT NULL DEFAULT 'soft_prompt',
    status VARCHAR(20) NOT NULL DEFAULT 'queued',
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    dataset_size INTEGER,
    base_model VARCHAR,
    output_dir VARCHAR,
    run_identifier VARCHAR UNIQUE,
    final_loss DOUBLE PRECISION,
    error_message TEXT,
    metadata_path VARCHAR,
    triggered_by VARCHAR NOT NULL DEFAULT 'admin',
    iteration_history_json JSON
);
CREATE INDEX idx_training_runs_status ON automation.training_runs (status);
CREATE INDEX idx_training_runs_started_at ON automation.training_runs (started_at);
CREATE INDEX idx_training_runs_run_identifier ON automation.training_runs (run_identifier);
"""
# What HomeIQ's admin page asks for (GET /api/v1/training/runs): newest first.
HOMEIQ_RUNS_QUERY = (
    "SELECT run_identifier, status, dataset_size, final_loss, triggered_by, started_at, finished_at "
    "FROM automation.training_runs ORDER BY started_at DESC LIMIT 20"
)
# A content checksum of the whole table, independent of physical order.
CHECKSUM_QUERY = "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} AS t"
EMPTY_DIGEST = "d41d8cd98f00b204e9800998ecf8427e"
"""md5 of no rows at all."""
BASE_TIME = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SQL_NULL = object()
"""A suggestions value stored as SQL NULL (any other None is JSON `null`)."""


def admin_url() -> str:
    """The libpq URL of a superuser on the tests' server."""
    return os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)


def connect(dbname: str | None = None, **kwargs: Any) -> psycopg.Connection:
    """An autocommit superuser connection (to `dbname`, else the maintenance database)."""
    url = make_url(admin_url())
    if dbname:
        url = url.set(database=dbname)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5, **kwargs)


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A uniquely named database, dropped afterwards (with any session still in it)."""
    name = f"homeiq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with connect() as conn:
        # UTF-8 whatever the cluster's default: one initialised without a locale is SQL_ASCII, which
        # refuses the JSONB escapes of non-ASCII text ("21 °C") that HomeIQ's rows hold.
        conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        yield name
    finally:
        with connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def login_role(dbname: str, prefix: str, *grants: str) -> Iterator[str]:
    """A login role of its own in `dbname`, with `grants` run for it (`{role}` in them: its name); dropped after."""
    role = f"{prefix}_{dbname[-8:]}"
    with connect(dbname) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        for grant in grants:
            conn.execute(grant.format(role=f'"{role}"'))
    try:
        yield role
    finally:
        with connect(dbname) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def sqlalchemy_url(dbname: str, password: str | None = None) -> URL:
    """A SQLAlchemy URL of the test database (a password is ignored by trust authentication)."""
    url = make_url(admin_url()).set(drivername="postgresql+psycopg", database=dbname)
    return url.set(password=password) if password else url


def without_homeiq(dbname: str) -> str:
    """`dbname` without HomeIQ's schema (an earlier test's), as a history's database must be; returned."""
    with connect(dbname) as conn:
        conn.execute("DROP SCHEMA IF EXISTS automation CASCADE")
    return dbname


def reset_schema(dbname: str, ddl: str) -> None:
    """Drop HomeIQ's schema and build it again from `ddl`."""
    with connect(dbname) as conn:
        conn.execute("DROP SCHEMA IF EXISTS automation CASCADE")
        conn.execute(ddl)


def suggestion(description: object, confidence: object = 0.9, source: str = "openai") -> dict[str, Any]:
    """One suggestion as HomeIQ's generator writes it."""
    return {
        "suggestion_id": f"sug-{uuid.uuid4().hex[:8]}",
        "template_id": "light_schedule",
        "description": description,
        "confidence": confidence,
        "parameters": {"entity_id": "light.porch"},
        "source": source,
    }


def insert_current(
    dbname: str, rows: Iterable[tuple[str, object, str]], start: datetime = BASE_TIME, step_s: float = -60.0
) -> None:
    """Rows (user_query, suggestions as a Python value, status), newest first, into the current shape."""
    with connect(dbname) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO automation.ask_ai_queries (id, user_query, status, suggestions, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    str(uuid.uuid4()),
                    query,
                    status,
                    None if sugg is SQL_NULL else Jsonb(sugg),
                    start + timedelta(seconds=i * step_s),
                    start,
                )
                for i, (query, sugg, status) in enumerate(rows)
            ],
        )


def insert_legacy(dbname: str, rows: Iterable[tuple[str, object]], start: datetime = BASE_TIME) -> None:
    """Rows (original_query, suggestions text), newest first, into the legacy shape (naive UTC stamps)."""
    with connect(dbname) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO automation.ask_ai_queries (query_id, original_query, suggestions, created_at) "
            "VALUES (%s, %s, %s, %s)",
            [
                (f"query-{i:06d}", query, sugg, (start - timedelta(minutes=i)).replace(tzinfo=None))
                for i, (query, sugg) in enumerate(rows)
            ],
        )


def checksum(dbname: str, table: str = "automation.ask_ai_queries") -> tuple[int, str]:
    """Row count and content digest of `table`."""
    with connect(dbname) as conn:
        row = conn.execute(CHECKSUM_QUERY.format(table=table)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


class PasswordRejectingServer:
    """Speaks just enough of PostgreSQL's protocol to ask for a password and reject it, as a server
    with password authentication does (the tests' real server trusts 127.0.0.1 and never asks)."""

    _SSL_OR_GSS = (80877103, 80877104)

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.passwords: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, struct.error):
                self._session(conn)

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("client went away")
            data += chunk
        return data

    def _session(self, conn: socket.socket) -> None:
        while True:  # SSL and GSS encryption requests are declined, then the startup message comes
            length, code = struct.unpack("!ii", self._read(conn, 8))
            self._read(conn, length - 8)
            if code not in self._SSL_OR_GSS:
                break
            conn.sendall(b"N")
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = self._read(conn, 1)
        length = struct.unpack("!i", self._read(conn, 4))[0]
        body = self._read(conn, length - 4)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode())
        fields = b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "homeiq"\0\0'
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)

    def close(self) -> None:
        self.sock.close()


class StallingProxy:
    """Passes each connection's start-up (or all, until `frozen`) to the tests' server, then holds all the client sends:
    a backend that took the connection and went quiet (stopped, or stuck on a dead disk), which
    neither libpq's connect_timeout nor the server's statement_timeout ends."""

    def __init__(self, *, after_startup: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.after_startup = after_startup
        """False: everything passes until `frozen` is set (a server that goes quiet later)."""
        self.frozen = threading.Event()
        self._server = make_url(admin_url())
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str | None = None) -> str:
        """A libpq URL of the tests' server (`dbname`, else its maintenance database) through the proxy."""
        url = make_url(admin_url()).set(host="127.0.0.1", port=self.port)
        return url.set(database=dbname or url.database).render_as_string(hide_password=False)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                self.accepted += 1
                upstream = socket.create_connection((self._server.host or "127.0.0.1", self._server.port or 5432))
                ready = threading.Event()
                threading.Thread(target=self._pipe, args=(client, upstream, True, ready), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, False, ready), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool, ready: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and (self.frozen.is_set() or (self.after_startup and ready.is_set())):
                    continue  # swallowed: the server never answers again
                if not from_client and b"Z\x00\x00\x00\x05" in data:  # ReadyForQuery: connected
                    ready.set()
                sink.sendall(data)

    def close(self) -> None:
        self.sock.close()

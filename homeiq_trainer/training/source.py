"""HomeIQ's `ask_ai_queries`, opened read-only on SQLite or PostgreSQL, its shape found, its errors in one line."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import ColumnElement, Connection, Text, cast, column, create_engine, inspect, table
from sqlalchemy.engine import URL
from sqlalchemy.engine.reflection import Inspector
from sqlalchemy.exc import DBAPIError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import sqltypes

from homeiq_trainer.database import (
    is_postgres,
    postgres_connect_args,
    postgres_reason,
    scrub,
    sqlite_path,
    sqlite_when_unlocked,
    where,
)

TABLE = "ask_ai_queries"
DEFAULT_SCHEMAS = ("automation", "public")
"""Where HomeIQ's PostgreSQL keeps the table (its init script), then PostgreSQL's default schema."""


class DataError(Exception):
    """The source cannot give a usable dataset; the message says why."""


@dataclass(frozen=True)
class Shape:
    """The column names of one of HomeIQ's table layouts."""

    name: str
    key: str
    query: str
    created: str
    status: str | None


CURRENT = Shape("current", key="id", query="user_query", created="created_at", status="status")
"""HomeIQ on PostgreSQL since 2026: JSONB suggestions, a status per row."""
LEGACY = Shape("legacy", key="query_id", query="original_query", created="created_at", status=None)
"""HomeIQ's SQLite of 2025 (and its simulation's PostgreSQL table): suggestions as JSON text."""


@dataclass(frozen=True)
class SourceTable:
    """The table to read: its columns in the order key, query, suggestions, created_at[, status]."""

    name: str
    columns: tuple[ColumnElement, ...]
    filters: tuple[ColumnElement, ...]

    @property
    def key(self) -> ColumnElement:
        return self.columns[0]

    @property
    def created(self) -> ColumnElement:
        return self.columns[3]

    @property
    def status(self) -> ColumnElement | None:
        return self.columns[4] if len(self.columns) > 4 else None


LOCK_POLL_S = 0.001
"""How often a read asks again for a SQLite database that a writer holds locked."""


class _PatientCursor(sqlite3.Cursor):
    """Asks again every `LOCK_POLL_S` for a locked database, until the connection's busy timeout.

    SQLite's own busy handler sleeps up to 100 ms between tries. A rollback-journal writer that
    commits back to back holds its commit lock ~97% of the time on a VM disk, so such a reader waited
    up to 4.3 s for one statement, and past 10 s in CI; asking every millisecond, 0.22 s at most. A
    read that finds the database locked has taken no lock and returned no row: asking again is safe.
    """

    connection: _ReadOnlyConnection

    def execute(self, sql: str, parameters: object = (), /) -> _PatientCursor:
        def once() -> None:
            sqlite3.Cursor.execute(self, sql, parameters)  # type: ignore[arg-type]

        sqlite_when_unlocked(once, self.connection.busy_timeout_s, LOCK_POLL_S)
        return self


class _ReadOnlyConnection(sqlite3.Connection):
    busy_timeout_s = 0.0

    def cursor(self, factory: type[sqlite3.Cursor] = _PatientCursor) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory)


def connect_read_only(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open HomeIQ's SQLite database so that we can never create, change or lock it for writing."""
    if not path.is_file():
        raise DataError(f"source database not found: {path}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        # timeout=0: the cursor asks again itself, more often than SQLite's busy handler would
        conn = sqlite3.connect(uri, uri=True, timeout=0, check_same_thread=False, factory=_ReadOnlyConnection)
    except sqlite3.DatabaseError as exc:
        raise DataError(f"cannot read source database {path}: {exc}") from None
    conn.busy_timeout_s = busy_timeout_s
    # Bytes that are not UTF-8 come back as lone surrogates, and that row is skipped as `invalid_text`;
    # the default decoder raised instead, and one such row made the whole source unreadable.
    conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    # No probe statement here: the table lookup that follows is the first read, and under a busy
    # rollback-journal writer every statement is one more wait for the shared lock.
    conn.execute("PRAGMA query_only = 1")
    return conn


@contextmanager
def connect_source(url: URL, busy_timeout_s: float, connect_timeout_s: float) -> Iterator[Connection]:
    """A connection on which nothing can be written: SQLite `mode=ro`, PostgreSQL read-only transactions."""
    path = sqlite_path(url)
    if path is not None:
        engine = create_engine("sqlite://", creator=lambda: connect_read_only(path, busy_timeout_s), poolclass=NullPool)
    else:
        engine = create_engine(
            url, poolclass=NullPool, connect_args=postgres_connect_args(busy_timeout_s, connect_timeout_s, True)
        )
    try:
        with engine.connect() as conn:
            if path is None:
                conn.execution_options(postgresql_readonly=True)  # BEGIN READ ONLY, whatever the role's default
            yield conn
    finally:
        engine.dispose()


def _columns(inspector: Inspector, schema: str | None) -> list:
    try:
        return inspector.get_columns(TABLE, schema=schema)
    except NoSuchTableError:
        return []


def _table_name(schema: str | None) -> str:
    return f"{schema}.{TABLE}" if schema else TABLE


def locate_table(conn: Connection, url: URL, schema: str | None) -> SourceTable:
    """Find `ask_ai_queries` (schema `schema`, else `automation`, then `public`) and which shape it has."""
    inspector = inspect(conn)
    postgres = is_postgres(url)
    schemas: tuple[str | None, ...] = ((schema,) if schema else DEFAULT_SCHEMAS) if postgres else (None,)
    # SQLite: one statement fewer (each waits for HomeIQ's writers); the table is there or columns are none.
    present = [s for s in schemas if not postgres or inspector.has_table(TABLE, schema=s)]
    types = {c["name"]: c["type"] for c in _columns(inspector, present[0])} if present else {}
    if not types:
        if not postgres:
            raise DataError(f"{where(url)} has no {TABLE} table: is it HomeIQ's database?")
        searched = ", ".join(str(s) for s in schemas)
        raise DataError(f"no {TABLE} table in schema {searched} of {where(url)}: is it HomeIQ's database?")
    found = present[0]
    name = _table_name(found)
    conn.rollback()
    shape = CURRENT if CURRENT.query in types or (CURRENT.key in types and LEGACY.key not in types) else LEGACY
    wanted = [shape.key, shape.query, "suggestions", shape.created, *([shape.status] if shape.status else [])]
    missing = [c for c in wanted if c not in types]
    if missing:
        raise DataError(
            f"{name} in {where(url)} lacks column(s) {', '.join(missing)} of HomeIQ's {shape.name} shape "
            f"({', '.join(wanted)})"
        )
    t = table(TABLE, *(column(c) for c in wanted), schema=found)
    columns: list[ColumnElement] = [t.c[c] for c in wanted]
    if postgres and isinstance(types["suggestions"], sqltypes.JSON):
        # As text, decoded row by row in example_from_row: psycopg would decode JSONB while fetching a
        # page, and one value it cannot decode (nested deeper than Python's recursion limit, an integer
        # of 5,000 digits; PostgreSQL stores both) would fail every read instead of skipping one row.
        columns[2] = cast(columns[2], Text)
    # Legacy rows without suggestions were never read by HomeIQ; current rows are all read so that
    # those not `complete` are counted.
    filters = () if shape.status else (columns[2].is_not(None),)
    return SourceTable(name, tuple(columns), filters)


def source_error(
    exc: SQLAlchemyError, url: URL, table_name: str | None, busy_timeout_s: float, connect_timeout_s: float = 10.0
) -> DataError:
    """One line for a failed read: what went wrong, with host, database and table; never the password."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    name = table_name or TABLE
    path = sqlite_path(url)
    if path is not None:
        message = str(orig if orig is not None else exc).splitlines()[0]
        if "locked" in message or "busy" in message:
            return DataError(f"source database stayed locked for more than {busy_timeout_s:g} s; try again later")
        return DataError(f"cannot read {path}: {message}")
    reason = postgres_reason(orig or exc, name, busy_timeout_s, connect_timeout_s)
    return DataError(scrub(f"cannot read {name} from {where(url)}: {reason}", url))

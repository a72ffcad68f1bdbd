"""Database addresses: SQLAlchemy URLs for SQLite and PostgreSQL, shown with the password masked."""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

APPLICATION_NAME = "homeiq-trainer"
"""How our connections appear in PostgreSQL's `pg_stat_activity`."""
POSTGRES_DRIVER = "postgresql+psycopg"
POSTGRES_DEFAULT_PORT = 5432
# HomeIQ's services write `postgresql+asyncpg://`; every PostgreSQL spelling goes through psycopg 3.
_POSTGRES_NAMES = frozenset({"postgres", "postgresql"})


_T = TypeVar("_T")
# SQLite's answers for a database another connection holds (primary codes: extended ones carry
# them in the low byte).
_SQLITE_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def sqlite_when_unlocked(statement: Callable[[], _T], timeout_s: float, poll_s: float) -> _T:
    """`statement()`, asked again every `poll_s` while SQLite answers that the database is locked.

    Gives up with SQLite's own error after `timeout_s`. For statements that take no lock and change
    nothing when refused (a read, a journal-mode switch), so asking again is safe.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if (exc.sqlite_errorcode & 0xFF) not in _SQLITE_LOCKED or time.monotonic() >= deadline:
                raise
        time.sleep(poll_s)


class NoAnswer(Exception):  # noqa: N818 - named for what the user is told
    """A database call that did not return within its wait (it goes on, on its own thread)."""


class BoundedWait:
    """Runs one blocking database call at a time on a daemon thread, waiting at most `wait_s` for it.

    libpq bounds the connecting (connect_timeout) and the server its own work (statement_timeout),
    but nothing bounds the wait for an answer on a connection made: a backend stopped or stuck on a
    dead disk keeps the TCP connection up (keepalives are answered) and never replies. A call left
    waiting goes on alone; while it does, the next call waits for it first and starts only once it
    ended, so a server that hangs for days holds one connection, not one per check.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()  # callers on several threads (a lock's keeper and a run's start)
        self._pending: Future[object] | None = None
        self._since = 0.0

    def call(self, work: Callable[[], _T], wait_s: float) -> _T:
        """`work()`'s result, or its exception; `NoAnswer` when it has not returned after `wait_s`.

        A call still waiting from before is waited for first, up to `wait_s` as well.
        """
        with self._lock:
            pending, since = self._pending, self._since
        if pending is not None:
            wait_for([pending], timeout=wait_s)
            if not pending.done():
                raise NoAnswer(f"no answer for {time.monotonic() - since:.0f} s (a call started then is still waiting)")
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the caller, whose frame decides
                future.set_exception(exc)

        with self._lock:
            self._pending, self._since = future, time.monotonic()  # type: ignore[assignment]
        threading.Thread(target=run, name=self.name, daemon=True).start()
        wait_for([future], timeout=wait_s)
        if not future.done():
            raise NoAnswer(f"no answer within {wait_s:g} s")
        with self._lock:
            if self._pending is future:
                self._pending = None
        return future.result()


# libpq connection parameters that are secrets when a URL carries them in its query.
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


class DatabaseUrlError(ValueError):
    """A source or history address that is not a SQLite path or a SQLite/PostgreSQL URL."""


def database_url(value: str | Path | URL, password: str | None = None) -> URL:
    """A SQLAlchemy URL from a URL or a plain SQLite file path; `password` fills in a URL without one."""
    if isinstance(value, URL):
        url = value
    elif isinstance(value, Path) or "://" not in value:
        return URL.create("sqlite", database=str(value))
    else:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):  # ValueError: a bad port, whose message quotes the text after it
            raise DatabaseUrlError("not a database URL (expected sqlite:///path or postgresql://host/db)") from None
    backend = url.get_backend_name()
    if backend in _POSTGRES_NAMES:
        url = url.set(drivername=POSTGRES_DRIVER)
        if url.host and "@" in url.host:
            # The password ends at its first '@', and the rest of it would be shown as part of the host.
            raise DatabaseUrlError("the URL's password contains '@': write it as %40")
        if not url.database:
            raise DatabaseUrlError("a PostgreSQL URL needs a database name (postgresql://user@host:5432/homeiq)")
        if password and url.password is None:
            url = url.set(password=password)
    elif backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise DatabaseUrlError("a SQLite URL needs a file (sqlite:///path/to/file.db)")
        url = url.set(drivername="sqlite")
    else:
        raise DatabaseUrlError(f"unsupported database {backend!r}: use sqlite or postgresql")
    return url


def is_postgres(url: URL) -> bool:
    """Whether the URL names a PostgreSQL server."""
    return url.get_backend_name() == "postgresql"


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL; None for a server."""
    return Path(url.database or "") if url.get_backend_name() == "sqlite" else None


def masked(url: URL) -> str:
    """The URL as it may be shown: the password, in its place or in the query (`?password=`), replaced by ***."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    hidden = {key: "***" for key in url.query if key.lower() in SECRET_QUERY_KEYS}
    # Rendering quotes query values: the mask would read %2A%2A%2A there.
    return url.update_query_dict(hidden).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def _query_value(url: URL, key: str) -> str | None:
    value = url.query.get(key)
    if isinstance(value, tuple):
        value = value[0] if value else None
    return value or None


def _endpoint(url: URL) -> tuple[str, int | str]:
    """Host and port a PostgreSQL URL connects to: its own, else libpq's `?host=`/`?port=`, else libpq's defaults.

    A `?host=` that starts with `/` is the folder of a unix socket.
    """
    host = url.host or _query_value(url, "host") or "localhost"
    port = url.port or _query_value(url, "port") or POSTGRES_DEFAULT_PORT
    return host, port


def server(url: URL) -> str:
    """`host:port` of a PostgreSQL URL (libpq's defaults filled in); a socket's folder for a unix socket."""
    host, port = _endpoint(url)
    if host.startswith("/"):
        return f"the socket in {host} (port {port})"
    return f"{host}:{port}"


def where(url: URL) -> str:
    """Words naming the database for messages: its file, or database and server; never a password."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    return f"database {url.database} on {server(url)}"


# Names of this machine's own loopback interface, one server whichever a URL uses.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def same_database(a: URL, b: URL) -> bool:
    """Whether two URLs reach the same database (same file, or same server and database name).

    Servers compare by name and port, loopback names as one: `localhost` and `127.0.0.1` are the same.
    Other aliases of one server (a container's name and the host's address) cannot be told apart
    here; `HistoryStore` refuses a PostgreSQL database that holds HomeIQ's tables.
    """
    path_a, path_b = sqlite_path(a), sqlite_path(b)
    if path_a is not None or path_b is not None:
        return path_a is not None and path_b is not None and path_a.resolve() == path_b.resolve()
    return (*_server_key(a), a.database) == (*_server_key(b), b.database)


def _server_key(url: URL) -> tuple[str, str]:
    host, port = _endpoint(url)
    # A unix socket is this machine's, most likely the server that localhost at its port reaches.
    host = "localhost" if host.startswith("/") or host.lower() in _LOOPBACK else host.lower()
    return host, str(port)


def secret_words(url: URL) -> list[str]:
    """The URL's passwords (in its place and in the query), for scrubbing driver messages that might quote them."""
    words = [url.password] if isinstance(url.password, str) else []
    for key, value in url.query.items():
        if key.lower() in SECRET_QUERY_KEYS:
            words += [value] if isinstance(value, str) else list(value)
    return [word for word in words if word]


def scrub(text: str, url: URL) -> str:
    """`text` with the URL's password masked, should a driver ever echo it."""
    for word in secret_words(url):
        text = text.replace(word, "***")
    return text


TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def postgres_connect_args(statement_timeout_s: float, connect_timeout_s: float, read_only: bool) -> dict[str, object]:
    """libpq parameters that keep our sessions short and visible to HomeIQ's operators."""
    timeout_ms = max(1, int(statement_timeout_s * 1000))
    options = [f"statement_timeout={timeout_ms}", f"lock_timeout={timeout_ms}", "TimeZone=UTC"]
    # A session left idle inside a transaction (a stuck process) must not pin old row versions.
    options.append(f"idle_in_transaction_session_timeout={timeout_ms * 6}")
    if read_only:
        options.append("default_transaction_read_only=on")
    return {
        "connect_timeout": max(2, math.ceil(connect_timeout_s)),  # libpq treats 1 as 2 anyway
        "application_name": APPLICATION_NAME,
        "options": " ".join(f"-c {option}" for option in options),
        # A server whose host died after the connection was made: given up in about 25 s, not the
        # kernel's two hours (the problem sensor's check and a run's read would hang that long).
        **TCP_KEEPALIVES,
    }


# PostgreSQL error classes (SQLSTATE) and what to tell the user; the first match wins.
_PG_SQLSTATE_REASONS = {
    "28P01": "password authentication failed",
    "28000": "the server refused this user (pg_hba.conf)",
    "3D000": "the database does not exist",
    "42P01": "{table} does not exist",
    "42703": "{table} lacks a column it had when the read began",
    "42501": "no {privilege} permission on {table} (GRANT {privilege} ON {table} TO the role in the URL)",
    "57014": "a statement ran longer than {timeout:g} s (statement_timeout); try again later",
    "55P03": "waited longer than {timeout:g} s for a lock (lock_timeout); try again later",
    "57P01": "the server closed the connection mid-operation",
    "57P02": "the server closed the connection mid-operation",
    "57P03": "the server is starting up or shutting down",
}
_PG_MESSAGE_REASONS = (
    ("password authentication failed", "password authentication failed"),
    ("no password supplied", "the server wants a password (data.source_password)"),
    ("could not translate host name", "unknown host"),
    ("failed to resolve host", "unknown host"),
    ("name or service not known", "unknown host"),
    ("connection refused", "connection refused (is PostgreSQL listening there?)"),
    ("timeout expired", "no answer within {connect_timeout:g} s (connect_timeout)"),
    ('database "', "the database does not exist"),
    ("server closed the connection", "the server closed the connection mid-operation"),
    ("terminating connection", "the server closed the connection mid-operation"),
    ("consuming input failed", "the server closed the connection mid-operation"),
    ("connection is closed", "the server closed the connection mid-operation"),
    ("connection is lost", "the server closed the connection mid-operation"),
)


def postgres_reason(
    orig: BaseException | None, table_name: str, timeout_s: float, connect_timeout_s: float, privilege: str = "SELECT"
) -> str:
    """Why a PostgreSQL operation failed, in a few words (the driver's own line when unforeseen)."""
    sqlstate = getattr(orig, "sqlstate", None)
    text = str(orig or "").strip()
    lowered = text.lower()
    schema = re.search(r'permission denied for schema "?([^"\s]+)', text)
    if sqlstate == "42501" and schema:  # SELECT on the table is not enough without USAGE on its schema
        name = schema.group(1)
        return f"no USAGE permission on schema {name} (GRANT USAGE ON SCHEMA {name} TO the role in the URL)"
    template = _PG_SQLSTATE_REASONS.get(sqlstate or "")
    if template is None:
        template = next((reason for needle, reason in _PG_MESSAGE_REASONS if needle in lowered), None)
    if template is None:
        # An unforeseen error: its first line, without libpq's severity prefix.
        template = (text.splitlines() or [type(orig).__name__])[0].split("FATAL:")[-1].split("ERROR:")[-1].strip()
        return template[:300]
    return template.format(table=table_name, timeout=timeout_s, connect_timeout=connect_timeout_s, privilege=privilege)

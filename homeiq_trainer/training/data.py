"""Ask AI history → (instruction, response) pairs, read-only and tolerant of every bad row.

One reader for both of HomeIQ's engines (SQLAlchemy Core): its SQLite file of 2025 and its PostgreSQL
database of 2026, in either table shape (`source.py`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, DateTime, LargeBinary, Text, bindparam, cast, func, or_, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError

from homeiq_trainer.database import database_url, is_postgres, masked
from homeiq_trainer.messages import DataReport
from homeiq_trainer.training.source import DataError, SourceTable, connect_source, locate_table, source_error

if TYPE_CHECKING:
    from homeiq_trainer.settings import DataSettings

__all__ = ["DataError", "Example", "SourceOptions", "count_new_examples", "example_from_row", "load_examples"]

_LOGGER = logging.getLogger(__name__)

# Pages grow so a source with few bad rows is read in one or two short statements, and one with
# many bad rows does not pay a sort per 500 rows. Each page is its own statement (and, on
# PostgreSQL, its own read-only transaction), so locks are released between pages and HomeIQ's
# writers and migrations get in.
FIRST_PAGE_ROWS = 512
MAX_PAGE_ROWS = 32768
# Counting keeps no rows, so small pages: a page is most of what a count holds (the daemon stays within
# +20 MB over 200,000 rows); each page costs a pass over the table's keys, so smaller is slower.
COUNT_PAGE_ROWS = 2048

SKIP_INVALID_JSON = "invalid_json"
SKIP_NOT_A_LIST = "not_a_list"
SKIP_EMPTY_LIST = "empty_list"
SKIP_NO_DESCRIPTION = "no_description"
SKIP_EMPTY_QUERY = "empty_query"
SKIP_DUPLICATE = "duplicate"
SKIP_EXCLUDED_SOURCE = "excluded_source"
SKIP_NOT_COMPLETE = "not_complete"
# Text that is not Unicode: bytes a SQLite row holds that do not decode as UTF-8, or a lone surrogate
# (`\ud800`) in JSON. Such text cannot be tokenized, and one such row failed the whole run.
SKIP_INVALID_TEXT = "invalid_text"
COMPLETE_STATUS = "complete"


@dataclass(frozen=True, slots=True)
class Example:
    """One training pair."""

    instruction: str
    response: str
    created_at: str | None


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """How to read the source, beyond where it is; new knobs go here, not into every signature."""

    busy_timeout_s: float = 10.0
    """SQLite: wait for HomeIQ's writers this long; PostgreSQL: limit of each statement and lock wait."""
    connect_timeout_s: float = 10.0
    """PostgreSQL: how long the server may take to answer."""
    schema: str | None = None
    """PostgreSQL schema of `ask_ai_queries`; None searches `automation`, then `public`."""
    exclude_sources: frozenset[str] = field(default_factory=lambda: frozenset({"keyword_match"}))
    """Suggestion sources never used as targets."""

    @classmethod
    def from_settings(cls, data: DataSettings) -> SourceOptions:
        """The options the `data` settings give."""
        return cls(
            data.busy_timeout_s, data.connect_timeout_s, data.source_schema or None, frozenset(data.exclude_sources)
        )


def _confidence(suggestion: dict) -> float:
    value = suggestion.get("confidence")
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        try:
            return float(value) if value == value else 0.0  # NaN counts as missing
        except OverflowError:  # an integer beyond float's range (JSON allows any length)
            return 0.0
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            return 0.0
        return parsed if parsed == parsed else 0.0
    return 0.0


def example_from_row(query: object, suggestions: object, exclude_sources: Iterable[str] = ()) -> tuple[str, str] | str:
    """The (instruction, response) pair of one row, or the reason it is skipped; `suggestions` is JSON text."""
    try:  # a BLOB (SQLite keeps what it is given) is text where it decodes as UTF-8
        query, suggestions = (
            value.decode("utf-8") if isinstance(value, bytes) else value for value in (query, suggestions)
        )
    except UnicodeDecodeError:
        return SKIP_INVALID_TEXT  # never trained on with U+FFFD in place of the bytes
    instruction = query.strip() if isinstance(query, str) else ""
    if not instruction:
        return SKIP_EMPTY_QUERY
    if suggestions is None:  # SQL NULL, as JSON's null would be
        return SKIP_NOT_A_LIST
    if not isinstance(suggestions, str):
        return SKIP_INVALID_JSON
    try:
        suggestions = json.loads(suggestions)
    except (ValueError, RecursionError):
        return SKIP_INVALID_JSON
    if not isinstance(suggestions, list):
        return SKIP_NOT_A_LIST
    candidates = [s for s in suggestions if isinstance(s, dict)]
    if not candidates:
        return SKIP_EMPTY_LIST
    excluded = frozenset(exclude_sources)
    allowed = [s for s in candidates if not _excluded(s.get("source"), excluded)] if excluded else candidates
    if not allowed:
        return SKIP_EXCLUDED_SOURCE
    # max() keeps the first of equal confidences, as HomeIQ's script did.
    best = max(allowed, key=_confidence)
    description = best.get("description")
    response = description.strip() if isinstance(description, str) else ""
    if not response:
        return SKIP_NO_DESCRIPTION
    if not (_unicode(instruction) and _unicode(response)):
        return SKIP_INVALID_TEXT
    return instruction, response


def _excluded(source: object, excluded: frozenset[str]) -> bool:
    return isinstance(source, str) and source in excluded  # a list or object as `source` is no known source


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _since_clause(src: SourceTable, since: datetime | None, postgres: bool) -> list:
    if since is None:
        return []
    since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    if postgres:
        # As timestamps with their zones; a legacy TIMESTAMP column is UTC (the session's zone).
        return [cast(src.created, DateTime(timezone=True)) > bindparam("since", since, DateTime(timezone=True))]
    # SQLite keeps text (naive UTC as SQLAlchemy writes it, maybe with a zone); julianday() reads both.
    stamp = since.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return [func.julianday(src.created) > func.julianday(stamp)]


def _pages(
    conn: Connection, src: SourceTable, since: datetime | None, wanted: int | None, max_page_rows: int | None = None
) -> Iterator[Sequence]:
    max_page_rows = max_page_rows or MAX_PAGE_ROWS
    # A row without a key (SQLite lets a TEXT PRIMARY KEY be NULL; HomeIQ always sets one) can be neither
    # fetched by key nor paged past: left out, so that a page holds a row for every key it asked for
    # and a short page means the end (with it, a short page ended the read hundreds of rows early).
    where = [*src.filters, *_since_clause(src, since, is_postgres(conn.engine.url)), src.key.is_not(None)]
    order = (src.created.desc().nulls_last(), src.key.desc())
    cursor_key: tuple[object, object] | None = None
    # Every page costs a sort of the whole table's keys, so the first asks for what is wanted plus
    # room for a typical share of bad rows: the usual run is then one statement.
    page_rows = FIRST_PAGE_ROWS if wanted is None else min(max_page_rows, max(FIRST_PAGE_ROWS, wanted * 3 // 2))
    while True:
        clause = list(where)
        if cursor_key is not None and cursor_key[0] is None:
            # Rows without a created_at sort last; page through them by key.
            clause += [src.created.is_(None), src.key < _bound(cursor_key[1])]
        elif cursor_key is not None:
            # Keyset paging: (created_at, key) strictly after the last row we saw.
            last_created, last_key = _bound(cursor_key[0]), _bound(cursor_key[1])
            clause.append(
                or_(
                    src.created < last_created,
                    (src.created == last_created) & (src.key < last_key),
                    src.created.is_(None),
                )
            )
        # The page is chosen by sorting keys only, then its rows are fetched by key: sorting whole
        # rows (suggestions and all) cost ~0.5 s per page on a 200,000-row SQLite table.
        keys = select(src.key).where(*clause).order_by(*order).limit(page_rows)
        statement = select(*src.columns).where(src.key.in_(keys)).order_by(*order)
        rows = conn.execute(statement).all()
        conn.rollback()  # end the page's transaction: nothing is held between pages
        if not rows:
            return
        yield rows
        if len(rows) < page_rows:
            return
        cursor_key = (rows[-1][3], rows[-1][0])
        page_rows = min(page_rows * 4, max_page_rows)


def _bound(value: object) -> object:
    """A key or timestamp read back from SQLite, as it may be bound to compare the column with.

    Text holding bytes that are not UTF-8 came back with lone surrogates, which sqlite3 cannot bind:
    those bytes go back as a BLOB cast to TEXT, equal to the stored text byte for byte.
    """
    if isinstance(value, str) and not _unicode(value):
        return cast(bindparam(None, value.encode("utf-8", "surrogateescape"), LargeBinary), Text)
    return value


def _stamp(value: object) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _collect(
    conn: Connection, src: SourceTable, options: SourceOptions, max_samples: int | None, since: datetime | None
) -> tuple[list[Example], Counter[str], int]:
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped: Counter[str] = Counter()
    rows_read = 0
    for page in _pages(conn, src, since, max_samples):
        for row in page:
            rows_read += 1
            if src.status is not None and row[4] != COMPLETE_STATUS:
                skipped[SKIP_NOT_COMPLETE] += 1
                continue
            parsed = example_from_row(row[1], row[2], options.exclude_sources)
            if isinstance(parsed, str):
                skipped[parsed] += 1
                continue
            if parsed in seen:
                skipped[SKIP_DUPLICATE] += 1
                continue
            seen.add(parsed)
            examples.append(Example(parsed[0], parsed[1], _stamp(row[3])))
            if max_samples is not None and len(examples) >= max_samples:
                return examples, skipped, rows_read
    return examples, skipped, rows_read


@contextmanager
def _open_table(url: URL, options: SourceOptions) -> Iterator[tuple[Connection, SourceTable]]:
    """The read-only connection and HomeIQ's table on it; every database error as one `DataError` line."""
    table_name: str | None = None
    try:
        with connect_source(url, options.busy_timeout_s, options.connect_timeout_s) as conn:
            src = locate_table(conn, url, options.schema)
            table_name = src.name
            yield conn, src
    except SQLAlchemyError as exc:
        raise source_error(exc, url, table_name, options.busy_timeout_s, options.connect_timeout_s) from None


def _read(
    url: URL, options: SourceOptions, max_samples: int | None, since: datetime | None
) -> tuple[list[Example], DataReport]:
    started = time.monotonic()
    with _open_table(url, options) as (conn, src):
        examples, skipped, rows_read = _collect(conn, src, options, max_samples, since)
    report = DataReport(
        rows_read=rows_read,
        examples=len(examples),
        skipped=dict(skipped),
        newest_created_at=_parse_timestamp(examples[0].created_at) if examples else None,
    )
    _LOGGER.info(
        "Read %d rows in %.2f s: %d usable examples, %d skipped %s",
        rows_read,
        time.monotonic() - started,
        len(examples),
        report.skipped_total,
        dict(skipped) or "",
    )
    return examples, report


def _options(busy_timeout_s: float | None, options: SourceOptions | None) -> SourceOptions:
    options = options or SourceOptions()
    if busy_timeout_s is None:
        return options
    return SourceOptions(busy_timeout_s, options.connect_timeout_s, options.schema, options.exclude_sources)


def load_examples(
    source: str | Path | URL,
    max_samples: int,
    busy_timeout_s: float | None = None,
    *,
    options: SourceOptions | None = None,
) -> tuple[list[Example], DataReport]:
    """Up to `max_samples` usable, distinct examples, newest first; fails if there are none.

    `source` is a SQLite path or a SQLAlchemy URL; `busy_timeout_s`, when given, wins over `options`'.
    """
    url = database_url(source)
    examples, report = _read(url, _options(busy_timeout_s, options), max_samples, since=None)
    if not examples:
        raise DataError(
            f"no usable examples in {masked(url)}: {report.rows_read} rows with suggestions, "
            f"skipped {report.skipped or 'none'}"
        )
    return examples, report


def _count(
    conn: Connection,
    src: SourceTable,
    options: SourceOptions,
    limit: int,
    since: datetime | None,
    deadline_s: float | None,
) -> int:
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    seen: set[int] = set()  # digests only: a count over a large history costs little memory
    for page in _pages(conn, src, since, limit, max_page_rows=COUNT_PAGE_ROWS):
        for row in page:
            if src.status is not None and row[4] != COMPLETE_STATUS:
                continue
            parsed = example_from_row(row[1], row[2], options.exclude_sources)
            if not isinstance(parsed, str):
                seen.add(hash(parsed))
                if len(seen) >= limit:
                    return len(seen)
        if deadline is not None and time.monotonic() > deadline:
            raise DataError(f"counting new examples took longer than {deadline_s:g} s; try again later")
    return len(seen)


def count_new_examples(
    source: str | Path | URL,
    since: datetime | None,
    limit: int,
    busy_timeout_s: float | None = None,
    deadline_s: float | None = None,
    *,
    options: SourceOptions | None = None,
) -> int:
    """How many usable, distinct examples were created after `since` (counting stops at `limit`).

    A naive `since` is UTC; the comparison is made in SQL between timestamps, zones included. Counts
    in small pages without building examples; raises `DataError` past `deadline_s`.
    """
    url = database_url(source)
    options = _options(busy_timeout_s, options)
    with _open_table(url, options) as (conn, src):
        return _count(conn, src, options, limit, since, deadline_s)


def _parse_timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None

"""Ask AI history → (instruction, response) pairs, read-only and tolerant of every bad row."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from homeiq_trainer.messages import DataReport

_LOGGER = logging.getLogger(__name__)

# Pages grow so a source with few bad rows is read in one or two short statements, and one with
# many bad rows does not pay a sort per 500 rows. Each page is its own statement, so the shared
# lock a rollback-journal reader holds is released between pages and HomeIQ's writers get in.
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


class DataError(Exception):
    """The source cannot give a usable dataset; the message says why."""


@dataclass(frozen=True, slots=True)
class Example:
    """One training pair."""

    instruction: str
    response: str
    created_at: str | None


def connect_read_only(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open HomeIQ's database so that we can never create, change or lock it for writing."""
    if not path.is_file():
        raise DataError(f"source database not found: {path}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise DataError(f"cannot read source database {path}: {exc}") from None
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DataError(f"cannot read source database {path}: {exc}") from None
    return conn


def _confidence(suggestion: dict) -> float:
    value = suggestion.get("confidence")
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value) if value == value else 0.0  # NaN counts as missing
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            return 0.0
        return parsed if parsed == parsed else 0.0
    return 0.0


def example_from_row(query: object, suggestions_json: object) -> tuple[str, str] | str:
    """The (instruction, response) pair of one row, or the reason it is skipped."""
    instruction = query.strip() if isinstance(query, str) else ""
    if not instruction:
        return SKIP_EMPTY_QUERY
    if isinstance(suggestions_json, bytes):
        suggestions_json = suggestions_json.decode("utf-8", "replace")
    if not isinstance(suggestions_json, str):
        return SKIP_INVALID_JSON
    try:
        suggestions = json.loads(suggestions_json)
    except (ValueError, RecursionError):
        return SKIP_INVALID_JSON
    if not isinstance(suggestions, list):
        return SKIP_NOT_A_LIST
    candidates = [s for s in suggestions if isinstance(s, dict)]
    if not candidates:
        return SKIP_EMPTY_LIST
    # max() keeps the first of equal confidences, as HomeIQ's script did.
    best = max(candidates, key=_confidence)
    description = best.get("description")
    response = description.strip() if isinstance(description, str) else ""
    if not response:
        return SKIP_NO_DESCRIPTION
    return instruction, response


def _pages(
    conn: sqlite3.Connection, since: str | None, wanted: int | None, max_page_rows: int = MAX_PAGE_ROWS
) -> Iterator[list[tuple]]:
    where = "suggestions IS NOT NULL"
    params: list[object] = []
    if since is not None:
        where += " AND created_at > ?"
        params.append(since)
    cursor_key: tuple[object, object] | None = None
    # Every page costs a scan of the whole table's keys, so the first asks for what is wanted plus
    # room for a typical share of bad rows: the usual run is then one statement.
    page_rows = FIRST_PAGE_ROWS if wanted is None else min(max_page_rows, max(FIRST_PAGE_ROWS, wanted * 3 // 2))
    while True:
        clause = where
        args = list(params)
        if cursor_key is not None and cursor_key[0] is None:
            # Rows without a created_at sort last (NULL is smallest); page through them by id.
            clause += " AND created_at IS NULL AND query_id < ?"
            args += [cursor_key[1]]
        elif cursor_key is not None:
            # Keyset paging: (created_at, query_id) strictly after the last row we saw.
            clause += " AND (created_at < ? OR (created_at = ? AND query_id < ?) OR created_at IS NULL)"
            args += [cursor_key[0], cursor_key[0], cursor_key[1]]
        # The page is chosen by sorting keys only, then its rows are fetched by primary key: sorting
        # whole rows (suggestions JSON and all) cost ~0.5 s per page on a 200,000-row table.
        sql = (
            "SELECT query_id, original_query, suggestions, created_at FROM ask_ai_queries WHERE query_id IN ("
            f"SELECT query_id FROM ask_ai_queries WHERE {clause} ORDER BY created_at DESC, query_id DESC LIMIT ?"
            ") ORDER BY created_at DESC, query_id DESC"
        )
        rows = conn.execute(sql, [*args, page_rows]).fetchall()
        if not rows:
            return
        yield rows
        if len(rows) < page_rows:
            return
        cursor_key = (rows[-1][3], rows[-1][0])
        page_rows = min(page_rows * 4, max_page_rows)


def _data_error(exc: sqlite3.DatabaseError, path: Path, busy_timeout_s: float) -> DataError:
    message = str(exc)
    if not isinstance(exc, sqlite3.OperationalError):
        return DataError(f"cannot read {path}: {message}")
    if "no such table" in message:
        return DataError(f"{path} has no ask_ai_queries table: is it HomeIQ's database?")
    if "no such column" in message:
        return DataError(f"{path}: ask_ai_queries lacks an expected column ({message})")
    if "locked" in message or "busy" in message:
        return DataError(f"source database stayed locked for more than {busy_timeout_s:g} s; try again later")
    return DataError(f"cannot read {path}: {message}")


def _read(
    path: Path, max_samples: int | None, busy_timeout_s: float, since: str | None
) -> tuple[list[Example], DataReport]:
    conn = connect_read_only(path, busy_timeout_s)
    started = time.monotonic()
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped: Counter[str] = Counter()
    rows_read = 0
    try:
        for page in _pages(conn, since, max_samples):
            for _query_id, query, suggestions, created_at in page:
                rows_read += 1
                parsed = example_from_row(query, suggestions)
                if isinstance(parsed, str):
                    skipped[parsed] += 1
                    continue
                if parsed in seen:
                    skipped[SKIP_DUPLICATE] += 1
                    continue
                seen.add(parsed)
                examples.append(Example(parsed[0], parsed[1], None if created_at is None else str(created_at)))
                if max_samples is not None and len(examples) >= max_samples:
                    break
            else:
                continue
            break
    except sqlite3.DatabaseError as exc:
        raise _data_error(exc, path, busy_timeout_s) from None
    finally:
        conn.close()
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


def load_examples(path: Path, max_samples: int, busy_timeout_s: float = 10.0) -> tuple[list[Example], DataReport]:
    """Up to `max_samples` usable, distinct examples, newest first; fails if there are none."""
    examples, report = _read(path, max_samples, busy_timeout_s, since=None)
    if not examples:
        raise DataError(
            f"no usable examples in {path}: {report.rows_read} rows with suggestions, "
            f"skipped {report.skipped or 'none'}"
        )
    return examples, report


def count_new_examples(
    path: Path, since: datetime | None, limit: int, busy_timeout_s: float = 10.0, deadline_s: float | None = None
) -> int:
    """How many usable, distinct examples were created after `since` (counting stops at `limit`).

    Counts without building examples (only a digest of each pair is kept) and in small pages, so a
    count over a large history costs little memory; raises `DataError` past `deadline_s`.
    """
    # SQLAlchemy writes "YYYY-MM-DD HH:MM:SS.ffffff"; the same shape compares correctly as text.
    stamp = None if since is None else since.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    seen: set[int] = set()
    conn = connect_read_only(path, busy_timeout_s)
    try:
        for page in _pages(conn, stamp, limit, max_page_rows=COUNT_PAGE_ROWS):
            for _query_id, query, suggestions, _created_at in page:
                parsed = example_from_row(query, suggestions)
                if not isinstance(parsed, str):
                    seen.add(hash(parsed))
                    if len(seen) >= limit:
                        return len(seen)
            if deadline is not None and time.monotonic() > deadline:
                raise DataError(f"counting new examples took longer than {deadline_s:g} s; try again later")
    except sqlite3.DatabaseError as exc:
        raise _data_error(exc, path, busy_timeout_s) from None
    finally:
        conn.close()
    return len(seen)


def _parse_timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None

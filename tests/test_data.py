"""Data rules: HomeIQ's selection, every bad-row kind, fill-to-max, duplicates, read-only access."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from homeiq_trainer.demo import ASK_AI_SCHEMA
from homeiq_trainer.training.data import (
    SKIP_DUPLICATE,
    SKIP_EMPTY_LIST,
    SKIP_EMPTY_QUERY,
    SKIP_INVALID_JSON,
    SKIP_INVALID_TEXT,
    SKIP_NO_DESCRIPTION,
    SKIP_NOT_A_LIST,
    DataError,
    count_new_examples,
    example_from_row,
    load_examples,
)


def make_db(path: Path, rows: list[tuple[str, object]], wal: bool = False) -> Path:
    """rows: (original_query, suggestions) newest first."""
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(ASK_AI_SCHEMA)
    n = len(rows)
    for i, (query, suggestions) in enumerate(rows):
        created = datetime(2025, 11, 1, 12, 0, 0).replace(minute=0, second=0).timestamp() + (n - i) * 60
        conn.execute(
            "INSERT INTO ask_ai_queries (query_id, original_query, suggestions, created_at) VALUES (?, ?, ?, ?)",
            (
                f"query-{i:06d}",
                query,
                suggestions,
                datetime.fromtimestamp(created).isoformat(sep=" ", timespec="microseconds"),
            ),
        )
    conn.commit()
    conn.close()
    return path


def change(db: Path, statement: str, *params: object) -> None:
    """Run one statement on a test database and commit it."""
    conn = sqlite3.connect(db)
    conn.execute(statement, params)
    conn.commit()
    conn.close()


def good(description: str, confidence: object = 0.9) -> str:
    return json.dumps([{"description": description, "confidence": confidence}])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("query", "suggestions", "expected"),
    [
        (
            "Turn on the porch light",
            good("  Porch light at sunset  "),
            ("Turn on the porch light", "Porch light at sunset"),
        ),
        ("q", "{not json", SKIP_INVALID_JSON),
        ("q", "null", SKIP_NOT_A_LIST),
        ("q", '{"description": "x"}', SKIP_NOT_A_LIST),
        ("q", "[]", SKIP_EMPTY_LIST),
        ("q", '[1, 2, "x"]', SKIP_EMPTY_LIST),
        ("q", json.dumps([{"description": "   "}]), SKIP_NO_DESCRIPTION),
        ("q", json.dumps([{"description": 42}]), SKIP_NO_DESCRIPTION),
        ("   ", good("fine"), SKIP_EMPTY_QUERY),
        ("q", b"\xff\xfe", SKIP_INVALID_TEXT),
        # BLOBs: text where they decode as UTF-8; before, a BLOB query was "empty" and Latin-1 bytes
        # in the suggestions were trained on as U+FFFD.
        (b"Porch light on", good("Porch light on at sunset").encode(), ("Porch light on", "Porch light on at sunset")),
        (
            "q",
            json.dumps([{"description": "Licht aus in der Küche"}], ensure_ascii=False).encode("latin-1"),
            SKIP_INVALID_TEXT,
        ),
        ("Küche".encode("latin-1"), good("fine"), SKIP_INVALID_TEXT),
        ("q", "[" * 100_000, SKIP_INVALID_JSON),
    ],
)
def test_example_from_row(query: str, suggestions: object, expected: object) -> None:
    assert example_from_row(query, suggestions) == expected


def test_highest_confidence_wins_missing_and_string_confidences() -> None:
    suggestions = json.dumps(
        [
            {"description": "no confidence"},
            {"description": "string confidence", "confidence": "0.95"},
            {"description": "low", "confidence": 0.5},
            {"description": "garbage confidence", "confidence": "high"},
        ]
    )
    assert example_from_row("q", suggestions) == ("q", "string confidence")
    # Ties keep the first, as HomeIQ's max() did; missing counts as 0.
    tie = json.dumps([{"description": "first"}, {"description": "second", "confidence": None}])
    assert example_from_row("q", tie) == ("q", "first")


def test_odd_but_valid_json_skips_or_keeps_the_row_and_never_raises() -> None:
    listed_source = json.dumps([{"description": "Lamp on", "source": ["llm"], "confidence": 0.9}])
    assert example_from_row("q", listed_source, {"keyword_match"}) == ("q", "Lamp on")
    # JSON integers have any length; beyond float's range the confidence counts as missing.
    huge = '[{"description": "huge", "confidence": 1' + "0" * 400 + '}, {"description": "fine", "confidence": 0.5}]'
    assert example_from_row("q", huge) == ("q", "fine")
    assert example_from_row("q", '[{"description": "Lamp on \\ud800"}]') == SKIP_INVALID_TEXT
    assert example_from_row("Lamp \ud800", good("on")) == SKIP_INVALID_TEXT


def test_a_row_that_is_not_utf8_is_skipped_not_fatal(tmp_path: Path) -> None:
    db = make_db(tmp_path / "u.db", [(f"q{i}", good(f"a{i}")) for i in range(3)])
    latin1 = "Licht aus in der Küche".encode("latin-1")
    change(db, "UPDATE ask_ai_queries SET original_query = CAST(? AS TEXT) WHERE query_id = 'query-000001'", latin1)
    examples, report = load_examples(db, max_samples=10)
    assert [e.instruction for e in examples] == ["q0", "q2"]
    assert report.skipped == {SKIP_INVALID_TEXT: 1}


def test_non_ascii_and_long_text_survive() -> None:
    long_text = "Schalte das Licht im Flur ein 💡 " * 200
    assert example_from_row("Licht an bei Sonnenuntergang 🌅", good(long_text)) == (
        "Licht an bei Sonnenuntergang 🌅",
        long_text.strip(),
    )


def test_fills_to_max_valid_examples_past_bad_rows(tmp_path: Path) -> None:
    # HomeIQ limited before filtering: 10 newest rows bad, so LIMIT 10 gave nothing.
    rows: list[tuple[str, object]] = [("bad", "{oops")] * 10 + [(f"query {i}", good(f"answer {i}")) for i in range(20)]
    db = make_db(tmp_path / "a.db", rows)
    examples, report = load_examples(db, max_samples=10)
    assert len(examples) == 10
    assert [e.instruction for e in examples] == [f"query {i}" for i in range(10)]  # newest first
    assert report.skipped == {SKIP_INVALID_JSON: 10}
    assert report.rows_read == 20


def test_counts_every_skip_reason_and_drops_exact_duplicates(tmp_path: Path) -> None:
    rows: list[tuple[str, object]] = [
        ("same", good("answer")),
        ("same", good("answer")),  # exact duplicate pair
        ("same", good("other answer")),  # same query, new answer: kept
        ("x", "not json"),
        ("x", "null"),
        ("x", "[]"),
        ("x", json.dumps([{"description": ""}])),
        ("", good("y")),
        ("x", None),  # suggestions IS NULL: never read, as in HomeIQ
    ]
    db = make_db(tmp_path / "b.db", rows)
    examples, report = load_examples(db, max_samples=100)
    assert [(e.instruction, e.response) for e in examples] == [("same", "answer"), ("same", "other answer")]
    assert report.rows_read == 8
    assert report.skipped == {
        SKIP_DUPLICATE: 1,
        SKIP_INVALID_JSON: 1,
        SKIP_NOT_A_LIST: 1,
        SKIP_EMPTY_LIST: 1,
        SKIP_NO_DESCRIPTION: 1,
        SKIP_EMPTY_QUERY: 1,
    }


def test_paging_reads_past_many_bad_rows(tmp_path: Path) -> None:
    rows: list[tuple[str, object]] = [("bad", "[]")] * 3000 + [(f"q{i}", good(f"a{i}")) for i in range(5)]
    db = make_db(tmp_path / "c.db", rows)
    examples, report = load_examples(db, max_samples=5)
    assert len(examples) == 5
    assert report.rows_read == 3005


def test_a_row_without_a_key_does_not_end_the_read_early(tmp_path: Path) -> None:
    """SQLite lets a TEXT PRIMARY KEY be NULL; fetched by key, that row made its page short."""
    db = make_db(tmp_path / "k.db", [(f"q{i}", good(f"a{i}")) for i in range(3000)])
    change(db, "UPDATE ask_ai_queries SET query_id = NULL WHERE query_id = 'query-000010'")
    examples, report = load_examples(db, max_samples=2500)
    assert len(examples) == 2500 and "q10" not in {e.instruction for e in examples}
    assert count_new_examples(db, None, 2999) == 2999


def test_keys_and_timestamps_that_are_not_utf8_page_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from homeiq_trainer.training import data

    monkeypatch.setattr(data, "MAX_PAGE_ROWS", 90)  # page boundaries fall on those rows
    db = make_db(tmp_path / "b.db", [(f"q{i}", good(f"a{i}")) for i in range(700)])
    change(db, "UPDATE ask_ai_queries SET query_id = CAST(CAST(query_id AS BLOB) || x'ff' AS TEXT)")
    change(db, "UPDATE ask_ai_queries SET created_at = CAST(CAST(created_at AS BLOB) || x'ff' AS TEXT) WHERE rowid % 2")
    examples, report = load_examples(db, max_samples=10_000)
    assert sorted(e.instruction for e in examples) == sorted(f"q{i}" for i in range(700))
    assert report.rows_read == 700 and count_new_examples(db, None, 10_000) == 700


def test_missing_file_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ai_automation.db"
    with pytest.raises(DataError, match="source database not found"):
        load_examples(missing, 10)
    assert not missing.exists()
    assert not missing.parent.exists()


def test_missing_table_and_not_a_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.commit()
    with pytest.raises(DataError, match="no ask_ai_queries table"):
        load_examples(empty, 10)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="cannot read"):
        load_examples(junk, 10)


def test_zero_usable_examples_fails_with_counts(tmp_path: Path) -> None:
    db = make_db(tmp_path / "d.db", [("x", "[]"), ("y", "{")])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(db, 10)


def test_source_bytes_unchanged(source_db: Path) -> None:
    before = sha(source_db)
    siblings = set(source_db.parent.iterdir())
    load_examples(source_db, 50)
    count_new_examples(source_db, None, limit=5)
    assert sha(source_db) == before
    assert set(source_db.parent.iterdir()) == siblings  # no journal, WAL or shm left behind


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_concurrent_writer_is_not_blocked(tmp_path: Path, wal: bool) -> None:
    rows: list[tuple[str, object]] = [(f"q{i}", good(f"a{i}") if i % 3 else "[]") for i in range(20_000)]
    db = make_db(tmp_path / "busy.db", rows, wal=wal)
    stop_file = tmp_path / "stop"
    writer = textwrap.dedent(
        f"""
        import os, sqlite3, sys
        # HomeIQ's writers wait SQLite's default 5 s for a lock (Python's sqlite3 and SQLAlchemy's
        # drivers); each of our statements holds the shared lock for one sort of the table, far less.
        conn = sqlite3.connect({str(db)!r}, timeout=5.0)
        errors = writes = 0
        print("ready", flush=True)
        while not os.path.exists({str(stop_file)!r}):
            try:
                conn.execute("INSERT INTO ask_ai_queries (query_id, original_query, suggestions, created_at) "
                             "VALUES (?, 'new', '[]', '2030-01-01 00:00:00')", (f"w{{writes}}",))
                conn.commit()
                writes += 1
            except sqlite3.OperationalError as exc:
                errors += 1
                conn.rollback()
                print(exc, file=sys.stderr)
        print(writes, errors)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for _ in range(3):  # each load reads ~15,000 rows while the writer commits as fast as it can
        examples, _ = load_examples(db, max_samples=10_000)
        assert len(examples) == 10_000
    stop_file.touch()
    out, _ = proc.communicate(timeout=60)
    writes, errors = map(int, out.split())
    assert writes > 0
    assert errors == 0, f"the writer saw {errors} 'database is locked' errors"


def test_a_read_gets_in_through_short_gaps_in_a_writers_lock(tmp_path: Path) -> None:
    # A writer that commits back to back on a slow disk leaves the database unlocked for moments only;
    # SQLite's own busy handler sleeps up to 100 ms between tries and missed such gaps for seconds.
    db = make_db(tmp_path / "gaps.db", [(f"q{i}", good(f"a{i}")) for i in range(50)])
    stop = threading.Event()
    cycles = 0

    def hold() -> None:
        nonlocal cycles
        holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        while not stop.is_set():
            holder.execute("BEGIN EXCLUSIVE")
            time.sleep(0.04)
            holder.execute("COMMIT")
            cycles += 1
            time.sleep(0.003)
        holder.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        for _ in range(5):
            examples, _ = load_examples(db, max_samples=100, busy_timeout_s=1.0)
            assert len(examples) == 50
    finally:
        stop.set()
        thread.join()
    assert cycles > 0  # the lock really came and went


def test_count_new_examples_since(tmp_path: Path) -> None:
    rows: list[tuple[str, object]] = [(f"q{i}", good(f"a{i}")) for i in range(10)]
    db = make_db(tmp_path / "e.db", rows)
    examples, report = load_examples(db, 10)
    assert report.newest_created_at is not None
    assert count_new_examples(db, report.newest_created_at, limit=100) == 0
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO ask_ai_queries (query_id, original_query, suggestions, created_at) VALUES "
        "('n1', 'new one', ?, '2031-01-01 00:00:00.000001'), ('n2', 'bad', '[]', '2031-01-01 00:00:00.000002')",
        (good("fresh"),),
    )
    conn.commit()
    conn.close()
    assert count_new_examples(db, report.newest_created_at, limit=100) == 1
    assert count_new_examples(db, None, limit=3) == 3


def test_rows_without_created_at_are_read_last_across_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from homeiq_trainer.training import data

    monkeypatch.setattr(data, "MAX_PAGE_ROWS", 90)  # many pages, boundaries among dated and undated rows
    db = make_db(tmp_path / "n.db", [(f"q{i}", good(f"a{i}")) for i in range(700)])
    change(db, "UPDATE ask_ai_queries SET created_at = NULL WHERE CAST(substr(query_id, 7) AS INTEGER) >= 400")
    examples, report = load_examples(db, max_samples=10_000)
    assert len(examples) == 700 and report.rows_read == 700  # none lost on a page boundary
    assert [e.instruction for e in examples[:400]] == [f"q{i}" for i in range(400)]  # dated rows first, newest first

"""Data at scale on PostgreSQL: 2,000 examples from 200,000 rows of HomeIQ's current table, 10% bad.

Run alone as `python -m tests.benchmarks.postgres_data`, or as part of `tests.benchmarks.run` (data).
The table lives in a throwaway database on the tests' server, dropped afterwards.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from homeiq_trainer.demo import make_query
from homeiq_trainer.training.data import load_examples
from tests import postgres

PG_ROWS = 200_000
PG_SAMPLES = 2000
PG_BAD_FRACTION = 0.1
PG_REPEATS = 5
PG_LIMIT_S = 1.0
# The kinds of unusable rows a current HomeIQ database holds (JSONB cannot hold invalid JSON).
_BAD_SUGGESTIONS: list[object] = [None, [], {"a": 1}, [{"description": "  "}], "text"]


def _rows(rng: random.Random) -> list[tuple[str, str, str, str | None, datetime]]:
    start = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    rows = []
    for i in range(PG_ROWS):
        query, best = make_query(rng)
        created = start + timedelta(minutes=7 * i, microseconds=rng.randint(0, 999_999))
        best = dict(best, source="openai")
        status = "complete"
        roll = rng.random()
        if roll < PG_BAD_FRACTION * 0.7:
            suggestions: object = rng.choice(_BAD_SUGGESTIONS)
        elif roll < PG_BAD_FRACTION * 0.85:
            suggestions = [dict(best, source="keyword_match", description="Turn lights on or off")]
        elif roll < PG_BAD_FRACTION:
            suggestions, status = [best], rng.choice(["pending", "failed"])
        else:
            other = dict(best, description=f"Maybe: {best['description']}", confidence=str(best["confidence"] / 2))
            suggestions = [other, best]
        rows.append((str(uuid.UUID(int=rng.getrandbits(128))), query, status, json.dumps(suggestions), created))
    return rows


def fill(dbname: str, seed: int = 3) -> None:
    """HomeIQ's current table with PG_ROWS rows, PG_BAD_FRACTION of them unusable, loaded with COPY."""
    postgres.reset_schema(dbname, postgres.CURRENT_DDL)
    rows = _rows(random.Random(seed))
    with postgres.connect(dbname) as conn, conn.cursor() as cur:
        copy_sql = "COPY automation.ask_ai_queries (id, user_query, status, suggestions, created_at) FROM STDIN"
        with cur.copy(copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute("ANALYZE automation.ask_ai_queries")


def bench_postgres_data(row: Callable[[str, str, str, str, bool], None], log: Callable[[str], None] = print) -> None:
    """Time load_examples on PostgreSQL and report it through `row` (the benchmark table's)."""
    with postgres.throwaway_database() as dbname:
        log(f"{PG_ROWS:,}-row automation.ask_ai_queries on PostgreSQL, {PG_BAD_FRACTION:.0%} bad rows")
        fill(dbname)
        url = postgres.sqlalchemy_url(dbname)
        times = []
        for _ in range(PG_REPEATS):
            started = time.perf_counter()
            examples, report = load_examples(url, PG_SAMPLES)
            times.append(time.perf_counter() - started)
        took = statistics.median(times)
        row(
            f"7b. {PG_SAMPLES:,} examples from {PG_ROWS:,} PostgreSQL rows, {PG_BAD_FRACTION:.0%} bad",
            f"{took:.2f} s median of {PG_REPEATS} ({min(times):.2f}-{max(times):.2f} s; {len(examples)} examples, "
            f"{report.rows_read:,} rows read)",
            f"< {PG_LIMIT_S:g} s",
            "-",
            took < PG_LIMIT_S and len(examples) == PG_SAMPLES,
        )


def _print_row(target: str, figure: str, goal: str, _reference: str, passed: bool) -> None:
    print(f"{target}: {figure} (goal {goal}) {'pass' if passed else 'FAIL'}")


if __name__ == "__main__":
    bench_postgres_data(_print_row)

"""A stand-in for HomeIQ writing Ask AI queries: inserts rows until told to stop, counts lock errors.

Run as `python -m tests.reliability.homeiq_writer DB STOP_FILE STATS_FILE`; it uses Python's default
5 s busy wait, as HomeIQ's own SQLite writers do.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path

from homeiq_trainer.demo import make_query


def main(db: str, stop_file: str, stats_file: str) -> None:
    rng = random.Random(3)
    conn = sqlite3.connect(db, isolation_level=None)
    commits = locked = other = 0
    worst_s = 0.0
    n = 0
    while not Path(stop_file).exists():
        rows = []
        for _ in range(rng.randint(1, 5)):
            query, best = make_query(rng)
            rows.append((f"w-{n:08d}", query, json.dumps([best]), datetime.now().isoformat(sep=" ")))
            n += 1
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO ask_ai_queries (query_id, original_query, suggestions, created_at) VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
            commits += 1
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                locked += 1
            else:
                other += 1
        worst_s = max(worst_s, time.monotonic() - started)
        time.sleep(0.002)
    Path(stats_file).write_text(json.dumps({"commits": commits, "locked": locked, "other": other, "worst_s": worst_s}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""A stand-in for HomeIQ's ai-query-service writing Ask AI rows to PostgreSQL, timing its own inserts.

Run as `python -m tests.homeiq_pg_writer DBNAME STOP_FILE STATS_FILE`: one insert per commit, as
HomeIQ's service does per query, until STOP_FILE exists; then STATS_FILE gets counts and latencies.
Every insert gives up after LOCK_TIMEOUT of waiting for a lock, and that counts as an error: whether a
reader made the writer wait is then PostgreSQL's own answer, not a guess from latencies that a slow
disk flush or a busy CPU can stretch as well.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from tests.postgres import connect, suggestion

LOCK_TIMEOUT = "50ms"


def main(dbname: str, stop_file: str, stats_file: str) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    with connect(dbname) as conn:
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        print("ready", flush=True)
        while not Path(stop_file).exists():
            started = time.perf_counter()
            try:
                conn.execute(
                    "INSERT INTO automation.ask_ai_queries (id, user_query, status, suggestions) "
                    "VALUES (%s, 'Turn on the hall light', 'complete', %s)",
                    (str(uuid.uuid4()), Jsonb([suggestion("Hall light on")])),
                )
            except psycopg.Error as exc:
                errors.append(str(exc).splitlines()[0])
            latencies.append(time.perf_counter() - started)
            time.sleep(0.002)
    latencies.sort()
    Path(stats_file).write_text(
        json.dumps(
            {
                "inserts": len(latencies),
                "errors": errors,
                "max_s": latencies[-1] if latencies else None,
                "p99_s": latencies[int(len(latencies) * 0.99)] if latencies else None,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])

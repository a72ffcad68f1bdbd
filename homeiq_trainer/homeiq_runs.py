"""HomeIQ's own `automation.training_runs`: each finished run, where HomeIQ's admin page lists runs.

The only write homeiq-trainer ever makes to HomeIQ's database, and only when `storage.homeiq_runs` is
on: one INSERT per finished run, on its own connection. A failure is logged and never fails the run,
and a server that stops answering cannot hold up the run's end: the insert waits at most
`RECORD_WAIT_S` (`BoundedWait`: left to finish or fail on its own thread), and never repeats.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import JSON, Column, DateTime, Float, Integer, MetaData, String, Table, Text, create_engine, insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from homeiq_trainer.database import BoundedWait, NoAnswer, masked, postgres_connect_args, postgres_reason, scrub, where

_LOGGER = logging.getLogger(__name__)

HOMEIQ_SCHEMA = "automation"
WRITE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# statement_timeout and lock_timeout bound the server's work, connect_timeout the connecting; nothing in
# libpq bounds a wait for an answer on a connection made (a hung disk at COMMIT, a stopped backend).
RECORD_WAIT_S = CONNECT_TIMEOUT_S + WRITE_TIMEOUT_S + 5.0
# ... and a path that drops packets is given up by the kernel after this, not after ~15 minutes
# (keepalives come with every PostgreSQL connection: `postgres_connect_args`).
TCP_USER_TIMEOUT_MS = 30_000

# HomeIQ's columns as its ai-training-service reads them; HomeIQ owns the table, we never create it.
training_runs = Table(
    "training_runs",
    MetaData(schema=HOMEIQ_SCHEMA),
    Column("id", Integer, primary_key=True),
    Column("training_type", String(20)),
    Column("status", String(20)),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("dataset_size", Integer),
    Column("base_model", String),
    Column("output_dir", String),
    Column("run_identifier", String),
    Column("final_loss", Float),
    Column("error_message", Text),
    Column("metadata_path", String),
    Column("triggered_by", String),
    Column("iteration_history_json", JSON),
    implicit_returning=False,  # RETURNING id would need SELECT; the role has INSERT only
)
TABLE_NAME = f"{HOMEIQ_SCHEMA}.training_runs"
# The statuses HomeIQ's admin page knows; ours beyond them (`cancelled`) are recorded as `failed`, with the reason.
HOMEIQ_STATUSES = frozenset({"queued", "running", "completed", "failed"})


def _naive_utc(value: datetime | None) -> datetime | None:
    # HomeIQ's columns are TIMESTAMP without zone, holding UTC.
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


class HomeIQRuns:
    """Records finished runs in HomeIQ's `automation.training_runs`."""

    def __init__(self, url: URL) -> None:
        self.url = url
        connect_args = {
            **postgres_connect_args(WRITE_TIMEOUT_S, CONNECT_TIMEOUT_S, False),
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        }
        self._engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
        self._wait = BoundedWait("homeiq-runs-record")

    def record(self, run: object) -> bool:
        """Insert one finished run (a `TrainingRun`); False, logged once, when HomeIQ's table refuses it."""
        values = {
            column.name: getattr(run, column.name, None) for column in training_runs.columns if column.name != "id"
        }
        values["started_at"] = _naive_utc(values["started_at"])
        values["finished_at"] = _naive_utc(values["finished_at"])
        if values["status"] not in HOMEIQ_STATUSES:
            values["error_message"] = values["error_message"] or f"{values['status']} on request"
            values["status"] = "failed"
        try:
            return self._wait.call(lambda: self._insert(values), RECORD_WAIT_S)
        except NoAnswer as exc:
            reason = str(exc)
        except Exception as exc:  # what no database error is: the run's end goes on regardless
            reason = f"{type(exc).__name__}: {scrub(str(exc), self.url)}"
        _LOGGER.warning(
            "Run %s not recorded in HomeIQ's %s (%s): %s", values["run_identifier"], TABLE_NAME, where(self.url), reason
        )
        return False

    def _insert(self, values: dict[str, object]) -> bool:
        try:
            with self._engine.connect() as conn:
                # READ WRITE explicitly: the role may default to read-only transactions, like the source's.
                conn.execution_options(postgresql_readonly=False)
                conn.execute(insert(training_runs).values(**values))
                conn.commit()
        except SQLAlchemyError as exc:
            orig = exc.orig if isinstance(exc, DBAPIError) else exc
            reason = postgres_reason(orig, TABLE_NAME, WRITE_TIMEOUT_S, CONNECT_TIMEOUT_S, privilege="INSERT")
            _LOGGER.warning(
                "Run %s not recorded in HomeIQ's %s (%s): %s",
                values["run_identifier"],
                TABLE_NAME,
                where(self.url),
                scrub(reason, self.url),
            )
            return False
        _LOGGER.info("Run %s recorded in HomeIQ's %s at %s", values["run_identifier"], TABLE_NAME, masked(self.url))
        return True

    def close(self) -> None:
        """Release the engine."""
        self._engine.dispose()

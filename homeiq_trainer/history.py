"""Run history: HomeIQ's `training_runs` table, kept by SQLModel in our own database (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Table,
    Text,
    TypeDecorator,
    and_,
    delete,
    event,
    func,
    inspect,
    or_,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Dialect, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from homeiq_trainer.database import (
    database_url,
    masked,
    postgres_connect_args,
    postgres_reason,
    scrub,
    sqlite_path,
    sqlite_when_unlocked,
)
from homeiq_trainer.homeiq_runs import HomeIQRuns
from homeiq_trainer.messages import Decision, RunRecord, RunStatus, first_line, json_safe, known, utcnow

_LOGGER = logging.getLogger(__name__)

ERROR_TAIL_CHARS = 5000
HISTORY_TIMEOUT_S = 10.0
INTERRUPTED_MESSAGE = "interrupted: the process running it stopped before the run finished"
# How many unreadable rows a read of the newest rows reads past.
UNREADABLE_ROWS_SKIPPED = 20
# More candidates awaiting approval than anyone reviews; the newest are listed.
AWAITING_MAX = 1000


def _storable(text: str) -> str:
    """Text as PostgreSQL can store it: a NUL (which a crashed process's stderr may hold) as U+FFFD."""
    return text.replace("\x00", "\ufffd")


def lenient_json(text: str) -> Any:
    """A JSON column's stored text as a value, or None where it is not JSON.

    The history is our own database, yet a row edited by hand, damaged, or written by a newer version
    must not stop the daemon from starting (every start reads the newest rows and the stored settings).
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's limit
        _LOGGER.warning("Ignoring a value in the history database that is not JSON")
        return None


class JsonOf(TypeDecorator[Any]):
    """A JSON column that reads as None unless its value has the expected shape (an object, a list)."""

    impl = JSON
    cache_ok = True

    def __init__(self, shape: type) -> None:
        super().__init__()
        self.shape = shape

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value if isinstance(value, self.shape) else None


class _LenientSqliteDateTime(sqlite.DATETIME):
    """SQLite's text timestamps, a value that is no time read as None (and logged) instead of failing the statement."""

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        parse = super().result_processor(dialect, coltype)
        if parse is None:
            return None

        def lenient(value: Any) -> Any:
            try:
                return parse(value)
            except (ValueError, TypeError):
                _LOGGER.warning("Ignoring a time in the history database that is no time: %.40r", value)
                return None

        return lenient


class Timestamp(TypeDecorator[datetime]):
    """A timestamp column, stored with its zone and read back in UTC. On SQLite a value edited by hand or
    damaged reads as None: every start reads the open runs and the served adapters, and one such value
    failed each of those reads, and with them the daemon's start."""

    impl = DateTime(timezone=True)  # as SQLModel's `datetime` mapping made it: TIMESTAMPTZ on PostgreSQL
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_LenientSqliteDateTime(timezone=True))
        return super().load_dialect_impl(dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _utc(value)


def _utc(value: datetime) -> datetime:
    # SQLite keeps naive timestamps; ours are always UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class TrainingRun(SQLModel, table=True):
    """One training run; HomeIQ's columns and meanings, plus ours at the end."""

    __tablename__ = "training_runs"
    __table_args__ = (
        Index("idx_training_runs_status", "status"),
        Index("idx_training_runs_started_at", "started_at"),
        Index("idx_training_runs_run_identifier", "run_identifier", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    training_type: str = Field(default="soft_prompt", max_length=20)
    status: str = Field(default=RunStatus.QUEUED.value, max_length=20)
    started_at: datetime = Field(sa_type=Timestamp)
    finished_at: datetime | None = Field(default=None, sa_type=Timestamp)
    dataset_size: int | None = None
    base_model: str | None = None
    output_dir: str | None = None
    run_identifier: str
    final_loss: float | None = None
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    metadata_path: str | None = None
    triggered_by: str = "admin"
    iteration_history_json: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JsonOf(list)))
    # Ours:
    eval_loss: float | None = None
    request_id: str | None = None
    parameters_json: dict[str, Any] | None = Field(default=None, sa_column=Column(JsonOf(dict)))
    data_report_json: dict[str, Any] | None = Field(default=None, sa_column=Column(JsonOf(dict)))
    promoted: bool | None = None
    decision: str | None = Field(default=None, max_length=32)
    decision_reason: str | None = Field(default=None, sa_column=Column(Text))
    evaluation_json: dict[str, Any] | None = Field(default=None, sa_column=Column(JsonOf(dict)))
    peak_rss_mb: float | None = None
    served_id_at_finish: int | None = None
    """The newest `served_adapters` id when the run ended (0: none yet), so that whether a candidate is
    newer than the adapter in use is told by the order of records, not by a clock that can go back."""


class ServedAdapter(SQLModel, table=True):
    """One time an adapter became the served one; the newest row not withdrawn is served now."""

    __tablename__ = "served_adapters"

    id: int | None = Field(default=None, primary_key=True)
    run_identifier: str = Field(index=True)
    served_at: datetime = Field(sa_type=Timestamp)
    action: str = Field(max_length=20)
    """`promote`, or `adopt` for a `latest` found without a record; a rollback withdraws instead."""
    triggered_by: str = "training"
    withdrawn_at: datetime | None = Field(default=None, sa_type=Timestamp)
    withdrawn_by: str | None = None


def run_record(run: TrainingRun) -> RunRecord:
    """The row as published and printed (timestamps with a zone)."""
    return RunRecord(
        id=run.id,
        run_id=run.run_identifier,
        status=known(RunStatus, run.status),
        triggered_by=run.triggered_by,
        started_at=run.started_at,
        finished_at=run.finished_at,
        dataset_size=run.dataset_size,
        base_model=run.base_model,
        output_dir=run.output_dir,
        final_loss=run.final_loss,
        eval_loss=run.eval_loss,
        error=run.error_message,
        promoted=run.promoted,
        decision=known(Decision, run.decision),
        decision_reason=run.decision_reason,
        evaluation={k: v for k, v in (run.evaluation_json or {}).items() if k != "samples"} or None,
        samples=(run.evaluation_json or {}).get("samples") or [],
        backend=(run.parameters_json or {}).get("backend", "local"),
        cluster=(run.parameters_json or {}).get("cluster"),
    )


def run_to_dict(run: TrainingRun) -> dict[str, Any]:
    """`run_record` as JSON-ready values."""
    return run_record(run).model_dump(mode="json")


# What a database says when another process created the same table, index or column first.
_CREATED_MEANWHILE = ("already exists", "duplicate column", "duplicate key")
_SCHEMA_ATTEMPTS = 5
_SQLITE_BUSY_TIMEOUT_MS = 10_000


def create_safely(create: Callable[[], None]) -> None:
    """Run `create`, a check-then-create of tables or columns, again where another process made them first.

    The daemon, `homeiq-trainer train` and a reader opening a new (or older) history at the same
    moment can all find a table or column missing, and every CREATE or ALTER but the first then
    fails. Checking again finds what the other process made. Any other error rises at once.
    """
    for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
        try:
            create()
            return
        except DBAPIError as exc:
            if attempt == _SCHEMA_ATTEMPTS or not any(s in str(exc.orig).lower() for s in _CREATED_MEANWHILE):
                raise
            _LOGGER.debug("The history schema was being created by another process; checking again")


def create_tables(engine: Engine, tables: Sequence[Table] | None = None) -> None:
    """`tables` (default: all of ours) and each of their indexes, every one made where it is missing.

    `create_all` makes a table's indexes only together with the table, so where another process
    made the table first (see `create_safely`), or an older release made it without a newer index,
    they are made here. An index name that another table holds already is an error, never skipped.
    """
    SQLModel.metadata.create_all(engine, tables=tables)
    for table in SQLModel.metadata.sorted_tables if tables is None else tables:
        for index in table.indexes:
            index.create(engine, checkfirst=True)


def _create_schema(engine: Engine) -> None:
    """Our tables and their indexes, and any columns newer releases added to an existing `training_runs`."""
    create_tables(engine)
    _add_missing_columns(engine)


def _add_missing_columns(engine: Engine) -> None:
    """Add columns newer releases introduced to an existing table (create_all only creates tables)."""
    table = TrainingRun.__table__  # type: ignore[attr-defined]
    present = {column["name"] for column in inspect(engine).get_columns(table.name)}
    with engine.begin() as connection:
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    # WAL lets HomeIQ's admin page read the history while a run writes it. Switching to it needs the
    # file to itself, and where waiting could deadlock (another process opening a new history at the
    # same moment) SQLite answers "database is locked" at once instead: so ask again for a while.
    sqlite_when_unlocked(lambda: cursor.execute("PRAGMA journal_mode=WAL"), _SQLITE_BUSY_TIMEOUT_MS / 1000, 0.05)
    cursor.close()


class _ServedAdapters:
    """The served-adapter half of the history: which run is served, and which wait for approval."""

    _engine: Engine
    _lock: threading.Lock

    def served_stack(self) -> list[ServedAdapter]:
        """Adapters served and not withdrawn, the one served now first."""
        with Session(self._engine, expire_on_commit=False) as session:
            query = (
                select(ServedAdapter)
                .where(ServedAdapter.withdrawn_at.is_(None))  # type: ignore[union-attr]
                .order_by(ServedAdapter.id.desc())  # type: ignore[union-attr]
            )
            rows = list(session.exec(query).all())
        for row in rows:
            # A time that could not be read (see `Timestamp`) counts as now, so no candidate passed over before
            # is offered again; which adapter is served holds.
            row.served_at = row.served_at or utcnow()
        return rows

    def serve(self, run_identifier: str, action: str, triggered_by: str) -> ServedAdapter:
        """Record that `run_identifier` is served from now on (and mark its run promoted)."""
        row = ServedAdapter(run_identifier=run_identifier, served_at=utcnow(), action=action, triggered_by=triggered_by)
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            session.add(row)
            run = session.exec(select(TrainingRun).where(TrainingRun.run_identifier == run_identifier)).first()
            if run is not None and action == "promote":
                run.promoted = True
                run.decision = Decision.PROMOTED.value
                run.decision_reason = f"promoted on request by {triggered_by}"
                session.add(run)
            session.commit()  # and nothing read again after it: the id is set at the flush
        return row

    def withdraw(self, served_id: int, triggered_by: str) -> None:
        """The served adapter is no longer served (a rollback, or its directory is gone)."""
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            row = session.get(ServedAdapter, served_id)
            if row is not None:
                row.withdrawn_at, row.withdrawn_by = utcnow(), triggered_by
                session.add(row)
                session.commit()

    def awaiting(self) -> list[TrainingRun]:
        """Completed runs awaiting approval that ended after the current served adapter was put in use.

        Told by record ids (a Raspberry Pi's clock before NTP is behind: a candidate ended then was never
        offered, nor kept from retention); by the clock only for runs ended under a release before this one.
        """
        stack = self.served_stack()
        query = select(TrainingRun).where(
            TrainingRun.status == RunStatus.COMPLETED.value,
            TrainingRun.decision == Decision.AWAITING_APPROVAL.value,
        )
        if stack:
            seen, newest = col(TrainingRun.served_id_at_finish), stack[0]
            query = query.where(
                or_(seen >= newest.id, and_(seen.is_(None), col(TrainingRun.finished_at) > newest.served_at))
            )
        return self._readable(query.order_by(TrainingRun.id.desc()), AWAITING_MAX)  # type: ignore[union-attr]

    def _readable(self, query: Any, limit: int) -> list[TrainingRun]:
        """Up to `limit` rows of `query` that can be read and published, in its order.

        A value edited by hand or damaged (a loss that is no number; a time reads as None, see `Timestamp`)
        fails the whole statement, and every start reads the newest rows: then the rows are read one by one and
        those that fail are left out, each named in the log.
        """
        with Session(self._engine, expire_on_commit=False) as session:
            try:
                rows = list(session.exec(query.limit(limit)).all())
                for row in rows:
                    run_record(row)
                return rows
            except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
                pass
        rows = []
        with Session(self._engine, expire_on_commit=False) as session:
            ids = session.exec(query.with_only_columns(TrainingRun.id).limit(limit + UNREADABLE_ROWS_SKIPPED)).all()
        for row_id in ids:
            with Session(self._engine, expire_on_commit=False) as session:
                try:
                    row = session.get(TrainingRun, row_id)
                    if row is not None:
                        run_record(row)
                        rows.append(row)
                except (ValueError, TypeError) as exc:
                    _LOGGER.warning(
                        "Leaving out row %s of the history, which cannot be read: %s: %s",
                        row_id,
                        type(exc).__name__,
                        first_line(exc),
                    )
            if len(rows) == limit:
                break
        return rows


class HistoryUnavailable(Exception):
    """The history database cannot be opened: one line, the password masked."""


HOMEIQ_TABLE = "automation.ask_ai_queries"


def _holds_homeiqs_tables(engine: Engine) -> bool:
    """Whether a PostgreSQL database is HomeIQ's, whatever name or address reached it."""
    with engine.connect() as conn:
        return inspect(conn).has_table("ask_ai_queries", schema="automation")


def history_unavailable(exc: SQLAlchemyError, url: URL, display: str) -> HistoryUnavailable:
    """The one line for a history that cannot be reached or opened (`display`: its masked address)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if sqlite_path(url) is not None:
        reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    elif getattr(orig, "sqlstate", None) == "42501":  # opening creates what is missing: CREATE was refused
        reason = (
            f"the role in the URL may not create {TrainingRun.__tablename__} and its tables "
            "(GRANT CREATE ON SCHEMA public TO it, or use a database it owns)"
        )
    else:
        reason = postgres_reason(orig, TrainingRun.__tablename__, HISTORY_TIMEOUT_S, HISTORY_TIMEOUT_S)
    return HistoryUnavailable(scrub(f"cannot open the history at {display}: {reason}", url))


class HistoryStore(_ServedAdapters):
    """The run history, with one method per thing that happens to a run."""

    def __init__(self, target: Path | str | URL, homeiq_runs: HomeIQRuns | None = None) -> None:
        url = database_url(target)
        path = sqlite_path(url)
        self.display = masked(url)
        """Where the history is, as it may be shown."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False}, json_deserializer=lenient_json
            )
            event.listen(self._engine, "connect", _sqlite_pragmas)
        else:
            self._engine = create_engine(
                url,
                pool_pre_ping=True,  # the server may have restarted between two runs
                json_deserializer=lenient_json,
                connect_args=postgres_connect_args(HISTORY_TIMEOUT_S, HISTORY_TIMEOUT_S, read_only=False),
            )
        try:
            if path is None and _holds_homeiqs_tables(self._engine):
                self._engine.dispose()
                raise HistoryUnavailable(
                    f"the history at {self.display} is HomeIQ's database (it holds {HOMEIQ_TABLE}); "
                    "give storage.history a database of its own: only the run record may be written to HomeIQ's"
                )
            create_safely(lambda: _create_schema(self._engine))
        except SQLAlchemyError as exc:  # the first read: a file that is no database, a server that is down
            self._engine.dispose()
            raise history_unavailable(exc, url, self.display) from None
        self._lock = threading.Lock()
        self._homeiq_runs = homeiq_runs

    @property
    def engine(self) -> Engine:
        """The history database, for our other tables beside `training_runs`."""
        return self._engine

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()
        if self._homeiq_runs is not None:
            self._homeiq_runs.close()

    def _update(
        self, run_id: int, also: SQLModel | None = None, note_served: bool = False, **values: Any
    ) -> TrainingRun:
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise KeyError(f"no training run with id {run_id}")
            for key, value in values.items():
                setattr(run, key, value)
            if note_served:  # in the same transaction as the end, before `also` serves anything
                run.served_id_at_finish = session.exec(select(func.max(ServedAdapter.id))).one() or 0
            session.add(run)
            if also is not None:
                session.add(also)  # in the same transaction: both or neither
            session.commit()
            return run

    def create(
        self,
        run_identifier: str,
        base_model: str,
        output_dir: str,
        triggered_by: str,
        parameters: dict[str, Any],
        request_id: str | None = None,
    ) -> TrainingRun:
        """Record a new queued run."""
        run = TrainingRun(
            run_identifier=run_identifier,
            status=RunStatus.QUEUED.value,
            started_at=utcnow(),
            base_model=base_model,
            output_dir=output_dir,
            triggered_by=triggered_by,
            request_id=request_id,
            parameters_json=parameters,
        )
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            session.add(run)
            session.commit()  # the id is set at the flush; a read after the commit could only fail it
        return run

    def mark_running(self, run_id: int) -> TrainingRun:
        """The run's process picked it up."""
        return self._update(run_id, status=RunStatus.RUNNING.value)

    def finish(
        self,
        run_id: int,
        status: RunStatus,
        *,
        dataset_size: int | None = None,
        final_loss: float | None = None,
        eval_loss: float | None = None,
        loss_history: list[dict[str, float | None]] | None = None,
        metadata_path: str | None = None,
        output_dir: str | None = None,
        base_model: str | None = None,
        data_report: dict[str, Any] | None = None,
        error: str | None = None,
        decision: Decision | None = None,
        decision_reason: str | None = None,
        evaluation: dict[str, Any] | None = None,
        serve: bool = False,
        peak_rss_mb: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> TrainingRun:
        """Close the run with its outcome (and, with `serve`, make it the served one); `error` keeps 5000 chars."""
        values: dict[str, Any] = {
            "status": status.value,
            "finished_at": utcnow(),
            "dataset_size": dataset_size,
            "final_loss": final_loss,
            "eval_loss": eval_loss,
            "iteration_history_json": json_safe(loss_history),
            "metadata_path": metadata_path,
            "data_report_json": json_safe(data_report),
            "error_message": _storable(error[-ERROR_TAIL_CHARS:]) if error else None,
            "promoted": serve,
            "decision": decision.value if decision else None,
            "decision_reason": _storable(decision_reason) if decision_reason else None,
            "evaluation_json": json_safe(evaluation),  # PostgreSQL's JSON refuses NaN and Infinity
            "peak_rss_mb": peak_rss_mb,
        }
        if output_dir is not None:
            values["output_dir"] = output_dir
        if base_model:
            values["base_model"] = base_model  # a resumed run trains on its parent's base model
        if parameters is not None:
            values["parameters_json"] = parameters
        row = self.get(run_id) if serve else None
        served = ServedAdapter(run_identifier=row.run_identifier, served_at=utcnow(), action="promote") if row else None
        run = self._update(run_id, also=served, note_served=True, **values)
        if self._homeiq_runs is not None:
            self._homeiq_runs.record(run)
        return run

    def mark_interrupted(self) -> list[TrainingRun]:
        """Fail every run still queued or running: its process is gone."""
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            stale = session.exec(
                select(TrainingRun).where(
                    TrainingRun.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])  # type: ignore[attr-defined]
                )
            ).all()
            left = [(run.run_identifier, run.status) for run in stale]
            for run in stale:
                run.status = RunStatus.FAILED.value
                run.finished_at = utcnow()
                run.error_message = INTERRUPTED_MESSAGE
                session.add(run)
            session.commit()
        for run_identifier, status in left:
            _LOGGER.warning("Run %s was left %s by a stopped process; marked failed", run_identifier, status)
        if self._homeiq_runs is not None:  # HomeIQ's admin page lists it too, as a finished run would be
            for run in stale:
                self._homeiq_runs.record(run)
        return list(stale)

    def get(self, run_id: int) -> TrainingRun | None:
        """One run by its row id."""
        with Session(self._engine, expire_on_commit=False) as session:
            return session.get(TrainingRun, run_id)

    def by_identifier(self, run_identifier: str) -> TrainingRun | None:
        """One run by its run identifier."""
        with Session(self._engine, expire_on_commit=False) as session:
            return session.exec(select(TrainingRun).where(TrainingRun.run_identifier == run_identifier)).first()

    def recent(self, limit: int = 25) -> list[TrainingRun]:
        """The newest runs first (rows that cannot be read left out)."""
        query = select(TrainingRun).order_by(TrainingRun.id.desc())  # type: ignore[union-attr]  # not by a clock that can go back
        return self._readable(query, limit)

    def latest_finished(self) -> TrainingRun | None:
        """The newest run that has ended, whatever its outcome (rows that cannot be read left out)."""
        query = (
            select(TrainingRun)
            .where(TrainingRun.finished_at.is_not(None))  # type: ignore[union-attr]
            .order_by(TrainingRun.id.desc())  # type: ignore[union-attr]  # one run at a time: ends in this order too
        )
        return next(iter(self._readable(query, 1)), None)

    def latest_completed(self) -> TrainingRun | None:
        """The newest completed run (rows that cannot be read left out)."""
        query = (
            select(TrainingRun).where(TrainingRun.status == RunStatus.COMPLETED.value).order_by(TrainingRun.id.desc())  # type: ignore[union-attr]  # the order they began in, whatever the clock said
        )
        return next(iter(self._readable(query, 1)), None)

    def prune(self, keep: int, protect: Iterable[str] = ()) -> int:
        """Delete finished rows beyond the newest `keep`, never those of `protect` (runs that may be served)."""
        with self._lock, Session(self._engine) as session:
            newest = (
                select(TrainingRun.id)
                .order_by(TrainingRun.id.desc())  # type: ignore[union-attr]  # a clock set back must not prune the newest
                .limit(keep)
            )
            doomed = delete(TrainingRun).where(
                TrainingRun.id.not_in(newest.scalar_subquery()),  # type: ignore[union-attr]
                TrainingRun.finished_at.is_not(None),  # type: ignore[union-attr]
            )
            kept = list(protect)
            if kept:
                doomed = doomed.where(TrainingRun.run_identifier.not_in(kept))  # type: ignore[attr-defined]
            removed = session.exec(doomed).rowcount
            session.commit()
        if removed:
            _LOGGER.info("Pruned %d history rows beyond the newest %d", removed, keep)
        return int(removed or 0)

    def identifiers(self) -> set[str]:
        """Every run identifier in the history."""
        with Session(self._engine) as session:
            return set(session.exec(select(TrainingRun.run_identifier)).all())

"""The results store: every campaign, task, measurement, artifact and device sighting.

SQLite by default (:func:`edgefarm.home.default_store_url`), any SQLAlchemy URL otherwise (e.g.
``postgresql+psycopg://user:pw@host/edgefarm``). All SQL of the store lives here; the
tables are in :mod:`results.schema`, record <-> row conversion in :mod:`results.rows`.

Result rows (:meth:`ResultsStore.get_result`, :meth:`ResultsStore.query_results`) are
plain dicts keyed by the columns of :data:`results.schema.results`, JSON columns decoded,
``ok`` / ``valid`` as bools and NaN measurements as ``None`` (as are
``measure_started_at`` / ``measure_ended_at`` when the agent did not report them). The
raw samples live in ``result_samples``: a row carries ``samples_ms`` only when read
with ``samples=True``. Reads of many rows are streamed in keyset pages
(:meth:`ResultsStore.iter_results`, :meth:`ResultsStore.iter_campaign_results`).

Errors: every database failure leaves the store as :class:`~edgefarm.errors.StoreError`
with a one-line message; a store written by a newer edgefarm raises
:class:`~edgefarm.errors.SchemaVersionError`. Programming errors stay ordinary:
``ValueError`` for a field a record does not have, ``KeyError`` for an unknown id given
to an update.

SQLite specifics: WAL journal, ``busy_timeout`` 5000 ms, foreign keys on, and write
transactions start with ``BEGIN IMMEDIATE`` so that a read-then-write transaction never
fails on a lock upgrade. The store is safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgefarm.domain import CampaignStatus, MeasurementResult, TaskStatus
from edgefarm.errors import SchemaVersionError, StoreError, UsageError
from edgefarm.gc_pause import gc_paused
from results import rows, samples_codec, schema
from results.records import (
    AgentIdentity,
    ArtifactRecord,
    AttemptRecord,
    CampaignRecord,
    DeviceSeen,
    NightlyRun,
    TaskRecord,
)
from results.regression.types import Sample, SeriesKey
from results.schema import (
    agent_credentials,
    artifacts,
    attempts,
    campaigns,
    devices_seen,
    insert_tuples,
    migrate,
    nightly_runs,
    result_samples,
    results,
    series_night_packs,
    series_nights,
    tasks,
)

logger = logging.getLogger(__name__)

MIN_PREFIX_LEN = 4
RESULT_BATCH = 500  # result rows per query of a streamed read
# Every results column but the always-empty samples_ms (samples: result_samples).
_ROW_COLUMNS = tuple(c for c in results.c if c.name != "samples_ms")
_WRITE_OPTION = "edgefarm_write"


# Many results at once: their rows (ids returned with their keys), and those stored.
_INSERT_RESULTS = results.insert().returning(
    results.c.result_id, results.c.task_id, results.c.attempt
)
_RESULTS_OF_TASKS = sa.select(results.c.task_id, results.c.attempt, results.c.result_id).where(
    results.c.task_id.in_(sa.bindparam("task_ids", expanding=True))
)
# A task's outcome: its status and result row (parameters bound at execution).
_TASK_RESULT = (
    schema.tasks.update()
    .where(schema.tasks.c.task_id == sa.bindparam("b_task_id"))
    .values(
        status=sa.bindparam("status"),
        result_id=sa.bindparam("result_id"),
        updated_at=sa.bindparam("updated_at"),
    )
)


@dataclasses.dataclass(frozen=True)
class SeriesValues:
    """One stored night's series values: fingerprints ascending, values alike."""

    series: np.ndarray  # int64 (results.rows.series_fingerprint)
    values: np.ndarray  # float64


def _series_values(run_id: str, found: Sequence[Any]) -> SeriesValues:
    """A night's (fingerprint, value) pairs as arrays; a pair that is not an integer and
    a finite number (a damaged row) is left out with a warning."""
    series, values, skipped = rows.series_value_arrays(found)
    if skipped:
        logger.warning("skipping %d damaged series_nights row(s) of %s", skipped, run_id)
    return SeriesValues(series, values)


# An attempt inserted only if its task is stored and it is not (one statement, the
# usual case of start_attempt; any other case is decided by reading first).
_NEW_ATTEMPT = attempts.insert().from_select(
    [c.name for c in attempts.columns],
    sa.select(*(sa.bindparam(c.name, type_=c.type) for c in attempts.columns)).where(
        sa.exists().where(tasks.c.task_id == sa.bindparam("task_id")),
        ~sa.exists().where(
            attempts.c.task_id == sa.bindparam("task_id"),
            attempts.c.attempt == sa.bindparam("attempt"),
        ),
    ),
)


# A task held under a lease (the batched half of update_task that lease_tasks runs).
_HOLD = tasks.update().where(tasks.c.task_id == sa.bindparam("b_task_id"))
# An attempt's end, when its row exists (the usual case of end_attempt).
_END_ATTEMPT = attempts.update().where(
    attempts.c.task_id == sa.bindparam("b_task_id"),
    attempts.c.attempt == sa.bindparam("b_attempt"),
)


class _Conflict(StoreError):
    """A write broke a unique / foreign key constraint (handled inside the store)."""


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0]


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 driver: _sqlite_on_begin emits it (SQLAlchemy's
    # documented recipe), so reads are repeatable and DDL is transactional.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 5000")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and str(mode[0]).lower() not in ("wal", "memory"):
            logger.warning("SQLite refused WAL journal mode (kept %s)", mode[0])
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _create_engine(url: str) -> Engine:
    """An engine for ``url`` (creating a SQLite file's folder); StoreError when invalid."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise StoreError(f"invalid results store URL {url!r}: {_one_line(e)}") from e
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the folder of {database}: {e}") from e
    else:
        kwargs["pool_pre_ping"] = True
        if backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
            kwargs["connect_args"] = {"connect_timeout": 10}
    safe = parsed.render_as_string(hide_password=True)
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
        hint = ""
        if isinstance(e, ImportError) and backend == "postgresql":
            hint = " (pip install 'edgefarm[postgres]')"
        raise StoreError(f"cannot use results store URL {safe}: {_one_line(e)}{hint}") from e
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
    return engine


class ResultsStore:
    """The farm's system of record. Open with :meth:`open`; use as a context manager."""

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine whose schema is already current (use :meth:`open`)."""
        self._engine = engine
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._url = url
        self._safe_url = engine.url.render_as_string(hide_password=True)
        self._closed = False
        self._batch = threading.local()  # .conn, .savepoints: this thread's batch, if any

    # ---------------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, url: str) -> ResultsStore:
        """Open (creating or migrating) the store at a SQLAlchemy URL."""
        engine = _create_engine(url)
        store = cls(engine, url)
        try:
            with store._tx(write=True) as conn:
                found = migrate(conn)
        except SchemaVersionError:
            engine.dispose()
            raise
        except (StoreError, sa.exc.SQLAlchemyError) as e:
            engine.dispose()
            cause = e.__cause__ if isinstance(e, StoreError) and e.__cause__ else e
            raise StoreError(
                f"cannot open results store {store._safe_url}: {_one_line(cause)}"
            ) from e
        logger.debug("opened results store %s (schema version %d)", store._safe_url, found)
        return store

    @property
    def url(self) -> str:
        """The URL the store was opened with."""
        return self._url

    def close(self) -> None:
        """Release every database connection; the store cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsStore({self._safe_url!r})"

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; database errors become StoreError (_Conflict for constraints)."""
        if self._closed:
            raise StoreError("the results store is closed")
        outer: Connection | None = getattr(self._batch, "conn", None)
        try:
            if outer is not None and self._batch.savepoints:  # a savepoint of the batch
                with outer.begin_nested():
                    yield outer
                return
            if outer is not None:  # batch(savepoints=False): straight in its transaction
                yield outer
                return
            engine = self._write_engine if write else self._engine
            with engine.begin() as conn:
                yield conn
        except sa.exc.IntegrityError as e:
            raise _Conflict(_one_line(e)) from e
        except sa.exc.DBAPIError as e:
            raise StoreError(f"results store {self._safe_url}: {_one_line(e)}") from e

    @contextmanager
    def batch(self, savepoints: bool = True) -> Iterator[None]:
        """Every store call made inside, on this thread, in one write transaction (one
        commit), each in a savepoint of its own: a call that fails rolls back alone. A
        failed commit raises StoreError and keeps none of them. Nested: one batch.

        ``savepoints=False`` runs the calls straight in the transaction on SQLite
        (cheaper, but a failed call may leave part of its writes): for a caller that
        rolls the whole batch back when any call fails (by raising out of it) and runs
        the calls again with savepoints. Elsewhere it keeps them: on PostgreSQL a failed
        statement aborts the transaction and COMMIT then rolls back without an error, so
        a call that handles a database error itself would lose the batch unnoticed."""
        if getattr(self._batch, "conn", None) is not None:
            yield
            return
        with self._tx(write=True) as conn:
            self._batch.conn = conn
            self._batch.savepoints = savepoints or conn.dialect.name != "sqlite"
            try:
                yield
            finally:
                self._batch.conn = None

    # ---------------------------------------------------------------------- campaigns

    def create_campaign(self, c: CampaignRecord, tasks: list[TaskRecord]) -> None:
        """Store a campaign and its tasks in one transaction.

        Tasks keep the list order as their creation order; a zero ``created_at`` /
        ``updated_at`` is stored as the current time.
        """
        now = time.time()
        task_rows = [rows.task_to_row(t, now) for t in tasks]
        try:
            with self._tx(write=True) as conn:
                conn.execute(campaigns.insert().values(**rows.campaign_to_row(c)))
                if task_rows:
                    conn.execute(schema.tasks.insert(), task_rows)  # `tasks` is the list
        except _Conflict as e:
            raise StoreError(f"cannot create campaign {c.campaign_id}: {e}") from e

    def start_campaign(
        self,
        campaign_id: str,
        tasks: list[TaskRecord],
        conversions_run: int = 0,
        conversions_cached: int = 0,
    ) -> None:
        """Store a prepared campaign's tasks and set it RUNNING, in one transaction (a
        crash before leaves it PREPARING, with no task). KeyError for an unknown id;
        StoreError when it has tasks already."""
        now = time.time()
        task_rows = [rows.task_to_row(t, now) for t in tasks]
        with self._tx(write=True) as conn:
            found = conn.execute(
                sa.select(campaigns.c.status).where(campaigns.c.campaign_id == campaign_id)
            ).first()
            if found is None:
                raise KeyError(campaign_id)
            if found[0] != CampaignStatus.PREPARING.value:
                raise StoreError(f"campaign {campaign_id} is {found[0]}, not preparing")
            if task_rows:
                conn.execute(schema.tasks.insert(), task_rows)
            conn.execute(
                campaigns.update()
                .where(campaigns.c.campaign_id == campaign_id)
                .values(
                    status=CampaignStatus.RUNNING.value,
                    conversions_run=conversions_run,
                    conversions_cached=conversions_cached,
                )
            )

    def get_campaign(self, campaign_id: str) -> CampaignRecord | None:
        """The campaign with this id, or with this unique id prefix (>= 4 characters).

        Raises :class:`~edgefarm.errors.UsageError` when a prefix matches several.
        """
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(campaigns).where(campaigns.c.campaign_id == campaign_id))
                .mappings()
                .first()
            )
            if row is not None:
                return rows.row_to_campaign(row)
            if len(campaign_id) < MIN_PREFIX_LEN:
                return None
            matches = (
                conn.execute(
                    sa.select(campaigns)
                    .where(campaigns.c.campaign_id.startswith(campaign_id, autoescape=True))
                    .order_by(campaigns.c.created_at.desc())
                    .limit(6)
                )
                .mappings()
                .all()
            )
        if len(matches) > 1:
            shown = ", ".join(m["campaign_id"] for m in matches[:5])
            raise UsageError(f"campaign id prefix {campaign_id!r} is ambiguous: {shown}, ...")
        return rows.row_to_campaign(matches[0]) if matches else None

    def campaign_for_submission(self, submission_id: str) -> CampaignRecord | None:
        """The campaign a client's submission created, if any."""
        stmt = sa.select(campaigns).where(campaigns.c.submission_id == submission_id).limit(1)
        with self._tx() as conn:
            row = conn.execute(stmt).mappings().first()
        return rows.row_to_campaign(row) if row is not None else None

    def list_campaigns(self, limit: int = 50) -> list[CampaignRecord]:
        """The newest campaigns first."""
        stmt = (
            sa.select(campaigns)
            .order_by(campaigns.c.created_at.desc(), campaigns.c.campaign_id.desc())
            .limit(limit)
        )
        with self._tx() as conn:
            return [rows.row_to_campaign(r) for r in conn.execute(stmt).mappings()]

    def update_campaign(self, campaign_id: str, **fields: object) -> None:
        """Set CampaignRecord fields (ValueError for others; KeyError for an unknown id)."""
        values = rows.campaign_fields_to_values(fields)
        if not values:
            return
        with self._tx(write=True) as conn:
            done = conn.execute(
                campaigns.update().where(campaigns.c.campaign_id == campaign_id).values(values)
            )
            if not done.rowcount:
                raise KeyError(campaign_id)

    def set_campaign_status(
        self, campaign_id: str, status: CampaignStatus, finished_at: float | None = None
    ) -> None:
        """Set a campaign's status and finish time (KeyError for an unknown id)."""
        self.update_campaign(campaign_id, status=status, finished_at=finished_at)

    def unfinished_campaigns(self) -> list[CampaignRecord]:
        """Campaigns still PREPARING or RUNNING, oldest first (to resume after a restart)."""
        stmt = (
            sa.select(campaigns)
            .where(
                campaigns.c.status.in_(
                    [CampaignStatus.PREPARING.value, CampaignStatus.RUNNING.value]
                )
            )
            .order_by(campaigns.c.created_at, campaigns.c.campaign_id)
        )
        with self._tx() as conn:
            return [rows.row_to_campaign(r) for r in conn.execute(stmt).mappings()]

    def campaign_counts(self, campaign_id: str) -> dict[str, int]:
        """Number of the campaign's tasks per TaskStatus value, plus ``"total"``."""
        stmt = (
            sa.select(tasks.c.status, sa.func.count())
            .where(tasks.c.campaign_id == campaign_id)
            .group_by(tasks.c.status)
        )
        counts = {s.value: 0 for s in TaskStatus}
        with self._tx() as conn:
            for status, n in conn.execute(stmt):
                counts[status] = int(n)
        counts["total"] = sum(counts.values())
        return counts

    # -------------------------------------------------------------------------- tasks

    def tasks_for_campaign(self, campaign_id: str) -> list[TaskRecord]:
        """The campaign's tasks in creation order."""
        return self._select_tasks(tasks.c.campaign_id == campaign_id)

    def get_task(self, task_id: str) -> TaskRecord | None:
        """One task, or None."""
        found = self._select_tasks(tasks.c.task_id == task_id)
        return found[0] if found else None

    def unfinished_tasks(self) -> list[TaskRecord]:
        """PENDING or ASSIGNED tasks of every campaign, in creation order."""
        return self._select_tasks(
            tasks.c.status.in_([TaskStatus.PENDING.value, TaskStatus.ASSIGNED.value])
        )

    def _select_tasks(self, where: sa.ColumnElement[bool]) -> list[TaskRecord]:
        stmt = sa.select(tasks).where(where).order_by(tasks.c.created_at, tasks.c.seq)
        with self._tx() as conn:
            return [rows.row_to_task(r) for r in conn.execute(stmt).mappings()]

    def update_task(self, task_id: str, **fields: object) -> None:
        """Set TaskRecord fields and ``updated_at`` (now, unless given).

        ValueError for a name that is not a TaskRecord field; KeyError for an unknown task.
        """
        values = rows.task_fields_to_values(fields)
        values.setdefault("updated_at", time.time())
        try:
            with self._tx(write=True) as conn:
                done = conn.execute(
                    tasks.update().where(tasks.c.task_id == sa.bindparam("b_task_id")),
                    {**values, "b_task_id": task_id},
                )
                if not done.rowcount:
                    raise KeyError(task_id)
        except _Conflict as e:
            raise StoreError(f"cannot update task {task_id}: {e}") from e

    # ------------------------------------------------------------------------ results

    def ingest_result(
        self, task: TaskRecord, result: MeasurementResult, device_name: str
    ) -> tuple[int, bool]:
        """Store an agent's result; returns ``(result_id, inserted)``.

        Idempotent on ``(task_id, result.attempt)``: a repeat changes nothing and returns
        the existing id with ``inserted`` False. The same transaction sets the task's
        status (DONE if ``result.ok`` else FAILED) and ``result_id``; lease fields are
        left as they are. Checking that the result's lease is current is the caller's job.
        """
        if result.task_id != task.task_id:
            raise ValueError(f"result of task {result.task_id} given for task {task.task_id}")
        now = time.time()
        row = rows.result_to_row(task, result, device_name, now)
        status = TaskStatus.DONE if result.ok else TaskStatus.FAILED
        return self._insert_result(row, status, now)

    def ingest_results(
        self, items: Sequence[tuple[TaskRecord, MeasurementResult, str]]
    ) -> list[tuple[int, bool]]:
        """:meth:`ingest_result` of many results, in one transaction and one statement per
        table for them all; ``(result_id, inserted)`` of each, in order. All or nothing:
        any failure raises (StoreError or ValueError) and stores none of them (for the
        cause, store them one by one)."""
        now = time.time()
        new: dict[tuple[str, int], tuple[dict[str, Any], TaskStatus]] = {}
        for task, result, device_name in items:
            if result.task_id != task.task_id:
                raise ValueError(f"result of task {result.task_id} given for task {task.task_id}")
            row = rows.result_to_row(task, result, device_name, now)
            status = TaskStatus.DONE if result.ok else TaskStatus.FAILED
            new.setdefault((row["task_id"], row["attempt"]), (row, status))
        try:
            with self._tx(write=True) as conn:
                stored = {
                    k: (rid, False) for k, rid in self._result_ids_for(conn, list(new)).items()
                }
                for key in stored:
                    del new[key]
                if new:
                    # Rows come back in no set order (SQLite then takes them all in one
                    # statement): matched to their results by key.
                    returned = conn.execute(
                        _INSERT_RESULTS, [{**row, "samples_ms": []} for row, _ in new.values()]
                    )
                    ids = {(task_id, attempt): int(rid) for rid, task_id, attempt in returned}
                    if len(ids) != len(new):  # pragma: no cover - every dialect reports them
                        raise StoreError("the database did not report the new result ids")
                    samples = [
                        sample
                        for key, (row, _) in new.items()
                        for sample in schema.sample_rows(
                            ids[key], row["samples_ms"], row["trials_detail"]
                        )
                    ]
                    if samples:
                        conn.execute(result_samples.insert(), samples)
                    conn.execute(
                        _TASK_RESULT,
                        [
                            {"b_task_id": key[0], "status": status.value,
                             "result_id": ids[key], "updated_at": now}
                            for key, (_, status) in new.items()
                        ],
                    )  # fmt: skip
                    stored.update((key, (result_id, True)) for key, result_id in ids.items())
        except _Conflict as e:
            raise StoreError(f"cannot store {len(items)} results: {e}") from e
        outcomes: list[tuple[int, bool]] = []
        first: set[tuple[str, int]] = set()
        for _, result, _ in items:
            key = (result.task_id, result.attempt)
            result_id, inserted = stored[key]
            outcomes.append((result_id, inserted and key not in first))
            first.add(key)
        return outcomes

    def record_failure(self, task: TaskRecord, kind: str, message: str) -> int:
        """Store a failed row for a task that produced no result (e.g. lost leases).

        Keyed by the task's current attempt and idempotent like :meth:`ingest_result`;
        sets the task FAILED with this ``result_id``. Returns the result id.
        """
        now = time.time()
        row = rows.failure_to_row(task, kind, message, now)
        result_id, _ = self._insert_result(row, TaskStatus.FAILED, now)
        return result_id

    def _insert_result(
        self, row: dict[str, Any], status: TaskStatus, now: float
    ) -> tuple[int, bool]:
        task_id, attempt = row["task_id"], row["attempt"]
        try:
            with self._tx(write=True) as conn:
                existing = self._result_id_for(conn, task_id, attempt)
                if existing is not None:
                    return existing, False
                # parameters apart from the statement: compiled once, not per row
                samples = row["samples_ms"]
                inserted = conn.execute(
                    results.insert(), {**row, "samples_ms": []}
                ).inserted_primary_key
                if inserted is None:  # pragma: no cover - every supported dialect reports it
                    raise StoreError("the database did not report the new result id")
                result_id = int(inserted[0])
                if samples:
                    conn.execute(
                        result_samples.insert(),
                        schema.sample_rows(result_id, samples, row["trials_detail"]),
                    )
                conn.execute(
                    _TASK_RESULT,
                    {"b_task_id": task_id, "status": status.value, "result_id": result_id,
                     "updated_at": now},
                )  # fmt: skip
                return result_id, True
        except _Conflict as e:
            # Lost a race with a concurrent ingestion of the same attempt (or the task
            # does not exist: then there is no row to return).
            with self._tx() as conn:
                existing = self._result_id_for(conn, task_id, attempt)
            if existing is None:
                raise StoreError(
                    f"cannot store the result of task {task_id} attempt {attempt}: {e}"
                ) from e
            return existing, False

    @staticmethod
    def _result_ids_for(
        conn: Connection, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """The stored results among ``(task_id, attempt)`` keys: key -> result id."""
        found: dict[tuple[str, int], int] = {}
        wanted = set(keys)
        task_ids = sorted({task_id for task_id, _ in keys})
        for start in range(0, len(task_ids), 500):
            for task_id, attempt, result_id in conn.execute(
                _RESULTS_OF_TASKS, {"task_ids": task_ids[start : start + 500]}
            ):
                if (task_id, attempt) in wanted:
                    found[(task_id, attempt)] = int(result_id)
        return found

    @classmethod
    def _result_id_for(cls, conn: Connection, task_id: str, attempt: int) -> int | None:
        return cls._result_ids_for(conn, [(task_id, attempt)]).get((task_id, attempt))

    def find_reusable_result(self, measure_key: str) -> int | None:
        """The newest ok and valid result with this measure key (None for an empty key)."""
        return self.find_reusable_results([measure_key]).get(measure_key)

    def find_reusable_results(self, measure_keys: Iterable[str]) -> dict[str, int]:
        """:meth:`find_reusable_result` of many keys: key -> result id for each key that
        has one, a few hundred keys per query."""
        wanted = sorted({k for k in measure_keys if k})
        stmt = (
            sa.select(results.c.measure_key, results.c.result_id)
            .where(
                results.c.measure_key.in_(sa.bindparam("keys", expanding=True)),
                results.c.ok,
                results.c.valid,
            )
            .order_by(
                results.c.measure_key, results.c.created_at.desc(), results.c.result_id.desc()
            )
        )
        found: dict[str, int] = {}
        with self._tx() as conn:
            for start in range(0, len(wanted), 500):
                for key, result_id in conn.execute(stmt, {"keys": wanted[start : start + 500]}):
                    found.setdefault(key, int(result_id))
        return found

    def get_result(self, result_id: int, samples: bool = False) -> dict[str, Any] | None:
        """One result row as a dict, or None; ``samples``: with ``samples_ms``."""
        found = list(self.iter_results(result_id=result_id, samples=samples))
        return found[0] if found else None

    def query_results(
        self,
        campaign_id: str | None = None,
        model: str | None = None,
        backend: str | None = None,
        device: str | None = None,
        ok: bool | None = None,
        limit: int | None = None,
        samples: bool = False,
    ) -> list[dict[str, Any]]:
        """:meth:`iter_results` as a list."""
        return list(
            self.iter_results(
                campaign_id=campaign_id, model=model, backend=backend, device=device, ok=ok,
                limit=limit, samples=samples,
            )
        )  # fmt: skip

    def iter_results(
        self,
        *,
        result_id: int | None = None,
        campaign_id: str | None = None,
        model: str | None = None,
        backend: str | None = None,
        device: str | None = None,
        ok: bool | None = None,
        limit: int | None = None,
        samples: bool = False,
        batch: int = RESULT_BATCH,
    ) -> Iterator[dict[str, Any]]:
        """Result rows matching every given filter, newest first, read ``batch`` rows
        per query (keyset paging on the result id, each query its own short read), so
        memory stays flat in the number of rows and no transaction spans the walk.

        Filters run in SQL on indexed columns. ``device`` matches ``device_id`` or
        ``device_name``. ``campaign_id`` matches the campaign that measured the row (rows
        reused by later campaigns are not repeated here: see
        :meth:`results_for_campaign`). Rows carry ``samples_ms`` (every raw sample, in
        trial order) only with ``samples``: see :meth:`result_samples`.
        """
        where: list[sa.ColumnElement[bool]] = []
        if result_id is not None:
            where.append(results.c.result_id == result_id)
        if campaign_id is not None:
            where.append(results.c.campaign_id == campaign_id)
        if model is not None:
            where.append(results.c.model == model)
        if backend is not None:
            where.append(results.c.backend == backend)
        if device is not None:
            where.append(sa.or_(results.c.device_id == device, results.c.device_name == device))
        if ok is not None:
            where.append(results.c.ok == ok)
        left = limit
        after: int | None = None
        while left is None or left > 0:
            size = batch if left is None else min(batch, left)
            page = [*where] if after is None else [*where, results.c.result_id < after]
            stmt = (
                sa.select(*_ROW_COLUMNS)
                .where(sa.and_(sa.true(), *page))
                .order_by(results.c.result_id.desc())
                .limit(size)
            )
            with self._tx() as conn:
                found = [rows.decode_result_row(r) for r in conn.execute(stmt).mappings()]
            if samples:
                self._attach_samples(found)
            yield from found
            if len(found) < size:
                return
            after = found[-1]["result_id"]
            if left is not None:
                left -= len(found)

    def result_samples(self, result_ids: Iterable[int]) -> dict[int, list[float]]:
        """Every raw sample of each result (milliseconds, in trial order); a result with
        none maps to ``[]``. StoreError names a result whose stored samples are damaged."""
        ids = sorted(set(result_ids))
        out: dict[int, list[float]] = {i: [] for i in ids}
        for start in range(0, len(ids), RESULT_BATCH):
            chunk = ids[start : start + RESULT_BATCH]
            stmt = (
                sa.select(result_samples)
                .where(result_samples.c.result_id.in_(chunk))
                .order_by(result_samples.c.result_id, result_samples.c.trial)
            )
            with self._tx() as conn:
                for r in conn.execute(stmt).mappings():
                    try:
                        values = samples_codec.decode(r["encoding"], r["data"], r["count"])
                    except ValueError as e:
                        raise StoreError(
                            f"result {r['result_id']} trial {r['trial']}: stored samples "
                            f"are damaged: {e}"
                        ) from e
                    out[r["result_id"]].extend(values)
        return out

    def _attach_samples(self, found: list[dict[str, Any]]) -> None:
        by_id = self.result_samples(r["result_id"] for r in found)
        for row in found:
            row["samples_ms"] = by_id[row["result_id"]]

    @gc_paused()
    def results_for_campaign(self, campaign_id: str, samples: bool = False) -> list[dict[str, Any]]:
        """:meth:`iter_campaign_results` as a list."""
        return list(self.iter_campaign_results(campaign_id, samples=samples))

    def iter_campaign_results(
        self, campaign_id: str, samples: bool = False, batch: int = RESULT_BATCH
    ) -> Iterator[dict[str, Any]]:
        """The row answering each task of the campaign, in task creation order, read
        ``batch`` rows per query like :meth:`iter_results`.

        Each dict is the stored result row, unchanged (so ``task_id`` / ``campaign_id``
        name the task and campaign that *measured* it), plus two keys:

        - ``answers_task_id``: the task of *this* campaign that the row answers;
        - ``reused``: True when the row was measured by another task (an earlier
          identical measurement), i.e. ``task_id != answers_task_id``.

        Tasks without a result yet are left out.
        """
        after: int | None = None  # the last task's seq (tasks of a campaign: seq order)
        while True:
            where = [tasks.c.campaign_id == campaign_id]
            if after is not None:
                where.append(tasks.c.seq > after)
            stmt = (
                sa.select(
                    *_ROW_COLUMNS,
                    tasks.c.task_id.label("answers_task_id"),
                    tasks.c.seq.label("_seq"),
                )
                .join_from(tasks, results, tasks.c.result_id == results.c.result_id)
                .where(*where)
                .order_by(tasks.c.seq)
                .limit(batch)
            )
            with self._tx() as conn:
                found = [rows.decode_result_row(r) for r in conn.execute(stmt).mappings()]
            if not found:
                return
            after = found[-1].pop("_seq")
            for row in found:
                row.pop("_seq", None)
                row["reused"] = row["task_id"] != row["answers_task_id"]
            if samples:
                self._attach_samples(found)
            yield from found
            if len(found) < batch:
                return

    # ----------------------------------------------------------------------- attempts

    def start_attempt(self, a: AttemptRecord) -> None:
        """Record that an attempt of a task began (its lease was granted).

        Idempotent on ``(task_id, attempt)``: recording it again (a restarted
        coordinator) keeps the stored row, only filling in a start time, lease or agent
        it did not know. ValueError for an unknown outcome; StoreError for an unknown task.
        """
        values = rows.attempt_to_row(a)
        key = self._attempt_key(a.task_id, a.attempt)
        error: StoreError | None = None
        for _ in range(2):  # a second round only after losing an insert race
            try:
                with self._tx(write=True) as conn:
                    if conn.execute(_NEW_ATTEMPT, values).rowcount == 1:
                        return  # the usual case: a new attempt of a stored task
                    found = conn.execute(sa.select(attempts).where(key)).mappings().first()
                    if found is None:
                        self._require_task(conn, a.task_id)
                        conn.execute(attempts.insert(), values)
                        return
                    fill: dict[str, Any] = {}
                    if found["started_at"] <= 0 < values["started_at"]:
                        fill["started_at"] = values["started_at"]
                    for name in ("lease_id", "agent_id"):
                        if not found[name] and values[name]:
                            fill[name] = values[name]
                    if fill:
                        conn.execute(attempts.update().where(key).values(**fill))
                    return
            except _Conflict as e:
                error = e
        raise StoreError(f"cannot record attempt {a.attempt} of task {a.task_id}: {error}")

    def lease_tasks(self, grants: Sequence[tuple[AttemptRecord, float]]) -> None:
        """For each ``(attempt, lease_expires_at)``: its task held under the attempt's
        lease (:meth:`update_task`) and the attempt recorded as started
        (:meth:`start_attempt`), as one executemany each in the usual case. KeyError for
        an unknown task when one is given (StoreError for one of several)."""
        if not grants:
            return
        now = time.time()
        holds = [
            {
                **rows.task_fields_to_values(
                    {
                        "status": TaskStatus.ASSIGNED,
                        "attempt": a.attempt,
                        "lease_id": a.lease_id,
                        "agent_id": a.agent_id,
                        "lease_expires_at": expires_at,
                    }
                ),
                "updated_at": now,
                "b_task_id": a.task_id,
            }
            for a, expires_at in grants
        ]
        with self._tx(write=True) as conn:
            if conn.execute(_HOLD, holds).rowcount != len(holds):
                if len(grants) == 1:
                    raise KeyError(grants[0][0].task_id)
                raise StoreError(f"one of {len(grants)} tasks to lease is not in the store")
            started = conn.execute(_NEW_ATTEMPT, [rows.attempt_to_row(a) for a, _ in grants])
        if started.rowcount != len(grants):  # some were recorded before: one at a time
            for a, _ in grants:
                self.start_attempt(a)

    def end_attempts(self, ends: Sequence[tuple[str, int, float, str, str]]) -> None:
        """:meth:`end_attempt` of each ``(task_id, attempt, ended_at, outcome, reason)``,
        as one executemany in the usual case (every attempt's row exists)."""
        if not ends:
            return
        values = [
            {
                "ended_at": rows.finite_or_none(ended_at),
                "outcome": rows.check_outcome(outcome),
                "reason": reason,
                "b_task_id": task_id,
                "b_attempt": attempt,
            }
            for task_id, attempt, ended_at, outcome, reason in ends
        ]
        with self._tx(write=True) as conn:
            done = conn.execute(_END_ATTEMPT, values).rowcount
        if done != len(values):  # some attempts have no row yet: one at a time
            for end in ends:
                self.end_attempt(*end)

    def end_attempt(
        self, task_id: str, attempt: int, ended_at: float, outcome: str, reason: str = ""
    ) -> None:
        """Record how an attempt ended (overwriting an earlier end, e.g. lost -> refused).

        An attempt never started in this store (restored from before attempt rows
        existed) gets a row with start time 0 (unknown), and the task's lease and agent
        when the task is still at that attempt. ValueError for an unknown outcome;
        StoreError for an unknown task.
        """
        values = {
            "ended_at": rows.finite_or_none(ended_at),
            "outcome": rows.check_outcome(outcome),
            "reason": reason,
        }
        key = self._attempt_key(task_id, attempt)
        error: StoreError | None = None
        for _ in range(2):  # a second round only after losing an insert race
            try:
                with self._tx(write=True) as conn:
                    if conn.execute(attempts.update().where(key).values(**values)).rowcount:
                        return
                    task = self._require_task(conn, task_id)
                    current = task["attempt"] == attempt
                    conn.execute(
                        attempts.insert().values(
                            task_id=task_id,
                            attempt=attempt,
                            lease_id=(task["lease_id"] or "") if current else "",
                            agent_id=(task["agent_id"] or "") if current else "",
                            started_at=0.0,
                            **values,
                        )
                    )
                    return
            except _Conflict as e:
                error = e
        raise StoreError(f"cannot end attempt {attempt} of task {task_id}: {error}")

    def attempts_for_task(self, task_id: str) -> list[AttemptRecord]:
        """Every attempt of a task, by attempt number."""
        stmt = sa.select(attempts).where(attempts.c.task_id == task_id).order_by(attempts.c.attempt)
        with self._tx() as conn:
            return [rows.row_to_attempt(r) for r in conn.execute(stmt).mappings()]

    def attempts_for_campaign(self, campaign_id: str) -> list[AttemptRecord]:
        """Every attempt of the campaign's tasks: by task creation order, then attempt."""
        stmt = (
            sa.select(attempts)
            .join_from(attempts, tasks, attempts.c.task_id == tasks.c.task_id)
            .where(tasks.c.campaign_id == campaign_id)
            .order_by(tasks.c.created_at, tasks.c.seq, attempts.c.attempt)
        )
        with self._tx() as conn:
            return [rows.row_to_attempt(r) for r in conn.execute(stmt).mappings()]

    @staticmethod
    def _attempt_key(task_id: str, attempt: int) -> sa.ColumnElement[bool]:
        return sa.and_(attempts.c.task_id == task_id, attempts.c.attempt == attempt)

    @staticmethod
    def _require_task(conn: Connection, task_id: str) -> sa.RowMapping:
        stmt = sa.select(tasks.c.attempt, tasks.c.lease_id, tasks.c.agent_id).where(
            tasks.c.task_id == task_id
        )
        task = conn.execute(stmt).mappings().first()
        if task is None:
            raise StoreError(f"no task {task_id} in the results store")
        return task

    # ---------------------------------------------------------------------- artifacts

    def record_artifact(self, a: ArtifactRecord) -> None:
        """Store an artifact; a key already stored is left unchanged."""
        try:
            with self._tx(write=True) as conn:
                exists = conn.execute(
                    sa.select(artifacts.c.key).where(artifacts.c.key == a.key)
                ).first()
                if exists is None:
                    conn.execute(artifacts.insert().values(**rows.artifact_to_row(a)))
        except _Conflict:
            pass  # stored concurrently by someone else: same key, same artifact

    def find_artifact(self, key: str) -> ArtifactRecord | None:
        """The artifact stored under ``key``, or None."""
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(artifacts).where(artifacts.c.key == key)).mappings().first()
            )
        return None if row is None else rows.row_to_artifact(row)

    def logit_checks(self, sha256s: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The logit check (provenance ``logit_check``: the conversion's maximum absolute
        logit difference from its source checkpoint) of each artifact that has one."""
        wanted = sorted(set(sha256s))
        out: dict[str, dict[str, Any]] = {}
        with self._tx() as conn:
            for start in range(0, len(wanted), 500):
                stmt = sa.select(artifacts).where(
                    artifacts.c.sha256.in_(wanted[start : start + 500])
                )
                for row in conn.execute(stmt).mappings():
                    check = rows.row_to_artifact(row).provenance.get("logit_check")
                    if isinstance(check, dict):
                        out[row["sha256"]] = check
        return out

    def list_artifacts(self) -> list[ArtifactRecord]:
        """Every artifact, oldest first."""
        stmt = sa.select(artifacts).order_by(artifacts.c.created_at, artifacts.c.key)
        with self._tx() as conn:
            return [rows.row_to_artifact(r) for r in conn.execute(stmt).mappings()]

    # ------------------------------------------------------------------------ devices

    def upsert_device_seen(self, d: DeviceSeen) -> None:
        """Insert or replace the sighting of agent ``d.agent_id``."""
        values = rows.device_to_row(d)
        for _ in range(2):  # a second round only after losing an insert race
            try:
                with self._tx(write=True) as conn:
                    self._update_or_insert(conn, values)
                return
            except _Conflict:
                continue
        raise StoreError(f"cannot record agent {d.agent_id}: concurrent updates")

    @staticmethod
    def _update_or_insert(conn: Connection, values: Mapping[str, Any]) -> None:
        key = devices_seen.c.agent_id == values["agent_id"]
        if not conn.execute(devices_seen.update().where(key).values(**values)).rowcount:
            conn.execute(devices_seen.insert().values(**values))

    def touch_device(self, agent_id: str, at: float) -> None:
        """Record a heartbeat of a known agent (an unknown agent is ignored)."""
        self.touch_devices({agent_id: at})

    def touch_devices(self, beats: Mapping[str, float]) -> None:
        """Record the latest heartbeat of many agents in one statement (unknown agents
        are ignored)."""
        if not beats:
            return
        stmt = (
            devices_seen.update()
            .where(devices_seen.c.agent_id == sa.bindparam("b_agent_id"))
            .values(last_heartbeat=sa.bindparam("b_at"))
        )
        with self._tx(write=True) as conn:
            conn.execute(stmt, [{"b_agent_id": a, "b_at": at} for a, at in beats.items()])

    def list_devices_seen(self) -> list[DeviceSeen]:
        """Every agent sighting, by device id then agent id."""
        stmt = sa.select(devices_seen).order_by(devices_seen.c.device_id, devices_seen.c.agent_id)
        with self._tx() as conn:
            return [rows.row_to_device(r) for r in conn.execute(stmt).mappings()]

    # ---------------------------------------------------------------------- identities

    def enrol_agent(self, identity: AgentIdentity) -> bool:
        """Record a newly enrolled agent; False if the id is enrolled already (a race)."""
        try:
            with self._tx(write=True) as conn:
                conn.execute(agent_credentials.insert().values(**dataclasses.asdict(identity)))
        except _Conflict:
            return False
        return True

    def agent_identity(self, agent_id: str) -> AgentIdentity | None:
        """The enrolment of ``agent_id``, if it ever enrolled."""
        stmt = sa.select(agent_credentials).where(agent_credentials.c.agent_id == agent_id)
        with self._tx() as conn:
            row = conn.execute(stmt).mappings().first()
        return AgentIdentity(**row) if row is not None else None

    def agent_identities(self) -> list[AgentIdentity]:
        """Every enrolled agent, by agent id."""
        stmt = sa.select(agent_credentials).order_by(agent_credentials.c.agent_id)
        with self._tx() as conn:
            return [AgentIdentity(**row) for row in conn.execute(stmt).mappings()]

    def revoke_agent(self, agent_id: str, at: float) -> bool:
        """Revoke an enrolled agent's credential; False if it never enrolled."""
        with self._tx(write=True) as conn:
            updated = conn.execute(
                agent_credentials.update()
                .where(agent_credentials.c.agent_id == agent_id)
                .values(revoked_at=sa.func.coalesce(agent_credentials.c.revoked_at, at))
            )
        return bool(updated.rowcount)

    # ------------------------------------------------------------------------ nightly

    def create_nightly_run(self, n: NightlyRun) -> None:
        """Store a new nightly run (StoreError if its id exists)."""
        try:
            with self._tx(write=True) as conn:
                conn.execute(nightly_runs.insert().values(**rows.nightly_to_row(n)))
        except _Conflict as e:
            raise StoreError(f"cannot store nightly run {n.run_id}: {e}") from e

    def update_nightly_run(self, run_id: str, **fields: object) -> None:
        """Set fields of a nightly run; KeyError for an unknown run."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(NightlyRun)}
        if unknown:
            raise ValueError(f"not NightlyRun fields: {', '.join(sorted(unknown))}")
        with self._tx(write=True) as conn:
            done = conn.execute(
                nightly_runs.update().where(nightly_runs.c.run_id == run_id).values(**fields)
            )
            if not done.rowcount:
                raise KeyError(run_id)

    def get_nightly_run(self, run_id: str) -> NightlyRun | None:
        """One nightly run by id (or unique prefix), or None."""
        prefix = nightly_runs.c.run_id.startswith(run_id, autoescape=True)
        stmt = sa.select(nightly_runs).where(prefix)
        with self._tx() as conn:
            found = [rows.row_to_nightly(r) for r in conn.execute(stmt.limit(2)).mappings()]
        return found[0] if len(found) == 1 else None

    def nightly_runs(self, suite: str, limit: int | None = None) -> list[NightlyRun]:
        """The suite's nightly runs, oldest first (the last ``limit`` when given)."""
        stmt = (
            sa.select(nightly_runs)
            .where(nightly_runs.c.suite == suite)
            .order_by(nightly_runs.c.created_at.desc(), nightly_runs.c.run_id.desc())
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._tx() as conn:
            found = [rows.row_to_nightly(r) for r in conn.execute(stmt).mappings()]
        return found[::-1]

    # ------------------------------------------------------------------ series nights

    @gc_paused()
    def put_series_night(self, run_id: str, suite: str, samples: Mapping[SeriesKey, Sample]) -> int:
        """Store a night's per-series summaries (``series_nights``, and their numbers
        packed in ``series_night_packs``), replacing any stored for ``run_id``
        (idempotent when a night is judged again). Returns the row count."""
        values = rows.series_night_rows(suite, samples)
        if any(v[0] != run_id for v in values):
            raise ValueError(f"samples of another run given for nightly run {run_id}")
        pack = rows.series_night_pack(
            run_id,
            np.fromiter((v[7] for v in values), dtype=np.int64, count=len(values)),
            np.fromiter((v[9] for v in values), dtype=np.float64, count=len(values)),
        )
        with self._tx(write=True) as conn:
            conn.execute(series_nights.delete().where(series_nights.c.run_id == run_id))
            conn.execute(series_night_packs.delete().where(series_night_packs.c.run_id == run_id))
            if values:
                insert_tuples(conn, series_nights, rows.SERIES_NIGHT_COLUMNS, values)
                conn.execute(series_night_packs.insert(), pack)
        return len(values)

    def series_night_values(self, run_ids: Iterable[str]) -> dict[str, SeriesValues]:
        """Per stored run: its series fingerprints (ascending) and night values, as numpy
        arrays (:func:`results.rows.series_fingerprint`). Runs with no summaries stored
        are left out. Reads one packed row a night; a night whose pack is missing or
        damaged (with a warning) is read from its summary rows instead."""
        wanted = list(dict.fromkeys(run_ids))
        out: dict[str, SeriesValues] = {}
        packs = sa.select(series_night_packs).where(
            series_night_packs.c.run_id.in_(sa.bindparam("ids", expanding=True))
        )
        by_rows = (
            sa.select(series_nights.c.series, series_nights.c.value)
            .where(series_nights.c.run_id == sa.bindparam("run_id"))
            .order_by(series_nights.c.series)
        )
        with self._tx() as conn:
            for start in range(0, len(wanted), 100):
                ids = wanted[start : start + 100]
                for r in conn.execute(packs, {"ids": ids}).mappings():
                    try:
                        out[r["run_id"]] = SeriesValues(*rows.series_night_unpack(r))
                    except ValueError as e:
                        logger.warning("reading its summary rows instead: %s", e)
            for run_id in wanted:
                if run_id in out:
                    continue
                result = conn.execute(by_rows, {"run_id": run_id})
                # Plain numbers: the driver's tuples, without a Row object each.
                found = result.cursor.fetchall() if result.cursor is not None else []
                result.close()
                if found:
                    out[run_id] = _series_values(run_id, found)
        return {run_id: out[run_id] for run_id in wanted if run_id in out}

    @gc_paused()
    def series_night(self, run_id: str) -> dict[SeriesKey, Sample]:
        """A stored night's full per-series samples (trials, outcomes, method) from
        ``series_nights``; a row that is not a valid summary is skipped with a warning."""
        stmt = sa.select(series_nights).where(series_nights.c.run_id == run_id)
        out: dict[SeriesKey, Sample] = {}
        with self._tx() as conn:
            for r in conn.execute(stmt).mappings():
                try:
                    key, sample = rows.series_night_from_row(r)
                except (ValueError, KeyError, TypeError) as e:
                    logger.warning("skipping a series_nights row: %s", e)
                    continue
                out[key] = sample
        return out

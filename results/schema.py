"""Tables of the results store (SQLAlchemy Core) and their versioned migrations.

Only portable column types are used, so any SQLAlchemy URL works: JSON is stored as
text (:class:`JSONText`), floats as ``Float`` (:class:`FiniteFloat`), byte counts as
``BigInteger``, times as unix seconds. Non-finite floats (NaN, +-inf) are stored as NULL
and read back as ``None``, both in float columns and inside JSON values.

Versioning: ``meta.schema_version`` holds the version a store is at. :data:`MIGRATIONS`
is ordered; ``MIGRATIONS[i]`` upgrades a store from version ``i`` to ``i + 1``, so a
fresh store (version 0) runs all of them and ``SCHEMA_VERSION == len(MIGRATIONS)``.
The table objects below always describe the *current* schema. Step 1 builds whatever
tables are missing from them, so a later step must tolerate finding its change already
in place on a fresh store (check with :func:`has_column`). To add v2: change the tables
here, append ``_v2_...`` to :data:`MIGRATIONS`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from edgefarm.errors import SchemaVersionError
from results import samples_codec

metadata = sa.MetaData()


def scrub_non_finite(value: Any) -> Any:
    """A copy of ``value`` with NaN / +-inf floats (at any depth) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): scrub_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_non_finite(v) for v in value]
    return value


_JSON_CHUNK = 2048  # list items encoded per call: ~2 ms of the GIL for floats


def encode_json(value: Any) -> str:
    """Compact JSON; a long list is encoded in pieces, so that storing millions of
    samples on a writer thread never holds the GIL long enough to stall the event loop."""
    dumps = functools.partial(json.dumps, allow_nan=False, separators=(",", ":"))
    if not isinstance(value, list) or len(value) <= _JSON_CHUNK:
        return dumps(value)
    pieces = [dumps(value[i : i + _JSON_CHUNK]) for i in range(0, len(value), _JSON_CHUNK)]
    pieces[0], pieces[-1] = pieces[0][:-1], pieces[-1][1:]  # one list: "[a,b" ... "y,z]"
    for i in range(1, len(pieces) - 1):
        pieces[i] = pieces[i][1:-1]
    return ",".join(pieces)


class JSONText(sa.types.TypeDecorator[Any]):
    """A JSON value stored as text; non-finite floats inside become ``null``."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        """Encode to compact JSON text (``None`` stays SQL NULL)."""
        if value is None:
            return None
        try:  # non-finite floats are rare: scrub (slow, element by element) only then
            return encode_json(value)
        except ValueError:
            return encode_json(scrub_non_finite(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Decode JSON text."""
        return None if value is None else json.loads(value)


class FiniteFloat(sa.types.TypeDecorator[float]):
    """A float column where NaN and +-inf are stored as NULL."""

    impl = sa.Float
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> float | None:
        """Map non-finite values to NULL."""
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def process_result_value(self, value: Any, dialect: Dialect) -> float | None:
        """Return a plain float (or ``None``)."""
        return None if value is None else float(value)


def _id() -> sa.String:
    return sa.String(128)


meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("campaign_id", _id(), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("spec_yaml", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("finished_at", sa.Float),
    sa.Column("conversions_run", sa.Integer, nullable=False, default=0),
    sa.Column("conversions_cached", sa.Integer, nullable=False, default=0),
    # The client's id for its submission: a re-sent submission attaches to its campaign.
    sa.Column("submission_id", sa.String(64), index=True),
    # What preparation needs to run again after a restart (devices, files, shape).
    sa.Column("plan", JSONText),
    sa.Column("error", sa.Text),  # why a campaign failed before any task existed
)

tasks = sa.Table(
    "tasks",
    metadata,
    # Insertion sequence: "creation order" is (created_at, seq).
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", _id(), nullable=False, unique=True),
    sa.Column(
        "campaign_id",
        _id(),
        sa.ForeignKey("campaigns.campaign_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("scheme", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(256), nullable=False),
    sa.Column("device_name", sa.String(256), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("artifact_size", sa.BigInteger, nullable=False),
    sa.Column("artifact_name", sa.String(512), nullable=False),
    sa.Column("eval_sha256", sa.String(64)),
    sa.Column("eval_size", sa.BigInteger, nullable=False),
    sa.Column("settings", JSONText, nullable=False),
    sa.Column("options", JSONText, nullable=False),
    sa.Column("selector", JSONText, nullable=False),
    sa.Column("measure_key", sa.String(128), nullable=False, index=True),
    # Nightly runs: "candidate" (tonight's variant) or "baseline" (the baseline night's
    # variant measured again beside it), and the randomised block it belongs to.
    sa.Column("role", sa.String(16), nullable=False, default="candidate"),
    sa.Column("block", sa.Integer, nullable=False, default=0),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("lease_id", sa.String(128)),
    sa.Column("agent_id", sa.String(128)),
    sa.Column("lease_expires_at", sa.Float),
    # The results row answering this task (no FK: results.task_id already points here).
    sa.Column("result_id", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("result_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", _id(), sa.ForeignKey("tasks.task_id"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("campaign_id", _id(), nullable=False, index=True),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("backend", sa.String(64), nullable=False, index=True),
    sa.Column("backend_version", sa.String(128), nullable=False),
    sa.Column("scheme", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(256), nullable=False, index=True),
    sa.Column("device_name", sa.String(256), nullable=False, index=True),
    sa.Column("agent_id", sa.String(128), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("eval_sha256", sa.String(64)),
    sa.Column("measure_key", sa.String(128), nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False, default="candidate"),
    sa.Column("block", sa.Integer, nullable=False, default=0),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("valid", sa.Boolean, nullable=False),
    sa.Column("invalid_reason", sa.Text, nullable=False),
    sa.Column("error_kind", sa.String(64), nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("settings", JSONText, nullable=False),
    sa.Column("trials", sa.Integer, nullable=False),
    # Since v8 always ``[]``: the raw samples live in ``result_samples`` (compressed,
    # one row per trial), so a row stays small; reads attach them only when asked.
    sa.Column("samples_ms", JSONText, nullable=False),
    sa.Column("trial_medians_ms", JSONText, nullable=False),
    sa.Column("lat_mean_ms", FiniteFloat),
    sa.Column("lat_p50_ms", FiniteFloat),
    sa.Column("lat_p90_ms", FiniteFloat),
    sa.Column("lat_p99_ms", FiniteFloat),
    sa.Column("lat_stdev_ms", FiniteFloat),
    sa.Column("lat_cv", FiniteFloat),
    sa.Column("lat_min_ms", FiniteFloat),
    sa.Column("lat_max_ms", FiniteFloat),
    sa.Column("throughput_per_s", FiniteFloat),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("peak_rss_bytes", sa.BigInteger, nullable=False),
    sa.Column("load_rss_delta_bytes", sa.BigInteger, nullable=False),
    sa.Column("load_time_s", FiniteFloat),
    sa.Column("model_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("accuracy", JSONText, nullable=False),
    sa.Column("metrics", JSONText),
    sa.Column("environment", JSONText, nullable=False),
    sa.Column("trials_detail", JSONText, nullable=False),
    sa.Column("example_outcomes", JSONText),
    # Serving results: per load level, its figures and raw per-request samples
    # (results.rows.serving_levels); NULL for other results.
    sa.Column("serving", JSONText),
    # When the agent started / ended measuring (unix seconds, agent clock; NULL: unknown).
    sa.Column("measure_started_at", FiniteFloat),
    sa.Column("measure_ended_at", FiniteFloat),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("task_id", "attempt", name="uq_results_task_attempt"),
)

# The raw latency samples of a result, one row per trial, in trial order; ``data`` is
# ``count`` samples packed by :mod:`results.samples_codec` (``encoding`` names how).
result_samples = sa.Table(
    "result_samples",
    metadata,
    sa.Column(
        "result_id",
        sa.Integer,
        sa.ForeignKey("results.result_id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("trial", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("encoding", sa.String(32), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("name", sa.String(512), nullable=False),
    sa.Column("provenance", JSONText, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

nightly_runs = sa.Table(
    "nightly_runs",
    metadata,
    sa.Column("run_id", _id(), primary_key=True),
    sa.Column("suite", sa.String(256), nullable=False, index=True),
    sa.Column("night", sa.String(64), nullable=False),
    sa.Column("campaign_id", _id()),
    sa.Column("confirm_campaign_id", _id()),
    sa.Column("baseline_run_id", _id()),
    # running | passed | regressed | failed
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("finished_at", sa.Float),
    # The night's verdicts and notes (JSON), as the report shows them.
    sa.Column("summary", JSONText, nullable=False),
)

# One row per nightly run and series (model x backend x scheme x device x metric): the
# night's Sample of the series (results.regression.types.Sample), appended when the night
# is judged, so a suite's history is read from here instead of every night's result rows.
# ``series`` is a 64-bit fingerprint of the series key (results.rows.series_fingerprint):
# the history query reads numbers only. ``trials`` are float64 little-endian bytes,
# ``outcomes`` a string of 0/1 (eval-set order).
series_nights = sa.Table(
    "series_nights",
    metadata,
    sa.Column("run_id", _id(), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("backend", sa.String(64), primary_key=True),
    sa.Column("scheme", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(256), primary_key=True),
    sa.Column("metric", sa.String(64), primary_key=True),
    sa.Column("suite", sa.String(256), nullable=False),
    sa.Column("series", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("trials", sa.LargeBinary, nullable=False),
    sa.Column("outcomes", sa.Text, nullable=False),
    sa.Column("method", sa.String(256), nullable=False),
    # A suite's history (its last nights, by run id) from the index alone: numbers only.
    sa.Index("ix_series_nights_history", "run_id", "series", "value"),
)

# One row per night in ``series_nights``: the same fingerprints (ascending) and values
# packed as little-endian int64 / float64 bytes, so a 60-night history of tens of
# thousands of series is 60 reads, not millions of rows.
series_night_packs = sa.Table(
    "series_night_packs",
    metadata,
    sa.Column("run_id", _id(), primary_key=True),
    sa.Column("series_count", sa.Integer, nullable=False),
    sa.Column("series", sa.LargeBinary, nullable=False),
    sa.Column("night_values", sa.LargeBinary, nullable=False),
)

devices_seen = sa.Table(
    "devices_seen",
    metadata,
    sa.Column("agent_id", sa.String(128), primary_key=True),
    sa.Column("agent_name", sa.String(256), nullable=False),
    sa.Column("device_id", sa.String(256), nullable=False, index=True),
    sa.Column("capabilities", JSONText, nullable=False),
    sa.Column("labels", JSONText, nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
)

# One row per enrolled agent identity: the sha256 of the credential it was issued
# (the credential itself is never stored), the client certificate bound at enrolment
# under mutual TLS, and when it was revoked.
agent_credentials = sa.Table(
    "agent_credentials",
    metadata,
    sa.Column("agent_id", sa.String(128), primary_key=True),
    sa.Column("agent_name", sa.String(256), nullable=False),
    sa.Column("device_id", sa.String(256), nullable=False, index=True),
    sa.Column("credential_sha256", sa.String(64), nullable=False),
    sa.Column("cert_sha256", sa.String(64)),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

# One row per attempt of a task: who held the lease, when, and how it ended
# (outcomes: :data:`results.records.ATTEMPT_OUTCOMES`). Campaign lookups join tasks.
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("task_id", _id(), sa.ForeignKey("tasks.task_id"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("lease_id", sa.String(128), nullable=False),
    sa.Column("agent_id", sa.String(128), nullable=False, index=True),
    sa.Column("started_at", sa.Float, nullable=False),  # coordinator clock; 0: unknown
    sa.Column("ended_at", sa.Float),
    sa.Column("outcome", sa.String(32), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False),
)


# --------------------------------------------------------------------------- migrations

Migration = Callable[[Connection], None]


def _v1_create_tables(conn: Connection) -> None:
    """v0 -> v1: create every table (and index) that does not exist yet."""
    metadata.create_all(conn, checkfirst=True)


def _v2_add_metrics(conn: Connection) -> None:
    """v1 -> v2: results.metrics (backend-specific figures such as prompt tok/s, TTFT)."""
    if not has_column(conn, "results", "metrics"):
        conn.execute(sa.text("ALTER TABLE results ADD COLUMN metrics TEXT"))


def _v3_nightly(conn: Connection) -> None:
    """v2 -> v3: task/result roles and blocks, per-example outcomes, nightly runs."""
    for table in ("tasks", "results"):
        if not has_column(conn, table, "role"):
            conn.execute(
                sa.text(
                    f"ALTER TABLE {table} ADD COLUMN role VARCHAR(16) NOT NULL DEFAULT 'candidate'"
                )
            )
        if not has_column(conn, table, "block"):
            conn.execute(
                sa.text(f"ALTER TABLE {table} ADD COLUMN block INTEGER NOT NULL DEFAULT 0")
            )
    if not has_column(conn, "results", "example_outcomes"):
        conn.execute(sa.text("ALTER TABLE results ADD COLUMN example_outcomes TEXT"))
    nightly_runs.create(conn, checkfirst=True)


def _v4_agent_credentials(conn: Connection) -> None:
    """v3 -> v4: agent identities issued at enrolment (and their revocation)."""
    agent_credentials.create(conn, checkfirst=True)


def _v5_campaign_plan(conn: Connection) -> None:
    """v4 -> v5: campaigns are stored before preparation, with what it needs to resume."""
    if not has_column(conn, "campaigns", "submission_id"):
        conn.execute(sa.text("ALTER TABLE campaigns ADD COLUMN submission_id VARCHAR(64)"))
        conn.execute(
            sa.text("CREATE INDEX ix_campaigns_submission_id ON campaigns (submission_id)")
        )
    for column in ("plan", "error"):
        if not has_column(conn, "campaigns", column):
            conn.execute(sa.text(f"ALTER TABLE campaigns ADD COLUMN {column} TEXT"))


def _v6_attempts(conn: Connection) -> None:
    """v5 -> v6: a row per task attempt; results carry measurement start / end times."""
    attempts.create(conn, checkfirst=True)
    for column in ("measure_started_at", "measure_ended_at"):
        if not has_column(conn, "results", column):
            conn.execute(sa.text(f"ALTER TABLE results ADD COLUMN {column} FLOAT"))


def _v7_serving(conn: Connection) -> None:
    """v6 -> v7: results.serving (load levels of serving measurements)."""
    if not has_column(conn, "results", "serving"):
        conn.execute(sa.text("ALTER TABLE results ADD COLUMN serving TEXT"))


_MOVE_BATCH = 16  # result rows per step of the v8 move (each may hold MBs of JSON)


def _v8_result_samples(conn: Connection) -> None:
    """v7 -> v8: raw samples move from ``results.samples_ms`` (JSON) into
    ``result_samples`` (compressed, one row per trial, split by ``trials_detail``);
    results get indexes on model, backend and device name. Rows move a few at a time,
    so memory stays flat whatever the store's size."""
    result_samples.create(conn, checkfirst=True)
    for index in results.indexes:
        index.create(conn, checkfirst=True)
    last = 0
    while True:
        batch = conn.execute(
            sa.select(results.c.result_id, results.c.samples_ms, results.c.trials_detail)
            .where(results.c.result_id > last)
            .order_by(results.c.result_id)
            .limit(_MOVE_BATCH)
        ).all()
        if not batch:
            return
        for result_id, samples, details in batch:
            if samples:
                conn.execute(result_samples.insert(), sample_rows(result_id, samples, details))
                conn.execute(
                    results.update().where(results.c.result_id == result_id).values(samples_ms=[])
                )
        last = batch[-1][0]


def sample_rows(
    result_id: int, samples: list[float], details: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """``result_samples`` rows for a result's flat samples, split per trial by the
    trials' ``iterations`` (all in one row when they do not add up)."""
    counts = [int(d.get("iterations") or 0) for d in details or []]
    if sum(counts) != len(samples):
        counts = [len(samples)]
    out, offset = [], 0
    for trial, count in enumerate(counts):
        if count:
            encoding, data = samples_codec.encode(samples[offset : offset + count])
            out.append(
                {"result_id": result_id, "trial": trial, "count": count,
                 "encoding": encoding, "data": data}
            )  # fmt: skip
        offset += count
    return out


def _v9_series_nights(conn: Connection) -> None:
    """v8 -> v9: per-night series summaries (``series_nights``), backfilled from the
    finished nightly runs' result rows one night at a time (memory stays at one night)."""
    # Lazy imports: the regression code sits above the schema.
    from results.regression.collect import series_samples
    from results.rows import SERIES_NIGHT_COLUMNS, decode_result_row, series_night_rows

    series_nights.create(conn, checkfirst=True)
    nights = conn.execute(
        sa.select(
            nightly_runs.c.run_id,
            nightly_runs.c.suite,
            nightly_runs.c.campaign_id,
            nightly_runs.c.created_at,
        )
        .where(nightly_runs.c.campaign_id.is_not(None), nightly_runs.c.finished_at.is_not(None))
        .order_by(nightly_runs.c.created_at, nightly_runs.c.run_id)
    ).all()
    for run_id, suite, campaign_id, created_at in nights:
        done = conn.execute(
            sa.select(series_nights.c.run_id).where(series_nights.c.run_id == run_id).limit(1)
        ).first()
        if done is not None:
            continue
        stmt = (
            sa.select(results)
            .join_from(tasks, results, tasks.c.result_id == results.c.result_id)
            .where(tasks.c.campaign_id == campaign_id)
            .order_by(tasks.c.created_at, tasks.c.seq)
        )
        rows = [decode_result_row(r) for r in conn.execute(stmt).mappings()]
        found = series_samples(rows, run_id, created_at)
        del rows
        insert_tuples(conn, series_nights, SERIES_NIGHT_COLUMNS, series_night_rows(suite, found))


def _v10_series_night_packs(conn: Connection) -> None:
    """v9 -> v10: ``series_night_packs``, packed from ``series_nights`` a night at a
    time (damaged summary rows are left out, as reading them does)."""
    from results.rows import series_night_pack, series_value_arrays

    series_night_packs.create(conn, checkfirst=True)
    packed = set(conn.execute(sa.select(series_night_packs.c.run_id)).scalars())
    for run_id in conn.execute(sa.select(series_nights.c.run_id).distinct()).scalars().all():
        if run_id in packed:
            continue
        found = conn.execute(
            sa.select(series_nights.c.series, series_nights.c.value)
            .where(series_nights.c.run_id == run_id)
            .order_by(series_nights.c.series)
        ).all()
        series, values, _ = series_value_arrays([tuple(r) for r in found])
        conn.execute(series_night_packs.insert(), series_night_pack(run_id, series, values))


MIGRATIONS: list[Migration] = [
    _v1_create_tables,
    _v2_add_metrics,
    _v3_nightly,
    _v4_agent_credentials,
    _v5_campaign_plan,
    _v6_attempts,
    _v7_serving,
    _v8_result_samples,
    _v9_series_nights,
    _v10_series_night_packs,
]
SCHEMA_VERSION = len(MIGRATIONS)


def insert_tuples(
    conn: Connection, table: sa.Table, columns: Sequence[str], values: Sequence[tuple[Any, ...]]
) -> None:
    """Insert many rows given as tuples in ``columns`` order with one driver executemany,
    without per-row parameter processing: only for plain values (numbers, str, bytes)."""
    if not values:
        return
    mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}[conn.dialect.paramstyle]
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    marks = ", ".join([mark] * len(columns))
    conn.exec_driver_sql(f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})", values)


def has_column(conn: Connection, table: str, column: str) -> bool:
    """Whether ``table`` already has ``column`` (for idempotent migration steps)."""
    return any(c["name"] == column for c in sa.inspect(conn).get_columns(table))


def read_schema_version(conn: Connection) -> int:
    """The store's schema version; 0 for an empty database."""
    if not sa.inspect(conn).has_table(meta.name):
        return 0
    value = conn.execute(
        sa.select(meta.c.value).where(meta.c.key == "schema_version")
    ).scalar_one_or_none()
    return int(value) if value is not None else 0


def _write_schema_version(conn: Connection, version: int) -> None:
    updated = conn.execute(
        meta.update().where(meta.c.key == "schema_version").values(value=str(version))
    )
    if not updated.rowcount:
        conn.execute(meta.insert().values(key="schema_version", value=str(version)))


def migrate(conn: Connection) -> int:
    """Bring the store to :data:`SCHEMA_VERSION` inside the caller's transaction.

    Returns the version found before migrating. Raises :class:`SchemaVersionError`
    for a store written by a newer edgefarm.
    """
    found = read_schema_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the results store has schema version {found}, newer than this edgefarm "
            f"understands ({SCHEMA_VERSION}): upgrade edgefarm to use it"
        )
    for version in range(found, SCHEMA_VERSION):
        MIGRATIONS[version](conn)
        _write_schema_version(conn, version + 1)
    return found

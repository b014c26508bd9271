"""The results store against a real SQLite file (and PostgreSQL when one is configured).

Every test taking the ``store`` / ``store_url`` fixture runs once per backend: SQLite in
``tmp_path`` always, PostgreSQL only when ``EDGEFARM_TEST_POSTGRES_URL`` names a
throwaway database (its edgefarm tables are dropped before and after each test).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgefarm.domain import (
    CampaignStatus,
    LatencySummary,
    MeasurementResult,
    MeasureSettings,
    TaskStatus,
    TrialOutcome,
)
from edgefarm.errors import SchemaVersionError, StoreError, UsageError
from edgefarm.home import default_store_url
from results import schema
from results.records import ArtifactRecord, CampaignRecord, DeviceSeen, NightlyRun, TaskRecord
from results.store import ResultsStore

PG_ENV = "EDGEFARM_TEST_POSTGRES_URL"
SETTINGS = MeasureSettings(min_iterations=5, trials=2, threads=2)


# ------------------------------------------------------------------------------ fixtures


def _drop_all(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            schema.metadata.drop_all(conn)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/home/results.sqlite"
        return
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL store tests need {PG_ENV} (a throwaway database URL)")
    _drop_all(url)
    yield url
    _drop_all(url)


@pytest.fixture
def store(store_url: str) -> Iterator[ResultsStore]:
    """An open store on each backend."""
    with ResultsStore.open(store_url) as s:
        yield s


# ------------------------------------------------------------------------------- helpers


def make_campaign(
    cid: str = "c0ffee00-aaaa", created_at: float = 1000.0, name: str = "sweep"
) -> CampaignRecord:
    return CampaignRecord(
        campaign_id=cid,
        name=name,
        spec_yaml="name: sweep\nmodels: [tiny]\n",
        status=CampaignStatus.RUNNING,
        created_at=created_at,
    )


def make_task(
    tid: str, cid: str = "c0ffee00-aaaa", measure_key: str = "mk-1", **kw: Any
) -> TaskRecord:
    fields: dict[str, Any] = {
        "task_id": tid,
        "campaign_id": cid,
        "model": "tiny-cnn",
        "backend": "onnxruntime",
        "scheme": "int8",
        "device_id": "dev-pi5",
        "device_name": "pi5-lab",
        "artifact_sha256": "a" * 64,
        "artifact_size": 12_345,
        "artifact_name": "tiny-int8.onnx",
        "eval_sha256": None,
        "eval_size": 0,
        "settings": SETTINGS,
        "options": {"graph_opt": "all"},
        "selector": {"arch": "aarch64"},
        "measure_key": measure_key,
        "created_at": 2000.0,
        "updated_at": 2000.0,
    }
    fields.update(kw)
    return TaskRecord(**fields)


def make_trial(
    samples: list[float], valid: bool = True, reason: str = "", **kw: Any
) -> TrialOutcome:
    fields: dict[str, Any] = {
        "samples_ms": samples,
        "warmup_iterations": 3,
        "duration_s": 1.5,
        "load_time_s": 0.25,
        "peak_rss_bytes": 50_000_000,
        "load_rss_delta_bytes": 8_000_000,
        "valid": valid,
        "invalid_reason": reason,
    }
    fields.update(kw)
    return TrialOutcome(**fields)


def make_result(
    task: TaskRecord, attempt: int = 1, ok: bool = True, **kw: Any
) -> MeasurementResult:
    fields: dict[str, Any] = {
        "task_id": task.task_id,
        "attempt": attempt,
        "lease_id": f"lease-{attempt}",
        "agent_id": "agent-1",
        "device_id": task.device_id,
        "ok": ok,
        "backend_version": "1.20.0",
        "trials": [make_trial([2.0, 4.0, 3.0]), make_trial([5.0, 1.0, 3.0])] if ok else [],
        "accuracy": {"top1": 0.75} if ok else {},
        "model_size_bytes": 12_345,
        "environment": {"os": "Linux", "arch": "aarch64", "kernel": "6.6"},
    }
    fields.update(kw)
    return MeasurementResult(**fields)


def seed(store: ResultsStore, cid: str = "c0ffee00-aaaa", *tasks: TaskRecord) -> list[TaskRecord]:
    """Create a campaign with the given tasks (default: one task 't1')."""
    chosen = list(tasks) or [make_task("t1", cid)]
    store.create_campaign(make_campaign(cid), chosen)
    return chosen


def raw_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ open / schema


def test_default_url() -> None:
    assert default_store_url(Path("/srv/farm")) == "sqlite:////srv/farm/results.sqlite"


def test_sqlite_file_is_created_with_wal_and_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "results.sqlite"
    with ResultsStore.open(f"sqlite:///{path}") as store:
        assert store.url == f"sqlite:///{path}"
        with store._engine.connect() as conn:  # the store's own connections
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert path.is_file()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        db.close()
    assert {
        "meta",
        "campaigns",
        "tasks",
        "results",
        "artifacts",
        "devices_seen",
        "nightly_runs",
        "agent_credentials",
        "attempts",
    } <= tables
    assert "result_samples" in tables
    assert version == str(schema.SCHEMA_VERSION) == str(len(schema.MIGRATIONS))
    assert {"ix_tasks_campaign_id", "ix_tasks_status", "ix_tasks_measure_key"} <= indexes


def test_reopening_keeps_data(store_url: str) -> None:
    with ResultsStore.open(store_url) as store:
        seed(store)
    with ResultsStore.open(store_url) as store:
        assert store.get_campaign("c0ffee00-aaaa") == make_campaign()
        assert [t.task_id for t in store.tasks_for_campaign("c0ffee00-aaaa")] == ["t1"]
    assert raw_rows(store_url, "SELECT value FROM meta") == [(str(schema.SCHEMA_VERSION),)]


def test_newer_schema_version_is_refused(store_url: str) -> None:
    ResultsStore.open(store_url).close()
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(schema.meta.update().values(value=str(schema.SCHEMA_VERSION + 1)))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="upgrade edgefarm") as info:
        ResultsStore.open(store_url)
    assert isinstance(info.value, StoreError)
    assert "\n" not in str(info.value)


def test_bad_urls_raise_one_line_store_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir.sqlite").mkdir()
    bad = [
        "not a url",
        "nosuchdb://host/db",
        "postgresql+nosuchdriver://u:secret@localhost/db",
        f"sqlite:///{tmp_path}/a-file/results.sqlite",  # parent is a file
        f"sqlite:///{tmp_path}/a-dir.sqlite",  # the database is a folder
    ]
    for url in bad:
        with pytest.raises(StoreError) as info:
            ResultsStore.open(url)
        message = str(info.value)
        assert message and "\n" not in message, url
        assert "secret" not in message


def test_closed_store_refuses_work(store: ResultsStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_campaigns()


# ------------------------------------------------------------------- campaigns & tasks


def test_campaign_round_trip_and_prefix_lookup(store: ResultsStore) -> None:
    seed(store, "c0ffee00-aaaa")
    seed(store, "c0ffee00-bbbb", make_task("t2", "c0ffee00-bbbb"))
    seed(store, "deadbeef-cccc", make_task("t3", "deadbeef-cccc"))

    assert store.get_campaign("c0ffee00-aaaa") == make_campaign("c0ffee00-aaaa")
    assert store.get_campaign("dead") == make_campaign("deadbeef-cccc")
    assert store.get_campaign("c0ffee00-b") == make_campaign("c0ffee00-bbbb")
    assert store.get_campaign("dea") is None  # prefixes need 4 characters
    assert store.get_campaign("c0ff%") is None  # LIKE wildcards are literal
    assert store.get_campaign("ffff") is None
    with pytest.raises(UsageError, match="ambiguous"):
        store.get_campaign("c0ffee")


def test_duplicate_campaign_is_a_store_error(store: ResultsStore) -> None:
    seed(store)
    with pytest.raises(StoreError, match="c0ffee00-aaaa"):
        store.create_campaign(make_campaign(), [])
    # The failed transaction left nothing behind: still one task.
    assert store.campaign_counts("c0ffee00-aaaa")["total"] == 1


def test_an_unknown_status_in_the_store_is_a_store_error(store: ResultsStore) -> None:
    seed(store, "c0ffee00-aaaa")
    with store._tx(write=True) as conn:  # a damaged store, or a newer edgefarm's
        conn.execute(sa.text("UPDATE campaigns SET status = 'paused'"))
        conn.execute(sa.text("UPDATE tasks SET status = 'parked'"))
    with pytest.raises(StoreError, match="campaigns c0ffee00-aaaa: unknown status 'paused'"):
        store.get_campaign("c0ffee00-aaaa")
    with pytest.raises(StoreError, match="unknown status 'parked'"):
        store.get_task("t1")


def test_a_batch_drops_savepoints_only_where_a_failed_statement_is_harmless(
    store: ResultsStore, store_url: str
) -> None:
    """SQLite undoes just a failed statement; PostgreSQL aborts the transaction, and a
    later COMMIT rolls back without an error: there calls keep their savepoints."""
    seed(store)
    statements: list[str] = []
    sa.event.listen(
        store._engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0])
    )
    with store.batch(savepoints=False):
        store.update_task("t1", status=TaskStatus.FAILED)
    assert ("SAVEPOINT" in statements) == store_url.startswith("postgresql")
    assert store.get_task("t1").status is TaskStatus.FAILED  # type: ignore[union-attr]


def test_list_campaigns_and_status(store: ResultsStore) -> None:
    for i, cid in enumerate(["c-old-0001", "c-mid-0002", "c-new-0003"]):
        store.create_campaign(make_campaign(cid, created_at=100.0 + i), [])
    assert [c.campaign_id for c in store.list_campaigns()] == [
        "c-new-0003",
        "c-mid-0002",
        "c-old-0001",
    ]
    assert [c.campaign_id for c in store.list_campaigns(limit=1)] == ["c-new-0003"]

    store.set_campaign_status("c-mid-0002", CampaignStatus.DONE, finished_at=500.0)
    store.set_campaign_status("c-old-0001", CampaignStatus.PREPARING)
    store.update_campaign("c-old-0001", conversions_run=3, conversions_cached=2)
    mid = store.get_campaign("c-mid-0002")
    assert mid is not None and mid.status is CampaignStatus.DONE and mid.finished_at == 500.0
    old = store.get_campaign("c-old-0001")
    assert old is not None and (old.conversions_run, old.conversions_cached) == (3, 2)
    assert [c.campaign_id for c in store.unfinished_campaigns()] == ["c-old-0001", "c-new-0003"]
    with pytest.raises(KeyError):
        store.set_campaign_status("c-missing", CampaignStatus.DONE)
    with pytest.raises(ValueError, match="nope"):
        store.update_campaign("c-old-0001", nope=1)


def test_task_round_trip_update_and_counts(store: ResultsStore) -> None:
    given = [
        make_task("t1", created_at=10.0, updated_at=10.0),
        make_task("t2", eval_sha256="e" * 64, eval_size=99, options={}, created_at=10.0),
        make_task("t3", created_at=0.0, updated_at=0.0),  # stamped by the store
    ]
    seed(store, "c0ffee00-aaaa", *given)
    stored = store.tasks_for_campaign("c0ffee00-aaaa")
    assert [t.task_id for t in stored] == ["t1", "t2", "t3"]
    assert stored[0] == given[0]
    assert stored[1].eval_sha256 == "e" * 64 and stored[1].options == {}
    assert stored[1].settings == SETTINGS and stored[1].selector == {"arch": "aarch64"}
    assert stored[2].created_at > 1_000_000 and stored[2].updated_at == stored[2].created_at

    store.update_task(
        "t1",
        status=TaskStatus.ASSIGNED,
        attempt=1,
        lease_id="L1",
        agent_id="agent-1",
        lease_expires_at=123.5,
    )
    t1 = store.get_task("t1")
    assert t1 is not None
    assert (t1.status, t1.attempt, t1.lease_id, t1.agent_id, t1.lease_expires_at) == (
        TaskStatus.ASSIGNED,
        1,
        "L1",
        "agent-1",
        123.5,
    )
    assert t1.updated_at > given[0].updated_at
    store.update_task("t2", settings=MeasureSettings(trials=7), updated_at=42.0)
    t2 = store.get_task("t2")
    assert t2 is not None and t2.settings.trials == 7 and t2.updated_at == 42.0

    with pytest.raises(ValueError, match="bogus"):
        store.update_task("t1", bogus=1)
    with pytest.raises(KeyError):
        store.update_task("missing", status=TaskStatus.DONE)
    assert store.get_task("missing") is None

    store.update_task("t3", status=TaskStatus.DONE)
    seed(store, "c0ffee00-bbbb", make_task("t4", "c0ffee00-bbbb", created_at=5.0))
    assert [t.task_id for t in store.unfinished_tasks()] == ["t4", "t1", "t2"]
    counts = store.campaign_counts("c0ffee00-aaaa")
    assert counts == {
        "pending": 1,
        "assigned": 1,
        "done": 1,
        "failed": 0,
        "reused": 0,
        "total": 3,
    }


# ------------------------------------------------------------------------------ results


def test_ingest_is_idempotent_and_finishes_the_task(store: ResultsStore) -> None:
    (task,) = seed(store)
    result = make_result(task)
    first = store.ingest_result(task, result, "pi5-lab")
    again = store.ingest_result(task, result, "pi5-lab")
    assert first[1] is True and again == (first[0], False)
    assert len(store.query_results()) == 1

    stored_task = store.get_task("t1")
    assert stored_task is not None
    assert stored_task.status is TaskStatus.DONE and stored_task.result_id == first[0]

    assert "samples_ms" not in (store.get_result(first[0]) or {})  # only when asked
    row = store.get_result(first[0], samples=True)
    assert row is not None
    expected = LatencySummary.from_samples([2.0, 4.0, 3.0, 5.0, 1.0, 3.0])
    assert row["ok"] is True and row["valid"] is True and row["invalid_reason"] == ""
    assert (row["task_id"], row["attempt"], row["campaign_id"]) == ("t1", 1, "c0ffee00-aaaa")
    assert (row["device_id"], row["device_name"], row["agent_id"]) == (
        "dev-pi5",
        "pi5-lab",
        "agent-1",
    )
    assert row["samples_ms"] == [2.0, 4.0, 3.0, 5.0, 1.0, 3.0]
    assert row["trial_medians_ms"] == [3.0, 3.0]
    assert row["trials"] == 2
    assert row["lat_mean_ms"] == pytest.approx(expected.mean)
    assert row["lat_p90_ms"] == pytest.approx(expected.p90)
    assert row["lat_stdev_ms"] == pytest.approx(expected.stdev)
    assert (row["lat_min_ms"], row["lat_max_ms"]) == (1.0, 5.0)
    assert row["throughput_per_s"] == pytest.approx(1000.0 / expected.mean)
    assert row["peak_rss_bytes"] == 50_000_000 and row["load_time_s"] == 0.25
    assert row["accuracy"] == {"top1": 0.75}
    assert row["environment"]["kernel"] == "6.6"
    assert row["settings"] == SETTINGS.to_dict()
    assert row["trials_detail"][1]["iterations"] == 3
    assert row["trials_detail"][1]["median_ms"] == 3.0
    assert "samples_ms" not in row["trials_detail"][0]


def test_results_ingested_together_as_one_by_one(store: ResultsStore) -> None:
    """ingest_results: the rows, samples and task states ingest_result would store, and
    the same idempotence (a stored attempt, or one given twice, is not stored again)."""
    t1, t2, t3, t4 = seed(store, "c0ffee00-aaaa", *(make_task(f"t{i}") for i in range(1, 5)))
    first, _ = store.ingest_result(t1, make_result(t1), "pi5-lab")
    failed = make_result(t3, ok=False, error_kind="backend_crash", error_message="SIGSEGV")
    items = [(t1, make_result(t1), "pi5-lab"), (t2, make_result(t2), "pi5-lab"),
             (t3, failed, "pi5-lab"), (t2, make_result(t2), "pi5-lab")]  # fmt: skip
    outcomes = store.ingest_results(items)
    assert outcomes[0] == (first, False) and outcomes[3] == (outcomes[1][0], False)
    assert outcomes[1][1] is True and outcomes[2][1] is True
    assert len({rid for rid, _ in outcomes}) == 3 and len(store.query_results()) == 3

    alone = store.get_result(first, samples=True)
    together = store.get_result(outcomes[1][0], samples=True)
    assert alone is not None and together is not None
    different = {k for k in alone if alone[k] != together[k]}
    assert different == {"result_id", "task_id", "created_at"}  # the same row otherwise
    assert together["samples_ms"] == [2.0, 4.0, 3.0, 5.0, 1.0, 3.0]
    samples = store.result_samples([first, outcomes[1][0]])
    assert samples[first] == samples[outcomes[1][0]]
    states = {t.task_id: (t.status, t.result_id) for t in store.tasks_for_campaign("c0ffee00-aaaa")}
    assert states == {
        "t1": (TaskStatus.DONE, first),
        "t2": (TaskStatus.DONE, outcomes[1][0]),
        "t3": (TaskStatus.FAILED, outcomes[2][0]),
        "t4": (TaskStatus.PENDING, None),
    }
    assert store.ingest_results([]) == []

    ghost = make_task("ghost")  # all or nothing: t4 is not stored beside an unknown task
    with pytest.raises(StoreError, match="cannot store 2 results"):
        store.ingest_results([(t4, make_result(t4), "pi5"), (ghost, make_result(ghost), "pi5")])
    with pytest.raises(ValueError, match="given for task t4"):
        store.ingest_results([(t4, make_result(t1), "pi5")])
    assert len(store.query_results()) == 3 and store.get_task("t4").status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_concurrent_ingestion_of_one_attempt_stores_one_row(store: ResultsStore) -> None:
    (task,) = seed(store)
    result = make_result(task)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda _: store.ingest_result(task, result, "pi5"), range(8)))
    assert len({rid for rid, _ in outcomes}) == 1
    assert sum(inserted for _, inserted in outcomes) == 1


def test_result_for_unknown_task_is_a_store_error(store: ResultsStore) -> None:
    seed(store)
    ghost = make_task("ghost")
    with pytest.raises(StoreError, match="ghost"):
        store.ingest_result(ghost, make_result(ghost), "pi5")
    with pytest.raises(ValueError):
        store.ingest_result(ghost, make_result(make_task("t1")), "pi5")


def test_failed_result_and_recorded_failure(store: ResultsStore) -> None:
    t1, t2 = seed(store, "c0ffee00-aaaa", make_task("t1"), make_task("t2", attempt=3))
    failed = make_result(t1, ok=False, error_kind="backend_crash", error_message="SIGSEGV")
    rid, inserted = store.ingest_result(t1, failed, "pi5-lab")
    assert inserted
    row = store.get_result(rid, samples=True)
    assert row is not None
    assert row["ok"] is False and row["valid"] is False
    assert (row["error_kind"], row["error_message"]) == ("backend_crash", "SIGSEGV")
    assert row["invalid_reason"] == "backend_crash: SIGSEGV"
    assert row["samples_ms"] == [] and row["trials"] == 0
    assert row["lat_mean_ms"] is None and row["load_time_s"] is None
    assert row["throughput_per_s"] is None
    task = store.get_task("t1")
    assert task is not None and task.status is TaskStatus.FAILED and task.result_id == rid

    fid = store.record_failure(t2, "lease_expired", "agent went silent 3 times")
    assert store.record_failure(t2, "lease_expired", "again") == fid
    frow = store.get_result(fid)
    assert frow is not None
    assert (frow["task_id"], frow["attempt"], frow["ok"]) == ("t2", 3, False)
    assert frow["error_message"] == "agent went silent 3 times"
    assert frow["device_name"] == "pi5-lab"
    task2 = store.get_task("t2")
    assert task2 is not None and task2.status is TaskStatus.FAILED and task2.result_id == fid
    assert [r["result_id"] for r in store.query_results(ok=False)] == [fid, rid]


def test_nan_is_stored_as_null(store: ResultsStore, store_url: str) -> None:
    (task,) = seed(store)
    nan = math.nan
    result = make_result(
        task,
        trials=[make_trial([2.0], duration_s=nan, load_time_s=nan)],
        accuracy={"top1": nan, "top5": 0.5},
    )
    rid, _ = store.ingest_result(task, result, "pi5")
    row = store.get_result(rid)
    assert row is not None
    assert row["load_time_s"] is None
    assert row["accuracy"] == {"top1": None, "top5": 0.5}
    assert row["trials_detail"][0]["duration_s"] is None
    assert row["lat_mean_ms"] == 2.0 and row["lat_stdev_ms"] == 0.0
    ((load_time, accuracy),) = raw_rows(store_url, "SELECT load_time_s, accuracy FROM results")
    assert load_time is None  # SQL NULL, not a NaN float
    assert "NaN" not in accuracy and '"top1":null' in accuracy


def test_find_reusable_result_wants_the_newest_ok_and_valid(store: ResultsStore) -> None:
    ts = seed(store, "c0ffee00-aaaa", *(make_task(f"t{i}", measure_key="mk") for i in range(4)))
    invalid = make_result(ts[0], trials=[make_trial([1.0], valid=False, reason="too short")])
    store.ingest_result(ts[0], invalid, "pi5")
    assert store.find_reusable_result("mk") is None
    good, _ = store.ingest_result(ts[1], make_result(ts[1]), "pi5")
    store.ingest_result(ts[2], make_result(ts[2], ok=False, error_kind="timeout"), "pi5")
    assert store.find_reusable_result("mk") == good
    newer, _ = store.ingest_result(ts[3], make_result(ts[3]), "pi5")
    assert store.find_reusable_result("mk") == newer
    assert store.find_reusable_result("other") is None
    assert store.find_reusable_result("") is None
    assert store.find_reusable_results(["mk", "other", "", "mk"]) == {"mk": newer}


def test_find_reusable_results_over_many_keys(store: ResultsStore) -> None:
    tasks = seed(
        store, "c0ffee00-aaaa", *(make_task(f"t{i}", measure_key=f"k{i}") for i in range(7))
    )
    ids = {t.measure_key: store.ingest_result(t, make_result(t), "pi5")[0] for t in tasks[:5]}
    keys = [f"k{i}" for i in range(7)] + [f"absent-{i}" for i in range(1200)]  # several queries
    assert store.find_reusable_results(keys) == ids


def test_results_for_campaign_includes_reused_rows(store: ResultsStore) -> None:
    a1, a2 = seed(
        store, "camp-a", make_task("a1", "camp-a", "mk1"), make_task("a2", "camp-a", "mk2")
    )
    rid_a1, _ = store.ingest_result(a1, make_result(a1), "pi5")
    store.ingest_result(a2, make_result(a2), "pi5")
    b1, b2, _b3 = seed(
        store,
        "camp-b",
        make_task("b1", "camp-b", "mk1", created_at=3000.0),
        make_task("b2", "camp-b", "mk3", created_at=3000.0),
        make_task("b3", "camp-b", "mk4", created_at=3000.0),  # no result yet
    )
    reusable = store.find_reusable_result(b1.measure_key)
    assert reusable == rid_a1
    store.update_task("b1", status=TaskStatus.REUSED, result_id=reusable)
    rid_b2, _ = store.ingest_result(b2, make_result(b2), "pi5")

    rows = store.results_for_campaign("camp-b", samples=True)
    assert [(r["answers_task_id"], r["task_id"], r["reused"]) for r in rows] == [
        ("b1", "a1", True),
        ("b2", "b2", False),
    ]
    assert rows[0]["campaign_id"] == "camp-a" and rows[0]["result_id"] == rid_a1
    assert rows[1]["result_id"] == rid_b2 and rows[1]["samples_ms"]
    # query_results lists where rows were measured: the reused row is camp-a's.
    assert [r["task_id"] for r in store.query_results(campaign_id="camp-b")] == ["b2"]
    assert store.campaign_counts("camp-b")["reused"] == 1


def test_query_results_filters(store: ResultsStore) -> None:
    t1, t2, t3 = seed(
        store,
        "c0ffee00-aaaa",
        make_task("t1"),
        make_task("t2", model="big-llm", backend="llama_cpp", device_id="dev-nuc"),
        make_task("t3", device_id="dev-nuc"),
    )
    store.ingest_result(t1, make_result(t1), "pi5-lab")
    store.ingest_result(t2, make_result(t2, device_id="dev-nuc"), "nuc-lab")
    store.ingest_result(t3, make_result(t3, ok=False, device_id="dev-nuc"), "nuc-lab")

    def ids(rows: list[dict[str, Any]]) -> list[str]:
        return [r["task_id"] for r in rows]

    assert ids(store.query_results()) == ["t3", "t2", "t1"]  # newest first
    assert ids(store.query_results(limit=2)) == ["t3", "t2"]
    assert ids(store.query_results(device="nuc-lab")) == ["t3", "t2"]
    assert ids(store.query_results(device="dev-pi5")) == ["t1"]
    assert ids(store.query_results(model="big-llm")) == ["t2"]
    assert ids(store.query_results(backend="onnxruntime", ok=True)) == ["t1"]
    assert ids(store.query_results(campaign_id="c0ffee00-aaaa", ok=False)) == ["t3"]
    assert store.query_results(campaign_id="other") == []
    assert store.get_result(999_999) is None


# ---------------------------------------------------------------------- artifacts, devices


def test_artifacts_are_recorded_once_per_key(store: ResultsStore) -> None:
    first = ArtifactRecord(
        key="k-int8",
        sha256="b" * 64,
        size_bytes=100,
        kind="onnx",
        name="tiny-int8.onnx",
        provenance={
            "tool": "onnxruntime.quantization",
            "version": "1.20",
            "params": {"per_channel": True},
        },
        created_at=10.0,
    )
    store.record_artifact(first)
    store.record_artifact(replace(first, size_bytes=999))  # same key: ignored
    other = replace(first, key="k-fp32", sha256="c" * 64, created_at=5.0)
    store.record_artifact(other)
    assert store.find_artifact("k-int8") == first
    assert store.find_artifact("nope") is None
    assert store.list_artifacts() == [other, first]


def test_logit_checks_of_artifacts(store: ResultsStore) -> None:
    check = {"format": "onnx-fp32", "max_abs_diff": 1e-4, "tolerance": 0.01}
    checked = ArtifactRecord("k1", "d" * 64, 10, "onnx", "m.onnx", {"logit_check": check}, 1.0)
    plain = ArtifactRecord("k2", "e" * 64, 10, "onnx", "q.onnx", {"tool": "x"}, 2.0)
    store.record_artifact(checked)
    store.record_artifact(plain)
    assert store.logit_checks(["d" * 64, "e" * 64, "f" * 64]) == {"d" * 64: check}


def test_devices_seen_upsert_and_touch(store: ResultsStore) -> None:
    seen = DeviceSeen(
        agent_id="agent-2",
        agent_name="pi5-a",
        device_id="dev-pi5",
        capabilities={"arch": "aarch64", "backends": {"onnxruntime": "1.20"}},
        labels={"lab": "berlin"},
        registered_at=1.0,
        last_heartbeat=1.0,
    )
    store.upsert_device_seen(seen)
    store.upsert_device_seen(replace(seen, labels={"lab": "paris"}, registered_at=2.0))
    store.upsert_device_seen(replace(seen, agent_id="agent-1", device_id="dev-nuc"))
    store.touch_device("agent-2", 99.5)
    store.touch_device("unknown-agent", 100.0)  # ignored
    listed = store.list_devices_seen()
    assert [d.agent_id for d in listed] == ["agent-1", "agent-2"]
    assert listed[1] == replace(
        seen, labels={"lab": "paris"}, registered_at=2.0, last_heartbeat=99.5
    )


def test_v1_store_is_migrated_to_v2(tmp_path: Path) -> None:
    """A store written before results.metrics existed gains the column on open."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    ResultsStore.open(url).close()
    with sqlite3.connect(path) as db:  # make it look like a v1 store
        db.execute("ALTER TABLE results DROP COLUMN metrics")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    with ResultsStore.open(url):
        pass
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(results)")]
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert "metrics" in columns and version == str(schema.SCHEMA_VERSION)


def test_v2_store_is_migrated_to_v3(tmp_path: Path) -> None:
    """A store from before nightly runs gains roles, blocks, outcomes and nightly_runs."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    ResultsStore.open(url).close()
    with sqlite3.connect(path) as db:  # make it look like a v2 store
        for table in ("tasks", "results"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN role")
            db.execute(f"ALTER TABLE {table} DROP COLUMN block")
        db.execute("ALTER TABLE results DROP COLUMN example_outcomes")
        db.execute("DROP TABLE nightly_runs")
        db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    with ResultsStore.open(url) as store:
        store.create_nightly_run(
            NightlyRun(
                run_id="n-1", suite="s", night="2026-11-22", status="running", created_at=1.0
            )
        )
        store.update_nightly_run("n-1", status="passed", summary={"verdicts": []})
        run = store.get_nightly_run("n-1")
        assert run is not None and run.status == "passed" and run.summary == {"verdicts": []}
        assert [r.run_id for r in store.nightly_runs("s")] == ["n-1"]
        assert store.nightly_runs("other") == []
        with pytest.raises(KeyError):
            store.update_nightly_run("n-missing", status="failed")
    with sqlite3.connect(path) as db:
        task_columns = [row[1] for row in db.execute("PRAGMA table_info(tasks)")]
        result_columns = [row[1] for row in db.execute("PRAGMA table_info(results)")]
    assert {"role", "block"} <= set(task_columns)
    assert {"role", "block", "example_outcomes"} <= set(result_columns)


def test_v3_store_gains_agent_identities(tmp_path: Path) -> None:
    """A store from before enrolment gains the agent_credentials table; enrolment,
    lookup and revocation work on it."""
    import sqlite3

    from results.records import AgentIdentity

    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    ResultsStore.open(url).close()
    with sqlite3.connect(path) as db:  # make it look like a v3 store
        db.execute("DROP TABLE agent_credentials")
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    with ResultsStore.open(url) as store:
        identity = AgentIdentity("ag-1", "pi-1", "dev-1", "ab" * 32, None, 10.0)
        assert store.enrol_agent(identity)
        assert not store.enrol_agent(identity)  # enrolled already
        assert store.agent_identity("ag-1") == identity
        assert store.revoke_agent("ag-1", 20.0) and store.revoke_agent("ag-1", 30.0)
        revoked = store.agent_identity("ag-1")
        assert revoked is not None and revoked.revoked and revoked.revoked_at == 20.0
        assert not store.revoke_agent("ag-unknown", 20.0)
        assert [i.agent_id for i in store.agent_identities()] == ["ag-1"]

"""Attempt rows in the results store: one per attempt of a task, and how it ended.

Runs on SQLite always and on PostgreSQL when ``EDGEFARM_TEST_POSTGRES_URL`` names a
throwaway database (as tests/unit/test_store.py does).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgefarm.errors import StoreError
from results import schema
from results.records import AttemptRecord
from results.store import ResultsStore
from tests.unit.test_store import PG_ENV, _drop_all, make_campaign, make_task


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultsStore]:
    """An open store on each backend, with campaign c1 (tasks t1, t2) and c2 (task u1)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/results.sqlite"
    else:
        url = os.environ.get(PG_ENV, "")
        if not url:
            pytest.skip(f"PostgreSQL store tests need {PG_ENV} (a throwaway database URL)")
        _drop_all(url)
    try:
        with ResultsStore.open(url) as s:
            s.create_campaign(
                make_campaign("c1"),
                [make_task("t2", "c1", created_at=1.0), make_task("t1", "c1", created_at=2.0)],
            )
            s.create_campaign(make_campaign("c2"), [make_task("u1", "c2")])
            yield s
    finally:
        if request.param == "postgresql":
            _drop_all(url)


def attempt(task_id: str = "t1", n: int = 1, **kw: object) -> AttemptRecord:
    fields: dict[str, object] = {
        "task_id": task_id,
        "attempt": n,
        "lease_id": f"lease-{task_id}-{n}",
        "agent_id": "agent-1",
        "started_at": 100.0 + n,
    }
    fields.update(kw)
    return AttemptRecord(**fields)  # type: ignore[arg-type]


def test_start_and_end_round_trip(store: ResultsStore) -> None:
    store.start_attempt(attempt("t1", 1))
    assert store.attempts_for_task("t1") == [attempt("t1", 1)]
    store.end_attempt("t1", 1, 130.0, "lost", "lease expired")
    store.start_attempt(attempt("t1", 2, agent_id="agent-2"))
    store.end_attempt("t1", 2, 150.0, "result")
    found = store.attempts_for_task("t1")
    assert found == [
        attempt("t1", 1, ended_at=130.0, outcome="lost", reason="lease expired"),
        attempt("t1", 2, agent_id="agent-2", ended_at=150.0, outcome="result"),
    ]
    assert [a.duration_s for a in found] == [29.0, 48.0]
    assert store.attempts_for_task("t2") == []


def test_start_is_idempotent_and_only_fills_the_unknown(store: ResultsStore) -> None:
    store.start_attempt(attempt("t1", 1))
    store.start_attempt(attempt("t1", 1, lease_id="other", started_at=500.0))
    assert store.attempts_for_task("t1") == [attempt("t1", 1)]
    store.end_attempt("t1", 1, 120.0, "result")
    store.start_attempt(attempt("t1", 1))  # a restarted coordinator re-records it
    assert store.attempts_for_task("t1")[0].outcome == "result"


def test_end_overwrites_an_earlier_end(store: ResultsStore) -> None:
    store.start_attempt(attempt("t1", 1))
    store.end_attempt("t1", 1, 130.0, "lost", "lease expired")
    store.end_attempt("t1", 1, 140.0, "refused", "lease expired before the result came")
    (found,) = store.attempts_for_task("t1")
    assert (found.outcome, found.reason, found.ended_at) == (
        "refused",
        "lease expired before the result came",
        140.0,
    )


def test_end_of_an_attempt_never_started_inserts_it(store: ResultsStore) -> None:
    """An attempt restored from before attempt rows existed: start unknown (0); lease
    and agent taken from the task when it is still at that attempt."""
    store.update_task("t1", attempt=3, lease_id="lease-x", agent_id="agent-9")
    store.end_attempt("t1", 3, 200.0, "superseded", "coordinator restarted")
    store.end_attempt("t1", 2, 190.0, "lost")
    found = store.attempts_for_task("t1")
    assert found == [
        AttemptRecord("t1", 2, "", "", 0.0, 190.0, "lost", ""),
        AttemptRecord(
            "t1", 3, "lease-x", "agent-9", 0.0, 200.0, "superseded", "coordinator restarted"
        ),
    ]
    assert found[1].duration_s is None
    store.start_attempt(attempt("t1", 2, lease_id="lease-2", started_at=180.0))
    assert store.attempts_for_task("t1")[0] == AttemptRecord(
        "t1", 2, "lease-2", "agent-1", 180.0, 190.0, "lost", ""
    )


def test_batched_leases_and_ends_equal_one_at_a_time(store: ResultsStore) -> None:
    """lease_tasks and end_attempts (the store writer's executemany forms) leave what
    update_task + start_attempt and end_attempt do, the unusual cases included: an
    attempt recorded before (a restart) and an end with no start row."""
    store.start_attempt(attempt("t2", 1, lease_id="kept"))  # recorded before
    store.lease_tasks([(attempt("t1", 1), 500.0), (attempt("t2", 1), 600.0)])
    t1, t2 = store.get_task("t1"), store.get_task("t2")
    assert t1 is not None and t2 is not None
    assert (t1.status.value, t1.attempt, t1.lease_id, t1.agent_id, t1.lease_expires_at) == (
        "assigned",
        1,
        "lease-t1-1",
        "agent-1",
        500.0,
    )
    assert t2.lease_expires_at == 600.0
    assert store.attempts_for_task("t1") == [attempt("t1", 1)]
    assert store.attempts_for_task("t2") == [attempt("t2", 1, lease_id="kept")]
    store.end_attempts([("t1", 1, 130.0, "result", ""), ("u1", 4, 140.0, "lost", "gone")])
    assert store.attempts_for_task("t1") == [attempt("t1", 1, ended_at=130.0, outcome="result")]
    assert store.attempts_for_task("u1") == [
        AttemptRecord("u1", 4, "", "", 0.0, 140.0, "lost", "gone")  # never started here
    ]
    store.lease_tasks([])
    store.end_attempts([])


def test_batched_leases_and_ends_over_hundreds_of_tasks(store: ResultsStore) -> None:
    """Several statements' worth (SQLite takes a hundred rows a statement), and a key
    given twice: applied in order, the later one last, as one at a time would."""
    many = [make_task(f"m{i:03d}", "c3", created_at=float(i)) for i in range(250)]
    store.create_campaign(make_campaign("c3"), many)
    store.lease_tasks([(attempt(t.task_id, 1), 900.0) for t in many])
    found = store.attempts_for_campaign("c3")
    assert sorted((a.task_id, a.lease_id) for a in found) == [
        (t.task_id, f"lease-{t.task_id}-1") for t in many
    ]
    assert {t.lease_expires_at for t in store.tasks_for_campaign("c3")} == {900.0}
    ends = [(t.task_id, 1, 950.0, "result", "") for t in many]
    store.end_attempts([*ends, ("m007", 1, 960.0, "lost", "twice")])
    found = store.attempts_for_campaign("c3")
    assert {(a.outcome, a.ended_at) for a in found if a.task_id != "m007"} == {("result", 950.0)}
    assert [(a.outcome, a.reason) for a in found if a.task_id == "m007"] == [("lost", "twice")]


def test_batched_leases_refuse_an_unknown_task(store: ResultsStore) -> None:
    with pytest.raises(KeyError):
        store.lease_tasks([(attempt("missing", 1), 1.0)])
    with pytest.raises(StoreError, match="one of 2 tasks"):
        store.lease_tasks([(attempt("t1", 1), 1.0), (attempt("missing", 1), 1.0)])
    with pytest.raises(ValueError, match="unknown attempt outcome"):
        store.end_attempts([("t1", 1, 1.0, "exploded", "")])


def test_attempts_for_campaign_in_task_order(store: ResultsStore) -> None:
    store.start_attempt(attempt("t1", 2))
    store.start_attempt(attempt("u1", 1))
    store.start_attempt(attempt("t1", 1))
    store.start_attempt(attempt("t2", 1))
    found = store.attempts_for_campaign("c1")
    assert [(a.task_id, a.attempt) for a in found] == [("t2", 1), ("t1", 1), ("t1", 2)]
    assert [a.task_id for a in store.attempts_for_campaign("c2")] == ["u1"]
    assert store.attempts_for_campaign("nope") == []


def test_unknown_outcome_and_task_are_refused(store: ResultsStore) -> None:
    with pytest.raises(ValueError, match="unknown attempt outcome"):
        store.start_attempt(attempt("t1", 1, outcome="exploded"))
    with pytest.raises(ValueError, match="unknown attempt outcome"):
        store.end_attempt("t1", 1, 1.0, "exploded")
    with pytest.raises(StoreError, match="no task"):
        store.start_attempt(attempt("missing", 1))
    with pytest.raises(StoreError, match="no task"):
        store.end_attempt("missing", 1, 1.0, "lost")
    assert store.attempts_for_task("t1") == []


def test_concurrent_starts_of_one_attempt_store_one_row(store: ResultsStore) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: store.start_attempt(attempt("t1", 1)), range(8)))
    assert store.attempts_for_task("t1") == [attempt("t1", 1)]


def test_duration_needs_a_known_start_and_end() -> None:
    assert attempt(started_at=10.0).duration_s is None
    assert attempt(started_at=10.0, ended_at=12.5).duration_s == 2.5
    assert attempt(started_at=0.0, ended_at=12.5).duration_s is None
    assert attempt(started_at=10.0, ended_at=9.0).duration_s is None


def test_v5_store_is_migrated_to_v6(tmp_path: Path) -> None:
    """A store from before attempt rows gains the attempts table and the measurement
    time columns of results."""
    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    ResultsStore.open(url).close()
    with sqlite3.connect(path) as db:  # make it look like a v5 store
        db.execute("DROP TABLE attempts")
        db.execute("ALTER TABLE results DROP COLUMN measure_started_at")
        db.execute("ALTER TABLE results DROP COLUMN measure_ended_at")
        db.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    with ResultsStore.open(url) as store:
        store.create_campaign(make_campaign("c1"), [make_task("t1", "c1")])
        store.start_attempt(attempt("t1", 1))
        assert store.attempts_for_campaign("c1") == [attempt("t1", 1)]
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert {"measure_started_at", "measure_ended_at"} <= columns
    assert version == str(schema.SCHEMA_VERSION)

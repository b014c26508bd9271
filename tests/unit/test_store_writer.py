"""The background store writer's group commits: every write queued meanwhile in one
transaction (each call in a savepoint, so that a failing call rolls back alone, only
when the group runs again because one failed), results in
one transaction after the calls, outcomes only after the commit."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from coordinator.store_writer import StoreWriter, _ingest_many, _worker_ready
from edgefarm.domain import CampaignStatus, MeasurementResult, TaskStatus
from edgefarm.errors import StoreError
from results.records import CampaignRecord, TaskRecord
from results.store import ResultsStore
from tests.unit.scheduler_doubles import task, valid_trial


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    tasks = [task(i, f"dev-{i}") for i in range(20)]
    store.create_campaign(CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks)
    return store


def test_queued_writes_commit_together_and_a_failing_one_alone(store: ResultsStore) -> None:
    writer = StoreWriter(background=True, store=store)
    gate = threading.Event()

    async def scenario() -> tuple[object, object]:
        blocker = writer.run(gate.wait, 10)  # holds the writer thread: the rest queues up
        blocked = asyncio.ensure_future(blocker)
        await asyncio.sleep(0.05)
        for i in range(10):
            writer.post(store.update_task, f"t{i}", status=TaskStatus.FAILED)
        bad = asyncio.ensure_future(writer.run(store.update_task, "no-such-task", attempt=3))
        last = asyncio.ensure_future(writer.run(store.get_task, "t9"))
        gate.set()
        await blocked
        return await asyncio.gather(bad, return_exceptions=True), await last

    groups_before = writer.groups
    (failure,), seen = asyncio.run(scenario())
    writer.close()
    assert isinstance(failure, KeyError)  # its own error, and only its own
    assert seen.status is TaskStatus.FAILED  # type: ignore[attr-defined]  # sees earlier writes
    assert all(store.get_task(f"t{i}").status is TaskStatus.FAILED for i in range(10))  # type: ignore[union-attr]
    assert writer.groups - groups_before == 2  # the blocker, then all twelve in one group


def test_a_group_runs_without_savepoints_until_a_call_fails(store: ResultsStore) -> None:
    """Savepoints cost statements: a group that succeeds has none; a group with a
    failing call is rolled back and run again with them, its callbacks given once."""
    writer = StoreWriter(background=True, store=store)
    statements: list[str] = []
    sa.event.listen(
        store._engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0])
    )
    published: list[str] = []

    def failing() -> None:
        writer.call_on_loop(lambda: published.append("failing"))
        raise RuntimeError("halfway")

    def passing() -> None:
        store.update_task("t1", status=TaskStatus.FAILED)
        writer.call_on_loop(lambda: published.append("passing"))

    async def group(*fns: Callable[[], None]) -> list[object]:
        gate = threading.Event()
        blocked = asyncio.ensure_future(writer.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        calls = [asyncio.ensure_future(writer.run(fn)) for fn in fns]
        gate.set()
        await blocked
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.05)  # the callbacks, on this loop
        return outcomes

    async def scenario() -> list[object]:  # one loop: the writer keeps the first it saw
        assert await group(passing, passing) == [None, None]
        assert "SAVEPOINT" not in statements and published == ["passing"] * 2
        published.clear()
        return await group(failing, passing)

    outcomes = asyncio.run(scenario())
    writer.close()
    assert isinstance(outcomes[0], RuntimeError) and outcomes[1] is None
    # The group's passing write ran twice: without a savepoint (rolled back), then in one.
    assert statements[-5:] == ["UPDATE", "BEGIN", "SAVEPOINT", "UPDATE", "RELEASE"]
    assert sorted(published) == ["failing", "passing"]  # not those of the rolled-back run
    assert store.get_task("t1").status is TaskStatus.FAILED  # type: ignore[union-attr]


@pytest.mark.timeout(60)  # before, a caller that gave up left the rest of its group waiting
def test_a_group_answers_in_one_hop_to_the_loop_whoever_gave_up(store: ResultsStore) -> None:
    """A group's outcomes and callbacks reach the event loop together, once the group
    is committed: a caller that stopped waiting, or a callback that raises, takes
    nothing from the others."""
    writer = StoreWriter(background=True, store=store)
    seen: list[str] = []

    def noted(name: str) -> str:
        writer.call_on_loop(lambda: seen.append(f"callback {name}"))
        return name

    def broken() -> None:
        raise RuntimeError("a bug in a callback")

    hops: list[object] = []

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        hop = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> asyncio.Handle:
            hops.append(args[0])
            return hop(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        gate = threading.Event()
        blocked = asyncio.ensure_future(writer.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(writer.run(noted, "gone"))
        first = asyncio.ensure_future(writer.run(noted, "first"))
        first.add_done_callback(lambda _: seen.append("outcome first"))
        writer.post(writer.call_on_loop, broken)
        last = asyncio.ensure_future(writer.run(noted, "last"))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await blocked
        outcomes = await asyncio.gather(first, last, gone, return_exceptions=True)
        await asyncio.sleep(0.05)
        return outcomes

    first, last, gone = asyncio.run(scenario())
    writer.close()
    assert (first, last) == ("first", "last") and isinstance(gone, asyncio.CancelledError)
    # The cancelled caller's write still ran (its callback too); the broken one is logged.
    assert sorted(seen) == ["callback first", "callback gone", "callback last", "outcome first"]
    assert len(hops) == 2  # one per group: the blocker's, then the four writes


def test_a_failed_commit_fails_every_write_of_its_group(store: ResultsStore) -> None:
    writer = StoreWriter(background=True, store=store)
    store.close()  # every transaction fails now

    async def scenario() -> list[object]:
        calls = [writer.run(store.get_task, "t1"), writer.run(store.get_task, "t2")]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    outcomes = asyncio.run(scenario())
    writer.close()
    assert all(isinstance(o, StoreError) for o in outcomes)


def test_consecutive_post_many_run_as_one_call_and_alone_after_a_failure(
    store: ResultsStore,
) -> None:
    """Consecutive post_many items of one function go to it together; when that call
    fails, the group runs again with each item alone, so only the bad one fails."""
    writer = StoreWriter(background=True, store=store)
    batches: list[list[str]] = []

    def fail_fast(ids: list[str]) -> None:
        batches.append(list(ids))
        for task_id in ids:
            store.update_task(task_id, status=TaskStatus.FAILED)

    async def group(ids: list[str]) -> None:
        gate = threading.Event()
        blocked = asyncio.ensure_future(writer.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        for task_id in ids[:3]:
            writer.post_many(fail_fast, task_id)
        writer.post(store.update_task, "t9", attempt=7)  # another call ends the run
        for task_id in ids[3:]:
            writer.post_many(fail_fast, task_id)
        last = asyncio.ensure_future(writer.run(store.get_task, "t9"))
        gate.set()
        await blocked
        await last

    asyncio.run(group(["t1", "t2", "t3", "t4", "t5"]))
    assert batches == [["t1", "t2", "t3"], ["t4", "t5"]]
    batches.clear()
    asyncio.run(group(["t6", "no-such-task", "t7", "t8"]))
    writer.close()
    # merged (one failing on the unknown task), then, rolled back, each alone
    first, again = (
        [["t6", "no-such-task", "t7"], ["t8"]],
        [["t6"], ["no-such-task"], ["t7"], ["t8"]],
    )
    assert batches == first + again
    done = {f"t{i}": store.get_task(f"t{i}").status for i in range(1, 9)}  # type: ignore[union-attr]
    assert set(done.values()) == {TaskStatus.FAILED}  # every known task, the bad one alone
    assert store.get_task("t9").attempt == 7  # type: ignore[union-attr]


def _result(t: TaskRecord) -> MeasurementResult:
    trial = valid_trial()
    return MeasurementResult(
        task_id=t.task_id,
        attempt=1,
        lease_id="lease",
        agent_id="a1",
        device_id=t.device_id,
        ok=True,
        trials=[trial],
    )


def test_results_go_through_the_ingestion_process_which_comes_back_after_a_kill(
    tmp_path: Path,
) -> None:
    """With ingest_url, results are stored by a process of its own; killed, the results
    it held fail with a one-line StoreError and the next ones start a new process."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = ResultsStore.open(url)
    tasks = [task(i, f"dev-{i}") for i in range(3)]
    store.create_campaign(CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks)
    writer = StoreWriter(background=True, ingest_url=url, store=store)

    async def scenario() -> list[object]:
        first = await writer.ingest(store, tasks[0], _result(tasks[0]), "box")
        assert writer._ingester is not None
        (worker,) = writer._ingester._processes.values()  # the pool's one process
        assert worker.pid is not None and worker.pid != os.getpid()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        lost = await asyncio.gather(
            writer.ingest(store, tasks[1], _result(tasks[1]), "box"), return_exceptions=True
        )
        again = await writer.ingest(store, tasks[1], _result(tasks[1]), "box")
        return [first, *lost, again]

    first, lost, again = asyncio.run(scenario())
    writer.close()
    assert first[1] is True and again[1] is True  # type: ignore[index]
    assert isinstance(lost, StoreError) and "ingestion process died" in str(lost)
    done = [store.get_task(t.task_id) for t in tasks[:2]]
    assert all(t is not None and t.status is TaskStatus.DONE for t in done)


def test_the_ingestion_process_starts_before_the_first_result(tmp_path: Path) -> None:
    """start_ingestion spawns the worker and opens its store at once, so the first
    results do not wait for a new interpreter; without ingest_url it does nothing."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = ResultsStore.open(url)
    writer = StoreWriter(background=True, ingest_url=url, store=store)
    writer.start_ingestion()
    try:
        assert writer._ingester is not None
        writer._ingester.submit(_worker_ready).result(timeout=60)  # it is up and answers
        (worker,) = writer._ingester._processes.values()
        assert worker.is_alive() and worker.pid != os.getpid()
    finally:
        writer.close()
    inline = StoreWriter(background=True, store=store)
    inline.start_ingestion()
    assert inline._ingester is None
    inline.close()


def test_ingestion_without_savepoints_until_a_result_fails(store: ResultsStore) -> None:
    """A group of results is stored together (one INSERT per table for them all) and
    without savepoints; when one fails, the group is stored again, each result in a
    savepoint, so only that one fails."""
    statements: list[str] = []
    sa.event.listen(
        store._engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0])
    )
    tasks = [store.get_task(f"t{i}") for i in range(3)]
    assert all(t is not None for t in tasks)
    good = [(t, _result(t), "box") for t in tasks[:2] if t is not None]
    outcomes = _ingest_many(store, good)
    assert [ok for ok, _ in outcomes] == [True, True] and "SAVEPOINT" not in statements
    assert statements.count("INSERT") == 2  # results and result_samples, both rows each
    t2 = tasks[2]
    assert t2 is not None
    wrong = (t2, _result(tasks[0]), "box")  # a result of another task: refused
    outcomes = _ingest_many(store, [(t2, _result(t2), "box"), wrong])
    assert [ok for ok, _ in outcomes] == [True, False]
    assert isinstance(outcomes[1][1], ValueError) and "SAVEPOINT" in statements
    assert all(store.get_task(f"t{i}").status is TaskStatus.DONE for i in range(3))  # type: ignore[union-attr]

"""Scheduler logic with an in-process transport: outbox queues, a fake clock, a real
SQLite store. No sockets, no Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.scheduler import (
    AckMessage,
    AgentSession,
    AssignMessage,
    CancelMessage,
    CloseMessage,
    Scheduler,
)
from coordinator.store_writer import StoreWriter
from edgefarm.domain import (
    DRAINING_REASON,
    CampaignStatus,
    MeasurementResult,
    TaskStatus,
)
from edgefarm.errors import StoreError
from edgefarm.wire_limits import SILENT_AFTER_HEARTBEATS
from results.records import CampaignRecord, TaskRecord
from results.store import ResultsStore
from tests.unit.scheduler_doubles import Clock, caps, result_for, task


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Scheduler, Clock, ResultsStore]:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    clock = Clock()
    sched = Scheduler(store, lease_duration_s=10, max_attempts=2, clock=clock)
    return sched, clock, store


def start(sched: Scheduler, store: ResultsStore, tasks: list[TaskRecord]) -> None:
    store.create_campaign(CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks)
    sched.add_tasks(tasks)


def accept(sched: Scheduler, session: AgentSession, result: MeasurementResult) -> AckMessage:
    return asyncio.run(sched.accept_result(session, result))


def drain(queue) -> list:  # type: ignore[no-untyped-def]
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_one_measurement_at_a_time_per_device(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qa, qb = sched.connect(a), sched.connect(b)
    start(sched, store, [task(1), task(2)])
    assigned = drain(qa) + drain(qb)
    assert len(assigned) == 1  # two agents, one host: only one measures
    msg = assigned[0]
    holder = a if sched.leases["t1"].agent_id == a.agent_id else b
    ack = accept(sched, holder, result_for(msg, holder.agent_id))
    assert ack.accepted
    assert len(drain(qa) + drain(qb)) == 1  # the next task is handed out only now


def test_backend_and_selector_matching(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {"rack": "r1"}, caps("dev-a", {"onnxruntime": "1"}))
    qa = sched.connect(a)
    start(
        sched,
        store,
        [
            task(1, backend="noop"),
            task(2, backend="onnxruntime", selector={"rack": "r2"}),
            task(3, backend="onnxruntime", selector={"rack": "r1"}),
        ],
    )
    (msg,) = drain(qa)
    assert msg.assignment.task_id == "t3"


def test_silent_agent_lease_expires_and_task_moves(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (first,) = drain(qa)
    qb = sched.connect(b)
    sched.disconnect(a)  # a goes silent
    assert drain(qb) == []  # lease still in force: nothing yet
    clock.now += 11
    sched.heartbeat(b, "", "")  # b is alive and idle
    assert sched.expire_leases() == 1
    (second,) = drain(qb)
    assert (
        second.assignment.attempt == 2 and second.assignment.lease_id != first.assignment.lease_id
    )
    # a comes back late with a result from the expired lease: refused
    late = accept(sched, a, result_for(first, a.agent_id))
    assert not late.accepted
    ack = accept(sched, b, result_for(second, b.agent_id))
    assert ack.accepted
    rows = store.query_results()
    assert len(rows) == 1 and rows[0]["attempt"] == 2
    assert store.get_campaign("c1").status == CampaignStatus.DONE


def test_heartbeat_renews_lease(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    for _ in range(3):
        clock.now += 8
        sched.heartbeat(a, "t1", msg.assignment.lease_id)
        assert sched.expire_leases() == 0
    assert accept(sched, a, result_for(msg, a.agent_id)).accepted


def test_too_many_lost_leases_fail_the_task(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    for _ in range(2):
        assert [type(m) for m in drain(qa)] in ([AssignMessage], [CancelMessage, AssignMessage])
        clock.now += 11
        sched.heartbeat(a, "", "")  # alive, but its lease lapsed: the only taker gets it back
        sched.expire_leases()
    assert store.get_task("t1").status == TaskStatus.FAILED
    (row,) = store.query_results()
    assert row["error_kind"] == "lease_expired"
    assert store.get_campaign("c1").status == CampaignStatus.FAILED


def test_duplicate_result_is_acknowledged_as_stored_once(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    first = accept(sched, a, result_for(msg, a.agent_id))
    assert first.accepted and not first.duplicate
    again = accept(sched, a, result_for(msg, a.agent_id))  # the first ack was lost
    assert again.accepted and again.duplicate
    assert len(store.query_results()) == 1
    # the same task and attempt under another lease id is no duplicate
    forged = result_for(msg, a.agent_id)
    forged.lease_id = "f" * 32
    assert not accept(sched, a, forged).accepted


def test_heartbeat_renews_only_the_senders_lease(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-b", {}, caps("dev-b"))
    qa, _ = sched.connect(a), sched.connect(b)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    for _ in range(3):  # b knows a's task and lease id, and heartbeats for it
        clock.now += 6
        sched.heartbeat(b, "t1", msg.assignment.lease_id)
        sched.heartbeat(a, "", "")
    assert sched.expire_leases() == 1  # a said nothing about t1: its lease ran out


def test_result_from_another_agent_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qa, _ = sched.connect(a), sched.connect(b)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    ack = accept(sched, b, result_for(msg, b.agent_id))
    assert not ack.accepted and ack.reason == "lease held by another agent"
    assert store.query_results() == []


def test_revoke_closes_the_stream_and_requeues_the_task(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    qb = sched.connect(b)
    sched.revoke(a.agent_id)
    (close,) = drain(qa)
    assert isinstance(close, CloseMessage) and close.code == "UNAUTHENTICATED"
    assert a.agent_id not in sched.sessions
    (moved,) = drain(qb)
    assert moved.assignment.task_id == "t1" and moved.assignment.attempt == 2
    assert not accept(sched, a, result_for(msg, a.agent_id)).accepted
    assert sched.assigned_artifacts(b) == {"a" * 64}
    assert sched.assigned_artifacts(a) == set()


def test_background_writer_keeps_order_and_finishes_campaigns(tmp_path: Path) -> None:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    writer = StoreWriter(background=True)
    sched = Scheduler(store, lease_duration_s=10, writer=writer)

    async def scenario() -> None:
        a = sched.register("a", "dev-a", {}, caps("dev-a"))
        qa = sched.connect(a)
        events = sched.watch("c1")
        start(sched, store, [task(1)])
        (msg,) = drain(qa)
        assert (await sched.accept_result(a, result_for(msg, a.agent_id))).accepted
        while (await asyncio.wait_for(events.get(), 5)).message != "campaign done":
            pass

    asyncio.run(scenario())
    writer.close()
    assert store.get_task("t1").status == TaskStatus.DONE
    assert store.get_campaign("c1").status == CampaignStatus.DONE


def test_restore_keeps_leases_for_returning_agents(tmp_path: Path) -> None:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    clock = Clock()
    first = Scheduler(store, lease_duration_s=10, clock=clock)
    a = first.register("a", "dev-a", {}, caps("dev-a"))
    qa = first.connect(a)
    start(first, store, [task(1), task(2)])
    (msg,) = drain(qa)
    # the coordinator restarts: a new scheduler rebuilds from the store
    second = Scheduler(store, lease_duration_s=10, clock=clock)
    second.restore(store.unfinished_tasks())
    a2 = second.register("a", "dev-a", {}, caps("dev-a"))
    q2 = second.connect(a2)
    assert drain(q2) == []  # still busy with t1 under its old lease
    assert accept(second, a2, result_for(msg, a2.agent_id)).accepted
    (nxt,) = drain(q2)  # the ack goes out via the gateway; the next task comes now
    assert nxt.assignment.task_id == "t2"


def test_resend_while_storing_is_answered_as_duplicate(tmp_path: Path) -> None:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    writer = StoreWriter(background=True)
    sched = Scheduler(store, lease_duration_s=10, writer=writer)

    async def scenario() -> list[AckMessage]:
        a = sched.register("a", "dev-a", {}, caps("dev-a"))
        qa = sched.connect(a)
        start(sched, store, [task(1)])
        (msg,) = drain(qa)
        first = result_for(msg, a.agent_id)
        again = result_for(msg, a.agent_id)  # the agent reconnected and sent it again
        return list(
            await asyncio.gather(sched.accept_result(a, first), sched.accept_result(a, again))
        )

    first, again = asyncio.run(scenario())
    writer.close()
    assert first.accepted and not first.duplicate
    assert again.accepted and again.duplicate
    assert len(store.query_results()) == 1


def test_silent_agent_gets_no_work(setup) -> None:  # type: ignore[no-untyped-def]
    """A stream that still counts as connected but has not heard a heartbeat for more
    than SILENT_AFTER_HEARTBEATS intervals (a black-holed agent) is passed over."""
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    b = sched.register("b", "dev-b", {}, caps("dev-b"))
    qa, qb = sched.connect(a), sched.connect(b)
    clock.now += SILENT_AFTER_HEARTBEATS * sched.heartbeat_interval_s + 1
    sched.heartbeat(b, "", "")
    start(sched, store, [task(1, device_id="dev-a"), task(2, device_id="dev-b")])
    assert drain(qa) == []
    (msg,) = drain(qb)
    assert msg.assignment.task_id == "t2"
    sched.heartbeat(a, "", "")  # a is heard from again: it gets its device's task
    sched.dispatch()
    (msg,) = drain(qa)
    assert msg.assignment.task_id == "t1"


def test_lapsed_lease_goes_to_another_agent_first(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    assert [type(m) for m in drain(qa)] == [AssignMessage]
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qb = sched.connect(b)
    clock.now += 11
    sched.heartbeat(a, "", "")  # a says it is idle (its measurement was lost)
    sched.heartbeat(b, "", "")
    assert sched.expire_leases() == 1
    assert [type(m) for m in drain(qa)] == [CancelMessage]  # not handed back to a...
    (moved,) = drain(qb)  # ...but to b, although a registered first
    assert moved.assignment.task_id == "t1" and moved.assignment.attempt == 2


def outcomes(store: ResultsStore, task_id: str) -> list[tuple[int, str]]:
    return [(a.attempt, a.outcome) for a in store.attempts_for_task(task_id)]


def test_draining_agent_gets_no_new_work(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    sched.heartbeat(a, "", "", draining=True)
    start(sched, store, [task(1)])
    assert drain(qa) == []
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qb = sched.connect(b)
    (msg,) = drain(qb)
    assert msg.assignment.task_id == "t1"


def test_abandoned_task_moves_at_once_and_is_recorded(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (first,) = drain(qa)
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qb = sched.connect(b)
    assert not sched.abandon(b, "t1", first.assignment.lease_id, "not mine")  # not its lease
    sched.heartbeat(a, "t1", first.assignment.lease_id, draining=True)
    assert sched.abandon(a, "t1", first.assignment.lease_id, "drain timeout")
    (moved,) = drain(qb)  # no lease expiry to wait for
    assert moved.assignment.attempt == 2
    assert accept(sched, b, result_for(moved, b.agent_id)).accepted
    (abandoned, done) = store.attempts_for_task("t1")
    assert (abandoned.outcome, abandoned.agent_id) == ("abandoned", a.agent_id)
    assert "drain timeout" in abandoned.reason and abandoned.ended_at is not None
    assert (done.outcome, done.agent_id) == ("result", b.agent_id)


def test_result_after_lapsed_lease_is_accepted_while_not_re_leased(setup) -> None:  # type: ignore[no-untyped-def]
    """The agent (or the coordinator) was away past the lease; nobody else took the
    task meanwhile: the finished result is still good."""
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (msg,) = drain(qa)
    sched.disconnect(a)
    clock.now += 11
    assert sched.expire_leases() == 1
    assert [t.task_id for t in sched.pending] == ["t1"]
    ack = accept(sched, a, result_for(msg, a.agent_id))
    assert ack.accepted and not ack.duplicate
    assert list(sched.pending) == [] and not sched.leases
    assert store.get_task("t1").status == TaskStatus.DONE
    assert outcomes(store, "t1") == [(1, "result")]
    again = accept(sched, a, result_for(msg, a.agent_id))  # its ack was lost: re-sent
    assert again.accepted and again.duplicate
    assert len(store.query_results()) == 1


def test_late_result_supersedes_the_same_agents_new_lease(setup) -> None:  # type: ignore[no-untyped-def]
    """On reconnecting, the agent was handed its task again before its re-sent result
    arrived: the result is accepted and the needless new lease is cancelled."""
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (first,) = drain(qa)
    sched.disconnect(a)
    clock.now += 11
    sched.expire_leases()
    qa = sched.connect(a)  # back: t1 goes to it again (no other agent)
    (again,) = drain(qa)
    assert again.assignment.task_id == "t1" and again.assignment.attempt == 2
    assert accept(sched, a, result_for(first, a.agent_id)).accepted
    (cancel,) = drain(qa)
    assert isinstance(cancel, CancelMessage) and cancel.lease_id == again.assignment.lease_id
    assert not sched.leases and a.lease_id is None
    assert outcomes(store, "t1") == [(1, "result"), (2, "superseded")]
    rows = store.query_results()
    assert len(rows) == 1 and rows[0]["attempt"] == 1


def test_late_result_is_refused_once_another_agent_holds_the_task(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    (first,) = drain(qa)
    b = sched.register("b", "dev-a", {}, caps("dev-a"))
    qb = sched.connect(b)
    clock.now += 11
    sched.heartbeat(b, "", "")
    sched.expire_leases()
    (moved,) = drain(qb)
    late = accept(sched, a, result_for(first, a.agent_id))
    assert not late.accepted and late.reason == "lease superseded"
    assert accept(sched, b, result_for(moved, b.agent_id)).accepted
    (refused, done) = store.attempts_for_task("t1")
    assert (refused.outcome, refused.reason) == ("refused", "lease superseded")
    assert done.outcome == "result"


def test_an_unstarted_assignment_handed_back_while_draining_does_not_count(setup) -> None:  # type: ignore[no-untyped-def]
    sched, _, store = setup  # max_attempts 2
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    start(sched, store, [task(1)])
    for _ in range(2):
        (msg,) = [m for m in drain(qa) if isinstance(m, AssignMessage)]
        assert sched.abandon(a, "t1", msg.assignment.lease_id, DRAINING_REASON)
        assert a.draining  # no more work for it...
        a.draining = False  # ...until it registers again (here: by hand)
        sched.dispatch()
    assert store.get_task("t1").status == TaskStatus.ASSIGNED  # not failed after 2
    (msg,) = drain(qa)
    assert msg.assignment.attempt == 3


def test_an_agent_heard_from_again_gets_the_work_that_waited(setup) -> None:  # type: ignore[no-untyped-def]
    sched, clock, store = setup
    a = sched.register("a", "dev-a", {}, caps("dev-a"))
    qa = sched.connect(a)
    clock.now += SILENT_AFTER_HEARTBEATS * sched.heartbeat_interval_s + 1
    start(sched, store, [task(1)])  # a is silent: nothing for it
    assert drain(qa) == []
    sched.heartbeat(a, "", "")  # back, on the same stream: no other event needed
    (msg,) = drain(qa)
    assert msg.assignment.task_id == "t1"


class HeldWriter(StoreWriter):
    """A foreground writer whose result writes wait for ``release`` (and fail while
    ``fail`` is set): a slow or broken store seen from the scheduler."""

    def __init__(self) -> None:
        super().__init__(background=False)
        self.release = asyncio.Event()
        self.fail = False

    async def ingest(self, store, task, result, device_name):  # type: ignore[no-untyped-def]
        await self.release.wait()
        if self.fail:
            raise StoreError("disk full")
        return await super().ingest(store, task, result, device_name)


def test_the_next_task_goes_out_while_the_result_is_written(tmp_path: Path) -> None:
    """A result frees its device at once: the next assignment reaches the agent before
    the write ends. A write that fails keeps the old lease, and the agent's re-send of
    that result is accepted under it and stored."""
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    writer = HeldWriter()
    sched = Scheduler(store, lease_duration_s=10, writer=writer)

    async def scenario() -> None:
        a = sched.register("a", "dev-a", {}, caps("dev-a"))
        qa = sched.connect(a)
        start(sched, store, [task(1), task(2), task(3)])
        (first,) = drain(qa)
        writing = asyncio.ensure_future(sched.accept_result(a, result_for(first, a.agent_id)))
        await asyncio.sleep(0)
        (second,) = drain(qa)  # out before the first result is stored
        assert second.assignment.task_id == "t2" and not writing.done()
        assert store.get_task("t1").status == TaskStatus.ASSIGNED
        writer.release.set()
        assert (await writing).accepted
        assert store.get_task("t1").status == TaskStatus.DONE

        writer.fail = True  # the second result's write fails: not acknowledged
        with pytest.raises(StoreError):
            await sched.accept_result(a, result_for(second, a.agent_id))
        (third,) = drain(qa)
        assert third.assignment.task_id == "t3"
        writer.fail = False
        again = await sched.accept_result(a, result_for(second, a.agent_id))
        assert again.accepted and not again.duplicate
        assert store.get_task("t2").status == TaskStatus.DONE
        assert (await sched.accept_result(a, result_for(third, a.agent_id))).accepted

    asyncio.run(scenario())
    assert store.get_campaign("c1").status == CampaignStatus.DONE

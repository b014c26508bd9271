"""The scheduler's work grows with what an event touches, not with the fleet: the
pending queue is indexed by device, a result looks only at its own device's agents,
and a campaign's completion is counted in memory (the store is asked once)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from coordinator.pending import PendingQueue
from coordinator.scheduler import AssignMessage, Scheduler
from edgefarm.domain import CampaignStatus
from results.records import CampaignRecord
from results.store import ResultsStore
from tests.unit.scheduler_doubles import Clock, caps, result_for, task


def test_the_pending_queue_is_fifo_per_device_with_handed_back_tasks_first() -> None:
    queue = PendingQueue()
    a1, a2, b1 = task(1, "dev-a"), task(2, "dev-a"), task(3, "dev-b")
    for t in (a1, a2, b1):
        queue.append(t)
    assert len(queue) == 3 and queue.devices() == ["dev-a", "dev-b"]
    assert [t.task_id for t in queue.for_device("dev-a")] == ["t1", "t2"]
    assert queue.remove(a1) and not queue.remove(a1) and a1 not in queue
    queue.push_front(a1)  # re-queued: ahead of t2
    assert [t.task_id for t in queue.for_device("dev-a")] == ["t1", "t2"]
    queue.append(a2)  # queued twice: counted once, keeps its place
    assert len(queue) == 3 and [t.task_id for t in queue] == ["t1", "t2", "t3"]
    assert queue.remove(b1) and queue.devices() == ["dev-a"]
    assert list(queue.for_device("dev-b")) == []


class CountingStore:
    """A real store that counts the campaign-count queries made of it."""

    def __init__(self, store: ResultsStore) -> None:
        self._store = store
        self.counts = 0

    def campaign_counts(self, campaign_id: str) -> Any:
        self.counts += 1
        return self._store.campaign_counts(campaign_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.mark.timeout(120)
def test_dispatch_looks_at_one_device_and_a_campaign_is_counted_once(tmp_path: Path) -> None:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    counting = CountingStore(store)
    sched = Scheduler(counting, clock=Clock())  # type: ignore[arg-type]
    devices = [f"dev-{i:03d}" for i in range(200)]
    sessions = {d: sched.register(f"agent-{d}", d, {}, caps(d)) for d in devices}
    queues = {d: sched.connect(s) for d, s in sessions.items()}
    tasks = [task(n * 1000 + i, d) for i, d in enumerate(devices) for n in range(3)]
    store.create_campaign(CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks)
    sched.add_tasks(tasks)
    assert len(sched.pending) == 400  # one task per device leased at once

    looked_at: list[str] = []
    original = sched._can_take_work

    def spy(session: Any) -> bool:
        looked_at.append(session.device_id)
        return original(session)

    sched._can_take_work = spy  # type: ignore[method-assign]
    done = 0
    while done < len(tasks):
        for d in devices:
            for message in list(_drain(queues[d])):
                looked_at.clear()
                ack = asyncio.run(
                    sched.accept_result(sessions[d], result_for(message, sessions[d].agent_id))
                )
                assert ack.accepted
                done += 1
                assert set(looked_at) <= {d}  # the next assignment: this device only
                assert looked_at or not sched.pending
    assert counting.counts == 1  # not once per task
    assert store.get_campaign("c1").status is CampaignStatus.DONE  # type: ignore[union-attr]
    assert len(sched.pending) == 0 and not sched.open_tasks


def _drain(queue: Any) -> list[AssignMessage]:
    out = []
    while not queue.empty():
        message = queue.get_nowait()
        if isinstance(message, AssignMessage):
            out.append(message)
    return out

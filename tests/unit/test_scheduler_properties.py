"""A seeded property-based test of the scheduler (hypothesis, rule-based state machine).

Random interleavings of registration, connect / disconnect, heartbeats (own lease,
someone else's), results (under the current lease, under a stale one, forged with
another agent's lease, re-sent duplicates), abandoning a task, clock advances with lease
expiry, and coordinator restarts (a new :class:`Scheduler` restored from the same
store), driven with a fake clock against a real SQLite store. After every step:

- at most one live lease per task, and the store agrees with the scheduler about it;
- a device never holds two leases, nor an agent;
- a task's attempt number never decreases (across restarts too);
- a result is accepted only under its sender's current unexpired lease, or under the
  sender's own lease that ran out while no other agent leased the task since (a late
  result), or as an exact re-send of a stored result;
- every accepted result is stored exactly once; a task never has two result rows;
- no live lease has run out after :meth:`Scheduler.expire_leases`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from coordinator.scheduler import AgentSession, AssignMessage, Scheduler, agent_id_for
from edgefarm.domain import (
    DRAINING_REASON,
    CampaignStatus,
    TaskStatus,
)
from results.records import CampaignRecord
from results.store import ResultsStore
from tests.unit.scheduler_doubles import Clock, caps, result_for
from tests.unit.scheduler_doubles import task as make_task

# Thousands of store commits: on a RAM-backed folder where there is one, because late
# in a long test run each fsync on disk can wait for everything earlier tests wrote.
MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
LEASE_S = 10.0
HEARTBEAT_S = 2.0
MAX_ATTEMPTS = 3
TASKS = 5
# Two agents share dev-a (one measurement at a time there); a third measures on dev-b.
AGENTS = {"a1": "dev-a", "a2": "dev-a", "b1": "dev-b"}
NAMES = sorted(AGENTS)


AGENT_IDS = {name: agent_id_for(name, device) for name, device in AGENTS.items()}
AGENTS_BY_ID = {AGENT_IDS[name]: device for name, device in AGENTS.items()}


@dataclass
class Issued:
    """A lease the scheduler handed out (as seen in an agent's outbox)."""

    message: AssignMessage
    agent: str  # the agent name it was sent to

    @property
    def task_id(self) -> str:
        return self.message.assignment.task_id

    @property
    def lease_id(self) -> str:
        return self.message.assignment.lease_id

    @property
    def attempt(self) -> int:
        return self.message.assignment.attempt


@dataclass
class Accepted:
    """A result the scheduler accepted (not as a duplicate)."""

    task_id: str
    attempt: int
    lease_id: str
    agent_id: str


@dataclass
class AgentModel:
    """What one agent knows: its session and the leases it was sent."""

    session: AgentSession | None = None
    received: list[Issued] = field(default_factory=list)


class SchedulerMachine(RuleBasedStateMachine):
    """Drives one scheduler (and its restarts) over one store."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sched-props-", dir=MEMORY_DIR))
        self.store = ResultsStore.open(f"sqlite:///{self.dir / 'r.sqlite'}")
        self.loop = asyncio.new_event_loop()
        self.clock = Clock(1_000_000.0)
        self.sched = self._new_scheduler()
        self.agents: dict[str, AgentModel] = {name: AgentModel() for name in NAMES}
        self.issued: dict[str, Issued] = {}  # lease_id -> issue
        self.accepted: dict[str, Accepted] = {}  # task_id -> the accepted result
        self.attempts: dict[str, int] = {}  # task_id -> highest attempt seen
        self.free: dict[str, int] = {}  # task_id -> attempts handed back unstarted
        self.restarts = 0

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(
            self.store,
            lease_duration_s=LEASE_S,
            heartbeat_interval_s=HEARTBEAT_S,
            max_attempts=MAX_ATTEMPTS,
            clock=self.clock,
        )

    def teardown(self) -> None:
        self.loop.close()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----- helpers ------------------------------------------------------------------

    def _collect(self) -> None:
        """Read every agent's outbox: note the leases handed out."""
        for name, model in self.agents.items():
            session = model.session
            if session is None:
                continue
            while not session.outbox.empty():
                message = session.outbox.get_nowait()
                if isinstance(message, AssignMessage):
                    issue = Issued(message, name)
                    assert message.assignment.lease_id not in self.issued, "lease id reused"
                    self.issued[issue.lease_id] = issue
                    model.received.append(issue)
                    session_device = AGENTS[name]
                    task = self.sched.tasks[issue.task_id]
                    assert task.device_id == session_device, "assigned to another device"

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def _stored_rows(self) -> dict[str, list[tuple[int, str, str]]]:
        db = sqlite3.connect(self.dir / "r.sqlite")
        try:
            rows = db.execute(
                "SELECT r.task_id, r.attempt, t.lease_id, r.agent_id FROM results r "
                "JOIN tasks t ON t.task_id = r.task_id"
            ).fetchall()
        finally:
            db.close()
        out: dict[str, list[tuple[int, str, str]]] = {}
        for task_id, attempt, lease_id, agent_id in rows:
            out.setdefault(task_id, []).append((attempt, lease_id or "", agent_id or ""))
        return out

    # ----- rules --------------------------------------------------------------------

    @initialize()
    def campaign(self) -> None:
        tasks = [
            make_task(i, device_id="dev-a" if i % 2 == 0 else "dev-b", model=f"m{i}")
            for i in range(TASKS)
        ]
        self.store.create_campaign(
            CampaignRecord("c1", "props", "", CampaignStatus.RUNNING, 0.0), tasks
        )
        for name in NAMES:  # the fleet is up when the campaign comes
            self.register(name)
            self.connect(name)
        self.sched.add_tasks(tasks)
        self._collect()

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        device = AGENTS[name]
        session = self.sched.register(name, device, {}, caps(device))
        assert session.agent_id == AGENT_IDS[name]
        self.agents[name].session = session
        self._collect()

    @rule(name=st.sampled_from(NAMES))
    def connect(self, name: str) -> None:
        session = self.agents[name].session
        if session is None or session.connected:
            return
        if self.sched.sessions.get(session.agent_id) is not session:
            return  # replaced (or forgotten by a restart): the stream would be refused
        self.sched.connect(session)
        self._collect()

    @rule(name=st.sampled_from(NAMES))
    def disconnect(self, name: str) -> None:
        session = self.agents[name].session
        if session is not None:
            self.sched.disconnect(session)

    @rule(name=st.sampled_from(NAMES), whose=st.sampled_from(["own", "none", "other"]))
    def heartbeat(self, name: str, whose: str) -> None:
        session = self.agents[name].session
        if session is None:
            return
        task_id, lease_id = "", ""
        if whose == "own" and self.agents[name].received:
            issue = self.agents[name].received[-1]
            task_id, lease_id = issue.task_id, issue.lease_id
        elif whose == "other":
            others = [i for i in self.issued.values() if i.agent != name]
            if others:
                task_id, lease_id = others[-1].task_id, others[-1].lease_id
        before = {t: (lease.lease_id, lease.expires_at) for t, lease in self.sched.leases.items()}
        self.sched.heartbeat(session, task_id, lease_id)
        for t, lease in self.sched.leases.items():
            if t in before and lease.expires_at != before[t][1]:
                # Only the sender's own unexpired lease, named by the heartbeat, is renewed.
                assert t == task_id and lease.lease_id == lease_id, (t, lease, task_id)
                assert lease.agent_id == session.agent_id, "renewed someone else's lease"
        self._collect()

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0]))
    def healthy_tick(self, seconds: float) -> None:
        """Time passes; every connected agent heartbeats for the lease it was sent last."""
        self.clock.now += seconds
        for model in self.agents.values():
            session = model.session
            if session is not None and session.connected:
                last = model.received[-1] if model.received else None
                self.sched.heartbeat(
                    session, last.task_id if last else "", last.lease_id if last else ""
                )
        self.sched.expire_leases()
        self._collect()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 6.0, 9.0, 11.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        if self.sched.expire_leases():
            event("a lease expired")
        now = self.clock.now
        for lease in self.sched.leases.values():
            assert lease.expires_at >= now, f"an expired lease outlived expire_leases: {lease}"
        self._collect()

    @rule(
        name=st.sampled_from(NAMES),
        which=st.sampled_from(["latest", "oldest", "forged", "any"]),
        ok=st.booleans(),
        pick=st.integers(min_value=0, max_value=50),
    )
    def result(self, name: str, which: str, ok: bool, pick: int) -> None:
        model = self.agents[name]
        session = model.session
        if session is None:
            return
        if which == "forged":
            # Another agent's lease, as if this agent had learnt its ids.
            pool = [i for i in self.issued.values() if i.agent != name]
        elif which == "any":
            pool = list(self.issued.values())
        else:
            pool = model.received
        if not pool:
            return
        if which == "latest":
            issue = pool[-1]
        elif which == "oldest":
            issue = pool[0]
        else:
            issue = pool[pick % len(pool)]
        sender = session.agent_id
        result = result_for(issue.message, sender, AGENTS_BY_ID.get(sender, "dev-a"), ok)
        now = self.clock.now
        current = self.sched.leases.get(issue.task_id)
        finished_before = issue.task_id in self.accepted or issue.task_id not in self.sched.tasks
        sent_to_sender = self.issued[issue.lease_id].agent == name
        ack = self._run(self.sched.accept_result(session, result))
        if not ack.accepted:
            event(f"result refused: {ack.reason}")
            self._collect()
            return
        if ack.duplicate:
            event("result acknowledged as a duplicate")
            # An exact re-send of what is stored: same task, attempt, lease and agent.
            stored = self._stored_rows().get(issue.task_id, [])
            assert stored == [(issue.attempt, issue.lease_id, sender)], (stored, issue)
            self._collect()
            return
        assert not finished_before, f"a second result accepted for {issue.task_id}"
        assert sent_to_sender, "accepted a result under a lease never sent to its sender"
        in_force = (
            current is not None
            and current.lease_id == issue.lease_id
            and current.attempt == issue.attempt
            and current.agent_id == sender
            and current.expires_at >= now
        )
        # A late result: the sender's own lease ran out, and the task was not leased to
        # another agent since (it waited in the queue, or the sender got it back).
        late = not in_force and (current is None or current.agent_id == sender)
        assert in_force or late, (
            f"result accepted outside its lease: {issue.task_id} attempt {issue.attempt} "
            f"from {name}; lease in force: {current}"
        )
        event("result accepted " + ("under its lease" if in_force else "late"))
        self.accepted[issue.task_id] = Accepted(
            issue.task_id, issue.attempt, issue.lease_id, sender
        )
        stored = self._stored_rows().get(issue.task_id, [])
        assert stored == [(issue.attempt, issue.lease_id, sender)], (stored, issue)
        self._collect()

    @rule(name=st.sampled_from(NAMES), reason=st.sampled_from(["drain timeout", DRAINING_REASON]))
    def abandon(self, name: str, reason: str) -> None:
        """The agent gives its latest task back (cut short, or handed back unstarted)."""
        model = self.agents[name]
        if model.session is None or not model.received:
            return
        issue = model.received[-1]
        ended = self.sched.abandon(model.session, issue.task_id, issue.lease_id, reason)
        if ended and reason == DRAINING_REASON:  # handed back unstarted: a free attempt
            self.free[issue.task_id] = self.free.get(issue.task_id, 0) + 1
        self._collect()

    @rule()
    def restart(self) -> None:
        """The coordinator restarts: a new scheduler restored from the store; every
        agent must register again (it keeps the leases it was sent)."""
        self.sched = self._new_scheduler()
        self.sched.restore(self.store.unfinished_tasks())
        for model in self.agents.values():
            model.session = None
        self.restarts += 1

    # ----- invariants ---------------------------------------------------------------

    @invariant()
    def one_lease_per_task_device_and_agent(self) -> None:
        leases = list(self.sched.leases.values())
        for task_id, lease in self.sched.leases.items():
            assert lease.task_id == task_id
        devices = [lease.device_id for lease in leases]
        assert len(devices) == len(set(devices)), f"a device holds two leases: {leases}"
        holders = [lease.agent_id for lease in leases]
        assert len(holders) == len(set(holders)), f"an agent holds two leases: {leases}"
        for session in self.sched.sessions.values():
            if session.lease_id is not None:
                owned = [lease for lease in leases if lease.lease_id == session.lease_id]
                assert owned and owned[0].agent_id == session.agent_id, session

    @invariant()
    def store_agrees_on_leases(self) -> None:
        for task_id, lease in self.sched.leases.items():
            stored = self.store.get_task(task_id)
            assert stored is not None
            assert stored.status == TaskStatus.ASSIGNED, (stored.status, lease)
            assert (stored.lease_id, stored.attempt, stored.agent_id) == (
                lease.lease_id,
                lease.attempt,
                lease.agent_id,
            ), (stored, lease)

    @invariant()
    def attempts_never_decrease(self) -> None:
        for task in self.store.tasks_for_campaign("c1"):
            seen = self.attempts.get(task.task_id, 0)
            assert task.attempt >= seen, f"{task.task_id}: attempt {seen} -> {task.attempt}"
            self.attempts[task.task_id] = task.attempt
            live = self.sched.tasks.get(task.task_id)
            if live is not None:
                assert live.attempt >= seen
            assert task.attempt <= MAX_ATTEMPTS + self.free.get(task.task_id, 0), task

    @invariant()
    def each_result_stored_once(self) -> None:
        rows = self._stored_rows()
        for task_id, found in rows.items():
            assert len(found) == 1, f"{task_id} has {len(found)} result rows: {found}"
        for task_id, accepted in self.accepted.items():
            assert rows.get(task_id) == [
                (accepted.attempt, accepted.lease_id, accepted.agent_id)
            ], (task_id, rows.get(task_id), accepted)
        for task in self.store.tasks_for_campaign("c1"):
            if task.status in (TaskStatus.DONE, TaskStatus.FAILED):
                assert task.task_id in rows, f"{task.task_id} finished without a result row"
                assert task.task_id not in self.sched.leases, f"{task.task_id}: finished, leased"
            else:
                assert task.task_id not in rows, f"{task.task_id} has a row but is {task.status}"


TestSchedulerProperties = SchedulerMachine.TestCase
TestSchedulerProperties.settings = settings(
    derandomize=True,
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

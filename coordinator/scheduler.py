"""The scheduler: matches pending tasks to idle agents under leases.

It owns the live state of the fleet (sessions, leases, busy devices) and writes
every state change of a task to the store, so a restarted coordinator can rebuild
it. It knows nothing of gRPC: each connected agent has an outbox queue of domain
messages, which the gateway turns into protobuf (and unit tests read directly).

Rules:
- a task runs only on an agent of its device that has its backend and matches its
  selector;
- never two measurements at once on one device (several agents may share a host);
- a lease is renewed by the agent's heartbeats; an expired lease puts the task back
  in the queue (or fails it after ``max_attempts``);
- a result is accepted only under the task's current, unexpired lease, from the
  agent holding it; a heartbeat renews only the sender's own lease;
- store writes go through a :class:`~coordinator.store_writer.StoreWriter`, in order
  and (in the daemon) off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from coordinator.fleet_view import FleetView
from coordinator.pending import PendingQueue
from coordinator.store_writer import StoreWriter
from edgefarm.domain import (
    DRAINING_REASON,
    FINISHED_TASK_STATUSES,
    ArtifactRef,
    Assignment,
    CampaignStatus,
    DeviceCapabilities,
    MeasurementResult,
    TaskStatus,
)
from edgefarm.errors import LeaseExpired
from edgefarm.selectors import device_facts, matches
from edgefarm.wire_limits import MAX_RECONNECT_DELAY_S, SILENT_AFTER_HEARTBEATS
from results.records import AttemptRecord, DeviceSeen, TaskRecord
from results.store import ResultsStore

log = logging.getLogger(__name__)

# Liveness tunables (seconds); the coordinator's command line can override them.
HEARTBEAT_INTERVAL_S = 2.0
LEASE_DURATION_S = 15.0
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class AssignMessage:
    """Down the stream: work under a lease."""

    assignment: Assignment
    lease_expires_at: float


@dataclass(frozen=True)
class AckMessage:
    """Down the stream: whether a result was accepted."""

    task_id: str
    attempt: int
    accepted: bool
    reason: str = ""
    duplicate: bool = False  # the result had been stored already


@dataclass(frozen=True)
class CancelMessage:
    """Down the stream: stop working on a task."""

    task_id: str
    lease_id: str


@dataclass(frozen=True)
class CloseMessage:
    """Down the stream: end it with this status (e.g. the agent was revoked)."""

    code: str  # a grpc.StatusCode name
    reason: str


OutboundMessage = AssignMessage | AckMessage | CancelMessage | CloseMessage


@dataclass
class Lease:
    """Ownership of one task attempt by one agent until ``expires_at``."""

    lease_id: str
    task_id: str
    agent_id: str
    device_id: str
    attempt: int
    expires_at: float
    storing: asyncio.Event | None = None  # set while its result is written: no expiry


@dataclass
class AgentSession:
    """A registered agent and its live connection state."""

    agent_id: str
    name: str
    device_name: str
    capabilities: DeviceCapabilities
    labels: dict[str, str]
    session_token: str
    registered_at: float
    last_heartbeat: float
    facts: dict[str, set[str]] = field(default_factory=dict)
    connected: bool = False
    outbox: asyncio.Queue[OutboundMessage] = field(default_factory=asyncio.Queue)
    lease_id: str | None = None
    draining: bool = False  # the agent is stopping: it takes no new work

    @property
    def device_id(self) -> str:
        """The physical device this agent measures on."""
        return self.capabilities.device_id


@dataclass(frozen=True)
class ProgressEvent:
    """Something happened in a campaign (for watchers)."""

    campaign_id: str
    message: str


class SchedulerEvents:
    """What the scheduler reports as it happens, for metrics; every hook is a no-op here."""

    def lease_expired(self) -> None:
        """A lease ran out before its result came."""

    def requeued(self, why: str) -> None:
        """A task went back to the queue (``why``: lease expired, agent revoked, ...)."""

    def result_refused(self, reason: str) -> None:
        """A result was refused (``reason``: lease expired, lease superseded, ...)."""

    def result_stored(self, seconds: float) -> None:
        """A result was stored; ``seconds`` from its arrival to the end of the write."""


def agent_id_for(name: str, device_id: str) -> str:
    """A stable agent id: the same agent re-registering keeps its id (and leases)."""
    return "ag-" + hashlib.sha256(f"{name}\0{device_id}".encode()).hexdigest()[:12]


class Scheduler:
    """Live fleet state and task dispatch. All methods run on one event loop."""

    def __init__(
        self,
        store: ResultsStore,
        *,
        lease_duration_s: float = LEASE_DURATION_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        writer: StoreWriter | None = None,
        events: SchedulerEvents | None = None,
    ) -> None:
        self.store = store
        self.writer = writer or StoreWriter()
        self.events = events or SchedulerEvents()
        self.lease_duration_s = lease_duration_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_attempts = max_attempts
        self.clock = clock
        self.sessions: dict[str, AgentSession] = {}
        self.pending = PendingQueue()
        self.fleet = FleetView()  # every agent known, for device lists
        # device_id -> ids of the agents registered on it, in order (a dict as ordered set)
        self.agents_on: dict[str, dict[str, None]] = {}
        self.open_tasks: dict[str, int] = {}  # campaign_id -> its tasks not finished
        self.leases: dict[str, Lease] = {}  # task_id -> lease
        self.busy_devices: dict[str, str] = {}  # device_id -> task_id
        self.tasks: dict[str, TaskRecord] = {}  # unfinished tasks by id
        self.progress: dict[str, tuple[int, int]] = {}  # task_id -> (trial, trials)
        self.lost_by: dict[str, set[str]] = {}  # task_id -> agents whose lease on it lapsed
        self.lapsed: dict[str, list[Lease]] = {}  # task_id -> its leases that ran out
        self.leasing = True  # False once the coordinator is stopping
        self.free_attempts: dict[str, int] = {}  # task_id -> attempts that do not count
        self._watchers: dict[str, list[asyncio.Queue[ProgressEvent]]] = {}
        self._heartbeats: dict[str, float] = {}  # agent_id -> time, not yet written
        self._heartbeats_written = clock()

    @property
    def _silent_after_s(self) -> float:
        """An agent not heard from for longer than this gets no work."""
        return SILENT_AFTER_HEARTBEATS * self.heartbeat_interval_s

    # ----- agents -------------------------------------------------------------

    def register(
        self, name: str, device_name: str, labels: dict[str, str], caps: DeviceCapabilities
    ) -> AgentSession:
        """Record a (re-)registration; an agent keeps its id across reconnects."""
        now = self.clock()
        agent_id = agent_id_for(name, caps.device_id)
        old = self.sessions.get(agent_id)
        session = AgentSession(
            agent_id=agent_id,
            name=name,
            device_name=device_name,
            capabilities=caps,
            labels=dict(labels),
            session_token=secrets.token_hex(16),
            registered_at=now,
            last_heartbeat=now,
            facts=device_facts(caps, labels, device_name),
            lease_id=next(
                (lease.lease_id for lease in self.leases.values() if lease.agent_id == agent_id),
                None,
            ),
        )
        if old is not None and old.connected:
            # A second registration under the same name replaces the first stream.
            old.connected = False
            old.outbox.put_nowait(CloseMessage("ABORTED", "replaced by a newer registration"))
        self.sessions[agent_id] = session
        self.agents_on.setdefault(caps.device_id, {})[agent_id] = None
        seen = DeviceSeen(
            agent_id=agent_id,
            agent_name=name,
            device_id=caps.device_id,
            capabilities=_caps_dict(caps, device_name),
            labels=dict(labels),
            registered_at=now,
            last_heartbeat=now,
        )
        self.fleet.saw(seen)
        self.writer.post(self.store.upsert_device_seen, seen)
        log.info("agent %s (%s) registered on device %s", name, agent_id, caps.device_id)
        return session

    def authenticate(self, agent_id: str, session_token: str) -> AgentSession | None:
        """The session for a Hello or artifact request, if the credential is right."""
        session = self.sessions.get(agent_id)
        if session is None or not secrets.compare_digest(session.session_token, session_token):
            return None
        return session

    def connect(self, session: AgentSession) -> asyncio.Queue[OutboundMessage]:
        """Bind a stream to the session; returns the queue the stream should drain."""
        session.outbox = asyncio.Queue()
        session.connected = True
        session.last_heartbeat = self.clock()
        self.dispatch([session.device_id])
        return session.outbox

    def disconnect(self, session: AgentSession) -> None:
        """The stream ended. Its lease, if any, runs on until it expires."""
        if self.sessions.get(session.agent_id) is session:
            session.connected = False
            log.info("agent %s disconnected", session.name)

    def heartbeat(
        self, session: AgentSession, task_id: str, lease_id: str, draining: bool = False
    ) -> None:
        """Liveness; renews the lease of the task the agent says it holds, if it is
        that agent's own unexpired lease. A draining agent is given no more work."""
        now = self.clock()
        was_silent = now - session.last_heartbeat > self._silent_after_s
        session.last_heartbeat = now
        if draining and not session.draining:
            log.info("agent %s is draining: no new work for it", session.name)
        session.draining = session.draining or draining
        self._heartbeats[session.agent_id] = now
        lease = self.leases.get(task_id) if task_id else None
        if (
            lease is not None
            and lease.lease_id == lease_id
            and lease.agent_id == session.agent_id
            and lease.expires_at >= now
        ):
            lease.expires_at = now + self.lease_duration_s
        if was_silent and session.lease_id is None:
            self.dispatch([session.device_id])  # heard from again: it may take work now

    def flush_heartbeats(self, every_s: float = 5.0) -> None:
        """Write the latest heartbeat of each agent, at most once per ``every_s``, in one
        statement. Heartbeats live in memory: a crash loses at most the timestamps of
        the last ``every_s`` (plus the writer's queue), never a lease decision."""
        now = self.clock()
        if not self._heartbeats or now - self._heartbeats_written < every_s:
            return
        beats, self._heartbeats = self._heartbeats, {}
        self._heartbeats_written = now
        self.writer.post(self.store.touch_devices, beats)

    def revoke(self, agent_id: str) -> None:
        """An agent's credential was revoked: close its stream now and re-queue its task."""
        session = self.sessions.pop(agent_id, None)
        if session is not None:
            self.agents_on.get(session.device_id, {}).pop(agent_id, None)
            session.connected = False
            session.outbox.put_nowait(CloseMessage("UNAUTHENTICATED", "credential revoked"))
        self.fleet.enrolled(agent_id, revoked=True)
        for lease in list(self.leases.values()):
            # (a result already being written completes: it was sent before the revocation)
            if lease.agent_id == agent_id and lease.storing is None:
                self._lease_lost(lease, "agent revoked")
        self.dispatch()

    def abandon(self, session: AgentSession, task_id: str, lease_id: str, reason: str) -> bool:
        """The agent gave up its task without a result: end the lease now and re-queue
        the task (another agent first). An assignment handed back unstarted because the
        agent is stopping (``DRAINING_REASON``) does not count against the task's
        attempts, and marks the agent draining. Returns whether a lease of the sender's
        ended."""
        lease = self.leases.get(task_id)
        if (
            lease is None
            or lease.lease_id != lease_id
            or lease.agent_id != session.agent_id
            or lease.storing is not None
        ):
            return False
        log.info("agent %s abandoned %s: %s", session.name, task_id, reason)
        if reason == DRAINING_REASON:
            session.draining = True
            self.free_attempts[task_id] = self.free_attempts.get(task_id, 0) + 1
        self._lease_lost(lease, "abandoned", outcome="abandoned", detail=reason)
        self.dispatch([lease.device_id])
        return True

    def stop_leasing(self) -> None:
        """The coordinator is stopping: no new leases from now on."""
        self.leasing = False

    def report_progress(self, session: AgentSession, task_id: str, trial: int, trials: int) -> None:
        """Progress of a trial; counts as a heartbeat for the lease."""
        lease = self.leases.get(task_id)
        if lease is not None and lease.agent_id == session.agent_id:
            self.heartbeat(session, task_id, lease.lease_id)
            self.progress[task_id] = (trial, trials)

    # ----- tasks --------------------------------------------------------------

    def add_tasks(self, tasks: list[TaskRecord]) -> None:
        """Queue new tasks (already written to the store) and dispatch."""
        for task in tasks:
            if task.status in FINISHED_TASK_STATUSES:
                continue
            self._track(task)
            self.pending.append(task)
        self.dispatch({task.device_id for task in tasks})

    def restore(self, tasks: list[TaskRecord]) -> None:
        """Rebuild state after a restart: pending tasks queue up again; assigned ones
        keep their lease for one lease period plus the agents' longest reconnect delay,
        so that an agent retrying all along reconnects in time to deliver its result."""
        now = self.clock() + MAX_RECONNECT_DELAY_S
        for task in tasks:
            self._track(task)
            if task.status == TaskStatus.ASSIGNED and task.lease_id and task.agent_id:
                self.leases[task.task_id] = Lease(
                    lease_id=task.lease_id,
                    task_id=task.task_id,
                    agent_id=task.agent_id,
                    device_id=task.device_id,
                    attempt=task.attempt,
                    expires_at=now + self.lease_duration_s,
                )
                self.busy_devices[task.device_id] = task.task_id
            else:
                self.pending.append(task)
        log.info("restored %d unfinished tasks", len(tasks))

    def _track(self, task: TaskRecord) -> None:
        """Keep an unfinished task, and count it in its campaign's open tasks."""
        if task.task_id not in self.tasks:
            self.open_tasks[task.campaign_id] = self.open_tasks.get(task.campaign_id, 0) + 1
        self.tasks[task.task_id] = task

    def dispatch(self, devices: Iterable[str] | None = None) -> None:
        """Hand pending tasks of ``devices`` (default: every device with pending tasks)
        to idle, connected, live, matching agents: one task per free device. A task goes
        back to an agent that lost its lease only when no other agent can take it. The
        cost is that of the devices looked at, not of the fleet."""
        if not self.pending or not self.leasing:
            return
        for device_id in self.pending.devices() if devices is None else devices:
            if device_id in self.busy_devices:
                continue
            agents = [self.sessions[a] for a in self.agents_on.get(device_id, ())]
            idle = [s for s in agents if self._can_take_work(s)]
            for second_chance in (False, True):
                found = next(
                    (
                        (task, session)
                        for session in idle
                        if (task := self._first_task_for(session, second_chance)) is not None
                    ),
                    None,
                )
                if found is not None:
                    self._assign(*found)
                    break

    def _can_take_work(self, session: AgentSession) -> bool:
        """Idle, connected, not draining, heard from lately, and its device not busy."""
        return (
            session.connected
            and not session.draining
            and session.lease_id is None
            and session.device_id not in self.busy_devices
            and self.clock() - session.last_heartbeat <= self._silent_after_s
        )

    def _first_task_for(self, session: AgentSession, second_chance: bool) -> TaskRecord | None:
        for task in self.pending.for_device(session.device_id):
            if task.backend not in session.capabilities.backends:
                continue
            if task.selector and not matches(task.selector, session.facts):
                continue
            if session.agent_id in self.lost_by.get(task.task_id, ()) and not second_chance:
                continue
            return task
        return None

    def _assign(self, task: TaskRecord, session: AgentSession) -> None:
        now = self.clock()
        self.pending.remove(task)
        attempt = task.attempt + 1
        lease = Lease(
            lease_id=uuid.uuid4().hex,
            task_id=task.task_id,
            agent_id=session.agent_id,
            device_id=session.device_id,
            attempt=attempt,
            expires_at=now + self.lease_duration_s,
        )
        self.leases[task.task_id] = lease
        self.busy_devices[session.device_id] = task.task_id
        session.lease_id = lease.lease_id
        self._mark_held(task, lease)
        started = AttemptRecord(
            task_id=task.task_id,
            attempt=attempt,
            lease_id=lease.lease_id,
            agent_id=session.agent_id,
            started_at=now,
        )
        self.writer.post_many(self.store.lease_tasks, (started, lease.expires_at))
        assignment = Assignment(
            task_id=task.task_id,
            attempt=attempt,
            lease_id=lease.lease_id,
            campaign_id=task.campaign_id,
            model=task.model,
            backend=task.backend,
            scheme=task.scheme,
            artifact=ArtifactRef(task.artifact_sha256, task.artifact_size, task.artifact_name),
            eval_data=ArtifactRef(task.eval_sha256, task.eval_size, "eval.npz")
            if task.eval_sha256
            else None,
            settings=task.settings,
            options=dict(task.options),
        )
        session.outbox.put_nowait(AssignMessage(assignment, lease.expires_at))
        self._notify(task, f"{_label(task)} -> {session.name} (attempt {attempt})")

    async def accept_result(self, session: AgentSession, result: MeasurementResult) -> AckMessage:
        """Store a result if it comes under the task's current, unexpired lease held by
        the sending agent, or under the sender's own lease that ran out while the task
        was not re-leased to anyone else since (a result finished while the agent or
        the coordinator was away); a re-sent result that is stored already is
        acknowledged as stored. The write runs on the store writer; the lease cannot
        expire meanwhile."""
        session.last_heartbeat = self.clock()  # a result, too, says the agent is there
        lease = self.leases.get(result.task_id)
        if (
            lease is not None
            and lease.storing is not None
            and (lease.lease_id, lease.agent_id) == (result.lease_id, session.agent_id)
        ):
            # A re-send while the first copy is being written: answer once it is.
            await lease.storing.wait()
            lease = self.leases.get(result.task_id)
        now = self.clock()
        task = self.tasks.get(result.task_id)
        late = self._lapsed_lease_of(session, result)
        if task is not None and late is not None and self._reinstate(task, lease, late):
            lease = late
        reason = ""
        if task is None or lease is None:
            reason = "no lease in force for this task"
        elif lease.lease_id != result.lease_id or lease.attempt != result.attempt:
            reason = "lease superseded"
        elif lease.agent_id != session.agent_id:
            reason = "lease held by another agent"
        elif lease.expires_at < now and lease is not late:
            reason = "lease expired"
        if reason or task is None or lease is None:
            if reason != "lease held by another agent" and await self.writer.run(
                self._already_stored, session.agent_id, result
            ):
                log.info("result for %s from %s was stored already", result.task_id, session.name)
                return AckMessage(result.task_id, result.attempt, True, duplicate=True)
            log.warning("refused result for %s from %s: %s", result.task_id, session.name, reason)
            self.events.result_refused(reason)
            if late is not None:  # the sender's own attempt: its record says why
                self._end_attempt(late, "refused", reason)
            return AckMessage(result.task_id, result.attempt, False, reason)
        lease.storing = storing = asyncio.Event()
        arrived = time.monotonic()
        # The device is done with this task: its next one goes out now, while the result
        # is written (the agent takes new work with acknowledgements outstanding). The
        # lease itself stays until the result is stored: should the write fail, the
        # agent's re-send (it keeps a result until acknowledged) is accepted under it.
        self._free_device(lease)
        self.dispatch([lease.device_id])
        try:
            await self.writer.ingest(self.store, task, result, session.device_name)
        finally:
            lease.storing = None
            storing.set()
        self.events.result_stored(time.monotonic() - arrived)
        self._release(lease)
        self._end_attempt(lease, "result" if result.ok else "failed", result.error_kind)
        task.status = TaskStatus.DONE if result.ok else TaskStatus.FAILED
        self._forget(task.task_id)
        outcome = "done" if result.ok else f"failed ({result.error_kind}: {result.error_message})"
        if lease is late:
            outcome += f" (attempt {lease.attempt}, delivered after its lease ran out)"
        log.info("result for %s from %s stored: %s", task.task_id, session.name, outcome)
        self._notify(task, f"{_label(task)} on {session.name}: {outcome}")
        self._check_campaign(task.campaign_id)
        return AckMessage(result.task_id, result.attempt, True)

    def _lapsed_lease_of(self, session: AgentSession, result: MeasurementResult) -> Lease | None:
        """The sender's own lease for this result that ran out, if there was one."""
        for lease in self.lapsed.get(result.task_id, ()):
            if (lease.lease_id, lease.attempt, lease.agent_id) == (
                result.lease_id,
                result.attempt,
                session.agent_id,
            ):
                return lease
        return None

    def _reinstate(self, task: TaskRecord, current: Lease | None, late: Lease) -> bool:
        """Whether a result under the lapsed lease ``late`` can still be accepted: the
        task waits in the queue, or it was leased again to the same agent (which then
        measures it needlessly: that newer lease is superseded and cancelled). The
        task's record goes back to the lapsed lease, so that the result is stored under
        the lease it was measured under."""
        if current is not None:
            if current.agent_id != late.agent_id or current.storing is not None:
                return False
            holder = self.sessions.get(current.agent_id)
            if holder is not None and holder.connected:
                holder.outbox.put_nowait(CancelMessage(current.task_id, current.lease_id))
            self._release(current)
            self._end_attempt(current, "superseded", f"attempt {late.attempt} delivered late")
        elif not self.pending.remove(task):
            return False
        self.leases[task.task_id] = late
        self._hold(task, late)
        return True

    @staticmethod
    def _mark_held(task: TaskRecord, lease: Lease) -> None:
        """Record in memory that ``task`` is held under ``lease``."""
        task.status, task.attempt = TaskStatus.ASSIGNED, lease.attempt
        task.lease_id, task.agent_id = lease.lease_id, lease.agent_id
        task.lease_expires_at = lease.expires_at

    def _hold(self, task: TaskRecord, lease: Lease) -> None:
        """Record (in memory and in the store) that ``task`` is held under ``lease``."""
        self._mark_held(task, lease)
        self.writer.post(
            self.store.update_task,
            task.task_id,
            status=TaskStatus.ASSIGNED,
            attempt=lease.attempt,
            lease_id=lease.lease_id,
            agent_id=lease.agent_id,
            lease_expires_at=lease.expires_at,
        )

    def _end_attempt(self, lease: Lease, outcome: str, reason: str = "") -> None:
        end = (lease.task_id, lease.attempt, self.clock(), outcome, reason)
        self.writer.post_many(self.store.end_attempts, end)

    def _forget(self, task_id: str) -> None:
        """A task is finished: drop what the scheduler kept about it."""
        task = self.tasks.pop(task_id, None)
        if task is not None:
            self.open_tasks[task.campaign_id] -= 1
        self.lost_by.pop(task_id, None)
        self.lapsed.pop(task_id, None)
        self.free_attempts.pop(task_id, None)

    def _already_stored(self, agent_id: str, result: MeasurementResult) -> bool:
        """Whether this very result (task, attempt, lease, agent) is in the store."""
        stored = self.store.get_task(result.task_id)
        return (
            stored is not None
            and stored.result_id is not None
            and stored.status in (TaskStatus.DONE, TaskStatus.FAILED)
            and stored.attempt == result.attempt
            and stored.lease_id == result.lease_id
            and stored.agent_id == agent_id
        )

    def expire_leases(self) -> int:
        """Re-queue (or fail) tasks whose lease ran out; returns how many expired."""
        now = self.clock()
        expired = [
            lease
            for lease in self.leases.values()
            if lease.expires_at < now and lease.storing is None
        ]
        for lease in expired:
            holder = self.sessions.get(lease.agent_id)
            if holder is not None and holder.connected:
                holder.outbox.put_nowait(CancelMessage(lease.task_id, lease.lease_id))
            self.events.lease_expired()
            self._lease_lost(lease, "lease expired")
        if expired:
            self.dispatch({lease.device_id for lease in expired})
        return len(expired)

    def _lease_lost(self, lease: Lease, why: str, outcome: str = "lost", detail: str = "") -> None:
        """The holder of ``lease`` will not deliver (``why``): re-queue its task, or
        fail it after ``max_attempts``. Its attempt is recorded with ``outcome``."""
        task = self.tasks[lease.task_id]
        self._release(lease)
        reason = f"{why}: {detail}" if detail else why
        self._end_attempt(lease, outcome, reason)
        holder = self.sessions.get(lease.agent_id)
        log.warning(
            "task %s attempt %d on %s: %s",
            task.task_id,
            lease.attempt,
            holder.name if holder is not None else lease.agent_id,
            reason,
        )
        self.lost_by.setdefault(task.task_id, set()).add(lease.agent_id)
        if why == "lease expired":  # its result may still come (see accept_result)
            self.lapsed.setdefault(task.task_id, []).append(lease)
        counted = task.attempt - self.free_attempts.get(task.task_id, 0)
        if counted >= self.max_attempts:
            error = LeaseExpired(f"{why} {counted} times; giving up")
            self.writer.post(self.store.record_failure, task, error.kind, str(error))
            task.status = TaskStatus.FAILED
            self._forget(task.task_id)
            self._notify(task, f"{_label(task)}: failed ({error})")
            self._check_campaign(task.campaign_id)
        else:
            task.status, task.lease_id, task.agent_id = TaskStatus.PENDING, None, None
            self.writer.post(
                self.store.update_task,
                task.task_id,
                status=TaskStatus.PENDING,
                lease_id=None,
                agent_id=None,
            )
            self.pending.push_front(task)
            self.events.requeued(why)
            self._notify(task, f"{_label(task)}: {why}, re-queued")

    def _release(self, lease: Lease) -> None:
        self.leases.pop(lease.task_id, None)
        self.progress.pop(lease.task_id, None)
        self._free_device(lease)

    def _free_device(self, lease: Lease) -> None:
        """The lease no longer keeps its device and agent busy (it may still be held)."""
        if self.busy_devices.get(lease.device_id) == lease.task_id:
            del self.busy_devices[lease.device_id]
        holder = self.sessions.get(lease.agent_id)
        if holder is not None and holder.lease_id == lease.lease_id:
            holder.lease_id = None

    # ----- campaigns ----------------------------------------------------------

    def _check_campaign(self, campaign_id: str) -> None:
        """Once no task of the campaign is open here, finish it (after the writes queued
        so far, so that the store's counts include them): one count per campaign, not
        one per task."""
        if self.open_tasks.get(campaign_id, 0) > 0:
            return
        self.open_tasks.pop(campaign_id, None)
        self.writer.post(self._finish_campaign_if_done, campaign_id)

    def _finish_campaign_if_done(self, campaign_id: str) -> None:
        """On the store writer: mark the campaign finished if no task is open."""
        counts = self.store.campaign_counts(campaign_id)
        open_tasks = counts.get(TaskStatus.PENDING, 0) + counts.get(TaskStatus.ASSIGNED, 0)
        if open_tasks:
            return
        status = CampaignStatus.FAILED if counts.get(TaskStatus.FAILED, 0) else CampaignStatus.DONE
        self.store.set_campaign_status(campaign_id, status, finished_at=self.clock())
        event = ProgressEvent(campaign_id, f"campaign {status}")
        self.writer.call_on_loop(lambda: self._publish(event))

    def check_campaign(self, campaign_id: str) -> None:
        """Mark a campaign finished if no task is open (e.g. everything was reused)."""
        self._check_campaign(campaign_id)

    def watch(self, campaign_id: str) -> asyncio.Queue[ProgressEvent]:
        """Subscribe to a campaign's events."""
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        self._watchers.setdefault(campaign_id, []).append(queue)
        return queue

    def unwatch(self, campaign_id: str, queue: asyncio.Queue[ProgressEvent]) -> None:
        """Drop a subscription."""
        queues = self._watchers.get(campaign_id, [])
        if queue in queues:
            queues.remove(queue)

    def _notify(self, task: TaskRecord, message: str) -> None:
        self._publish(ProgressEvent(task.campaign_id, message))

    def _publish(self, event: ProgressEvent) -> None:
        for queue in self._watchers.get(event.campaign_id, []):
            queue.put_nowait(event)

    def running_tasks(self, campaign_id: str) -> int:
        """Tasks of a campaign under a lease now."""
        return sum(1 for lease in self.leases.values() if self._campaign_of(lease) == campaign_id)

    def _campaign_of(self, lease: Lease) -> str:
        task = self.tasks.get(lease.task_id)
        return task.campaign_id if task else ""

    def assigned_artifacts(self, session: AgentSession) -> set[str]:
        """The artifacts (model and eval data) of the tasks this agent holds leases for."""
        found: set[str] = set()
        for lease in self.leases.values():
            task = self.tasks.get(lease.task_id)
            if lease.agent_id == session.agent_id and task is not None:
                found.add(task.artifact_sha256)
                if task.eval_sha256:
                    found.add(task.eval_sha256)
        return found

    def online_sessions(self) -> list[AgentSession]:
        """Agents with a live stream."""
        return [s for s in self.sessions.values() if s.connected]


def _label(task: TaskRecord) -> str:
    return f"{task.model}/{task.backend}/{task.scheme} on {task.device_name}"


def _caps_dict(caps: DeviceCapabilities, device_name: str) -> dict[str, object]:
    data: dict[str, object] = asdict(caps)
    data["device_name"] = device_name
    return data

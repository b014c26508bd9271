"""The device agent: dial out, register, keep one stream open, measure what comes down.

One measurement at a time; each trial runs in a child process (``agent.runner``),
so a crash or hang fails that task, never the agent. Results stay in memory until
the coordinator acknowledges them and are sent again after a reconnect.

Stopping (:meth:`Agent.stop`, on SIGTERM / SIGINT under :func:`serve_agents`): the
agent takes no new work (heartbeats say ``draining``; an assignment that still comes is
given back as ``TaskAbandoned``), finishes the task in hand, delivers its result and
waits for the acknowledgement, then closes its stream. Past the drain timeout, or on a
second stop, the task in hand is cancelled (its measuring child killed) and given back
as abandoned; results never acknowledged are named in a warning.

Identity: the first registration presents the fleet token and receives this agent's
own credential, kept in ``<work_dir>/credential`` (owner-only); every later
registration presents the credential instead. A refusal (UNAUTHENTICATED: a wrong
or revoked credential) is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

import edgefarm
from agent.artifact_cache import ArtifactCache
from agent.backoff import Backoff
from agent.executor import Executor, LocalExecutor
from agent.metrics import AgentMetrics
from edgefarm.domain import DRAINING_REASON, Assignment, DeviceCapabilities, MeasurementResult
from edgefarm.errors import ArtifactError, AuthError, ConfigError, TaskError
from edgefarm.transport import ClientTls, aio_channel
from edgefarm.wire_limits import MAX_MESSAGE_BYTES
from protos.convert import assignment_from_pb, capabilities_to_pb, result_to_pb
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
FETCH_RETRIES = 3
CREDENTIAL_FILE = "credential"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # else a ping waits 60 s for its answer
    # Ping an idle stream too (the coordinator permits a ping every 5 s without calls),
    # so a silent coordinator is noticed while the agent waits for work.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
DRAIN_TIMEOUT_S = 300.0  # default of --drain-timeout
DRAIN_POLL_S = 0.1  # how often a draining agent checks whether it is done
CLOSE_TIMEOUT_S = 2.0  # how long a stopping agent waits for its stream to close
ABANDON_WAIT_S = 5.0  # how long a cancelled task may take to clean up (kill its child)


@dataclass
class AgentConfig:
    """How this agent presents itself and where it keeps its files."""

    coordinator: str
    token: str
    name: str
    work_dir: Path
    labels: dict[str, str] = field(default_factory=dict)
    cache_max_bytes: int | None = None  # the artifact cache's bound (None: unbounded)
    tls: ClientTls | None = None  # None: plaintext (loopback and trusted networks only)
    credential_file: Path | None = None  # default: <work_dir>/credential

    @property
    def credential_path(self) -> Path:
        """Where this agent keeps the credential issued at enrolment."""
        return self.credential_file or self.work_dir / CREDENTIAL_FILE


def read_credential(path: Path) -> str:
    """The stored credential ('' before enrolment); tightens loose file permissions."""
    try:
        text = path.read_text(encoding="ascii").strip()
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; making it owner-only", path)
            path.chmod(0o600)
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the agent credential {path}: {error}") from None
    return text


def write_credential(path: Path, credential: str) -> None:
    """Store a credential owner-only, atomically (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, credential.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Agent:
    """A long-running device agent."""

    def __init__(
        self,
        config: AgentConfig,
        capabilities: DeviceCapabilities,
        executor: Executor | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.capabilities = capabilities
        # What measures an assignment: this machine by default (a hub agent passes its own).
        self.executor: Executor = executor or LocalExecutor()
        self.cache = ArtifactCache(config.work_dir / "artifacts", config.cache_max_bytes)
        self.metrics = metrics or AgentMetrics()
        self.metrics.watch_cache(self.cache)
        self.backoff = Backoff()
        # What goes up the stream; None: half-close it (a stopping agent's last word).
        self.outgoing: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.assignments: asyncio.Queue[Assignment] = asyncio.Queue()
        self.unacked: dict[tuple[str, int], common_pb2.TaskResult] = {}
        self.current: Assignment | None = None
        self.current_job: asyncio.Task[MeasurementResult] | None = None
        self.stub: agent_pb2_grpc.AgentGatewayStub | None = None
        self.agent_id = ""
        self.session_token = ""
        self.connected = asyncio.Event()
        self.draining = False
        self._force_stop = asyncio.Event()  # a second stop: end the drain now
        self._stopped = asyncio.Event()  # the drain is over: run() returns
        self._closing = False  # the stream is being closed on purpose: do not reconnect
        self._drain_task: asyncio.Task[None] | None = None
        self._connection: asyncio.Task[None] | None = None
        self._abandoned: set[str] = set()  # lease ids of tasks this agent gave up

    async def run(self) -> None:
        """Serve until stopped (:meth:`stop`), reconnecting with jittered backoff.
        A refused token is final (:class:`AuthError`)."""
        worker = asyncio.create_task(self._work())
        self._connection = connection = asyncio.create_task(self._connect_forever())
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({connection, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # a final refusal raises here
                if self._drain_task is not None:  # the stream was closed by the drain
                    await self._drain_task
        finally:
            helpers = [connection, stopped, worker]
            if self._drain_task is not None:
                helpers.append(self._drain_task)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    def stop(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop gracefully: take no new work, finish the task in hand and deliver its
        result, then let :meth:`run` return. Past ``drain_timeout_s`` (or when called
        again) the task in hand is cancelled and given back as abandoned."""
        if self.draining:
            if not self._force_stop.is_set():
                log.warning("stopping now: the task in hand is given up")
            self._force_stop.set()
            return
        self.draining = True
        self.metrics.set_draining(True)
        current = self.current
        log.info(
            "stopping: %s; taking no new work (drain timeout %gs)",
            f"finishing task {current.task_id}" if current else "no task in hand",
            drain_timeout_s,
        )
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(drain_timeout_s))

    async def _drain(self, timeout_s: float) -> None:
        """Wait until nothing is left to do (or the timeout / a second stop), then close."""
        if self.connected.is_set():
            self.outgoing.put_nowait(self._heartbeat())  # tell the coordinator at once
        while not self.assignments.empty():  # came before the stop, not started yet
            self._give_back(self.assignments.get_nowait(), DRAINING_REASON)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        why = ""
        while self.current is not None or not self.assignments.empty() or self.unacked:
            if self._force_stop.is_set():
                why = "drain cut short (second stop signal)"
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = "drain timeout"
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._force_stop.wait(), min(DRAIN_POLL_S, remaining))
        if why:
            await self._abandon_current(why)
            if self.unacked:
                names = ", ".join(f"{task} (attempt {n})" for task, n in self.unacked)
                log.warning(
                    "stopping with %d result(s) the coordinator never acknowledged: %s",
                    len(self.unacked),
                    names,
                )
        await self._close()
        log.info("agent stopped%s", f" ({why})" if why else ": every result delivered")
        self._stopped.set()

    async def _abandon_current(self, reason: str) -> None:
        """Cancel the task in hand (killing its measuring child) and give it back."""
        current, job = self.current, self.current_job
        if current is None or job is None:
            return
        self._abandoned.add(current.lease_id)
        job.cancel()
        await asyncio.wait({job}, timeout=ABANDON_WAIT_S)
        log.warning("gave up task %s (attempt %d): %s", current.task_id, current.attempt, reason)
        self._give_back(current, reason)
        if not self.connected.is_set():
            log.warning(
                "the coordinator is unreachable and was not told; task %s goes back to "
                "its queue when its lease runs out",
                current.task_id,
            )

    def _give_back(self, a: Assignment, reason: str) -> None:
        """Tell the coordinator this agent will not (finish) measure ``a``."""
        self.outgoing.put_nowait(
            agent_pb2.AgentMessage(
                abandoned=agent_pb2.TaskAbandoned(
                    task_id=a.task_id, lease_id=a.lease_id, attempt=a.attempt, reason=reason
                )
            )
        )

    async def _close(self) -> None:
        """Half-close the stream after what is queued, and wait (bounded) for its end."""
        self._closing = True
        connection = self._connection
        if not self.connected.is_set() or connection is None:
            return
        self.outgoing.put_nowait(None)
        await asyncio.wait({connection}, timeout=CLOSE_TIMEOUT_S)

    async def _connect_forever(self) -> None:
        """Keep a session open, reconnecting with backoff, until the stream is closed on
        purpose (a final refusal raises)."""
        while not self._closing:
            try:
                await self._session()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise AuthError(
                        f"coordinator {self.config.coordinator} refused this agent: "
                        f"{error.details()}"
                    ) from None
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise AuthError(error.details() or "registration refused") from None
                if not self._closing:
                    log.warning(
                        "connection to %s lost: %s", self.config.coordinator, error.code().name
                    )
            finally:
                self.connected.clear()
                self.metrics.set_connected(False)
            if self._closing:
                return
            delay = self.backoff.next_delay()
            log.info("reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _register(self, stub: agent_pb2_grpc.AgentGatewayStub) -> agent_pb2.RegisterResponse:
        """Register with the credential; if it is refused, try to enrol with the fleet
        token once (a coordinator with a fresh store never saw the credential; one that
        did refuses the enrolment too, and the refusal is final)."""
        credential = read_credential(self.config.credential_path)
        try:
            return await stub.Register(
                self._register_request(credential), timeout=REGISTER_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            if not (credential and error.code() == grpc.StatusCode.UNAUTHENTICATED):
                raise
            log.warning("credential refused (%s); enrolling with the fleet token", error.details())
        return await stub.Register(self._register_request(""), timeout=REGISTER_TIMEOUT_S)

    def _register_request(self, credential: str) -> agent_pb2.RegisterRequest:
        return agent_pb2.RegisterRequest(
            token="" if credential else self.config.token,
            credential=credential,
            agent_version=edgefarm.__version__,
            protocol_version=edgefarm.PROTOCOL_VERSION,
            name=self.config.name,
            labels=self.config.labels,
            capabilities=capabilities_to_pb(self.capabilities),
        )

    async def _session(self) -> None:
        async with aio_channel(
            self.config.coordinator, self.config.tls, CHANNEL_OPTIONS
        ) as channel:
            stub = agent_pb2_grpc.AgentGatewayStub(channel)
            reply = await self._register(stub)
            if reply.credential:
                write_credential(self.config.credential_path, reply.credential)
                log.info("enrolled; credential kept in %s", self.config.credential_path)
            self.stub, self.agent_id, self.session_token = stub, reply.agent_id, reply.session_token
            log.info("registered with %s as %s", self.config.coordinator, reply.agent_id)
            call = stub.Connect()
            await call.write(
                agent_pb2.AgentMessage(
                    hello=agent_pb2.Hello(
                        agent_id=reply.agent_id, session_token=reply.session_token
                    )
                )
            )
            self.backoff.reset()
            kept = []
            while not self.outgoing.empty():  # stale progress / heartbeats go
                message = self.outgoing.get_nowait()
                self.outgoing.task_done()
                if message is not None and message.WhichOneof("body") == "abandoned":
                    kept.append(message)  # a task given back is still given back
            for message in kept:
                self.outgoing.put_nowait(message)
            for result in self.unacked.values():
                self.outgoing.put_nowait(agent_pb2.AgentMessage(result=result))
            self.connected.set()
            self.metrics.set_connected(True)
            helpers = [
                asyncio.create_task(self._heartbeats(reply.heartbeat_interval_s)),
                asyncio.create_task(self._write(call)),
            ]
            try:
                async for message in call:
                    self._handle(message)
            finally:
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)

    def _handle(self, message: agent_pb2.CoordinatorMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "assignment":
            assignment = assignment_from_pb(message.assignment)
            if self.draining:
                log.info("gave back %s at once: this agent is stopping", assignment.task_id)
                self._give_back(assignment, DRAINING_REASON)
                return
            log.info(
                "assigned %s %s/%s (attempt %d)",
                assignment.task_id,
                assignment.backend,
                assignment.scheme,
                assignment.attempt,
            )
            self.assignments.put_nowait(assignment)
        elif kind == "ack":
            ack = message.ack
            self.unacked.pop((ack.task_id, ack.attempt), None)
            if ack.duplicate:
                log.info(
                    "result of %s (attempt %d) acknowledged: stored already",
                    ack.task_id,
                    ack.attempt,
                )
            elif ack.accepted:
                log.info(
                    "result of %s (attempt %d) acknowledged: accepted", ack.task_id, ack.attempt
                )
            else:
                log.warning(
                    "result of %s (attempt %d) acknowledged: refused: %s",
                    ack.task_id,
                    ack.attempt,
                    ack.reason or "no reason given",
                )
        elif kind == "cancel":
            current = self.current
            if current is not None and current.lease_id == message.cancel.lease_id:
                log.warning("task %s cancelled by the coordinator", current.task_id)
                if self.current_job is not None:
                    self.current_job.cancel()

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            message = await self.outgoing.get()
            try:
                if message is None:
                    await call.done_writing()
                    return
                await call.write(message)
            finally:
                self.outgoing.task_done()

    def _heartbeat(self) -> agent_pb2.AgentMessage:
        current = self.current
        return agent_pb2.AgentMessage(
            heartbeat=agent_pb2.Heartbeat(
                task_id=current.task_id if current else "",
                lease_id=current.lease_id if current else "",
                draining=self.draining,
            )
        )

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            self.outgoing.put_nowait(self._heartbeat())
            await asyncio.sleep(interval_s)

    async def _work(self) -> None:
        while True:
            assignment = await self.assignments.get()
            if self.draining:
                self._give_back(assignment, DRAINING_REASON)
                continue
            self.current = assignment
            self.current_job = asyncio.create_task(self._execute(assignment))
            try:
                result = await self.current_job
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise
                # Given up by this agent (it says so itself), or cancelled by the
                # coordinator: either way, nothing to report.
                gave_up = assignment.lease_id in self._abandoned
                self.metrics.task_done("abandoned" if gave_up else "cancelled")
                continue
            finally:
                self.current, self.current_job = None, None
            if assignment.lease_id in self._abandoned:  # finished anyway: given back already
                continue
            if result.ok:
                self.metrics.task_done("ok")
            else:
                self.metrics.task_done("failed", result.error_kind)
            message = result_to_pb(result)
            self.unacked[(result.task_id, result.attempt)] = message
            self.outgoing.put_nowait(agent_pb2.AgentMessage(result=message))

    def _progress(self, a: Assignment, phase: str, trial: int = 0) -> None:
        self.outgoing.put_nowait(
            agent_pb2.AgentMessage(
                progress=agent_pb2.TaskProgress(
                    task_id=a.task_id,
                    lease_id=a.lease_id,
                    phase=phase,
                    trial=trial,
                    trials=a.settings.trials,
                )
            )
        )

    async def _fetch(self, a: Assignment, which: str) -> Path:
        ref = a.artifact if which == "model" else a.eval_data
        assert ref is not None
        task_refs = {r.sha256 for r in (a.artifact, a.eval_data) if r is not None}
        for attempt in range(FETCH_RETRIES):
            await self.connected.wait()
            assert self.stub is not None
            try:
                return await self.cache.fetch(
                    self.stub, self.agent_id, self.session_token, ref, keep=task_refs
                )
            except grpc.aio.AioRpcError as error:
                log.warning(
                    "fetching %s failed (%s), try %d", ref.name, error.code().name, attempt + 1
                )
                await asyncio.sleep(1.0)
        raise ArtifactError(f"could not download {ref.name} after {FETCH_RETRIES} tries")

    async def _execute(self, a: Assignment) -> MeasurementResult:
        result = MeasurementResult(
            task_id=a.task_id,
            attempt=a.attempt,
            lease_id=a.lease_id,
            agent_id=self.agent_id,
            device_id=self.capabilities.device_id,
            ok=False,
            batch_size=a.settings.batch_size,
            environment=self.fingerprint(),
        )
        try:
            self._progress(a, "fetching")
            model_path = await self._fetch(a, "model")
            eval_path = await self._fetch(a, "eval") if a.eval_data else None

            def progress(phase: str, trial: int = 0) -> None:
                self._progress(a, phase, trial)

            result.measure_started_at = time.time()
            try:
                report = await self.executor.execute(a, model_path, eval_path, progress)
            finally:
                result.measure_ended_at = time.time()
        except TaskError as error:
            log.warning("task %s failed: %s: %s", a.task_id, error.kind, error)
            result.error_kind, result.error_message = error.kind, str(error)
            return result
        result.ok = True
        result.trials = report.trials
        result.accuracy = report.accuracy
        result.backend_version = report.backend_version
        result.model_size_bytes = report.model_size_bytes
        result.example_outcomes = report.example_outcomes
        result.environment.update(report.environment)
        return result

    def fingerprint(self) -> dict[str, str]:
        """The agent-level part of every result's environment fingerprint."""
        c = self.capabilities
        return {
            "edgefarm": edgefarm.__version__,
            "agent": self.config.name,
            "device_id": c.device_id,
            "os": f"{c.os} {c.os_release}".strip(),
            "arch": c.arch,
            "cpu_model": c.cpu_model,
            "logical_cores": str(c.logical_cores),
            "ram_bytes": str(c.ram_bytes),
            "python": platform.python_version(),
        }


async def serve_agents(agents: list[Agent], drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Run ``agents`` until SIGTERM / SIGINT: the first signal stops each gracefully
    (:meth:`Agent.stop` with ``drain_timeout_s``), a second ends their drain at once.
    Returns when every agent has stopped; a final refusal of one raises."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("%s received", signal.Signals(signum).name)
        for agent in agents:
            agent.stop(drain_timeout_s)

    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(signum, on_signal, signum)
            handled.append(signum)
    try:
        await asyncio.gather(*(agent.run() for agent in agents))
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)

"""The device agent: dial out, register, keep one stream open, measure what comes down.

One measurement at a time; each trial runs in a child process (``agent.runner``),
so a crash or hang fails that task, never the agent. Results stay in memory until
the coordinator acknowledges them and are sent again after a reconnect.

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
from dataclasses import dataclass, field
from pathlib import Path

import grpc

import edgefarm
from agent.artifact_cache import ArtifactCache
from agent.backoff import Backoff
from agent.executor import Executor, LocalExecutor
from edgefarm.domain import Assignment, DeviceCapabilities, MeasurementResult
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
]


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
    ) -> None:
        self.config = config
        self.capabilities = capabilities
        # What measures an assignment: this machine by default (a hub agent passes its own).
        self.executor: Executor = executor or LocalExecutor()
        self.cache = ArtifactCache(config.work_dir / "artifacts", config.cache_max_bytes)
        self.backoff = Backoff()
        self.outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.assignments: asyncio.Queue[Assignment] = asyncio.Queue()
        self.unacked: dict[tuple[str, int], common_pb2.TaskResult] = {}
        self.current: Assignment | None = None
        self.current_job: asyncio.Task[MeasurementResult] | None = None
        self.stub: agent_pb2_grpc.AgentGatewayStub | None = None
        self.agent_id = ""
        self.session_token = ""
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Serve forever, reconnecting with jittered backoff. A refused token is final."""
        worker = asyncio.create_task(self._work())
        try:
            while True:
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
                    log.warning(
                        "connection to %s lost: %s", self.config.coordinator, error.code().name
                    )
                finally:
                    self.connected.clear()
                delay = self.backoff.next_delay()
                log.info("reconnecting in %.1fs", delay)
                await asyncio.sleep(delay)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

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
            while not self.outgoing.empty():  # stale progress / heartbeats
                self.outgoing.get_nowait()
            for result in self.unacked.values():
                self.outgoing.put_nowait(agent_pb2.AgentMessage(result=result))
            self.connected.set()
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
            log.info(
                "assigned %s %s/%s (attempt %d)",
                assignment.task_id,
                assignment.backend,
                assignment.scheme,
                assignment.attempt,
            )
            self.assignments.put_nowait(assignment)
        elif kind == "ack":
            self.unacked.pop((message.ack.task_id, message.ack.attempt), None)
            if message.ack.duplicate:
                log.info("result for %s had been stored already", message.ack.task_id)
            elif not message.ack.accepted:
                log.warning("result for %s refused: %s", message.ack.task_id, message.ack.reason)
        elif kind == "cancel":
            current = self.current
            if current is not None and current.lease_id == message.cancel.lease_id:
                log.warning("task %s cancelled by the coordinator", current.task_id)
                if self.current_job is not None:
                    self.current_job.cancel()

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            message = await self.outgoing.get()
            await call.write(message)

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            current = self.current
            self.outgoing.put_nowait(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(
                        task_id=current.task_id if current else "",
                        lease_id=current.lease_id if current else "",
                    )
                )
            )
            await asyncio.sleep(interval_s)

    async def _work(self) -> None:
        while True:
            assignment = await self.assignments.get()
            self.current = assignment
            self.current_job = asyncio.create_task(self._execute(assignment))
            try:
                result = await self.current_job
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise
                continue  # cancelled by the coordinator: nothing to report
            finally:
                self.current, self.current_job = None, None
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

            report = await self.executor.execute(a, model_path, eval_path, progress)
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

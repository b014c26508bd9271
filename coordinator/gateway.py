"""The AgentGateway gRPC service: registration, the agent stream, artifact download.

Protobuf stops here: every message is checked (:mod:`coordinator.validation`) and
converted to domain objects before the scheduler sees it; the scheduler's outbox
messages are converted back on the way down. Identity checks and store work run
off the event loop, so one agent's large result never delays another's heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

import edgefarm
from coordinator.artifacts import ArtifactStore
from coordinator.identity import admit
from coordinator.scheduler import (
    AckMessage,
    AgentSession,
    AssignMessage,
    CancelMessage,
    CloseMessage,
    OutboundMessage,
    Scheduler,
    agent_id_for,
)
from coordinator.validation import (
    check_ids,
    check_register,
    check_result,
    check_samples,
    check_sha256,
)
from edgefarm import wire_limits
from edgefarm.domain import MeasurementResult
from edgefarm.errors import AuthError
from protos.convert import assignment_to_pb, capabilities_from_pb, result_from_pb
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0  # a Connect stream must bind to a session within this
MAX_ABANDON_REASON_BYTES = 1024  # TaskAbandoned.reason (agent.proto)
REGISTER_BURST = 60  # registrations one peer address may make at once...
REGISTER_PER_S = 5.0  # ...and per second after that
_PEERS_TRACKED = 10_000
INLINE_RESULT_BYTES = 16 * 1024  # results up to this size are checked on the loop
# Results of one stream being stored at once, by count and by wire size (then the stream
# is not read until one is stored: backpressure). A result is stored in the next group
# commit, a fraction of a second or more under load, so an agent that finishes tasks
# quickly needs many in flight; the byte bound keeps the memory they hold per stream
# that of one largest message (a result above it is stored alone).
RESULTS_IN_FLIGHT = 32
RESULT_BYTES_IN_FLIGHT = wire_limits.MAX_MESSAGE_BYTES
# Put in a stream's outbox when the agent's side of the stream has ended.
_STREAM_ENDED = CloseMessage("OK", "the agent's stream ended")

PROTOCOL_LIMITS = agent_pb2.ProtocolLimits(
    max_message_bytes=wire_limits.MAX_MESSAGE_BYTES,
    max_trials=wire_limits.MAX_TRIALS,
    max_samples_per_trial=wire_limits.MAX_SAMPLES_PER_TRIAL,
    max_samples_per_result=wire_limits.MAX_SAMPLES_PER_RESULT,
    max_string_bytes=wire_limits.MAX_STRING_BYTES,
    max_map_entries=wire_limits.MAX_MAP_ENTRIES,
    max_example_outcomes=wire_limits.MAX_EXAMPLE_OUTCOMES,
)


def to_pb(message: OutboundMessage) -> agent_pb2.CoordinatorMessage:
    """Scheduler outbox message -> wire (a CloseMessage ends the stream instead)."""
    if isinstance(message, AssignMessage):
        return agent_pb2.CoordinatorMessage(
            assignment=assignment_to_pb(message.assignment, message.lease_expires_at)
        )
    if isinstance(message, AckMessage):
        return agent_pb2.CoordinatorMessage(
            ack=agent_pb2.ResultAck(
                task_id=message.task_id,
                attempt=message.attempt,
                accepted=message.accepted,
                reason=message.reason,
                duplicate=message.duplicate,
            )
        )
    assert isinstance(message, CancelMessage)
    return agent_pb2.CoordinatorMessage(
        cancel=agent_pb2.CancelTask(task_id=message.task_id, lease_id=message.lease_id)
    )


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7`` (the port changes per connection)."""
    head, sep, _ = peer.rpartition(":")
    return head if sep and head else peer


class RateLimiter:
    """A token bucket per peer address (the least recently seen peers are forgotten)."""

    def __init__(self, burst: float, per_s: float) -> None:
        self.burst, self.per_s = burst, per_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > _PEERS_TRACKED:
            self._buckets.popitem(last=False)
        return allowed


def _client_cert(context: grpc.aio.ServicerContext) -> bytes | None:
    """The verified client certificate (DER) under mutual TLS, else None."""
    certs = list(context.auth_context().get("x509_pem_cert") or [])
    return ssl.PEM_cert_to_DER_cert(bytes(certs[0]).decode("ascii")) if certs else None


class AgentGateway(agent_pb2_grpc.AgentGatewayServicer):
    """Serves agents."""

    def __init__(
        self,
        scheduler: Scheduler,
        artifacts: ArtifactStore,
        token: str,
        register_limiter: RateLimiter | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.artifacts = artifacts
        self.token = token
        self.register_limiter = register_limiter or RateLimiter(REGISTER_BURST, REGISTER_PER_S)
        self._deliveries: set[asyncio.Task[None]] = set()  # results being stored

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RegisterResponse:
        """Check the protocol version and the agent's identity (enrolling it on first
        contact with the fleet token); open a session."""
        if not self.register_limiter.allow(peer_host(context.peer())):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many registrations; retry later"
            )
        if request.protocol_version != edgefarm.PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"agent speaks protocol {request.protocol_version}, coordinator "
                f"{edgefarm.PROTOCOL_VERSION}: upgrade the older side",
            )
        problem = check_register(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        caps = capabilities_from_pb(request.capabilities)
        agent_id = agent_id_for(request.name, caps.device_id)
        try:
            admission = await asyncio.to_thread(
                admit,
                self.scheduler.store,
                self.token,
                token=request.token,
                agent_id=agent_id,
                name=request.name,
                device_id=caps.device_id,
                credential=request.credential,
                cert_der=_client_cert(context),
            )
        except AuthError as error:
            log.warning(
                "refused registration of %r from %s: %s", request.name, context.peer(), error
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if admission.credential:
            log.info("enrolled agent %s (%s)", request.name, agent_id)
            self.scheduler.fleet.enrolled(agent_id)
        device_name = request.labels.get("device") or caps.hostname or request.name
        session = self.scheduler.register(request.name, device_name, dict(request.labels), caps)
        return agent_pb2.RegisterResponse(
            agent_id=session.agent_id,
            session_token=session.session_token,
            heartbeat_interval_s=self.scheduler.heartbeat_interval_s,
            lease_duration_s=self.scheduler.lease_duration_s,
            coordinator_version=edgefarm.__version__,
            credential=admission.credential,
            limits=PROTOCOL_LIMITS,
        )

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        """Bind the stream to a session, then pump messages both ways."""
        messages = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(messages, None), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {HELLO_TIMEOUT_S:g} s"
            )
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be Hello")
        assert first is not None
        session = self.scheduler.authenticate(first.hello.agent_id, first.hello.session_token)
        if session is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or stale session")
        assert session is not None
        outbox = self.scheduler.connect(session)
        reader = asyncio.create_task(self._read(session, messages))
        # The agent's side ended: say so through this stream's own queue (one wait per
        # message, no task per message).
        reader.add_done_callback(lambda _: outbox.put_nowait(_STREAM_ENDED))
        try:
            while True:
                message = await outbox.get()
                if message is _STREAM_ENDED:
                    break
                if isinstance(message, CloseMessage):
                    await context.abort(grpc.StatusCode[message.code], message.reason)
                yield to_pb(message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.scheduler.disconnect(session)

    async def _read(
        self, session: AgentSession, messages: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        """Handle what the agent sends; a bad message is answered and logged, and the
        stream goes on. Results are stored concurrently (up to
        :data:`RESULTS_IN_FLIGHT` and :data:`RESULT_BYTES_IN_FLIGHT` per stream), so
        that one result's write never holds up the agent's next result or heartbeat; each
        runs to its end even if the stream ends meanwhile."""
        in_flight: dict[asyncio.Task[None], int] = {}  # delivery -> its result's wire size
        async for message in messages:
            try:
                if message.WhichOneof("body") != "result":
                    await self._handle(session, message)
                    continue
                size = message.result.ByteSize()
                while in_flight and (
                    len(in_flight) >= RESULTS_IN_FLIGHT
                    or sum(in_flight.values()) + size > RESULT_BYTES_IN_FLIGHT
                ):
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                delivery = asyncio.create_task(self._deliver(session, message.result))
                in_flight[delivery] = size
                delivery.add_done_callback(lambda done: in_flight.pop(done, None))
                self._deliveries.add(delivery)
                delivery.add_done_callback(self._deliveries.discard)
            except Exception:  # a bug must not end the agent's stream
                log.exception("handling a message from %s failed", session.name)

    async def _deliver(self, session: AgentSession, pb: common_pb2.TaskResult) -> None:
        """Store one result and answer it on the session's stream."""
        try:
            session.outbox.put_nowait(await self._result(session, pb))
        except Exception:
            log.exception("storing a result from %s failed", session.name)

    async def _handle(self, session: AgentSession, message: agent_pb2.AgentMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            beat = message.heartbeat
            if problem := check_ids(beat.task_id, beat.lease_id):
                log.warning("ignored heartbeat from %s: %s", session.name, problem)
                return
            self.scheduler.heartbeat(session, beat.task_id, beat.lease_id, beat.draining)
        elif kind == "progress":
            p = message.progress
            if problem := check_ids(p.task_id, p.lease_id):
                log.warning("ignored progress from %s: %s", session.name, problem)
                return
            self.scheduler.report_progress(session, p.task_id, p.trial, p.trials)
        elif kind == "abandoned":
            gave_up = message.abandoned
            problem = check_ids(gave_up.task_id, gave_up.lease_id)
            if not problem and len(gave_up.reason) > MAX_ABANDON_REASON_BYTES:
                problem = f"reason is longer than {MAX_ABANDON_REASON_BYTES} bytes"
            if problem:
                log.warning("ignored an abandoned task from %s: %s", session.name, problem)
                return
            reason = "".join(c if c.isprintable() else "?" for c in gave_up.reason)
            if not self.scheduler.abandon(session, gave_up.task_id, gave_up.lease_id, reason):
                log.info(
                    "%s abandoned %s, which it holds no lease for", session.name, gave_up.task_id
                )
        else:
            log.warning("ignored a message of unknown kind from %s", session.name)

    async def _result(self, session: AgentSession, pb: common_pb2.TaskResult) -> AckMessage:
        def check_and_convert() -> str | MeasurementResult:
            problem = check_result(pb)
            if problem:
                return problem
            result = result_from_pb(pb, session.agent_id, session.device_id)
            return check_samples(result) or result

        # A large result is checked off the loop; a small one costs less than the hop.
        small = pb.ByteSize() <= INLINE_RESULT_BYTES
        checked = check_and_convert() if small else await asyncio.to_thread(check_and_convert)
        if isinstance(checked, str):
            log.warning("refused result for %.64s from %s: %s", pb.task_id, session.name, checked)
            self.scheduler.events.result_refused(f"invalid result: {checked}")
            return AckMessage(pb.task_id, pb.attempt, False, f"invalid result: {checked}")
        return await self.scheduler.accept_result(session, checked)

    async def FetchArtifact(
        self, request: agent_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        """Stream an artifact of one of the agent's assigned tasks, from an offset."""
        session = self.scheduler.authenticate(request.agent_id, request.session_token)
        if session is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or stale session")
        assert session is not None
        if problem := check_sha256(request.sha256):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            size = self.artifacts.path(request.sha256).stat().st_size
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"artifact {request.sha256[:12]} is not in the store"
            )
        if request.sha256 not in self.scheduler.assigned_artifacts(session):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"artifact {request.sha256[:12]} is not part of a task assigned to this agent",
            )
        if request.offset > size:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"offset {request.offset} is beyond the artifact's size ({size} bytes)",
            )
        chunks = self.artifacts.read_chunks(request.sha256, request.offset)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            offset, data, total = chunk
            yield agent_pb2.ArtifactChunk(
                offset=offset, data=data, total_size=total, sha256=request.sha256
            )

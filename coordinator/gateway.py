"""The AgentGateway gRPC service: registration, the agent stream, artifact download.

Protobuf stops here: requests are converted to domain objects and handed to the
scheduler; the scheduler's outbox messages are converted back on the way down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import grpc

import edgefarm
from coordinator.artifacts import ArtifactStore
from coordinator.scheduler import (
    AckMessage,
    AgentSession,
    AssignMessage,
    OutboundMessage,
    Scheduler,
)
from edgefarm.errors import ArtifactError
from protos.convert import assignment_to_pb, capabilities_from_pb, result_from_pb
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)


def token_ok(expected: str, given: str) -> bool:
    """Constant-time token check."""
    return secrets.compare_digest(expected.encode(), given.encode())


def to_pb(message: OutboundMessage) -> agent_pb2.CoordinatorMessage:
    """Scheduler outbox message -> wire."""
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
            )
        )
    return agent_pb2.CoordinatorMessage(
        cancel=agent_pb2.CancelTask(task_id=message.task_id, lease_id=message.lease_id)
    )


class AgentGateway(agent_pb2_grpc.AgentGatewayServicer):
    """Serves agents."""

    def __init__(self, scheduler: Scheduler, artifacts: ArtifactStore, token: str) -> None:
        self.scheduler = scheduler
        self.artifacts = artifacts
        self.token = token

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RegisterResponse:
        """Check the token and protocol version; open a session."""
        if not token_ok(self.token, request.token):
            log.warning("refused registration of %r: invalid token", request.name)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid fleet token")
        if request.protocol_version != edgefarm.PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"agent speaks protocol {request.protocol_version}, coordinator "
                f"{edgefarm.PROTOCOL_VERSION}: upgrade the older side",
            )
        if not request.name or not request.capabilities.device_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name and device_id required")
        caps = capabilities_from_pb(request.capabilities)
        device_name = request.labels.get("device") or caps.hostname or request.name
        session = self.scheduler.register(request.name, device_name, dict(request.labels), caps)
        return agent_pb2.RegisterResponse(
            agent_id=session.agent_id,
            session_token=session.session_token,
            heartbeat_interval_s=self.scheduler.heartbeat_interval_s,
            lease_duration_s=self.scheduler.lease_duration_s,
            coordinator_version=edgefarm.__version__,
        )

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        """Bind the stream to a session, then pump messages both ways."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be Hello")
        assert first is not None
        session = self.scheduler.authenticate(first.hello.agent_id, first.hello.session_token)
        if session is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or stale session")
        assert session is not None
        outbox = self.scheduler.connect(session)
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            while True:
                getter = asyncio.create_task(outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                yield to_pb(getter.result())
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.scheduler.disconnect(session)

    async def _read(
        self, session: AgentSession, request_iterator: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("body")
            if kind == "heartbeat":
                self.scheduler.heartbeat(
                    session, message.heartbeat.task_id, message.heartbeat.lease_id
                )
            elif kind == "progress":
                p = message.progress
                self.scheduler.report_progress(session, p.task_id, p.trial, p.trials)
            elif kind == "result":
                result = result_from_pb(message.result, session.agent_id, session.device_id)
                ack = self.scheduler.accept_result(session, result)
                session.outbox.put_nowait(ack)

    async def FetchArtifact(
        self, request: agent_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        """Stream an artifact in chunks from the requested offset."""
        if self.scheduler.authenticate(request.agent_id, request.session_token) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or stale session")
        try:
            for offset, data, total in self.artifacts.read_chunks(request.sha256, request.offset):
                yield agent_pb2.ArtifactChunk(
                    offset=offset, data=data, total_size=total, sha256=request.sha256
                )
        except ArtifactError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))

"""Fleet trust, probed as an attacker with a network position or one enrolled device would.

A real coordinator gRPC server (in-process, no Ray: tasks are queued straight into
its scheduler) over plaintext, TLS and mutual TLS; raw protocol stubs play the agents.
Every probe asserts the status code (or the refused ack) and that the coordinator
keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import edgefarm
from coordinator.server import CoordinatorConfig, create_server
from edgefarm.domain import ArtifactRef, CampaignStatus, MeasureSettings
from edgefarm.transport import ClientTls, aio_channel
from edgefarm.wire_limits import MAX_MESSAGE_BYTES, MAX_STRING_BYTES, MAX_TRIALS
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2, control_pb2, control_pb2_grpc
from results.records import CampaignRecord, TaskRecord
from tests.tlscerts import Authority, make_ca

pytest.importorskip("cryptography", reason="test certificates need the dev extra")

FLEET_TOKEN = "fleet-enrolment-secret"
TRANSPORTS = ["plaintext", "tls", "mutual-tls"]
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


@dataclass
class Farm:
    """A running coordinator and how to dial it."""

    address: str
    scheduler: object
    ca: Authority | None
    mutual: bool
    sha: str
    tmp: Path
    tasks: int = 0
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def tls(self, client: str = "agent-a") -> ClientTls | None:
        if self.ca is None:
            return None
        if not self.mutual:
            return self.ca.client_tls()
        return self.ca.client_tls(self.ca.issue(client, server=False))

    def channel(self, client: str = "agent-a") -> grpc.aio.Channel:
        channel = aio_channel(self.address, self.tls(client), CHANNEL_OPTIONS)
        self.channels.append(channel)
        return channel

    def gateway(self, client: str = "agent-a") -> agent_pb2_grpc.AgentGatewayStub:
        return agent_pb2_grpc.AgentGatewayStub(self.channel(client))

    def control(self) -> control_pb2_grpc.ControlStub:
        return control_pb2_grpc.ControlStub(self.channel("operator"))

    async def queue_task(self, device_id: str) -> str:
        """A noop task for ``device_id``, queued as a submitted campaign would be."""
        self.tasks += 1
        task_id = f"t-{self.tasks}"
        record = TaskRecord(
            task_id=task_id,
            campaign_id=f"c-{task_id}",
            model="m",
            backend="noop",
            scheme="none",
            device_id=device_id,
            device_name=device_id,
            artifact_sha256=self.sha,
            artifact_size=5,
            artifact_name="m.bin",
            eval_sha256=None,
            eval_size=0,
            settings=MeasureSettings(),
            measure_key=f"k-{task_id}",
            created_at=time.time(),
        )
        sched = self.scheduler
        campaign = CampaignRecord(record.campaign_id, "c", "", CampaignStatus.RUNNING, time.time())
        await sched.writer.run(sched.store.create_campaign, campaign, [record])  # type: ignore[attr-defined]
        sched.add_tasks([record])  # type: ignore[attr-defined]
        return task_id

    async def still_serving(self) -> None:
        """A new agent can still enrol, and the control service answers."""
        stub = self.gateway("late-agent")
        reply = await stub.Register(register("late", "dev-late"), timeout=10)
        assert reply.credential
        devices = await self.control().ListDevices(
            control_pb2.ListDevicesRequest(token=FLEET_TOKEN), timeout=10
        )
        assert any(d.device_id == "dev-late" for d in devices.devices)


def register(
    name: str, device_id: str, *, token: str = FLEET_TOKEN, credential: str = ""
) -> agent_pb2.RegisterRequest:
    return agent_pb2.RegisterRequest(
        token=token,
        credential=credential,
        agent_version=edgefarm.__version__,
        protocol_version=edgefarm.PROTOCOL_VERSION,
        name=name,
        capabilities=common_pb2.DeviceCapabilities(
            device_id=device_id, hostname=device_id, backends={"noop": "1"}
        ),
    )


def run_farm(
    transport: str, tmp_path: Path, probe: Callable[[Farm], Awaitable[None]], lease_s: float = 30
) -> None:
    """Start a coordinator over ``transport``, run ``probe`` against it, stop it."""
    ca = make_ca(tmp_path / "ca") if transport != "plaintext" else None
    tls = None
    if ca is not None:
        tls = ca.server_tls(ca.issue("coordinator", server=True), client_auth=transport != "tls")
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        store_url=f"sqlite:///{tmp_path / 'results.sqlite'}",
        home=tmp_path / "home",
        token=FLEET_TOKEN,
        tls=tls,
        lease_duration_s=lease_s,
        heartbeat_interval_s=0.5,
    )

    async def main() -> None:
        server, port, scheduler = await create_server(config)
        model = tmp_path / "m.bin"
        model.write_bytes(b"model")
        artifacts = tmp_path / "home" / "artifacts"
        from coordinator.artifacts import ArtifactStore

        ref: ArtifactRef = ArtifactStore(artifacts).put_file(model, "m.bin")
        farm = Farm(
            f"127.0.0.1:{port}", scheduler, ca, transport == "mutual-tls", ref.sha256, tmp_path
        )

        async def expire_leases() -> None:  # what the daemon's serve() loop does
            while True:
                await asyncio.sleep(0.2)
                scheduler.expire_leases()

        watcher = asyncio.create_task(expire_leases())
        try:
            await asyncio.wait_for(probe(farm), 60)
        finally:
            watcher.cancel()
            for channel in farm.channels:
                await channel.close()
            await server.stop(0)
            scheduler.writer.close()
            scheduler.store.close()

    asyncio.run(main())


@dataclass
class Stream:
    """An agent's Connect stream, with what came down so far."""

    call: grpc.aio.StreamStreamCall
    inbox: asyncio.Queue[agent_pb2.CoordinatorMessage]
    reader: asyncio.Task[None]

    async def next(self, kind: str, timeout: float = 10.0) -> agent_pb2.CoordinatorMessage:
        while True:
            message = await asyncio.wait_for(self.inbox.get(), timeout)
            if message.WhichOneof("body") == kind:
                return message

    async def send_result(self, result: common_pb2.TaskResult) -> agent_pb2.ResultAck:
        await self.call.write(agent_pb2.AgentMessage(result=result))
        return (await self.next("ack")).ack

    async def ended_with(self, timeout: float = 10.0) -> grpc.StatusCode:
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        return await self.call.code()


async def connect(
    stub: agent_pb2_grpc.AgentGatewayStub, reply: agent_pb2.RegisterResponse
) -> Stream:
    call = stub.Connect()
    await call.write(
        agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(agent_id=reply.agent_id, session_token=reply.session_token)
        )
    )
    inbox: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for message in call:
                inbox.put_nowait(message)
        except grpc.aio.AioRpcError:
            pass

    return Stream(call, inbox, asyncio.create_task(pump()))


def result_for(assignment: agent_pb2.TaskAssignment, samples: list[float]) -> common_pb2.TaskResult:
    return common_pb2.TaskResult(
        task_id=assignment.task_id,
        attempt=assignment.attempt,
        lease_id=assignment.lease_id,
        ok=True,
        trials=[
            common_pb2.Trial(
                samples_ms=samples,
                warmup_iterations=1,
                duration_s=0.01,
                load_time_s=0.01,
                valid=True,
            )
        ],
    )


async def rpc_code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def stream_code(call: AsyncIterator[object]) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_enrolment_and_takeover(transport: str, tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        stub = farm.gateway("agent-a")
        first = await stub.Register(register("a", "dev-a"), timeout=10)
        assert len(first.credential) >= 32 and first.limits.max_trials == MAX_TRIALS
        again = await stub.Register(
            register("a", "dev-a", token="", credential=first.credential), timeout=10
        )
        assert again.agent_id == first.agent_id and not again.credential
        # Another holder of the fleet token claims the enrolled identity...
        thief = farm.gateway("agent-thief")
        assert await rpc_code(thief.Register(register("a", "dev-a"), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # ...or guesses a credential.
        assert (
            await rpc_code(thief.Register(register("a", "dev-a", credential="x" * 43), timeout=10))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        # A new agent without the fleet token cannot enrol.
        assert (
            await rpc_code(thief.Register(register("b", "dev-b", token="guess"), timeout=10))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        # The real agent still works.
        stream = await connect(stub, again)
        task_id = await farm.queue_task("dev-a")
        assert (await stream.next("assignment")).assignment.task_id == task_id
        await farm.still_serving()

    run_farm(transport, tmp_path, probe)


def test_mutual_tls_certificate_is_the_credential(tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        assert farm.ca is not None
        own = farm.ca.client_tls(farm.ca.issue("agent-a-cert", server=False))
        other = farm.ca.client_tls(farm.ca.issue("agent-b-cert", server=False))
        channel = aio_channel(farm.address, own, CHANNEL_OPTIONS)
        farm.channels.append(channel)
        stub = agent_pb2_grpc.AgentGatewayStub(channel)
        assert (await stub.Register(register("a", "dev-a"), timeout=10)).credential
        # The same certificate and no credential: admitted.
        again = await stub.Register(register("a", "dev-a", token=""), timeout=10)
        assert again.agent_id and not again.credential
        # Another agent's certificate (same CA) cannot take the identity over.
        foreign = aio_channel(farm.address, other, CHANNEL_OPTIONS)
        farm.channels.append(foreign)
        thief = agent_pb2_grpc.AgentGatewayStub(foreign)
        assert await rpc_code(thief.Register(register("a", "dev-a"), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        await farm.still_serving()

    run_farm("mutual-tls", tmp_path, probe)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_revocation_closes_the_stream_and_moves_the_task(transport: str, tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        a_stub, b_stub = farm.gateway("agent-a"), farm.gateway("agent-b")
        a = await a_stub.Register(register("a", "dev-x"), timeout=10)
        a_stream = await connect(a_stub, a)
        task_id = await farm.queue_task("dev-x")
        held = (await a_stream.next("assignment")).assignment
        assert held.task_id == task_id
        b = await b_stub.Register(register("b", "dev-x"), timeout=10)
        b_stream = await connect(b_stub, b)
        started = time.monotonic()
        reply = await farm.control().RevokeAgent(
            control_pb2.RevokeAgentRequest(token=FLEET_TOKEN, name="a"), timeout=10
        )
        assert list(reply.agent_ids) == [a.agent_id]
        assert await a_stream.ended_with() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 5  # at once, not after a lease
        moved = (await b_stream.next("assignment")).assignment
        assert moved.task_id == task_id and moved.attempt == held.attempt + 1
        # Refused from then on, with its credential, its old session or the fleet token.
        for request in (
            register("a", "dev-x", token="", credential=a.credential),
            register("a", "dev-x"),
        ):
            assert await rpc_code(a_stub.Register(request, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        fetch = a_stub.FetchArtifact(
            agent_pb2.FetchArtifactRequest(
                agent_id=a.agent_id, session_token=a.session_token, sha256=farm.sha
            )
        )
        assert (await stream_code(fetch))[0] == grpc.StatusCode.UNAUTHENTICATED
        devices = await farm.control().ListDevices(
            control_pb2.ListDevicesRequest(token=FLEET_TOKEN), timeout=10
        )
        (device,) = [d for d in devices.devices if d.device_id == "dev-x"]
        assert dict(device.enrolment) == {"a": "revoked", "b": "enrolled"}
        await farm.still_serving()

    run_farm(transport, tmp_path, probe)


# ----------------------------------------------------------------------------- leases


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forged_lease_and_wrong_session(transport: str, tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        a_stub, b_stub = farm.gateway("agent-a"), farm.gateway("agent-b")
        a = await a_stub.Register(register("a", "dev-a"), timeout=10)
        b = await b_stub.Register(register("b", "dev-b"), timeout=10)
        a_stream, b_stream = await connect(a_stub, a), await connect(b_stub, b)
        await farm.queue_task("dev-a")
        held = (await a_stream.next("assignment")).assignment
        # b knows a's task and lease: its heartbeats do not keep a's lease alive (a only
        # says it is there, naming no task)...
        for _ in range(8):
            await b_stream.call.write(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(task_id=held.task_id, lease_id=held.lease_id)
                )
            )
            await a_stream.call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
            await asyncio.sleep(0.25)
        cancel = (await a_stream.next("cancel", timeout=10)).cancel
        assert cancel.lease_id == held.lease_id
        # ...and its result under a's (now re-issued) task is refused.
        again = (await a_stream.next("assignment")).assignment
        forged = await b_stream.send_result(result_for(again, [1.0]))
        assert not forged.accepted and forged.reason == "lease held by another agent"
        # A Hello with a's id and b's session token, or none at all, is refused.
        call = b_stub.Connect()
        await call.write(
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(agent_id=a.agent_id, session_token=b.session_token)
            )
        )
        assert (await stream_code(call))[0] == grpc.StatusCode.UNAUTHENTICATED
        call = b_stub.Connect()
        await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
        assert (await stream_code(call))[0] == grpc.StatusCode.INVALID_ARGUMENT
        # The real holder's result is accepted, and a re-send is acknowledged as stored.
        ok = await a_stream.send_result(result_for(again, [1.0, 2.0]))
        assert ok.accepted and not ok.duplicate
        dup = await a_stream.send_result(result_for(again, [1.0, 2.0]))
        assert dup.accepted and dup.duplicate
        await farm.still_serving()

    run_farm(transport, tmp_path, probe, lease_s=1.5)


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_and_oversized_results(transport: str, tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        stub = farm.gateway("agent-a")
        a = await stub.Register(register("a", "dev-a"), timeout=10)
        stream = await connect(stub, a)
        await farm.queue_task("dev-a")
        held = (await stream.next("assignment")).assignment
        bad: dict[str, common_pb2.TaskResult] = {
            "not a finite number": result_for(held, [1.0, math.nan]),
            "infinite": result_for(held, [math.inf]),
            "negative latency": result_for(held, [1.0, -3.0]),
        }
        long_text = result_for(held, [1.0])
        long_text.error_message = "x" * (MAX_STRING_BYTES + 1)
        bad["error_message is longer"] = long_text
        many = result_for(held, [1.0])
        many.trials.extend([many.trials[0]] * MAX_TRIALS)
        bad["trials (at most"] = many
        for expected, result in bad.items():
            ack = await stream.send_result(result)
            assert not ack.accepted and ack.reason.startswith("invalid result"), ack
            if expected != "infinite":
                assert expected in ack.reason
        # The stream is still up: the good result is stored.
        good = await stream.send_result(result_for(held, [1.0, 1.5]))
        assert good.accepted
        # A message over the transport's limit ends only this stream, with its code.
        huge = result_for(held, [1.0])
        huge.error_message = "y" * (MAX_MESSAGE_BYTES + 1024)
        await stream.call.write(agent_pb2.AgentMessage(result=huge))
        assert await stream.ended_with() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Registration is bounded too.
        long_name = register("n" * 10_000, "dev-n")
        assert await rpc_code(stub.Register(long_name, timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        await farm.still_serving()

    run_farm(transport, tmp_path, probe)


def test_stream_without_hello_is_closed(tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        stub = farm.gateway()
        started = time.monotonic()
        code, _ = await stream_code(stub.Connect())
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 4 < time.monotonic() - started < 15
        await farm.still_serving()

    run_farm("plaintext", tmp_path, probe)


def test_registrations_are_rate_limited_per_peer(tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        stub = farm.gateway()
        codes = [
            await rpc_code(stub.Register(register(f"r{i}", "dev-r", token="wrong"), timeout=10))
            for i in range(80)
        ]
        assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes

    run_farm("plaintext", tmp_path, probe)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fetch_artifact_abuse(transport: str, tmp_path: Path) -> None:
    async def probe(farm: Farm) -> None:
        stub = farm.gateway("agent-a")
        a = await stub.Register(register("a", "dev-a"), timeout=10)

        def fetch(
            sha256: str, offset: int = 0, token: str = a.session_token
        ) -> AsyncIterator[object]:
            return stub.FetchArtifact(
                agent_pb2.FetchArtifactRequest(
                    agent_id=a.agent_id, session_token=token, sha256=sha256, offset=offset
                )
            )

        # Not assigned (yet): refused.
        code, details = await stream_code(fetch(farm.sha))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        for sha in ("../../etc/passwd", "ABC", "g" * 64, farm.sha.upper(), ""):
            code, details = await stream_code(fetch(sha))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, sha
            assert "Traceback" not in details and "Error" not in details
        code, _ = await stream_code(fetch("0" * 64))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await stream_code(fetch(farm.sha, token="stale"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Assigned: the artifact comes, whole or from an offset; past its end is refused.
        stream = await connect(stub, a)
        await farm.queue_task("dev-a")
        await stream.next("assignment")
        chunks = [c async for c in fetch(farm.sha)]  # type: ignore[attr-defined]
        assert b"".join(c.data for c in chunks) == b"model"
        tail = [c async for c in fetch(farm.sha, offset=2)]  # type: ignore[attr-defined]
        assert b"".join(c.data for c in tail) == b"del"
        code, details = await stream_code(fetch(farm.sha, offset=6))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "beyond" in details
        await farm.still_serving()

    run_farm(transport, tmp_path, probe)


@pytest.mark.parametrize("transport", ["plaintext", "mutual-tls"])
def test_agent_credential_file_lifecycle(transport: str, tmp_path: Path) -> None:
    """The real agent: enrols once and keeps its credential owner-only; a credential
    that does not match is refused for good; a coordinator with a fresh store enrols it
    again; revoked, the agent stops with an AuthError."""
    from agent.client import Agent, AgentConfig
    from edgefarm.domain import DeviceCapabilities
    from edgefarm.errors import AuthError

    work_dir = tmp_path / "agent-real"
    path = work_dir / "credential"
    caps = DeviceCapabilities(device_id="dev-real", hostname="dev-real", backends={"noop": "1"})

    def start(farm: Farm) -> tuple[Agent, asyncio.Task[None]]:
        config = AgentConfig(
            coordinator=farm.address,
            token=FLEET_TOKEN,
            name="real",
            work_dir=work_dir,
            tls=farm.tls("real"),
        )
        agent = Agent(config, caps)
        return agent, asyncio.create_task(agent.run())

    async def online(farm: Farm) -> asyncio.Task[None]:
        agent, task = start(farm)
        await asyncio.wait_for(agent.connected.wait(), 15)
        return task

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def first_coordinator(farm: Farm) -> None:
        await stop(await online(farm))
        issued = path.read_text().strip()
        assert issued and path.stat().st_mode & 0o777 == 0o600
        await stop(await online(farm))  # the second start registers with the credential
        assert path.read_text().strip() == issued
        path.write_text("not-the-issued-credential\n")
        with pytest.raises(AuthError, match="enrolled already"):
            await asyncio.wait_for(start(farm)[1], 15)
        path.write_text(issued + "\n")
        running = await online(farm)
        await farm.control().RevokeAgent(
            control_pb2.RevokeAgentRequest(token=FLEET_TOKEN, name="real"), timeout=10
        )
        with pytest.raises(AuthError, match="revoked"):
            await asyncio.wait_for(running, 15)

    async def fresh_coordinator(farm: Farm) -> None:
        before = path.read_text().strip()
        await stop(await online(farm))
        assert path.read_text().strip() != before

    run_farm(transport, tmp_path / "first", first_coordinator)
    run_farm(transport, tmp_path / "fresh", fresh_coordinator)

"""The agent's graceful stop, against a fake coordinator (a real gRPC server on loopback).

Stop: heartbeats say draining, assignments are given back, the task in hand finishes
and its acknowledged result ends the drain; past the drain timeout (or on a second
stop) the task is cancelled (a real measuring child is killed) and given back; results
survive a coordinator that is away during the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from agent.client import CHANNEL_OPTIONS, Agent, AgentConfig, serve_agents
from agent.executor import LocalExecutor, Progress
from agent.metrics import AgentMetrics
from agent.runner import TrialsReport
from edgefarm.domain import ArtifactRef, Assignment, DeviceCapabilities, MeasureSettings
from edgefarm.errors import TaskTimeout
from protos.convert import assignment_to_pb
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc

MODEL = b"a tiny model"
SHA = hashlib.sha256(MODEL).hexdigest()
HEARTBEAT_S = 0.2


class FakeCoordinator(agent_pb2_grpc.AgentGatewayServicer):
    """Registers anyone, hands out what the test queues, records what agents send and
    acknowledges each result (``ack`` decides how)."""

    def __init__(self) -> None:
        self.received: list[agent_pb2.AgentMessage] = []
        self.outbox: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()
        self.streams = 0  # Connect calls so far
        self.half_closed = 0  # streams the agent ended itself
        self.ack: Callable[[agent_pb2.AgentMessage], agent_pb2.ResultAck | None] = accept

    def of_kind(self, kind: str) -> list[agent_pb2.AgentMessage]:
        """What agents sent of one kind, in order."""
        return [m for m in self.received if m.WhichOneof("body") == kind]

    def assign(self, task_id: str, attempt: int = 1, **options: str) -> Assignment:
        """Queue an assignment for the next (or current) stream."""
        a = assignment(task_id, attempt, options)
        self.outbox.put_nowait(
            agent_pb2.CoordinatorMessage(assignment=assignment_to_pb(a, time.time() + 60))
        )
        return a

    async def Register(
        self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RegisterResponse:
        return agent_pb2.RegisterResponse(
            agent_id="agent-1",
            session_token="session",
            heartbeat_interval_s=HEARTBEAT_S,
            lease_duration_s=30,
            credential="issued" if request.token else "",
        )

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        self.streams += 1
        acks: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()

        async def read() -> None:
            async for message in request_iterator:
                self.received.append(message)
                if message.WhichOneof("body") == "result":
                    reply = self.ack(message)
                    if reply is not None:
                        acks.put_nowait(agent_pb2.CoordinatorMessage(ack=reply))
            self.half_closed += 1

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                getters = {
                    asyncio.create_task(acks.get()),
                    asyncio.create_task(self.outbox.get()),
                }
                done, pending = await asyncio.wait(
                    {*getters, reader}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending - {reader}:
                    task.cancel()
                for task in done - {reader}:
                    message = task.result()
                    assert isinstance(message, agent_pb2.CoordinatorMessage)
                    yield message
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def FetchArtifact(
        self, request: agent_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        yield agent_pb2.ArtifactChunk(offset=request.offset, data=MODEL[request.offset :])


def accept(message: agent_pb2.AgentMessage) -> agent_pb2.ResultAck:
    """The usual answer: stored."""
    return agent_pb2.ResultAck(
        task_id=message.result.task_id, attempt=message.result.attempt, accepted=True
    )


def assignment(task_id: str, attempt: int = 1, options: dict[str, str] | None = None) -> Assignment:
    """A noop task on the fake coordinator's model."""
    return Assignment(
        task_id=task_id,
        attempt=attempt,
        lease_id=f"lease-{task_id}-{attempt}",
        campaign_id="c-1",
        model="m",
        backend="noop",
        scheme="none",
        artifact=ArtifactRef(SHA, len(MODEL), "m.bin"),
        eval_data=None,
        settings=MeasureSettings(trials=1, timeout_s=60),
        options=options or {},
    )


class SleepyExecutor:
    """Measures by sleeping ``options['sleep_s']`` (default 0.3 s); ``options['fail']``
    fails with a timeout. Records what it started and whether it was cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.running = asyncio.Event()

    async def execute(
        self, assignment: Assignment, model_path: Path, eval_path: Path | None, progress: Progress
    ) -> TrialsReport:
        assert model_path.read_bytes() == MODEL
        self.started.append(assignment.task_id)
        self.running.set()
        try:
            await asyncio.sleep(float(assignment.options.get("sleep_s", "0.3")))
        except asyncio.CancelledError:
            self.cancelled.append(assignment.task_id)
            raise
        finally:
            self.running.clear()
        if assignment.options.get("fail"):
            raise TaskTimeout("ran past its time limit")
        return TrialsReport(trials=[], backend_version="sleepy 1")


class Coordinator:
    """A FakeCoordinator served on loopback; can go away and come back on its port."""

    def __init__(self, fake: FakeCoordinator) -> None:
        self.fake = fake
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.fake, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def make_agent(
    address: str,
    work_dir: Path,
    executor: object | None = None,
    metrics: AgentMetrics | None = None,
) -> Agent:
    """The real agent, dialling ``address``."""
    config = AgentConfig(coordinator=address, token="fleet", name="drainer", work_dir=work_dir)
    caps = DeviceCapabilities(device_id="dev-1", hostname="dev-1", backends={"noop": "1"})
    return Agent(config, caps, executor, metrics)  # type: ignore[arg-type]


Scenario = Callable[[Coordinator, Agent, "asyncio.Task[None]"], Awaitable[None]]


def run_scenario(
    tmp_path: Path,
    scenario: Scenario,
    executor: object | None = None,
    metrics: AgentMetrics | None = None,
) -> Agent:
    """Start a fake coordinator and a real agent, run ``scenario``, tear both down."""
    holder: list[Agent] = []

    async def main() -> None:
        coordinator = Coordinator(FakeCoordinator())
        await coordinator.start()
        agent = make_agent(
            coordinator.address, tmp_path / "agent", executor or SleepyExecutor(), metrics
        )
        holder.append(agent)
        running = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.connected.wait(), 10)
            await asyncio.wait_for(scenario(coordinator, agent, running), 30)
        finally:
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
            await coordinator.stop()

    asyncio.run(main())
    return holder[0]


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_keepalive_pings_an_idle_stream() -> None:
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0


def test_stop_finishes_the_task_delivers_its_result_and_gives_back_new_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.client")
    sleepy = SleepyExecutor()

    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        fake = c.fake
        fake.assign("t-1", sleep_s="1.0")
        await asyncio.wait_for(sleepy.running.wait(), 10)
        agent.stop(drain_timeout_s=20)
        await until(lambda: any(m.heartbeat.draining for m in fake.of_kind("heartbeat")))
        late = fake.assign("t-2")  # comes while draining: given back at once
        await asyncio.wait_for(running, 15)  # run() returns once the result is acknowledged
        (gave_back,) = fake.of_kind("abandoned")
        assert gave_back.abandoned.task_id == "t-2"
        assert gave_back.abandoned.lease_id == late.lease_id
        assert gave_back.abandoned.attempt == 1
        assert gave_back.abandoned.reason == "agent draining"
        (result,) = fake.of_kind("result")
        assert result.result.task_id == "t-1" and result.result.ok
        started, ended = result.result.measure_started_at, result.result.measure_ended_at
        assert 0 < started <= ended <= time.time() and ended - started >= 0.9
        assert fake.half_closed == 1  # the agent closed its stream itself
        assert not agent.unacked

    run_scenario(tmp_path, scenario, sleepy)
    assert sleepy.started == ["t-1"] and not sleepy.cancelled
    messages = [r.getMessage() for r in caplog.records]
    assert "result of t-1 (attempt 1) acknowledged: accepted" in messages
    assert any(m.startswith("agent stopped: every result delivered") for m in messages)
    assert not any(r.exc_info for r in caplog.records)


def test_an_idle_agent_stops_at_once(tmp_path: Path) -> None:
    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        begun = time.monotonic()
        agent.stop(drain_timeout_s=60)
        await asyncio.wait_for(running, 5)
        assert time.monotonic() - begun < 1.5
        assert c.fake.half_closed == 1 and not c.fake.of_kind("abandoned")

    run_scenario(tmp_path, scenario)


@pytest.mark.parametrize("how", ["timeout", "second stop"])
def test_past_the_drain_timeout_or_on_a_second_stop_the_task_is_given_back(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.client")
    sleepy = SleepyExecutor()

    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        a = c.fake.assign("t-long", sleep_s="60")
        await asyncio.wait_for(sleepy.running.wait(), 10)
        begun = time.monotonic()
        if how == "timeout":
            agent.stop(drain_timeout_s=0.5)
        else:
            agent.stop(drain_timeout_s=60)
            await asyncio.sleep(0.3)
            agent.stop(drain_timeout_s=60)
        await asyncio.wait_for(running, 10)
        assert time.monotonic() - begun < 4
        (gave_up,) = c.fake.of_kind("abandoned")
        assert (gave_up.abandoned.task_id, gave_up.abandoned.lease_id) == ("t-long", a.lease_id)
        expected = "drain timeout" if how == "timeout" else "second stop"
        assert expected in gave_up.abandoned.reason
        assert not c.fake.of_kind("result")
        assert c.fake.half_closed == 1

    agent = run_scenario(tmp_path, scenario, sleepy)
    assert sleepy.cancelled == ["t-long"]
    assert agent.metrics.tasks.labels(outcome="abandoned")._value.get() == 1
    assert not any(r.exc_info for r in caplog.records)


def test_a_result_finished_while_the_coordinator_is_away_is_delivered_when_it_returns(
    tmp_path: Path,
) -> None:
    sleepy = SleepyExecutor()

    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        c.fake.assign("t-1", sleep_s="0.5")
        await asyncio.wait_for(sleepy.running.wait(), 10)
        await c.stop()  # the coordinator goes away mid-task
        agent.stop(drain_timeout_s=20)
        await until(lambda: bool(agent.unacked))  # finished, not delivered
        await asyncio.sleep(0.5)
        assert not running.done()
        await c.start()  # back on the same port
        await asyncio.wait_for(running, 15)
        (result,) = c.fake.of_kind("result")
        assert result.result.task_id == "t-1" and c.fake.streams == 2
        assert not agent.unacked

    run_scenario(tmp_path, scenario, sleepy)


def test_an_undelivered_result_is_named_when_the_drain_times_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.client")
    sleepy = SleepyExecutor()

    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        c.fake.ack = lambda message: None  # never acknowledges
        c.fake.assign("t-1", sleep_s="0.2")
        await until(lambda: bool(c.fake.of_kind("result")))
        agent.stop(drain_timeout_s=1.0)
        await asyncio.wait_for(running, 10)
        assert list(agent.unacked) == [("t-1", 1)]

    run_scenario(tmp_path, scenario, sleepy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("never acknowledged: t-1 (attempt 1)" in w for w in warnings), warnings


def test_every_acknowledgement_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.client")
    agent = make_agent("127.0.0.1:1", tmp_path / "agent")
    for task_id, ack in [
        ("t-1", agent_pb2.ResultAck(accepted=True)),
        ("t-2", agent_pb2.ResultAck(accepted=True, duplicate=True)),
        ("t-3", agent_pb2.ResultAck(accepted=False, reason="lease expired")),
    ]:
        ack.task_id, ack.attempt = task_id, 2
        agent.unacked[(task_id, 2)] = None  # type: ignore[assignment]
        agent._handle(agent_pb2.CoordinatorMessage(ack=ack))
    assert not agent.unacked
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "result of t-1 (attempt 2) acknowledged: accepted"),
        ("INFO", "result of t-2 (attempt 2) acknowledged: stored already"),
        ("WARNING", "result of t-3 (attempt 2) acknowledged: refused: lease expired"),
    ]


def _trial_children() -> set[int]:
    """Pids of this process's live measuring children (``python -m agent.trial``)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        state = stat.rpartition(")")[2].split()[0]
        if ppid == os.getpid() and b"agent.trial" in cmdline and state != "Z":
            pids.add(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_drain_timeout_kills_the_measuring_child(tmp_path: Path) -> None:
    """The real executor: a noop trial that hangs is killed when the drain runs out."""

    async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
        c.fake.assign("t-hang", noop_sleep_s="60")
        await until(lambda: bool(_trial_children()), 20)
        agent.stop(drain_timeout_s=0.2)
        await asyncio.wait_for(running, 10)
        assert not _trial_children()
        (gave_up,) = c.fake.of_kind("abandoned")
        assert gave_up.abandoned.reason == "drain timeout"

    run_scenario(tmp_path, scenario, LocalExecutor())


def test_sigterm_drains_and_a_second_signal_gives_the_task_back(tmp_path: Path) -> None:
    """serve_agents (both `agent serve` and `agent hub`): SIGTERM starts the drain,
    a SIGINT after it ends the drain at once; the handlers are gone afterwards."""
    sleepy = SleepyExecutor()

    async def main() -> None:
        coordinator = Coordinator(FakeCoordinator())
        await coordinator.start()
        agent = make_agent(coordinator.address, tmp_path / "agent", sleepy)
        serving = asyncio.create_task(serve_agents([agent], drain_timeout_s=60))
        try:
            await asyncio.wait_for(agent.connected.wait(), 10)
            coordinator.fake.assign("t-long", sleep_s="60")
            await asyncio.wait_for(sleepy.running.wait(), 10)
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: agent.draining)
            await asyncio.sleep(0.3)
            assert not serving.done()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(serving, 10)
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            await coordinator.stop()
        (gave_up,) = coordinator.fake.of_kind("abandoned")
        assert "second stop" in gave_up.abandoned.reason
        assert sleepy.cancelled == ["t-long"]

    asyncio.run(main())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

"""A simulated fleet against one real coordinator: prints its figures beside the targets.

A real coordinator process (``LocalFarm``: real gRPC, SQLite, local Ray) serves N
simulated agents that live in this process, each on its own gRPC connection (a channel
with a subchannel pool of its own), its own device and host, offering the ``noop``
backend. Every agent registers with the enrolment token, opens its Connect stream,
heartbeats every ``--heartbeat-s`` (jittered +-10%) and answers each assignment with a
minimal valid result. Five phases, one after the other:

1. **online**: all agents register and connect (``--connect-parallel`` at a time); the
   time until the coordinator's ``ListDevices`` reports every device online;
2. **steady**: ``--steady-s`` seconds of heartbeats only: the coordinator process's CPU
   (user + system, in % of one core), and its RSS at the start and the end (growth
   would be garbage its collector misses);
3. **devices list**: ``--list-calls`` full device lists (``ListDevices``, every page),
   one after the other during the steady heartbeats, from a process of their own:
   p50 / p99 / max latency;
4. **dispatch**: a campaign of ``--tasks-per-agent`` no-op models, so that many tasks per
   device, answered at once: the coordinator's ceiling, in end-to-end tasks/s from the
   first assignment to the last acknowledged result, and each agent's gap from sending
   a result to receiving its next assignment (p50 / p99, only where the agent had work
   left). With instant agents the gap is the fleet's turn at the ceiling (Little's law:
   agents / tasks per second), not the coordinator's response;
5. **paced dispatch**: a second campaign of ``--paced-tasks-per-agent`` models whose
   tasks each take an agent ``--task-s`` (jittered +-50%), so that the fleet offers
   agents / task-s tasks a second, below the ceiling as a real fleet's minutes-long
   measurements are: the gap from result to next assignment is then the coordinator's
   own response time.

This process simulates the agents on the same 2 cores as the coordinator: its own load
is part of every figure (the issue's targets were set the same way). Keep the machine
otherwise quiet.

Run: ``python benchmarks/fleet_sim.py [--agents 1000] [--tasks-per-agent 5] [--task-s 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

import edgefarm
from coordinator.localfarm import LocalFarm
from edgefarm.domain import percentile
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2

# A subchannel pool per channel: each simulated agent gets its own TCP connection.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
TARGETS = {
    "online_s": 60.0,
    "coordinator_cpu_pct": 50.0,
    "list_p99_ms": 200.0,
    "tasks_per_s": 1000.0,
    "gap_p99_ms": 50.0,
}


@dataclass
class Dispatch:
    """What one dispatch phase measured."""

    tasks: int = 0
    tasks_per_s: float = float("nan")
    gaps_ms: list[float] = field(default_factory=list)
    coordinator_cpu_pct: float = float("nan")  # its main process
    ingestion_cpu_pct: float = float("nan")  # its ingestion worker
    simulator_cpu_pct: float = float("nan")  # this process
    machine_cpu_pct: float = float("nan")  # every process


@dataclass
class Figures:
    """What the phases measured."""

    agents: int = 0
    online_s: float = float("nan")
    online_reached: int = 0
    register_failures: int = 0
    coordinator_cpu_pct: float = float("nan")
    coordinator_rss_mb: tuple[float, float] = (float("nan"), float("nan"))  # steady: start, end
    list_ms: list[float] = field(default_factory=list)
    dispatch: Dispatch = field(default_factory=lambda: Dispatch())  # instant agents
    paced: Dispatch = field(default_factory=lambda: Dispatch())  # agents taking --task-s
    gc_pauses: dict[str, tuple[int, float]] = field(default_factory=dict)  # gen: n, longest s


class SimAgent:
    """One simulated agent: its own channel, stream, heartbeats and instant results."""

    def __init__(self, address: str, token: str, index: int, heartbeat_s: float) -> None:
        self.address, self.token, self.index = address, token, index
        self.heartbeat_s = heartbeat_s
        self.name = f"sim-{index:05d}"
        self.channel: grpc.aio.Channel | None = None
        self.call: grpc.aio.StreamStreamCall | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.sent_at: float | None = None  # when the last result went out
        self.results = 0
        self.gaps_ms: list[float] = []
        self.acked: list[float] = []
        self.first_assignment: float | None = None
        self.task_s = 0.0  # how long each task takes (jittered +-50%); 0: answered at once
        self.outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()

    def pace(self, task_s: float) -> None:
        """Start a dispatch phase: tasks take ``task_s``; the phase's figures afresh."""
        self.task_s, self.sent_at, self.first_assignment = task_s, None, None
        self.results, self.gaps_ms, self.acked = 0, [], []

    async def start(self) -> None:
        """Register, connect, and start heartbeating."""
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        stub = agent_pb2_grpc.AgentGatewayStub(self.channel)
        caps = common_pb2.DeviceCapabilities(
            device_id=f"sim-device-{self.index:05d}",
            hostname=f"sim-host-{self.index:05d}",
            os="linux",
            arch="x86_64",
            logical_cores=2,
            backends={"noop": edgefarm.__version__},
        )
        reply = await stub.Register(
            agent_pb2.RegisterRequest(
                token=self.token,
                agent_version=edgefarm.__version__,
                protocol_version=edgefarm.PROTOCOL_VERSION,
                name=self.name,
                capabilities=caps,
            ),
            timeout=60,
        )
        self.call = stub.Connect()
        hello = agent_pb2.Hello(agent_id=reply.agent_id, session_token=reply.session_token)
        await self.call.write(agent_pb2.AgentMessage(hello=hello))
        self.tasks = [
            asyncio.create_task(self._write()),
            asyncio.create_task(self._read()),
            asyncio.create_task(self._heartbeat()),
        ]

    async def _write(self) -> None:
        assert self.call is not None
        while True:
            await self.call.write(await self.outgoing.get())

    async def _heartbeat(self) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))  # spread the fleet
        while True:
            beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())
            self.outgoing.put_nowait(beat)
            await asyncio.sleep(self.heartbeat_s * random.uniform(0.9, 1.1))

    async def _read(self) -> None:
        assert self.call is not None
        async for message in self.call:
            kind = message.WhichOneof("body")
            now = time.perf_counter()
            if kind == "assignment":
                if self.first_assignment is None:
                    self.first_assignment = now
                if self.sent_at is not None:
                    self.gaps_ms.append((now - self.sent_at) * 1000)
                a = message.assignment
                trial = common_pb2.Trial(samples_ms=[0.01] * 5, warmup_iterations=1, valid=True)
                result = common_pb2.TaskResult(
                    task_id=a.task_id,
                    attempt=a.attempt,
                    lease_id=a.lease_id,
                    ok=True,
                    batch_size=1,
                    backend_version="sim",
                    trials=[trial],
                )
                if self.task_s:
                    took = self.task_s * random.uniform(0.5, 1.5)
                    asyncio.get_running_loop().call_later(took, self._send, result)
                else:
                    self._send(result)
            elif kind == "ack" and message.ack.accepted:
                self.results += 1
                self.acked.append(now)

    def _send(self, result: common_pb2.TaskResult) -> None:
        self.sent_at = time.perf_counter()
        self.outgoing.put_nowait(agent_pb2.AgentMessage(result=result))

    async def stop(self) -> None:
        """Close the stream and the channel."""
        for task in self.tasks:
            task.cancel()
        if self.call is not None:
            self.call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close(None)


def online_count(farm: LocalFarm) -> tuple[int, float]:
    """Devices ListDevices reports online or busy, and the call's latency (ms)."""
    with farm.client() as client:
        started = time.perf_counter()
        devices = client.list_devices()
        elapsed = (time.perf_counter() - started) * 1000
    return sum(1 for d in devices if d.state in ("online", "busy")), elapsed


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def ingestion_cpu(coordinator: psutil.Process) -> float:
    """CPU seconds of the coordinator's result-ingestion worker (a child process)."""
    total = 0.0
    for child in coordinator.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):  # multiprocessing's spawned worker
                total += cpu_seconds(child)
        except psutil.Error:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core)."""
    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "nice", 0.0))


def noop_spec(models: int, prefix: str, timeout_s: int) -> str:
    """``models`` no-op models; each phase has a ``timeout_s`` of its own, which enters
    the measure key, so that no phase reuses another's results."""
    lines = "\n".join(
        f"  - name: {prefix}{i}\n    source: builtin:digits-mlp" for i in range(models)
    )
    return (
        f"name: fleet-sim-{prefix}\nmodels:\n{lines}\n"
        "backends:\n  - name: noop\n    schemes: [none]\n"
        f"measurement:\n  trials: 1\n  timeout_s: {timeout_s}\n"
    )


async def simulate(farm: LocalFarm, args: argparse.Namespace) -> Figures:
    fig = Figures(agents=args.agents)
    assert farm.coordinator_proc is not None
    coordinator = psutil.Process(farm.coordinator_proc.pid)
    agents = [SimAgent(farm.address, farm.token, i, args.heartbeat_s) for i in range(args.agents)]
    gate = asyncio.Semaphore(args.connect_parallel)

    async def start(agent: SimAgent) -> None:
        async with gate:
            try:
                await agent.start()
            except grpc.aio.AioRpcError as error:
                fig.register_failures += 1
                if fig.register_failures <= 3:
                    print(f"{agent.name}: {error.code().name}: {error.details()}", flush=True)

    # 1. online
    began = time.perf_counter()
    starting = asyncio.gather(*(start(a) for a in agents))
    deadline = began + args.online_timeout_s
    while time.perf_counter() < deadline:
        await asyncio.sleep(2.0)
        fig.online_reached, _ = await asyncio.to_thread(online_count, farm)
        if fig.online_reached >= args.agents:
            fig.online_s = time.perf_counter() - began
            break
    await starting
    print(f"online: {fig.online_reached}/{args.agents} in {fig.online_s:.1f} s", flush=True)

    # 2. steady heartbeats: the coordinator's CPU
    await asyncio.sleep(args.heartbeat_s * 2)
    cpu0, t0, rss0 = cpu_seconds(coordinator), time.perf_counter(), coordinator.memory_info().rss
    await asyncio.sleep(args.steady_s)
    fig.coordinator_cpu_pct = 100 * (cpu_seconds(coordinator) - cpu0) / (time.perf_counter() - t0)
    fig.coordinator_rss_mb = (rss0 / 2**20, coordinator.memory_info().rss / 2**20)
    print(f"steady: coordinator {fig.coordinator_cpu_pct:.0f}% of a core", flush=True)

    # 3. devices list under the heartbeats, timed from a process of its own (this one's
    # event loop is busy with the simulated agents)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--list-only", farm.address, farm.token, str(args.list_calls),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    fig.list_ms = [float(v) for v in out.split()]
    print(f"devices list: p99 {percentile(sorted(fig.list_ms), 99):.0f} ms", flush=True)

    # 4. dispatch at the ceiling; 5. paced below it
    fig.dispatch = await dispatch(farm, agents, "m", args.tasks_per_agent, 0.0, args)
    fig.paced = await dispatch(farm, agents, "p", args.paced_tasks_per_agent, args.task_s, args)
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
    fig.gc_pauses = await asyncio.to_thread(collection_pauses, farm.metrics_address)
    return fig


async def dispatch(
    farm: LocalFarm,
    agents: list[SimAgent],
    prefix: str,
    tasks_per_agent: int,
    task_s: float,
    args: argparse.Namespace,
) -> Dispatch:
    """Run a campaign of ``tasks_per_agent`` no-op models (named ``prefix``0, 1, ...)
    whose tasks take each agent ``task_s``."""
    assert farm.coordinator_proc is not None
    coordinator, me = psutil.Process(farm.coordinator_proc.pid), psutil.Process()
    for agent in agents:
        agent.pace(task_s)
    run = Dispatch()
    with farm.client() as client:
        spec = noop_spec(tasks_per_agent, prefix, 300 if task_s == 0 else 301)
        reply = await asyncio.to_thread(client.submit, spec, "fleet-sim.yaml")
    run.tasks = reply.tasks_total
    deadline = time.perf_counter() + args.dispatch_timeout_s
    while time.perf_counter() < deadline and not any(a.first_assignment for a in agents):
        await asyncio.sleep(0.01)  # CPU is counted from the first assignment
    cpu0, ingest0, mine0 = cpu_seconds(coordinator), ingestion_cpu(coordinator), cpu_seconds(me)
    busy0, t0 = machine_busy_seconds(), time.perf_counter()
    while time.perf_counter() < deadline and sum(a.results for a in agents) < run.tasks:
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    run.coordinator_cpu_pct = 100 * (cpu_seconds(coordinator) - cpu0) / wall
    run.ingestion_cpu_pct = 100 * (ingestion_cpu(coordinator) - ingest0) / wall
    run.simulator_cpu_pct = 100 * (cpu_seconds(me) - mine0) / wall
    run.machine_cpu_pct = 100 * (machine_busy_seconds() - busy0) / wall
    firsts = [a.first_assignment for a in agents if a.first_assignment is not None]
    lasts = [a.acked[-1] for a in agents if a.acked]
    done = sum(a.results for a in agents)
    if firsts and lasts and done:
        run.tasks_per_s = done / (max(lasts) - min(firsts))
    run.gaps_ms = [g for a in agents for g in a.gaps_ms]
    print(
        f"dispatch ({task_s:g} s a task): {done}/{run.tasks} tasks, "
        f"{run.tasks_per_s:.0f} tasks/s, gap p99 {_p(run.gaps_ms, 99):.0f} ms",
        flush=True,
    )
    return run


def collection_pauses(address: str) -> dict[str, tuple[int, float]]:
    """Per garbage-collector generation of the coordinator: collections, longest stop (s),
    from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = re.match(
            r'edgefarm_gc_(collections_total|longest_pause_seconds)\{generation="(\d)"\} (\S+)',
            line,
        )
        if m:
            found.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return {
        g: (int(v.get("collections_total", 0)), v.get("longest_pause_seconds", 0.0))
        for g, v in sorted(found.items())
    }


def _p(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) if values else float("nan")


def dispatch_rows(
    label: str, run: Dispatch, tasks_target: bool = False, gap_target: bool = False
) -> list[tuple[str, str, str]]:
    """The table's rows of one dispatch phase."""
    return [
        (f"{label}: no-op tasks", f"{run.tasks}", ""),
        (f"{label}: dispatch, end to end (tasks/s)", f"{run.tasks_per_s:.0f}",
         f">= {TARGETS['tasks_per_s']:.0f}" if tasks_target else ""),
        (f"{label}: CPU, coordinator / its ingestion worker / simulated agents / whole "
         f"machine (% of a core; {psutil.cpu_count()} cores)",
         f"{run.coordinator_cpu_pct:.0f} / {run.ingestion_cpu_pct:.0f} / "
         f"{run.simulator_cpu_pct:.0f} / {run.machine_cpu_pct:.0f}", ""),
        (f"{label}: result -> next assignment p50 / p99 (ms)",
         f"{_p(run.gaps_ms, 50):.1f} / {_p(run.gaps_ms, 99):.1f}",
         f"p99 < {TARGETS['gap_p99_ms']:.0f}" if gap_target else ""),
    ]  # fmt: skip


def table(fig: Figures, task_s: float) -> str:
    rows = [
        ("agents", f"{fig.agents}", ""),
        ("registrations that failed", f"{fig.register_failures}", "0"),
        (
            "all online after (s)",
            f"{fig.online_s:.1f}" + ("" if fig.online_reached >= fig.agents else
                                     f" ({fig.online_reached} online at the timeout)"),
            f"<= {TARGETS['online_s']:.0f}",
        ),
        ("coordinator CPU, steady heartbeats (% of a core)", f"{fig.coordinator_cpu_pct:.0f}",
         f"< {TARGETS['coordinator_cpu_pct']:.0f}"),
        ("coordinator RSS at the start / end of the steady heartbeats (MB)",
         "{:.0f} / {:.0f}".format(*fig.coordinator_rss_mb), ""),
        ("devices list p50 / p99 / max (ms)",
         f"{_p(fig.list_ms, 50):.0f} / {_p(fig.list_ms, 99):.0f} / "
         f"{max(fig.list_ms, default=float('nan')):.0f}",
         f"p99 < {TARGETS['list_p99_ms']:.0f}"),
        *dispatch_rows("instant agents", fig.dispatch, tasks_target=True),
        *dispatch_rows(f"agents taking {task_s:g} s a task", fig.paced, gap_target=True),
        ("coordinator's garbage collections, young / full: count (longest stop, ms)",
         " / ".join(f"{n} ({1000 * s:.0f})" for g, (n, s) in fig.gc_pauses.items() if g != "1"),
         ""),
    ]  # fmt: skip
    out = ["| measure | value | target |", "| --- | --- | --- |"]
    out += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(out)


def list_only(address: str, token: str, calls: int) -> None:
    """Time ``calls`` full device lists (every page), one after the other; print ms."""
    from coordinator.client import ControlClient

    with ControlClient(address, token) as client:
        client.list_devices()  # the connection is up before timing
        for _ in range(calls):
            started = time.perf_counter()
            client.list_devices()
            print(f"{(time.perf_counter() - started) * 1000:.2f}", flush=True)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--list-only":
        list_only(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--connect-parallel", type=int, default=200)
    parser.add_argument("--online-timeout-s", type=float, default=180.0)
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--list-calls", type=int, default=30)
    parser.add_argument("--tasks-per-agent", type=int, default=5)
    parser.add_argument("--paced-tasks-per-agent", type=int, default=3)
    parser.add_argument("--task-s", type=float, default=2.0)
    parser.add_argument("--dispatch-timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefarm-fleet-") as tmp:
        home = Path(tmp)
        farm = LocalFarm(
            home=home,
            store_url=f"sqlite:///{home / 'results.sqlite'}",
            agents=0,
            heartbeat_s=args.heartbeat_s,
            metrics_listen="127.0.0.1:0",
            # every simulated agent dials from this one address, as a fleet behind a NAT
            coordinator_args=["--register-rate", f"{args.agents}/{args.agents}"],
        )
        with farm:
            fig = asyncio.run(simulate(farm, args))
    print(table(fig, args.task_s))
    print(f"(one run, {time.strftime('%Y-%m-%d')}, {psutil.cpu_count()} logical cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

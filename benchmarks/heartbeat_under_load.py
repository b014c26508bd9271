"""Heartbeat round trips of ordinary agents while one agent sends maximum-size results.

A real coordinator process (``LocalFarm``: real gRPC, SQLite, local Ray) serves:

- K light agents (default 8) in this process, each with its own enrolled identity and
  Connect stream, offering no backend (so they get no tasks);
- one heavy agent in a child process, offering the ``noop`` backend. A campaign of
  noop tasks for its device gives it one lease after another; for each it sends at
  once a TaskResult of the maximum size the protocol allows: MAX_TRIALS trials of
  MAX_SAMPLES_PER_RESULT / MAX_TRIALS samples each (edgefarm.wire_limits), under its
  valid lease, while heartbeating that lease. The coordinator validates and stores
  every one of them.

What is timed (the "heartbeat round trip"). A Heartbeat has no reply, so each light
agent sends, on its stream, a Heartbeat immediately followed by a probe: a tiny
TaskResult the gateway must refuse (one sample of -1 ms). The gateway handles one
stream's messages in order, so the probe's ResultAck (accepted=false, "invalid result:
... negative latency") cannot arrive before the Heartbeat was handled; the time from
writing the Heartbeat to reading that ack bounds the heartbeat's round trip through
the coordinator (transport both ways, the gateway's event loop, the validation thread
pool) from above. The probe touches neither the scheduler's leases nor the store.
Each light agent probes every ``--interval-s`` seconds (jittered +-50%).

Two windows: a baseline with the heavy agent connected but idle, then a load window
that starts when the coordinator has acknowledged the heavy agent's first result and
ends after ``--load-s`` seconds or when its tasks run out. The table gives p50 / p99 /
max of the round trips in each window, how many maximum-size results were stored
during the load window, their send-to-ack times, and this process's own event-loop
lag (how late a 10 ms sleep wakes up: client-side noise included in every round trip).

Target: heartbeat round trip p99 < 50 ms under load. Keep the machine otherwise quiet.

Run: ``python benchmarks/heartbeat_under_load.py [--agents 8] [--baseline-s 20]
[--load-s 40] [--tasks 40]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

import edgefarm  # noqa: E402
from coordinator.localfarm import LocalFarm  # noqa: E402
from edgefarm.domain import percentile  # noqa: E402
from edgefarm.wire_limits import MAX_MESSAGE_BYTES, MAX_SAMPLES_PER_RESULT, MAX_TRIALS  # noqa: E402
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2  # noqa: E402

ACK_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def register_request(token: str, name: str, backends: dict[str, str]) -> agent_pb2.RegisterRequest:
    """An enrolment of ``name`` on a device of its own."""
    return agent_pb2.RegisterRequest(
        token=token,
        agent_version=edgefarm.__version__,
        protocol_version=edgefarm.PROTOCOL_VERSION,
        name=name,
        capabilities=common_pb2.DeviceCapabilities(
            device_id=f"bench-{name}", hostname=f"bench-{name}", backends=backends
        ),
    )


class Stream:
    """One agent's Connect stream: a single writer task, acks matched by task id."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.outgoing: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future[agent_pb2.ResultAck]] = {}
        self.assignments: asyncio.Queue[agent_pb2.TaskAssignment] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def _write(self) -> None:
        while True:
            await self.call.write(await self.outgoing.get())

    async def _read(self) -> None:
        async for message in self.call:
            kind = message.WhichOneof("body")
            if kind == "ack":
                future = self.pending.pop(message.ack.task_id, None)
                if future is not None and not future.done():
                    future.set_result(message.ack)
            elif kind == "assignment":
                self.assignments.put_nowait(message.assignment)

    def expect(self, task_id: str) -> asyncio.Future[agent_pb2.ResultAck]:
        future: asyncio.Future[agent_pb2.ResultAck] = asyncio.get_running_loop().create_future()
        self.pending[task_id] = future
        return future

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def connect(
    stub: agent_pb2_grpc.AgentGatewayStub, token: str, name: str, backends: dict[str, str]
) -> tuple[agent_pb2.RegisterResponse, Stream]:
    reply = await stub.Register(register_request(token, name, backends), timeout=30)
    call = stub.Connect()
    hello = agent_pb2.Hello(agent_id=reply.agent_id, session_token=reply.session_token)
    await call.write(agent_pb2.AgentMessage(hello=hello))
    return reply, Stream(call)


# ----- the heavy agent (a child process) --------------------------------------------


def max_size_result() -> common_pb2.TaskResult:
    """MAX_TRIALS trials holding MAX_SAMPLES_PER_RESULT samples in all (finite, >= 0)."""
    per_trial = MAX_SAMPLES_PER_RESULT // MAX_TRIALS
    rng = random.Random(0)
    samples = [0.2 + rng.random() for _ in range(per_trial)]
    result = common_pb2.TaskResult(ok=True, batch_size=1, backend_version="bench")
    for _ in range(MAX_TRIALS):
        result.trials.add(
            samples_ms=samples,
            warmup_iterations=10,
            duration_s=sum(samples) / 1000,
            load_time_s=0.01,
            peak_rss_bytes=50 << 20,
            valid=True,
            metrics={"host_other_cpu_cores": 0.0},
        )
    return result


async def heavy_agent(address: str, token: str) -> None:
    """Answer every assignment at once with a maximum-size result; print each ack."""
    template = max_size_result()
    size = template.ByteSize()
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentGatewayStub(channel)
        reply, stream = await connect(stub, token, "heavy", {"noop": "bench"})
        lease = ("", "")

        async def heartbeats() -> None:
            while True:
                beat = agent_pb2.Heartbeat(task_id=lease[0], lease_id=lease[1])
                stream.outgoing.put_nowait(agent_pb2.AgentMessage(heartbeat=beat))
                await asyncio.sleep(reply.heartbeat_interval_s)

        stream.tasks.append(asyncio.create_task(heartbeats()))  # runs until exit
        print(f"ready {size}", flush=True)
        while True:
            a = await stream.assignments.get()
            lease = (a.task_id, a.lease_id)
            result = common_pb2.TaskResult()
            result.CopyFrom(template)
            result.task_id, result.attempt, result.lease_id = a.task_id, a.attempt, a.lease_id
            ack = stream.expect(a.task_id)
            started = time.perf_counter()
            stream.outgoing.put_nowait(agent_pb2.AgentMessage(result=result))
            answer = await asyncio.wait_for(ack, ACK_TIMEOUT_S)
            lease = ("", "")
            elapsed_ms = (time.perf_counter() - started) * 1000
            print(f"ack {time.time():.3f} {elapsed_ms:.1f} {int(answer.accepted)} {answer.reason}")
            sys.stdout.flush()


# ----- the light agents and the windows -----------------------------------------------


class Recorder:
    """Round trips (ms) per window; the current window's name."""

    def __init__(self) -> None:
        self.window = ""
        self.samples: dict[str, list[float]] = {}
        self.lag: dict[str, list[float]] = {}
        self.reasons: dict[str, int] = {}
        self.timeouts = 0

    def add(self, into: dict[str, list[float]], value_ms: float) -> None:
        if self.window:
            into.setdefault(self.window, []).append(value_ms)


async def light_agent(
    stub: agent_pb2_grpc.AgentGatewayStub,
    token: str,
    name: str,
    interval_s: float,
    rec: Recorder,
    stop: asyncio.Event,
) -> None:
    _, stream = await connect(stub, token, name, {})
    probe = common_pb2.Trial(samples_ms=[-1.0], valid=True)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            task_id = f"probe-{name}-{n}"
            ack = stream.expect(task_id)
            started = time.perf_counter()
            stream.outgoing.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
            result = common_pb2.TaskResult(task_id=task_id, attempt=1, trials=[probe])
            stream.outgoing.put_nowait(agent_pb2.AgentMessage(result=result))
            try:
                answer = await asyncio.wait_for(ack, ACK_TIMEOUT_S)
                rec.add(rec.samples, (time.perf_counter() - started) * 1000)
                reason = answer.reason.split(":")[0]
                rec.reasons[reason] = rec.reasons.get(reason, 0) + 1
            except TimeoutError:
                rec.timeouts += 1
                rec.add(rec.samples, ACK_TIMEOUT_S * 1000)
            await asyncio.sleep(interval_s * random.uniform(0.5, 1.5))
    finally:
        await stream.close()


async def loop_lag(rec: Recorder, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        rec.add(rec.lag, (time.perf_counter() - started - 0.01) * 1000)


def spec(tasks: int) -> str:
    models = "\n".join(f"  - name: m{i}\n    source: builtin:digits-mlp" for i in range(tasks))
    return (
        f"name: heartbeat-under-load\nmodels:\n{models}\nbackends:\n  - name: noop\n"
        "    schemes: [none]\nmeasurement:\n  trials: 1\n"
    )


class HeavyProcess:
    """The heavy agent's child process and the acks it reports."""

    def __init__(self, address: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--heavy", address, token],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.acks: list[tuple[float, float, bool, str]] = []  # (unix time, ms, accepted, why)
        self.all_acks: list[tuple[float, float, bool, str]] = []
        self.ready = threading.Event()
        self.first_ack = threading.Event()
        self.size = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split(maxsplit=4)
            if parts[0] == "ready":
                self.size = int(parts[1])
                self.ready.set()
            elif parts[0] == "ack":
                self.acks.append(
                    (float(parts[1]), float(parts[2]), parts[3] == "1", " ".join(parts[4:]))
                )
                self.first_ack.set()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def measure(
    farm: LocalFarm, args: argparse.Namespace
) -> tuple[Recorder, HeavyProcess, float]:
    rec = Recorder()
    heavy = HeavyProcess(farm.address, farm.token)
    if not await asyncio.to_thread(heavy.ready.wait, 120):
        raise SystemExit("the heavy agent did not start")
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(farm.address, options=CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentGatewayStub(channel)
        agents = [
            asyncio.create_task(
                light_agent(stub, farm.token, f"light-{i + 1}", args.interval_s, rec, stop)
            )
            for i in range(args.agents)
        ]
        lag = asyncio.create_task(loop_lag(rec, stop))
        await asyncio.sleep(2.0)  # every stream up
        rec.window = "baseline"
        await asyncio.sleep(args.baseline_s)
        rec.window = ""
        with farm.client() as client:
            reply = await asyncio.to_thread(client.submit, spec(args.tasks), "load.yaml")
        if reply.tasks_total != args.tasks:
            raise SystemExit(f"the campaign has {reply.tasks_total} tasks, not {args.tasks}")
        if not await asyncio.to_thread(heavy.first_ack.wait, 300):
            raise SystemExit("the heavy agent's first result was never acknowledged")
        rec.window = "load"
        load_started = time.time()
        deadline = time.monotonic() + args.load_s
        while time.monotonic() < deadline and len(heavy.acks) < args.tasks:
            await asyncio.sleep(0.2)
        load_ended = time.time()
        rec.window = ""
        stop.set()
        await asyncio.gather(*agents, lag, return_exceptions=True)
    heavy.all_acks = list(heavy.acks)
    heavy.acks = [a for a in heavy.acks if load_started <= a[0] <= load_ended]
    return rec, heavy, load_ended - load_started


def summary(values: Iterable[float]) -> tuple[int, float, float, float]:
    ordered = sorted(values)
    if not ordered:
        return 0, float("nan"), float("nan"), float("nan")
    return len(ordered), percentile(ordered, 50), percentile(ordered, 99), ordered[-1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=8, help="light agents")
    parser.add_argument("--interval-s", type=float, default=0.1, help="mean probe interval")
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--load-s", type=float, default=40.0)
    parser.add_argument("--tasks", type=int, default=40, help="maximum-size results at most")
    parser.add_argument("--home", default="", help="keep the farm's files (logs) here")
    parser.add_argument("--heavy", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heavy:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(heavy_agent(*args.heavy))
        return 0

    with tempfile.TemporaryDirectory(prefix="edgefarm-hb-") as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        with LocalFarm(home=home, store_url=f"sqlite:///{home / 'r.sqlite'}", agents=0) as farm:
            rec, heavy, load_s = asyncio.run(measure(farm, args))
            heavy.stop()

    stored = [a for a in heavy.acks if a[2]]
    refused = [a for a in heavy.acks if not a[2]]
    per_trial = MAX_SAMPLES_PER_RESULT // MAX_TRIALS
    print(
        f"{args.agents} light agents, probe every ~{args.interval_s:g} s each; heavy agent "
        f"results: {MAX_TRIALS} trials x {per_trial} samples = {MAX_SAMPLES_PER_RESULT} "
        f"samples, {heavy.size / 1e6:.1f} MB each"
    )
    print(f"probe answers: {rec.reasons}; timeouts: {rec.timeouts}")
    every = ", ".join(f"{a[1]:.0f}" for a in heavy.all_acks)
    print(f"every heavy result's send->ack (ms), in order: {every}")
    header = f"{'window':<26} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    rows = [
        ("heartbeat RTT, baseline", rec.samples.get("baseline", [])),
        ("heartbeat RTT, under load", rec.samples.get("load", [])),
        ("client loop lag, baseline", rec.lag.get("baseline", [])),
        ("client loop lag, load", rec.lag.get("load", [])),
        ("heavy result send->ack", [a[1] for a in heavy.acks]),
    ]
    for name, values in rows:
        n, p50, p99, top = summary(values)
        print(f"{name:<26} {n:>6} {p50:>8.1f} {p99:>8.1f} {top:>8.1f}")
    mb = len(stored) * heavy.size / 1e6
    print(
        f"load window {load_s:.1f} s: {len(stored)} maximum-size results stored "
        f"({mb / load_s:.1f} MB/s), {len(refused)} refused"
        + (f" ({refused[0][3]})" if refused else "")
    )
    _, _, p99_load, _ = summary(rec.samples.get("load", []))
    print(f"target: heartbeat RTT p99 under load < 50 ms: {'met' if p99_load < 50 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

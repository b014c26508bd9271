"""Load levels against a serving endpoint and what each level measured.

A level is either a **concurrency** (that many requests in flight, each starting when
one ends) or a **rate** in requests per second with **constant** or **Poisson** arrivals
(seeded exponential gaps); it sends at most ``max_requests`` requests and starts none
after ``max_duration_s`` (requests in flight are waited for, each under its own time
limits). :func:`summarize` turns the per-request records into the level's figures:

- TTFT: request start to the first token-bearing event;
- ITL: the gaps between consecutive token-bearing events (all requests pooled);
- TPOT: ``(end - first token) / (output tokens - 1)`` per request with 2+ tokens;
- E2E: request start to the end of its stream;
- the raw values of each (milliseconds), failed requests, and goodput: requests that
  met the SLO (TTFT and TPOT at most their limits); :meth:`ServingLevel.summary` gives
  p50 / p90 / p99 and request, output-token and goodput throughput over the level's
  wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

from agent.serving.plan import Level, Slo
from agent.serving.sse import RequestRecord
from edgefarm.domain import ServingLevel
from edgefarm.wire_limits import MAX_SERVING_ERRORS

Send = Callable[[str], Awaitable[RequestRecord]]


def arrival_offsets(level: Level) -> list[float]:
    """Start times (seconds from the level's start) of a rate level's requests."""
    if level.rate <= 0:
        raise ValueError("arrival offsets are for rate levels")
    rng = random.Random(level.seed)
    offsets, t = [], 0.0
    for _ in range(level.max_requests):
        offsets.append(t)
        t += rng.expovariate(level.rate) if level.arrival == "poisson" else 1.0 / level.rate
    return offsets


async def run_level(level: Level, prompts: Sequence[str], send: Send) -> list[RequestRecord]:
    """Send the level's requests (prompts cycled); the records in start order."""
    if not prompts:
        raise ValueError("a load level needs at least one prompt")
    started = time.monotonic()
    deadline = started + level.max_duration_s
    records: list[RequestRecord] = []

    async def one(index: int) -> None:
        records.append(await send(prompts[index % len(prompts)]))

    if level.concurrency:
        counter = iter(range(level.max_requests))

        async def worker() -> None:
            for index in counter:
                if time.monotonic() >= deadline:
                    return
                await one(index)

        await asyncio.gather(*(worker() for _ in range(level.concurrency)))
    else:
        tasks = []
        for index, offset in enumerate(arrival_offsets(level)):
            delay = started + offset - time.monotonic()
            if started + offset >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(index)))
        await asyncio.gather(*tasks)
    records.sort(key=lambda r: r.start_ns)
    return records


def summarize(level: Level, records: list[RequestRecord], wall_s: float, slo: Slo) -> ServingLevel:
    """The level's per-request figures from its records over ``wall_s`` seconds."""
    ok = [r for r in records if r.ok]
    ttft = [(r.token_ns[0] - r.start_ns) / 1e6 for r in ok]
    per_token = [
        (r.end_ns - r.token_ns[0]) / 1e6 / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        for r in ok
    ]
    tpot = [t for r, t in zip(ok, per_token, strict=True) if r.output_tokens > 1]
    good = sum(
        1 for a, b in zip(ttft, per_token, strict=True) if a <= slo.ttft_ms and b <= slo.tpot_ms
    )
    errors = sorted({r.error for r in records if r.error})
    return ServingLevel(
        label=level.label(),
        concurrency=level.concurrency,
        rate=level.rate,
        arrival=level.arrival if level.rate else "",
        requests=len(records),
        failed=len(records) - len(ok),
        wall_s=wall_s,
        goodput_requests=good,
        slo_ttft_ms=slo.ttft_ms,
        slo_tpot_ms=slo.tpot_ms,
        ttft_ms=ttft,
        tpot_ms=tpot,
        e2e_ms=[(r.end_ns - r.start_ns) / 1e6 for r in ok],
        output_tokens=[r.output_tokens for r in ok],
        itl_ms=[(b - a) / 1e6 for r in ok for a, b in itertools.pairwise(r.token_ns)],
        errors=errors[:MAX_SERVING_ERRORS],
        server=native_figures(ok),
    )


def native_figures(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Ollama's own figures over a level's successful requests: the median of each (as
    ``ollama.<name>``), and its evaluation speed, tokens over evaluation time."""
    keys = sorted({k for r in records for k in r.native})
    out = {
        f"ollama.{k}": statistics.median([r.native[k] for r in records if k in r.native])
        for k in keys
    }
    count = sum(r.native.get("eval_count", 0.0) for r in records)
    ms = sum(r.native.get("eval_duration_ms", 0.0) for r in records)
    if count and ms:
        out["ollama.eval_tok_per_s"] = count / ms * 1000.0
    return out


async def measure_level(level: Level, prompts: Sequence[str], send: Send, slo: Slo) -> ServingLevel:
    """Run one level and summarise it."""
    started = time.perf_counter()
    records = await run_level(level, prompts, send)
    return summarize(level, records, time.perf_counter() - started, slo)

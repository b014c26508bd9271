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
- p50 / p90 / p99 of each (milliseconds), request/s and output tok/s over the level's
  wall time, failed requests, and goodput: requests/s that met the SLO (TTFT and TPOT
  at most their limits).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.serving.sse import RequestRecord

ARRIVALS = ("constant", "poisson")
Send = Callable[[str], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` > 0, or ``rate`` > 0 with ``arrival``."""

    concurrency: int = 0
    rate: float = 0.0
    arrival: str = "constant"
    max_requests: int = 32
    max_duration_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("a load level is a concurrency or a rate, not both or neither")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if self.max_requests < 1 or self.max_duration_s <= 0:
            raise ValueError("a load level needs max_requests >= 1 and max_duration_s > 0")

    def label(self) -> str:
        """``c=4`` or ``r=2.0/s poisson``."""
        if self.concurrency:
            return f"c={self.concurrency}"
        return f"r={self.rate:g}/s {self.arrival}"


@dataclass(frozen=True)
class Slo:
    """Service-level objective for goodput."""

    ttft_ms: float = 500.0
    tpot_ms: float = 100.0


@dataclass(frozen=True)
class LevelResult:
    """A level's figures (milliseconds, per second) and its raw records."""

    level: Level
    wall_s: float
    requests: int
    failed: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    request_per_s: float
    output_tok_per_s: float
    goodput_per_s: float
    errors: list[str]
    records: list[RequestRecord]


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


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 (nearest rank) and the count; empty for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "p50": statistics.median(ordered),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "n": len(ordered),
    }


def summarize(level: Level, records: list[RequestRecord], wall_s: float, slo: Slo) -> LevelResult:
    """The level's figures from its records over ``wall_s`` seconds."""
    ok = [r for r in records if r.ok]
    ttft = [(r.token_ns[0] - r.start_ns) / 1e6 for r in ok]
    e2e = [(r.end_ns - r.start_ns) / 1e6 for r in ok]
    itl = [(b - a) / 1e6 for r in ok for a, b in itertools.pairwise(r.token_ns)]
    tpot_of = {
        id(r): (r.end_ns - r.token_ns[0]) / 1e6 / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1
    }
    good = [
        r
        for r in ok
        if (r.token_ns[0] - r.start_ns) / 1e6 <= slo.ttft_ms
        and tpot_of.get(id(r), 0.0) <= slo.tpot_ms
    ]
    wall = max(wall_s, 1e-9)
    return LevelResult(
        level=level,
        wall_s=wall_s,
        requests=len(records),
        failed=len(records) - len(ok),
        ttft_ms=percentiles(ttft),
        tpot_ms=percentiles(list(tpot_of.values())),
        itl_ms=percentiles(itl),
        e2e_ms=percentiles(e2e),
        request_per_s=len(ok) / wall,
        output_tok_per_s=sum(r.output_tokens for r in ok) / wall,
        goodput_per_s=len(good) / wall,
        errors=sorted({r.error for r in records if r.error}),
        records=records,
    )


async def measure_level(level: Level, prompts: Sequence[str], send: Send, slo: Slo) -> LevelResult:
    """Run one level and summarise it."""
    started = time.perf_counter()
    records = await run_level(level, prompts, send)
    return summarize(level, records, time.perf_counter() - started, slo)

"""From stored result rows to one Sample per series: blocks merged, roles kept apart.

A nightly run measures each series in blocks (tasks of a few trials each, interleaved
with the baseline replay's blocks); this module puts a side's blocks back together.
Pure: rows in, samples out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from edgefarm.domain import LatencySummary
from edgefarm.gc_pause import gc_paused
from results.regression.metrics import METRICS, samples_from_row
from results.regression.types import MetricKind, Sample, SeriesKey

Row = dict[str, Any]


@gc_paused()
def series_samples(
    rows: Iterable[Row], run_id: str, at: float, role: str = "candidate"
) -> dict[SeriesKey, Sample]:
    """Every series measured by ``rows`` in ``role``, one Sample per metric.

    Timing metrics pool the trials of all blocks (the statistical unit stays the
    trial); accuracy outcomes and exact counters come from the block that evaluated
    (block 0). Failed rows contribute nothing.
    """
    parts: dict[SeriesKey, list[tuple[int, Sample]]] = {}
    for row in rows:
        if row.get("role", "candidate") != role or not row.get("ok"):
            continue
        for metric, sample in samples_from_row(row, run_id, at).items():
            key = SeriesKey(row["model"], row["backend"], row["scheme"], row["device_id"], metric)
            parts.setdefault(key, []).append((int(row.get("block", 0)), sample))
    return {key: _merge(key, blocks) for key, blocks in parts.items()}


def _merge(key: SeriesKey, blocks: list[tuple[int, Sample]]) -> Sample:
    blocks.sort(key=lambda item: item[0])
    first = blocks[0][1]
    if len(blocks) == 1:
        return first
    metric = METRICS.get(key.metric)
    if metric is not None and metric.kind is not MetricKind.TIMING:
        # Deterministic figures: the evaluating block's (accuracy is computed once).
        with_outcomes = [s for _, s in blocks if s.outcomes]
        return with_outcomes[0] if with_outcomes else first
    trials = tuple(v for _, s in blocks for v in (s.trials or (s.value,)))
    return Sample(
        run_id=first.run_id,
        at=first.at,
        value=statistics.median(trials),
        trials=trials,
        outcomes=first.outcomes,
    )


def series_id(model: str, backend: str, scheme: str, device_id: str) -> str:
    """``model/backend/scheme@device_id``: how a series is named to the planner."""
    return f"{model}/{backend}/{scheme}@{device_id}"


def series_label(key: SeriesKey) -> str:
    """The series id of a series key (its metric aside)."""
    return series_id(key.model, key.backend, key.scheme, key.device_id)


def row_series(row: Row) -> str:
    """The series id of a result row."""
    return series_id(row["model"], row["backend"], row["scheme"], row["device_id"])


def pool_blocks(
    rows: Iterable[Row],
    role: str = "candidate",
    samples_of: Callable[[Iterable[int]], dict[int, list[float]]] | None = None,
) -> list[Row]:
    """One row per campaign and series for ``role``: its blocks' samples pooled, latency
    summary and throughput recomputed, accuracy from the evaluating block. Rows of plain
    campaigns (one block) pass through; nightly replay rows are left out by default.

    Rows read without their samples get them from ``samples_of`` (result ids to
    samples, e.g. :meth:`ResultsStore.result_samples`), asked only for pooled blocks."""
    groups: dict[tuple[str, str, str, str, str], list[Row]] = {}
    for row in rows:
        if row.get("role", "candidate") == role:
            key = (
                row["campaign_id"],
                row["model"],
                row["backend"],
                row["scheme"],
                row["device_id"],
            )
            groups.setdefault(key, []).append(row)
    pooled = []
    for members in groups.values():
        members.sort(key=lambda r: int(r.get("block", 0)))
        ok = [r for r in members if r.get("ok")]
        if len(members) == 1 or not ok:
            pooled.append(members[0])
            continue
        first = dict(ok[0])
        missing = [r["result_id"] for r in ok if "samples_ms" not in r]
        loaded = samples_of(missing) if missing and samples_of is not None else {}
        samples = [
            s
            for r in ok
            for s in (r["samples_ms"] if "samples_ms" in r else loaded.get(r["result_id"], []))
        ]
        lat = LatencySummary.from_samples(samples)
        batch = int(first.get("batch_size") or 1)
        first.update(
            samples_ms=samples,
            trial_medians_ms=[m for r in ok for m in r.get("trial_medians_ms") or []],
            trials_detail=[d for r in ok for d in r.get("trials_detail") or []],
            trials=sum(int(r.get("trials") or 0) for r in ok),
            lat_mean_ms=lat.mean,
            lat_p50_ms=lat.p50,
            lat_p90_ms=lat.p90,
            lat_p99_ms=lat.p99,
            lat_stdev_ms=lat.stdev,
            lat_cv=lat.cv,
            lat_min_ms=lat.min,
            lat_max_ms=lat.max,
            throughput_per_s=batch * 1000.0 / lat.mean if lat.mean else None,
            peak_rss_bytes=max(int(r.get("peak_rss_bytes") or 0) for r in ok),
            valid=all(r.get("valid") for r in members),
            ok=len(ok) == len(members),
            blocks=len(members),
        )
        pooled.append(first)
    return pooled

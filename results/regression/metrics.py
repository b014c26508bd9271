"""The metric catalog and the step from one stored result row to per-metric samples.

Every metric has a unit, a good direction and a comparison kind:

- Timing metrics are rank-tested on per-trial values (each trial is a fresh process):
  latency (the trial medians), throughput derived per trial from them, and the
  per-trial figures in ``trials_detail`` (peak RSS, load time, prompt tok/s, TTFT).
  Minimum effects: 2% for latency and throughput, 3% for prompt tok/s and TTFT (each
  trial's figure is the median of only a few prompt runs) and for energy per inference
  (joules per item, per generated token for language models, where the device
  measures energy: agent.energy), 5% for peak RSS (allocator
  and page-cache noise), 10% for load time (dominated by file-system caching).
- Accuracy metrics: ``top1`` with per-example outcomes (paired exact test) and the
  fidelity figures that are deterministic for a given artifact, runtime and eval set
  (``agreement``, ``top1_agreement``, ``kld_mean``, ``ppl_ratio``): compared with a
  minimum absolute change (0.5 points of agreement, 0.002 nats of mean KL divergence,
  0.005 of the perplexity ratio to the shared reference). Perplexity itself is not a
  series: its scale depends on the eval text, and ``ppl_ratio`` carries the same change
  on a fixed scale. ``kld_mean`` carries the estimator that computed it
  (:func:`kld_method`): a baseline and a candidate scored by different methods are not
  compared.
- Exact counters: ``model_size``; any change is reported.

LLM rows (those with ``prompt_tok_per_s`` or ``kld_mean``) time one generated token
per iteration, so their throughput series is ``gen_tok_per_s`` in tok/s; other rows
give ``throughput`` in items/s.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable
from typing import Any

from results.compare import is_llm_row
from results.regression.types import Direction, Metric, MetricKind, Sample
from results.units import as_number

Row = dict[str, Any]

_L, _H = Direction.LOWER, Direction.HIGHER
_T, _A, _E = MetricKind.TIMING, MetricKind.ACCURACY, MetricKind.EXACT

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("latency_p50", "ms", _L, _T, 0.02),
        Metric("throughput", "items/s", _H, _T, 0.02),
        Metric("gen_tok_per_s", "tok/s", _H, _T, 0.02),
        Metric("prompt_tok_per_s", "tok/s", _H, _T, 0.03),
        Metric("ttft_ms", "ms", _L, _T, 0.03),
        Metric("energy_per_inference_j", "J", _L, _T, 0.03),
        Metric("peak_rss", "bytes", _L, _T, 0.05),
        Metric("load_time", "s", _L, _T, 0.10),
        Metric("model_size", "bytes", _L, _E),
        Metric("top1", "fraction", _H, _A, 0.005),
        Metric("agreement", "fraction", _H, _A, 0.005),
        Metric("top1_agreement", "fraction", _H, _A, 0.005),
        Metric("kld_mean", "nats", _L, _A, 0.002),
        Metric("ppl_ratio", "ratio", _L, _A, 0.005),
    )
}

# per-trial figures: backend ones, and energy per item (per generated token for LLMs)
_TRIAL_METRICS = ("prompt_tok_per_s", "ttft_ms", "energy_per_inference_j")
_ACCURACY_KEYS = ("top1", "agreement", "top1_agreement", "kld_mean", "ppl_ratio")


def _numbers(values: Iterable[Any]) -> tuple[float, ...]:
    return tuple(n for n in (as_number(v) for v in values) if n is not None)


def _timing(run_id: str, at: float, trials: tuple[float, ...]) -> Sample | None:
    if not trials:
        return None
    return Sample(run_id=run_id, at=at, value=statistics.median(trials), trials=trials)


def _valid_details(row: Row) -> list[dict[str, Any]]:
    return [d for d in row.get("trials_detail") or [] if d.get("valid", True)]


def samples_from_row(row: Row, run_id: str, at: float) -> dict[str, Sample]:
    """Per-metric samples of one result row (none for a failed or invalid row).

    Timing samples hold per-trial values (trial medians, per-trial throughput, and
    ``trials_detail`` figures) with their median as ``value``; ``top1`` carries the
    row's ``example_outcomes`` when present; ``model_size`` is the exact byte count.
    """
    if not row.get("ok") or not row.get("valid"):
        return {}
    out: dict[str, Sample] = {}

    def put(name: str, sample: Sample | None) -> None:
        if sample is not None:
            out[name] = sample

    medians = tuple(m for m in _numbers(row.get("trial_medians_ms") or []) if m > 0)
    put("latency_p50", _timing(run_id, at, medians))
    batch = row.get("batch_size") or 1
    throughput = "gen_tok_per_s" if is_llm_row(row) else "throughput"
    put(throughput, _timing(run_id, at, tuple(batch * 1000.0 / m for m in medians)))

    details = _valid_details(row)
    rss = tuple(r for r in _numbers(d.get("peak_rss_bytes") for d in details) if r > 0)
    put("peak_rss", _timing(run_id, at, rss))
    put("load_time", _timing(run_id, at, _numbers(d.get("load_time_s") for d in details)))
    for name in _TRIAL_METRICS:
        values = _numbers((d.get("metrics") or {}).get(name) for d in details)
        sample = _timing(run_id, at, values)
        if sample is not None and name == "energy_per_inference_j":
            sample = dataclasses.replace(sample, method=energy_method(row))
        put(name, sample)

    size = as_number(row.get("model_size_bytes"))
    if size:
        out["model_size"] = Sample(run_id=run_id, at=at, value=size)

    accuracy = row.get("accuracy") or {}
    for name in _ACCURACY_KEYS:
        value = as_number(accuracy.get(name))
        if value is None:
            continue
        outcomes: tuple[int, ...] = ()
        if name == "top1" and row.get("example_outcomes"):
            outcomes = tuple(map(int, map(bool, row["example_outcomes"])))
        method = kld_method(row) if name == "kld_mean" else ""
        out[name] = Sample(run_id=run_id, at=at, value=value, outcomes=outcomes, method=method)
    return out


def energy_method(row: Row) -> str:
    """The energy source of a row (``energy.source`` in its environment, e.g. ``rapl:
    package-0, dram``): nights measured by different meters are not compared."""
    return str((row.get("environment") or {}).get("energy.source") or "")


def kld_method(row: Row) -> str:
    """The KL divergence estimator of a row and its parameters, as recorded in its
    environment (``fidelity.kld_method``, ``fidelity.kld_params``); "" when not recorded
    (rows scored before the method was recorded: the top-k + residual lower bound)."""
    environment = row.get("environment") or {}
    parts = (environment.get("fidelity.kld_method"), environment.get("fidelity.kld_params"))
    return " ".join(str(p) for p in parts if p not in (None, ""))

"""A hub profile (``InferenceJob.download_profile()``) as a farm trial: pure mapping.

The client builds the profile dict with two keys (``qai_hub.client`` 0.56,
``_profile_pb_to_python_dict``):

- ``execution_summary``: ``estimated_inference_time`` (µs),
  ``estimated_inference_peak_memory`` (bytes), ``first_load_time`` / ``warm_load_time``
  (µs), ``first_load_peak_memory`` / ``warm_load_peak_memory`` (bytes), the
  ``<stage>_memory_increase_range`` / ``<stage>_memory_peak_range`` pairs (bytes, lower
  and upper; stages ``compile``, ``first_load``, ``warm_load``, ``inference``) and the
  ``all_<stage>_times`` lists (µs); any of them may be ``None`` or missing on older
  profiles;
- ``execution_detail``: one dict per layer with ``name``, ``type``, ``compute_unit``
  (``NPU``, ``GPU`` or ``CPU``) and optionally ``execution_time`` / ``execution_cycles``.

The trial: latency samples from ``all_inference_times`` (in ms), load time from the first
(cold) load, peak memory from the inference peak; the metrics keep every figure with its
unit in its name, both ends of each memory range, and the compute-unit placement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgefarm.domain import MeasureSettings, TrialOutcome

US_PER_MS = 1000.0
US_PER_S = 1_000_000.0
COMPUTE_UNITS = ("NPU", "GPU", "CPU")
MEMORY_STAGES = ("first_load", "warm_load", "inference")


def profile_trial(profile: Mapping[str, Any], settings: MeasureSettings) -> TrialOutcome:
    """The trial one profiling inference job stands for."""
    summary: Mapping[str, Any] = profile.get("execution_summary") or {}
    times_us = _numbers(summary.get("all_inference_times"))
    estimated_us = _number(summary.get("estimated_inference_time"))
    valid, reason = True, ""
    if times_us:
        samples_ms = [t / US_PER_MS for t in times_us]
        if len(samples_ms) < settings.min_iterations:
            valid = False
            reason = (
                f"the hub ran {len(samples_ms)} of the {settings.min_iterations} "
                "iterations asked for"
            )
    elif estimated_us is not None:
        samples_ms = [estimated_us / US_PER_MS]
        valid, reason = False, "the hub reported no per-iteration times, only an estimate"
    else:
        samples_ms = []
        valid, reason = False, "the hub's profile holds no inference time"
    first_load_us = _number(summary.get("first_load_time"))
    peak = _number(summary.get("estimated_inference_peak_memory"))
    peak_range = _range(summary.get("inference_memory_peak_range"))
    load_increase = _range(summary.get("first_load_memory_increase_range"))
    return TrialOutcome(
        samples_ms=samples_ms,
        warmup_iterations=0,  # the hub warms up on its own and does not say how much
        duration_s=sum(samples_ms) / 1000.0,
        load_time_s=first_load_us / US_PER_S if first_load_us is not None else math.nan,
        peak_rss_bytes=int(peak if peak is not None else (peak_range[1] if peak_range else 0)),
        load_rss_delta_bytes=int(load_increase[1]) if load_increase else 0,
        valid=valid,
        invalid_reason=reason,
        metrics=profile_metrics(profile),
    )


def profile_metrics(profile: Mapping[str, Any]) -> dict[str, float]:
    """Every figure of a profile worth keeping, units in the names."""
    summary: Mapping[str, Any] = profile.get("execution_summary") or {}
    metrics: dict[str, float] = {}
    for key, name in (
        ("estimated_inference_time", "estimated_inference_ms"),
        ("first_load_time", "first_load_ms"),
        ("warm_load_time", "warm_load_ms"),
    ):
        value = _number(summary.get(key))
        if value is not None:
            metrics[name] = value / US_PER_MS
    for key in (
        "estimated_inference_peak_memory",
        "first_load_peak_memory",
        "warm_load_peak_memory",
    ):
        value = _number(summary.get(key))
        if value is not None:
            metrics[f"{key}_bytes"] = value
    for stage in MEMORY_STAGES:
        for kind in ("peak", "increase"):
            pair = _range(summary.get(f"{stage}_memory_{kind}_range"))
            if pair is not None:
                metrics[f"{stage}_memory_{kind}_low_bytes"] = pair[0]
                metrics[f"{stage}_memory_{kind}_high_bytes"] = pair[1]
    metrics.update(placement_metrics(profile.get("execution_detail") or []))
    return metrics


def placement_metrics(layers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Layers per compute unit: ``npu_layers``, ``gpu_layers``, ``cpu_layers``, ``layers``
    and the share of layers on the NPU (omitted when the profile lists no layers)."""
    if not layers:
        return {}
    counts = dict.fromkeys(COMPUTE_UNITS, 0)
    for layer in layers:
        unit = str(layer.get("compute_unit", "")).upper()
        if unit in counts:
            counts[unit] += 1
    out = {f"{unit.lower()}_layers": float(n) for unit, n in counts.items()}
    out["layers"] = float(len(layers))
    out["npu_layer_share"] = counts["NPU"] / len(layers)
    return out


def placement_summary(layers: Sequence[Mapping[str, Any]]) -> str:
    """``"NPU:12,CPU:1"``: the compute units the layers ran on (for the environment)."""
    counts: dict[str, int] = {}
    for layer in layers:
        unit = str(layer.get("compute_unit", "")).upper() or "?"
        counts[unit] = counts.get(unit, 0) + 1
    return ",".join(f"{unit}:{n}" for unit, n in sorted(counts.items()))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, list | tuple):
        return []
    return [v for v in (_number(x) for x in values) if v is not None]


def _range(value: Any) -> tuple[float, float] | None:
    """A ``(lower, upper)`` pair (a tuple from the client, a list after JSON), or None."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    low, high = _number(value[0]), _number(value[1])
    return (low, high) if low is not None and high is not None else None

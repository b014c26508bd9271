"""Nightly regression detection glue: plain series in, decisions out (no store, no I/O).

The nightly procedure these functions serve:

1. :func:`judge_night` compares every series present in both the baseline and the
   candidate night (:func:`results.regression.stats.compare`).
2. :func:`to_confirm` picks the timing regressions; the runner re-measures each in a
   fresh run (baseline and candidate interleaved when both artifacts are runnable) and
   :func:`confirm` marks the first verdict with the re-measurement's outcome. A timing
   regression is reported only when confirmed; accuracy figures are deterministic for a
   given artifact and need no re-measurement.
3. :func:`regressions` are what fails the night. Exact counters that changed
   (:func:`changes`, e.g. model size) are reported but do not fail the night by
   themselves: a different size is expected whenever an artifact is rebuilt on purpose,
   and any real cost of it shows up in the timing, memory and accuracy series.
4. :func:`history` adds the change points of a series' nightly history, which catch
   slow drifts made of steps below the nightly gate.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping

import numpy as np

from results.regression.changepoint import MIN_MAGNITUDE, detect_change_points
from results.regression.metrics import METRICS
from results.regression.stats import compare
from results.regression.types import (
    MetricKind,
    Sample,
    SeriesHistory,
    SeriesKey,
    Status,
    Verdict,
)


def judge_night(
    baseline: Mapping[SeriesKey, Sample], candidate: Mapping[SeriesKey, Sample]
) -> list[Verdict]:
    """Verdicts for the series in both nights whose metric is in the catalog, by label."""
    keys = [k for k in candidate if k in baseline and k.metric in METRICS]
    keys.sort(key=SeriesKey.label)
    return [compare(k, METRICS[k.metric], baseline[k], candidate[k]) for k in keys]


def to_confirm(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Timing regressions not yet re-measured: the series to measure again in a fresh run."""
    return [
        v
        for v in verdicts
        if v.status is Status.REGRESSION
        and v.confirmed is None
        and v.key.metric in METRICS
        and METRICS[v.key.metric].kind is MetricKind.TIMING
    ]


def confirm(first: Verdict, again: Verdict) -> Verdict:
    """``first`` marked confirmed when the re-measurement reached the same status."""
    if first.key != again.key:
        raise ValueError(f"confirming {first.key.label()} with {again.key.label()}")
    return dataclasses.replace(first, confirmed=again.status is first.status)


def regressions(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """The verdicts that fail the night: regressions not refuted by a re-measurement.

    Unconfirmed timing regressions (``confirmed is None``) count: a runner that cannot
    re-measure still reports them. CHANGED exact counters are not included (see
    :func:`changes`).
    """
    return [v for v in verdicts if v.status is Status.REGRESSION and v.confirmed is not False]


def changes(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Exact counters that changed: reported, but not failing the night by themselves."""
    return [v for v in verdicts if v.status is Status.CHANGED]


def fails_night(verdicts: Iterable[Verdict]) -> bool:
    """True when any verdict is a (not refuted) regression."""
    return bool(regressions(verdicts))


def series_seed(key: SeriesKey) -> int:
    """A stable permutation seed per series, so a history's change points are repeatable."""
    return zlib.crc32(key.label().encode())


def history(
    key: SeriesKey,
    samples: list[Sample],
    baseline_run_id: str | None = None,
    *,
    min_magnitude: float | None = None,
) -> SeriesHistory:
    """A series' nights in time order with change points and the baseline night's band.

    The band is the range of the baseline night's trial values (its value when it has
    none). ``min_magnitude`` defaults by kind: :data:`MIN_MAGNITUDE` for timing, the
    minimum absolute change relative to the series' median for accuracy, 0 (any change)
    for exact counters.
    """
    metric = METRICS[key.metric]
    ordered = sorted(samples, key=lambda s: s.at)
    if min_magnitude is None:
        if metric.kind is MetricKind.TIMING:
            min_magnitude = MIN_MAGNITUDE
        elif metric.kind is MetricKind.ACCURACY and ordered:
            level = abs(float(np.median([s.value for s in ordered])))
            min_magnitude = metric.min_effect / level if level else 0.0
        else:
            min_magnitude = 0.0
    band: tuple[float, float] | None = None
    for sample in ordered:
        if sample.run_id == baseline_run_id:
            values = sample.trials or (sample.value,)
            band = (min(values), max(values))
    points = detect_change_points(key, ordered, min_magnitude=min_magnitude, seed=series_seed(key))
    return SeriesHistory(
        key=key,
        unit=metric.unit,
        direction=metric.direction,
        samples=ordered,
        change_points=points,
        baseline_band=band,
    )

"""Nightly regression detection glue: plain series in, decisions out (no store, no I/O).

The nightly procedure these functions serve:

1. :func:`judge_night` compares every series present in both the baseline and the
   candidate night (:func:`results.regression.stats.compare`); a throughput series and
   the latency series it mirrors are one finding (:func:`fold_mirrors`).
2. :func:`to_confirm` picks the timing regressions; the runner re-measures each in a
   fresh run (baseline and candidate interleaved when both artifacts are runnable) and
   :func:`confirm` marks the first verdict with the re-measurement's outcome. A timing
   regression is reported only when confirmed; accuracy figures are deterministic for a
   given artifact and need no re-measurement.
3. :func:`regressions` are what fails the night. Exact counters that changed
   (:func:`changes`, e.g. model size) are reported but do not fail the night by
   themselves: a different size is expected whenever an artifact is rebuilt on purpose,
   and any real cost of it shows up in the timing, memory and accuracy series.
4. Series without an interleaved replay are judged sequentially with the night as the
   unit (:func:`judge_runs` against stored nights, confirmed by the mean of
   :data:`CONFIRM_RUNS` fresh runs); see :mod:`coordinator.nightly.sequential`.
5. :func:`history` adds the change points of a series' nightly history, which catch
   slow drifts made of steps below the nightly gate.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from scipy.stats import t as student  # type: ignore[import-untyped]

from edgefarm.gc_pause import gc_paused
from results.regression.changepoint import MIN_MAGNITUDE, detect_change_points, detect_many
from results.regression.metrics import METRICS
from results.regression.stats import TIMING_ALPHA, compare, compare_timing, compare_timing_many
from results.regression.types import (
    ChangePoint,
    MetricKind,
    Sample,
    SeriesHistory,
    SeriesKey,
    Status,
    Verdict,
)

# Stored nights of the baseline configuration pooled as a sequential confirmation's
# independent baseline.
SEQUENTIAL_NIGHTS = 3
# A sequential confirmation with no other stored night reuses the first check's
# baseline: not independent, so it must clear a ten times stricter level.
DEPENDENT_CONFIRM_ALPHA = TIMING_ALPHA / 10


@gc_paused()
def judge_night(
    baseline: Mapping[SeriesKey, Sample],
    candidate: Mapping[SeriesKey, Sample],
    levels: Mapping[tuple[str, str], float] | None = None,
) -> list[Verdict]:
    """Verdicts for the series in both nights whose metric is in the catalog, by label.

    ``levels`` (from :func:`device_levels`) scales a timing series' baseline by its
    device's own level change for that metric: how a comparison with a stored night
    (sequential) discounts a machine slow phase or a whole-night offset.
    """
    keys = [k for k in candidate if k in baseline and k.metric in METRICS]
    keys.sort(key=SeriesKey.label)
    out: list[Verdict | None] = [None] * len(keys)
    timing: list[int] = []
    pairs = []
    for i, k in enumerate(keys):
        base, metric = baseline[k], METRICS[k.metric]
        level = (levels or {}).get((k.device_id, k.metric), 1.0)
        if level != 1.0 and metric.kind is MetricKind.TIMING:
            base = scaled(base, level)
        if metric.kind is MetricKind.TIMING and base.method == candidate[k].method:
            timing.append(i)  # compared below, all together
            pairs.append((k, metric, base, candidate[k]))
        else:
            out[i] = compare(k, metric, base, candidate[k])
    for i, verdict in zip(timing, compare_timing_many(pairs), strict=True):
        out[i] = verdict
    return fold_mirrors([v for v in out if v is not None])


# Throughput series derived from the same trial medians as a latency series: the same
# measurement seen the other way up (per trial ``batch * 1000 / median``), so the same
# rank test, the reciprocal ratio and the same verdict.
MIRRORS = {"throughput": "latency_p50", "gen_tok_per_s": "latency_p50"}


def fold_mirrors(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """One finding per timing change: each mirror verdict (:data:`MIRRORS`) with the same
    status as its latency verdict is folded into it (the latency verdict carries the
    mirror's name and figures) and dropped; a mirror without its latency verdict, or
    with another status, stays on its own."""
    by_key = {v.key: v for v in verdicts}
    folded: dict[SeriesKey, Verdict] = {}
    dropped: set[SeriesKey] = set()
    for v in verdicts:
        source = MIRRORS.get(v.key.metric)
        if source is None:
            continue
        main_key = dataclasses.replace(v.key, metric=source)
        main = folded.get(main_key, by_key.get(main_key))
        if main is None or main.status is not v.status or main.mirror:
            continue
        folded[main_key] = dataclasses.replace(
            main, mirror=v.key.metric, mirror_baseline=v.baseline, mirror_candidate=v.candidate
        )
        dropped.add(v.key)
    return [folded.get(v.key, v) for v in verdicts if v.key not in dropped]


def scaled(sample: Sample, factor: float) -> Sample:
    """``sample`` with its value and trials multiplied by ``factor``."""
    return dataclasses.replace(
        sample, value=sample.value * factor, trials=tuple(t * factor for t in sample.trials)
    )


def device_levels(
    baseline: Mapping[SeriesKey, Sample],
    candidate: Mapping[SeriesKey, Sample],
    controls: Iterable[SeriesKey],
) -> dict[tuple[str, str], float]:
    """Per (device, timing metric): the device's own level change, the median
    candidate/baseline ratio of its control series (nothing measured changed)."""
    pairs: dict[tuple[str, str], list[tuple[Sample, Sample]]] = {}
    for k in controls:
        metric = METRICS.get(k.metric)
        if k in baseline and k in candidate and metric and metric.kind is MetricKind.TIMING:
            pairs.setdefault((k.device_id, k.metric), []).append((baseline[k], candidate[k]))
    return {dm: device_level(p) for dm, p in pairs.items()}


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
    """``first`` marked confirmed when the re-measurement reached the same status (a
    folded mirror is confirmed with its latency verdict: they are one finding)."""
    if first.key != again.key:
        raise ValueError(f"confirming {first.key.label()} with {again.key.label()}")
    return dataclasses.replace(first, confirmed=again.status is first.status)


def pooled(nights: Sequence[Sample], scale: float = 1.0) -> Sample | None:
    """Several stored nights of one series as one sample: their trials pooled (the
    trial stays the unit), each multiplied by ``scale``; None without trials."""
    trials = tuple(t * scale for s in nights for t in (s.trials or (s.value,)))
    if not nights or not trials:
        return None
    last = max(nights, key=lambda s: s.at)
    return dataclasses.replace(
        last, value=float(np.median(trials)), trials=trials, outcomes=(), run_id=last.run_id
    )


def device_level(pairs: Iterable[tuple[Sample, Sample]]) -> float:
    """How much the device itself moved: the median candidate/baseline ratio of control
    series (same device and metric, nothing measured changed); 1.0 without controls."""
    ratios = [c.value / b.value for b, c in pairs if b.value > 0 and c.value > 0]
    return float(np.median(ratios)) if ratios else 1.0


def sequential_baseline(
    key: SeriesKey,
    first: Sample,
    stored: Sequence[Sample],
    controls: Iterable[tuple[Sequence[Sample], Sample]] = (),
) -> tuple[Sample, str]:
    """The baseline a sequential confirmation is judged against, and how it was built.

    A sequential first check compares tonight's candidate with the stored trials of
    the baseline night (``first``); a confirmation judged against the same trials
    would flag again whenever that night happened to run fast, so its stages would not
    be independent. The confirmation's baseline is therefore the other stored nights
    of the baseline configuration (``stored``, the first check's night left out, the
    latest :data:`SEQUENTIAL_NIGHTS`), trials pooled, scaled by the device's own level
    change since those nights (:func:`device_level` of ``controls``: per control series
    its samples of the same nights and tonight's sample), so a machine slow phase or a
    whole-night offset of the device is not taken for a software regression. Without
    other stored nights the first check's baseline is used, scaled the same way: such a
    confirmation is not independent and is judged at the stricter
    :data:`DEPENDENT_CONFIRM_ALPHA` (see :func:`confirm_sequential`).
    """
    others = [s for s in stored if s.run_id != first.run_id and s.trials]
    others = sorted(others, key=lambda s: s.at)[-SEQUENTIAL_NIGHTS:]
    nights = {s.run_id for s in others} if others else {first.run_id}
    pairs = []
    for control_nights, tonight in controls:
        base = pooled([s for s in control_nights if s.run_id in nights])
        if base is not None:
            pairs.append((base, tonight))
    level = device_level(pairs)
    how = f"{len(pairs)} control series, device x{level:.3f}" if pairs else "no control series"
    if others:
        base = pooled(others, level)
        assert base is not None
        return base, f"independent baseline: {len(others)} other stored night(s), {how}"
    base = pooled([first], level)
    assert base is not None
    return base, f"no other stored night: the first check's baseline, {how}"


def confirm_sequential(
    first: Verdict, baseline: Sample, candidate: Sample, independent: bool
) -> Verdict:
    """Judge a sequential re-measurement against ``baseline`` (from
    :func:`sequential_baseline`) and mark ``first`` with the outcome; a dependent
    baseline is judged at :data:`DEPENDENT_CONFIRM_ALPHA`."""
    metric = METRICS[first.key.metric]
    if independent:
        again = compare(first.key, metric, baseline, candidate)
    else:
        again = compare_timing(first.key, metric, baseline, candidate, DEPENDENT_CONFIRM_ALPHA)
    return confirm(first, again)


# Sequential mode with the night as the unit (see :func:`judge_runs`).
SEQUENTIAL_ALPHA = 0.10  # the night's first check: the minimum effect binds, power kept
SEQUENTIAL_CONFIRM_ALPHA = 0.001  # the confirmation's fresh runs (heavy-tailed run values)
CONFIRM_RUNS = 3  # fresh runs of a flagged series whose values are averaged
MIN_SPREAD_DF = 2  # stored nights' degrees of freedom needed for the night-to-night spread
TRIM_SDS = 3.0  # stored nights this many robust sds from their build's median are left out
TRIM_MIN_NIGHTS = 10  # ... once at least this many stored nights give the robust scale


@dataclass(frozen=True)
class StoredNight:
    """One stored night of a series for the sequential run-level test: its sample, the
    software identity it measured, and the device's level tonight relative to that
    night (from control series, :func:`night_level`; 1.0 without controls)."""

    build: str
    sample: Sample
    level: float = 1.0


def night_level(pairs: Iterable[tuple[Sample, Sample]]) -> float:
    """Tonight's device level relative to a stored night: the median tonight/that-night
    ratio of the device's control series (same metric, software identity unchanged
    between the two nights); 1.0 without controls."""
    return device_level(pairs)


def _trim_nights(groups: dict[str, list[float]]) -> tuple[dict[str, list[float]], int]:
    """Stored nights (log values per build) without the outlying ones: farther than
    :data:`TRIM_SDS` robust standard deviations (1.4826 x the median absolute deviation
    from the build's median, pooled over builds with two nights or more) from their
    build's median, once :data:`TRIM_MIN_NIGHTS` nights give that scale (the robust scale
    of a few nights can be tiny). A night with a slow stretch inside its run or a noisy run would
    otherwise inflate the spread and shift the baseline; tonight's own runs are never
    trimmed (a flag from such a run is what the fresh confirmation runs are for)."""
    deviations = [abs(x - float(np.median(g))) for g in groups.values() if len(g) >= 2 for x in g]
    if len(deviations) < TRIM_MIN_NIGHTS:
        return groups, 0  # too few nights for a robust scale: the t test's df cover it
    scale = 1.4826 * float(np.median(deviations))
    if scale <= 0:
        return groups, 0
    kept: dict[str, list[float]] = {}
    dropped = 0
    for build, values in groups.items():
        centre = float(np.median(values))
        inside = [x for x in values if abs(x - centre) <= TRIM_SDS * scale]
        if len(values) < 3 or not inside:
            inside = values  # too few nights to call one an outlier
        kept[build] = inside
        dropped += len(values) - len(inside)
    return kept, dropped


def judge_runs(
    key: SeriesKey,
    candidate: Sequence[Sample],
    nights: Sequence[StoredNight],
    build: str,
    alpha: float = SEQUENTIAL_ALPHA,
) -> Verdict:
    """A sequential timing check with the night (one run) as the unit.

    Compared across nights, run-level effects (a fast or slow phase of the whole run,
    a slow stretch inside it, correlated trials) do not cancel and a rank test on the
    trials does not see them: it takes one run's shared offset for a change. Here each
    stored night gives one value (its trial median, times its :attr:`StoredNight.level`
    so the device's own level change is discounted), the baseline is the mean (log
    scale) of the nights that measured ``build`` (the baseline's software identity),
    and the night-to-night spread ``s`` is the pooled within-build standard deviation of
    all the series' stored nights (the spread belongs to the series and device, not to
    one build). ``candidate`` holds one or more runs of tonight's build; their mean is
    tested with a one-sided t prediction test, ``se = s * sqrt(1/m + 1/k)`` (m runs, k
    baseline nights). REGRESSION needs ``p < alpha`` *and* a change beyond the metric's
    minimum effect. INSUFFICIENT without a baseline night or with fewer than
    :data:`MIN_SPREAD_DF` degrees of freedom for the spread.
    """
    metric = METRICS[key.metric]
    cand = [c.value for c in candidate if c.value > 0]
    groups: dict[str, list[float]] = {}
    for n in nights:
        if n.sample.value > 0 and n.level > 0:
            groups.setdefault(n.build, []).append(math.log(n.sample.value * n.level))
    groups, outlying = _trim_nights(groups)
    base = groups.get(build, [])
    df = sum(len(g) - 1 for g in groups.values())
    mu = float(np.mean(base)) if base else math.nan
    y = float(np.mean(np.log(cand))) if cand else math.nan
    value = Sample(candidate[-1].run_id if candidate else "", 0.0, math.exp(y) if cand else 0.0)
    reference = Sample("", 0.0, math.exp(mu) if base else 0.0)
    if not cand or not base or df < MIN_SPREAD_DF:
        short = (
            "no candidate run"
            if not cand
            else "no stored night of the baseline build"
            if not base
            else f"{df} degree(s) of freedom for the night-to-night spread, need {MIN_SPREAD_DF}"
        )
        return Verdict(
            key, Status.INSUFFICIENT, reference.value, value.value, math.nan,
            message=f"{key.metric}: sequential run-level check: {short}",
        )  # fmt: skip
    ss = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups.values())
    spread = math.sqrt(ss / df)
    se = spread * math.sqrt(1.0 / len(cand) + 1.0 / len(base))
    sign = 1 if metric.direction.value == "lower" else -1
    shift = y - mu
    bad = sign * shift
    p = float(student.sf(abs(bad) / se, df)) if se > 0 else 0.0 if bad != 0 else 1.0
    half = float(student.ppf(0.975, df)) * se
    gate = math.log1p(metric.min_effect)
    status = Status.UNCHANGED
    if p < alpha and abs(bad) >= gate and bad != 0:
        status = Status.REGRESSION if bad > 0 else Status.IMPROVEMENT
    pct = f"{math.expm1(shift) * 100:+.1f}%"
    message = (
        f"{metric.name} {pct} (mean of {len(cand)} run(s) vs {len(base)} stored night(s) of"
        f" the baseline build; night-to-night sd {spread:.2%}, {df} df"
        + (f", {outlying} outlying night(s) left out" if outlying else "")
        + f"), p={p:.3g}"
        f" one-sided at alpha {alpha:g}, gate {metric.min_effect:.0%}"
    )
    return Verdict(
        key=key,
        status=status,
        baseline=reference.value,
        candidate=value.value,
        ratio=math.exp(shift),
        ci_low=math.exp(shift - half),
        ci_high=math.exp(shift + half),
        p_value=p,
        message=message,
    )


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
        min_magnitude = history_magnitude(key, np.array([s.value for s in ordered]))
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


class NightSamples(Sequence[Sample]):
    """A series' night values as Samples, made when read: ``run_id`` and ``at`` of each
    night, its value, and the full Sample (trials, outcomes) where one is given. Holds
    numbers, not objects, so tens of thousands of 60-night histories stay small."""

    def __init__(
        self,
        nights: Sequence[tuple[str, float]],
        values: np.ndarray,
        full: Mapping[int, Sample] | None = None,
    ) -> None:
        """``nights[i]`` is ``(run_id, at)`` of ``values[i]``; ``full[i]`` replaces it."""
        self._nights = nights
        self._values = values
        self._full = dict(full or {})

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]
        if i in self._full:
            return self._full[i]
        run_id, at = self._nights[i]
        return Sample(run_id=run_id, at=at, value=float(self._values[i]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def values(self) -> np.ndarray:
        """The night values (read-only view)."""
        view = self._values.view()
        view.setflags(write=False)
        return view

    def band(self, run_id: str | None) -> tuple[float, float] | None:
        """The range of night ``run_id``'s trial values (its value when only that is
        held; the last such night when it repeats); None when it is not in the series."""
        if run_id is None:
            return None
        for sample in self._full.values():
            if sample.run_id == run_id:
                trials = sample.trials or (sample.value,)
                return (min(trials), max(trials))
        at = [i for i, (night, _) in enumerate(self._nights) if night == run_id]
        if not at:
            return None
        value = float(self._values[at[-1]])
        return (value, value)


def history_magnitude(key: SeriesKey, values: np.ndarray) -> float:
    """The magnitude filter :func:`history` uses by default for ``key``'s metric."""
    metric = METRICS[key.metric]
    if metric.kind is MetricKind.TIMING:
        return MIN_MAGNITUDE
    if metric.kind is MetricKind.ACCURACY and len(values):
        level = abs(float(np.median(values)))
        return metric.min_effect / level if level else 0.0
    return 0.0


@gc_paused()
def many_histories(
    series: Sequence[tuple[SeriesKey, NightSamples]], baseline_run_id: str | None = None
) -> list[SeriesHistory]:
    """:func:`history` of many series at once (nights already in time order): the same
    change points and baseline bands, the change-point tests batched
    (:func:`results.regression.changepoint.detect_many`)."""
    values = [samples.values for _, samples in series]
    found = detect_many(
        values,
        [series_seed(key) for key, _ in series],
        [history_magnitude(key, v) for (key, _), v in zip(series, values, strict=True)],
    )
    out = []
    for (key, samples), points in zip(series, found, strict=True):
        metric = METRICS[key.metric]
        band = samples.band(baseline_run_id)
        out.append(
            SeriesHistory(
                key=key,
                unit=metric.unit,
                direction=metric.direction,
                samples=samples,
                change_points=[
                    ChangePoint(key, f.index, samples[f.index].run_id, f.before, f.after, f.p_value)
                    for f in points
                ],
                baseline_band=band,
            )
        )
    return out

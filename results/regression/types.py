"""The plain data the regression code passes around: metrics, series, verdicts.

Detection code takes these in and gives these out; the store and the nightly runner
build them from result rows. Nothing here imports scipy, the store or the coordinator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Direction(StrEnum):
    """Which way a metric gets better."""

    LOWER = "lower"  # latency, memory, load time, KLD, perplexity
    HIGHER = "higher"  # throughput, tok/s, accuracy, agreement


class MetricKind(StrEnum):
    """How a metric is compared night to night."""

    TIMING = "timing"  # noisy: rank test on trial medians + minimum effect size
    ACCURACY = "accuracy"  # paired exact test on the same eval examples + minimum drop
    EXACT = "exact"  # deterministic counters (model size): any change is reported


@dataclass(frozen=True)
class Metric:
    """One measured quantity with its unit and good direction."""

    name: str  # e.g. "latency_p50", "peak_rss", "gen_tok_per_s", "top1"
    unit: str  # e.g. "ms", "bytes", "tok/s", "fraction"
    direction: Direction
    kind: MetricKind
    min_effect: float = 0.0  # smallest relative change (timing) or absolute drop (accuracy)


@dataclass(frozen=True)
class SeriesKey:
    """model x backend x scheme x device x metric: one line of nightly history."""

    model: str
    backend: str
    scheme: str
    device_id: str
    metric: str

    def label(self) -> str:
        """A short human-readable name."""
        return f"{self.model} {self.backend}/{self.scheme} on {self.device_id}: {self.metric}"


@dataclass(frozen=True)
class Sample:
    """One night's measurement of one series.

    ``trials`` holds the per-trial values (for timing metrics the trial medians: the
    statistical unit is the trial, never the iteration); ``value`` is the night's
    summary (median of trials, or the exact figure). ``outcomes`` holds per-example
    correctness (1/0) for accuracy metrics, in eval-set order, so two nights can be
    compared pairwise. ``method`` names the estimator behind ``value`` where the figure
    depends on one (the KL divergence's method and parameters): values of different
    methods are not comparable.
    """

    run_id: str
    at: float  # unix time of the night's run
    value: float
    trials: tuple[float, ...] = ()
    outcomes: tuple[int, ...] = ()
    method: str = ""  # how the value was computed (e.g. the KLD estimator); "" not recorded


class Status(StrEnum):
    """A series' verdict for one night."""

    REGRESSION = "regression"  # worse, beyond the minimum effect, statistically significant
    IMPROVEMENT = "improvement"
    UNCHANGED = "unchanged"
    CHANGED = "changed"  # exact counters: any difference (direction in the ratio)
    INSUFFICIENT = "insufficient"  # not enough trials / data to decide


@dataclass(frozen=True)
class Verdict:
    """The comparison of a candidate night against its baseline for one series."""

    key: SeriesKey
    status: Status
    baseline: float
    candidate: float
    ratio: float  # candidate / baseline (Hodges-Lehmann for timing metrics)
    ci_low: float = float("nan")  # confidence interval of the ratio
    ci_high: float = float("nan")
    p_value: float = float("nan")
    message: str = ""
    confirmed: bool | None = None  # None: not re-measured; True/False after confirmation
    # The same finding seen through the mirror metric (throughput of a latency series,
    # from the same trial medians): its name and night figures, "" / NaN when none.
    mirror: str = ""
    mirror_baseline: float = float("nan")
    mirror_candidate: float = float("nan")

    @property
    def mirror_ratio(self) -> float:
        """The mirror metric's candidate / baseline (NaN without a mirror)."""
        if not self.mirror or not self.mirror_baseline:
            return float("nan")
        return self.mirror_candidate / self.mirror_baseline

    def metric_label(self) -> str:
        """The finding's metric name(s): ``latency_p50 + gen_tok_per_s`` with a mirror."""
        return f"{self.key.metric} + {self.mirror}" if self.mirror else self.key.metric

    def label(self) -> str:
        """The series label with the mirror metric when there is one."""
        k = self.key
        return f"{k.model} {k.backend}/{k.scheme} on {k.device_id}: {self.metric_label()}"


@dataclass(frozen=True)
class ChangePoint:
    """A shift in a series' nightly history found by change-point detection."""

    key: SeriesKey
    index: int  # first sample of the new segment
    run_id: str
    before: float  # mean of the segment before
    after: float  # mean of the segment after
    p_value: float = float("nan")

    @property
    def ratio(self) -> float:
        """after / before."""
        return self.after / self.before if self.before else float("nan")


@dataclass
class SeriesHistory:
    """A series' nights in time order, with what detection found in them."""

    key: SeriesKey
    unit: str
    direction: Direction
    samples: Sequence[Sample] = field(default_factory=list)
    change_points: list[ChangePoint] = field(default_factory=list)
    baseline_band: tuple[float, float] | None = None  # (low, high) of the baseline night

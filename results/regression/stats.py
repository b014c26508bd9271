"""Night-against-baseline statistics for one series: pure functions, samples in, verdicts out.

Timing metrics (:attr:`MetricKind.TIMING`)
    The statistical unit is the trial (a fresh process: load, warm up, measure), never
    the iteration: iterations of one process share its state (allocation, placement,
    clocks), so testing them as independent samples gives false alarms far above the
    nominal rate. Per series, :func:`compare_timing` runs a one-sided Mann-Whitney U
    test on the trial values in the metric's bad direction and estimates the change as
    a Hodges-Lehmann ratio (the median of all candidate/baseline pairwise ratios, i.e.
    the HL shift on the log scale) with the distribution-free confidence interval that
    inverts the same U test. A regression needs both ``p < alpha`` *and* an HL ratio
    beyond the metric's minimum effect (``metric.min_effect``, e.g. 2% for latency), so
    tiny but significant shifts are not reported and a large gate does not hide 3-5%
    changes.

    Defaults: ``alpha = 0.10`` per test, one-sided, with 25 trials per side. The
    nightly gate is a two-stage procedure: a series flagged on a night is re-measured in
    a fresh run and reported only when the re-measurement flags it again
    (``detect.confirm``). With baseline and candidate interleaved in each run the two
    stages are independent, so the reported false-alarm rate is the product of the
    per-stage rates. At 25 trials the 2% minimum effect, not alpha, does most of the
    work on normal nights (a stage flags about 1-2% of unchanged series), while the loose
    alpha keeps the power on noisy nights. Simulated at a 3% trial CV with bimodal and
    AR(1) trials, slow phases inside runs and whole-night offsets
    (``benchmarks/nightly_sim.py``, one run): 99.2% of +5% steps reported on their night
    and 0.021% false alarms per series-night, interleaved. 20 trials per side is the
    bare minimum (97.0% and 0.038%); with 5 about half of +5% steps are reported.
    Compared sequentially (against stored nights) run-level noise does not cancel and a
    rank test on trials does not see it, so the sequential mode takes the night as the
    unit (``detect.judge_runs``): 98.0% and 0.062% in the same run.

Accuracy metrics (:attr:`MetricKind.ACCURACY`)
    :func:`compare_accuracy`: with per-example outcomes (1 = correct) of the same eval
    set on both sides, an exact one-sided McNemar test (a binomial test on the
    discordant pairs) at ``alpha = 0.05`` plus a minimum absolute drop
    (``metric.min_effect``). Outcomes are deterministic for a given artifact, runtime
    and eval set: measuring the same build again gives the same outcomes, no discordant
    pair and no alarm, so the test does not guard against measurement noise (nothing
    to confirm by re-measuring) but against *churn*: a changed build that flips a few
    examples near the decision boundary both ways without being worse on examples in
    general. The net drop ``(lost - gained) / n`` is exact for the eval set; the test
    asks whether the flips lean the bad way more than a fair coin would. At 0.05 a
    1.5-point drop on 540 examples (8 net) is flagged with up to 5 opposite flips
    (9 lost / 1 gained: p = 0.011; 13 / 5: p = 0.048), where 0.01 missed it with a single
    opposite flip; a 1- or 2-example change never alarms (p >= 0.25 whatever ``n``), and
    a pure churn of the minimum size raises an alarm on at most 5% of *build changes*,
    not of nights. Without outcomes on both sides the change itself is compared with the
    minimum change. Outcomes of different lengths mean different eval sets, and values
    computed by different methods (:attr:`Sample.method`, e.g. another KL divergence
    estimator) are not comparable: :attr:`Status.INSUFFICIENT`.

Exact counters (:attr:`MetricKind.EXACT`)
    :func:`compare_exact`: any difference is :attr:`Status.CHANGED`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from scipy.stats import binomtest, mannwhitneyu, norm  # type: ignore[import-untyped]

from results.regression.types import (
    Direction,
    Metric,
    MetricKind,
    Sample,
    SeriesKey,
    Status,
    Verdict,
)

TIMING_ALPHA = 0.10  # per stage; the nightly gate confirms every flag with a fresh run
ACCURACY_ALPHA = 0.05  # outcomes are deterministic: the test guards against churn, not noise
CONFIDENCE = 0.95  # two-sided level of the reported Hodges-Lehmann interval
MIN_TRIALS = 3  # per side; below that the rank test cannot reach any useful p-value
_EXACT_COUNTS_LIMIT = 2**61  # largest C(m+n, m) the exact U distribution is built for

Values = Sequence[float] | np.ndarray  # trial values


# ------------------------------------------------------------------------------ helpers


def _bad_sign(direction: Direction) -> int:
    """+1 when an increase is bad (lower is better), -1 when a decrease is bad."""
    return 1 if direction is Direction.LOWER else -1


def _pct(ratio: float) -> str:
    return f"{(ratio - 1.0) * 100:+.1f}%" if math.isfinite(ratio) else "n/a"


def _verdict(
    key: SeriesKey,
    status: Status,
    baseline: Sample,
    candidate: Sample,
    ratio: float,
    message: str,
    ci: tuple[float, float] = (math.nan, math.nan),
    p_value: float = math.nan,
) -> Verdict:
    return Verdict(
        key=key,
        status=status,
        baseline=baseline.value,
        candidate=candidate.value,
        ratio=ratio,
        ci_low=ci[0],
        ci_high=ci[1],
        p_value=p_value,
        message=message,
    )


def _value_ratio(baseline: float, candidate: float) -> float:
    return candidate / baseline if baseline else math.nan


@lru_cache(maxsize=512)
def _u_null_cdf(m: int, n: int) -> tuple[float, ...] | None:
    """``P(U <= u)`` for ``u = 0..m*n`` under the null (no ties), or None when too large.

    The counts are the coefficients of the Gaussian binomial ``[m+n choose m]_q``, built
    as ``prod_i (1 - q^(n+i)) / (1 - q^i)`` in exact integer arithmetic.
    """
    total = math.comb(m + n, m)
    if total >= _EXACT_COUNTS_LIMIT:
        return None
    size = m * n + 1
    counts = np.zeros(size, dtype=np.int64)
    counts[0] = 1
    for i in range(1, m + 1):
        shift = n + i
        if shift < size:
            counts[shift:] = counts[shift:] - counts[:-shift].copy()
        for r in range(i):  # divide by (1 - q^i): a cumulative sum with stride i
            counts[r::i] = np.cumsum(counts[r::i])
    return tuple(float(c) for c in np.cumsum(counts) / total)


def _ci_rank(m: int, n: int, confidence: float) -> int:
    """1-based rank k of the pairwise-difference order statistics bounding the CI.

    The interval ``[D_(k), D_(mn+1-k)]`` covers the true shift with probability
    ``1 - 2 P(U <= k-1)``; k is the largest rank keeping that at least ``confidence``.
    Small samples that cannot reach it get k = 1 (the full range of differences).
    """
    tail = (1.0 - confidence) / 2.0
    cdf = _u_null_cdf(m, n)
    if cdf is not None:
        k = 0
        while k < len(cdf) and cdf[k] <= tail:
            k += 1
        # cdf[k-1] <= tail: ranks up to k are allowed (P(U <= k-1) <= tail).
        rank = k
    else:
        mn = m * n
        sd = math.sqrt(mn * (m + n + 1) / 12.0)
        rank = math.floor(mn / 2.0 - float(norm.ppf(1.0 - tail)) * sd)
    return max(1, min(rank, (m * n + 1) // 2))


def hodges_lehmann_ratio(
    baseline: Values, candidate: Values, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Hodges-Lehmann ratio candidate/baseline and its distribution-free CI.

    The estimate is ``exp(median(log c_i - log b_j))`` over all pairs; the interval is
    the Mann-Whitney order-statistic interval of those pairwise log differences. All
    values must be positive. Returns ``(ratio, ci_low, ci_high)``.
    """
    b = np.asarray(baseline, dtype=float)[None, :]
    c = np.asarray(candidate, dtype=float)[None, :]
    ratio, low, high = (float(np.exp(logs[0])) for logs in _hodges_lehmann_rows(b, c, confidence))
    return ratio, low, high


def rank_test(baseline: Values, candidate: Values, greater: bool) -> float:
    """One-sided Mann-Whitney U p-value: candidate stochastically greater (or less).

    Without ties the exact null distribution of U is used (what
    ``scipy.stats.mannwhitneyu(method="exact")`` computes, from a cached table, so the
    nightly gate stays cheap over thousands of series); with ties, or samples too large
    for the table, ``scipy.stats.mannwhitneyu`` with its tie-corrected normal
    approximation.
    """
    b = np.asarray(baseline, dtype=float)
    c = np.asarray(candidate, dtype=float)
    diffs = c[:, None] - b[None, :]
    ties = bool(np.any(diffs == 0)) or len(np.unique(b)) < len(b) or len(np.unique(c)) < len(c)
    cdf = None if ties else _u_null_cdf(len(c), len(b))
    if cdf is None:
        alternative = "greater" if greater else "less"
        return float(mannwhitneyu(c, b, alternative=alternative).pvalue)
    # U counts the pairs where the candidate is above; "less" uses the pairs below.
    return _exact_p(int(np.count_nonzero(diffs > 0 if greater else diffs < 0)), cdf)


def _exact_p(u: int, cdf: Sequence[float]) -> float:
    """``P(U >= u)`` under the null from the exact cdf of U (no ties)."""
    return 1.0 if u == 0 else 1.0 - cdf[u - 1]


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


# ------------------------------------------------------------------------------ timing


def compare_timing(
    key: SeriesKey,
    metric: Metric,
    baseline: Sample,
    candidate: Sample,
    alpha: float = TIMING_ALPHA,
    confidence: float = CONFIDENCE,
    min_trials: int = MIN_TRIALS,
) -> Verdict:
    """One-sided rank test on trial values plus a Hodges-Lehmann minimum-effect gate.

    REGRESSION when the Mann-Whitney p-value in the metric's bad direction is below
    ``alpha`` and the HL ratio is beyond ``1 + min_effect`` in that direction (on the log
    scale, so a 2% latency gate and a 2% throughput gate are the same change);
    IMPROVEMENT symmetrically; INSUFFICIENT with fewer than ``min_trials`` positive
    trial values on either side.
    """
    base, cand = _finite(baseline.trials), _finite(candidate.trials)
    short = _too_few(base, cand, min_trials)
    if short:
        value_ratio = _value_ratio(baseline.value, candidate.value)
        return _verdict(
            key, Status.INSUFFICIENT, baseline, candidate, value_ratio, f"{metric.name}: {short}"
        )
    hl = hodges_lehmann_ratio(base, cand, confidence)
    return _timing_verdict(
        key,
        metric,
        (baseline, candidate),
        (len(base), len(cand)),
        hl,
        lambda greater: rank_test(base, cand, greater),
        alpha,
        confidence,
    )


def compare_timing_many(
    items: Sequence[tuple[SeriesKey, Metric, Sample, Sample]],
    alpha: float = TIMING_ALPHA,
    confidence: float = CONFIDENCE,
    min_trials: int = MIN_TRIALS,
) -> list[Verdict]:
    """:func:`compare_timing` of many series: the same verdicts, with the Hodges-Lehmann
    intervals and exact rank tests of all series with the same trial counts computed
    together. A series with tied trial values (or too many trials for the exact table)
    is compared on its own."""
    out: list[Verdict | None] = [None] * len(items)
    groups: dict[tuple[int, int], list[tuple[int, list[float], list[float]]]] = {}
    for i, (key, metric, baseline, candidate) in enumerate(items):
        base, cand = _finite(baseline.trials), _finite(candidate.trials)
        if _too_few(base, cand, min_trials) or _u_null_cdf(len(cand), len(base)) is None:
            out[i] = compare_timing(key, metric, baseline, candidate, alpha, confidence, min_trials)
        else:
            groups.setdefault((len(base), len(cand)), []).append((i, base, cand))
    for (m, n), members in groups.items():
        b = np.array([base for _, base, _ in members], dtype=float)
        c = np.array([cand for _, _, cand in members], dtype=float)
        hl = _hodges_lehmann_rows(b, c, confidence)
        cdf = _u_null_cdf(n, m)
        assert cdf is not None
        above, below, tied = _pair_counts(b, c)
        for row, (i, _, _) in enumerate(members):
            key, metric, baseline, candidate = items[i]
            if tied[row]:
                out[i] = compare_timing(
                    key, metric, baseline, candidate, alpha, confidence, min_trials
                )
                continue
            p_above, p_below = (_exact_p(int(u[row]), cdf) for u in (above, below))
            p_values = {True: p_above, False: p_below}
            ratio, low, high = (float(np.exp(logs[row])) for logs in hl)
            out[i] = _timing_verdict(
                key, metric, (baseline, candidate), (m, n), (ratio, low, high),
                p_values.__getitem__,
                alpha, confidence,
            )  # fmt: skip
    return [v for v in out if v is not None]


def _too_few(base: Sequence[float], cand: Sequence[float], min_trials: int) -> str:
    """Why these trial values cannot be compared, or ''."""
    if len(base) < min_trials or len(cand) < min_trials:
        return f"{len(base)} vs {len(cand)} trials, need {min_trials} per side"
    if min(base) <= 0 or min(cand) <= 0:
        return "non-positive trial values, no ratio"
    return ""


def _hodges_lehmann_rows(
    b: np.ndarray, c: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of baseline ``b`` and candidate ``c`` trial values: the log of the
    Hodges-Lehmann ratio and of its interval's ends (as :func:`hodges_lehmann_ratio`)."""
    logs_b, logs_c = np.log(b), np.log(c)
    diffs = np.sort((logs_c[:, :, None] - logs_b[:, None, :]).reshape(len(b), -1), axis=1)
    rank = _ci_rank(b.shape[1], c.shape[1], confidence)
    return np.median(diffs, axis=1), diffs[:, rank - 1], diffs[:, diffs.shape[1] - rank]


def _pair_counts(b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: pairs with the candidate above, pairs below, and whether any values tie
    (across the sides or within one)."""
    diffs = c[:, :, None] - b[:, None, :]
    tied = np.any(diffs == 0, axis=(1, 2))
    for side in (b, c):
        tied |= np.any(np.diff(np.sort(side, axis=1), axis=1) == 0, axis=1)
    return np.count_nonzero(diffs > 0, axis=(1, 2)), np.count_nonzero(diffs < 0, axis=(1, 2)), tied


def _timing_verdict(
    key: SeriesKey,
    metric: Metric,
    samples: tuple[Sample, Sample],
    trials: tuple[int, int],
    hl: tuple[float, float, float],
    p_of: Callable[[bool], float],
    alpha: float,
    confidence: float,
) -> Verdict:
    """A timing verdict from the HL ratio and interval and the one-sided rank test's
    p-value (``p_of(greater)``: candidate above the baseline, or below)."""
    ratio, ci_low, ci_high = hl
    sign = _bad_sign(metric.direction)
    bad_shift = sign * math.log(ratio)
    worse = bad_shift >= 0
    # Test the direction the estimate points to: "greater" = candidate above baseline.
    p = p_of((sign > 0) == worse)
    gate = math.log1p(metric.min_effect)
    status = Status.UNCHANGED
    if p < alpha and abs(bad_shift) >= gate and bad_shift != 0:
        status = Status.REGRESSION if worse else Status.IMPROVEMENT
    message = (
        f"{metric.name} {_pct(ratio)} (HL, {confidence:.0%} CI {_pct(ci_low)}..{_pct(ci_high)}),"
        f" p={p:.3g} one-sided, {trials[0]} vs {trials[1]} trials,"
        f" gate {metric.min_effect:.0%}"
    )
    baseline, candidate = samples
    return _verdict(key, status, baseline, candidate, ratio, message, (ci_low, ci_high), p)


# ------------------------------------------------------------------------------ accuracy


def mcnemar_exact(baseline: Sequence[int], candidate: Sequence[int]) -> tuple[int, int, float]:
    """Discordant pairs and the one-sided exact McNemar p-value for a drop.

    Returns ``(lost, gained, p)``: examples correct in the baseline only, correct in the
    candidate only, and ``P(X >= lost)`` for ``X ~ Binomial(lost + gained, 1/2)``.
    """
    if len(baseline) != len(candidate):
        raise ValueError(f"outcomes differ in length: {len(baseline)} vs {len(candidate)}")
    b = np.asarray(baseline, dtype=bool)
    c = np.asarray(candidate, dtype=bool)
    lost = int(np.count_nonzero(b & ~c))
    gained = int(np.count_nonzero(~b & c))
    if lost + gained == 0:
        return 0, 0, 1.0
    p = float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue)
    return lost, gained, p


def compare_accuracy(
    key: SeriesKey,
    metric: Metric,
    baseline: Sample,
    candidate: Sample,
    alpha: float = ACCURACY_ALPHA,
) -> Verdict:
    """Paired exact test on per-example outcomes plus a minimum absolute drop.

    With outcomes (1 = correct) of equal length on both sides and a higher-is-better
    metric: REGRESSION when the exact one-sided McNemar p < ``alpha`` and the accuracy
    drop ``(lost - gained) / n`` is at least ``metric.min_effect``; IMPROVEMENT
    symmetrically. Outcomes of different lengths (different eval sets): INSUFFICIENT.
    Otherwise the values are deterministic figures and the change in the bad direction
    is compared with ``metric.min_effect`` (absolute) alone.
    """
    ratio = _value_ratio(baseline.value, candidate.value)
    eps = 1e-12
    if baseline.outcomes and candidate.outcomes and metric.direction is Direction.HIGHER:
        if len(baseline.outcomes) != len(candidate.outcomes):
            return _verdict(
                key,
                Status.INSUFFICIENT,
                baseline,
                candidate,
                ratio,
                f"{metric.name}: outcomes of {len(baseline.outcomes)} vs"
                f" {len(candidate.outcomes)} examples (different eval sets)",
            )
        n = len(baseline.outcomes)
        lost, gained, p_drop = mcnemar_exact(baseline.outcomes, candidate.outcomes)
        drop = (lost - gained) / n
        status, p = Status.UNCHANGED, p_drop
        if drop > 0 and drop >= metric.min_effect - eps and p_drop < alpha:
            status = Status.REGRESSION
        elif drop < 0:
            _, _, p = mcnemar_exact(candidate.outcomes, baseline.outcomes)
            if -drop >= metric.min_effect - eps and p < alpha:
                status = Status.IMPROVEMENT
        message = (
            f"{metric.name} {-drop * 100:+.2f} pts on {n} paired examples"
            f" ({lost} lost, {gained} gained), exact McNemar p={p:.3g} one-sided,"
            f" min drop {metric.min_effect * 100:.2f} pts"
        )
        return _verdict(key, status, baseline, candidate, ratio, message, p_value=p)
    change = candidate.value - baseline.value
    bad = _bad_sign(metric.direction) * change
    status = Status.UNCHANGED
    if bad != 0 and abs(bad) >= metric.min_effect - eps:
        status = Status.REGRESSION if bad > 0 else Status.IMPROVEMENT
    message = (
        f"{metric.name} {baseline.value:.6g} -> {candidate.value:.6g} {metric.unit}"
        f" ({change:+.4g}, deterministic, min change {metric.min_effect:g})"
    )
    return _verdict(key, status, baseline, candidate, ratio, message)


# ------------------------------------------------------------------------------ exact


def compare_exact(key: SeriesKey, metric: Metric, baseline: Sample, candidate: Sample) -> Verdict:
    """CHANGED on any difference of an exact counter (the ratio says which way)."""
    ratio = _value_ratio(baseline.value, candidate.value)
    if candidate.value == baseline.value:
        return _verdict(key, Status.UNCHANGED, baseline, candidate, 1.0, f"{metric.name} unchanged")
    message = (
        f"{metric.name} {baseline.value:.12g} -> {candidate.value:.12g} {metric.unit}"
        f" ({_pct(ratio)})"
    )
    return _verdict(key, Status.CHANGED, baseline, candidate, ratio, message)


def compare(key: SeriesKey, metric: Metric, baseline: Sample, candidate: Sample) -> Verdict:
    """The verdict for one series with the default settings of ``metric.kind``."""
    if baseline.method != candidate.method:
        methods = " -> ".join(m or "not recorded" for m in (baseline.method, candidate.method))
        return _verdict(
            key,
            Status.INSUFFICIENT,
            baseline,
            candidate,
            _value_ratio(baseline.value, candidate.value),
            f"{metric.name}: not comparable, computed by another method ({methods})",
        )
    if metric.kind is MetricKind.TIMING:
        return compare_timing(key, metric, baseline, candidate)
    if metric.kind is MetricKind.ACCURACY:
        return compare_accuracy(key, metric, baseline, candidate)
    return compare_exact(key, metric, baseline, candidate)

"""Night-against-baseline statistics: rank test + HL gate, paired exact test, exact counters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, mannwhitneyu  # type: ignore[import-untyped]

from results.regression.metrics import METRICS
from results.regression.stats import (
    compare,
    compare_accuracy,
    compare_exact,
    compare_timing,
    compare_timing_many,
    hodges_lehmann_ratio,
    mcnemar_exact,
    rank_test,
)
from results.regression.types import Sample, SeriesKey, Status

LATENCY = METRICS["latency_p50"]
THROUGHPUT = METRICS["throughput"]


def key(metric: str) -> SeriesKey:
    return SeriesKey("resnet", "onnxruntime", "int8", "pi5", metric)


def sample(trials: list[float] | np.ndarray, run: str = "r") -> Sample:
    values = tuple(float(t) for t in trials)
    return Sample(run_id=run, at=0.0, value=float(np.median(values)), trials=values)


def lognormal(rng: np.random.Generator, n: int, center: float, cv: float) -> np.ndarray:
    return center * np.exp(rng.normal(0.0, cv, n))


BASE5 = [10.0, 10.1, 9.9, 10.05, 9.95]


# ------------------------------------------------------------------------------ timing


def _random_timing_pairs(rng: np.random.Generator, count: int) -> list[tuple[Sample, Sample]]:
    """Trial values as nights give them: 3-25 per side (sometimes unequal, sometimes
    more than the exact table holds), shifts of 0-15% either way, and now and then
    ties, too few trials, a non-positive or a non-finite value."""
    pairs = []
    for _ in range(count):
        m = int(rng.choice([2, 3, 5, 5, 5, 7, 25, 40]))
        n = m if rng.random() < 0.8 else int(rng.choice([3, 5, 9, 40]))
        base = lognormal(rng, m, 10.0, 0.02)
        cand = lognormal(rng, n, 10.0 * float(rng.uniform(0.85, 1.15)), 0.02)
        odd = rng.random()
        if odd < 0.05:
            base, cand = np.round(base, 1), np.round(cand, 1)  # ties
        elif odd < 0.07:
            cand[0] = 0.0
        elif odd < 0.09:
            base[-1] = math.nan
        pairs.append((sample(base, "b"), sample(cand, "c")))
    return pairs


def test_timing_verdicts_of_many_series_at_once_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(11)
    metrics = [LATENCY, THROUGHPUT]
    items = [
        (key(f"{metrics[i % 2].name}-{i}"), metrics[i % 2], base, cand)
        for i, (base, cand) in enumerate(_random_timing_pairs(rng, 1500))
    ]
    one_by_one = [compare_timing(k, metric, b, c) for k, metric, b, c in items]
    at_once = compare_timing_many(items)
    assert [repr(v) for v in at_once] == [repr(v) for v in one_by_one]  # NaN-safe, exact
    assert {v.status for v in at_once} == set(Status) - {Status.CHANGED}


def test_clear_ten_percent_shift_with_five_trials_is_a_regression() -> None:
    cand = [v * 1.10 for v in (10.02, 9.97, 10.08, 9.93, 10.0)]
    v = compare_timing(key("latency_p50"), LATENCY, sample(BASE5), sample(cand))
    assert v.status is Status.REGRESSION
    assert v.p_value == pytest.approx(1 / 252)  # complete separation, exact U test
    assert v.ratio == pytest.approx(1.10, abs=0.01)
    assert v.ci_low > 1.02 and v.ci_high < 1.2


def test_identical_distributions_are_not_flagged() -> None:
    same = compare_timing(key("latency_p50"), LATENCY, sample(BASE5), sample(BASE5))
    assert same.status is Status.UNCHANGED and same.ratio == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    flagged = 0
    for _ in range(300):
        base, cand = lognormal(rng, 20, 10.0, 0.03), lognormal(rng, 20, 10.0, 0.03)
        flagged += compare(key("latency_p50"), LATENCY, sample(base), sample(cand)).status in (
            Status.REGRESSION,
            Status.IMPROVEMENT,
        )
    # One stage flags ~3% each way at most at this CV (the 2% gate does most of the work).
    assert flagged / 300 < 0.06


def test_throughput_drop_is_a_regression_and_rise_an_improvement() -> None:
    base = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2]
    drop = [v * 0.9 for v in base]
    rise = [v * 1.1 for v in base]
    k = key("throughput")
    assert compare_timing(k, THROUGHPUT, sample(base), sample(drop)).status is Status.REGRESSION
    assert compare_timing(k, THROUGHPUT, sample(base), sample(rise)).status is Status.IMPROVEMENT
    # Latency going down is an improvement too.
    faster = [v * 0.9 for v in BASE5]
    v = compare_timing(key("latency_p50"), LATENCY, sample(BASE5), sample(faster))
    assert v.status is Status.IMPROVEMENT and v.ratio == pytest.approx(0.9, abs=0.01)


def test_significant_one_percent_is_not_a_regression_at_the_two_percent_gate() -> None:
    rng = np.random.default_rng(2)
    base = lognormal(rng, 20, 10.0, 0.001)
    one = compare_timing(key("latency_p50"), LATENCY, sample(base), sample(base * 1.01))
    assert one.p_value < 1e-6  # clearly significant ...
    assert one.status is Status.UNCHANGED  # ... but below the minimum effect
    three = compare_timing(key("latency_p50"), LATENCY, sample(base), sample(base * 1.03))
    assert three.status is Status.REGRESSION


def test_hodges_lehmann_ratio_and_interval_contain_the_true_ratio() -> None:
    rng = np.random.default_rng(3)
    base, cand = lognormal(rng, 20, 10.0, 0.03), lognormal(rng, 20, 10.5, 0.03)
    ratio, low, high = hodges_lehmann_ratio(base, cand)
    assert low <= 1.05 <= high
    assert ratio == pytest.approx(1.05, abs=0.015)
    # The 95% interval covers the true ratio about 95% of the time.
    covered = 0
    for _ in range(400):
        b, c = lognormal(rng, 8, 10.0, 0.03), lognormal(rng, 8, 10.3, 0.03)
        _, lo, hi = hodges_lehmann_ratio(b, c)
        covered += lo <= 1.03 <= hi
    assert 0.92 <= covered / 400 <= 0.99


def test_hodges_lehmann_is_the_median_pairwise_ratio() -> None:
    base, cand = [1.0, 2.0, 4.0], [2.0, 4.0, 8.0]
    ratio, low, high = hodges_lehmann_ratio(base, cand)
    ratios = sorted(c / b for c in cand for b in base)
    assert ratio == pytest.approx(ratios[len(ratios) // 2])
    assert (low, high) == pytest.approx((ratios[0], ratios[-1]))  # 3 vs 3: the full range


def test_rank_test_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    for m, n in ((3, 4), (5, 5), (12, 20)):
        b, c = rng.normal(0, 1, m), rng.normal(0.7, 1, n)
        for greater, alternative in ((True, "greater"), (False, "less")):
            expected = mannwhitneyu(c, b, alternative=alternative, method="exact").pvalue
            assert rank_test(b, c, greater) == pytest.approx(expected, abs=1e-12)
    # Ties: scipy's tie-corrected normal approximation.
    tb, tc = [1.0, 1.0, 2.0, 3.0], [2.0, 3.0, 3.0, 4.0]
    expected = mannwhitneyu(tc, tb, alternative="greater").pvalue
    assert rank_test(tb, tc, True) == pytest.approx(expected)


def test_too_few_trials_are_insufficient() -> None:
    v = compare_timing(key("latency_p50"), LATENCY, sample([10.0, 10.1]), sample(BASE5))
    assert v.status is Status.INSUFFICIENT
    assert "need 3" in v.message


# ------------------------------------------------------------------------------ accuracy


def outcomes(n: int, lost: int, gained: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Baseline and candidate outcomes: ``lost`` examples only the baseline gets right,
    ``gained`` only the candidate, the rest split between both right and both wrong."""
    base = [1] * lost + [0] * gained
    cand = [0] * lost + [1] * gained
    rest = n - lost - gained
    base += [1] * (rest * 4 // 5) + [0] * (rest - rest * 4 // 5)
    cand += [1] * (rest * 4 // 5) + [0] * (rest - rest * 4 // 5)
    return tuple(base), tuple(cand)


def accuracy_sample(o: tuple[int, ...]) -> Sample:
    return Sample(run_id="r", at=0.0, value=sum(o) / len(o), outcomes=o)


def test_mcnemar_exact_on_constructed_outcomes() -> None:
    base, cand = outcomes(1000, lost=30, gained=5)
    lost, gained, p = mcnemar_exact(base, cand)
    assert (lost, gained) == (30, 5)
    assert p == pytest.approx(binomtest(30, 35, 0.5, alternative="greater").pvalue)
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.REGRESSION and v.p_value < 0.001
    assert "30 lost" in v.message


def test_mcnemar_small_drop_or_not_significant_is_unchanged() -> None:
    top1 = METRICS["top1"]
    # 6 lost, 1 gained of 1000: drop 0.5 points but p = 8/128 = 0.0625.
    base, cand = outcomes(1000, lost=6, gained=1)
    v = compare_accuracy(key("top1"), top1, accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.UNCHANGED and v.p_value == pytest.approx(8 / 128)
    # 12 lost, 0 gained of 10000: significant but only 0.12 points.
    base, cand = outcomes(10000, lost=12, gained=0)
    v = compare_accuracy(key("top1"), top1, accuracy_sample(base), accuracy_sample(cand))
    assert v.p_value < 0.001 and v.status is Status.UNCHANGED
    # Gains are improvements.
    base, cand = outcomes(1000, lost=2, gained=30)
    v = compare_accuracy(key("top1"), top1, accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.IMPROVEMENT


@pytest.mark.parametrize(("lost", "gained"), [(8, 0), (9, 1), (10, 2), (13, 5)])
def test_a_one_and_a_half_point_drop_on_540_examples_is_flagged_despite_opposite_flips(
    lost: int, gained: int
) -> None:
    # 8 examples net of 540 = 1.48 points, whichever few examples flipped the other way.
    base, cand = outcomes(540, lost=lost, gained=gained)
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.REGRESSION, v.message
    assert f"{lost} lost, {gained} gained" in v.message
    # The same change the other way is an improvement.
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(cand), accuracy_sample(base))
    assert v.status is Status.IMPROVEMENT


@pytest.mark.parametrize("n", [20, 100, 540, 10_000])
@pytest.mark.parametrize(("lost", "gained"), [(1, 0), (0, 1), (2, 1), (1, 2)])
def test_a_one_example_change_never_alarms(n: int, lost: int, gained: int) -> None:
    # On 20 examples one example is 5 points, far beyond the minimum drop: still no alarm.
    base, cand = outcomes(n, lost=lost, gained=gained)
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.UNCHANGED, v.message


def test_identical_outcomes_never_alarm() -> None:
    base, _ = outcomes(540, lost=0, gained=0)
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(base), accuracy_sample(base))
    assert v.status is Status.UNCHANGED and v.p_value == 1.0


def test_kld_of_another_method_is_not_comparable() -> None:
    kld = METRICS["kld_mean"]

    def s(value: float, method: str) -> Sample:
        return Sample(run_id="r", at=0.0, value=value, method=method)

    # A better estimator reads higher: not a regression, not comparable.
    v = compare(key("kld_mean"), kld, s(0.020, ""), s(0.027, "topk-tail k=32 m=16"))
    assert v.status is Status.INSUFFICIENT
    assert "not comparable" in v.message and "not recorded -> topk-tail k=32 m=16" in v.message
    v = compare(key("kld_mean"), kld, s(0.020, "a k=32"), s(0.010, "a k=64"))
    assert v.status is Status.INSUFFICIENT
    # The same method is judged as before.
    same = compare(key("kld_mean"), kld, s(0.020, "a k=32"), s(0.027, "a k=32"))
    assert same.status is Status.REGRESSION


def test_accuracy_outcomes_of_different_eval_sets_are_insufficient() -> None:
    base, _ = outcomes(100, 0, 0)
    _, cand = outcomes(120, 0, 0)
    v = compare_accuracy(key("top1"), METRICS["top1"], accuracy_sample(base), accuracy_sample(cand))
    assert v.status is Status.INSUFFICIENT


def test_deterministic_accuracy_figures_use_the_minimum_change() -> None:
    def s(value: float) -> Sample:
        return Sample(run_id="r", at=0.0, value=value)

    agreement = METRICS["agreement"]
    assert compare(key("agreement"), agreement, s(0.99), s(0.98)).status is Status.REGRESSION
    assert compare(key("agreement"), agreement, s(0.99), s(0.989)).status is Status.UNCHANGED
    kld = METRICS["kld_mean"]  # lower is better
    assert compare(key("kld_mean"), kld, s(0.020), s(0.025)).status is Status.REGRESSION
    assert compare(key("kld_mean"), kld, s(0.025), s(0.020)).status is Status.IMPROVEMENT
    assert compare(key("kld_mean"), kld, s(0.020), s(0.021)).status is Status.UNCHANGED


# ------------------------------------------------------------------------------ exact


def test_exact_counters_report_any_change() -> None:
    size = METRICS["model_size"]
    same = compare_exact(key("model_size"), size, Sample("a", 0, 1000.0), Sample("b", 1, 1000.0))
    assert same.status is Status.UNCHANGED and same.ratio == 1.0
    grew = compare(key("model_size"), size, Sample("a", 0, 1000.0), Sample("b", 1, 1001.0))
    assert grew.status is Status.CHANGED and grew.ratio == pytest.approx(1.001)
    assert math.isnan(grew.p_value)

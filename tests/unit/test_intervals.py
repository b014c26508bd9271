"""Timing intervals across trials: t quantiles, the two intervals, Welch's ratio, rows."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy.stats import t as student_t  # type: ignore[import-untyped]

from edgefarm.domain import RUN_NOISE_SD, ratio_interval, t_quantile_975, trial_interval
from results.rows import INTERVAL_KEYS, interval_columns


@pytest.mark.parametrize(
    ("df", "rel"), [(1.5, 0.19), (2, 1e-4), (2.5, 0.017), (3.7, 4e-3), (7.2, 1e-3), (45, 1e-3)]
)
def test_t_quantile_is_close_to_scipy_and_never_below(df: float, rel: float) -> None:
    exact = student_t.ppf(0.975, df)
    assert exact - 1e-4 <= t_quantile_975(df) <= exact * (1 + rel)


def test_trial_interval_on_the_log_scale() -> None:
    values = [10.0, 10.4, 9.7, 10.1, 9.9]
    interval = trial_interval(values)
    assert interval is not None and interval.trials == 5
    sd = statistics.stdev(math.log(v) for v in values)
    q = student_t.ppf(0.975, 4)
    assert interval.mean_half == pytest.approx(q * sd / math.sqrt(5), rel=1e-4)  # 4-digit t
    # the repeat-run interval: both runs' trial noise and the run-level noise
    within = interval.mean_half * math.sqrt(2)
    between = 1.959964 * math.sqrt(2) * RUN_NOISE_SD
    assert interval.repeat_half == pytest.approx(math.hypot(within, between))
    quiet = trial_interval(values, run_noise=0.0)
    assert quiet is not None and quiet.repeat_half == pytest.approx(within)
    # identical trials still leave the run-level noise: a repeat run is not identical
    flat = trial_interval([10.0] * 5)
    assert flat is not None and flat.repeat_half == pytest.approx(between)
    assert 5.5 < flat.repeat_percent < 6.0
    low, high = interval.bounds(10.0)
    assert low == pytest.approx(10 * math.exp(-interval.repeat_half)) and high > 10.0
    assert trial_interval([10.0]) is None and trial_interval([10.0, float("nan")]) is None


def test_ratio_interval_contains_one_only_for_noise() -> None:
    same = ratio_interval([10.0, 10.3, 9.8], [10.1, 9.9, 10.2])
    assert same is not None and not same.distinguishable
    slower = ratio_interval([10.0, 10.1, 9.9], [11.0, 11.1, 10.9])
    assert slower is not None and slower.distinguishable and slower.low > 1.05
    assert ratio_interval([10.0], [11.0, 11.1]) is None


def test_rows_carry_both_intervals_derived_from_trial_medians() -> None:
    row = {"lat_p50_ms": 10.0, "trial_medians_ms": [10.0, 10.4, 9.7, 10.1, 9.9]}
    cols = interval_columns(row)
    assert set(cols) == set(INTERVAL_KEYS)
    assert cols["lat_p50_ci95_low_ms"] > cols["lat_p50_repeat95_low_ms"]  # type: ignore[operator]
    assert cols["lat_p50_ci95_high_ms"] < cols["lat_p50_repeat95_high_ms"]  # type: ignore[operator]
    assert all(v is None for v in interval_columns({"lat_p50_ms": 10.0}).values())

"""E-divisive means change points over nightly series: location, significance, filters."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from results.regression import changepoint
from results.regression.changepoint import detect_change_points, split_statistics
from results.regression.types import Sample, SeriesKey

KEY = SeriesKey("resnet", "onnxruntime", "int8", "pi5", "latency_p50")


def nights(values: np.ndarray) -> list[Sample]:
    return [Sample(run_id=f"n{i}", at=float(i), value=float(v)) for i, v in enumerate(values)]


def noisy(seed: int, n: int = 30, sd: float = 0.01) -> np.ndarray:
    return 10.0 * np.exp(np.random.default_rng(seed).normal(0.0, sd, n))


def test_five_percent_step_found_at_the_right_night() -> None:
    values = noisy(0)
    values[15:] *= 1.05
    points = detect_change_points(KEY, nights(values))
    assert [p.index for p in points] == [15]
    point = points[0]
    assert point.run_id == "n15" and point.key == KEY
    assert point.ratio == pytest.approx(values[15:].mean() / values[:15].mean())
    assert 1.04 < point.ratio < 1.06
    assert point.p_value < 0.01


def test_no_change_points_in_pure_noise() -> None:
    for seed in range(10):
        assert detect_change_points(KEY, nights(noisy(seed)), seed=seed) == []


def test_results_repeat_with_the_same_seed() -> None:
    values = noisy(1)
    values[12:] *= 1.02
    first = detect_change_points(KEY, nights(values), seed=7)
    assert detect_change_points(KEY, nights(values), seed=7) == first


def test_minimum_magnitude_filters_small_significant_shifts() -> None:
    values = noisy(2, sd=0.0005)
    values[15:] *= 1.005  # highly significant, but only 0.5%
    assert detect_change_points(KEY, nights(values)) == []
    found = detect_change_points(KEY, nights(values), min_magnitude=0.0)
    assert [p.index for p in found] == [15]


def test_minimum_segment_and_two_steps() -> None:
    values = noisy(3, n=40)
    values[2:] *= 1.05  # only 2 nights before: no segment of 3
    values[20:] *= 1.05
    points = detect_change_points(KEY, nights(values), min_segment=3)
    assert 2 not in [p.index for p in points]
    assert 20 in [p.index for p in points]
    both = noisy(4, n=40)
    both[12:] *= 1.04
    both[28:] *= 0.95
    assert [p.index for p in detect_change_points(KEY, nights(both))] == [12, 28]


def test_short_or_constant_series_have_none() -> None:
    assert detect_change_points(KEY, nights(np.array([1.0, 2.0, 3.0]))) == []
    assert detect_change_points(KEY, nights(np.full(20, 5.0))) == []


def test_split_statistics_peak_at_the_split() -> None:
    values = np.array([[1.0] * 6 + [2.0] * 6])
    q = split_statistics(values, min_segment=3)
    assert q.shape == (1, 13)
    assert np.isneginf(q[0, :3]).all() and np.isneginf(q[0, 10:]).all()
    assert int(np.argmax(q[0])) == 6


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_chunked_statistics_equal_one_call_whatever_the_threads(workers: int) -> None:
    values = np.random.default_rng(5).normal(100.0, 3.0, size=(1_000, 61))
    with ThreadPoolExecutor(workers) as pool:
        got = changepoint._statistics(values, 3, pool)
    assert np.array_equal(got, split_statistics(values, 3))

"""Metric catalog, result rows to samples, and the pure nightly detection glue."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from results.regression import detect, stats
from results.regression.metrics import METRICS, samples_from_row
from results.regression.types import Direction, MetricKind, Sample, SeriesKey, Status

# ------------------------------------------------------------------------------ metrics


def test_every_metric_has_a_unit_and_the_right_direction() -> None:
    for name, metric in METRICS.items():
        assert metric.name == name and metric.unit
    lower = ("latency_p50", "peak_rss", "load_time", "ttft_ms", "kld_mean", "ppl_ratio")
    higher = ("throughput", "gen_tok_per_s", "prompt_tok_per_s", "top1", "agreement")
    assert all(METRICS[m].direction is Direction.LOWER for m in lower)
    assert all(METRICS[m].direction is Direction.HIGHER for m in higher)
    assert METRICS["model_size"].kind is MetricKind.EXACT
    assert METRICS["latency_p50"].min_effect == pytest.approx(0.02)


def trial(median: float, rss: int, load: float, **metrics: float) -> dict[str, Any]:
    return {
        "iterations": 50,
        "median_ms": median,
        "peak_rss_bytes": rss,
        "load_time_s": load,
        "valid": True,
        "metrics": metrics,
    }


def classifier_row() -> dict[str, Any]:
    medians = [4.0, 4.2, 3.9, 4.1, 4.0]
    return {
        "ok": True,
        "valid": True,
        "trial_medians_ms": medians,
        "lat_p50_ms": 4.0,
        "throughput_per_s": 500.0,
        "batch_size": 2,
        "peak_rss_bytes": 130_000_000,
        "load_time_s": 0.25,
        "model_size_bytes": 1_234_567,
        "accuracy": {"top1": 0.75, "agreement": 0.99},
        "metrics": {},
        "trials_detail": [trial(m, 120_000_000 + i, 0.2 + i / 100) for i, m in enumerate(medians)],
        "example_outcomes": [1, 1, 0, 1],
    }


def llm_row() -> dict[str, Any]:
    medians = [20.0, 21.0, 19.5]
    return {
        "ok": True,
        "valid": True,
        "trial_medians_ms": medians,
        "batch_size": 1,
        "model_size_bytes": 100_000_000,
        "accuracy": {
            "perplexity": 12.0,
            "ppl_ratio": 1.01,
            "kld_mean": 0.02,
            "kld_p99": 0.3,
            "kld_max": 1.1,
            "top1_agreement": 0.95,
        },
        "metrics": {"prompt_tok_per_s": 400.0, "ttft_ms": 60.0},
        "trials_detail": [
            trial(m, 500_000_000, 1.0, prompt_tok_per_s=400.0 + i, ttft_ms=60.0 - i)
            for i, m in enumerate(medians)
        ],
        "example_outcomes": None,
    }


def test_samples_from_a_classifier_row() -> None:
    out = samples_from_row(classifier_row(), "run-1", 100.0)
    assert set(out) == {
        "latency_p50",
        "throughput",
        "peak_rss",
        "load_time",
        "model_size",
        "top1",
        "agreement",
    }
    lat = out["latency_p50"]
    assert lat.trials == (4.0, 4.2, 3.9, 4.1, 4.0) and lat.value == 4.0
    assert (lat.run_id, lat.at) == ("run-1", 100.0)
    assert out["throughput"].trials[0] == pytest.approx(2 * 1000 / 4.0)
    assert out["throughput"].value == pytest.approx(500.0)
    assert out["peak_rss"].trials == tuple(float(120_000_000 + i) for i in range(5))
    assert out["load_time"].value == pytest.approx(0.22)
    assert out["model_size"].value == 1_234_567 and out["model_size"].trials == ()
    assert out["top1"].outcomes == (1, 1, 0, 1) and out["top1"].value == 0.75
    assert out["agreement"].outcomes == ()


def test_samples_from_an_llm_row() -> None:
    out = samples_from_row(llm_row(), "run-2", 5.0)
    assert "throughput" not in out and "perplexity" not in out
    assert out["gen_tok_per_s"].trials == pytest.approx((50.0, 1000 / 21.0, 1000 / 19.5))
    assert out["prompt_tok_per_s"].trials == (400.0, 401.0, 402.0)
    assert out["ttft_ms"].trials == (60.0, 59.0, 58.0)
    assert out["kld_mean"].value == 0.02 and out["ppl_ratio"].value == 1.01
    assert out["top1_agreement"].value == 0.95
    assert set(out) <= set(METRICS)


def test_kld_samples_carry_their_method() -> None:
    assert samples_from_row(llm_row(), "r", 0.0)["kld_mean"].method == ""
    environment = {"fidelity.kld_method": "topk-tail", "fidelity.kld_params": "k=32 m=16"}
    out = samples_from_row({**llm_row(), "environment": environment}, "r", 0.0)
    assert out["kld_mean"].method == "topk-tail k=32 m=16"
    assert out["ppl_ratio"].method == ""
    old = detect.judge_night(
        {key("kld_mean"): samples_from_row(llm_row(), "b", 0.0)["kld_mean"]},
        {key("kld_mean"): out["kld_mean"]},
    )
    assert [v.status for v in old] == [Status.INSUFFICIENT]


def test_energy_per_token_is_a_metric_of_its_own_meter() -> None:
    energy = METRICS["energy_per_inference_j"]
    assert (energy.unit, energy.direction) == ("J", Direction.LOWER)
    assert "energy_per_inference_j" not in samples_from_row(llm_row(), "r", 0.0)
    medians = [20.0, 21.0, 19.5]
    measured = {
        **llm_row(),
        "environment": {"energy.source": "rapl: package-0, dram"},
        "trials_detail": [
            trial(m, 500_000_000, 1.0, energy_per_inference_j=0.5 + i / 100)
            for i, m in enumerate(medians)
        ],
    }
    out = samples_from_row(measured, "r", 0.0)["energy_per_inference_j"]
    assert out.trials == (0.5, 0.51, 0.52) and out.value == 0.51
    assert out.method == "rapl: package-0, dram"
    # a night that draws 20% more per token, same meter: a regression in joules
    hotter = dataclasses.replace(out, value=0.612, trials=(0.6, 0.612, 0.624), run_id="c")
    (verdict,) = detect.judge_night(
        {key("energy_per_inference_j"): out}, {key("energy_per_inference_j"): hotter}
    )
    assert verdict.status is Status.REGRESSION
    other_meter = dataclasses.replace(out, method="nvml: gpu0")
    verdicts = detect.judge_night(
        {key("energy_per_inference_j"): out}, {key("energy_per_inference_j"): other_meter}
    )
    assert [v.status for v in verdicts] == [Status.INSUFFICIENT]


def test_failed_or_invalid_rows_give_no_samples() -> None:
    assert samples_from_row({**classifier_row(), "ok": False}, "r", 0.0) == {}
    assert samples_from_row({**classifier_row(), "valid": False}, "r", 0.0) == {}


# ------------------------------------------------------------------------------ detect


def key(metric: str, model: str = "resnet") -> SeriesKey:
    return SeriesKey(model, "onnxruntime", "int8", "pi5", metric)


def timing(values: list[float], run: str = "r", at: float = 0.0) -> Sample:
    return Sample(run, at, float(np.median(values)), tuple(values))


BASE = [10.0, 10.1, 9.9, 10.05, 9.95]
SLOW = [v * 1.1 for v in BASE]


def test_judge_night_compares_the_common_known_series() -> None:
    baseline = {
        key("latency_p50"): timing(BASE),
        key("latency_p50", "other"): timing(BASE),
        key("model_size"): Sample("b", 0, 100.0),
        key("unknown_metric"): timing(BASE),
    }
    candidate = {
        key("latency_p50"): timing(SLOW),
        key("model_size"): Sample("c", 1, 90.0),
        key("unknown_metric"): timing(SLOW),
        key("peak_rss"): timing(BASE),
    }
    verdicts = detect.judge_night(baseline, candidate)
    by_metric = {v.key.metric: v for v in verdicts}
    assert set(by_metric) == {"latency_p50", "model_size"}
    assert by_metric["latency_p50"].status is Status.REGRESSION
    assert by_metric["model_size"].status is Status.CHANGED
    assert detect.regressions(verdicts) == [by_metric["latency_p50"]]
    assert detect.changes(verdicts) == [by_metric["model_size"]]
    assert detect.to_confirm(verdicts) == [by_metric["latency_p50"]]


def test_judge_night_gives_the_verdicts_of_one_series_at_a_time() -> None:
    """Timing series are compared together; the verdicts (levels, other methods,
    mirrors folded) are those of comparing each series on its own."""
    rng = np.random.default_rng(5)
    baseline: dict[SeriesKey, Sample] = {}
    candidate: dict[SeriesKey, Sample] = {}
    for m in range(300):
        model, shift = f"m{m:03d}", float(rng.choice([1.0, 1.0, 1.06, 0.94]))
        base = list(10.0 * np.exp(rng.normal(0, 0.01, 5)))
        cand = [v * shift * float(np.exp(rng.normal(0, 0.01))) for v in base]
        for name, b, c in (
            ("latency_p50", base, cand),
            ("throughput", [1000 / v for v in base], [1000 / v for v in cand]),
            ("load_time", base, cand),
        ):
            baseline[key(name, model)] = timing(b, "b", 0.0)
            candidate[key(name, model)] = timing(c, "c", 1.0)
        baseline[key("model_size", model)] = Sample("b", 0.0, 100.0)
        candidate[key("model_size", model)] = Sample("c", 1.0, 100.0 + m % 3)
    odd = key("load_time", "m007")  # measured another way tonight
    candidate[odd] = dataclasses.replace(candidate[odd], method="other")
    levels = {("pi5", "latency_p50"): 1.02}
    want = []
    for k in sorted((k for k in candidate if k in baseline), key=SeriesKey.label):
        base_sample = baseline[k]
        if k.metric == "latency_p50":
            base_sample = detect.scaled(base_sample, 1.02)
        want.append(stats.compare(k, METRICS[k.metric], base_sample, candidate[k]))
    want = detect.fold_mirrors(want)
    got = detect.judge_night(baseline, candidate, levels)
    assert [repr(v) for v in got] == [repr(v) for v in want]
    assert {v.status for v in got} >= {Status.REGRESSION, Status.IMPROVEMENT, Status.INSUFFICIENT}


def test_confirmation_decides_what_fails_the_night() -> None:
    k = key("latency_p50")
    first = detect.judge_night({k: timing(BASE)}, {k: timing(SLOW)})[0]
    again_slow = detect.judge_night({k: timing(BASE)}, {k: timing(SLOW)})[0]
    again_same = detect.judge_night({k: timing(BASE)}, {k: timing(BASE)})[0]
    confirmed = detect.confirm(first, again_slow)
    refuted = detect.confirm(first, again_same)
    assert confirmed.confirmed is True and refuted.confirmed is False
    assert detect.fails_night([confirmed]) and not detect.fails_night([refuted])
    assert detect.to_confirm([confirmed, refuted]) == []
    # A changed model size alone does not fail the night.
    size = detect.judge_night(
        {key("model_size"): Sample("b", 0, 1.0)}, {key("model_size"): Sample("c", 1, 2.0)}
    )
    assert not detect.fails_night(size)
    with pytest.raises(ValueError):
        detect.confirm(first, size[0])


def test_history_orders_nights_and_finds_the_step() -> None:
    rng = np.random.default_rng(0)
    k = key("latency_p50")
    samples = []
    for night in range(30):
        level = 10.0 * (1.05 if night >= 18 else 1.0)
        trials = list(level * np.exp(rng.normal(0, 0.01, 5)))
        samples.append(timing(trials, f"n{night}", float(night)))
    hist = detect.history(k, list(reversed(samples)), baseline_run_id="n3")
    assert [s.run_id for s in hist.samples] == [f"n{i}" for i in range(30)]
    assert hist.unit == "ms" and hist.direction is Direction.LOWER
    assert hist.baseline_band == (min(samples[3].trials), max(samples[3].trials))
    assert [p.index for p in hist.change_points] == [18]
    assert detect.history(k, samples, baseline_run_id="n3").change_points == hist.change_points
    assert detect.history(k, samples).baseline_band is None


# ------------------------------------------------------------------------------ sequential


def test_device_levels_are_the_median_ratio_of_control_series() -> None:
    base = {key("latency_p50", m): timing(BASE, "b") for m in ("a", "b", "c", "changed")}
    cand = {k: timing([v * 1.03 for v in BASE], "c") for k in base}
    cand[key("latency_p50", "changed")] = timing([v * 1.5 for v in BASE], "c")
    controls = [k for k in base if k.model != "changed"]
    levels = detect.device_levels(base, cand, controls)
    assert levels == {("pi5", "latency_p50"): pytest.approx(1.03)}
    # Scaled by the device's own 3% slow-down, a 3% slower series is not a regression ...
    k = key("latency_p50", "a")
    assert detect.judge_night(base, cand)[0].status is Status.REGRESSION
    scaled = {v.key: v for v in detect.judge_night(base, cand, levels)}
    assert scaled[k].status is Status.UNCHANGED
    # ... and the changed series' excess over the device is still one.
    assert scaled[key("latency_p50", "changed")].status is Status.REGRESSION
    assert detect.device_level([]) == 1.0


def test_sequential_confirmation_leaves_the_first_checks_night_out() -> None:
    k = key("latency_p50")
    fast_night = timing([v * 0.9 for v in BASE], "n-3", at=3.0)  # the first check's baseline
    others = [timing(BASE, f"n-{i}", at=float(i)) for i in range(3)]
    base, how = detect.sequential_baseline(k, fast_night, [*others, fast_night])
    assert "independent baseline: 3 other stored night(s)" in how
    assert len(base.trials) == 15 and base.value == pytest.approx(10.0)
    first = detect.judge_night({k: fast_night}, {k: timing(BASE, "n-4")})[0]
    assert first.status is Status.REGRESSION  # only because that night ran fast
    again = detect.confirm_sequential(first, base, timing(BASE, "again"), independent=True)
    assert again.confirmed is False and not detect.fails_night([again])
    # With control series the independent baseline follows the device's own level.
    controls = [([timing(BASE, f"n-{i}", at=float(i)) for i in range(4)], timing(SLOW, "n-4"))]
    base, how = detect.sequential_baseline(k, fast_night, [*others, fast_night], controls)
    assert "1 control series, device x1.100" in how and base.value == pytest.approx(11.0)
    # Without another stored night: the first check's baseline at the stricter level.
    base, how = detect.sequential_baseline(k, fast_night, [fast_night])
    assert how.startswith("no other stored night") and base.trials == fast_night.trials


def test_judge_runs_takes_the_night_as_the_unit() -> None:
    k = key("latency_p50")
    stored = [
        detect.StoredNight("a", timing([v, v, v], f"n{i}"), 1.0)
        for i, v in enumerate([10.0, 10.2, 9.8, 10.1, 9.9])
    ] + [
        detect.StoredNight("old", timing([v, v, v], f"o{i}"), 1.0)
        for i, v in enumerate([12.0, 12.2, 11.8])
    ]
    # The spread is pooled within builds (the old build's level does not inflate it):
    # s = sqrt((0.1 + 0.08) / 6) on ~10 ms, about 1.7%.
    within = detect.judge_runs(k, [timing([10.2] * 3)], stored, "a")
    assert within.status is Status.UNCHANGED and "6 df" in within.message
    beyond = detect.judge_runs(k, [timing([10.9] * 3)], stored, "a")
    assert beyond.status is Status.REGRESSION and beyond.ratio == pytest.approx(1.09, rel=1e-3)
    assert beyond.ci_low < beyond.ratio < beyond.ci_high
    # One run 7% slow is within reach of the night-to-night spread at the confirmation's
    # alpha; three such runs are not.
    one = detect.judge_runs(k, [timing([10.7] * 3)], stored, "a", 0.001)
    three = detect.judge_runs(k, [timing([10.7] * 3)] * 3, stored, "a", 0.001)
    assert one.status is Status.UNCHANGED and three.status is Status.REGRESSION
    # Below the minimum effect nothing is reported, however tight the spread.
    tight = [detect.StoredNight("a", timing([10.0] * 3, f"t{i}"), 1.0) for i in range(5)]
    tight[0] = detect.StoredNight("a", timing([10.001] * 3, "t0"), 1.0)
    assert detect.judge_runs(k, [timing([10.15] * 3)], tight, "a").status is Status.UNCHANGED
    # The device level of each stored night scales it: a device 9% slower tonight.
    scaled = [dataclasses.replace(n, level=1.09) for n in stored]
    assert detect.judge_runs(k, [timing([10.9] * 3)], scaled, "a").status is Status.UNCHANGED
    # Faster is an improvement; no baseline-build night or no spread: INSUFFICIENT.
    fast = detect.judge_runs(k, [timing([9.0] * 3)], stored, "a")
    assert fast.status is Status.IMPROVEMENT
    assert detect.judge_runs(k, [timing([10.0])], stored, "b").status is Status.INSUFFICIENT
    assert detect.judge_runs(k, [timing([10.0])], stored[:2], "a").status is Status.INSUFFICIENT


def test_judge_runs_leaves_outlying_stored_nights_out() -> None:
    k = key("latency_p50")
    values = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02, 9.98, 10.08, 9.92, 10.0, 10.03, 11.5]
    nights = [detect.StoredNight("a", timing([v] * 3, f"n{i}"), 1.0) for i, v in enumerate(values)]
    # The night with a slow stretch in its run (+15%) would inflate the spread ~8x and
    # hide a +5% step; it is left out.
    verdict = detect.judge_runs(k, [timing([10.5] * 3)], nights, "a")
    assert "1 outlying night(s) left out" in verdict.message
    assert verdict.status is Status.REGRESSION
    # With fewer than TRIM_MIN_NIGHTS nights nothing is trimmed.
    few = detect.judge_runs(k, [timing([10.5] * 3)], nights[-detect.TRIM_MIN_NIGHTS + 1 :], "a")
    assert "outlying" not in few.message

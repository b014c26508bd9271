"""One timing regression is one finding: latency and its mirror throughput together."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from results.regression import detect
from results.regression.codec import verdict_from_dict, verdict_to_dict
from results.regression.metrics import samples_from_row
from results.regression.types import Sample, SeriesKey, Status
from results.report import build_report, render

MEDIANS = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02, 9.98]


def row(medians: list[float], llm: bool = False) -> dict[str, object]:
    out: dict[str, object] = {
        "ok": True,
        "valid": True,
        "model": "m",
        "backend": "onnxruntime",
        "scheme": "int8",
        "device_id": "pi5",
        "trial_medians_ms": medians,
        "batch_size": 1,
    }
    if llm:
        out["accuracy"] = {"kld_mean": 0.01}
    return out


def night(medians: list[float], run: str, llm: bool = False) -> dict[SeriesKey, Sample]:
    samples = samples_from_row(row(medians, llm), run, 0.0)
    return {SeriesKey("m", "onnxruntime", "int8", "pi5", name): s for name, s in samples.items()}


@pytest.mark.parametrize(("llm", "mirror"), [(False, "throughput"), (True, "gen_tok_per_s")])
def test_latency_and_throughput_are_one_finding(llm: bool, mirror: str) -> None:
    base = night(MEDIANS, "b", llm)
    slow = night([v * 1.1 for v in MEDIANS], "c", llm)
    verdicts = [v for v in detect.judge_night(base, slow) if v.key.metric != "kld_mean"]
    assert len(verdicts) == 1  # not two: the throughput is the same trials upside down
    (v,) = verdicts
    assert v.status is Status.REGRESSION and v.key.metric == "latency_p50"
    assert v.mirror == mirror and v.label().endswith(f"latency_p50 + {mirror}")
    assert v.ratio == pytest.approx(1.1) and v.mirror_ratio == pytest.approx(1 / 1.1)
    assert v.mirror_baseline == pytest.approx(1000 / np.median(MEDIANS))
    # Confirmation and counts treat it as one.
    assert detect.to_confirm(verdicts) == [v]
    again = next(x for x in detect.judge_night(base, slow) if x.key == v.key)
    assert detect.regressions([detect.confirm(v, again)]) == [detect.confirm(v, again)]
    # Unchanged nights fold too: one verdict per timing series pair.
    same = detect.judge_night(base, night(MEDIANS, "c", llm))
    assert [x.key.metric for x in same if x.key.metric != "kld_mean"] == ["latency_p50"]


def test_a_mirror_with_another_status_or_alone_stays_its_own_finding() -> None:
    base, slow = night(MEDIANS, "b"), night([v * 1.1 for v in MEDIANS], "c")
    only = {k: s for k, s in base.items() if k.metric == "throughput"}
    alone = detect.judge_night(only, slow)
    assert [(v.key.metric, v.mirror) for v in alone] == [("throughput", "")]
    lat = dataclasses.replace(detect.judge_night(base, slow)[0], mirror="")
    thr = detect.judge_night(only, slow)[0]
    other = detect.fold_mirrors([lat, dataclasses.replace(thr, status=Status.UNCHANGED)])
    assert len(other) == 2 and other[0].mirror == ""


def test_the_finding_round_trips_and_old_summaries_load() -> None:
    v = detect.judge_night(night(MEDIANS, "b"), night([x * 1.1 for x in MEDIANS], "c"))[0]
    back = verdict_from_dict(verdict_to_dict(v))
    assert back.mirror == "throughput"
    assert back.mirror_candidate == pytest.approx(v.mirror_candidate)
    old = verdict_to_dict(v)
    for name in ("mirror", "mirror_baseline", "mirror_candidate"):
        del old[name]
    legacy = verdict_from_dict(old)
    assert legacy.mirror == "" and math.isnan(legacy.mirror_ratio)
    plain = detect.judge_night(night(MEDIANS, "b"), night(MEDIANS, "c"))[0]
    assert plain.mirror and "mirror" in verdict_to_dict(plain)


def test_reports_show_one_line_with_both_figures() -> None:
    verdicts = detect.judge_night(night(MEDIANS, "b"), night([x * 1.1 for x in MEDIANS], "c"))
    verdicts = [v for v in verdicts if v.status is Status.REGRESSION]
    assert len(verdicts) == 1
    report = build_report("nightly", [], verdicts)
    terminal = render(report, "terminal")
    lines = [line for line in terminal.splitlines() if "REGRESSION" in line]
    assert len(lines) == 1
    assert "latency_p50 + throughput" in lines[0]
    assert "+10.0%" in lines[0] and "throughput" in lines[0] and "-9.1%" in lines[0]
    assert "nightly: 1 regression" in terminal
    markdown = render(report, "markdown")
    rows = [line for line in markdown.splitlines() if "latency_p50 + throughput" in line]
    assert len(rows) == 1 and "+10.0% / -9.1%" in rows[0]
    html = render(report, "html")
    assert html.count("latency_p50 + throughput") == 1 and "+10.0% / -9.1%" in html

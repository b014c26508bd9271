"""The report model and its four renderings, on hand-built rows, verdicts and histories."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from results.regression.types import (
    ChangePoint,
    Direction,
    Sample,
    SeriesHistory,
    SeriesKey,
    Status,
    Verdict,
)
from results.report import FORMATS, Report, build_report, render
from results.report.model import ParetoPoint, pareto_front
from results.report.svg import Scale, auto_scale, element

MIB = 1 << 20
DAY = 86_400.0
EVIL = "<script>alert(1)</script>"


def row(
    model: str, backend: str, scheme: str, p50: float, mem_mib: float, **acc: float
) -> dict[str, Any]:
    """A successful result row on device 'pi'."""
    llm = "kld_mean" in acc
    return {
        "result_id": None,
        "device_id": "pi-0001",
        "device_name": "pi",
        "model": model,
        "backend": backend,
        "scheme": scheme,
        "ok": True,
        "valid": True,
        "lat_p50_ms": p50,
        "batch_size": 1,
        "peak_rss_bytes": int(mem_mib * MIB),
        "model_size_bytes": int(mem_mib * MIB / 2),
        "accuracy": acc,
        "metrics": {"prompt_tok_per_s": 400.0} if llm else {},
    }


def sample_rows() -> list[dict[str, Any]]:
    """A classifier sweep, an LLM sweep, one failed and one invalid run."""
    return [
        row("digits", "onnxruntime", "fp32", 1.0, 100, top1=0.98, agreement=1.0),
        row("digits", "onnxruntime", "fp16", 0.8, 80, top1=0.98, agreement=0.999),
        row("digits", "onnxruntime", "int8-dynamic", 0.5, 50, top1=0.97, agreement=0.99),
        row("digits", "onnxruntime", "int4-weight", 0.6, 40, top1=0.96, agreement=0.98),
        {
            **row("digits", "onnxruntime", "int8-static", 0.4, 40),
            "ok": False,
            "error_kind": "backend_crash",
            "error_message": "child died\nwith signal 11",
        },
        {
            **row("digits", "onnxruntime", "int8-qdq", 0.45, 40, top1=0.97, agreement=0.99),
            "valid": False,
            "invalid_reason": "min_iterations=200 not met",
        },
        row("slm", "llama-cpp", "F16", 20.0, 330, kld_mean=0.0, ppl_ratio=1.0, top1_agreement=1.0),
        row(
            "slm",
            "llama-cpp",
            "Q8_0",
            14.0,
            210,
            kld_mean=0.003,
            ppl_ratio=1.01,
            top1_agreement=0.95,
        ),
        row(
            "slm",
            "llama-cpp",
            "Q4_K_M",
            15.0,
            180,
            kld_mean=0.04,
            ppl_ratio=1.06,
            top1_agreement=0.84,
        ),
    ]


LATENCY_KEY = SeriesKey("slm", "llama-cpp", "Q8_0", "pi-0001", "latency_p50")
MEMORY_KEY = SeriesKey("slm", "llama-cpp", "Q8_0", "pi-0001", "peak_rss")


def sample_history() -> SeriesHistory:
    """Ten nights of decode latency with a step up from night 7."""
    samples = []
    for i in range(10):
        value = 14.0 + (0.1 * (i % 3)) + (2.0 if i >= 7 else 0.0)
        trials = (value - 0.2, value, value + 0.3)
        samples.append(Sample(f"night-{i}", 1_700_000_000 + i * DAY, value, trials))
    cp = ChangePoint(LATENCY_KEY, 7, "night-7", before=14.1, after=16.1, p_value=0.001)
    return SeriesHistory(
        LATENCY_KEY, "ms", Direction.LOWER, samples, [cp], baseline_band=(13.8, 14.4)
    )


def memory_history() -> SeriesHistory:
    """A flat memory series without trials or change points."""
    samples = [Sample(f"night-{i}", 1_700_000_000 + i * DAY, 210.0 * MIB) for i in range(4)]
    return SeriesHistory(MEMORY_KEY, "bytes", Direction.LOWER, samples)


def sample_verdicts() -> list[Verdict]:
    """A regression on latency and an unchanged memory series."""
    return [
        Verdict(MEMORY_KEY, Status.UNCHANGED, 210.0 * MIB, 210.0 * MIB, 1.0),
        Verdict(
            LATENCY_KEY,
            Status.REGRESSION,
            14.1,
            16.1,
            1.142,
            ci_low=1.10,
            ci_high=1.18,
            p_value=0.002,
            message="decode 14% slower",
        ),
    ]


def sample_report(title: str = "nightly") -> Report:
    """The report over all of the above."""
    return build_report(
        title,
        sample_rows(),
        verdicts=sample_verdicts(),
        histories=[memory_history(), sample_history()],
        notes=["a note"],
    )


# ------------------------------------------------------------------------------- model


def test_pareto_front_per_device_and_model() -> None:
    report = sample_report()
    charts = {c.model: c for c in report.pareto}
    assert set(charts) == {"digits", "slm"}
    digits, slm = charts["digits"], charts["slm"]
    assert digits.fidelity.key == "agreement" and digits.fidelity.direction is Direction.HIGHER
    assert [p.label for p in digits.front] == [
        "onnxruntime/int8-dynamic",
        "onnxruntime/fp16",
        "onnxruntime/fp32",
    ]
    optimal = {p.scheme: p.optimal for p in digits.points}
    assert optimal["int4-weight"] is False  # slower and less faithful than int8-dynamic
    assert sorted(digits.unplotted) == [
        "onnxruntime/int8-qdq: invalid measurement: min_iterations=200 not met",
        "onnxruntime/int8-static: failed (backend_crash): child died",
    ]
    assert slm.is_llm and slm.fidelity.key == "kld_mean"
    assert slm.fidelity.direction is Direction.LOWER
    assert [p.scheme for p in slm.front] == ["Q8_0", "F16"]
    q8 = next(p for p in slm.points if p.scheme == "Q8_0")
    assert q8.memory_bytes == 210 * MIB and q8.latency_ms == 14.0


def test_pareto_ties_and_fallback_to_top1() -> None:
    a = ParetoPoint("b", "x", 1.0, 0.9, None, False)
    b = ParetoPoint("b", "y", 1.0, 0.9, None, False)
    assert all(p.optimal for p in pareto_front([a, b], Direction.HIGHER))
    report = build_report("t", [row("m", "onnxruntime", "fp32", 1.0, 10, top1=0.9)])
    assert report.pareto[0].fidelity.key == "top1" and report.pareto[0].points[0].optimal


def test_summary_failures_verdict_order_and_panels() -> None:
    report = sample_report()
    s = report.summary
    assert (s.rows, s.ok, s.failed, s.invalid) == (9, 8, 1, 1)
    assert s.devices == ("pi",) and s.models == ("digits", "slm")
    assert [f.scheme for f in report.failures] == ["int8-static", "int8-qdq"]
    assert [v.status for v in report.verdicts] == [Status.REGRESSION, Status.UNCHANGED]
    assert report.histories[0].history.key == LATENCY_KEY  # the regression first
    assert report.histories[0].verdict is not None
    assert report.unit_of(MEMORY_KEY) == "bytes"
    assert len(report.comparison) == 9  # results.compare's rows, one per result


def test_empty_report_renders_everywhere() -> None:
    report = build_report("empty", [])
    for fmt in FORMATS:
        assert "empty" in render(report, fmt)
    with pytest.raises(ValueError, match="unknown report format"):
        render(report, "pdf")


# ----------------------------------------------------------------------------- renderers


def test_markdown_tables() -> None:
    text = render(sample_report(), "markdown")
    lines = text.splitlines()
    assert lines[0] == "# nightly"
    assert "| onnxruntime/int8-dynamic | 500 µs | 0.99 | 50.0 MiB | yes |" in lines
    assert "| onnxruntime/int4-weight | 600 µs | 0.98 | 40.0 MiB |  |" in lines
    assert "| llama-cpp/Q8_0 | 14.00 ms/token | 0.003 | 210.0 MiB | yes |" in lines
    regression = next(line for line in lines if line.startswith("| slm llama-cpp/Q8_0"))
    assert "| regression | 14.10 ms | 16.10 ms | +14.2% | +10.0% .. +18.0% |" in regression
    assert "| llama-cpp | Q8_0 | 210.0 |" in text  # the framework comparison
    assert "- not on the chart: onnxruntime/int8-static: failed (backend_crash)" in text


def test_markdown_escapes_cells() -> None:
    rows = [row("a|b" + EVIL, "onnxruntime", "fp32", 1.0, 10, agreement=1.0)]
    text = render(build_report("t", rows), "markdown")
    assert "<script>" not in text and "a\\|b&lt;script&gt;" in text


def test_json_round_trip() -> None:
    text = render(sample_report(), "json")
    data = json.loads(text)
    assert data["schema"] == "edgefarm.report/1" and data["title"] == "nightly"
    digits = next(c for c in data["pareto"] if c["model"] == "digits")
    front = [p["label"] for p in digits["points"] if p["optimal"]]
    assert sorted(front) == ["onnxruntime/fp16", "onnxruntime/fp32", "onnxruntime/int8-dynamic"]
    assert data["verdicts"][0]["status"] == "regression"
    assert data["verdicts"][0]["key"]["metric"] == "latency_p50"
    assert data["verdicts"][1]["ci_low"] is None  # NaN becomes null
    history = data["histories"][0]["history"]
    assert history["baseline_band"] == [13.8, 14.4] and len(history["samples"]) == 10
    assert history["change_points"][0]["index"] == 7
    assert data["summary"]["failed"] == 1 and data["notes"] == ["a note"]


def test_terminal_summary() -> None:
    text = render(sample_report(), "terminal")
    assert "9 results: 8 ok, 1 failed, 1 invalid" in text
    assert (
        "REGRESSION: slm llama-cpp/Q8_0 on pi-0001: latency_p50 14.10 ms -> 16.10 ms (+14.2%)"
        in text
    )
    assert "dominated: onnxruntime/int4-weight" in text
    assert "\x1b[" not in text  # no colour codes


def test_html_charts_and_escaping() -> None:
    report = build_report(
        "t " + EVIL,
        [*sample_rows(), row(EVIL, "onnxruntime", "fp32", 1.0, 10, agreement=1.0)],
        verdicts=sample_verdicts(),
        histories=[sample_history(), memory_history()],
    )
    page = render(report, "html")
    charts = len([c for c in report.pareto if c.points]) + len(report.histories)
    assert page.count("<svg") == charts == 5
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"(src|href)\s*=|url\(|https?://|@import", page)  # self-contained
    pareto = page.split('class="chart pareto"')[1].split("</svg>")[0]
    assert len(re.findall(r'<circle [^>]*class="point', pareto)) == 4  # digits: 4 plotted
    assert pareto.count('class="point-label"') == 3 and "int8-dynamic" in pareto
    history = page.split('class="chart history"')[1].split("</svg>")[0]
    assert history.count('class="night"') == 10 and history.count('class="trials"') == 10
    assert history.count('class="changepoint worse"') == 1
    assert history.count('class="band"') == 1 and history.count('class="regression"') == 1
    assert "2023-11-14" in history  # night dates on the x axis
    assert "<table>" in page and "<td>Q4_K_M</td>" not in page  # left column has class


# ---------------------------------------------------------------------------- svg helpers


def test_scales_and_elements() -> None:
    s = Scale(0.0, 10.0, 100.0, 200.0)
    assert s(5) == 150.0 and s.ticks() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    log = auto_scale([1.0, 100.0], 0.0, 1.0)
    assert log.log and 1.0 in log.ticks() and 10.0 in log.ticks()
    assert not auto_scale([1.0, 2.0], 0, 1).log
    flat = auto_scale([3.0, 3.0], 0, 1)
    assert flat.lo < 3.0 < flat.hi and math.isfinite(flat(3.0))
    assert element("text", "<b>", class_="x", text_anchor="end") == (
        '<text class="x" text-anchor="end">&lt;b&gt;</text>'
    )

"""The framework comparison from result rows."""

from __future__ import annotations

from typing import Any

from results.compare import compare, to_markdown


def row(backend: str, scheme: str, p50: float, rss: int, size: int, **acc: float) -> dict[str, Any]:
    llm = backend != "onnxruntime"
    return {
        "device_name": "pi",
        "model": "m",
        "backend": backend,
        "scheme": scheme,
        "ok": True,
        "lat_p50_ms": p50,
        "batch_size": 1,
        "peak_rss_bytes": rss,
        "model_size_bytes": size,
        "metrics": {"prompt_tok_per_s": 100.0} if llm else {},
        "accuracy": acc,
    }


def test_each_framework_against_its_own_full_precision_run() -> None:
    rows = [
        row("llama-cpp", "Q4_0", 10.0, 100, 25, kld_mean=0.2, ppl_ratio=1.2, top1_agreement=0.7),
        row("llama-cpp", "F16", 20.0, 300, 100, kld_mean=0.0, ppl_ratio=1.0, top1_agreement=1.0),
        row("onnxruntime", "fp32", 1.0, 50, 10, top1=0.98, agreement=1.0),
        row("onnxruntime", "int8-dynamic", 2.0, 40, 3, top1=0.97, agreement=0.99),
    ]
    out = compare(rows)
    by = {(r.framework, r.scheme): r for r in out}
    assert [(r.framework, r.scheme) for r in out][:2] == [
        ("llama-cpp", "F16"),
        ("llama-cpp", "Q4_0"),
    ]
    q4 = by["llama-cpp", "Q4_0"]
    assert q4.is_llm and q4.speed == 100.0 and q4.speedup == 2.0
    assert abs(q4.memory_reduction - (1 - 100 / 300)) < 1e-12 and q4.size_reduction == 0.75
    assert q4.fidelity == {"kld_mean": 0.2, "ppl_ratio": 1.2, "top1_agreement": 0.7}
    int8 = by["onnxruntime", "int8-dynamic"]
    assert not int8.is_llm and int8.speedup == 0.5 and int8.fidelity["top1"] == 0.97
    md = to_markdown(out)
    assert "### m on pi" in md and "| llama-cpp | Q4_0 |" in md and "2.00x" in md


def test_missing_baseline_and_failures_are_said() -> None:
    failed = {**row("llama-cpp", "Q2_K", 1.0, 1, 1), "ok": False, "error_kind": "timeout"}
    out = compare([row("llama-cpp", "Q8_0", 10.0, 100, 50), failed])
    notes = {r.scheme: r.note for r in out}
    assert notes["Q8_0"] == "no F16 run" and notes["Q2_K"] == "failed: timeout"
    assert all(r.speedup is None for r in out)


def test_a_gguf_row_shows_its_effective_bits_per_weight() -> None:
    # Q3_K_M whose K-quants fell back to a 4.5-bit type: the name alone would mislead
    q3 = row("llama-cpp", "Q3_K_M", 10.0, 100, 3 << 20)
    q3["metrics"]["bits_per_weight"] = 4.8612
    out = compare([row("llama-cpp", "F16", 20.0, 300, 12 << 20), q3])
    assert out[1].bits_per_weight == 4.8612 and out[0].bits_per_weight is None
    assert "| 3.0 (4.86 b/w) |" in to_markdown(out)


def test_a_full_precision_conversion_shows_its_logit_check() -> None:
    f16 = row("llama-cpp", "F16", 20.0, 300, 100, kld_mean=0.0, ppl_ratio=1.0, top1_agreement=1.0)
    q4 = row("llama-cpp", "Q4_0", 10.0, 100, 25, kld_mean=0.2, ppl_ratio=1.2, top1_agreement=0.7)
    f16["artifact_sha256"], q4["artifact_sha256"] = "a" * 64, "b" * 64
    checks = {"a" * 64: {"format": "gguf-f16", "max_abs_diff": 0.0021, "tolerance": 0.05}}
    out = {r.scheme: r for r in compare([f16, q4], checks)}
    assert out["F16"].logit_max_abs_diff == 0.0021 and out["Q4_0"].logit_max_abs_diff is None
    assert "logits vs checkpoint 2.1e-03" in to_markdown(list(out.values()))


def test_a_speed_up_inside_the_noise_is_called_the_same() -> None:
    base = {**row("onnxruntime", "fp32", 1.0, 50, 10), "trial_medians_ms": [1.0, 1.04, 0.97]}
    noise = {  # 4% faster on the point estimates, trials overlapping
        **row("onnxruntime", "fp16", 0.96, 50, 5),
        "trial_medians_ms": [0.93, 1.0, 0.96],
    }
    real = {  # 2x faster, trials tight
        **row("onnxruntime", "int8-static", 0.5, 40, 3),
        "trial_medians_ms": [0.5, 0.51, 0.49],
    }
    single = {**row("onnxruntime", "int4-weight", 0.96, 40, 3), "trial_medians_ms": [0.96]}
    by = {r.scheme: r for r in compare([base, noise, real, single])}
    assert by["fp32"].speedup_interval is None and not by["fp32"].same_speed
    interval = by["fp16"].speedup_interval
    assert interval is not None and interval.low < 1.0 < interval.high and by["fp16"].same_speed
    assert by["int8-static"].speedup_interval is not None
    assert by["int8-static"].speedup_interval.low > 1.8 and not by["int8-static"].same_speed
    # one trial: no interval, so nothing is claimed either way
    assert by["int4-weight"].speedup_interval is None and not by["int4-weight"].same_speed
    md = to_markdown(list(by.values()))
    fp16 = next(line for line in md.splitlines() if "| fp16 |" in line)
    assert f"1.04x (same: {interval.low:.2f}-{interval.high:.2f}x)" in fp16 and "±" in fp16
    int8 = next(line for line in md.splitlines() if "| int8-static |" in line)
    assert "same" not in int8 and "contains 1x" in md

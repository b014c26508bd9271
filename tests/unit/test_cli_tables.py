"""Terminal result tables: language-model rows get their own columns."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from edgefarm.cli.tables import fidelity_setting, results_tables
from results.compare import cells, compare


def render(rows: list[dict[str, Any]]) -> str:
    console = Console(width=400, record=True)
    for table in results_tables(rows, "c-1"):
        console.print(table)
    return console.export_text()


def test_language_model_rows_show_bits_per_weight_and_fidelity() -> None:
    llm = {
        "model": "smollm2",
        "backend": "llama-cpp",
        "scheme": "Q3_K_M",
        "device_name": "vm",
        "ok": True,
        "valid": True,
        "lat_p50_ms": 10.0,
        "model_size_bytes": 89 << 20,
        "metrics": {"prompt_tok_per_s": 600.0, "ttft_ms": 200.0, "bits_per_weight": 5.4563},
        "accuracy": {"kld_mean": 0.09417, "top1_agreement": 0.7633},
    }
    classifier = {
        "model": "digits",
        "backend": "onnxruntime",
        "scheme": "fp32",
        "ok": True,
        "valid": True,
        "metrics": {},
    }
    text = render([llm, classifier])
    assert "c-1 (language models)" in text and "bits/w" in text
    llm_line = next(line for line in text.splitlines() if "Q3_K_M" in line)
    assert "5.46" in llm_line and "0.09417" in llm_line and "100.0" in llm_line  # gen tok/s
    # a language model without the figure (another backend) shows a dash, not a number
    other = {**llm, "backend": "onnxruntime", "metrics": {"prompt_tok_per_s": 1.0}}
    other_line = next(line for line in render([other]).splitlines() if "Q3_K_M" in line)
    assert "5.46" not in other_line and " - " in other_line


def test_timing_figures_carry_their_repeat_interval_and_llm_rows_their_fidelity_setting() -> None:
    llm = {
        "model": "smollm2",
        "backend": "llama-cpp",
        "scheme": "Q8_0",
        "ok": True,
        "valid": True,
        "lat_p50_ms": 10.0,
        "trial_medians_ms": [10.0, 10.4, 9.7, 10.1, 9.9],
        "metrics": {"prompt_tok_per_s": 600.0},
        "accuracy": {
            "kld_mean": 0.01,
            "fidelity_context_tokens": 512.0,
            "fidelity_positions": 2044.0,
            "fidelity_chunks": 4.0,
        },
    }
    classifier = {
        "model": "digits",
        "backend": "onnxruntime",
        "scheme": "fp32",
        "ok": True,
        "valid": True,
        "lat_p50_ms": 0.01,
        "throughput_per_s": 100_000.0,
        "trial_medians_ms": [0.0100, 0.0102],
        "metrics": {},
    }
    text = render([llm, classifier])
    assert "gen tok/s ±95%" in text and "p50 ms ±95%" in text and "items/s ±95%" in text
    # 5 trials, log sd 0.0262: t(4) * sd * sqrt(2/5) = 4.5% (log), with the run-level
    # term 1.96 * sqrt(2) * 2% = 5.5%: sqrt(4.5^2 + 5.5^2) = 7.2% (log) = +7.4%
    llm_line = next(line for line in text.splitlines() if "Q8_0" in line)
    assert "100.0 ±7.4%" in llm_line and "ctx 512 x4, 2044 pos" in llm_line
    # 2 trials: t(1) = 12.7 makes the interval wide, and says so
    fp32_line = next(line for line in text.splitlines() if "fp32" in line)
    assert "0.0100 ±20.5%" in fp32_line and "100,000 ±20.5%" in fp32_line
    # one trial: no interval; an older row without fidelity settings: a dash
    single = {**llm, "trial_medians_ms": [10.0], "accuracy": {"kld_mean": 0.01}}
    line = next(line for line in render([single]).splitlines() if "Q8_0" in line)
    assert "100.0 " in line and "±" not in line
    assert fidelity_setting(single) == "-" and "pos" not in line


def test_energy_columns_appear_where_energy_was_measured() -> None:
    llm = {
        "model": "smollm2",
        "backend": "llama-cpp",
        "scheme": "Q4_K_M",
        "device_name": "laptop",
        "ok": True,
        "valid": True,
        "lat_p50_ms": 20.0,
        "metrics": {"prompt_tok_per_s": 600.0, "energy_per_inference_j": 0.125, "power_w": 6.25},
    }
    text = render([llm])
    assert "mJ/token" in text and " W " in text
    line = next(line for line in text.splitlines() if "Q4_K_M" in line)
    assert "125" in line and "6.2" in line
    unmeasured = {**llm, "metrics": {"prompt_tok_per_s": 600.0}}
    assert "mJ/token" not in render([unmeasured])  # no column of dashes


def test_the_comparison_shows_energy_beside_speed() -> None:
    row = {
        "model": "digits",
        "backend": "onnxruntime",
        "scheme": "fp32",
        "device_name": "pi",
        "ok": True,
        "valid": True,
        "lat_p50_ms": 2.0,
        "peak_rss_bytes": 1 << 20,
        "model_size_bytes": 1 << 20,
        "accuracy": {},
        "metrics": {"energy_per_inference_j": 0.0042},
    }
    (measured,) = compare([row])
    assert measured.energy_j == 0.0042
    assert "items/s, 4.2 mJ/item" in cells(measured)[3]
    (plain,) = compare([{**row, "metrics": {}}])
    assert "mJ" not in cells(plain)[3]

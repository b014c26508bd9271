"""Terminal result tables: language-model rows get their own columns."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from edgefarm.cli.tables import results_tables


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

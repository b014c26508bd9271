"""Terminal tables for result rows (rich).

Rows of language models (those with generation metrics) and of other models get their
own tables, each with the columns that mean something for it. A central timing figure
carries ``±x%``: the 95% interval for a repeat run's figure, from the row's per-trial
medians (:class:`edgefarm.domain.TrialInterval`); no ``±`` with fewer than two trials.
Language-model fidelity columns name the context and positions they were scored on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from results.compare import energy_per_inference
from results.rows import p50_interval
from results.serving import ServingVsInProcess, is_serving_row, side_by_side

Row = dict[str, Any]
STATUS_WIDTH = 70
LLM_MARKER = "prompt_tok_per_s"


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _clip(text: str) -> str:
    """Keep table rows short; `edgefarm results show ID` has the whole message."""
    return text if len(text) <= STATUS_WIDTH else text[: STATUS_WIDTH - 1] + "…"


def _status(row: Row) -> str:
    if not row.get("ok"):
        return _clip(f"FAILED {row.get('error_kind', '')}: {row.get('error_message', '')}")
    if not row.get("valid"):
        return _clip(f"invalid: {row.get('invalid_reason', '')}")
    return "ok (reused)" if row.get("reused") else "ok"


def _acc(key: str, fmt: str) -> Callable[[Row], str]:
    return lambda row: _num((row.get("accuracy") or {}).get(key), fmt)


def _metric(key: str, fmt: str) -> Callable[[Row], str]:
    return lambda row: _num((row.get("metrics") or {}).get(key), fmt)


def _field(key: str, fmt: str, scale: float = 1.0) -> Callable[[Row], str]:
    def show(row: Row) -> str:
        value = row.get(key)
        return _num(value * scale if value is not None else None, fmt)

    return show


def plus_minus(row: Row) -> str:
    """`` ±2.1%``: the row's repeat-run interval of its p50, or '' without one."""
    interval = p50_interval(row) if row.get("ok", True) else None
    return f" ±{interval.repeat_percent:.1f}%" if interval is not None else ""


def _with_interval(show: Callable[[Row], str]) -> Callable[[Row], str]:
    """A timing figure followed by its interval (nothing after a missing figure)."""

    def both(row: Row) -> str:
        text = show(row)
        return text if text == "-" else text + plus_minus(row)

    return both


def fidelity_setting(row: Row) -> str:
    """``ctx 512 x4, 2044 pos``: the context, chunks and positions perplexity, KLD and
    top-1 were scored on (not the timing context), or '-' when the row does not say."""
    accuracy = row.get("accuracy") or {}
    context = accuracy.get("fidelity_context_tokens")
    positions = accuracy.get("fidelity_positions")
    chunks = accuracy.get("fidelity_chunks")
    if context is None and positions is None:
        return "-"
    text = f"ctx {_num(context, '.0f')}"
    if chunks is not None:
        text += f" x{_num(chunks, '.0f')}"
    return f"{text}, {_num(positions, '.0f')} pos"


def _text(key: str) -> Callable[[Row], str]:
    return lambda row: str(row.get(key) or "")


IDENTITY = [
    ("model", _text("model")),
    ("backend", _text("backend")),
    ("scheme", _text("scheme")),
    ("device", lambda row: str(row.get("device_name") or row.get("device_id", ""))),
]
CLASSIFIER_COLUMNS = [
    *IDENTITY,
    ("p50 ms ±95%", _with_interval(_field("lat_p50_ms", ".4f"))),
    ("p90 ms", _field("lat_p90_ms", ".4f")),
    ("p99 ms", _field("lat_p99_ms", ".4f")),
    ("cv %", _field("lat_cv", ".1f", 100.0)),
    ("items/s ±95%", _with_interval(_field("throughput_per_s", ",.0f"))),
    ("peak RSS MiB", _field("peak_rss_bytes", ".1f", 1 / (1 << 20))),
    ("load s", _field("load_time_s", ".3f")),
    ("size KiB", _field("model_size_bytes", ".0f", 1 / 1024)),
    ("top1", _acc("top1", ".4f")),
    ("agree", _acc("agreement", ".4f")),
    ("status", _status),
]
LLM_COLUMNS = [
    *IDENTITY,
    # one timed iteration is one decode step: generation speed at the median step
    (
        "gen tok/s ±95%",
        _with_interval(
            lambda row: _num(1000 / row["lat_p50_ms"] if row.get("lat_p50_ms") else None, ".1f")
        ),
    ),
    ("prompt tok/s", _metric("prompt_tok_per_s", ".1f")),
    ("TTFT ms", _metric("ttft_ms", ".1f")),
    ("peak RSS MiB", _field("peak_rss_bytes", ".1f", 1 / (1 << 20))),
    ("load s", _field("load_time_s", ".3f")),
    ("size MiB", _field("model_size_bytes", ".1f", 1 / (1 << 20))),
    ("bits/w", _metric("bits_per_weight", ".2f")),  # GGUF only: what a type name hides
    ("ppl", _acc("perplexity", ".3f")),
    ("ppl ratio", _acc("ppl_ratio", ".4f")),
    ("KLD mean", _acc("kld_mean", ".5f")),
    ("KLD p99", _acc("kld_p99", ".4f")),
    ("top1 agree", _acc("top1_agreement", ".4f")),
    ("fidelity scored on", fidelity_setting),
    ("status", _status),
]


def is_llm_row(row: Row) -> bool:
    """A language-model result (it has generation metrics, or failed on llama.cpp)."""
    return LLM_MARKER in (row.get("metrics") or {}) or row.get("backend") == "llama-cpp"


def _energy_columns(
    rows: list[Row], columns: list[tuple[str, Callable[[Row], str]]], after: str, per: str
) -> list[tuple[str, Callable[[Row], str]]]:
    """``columns`` with energy per item/token and the average power after ``after``,
    when any row measured energy (most devices do not: no column of dashes then)."""
    if all(energy_per_inference(r) is None for r in rows):
        return columns
    at = [name for name, _ in columns].index(after) + 1
    energy = [
        (f"mJ/{per}", lambda row: _num(_times(energy_per_inference(row), 1000.0), ".3g")),
        ("W", _metric("power_w", ".1f")),
    ]
    return [*columns[:at], *energy, *columns[at:]]


def _times(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _table(rows: list[Row], columns: list[tuple[str, Callable[[Row], str]]], title: str) -> Table:
    table = Table(title=title or None)
    for name, _ in columns:
        table.add_column(
            name,
            justify="left"
            if name in {"model", "backend", "scheme", "device", "status"}
            else "right",
        )
    for row in rows:
        table.add_row(*(show(row) for _, show in columns))
    return table


def results_tables(rows: list[Row], title: str = "") -> list[Table]:
    """One table for classifier-style rows, one for language-model rows and, for
    serving rows, one of their load levels and one beside the in-process figures."""
    served = [r for r in rows if is_serving_row(r)]
    rest = [r for r in rows if not is_serving_row(r)]
    llm = [r for r in rest if is_llm_row(r)]
    other = [r for r in rest if not is_llm_row(r)]
    tables = []
    if other or not (llm or served):
        columns = _energy_columns(other, CLASSIFIER_COLUMNS, "items/s ±95%", "item")
        tables.append(_table(other, columns, title))
    if llm:
        columns = _energy_columns(llm, LLM_COLUMNS, "TTFT ms", "token")
        tables.append(_table(llm, columns, f"{title} (language models)" if title else ""))
    if served:
        tables.append(serving_table(served, f"{title} (serving)" if title else "serving"))
        pairs = side_by_side(rows)
        if pairs:
            tables.append(side_by_side_table(pairs))
    return tables


SERVING_HEAD = (
    "model", "backend", "scheme", "device", "start s", "level", "requests", "failed",
    "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "ITL p99 ms", "E2E p50 ms",
    "req/s", "out tok/s", "goodput/s", "status",
)  # fmt: skip


def serving_table(rows: list[Row], title: str) -> Table:
    """One line per load level of each serving row (failed rows: one line)."""
    table = Table(title=title or None)
    for name in SERVING_HEAD:
        table.add_column(name, justify="left" if name in _LEFT else "right")
    for row in rows:
        ident = [str(row.get(k) or "") for k in ("model", "backend", "scheme")]
        ident.append(str(row.get("device_name") or row.get("device_id", "")))
        start = _field("load_time_s", ".2f")(row)
        levels = row.get("serving") or []
        if not levels:
            table.add_row(*ident, start, *["-"] * 12, _status(row))
        for level in levels:
            table.add_row(
                *ident,
                start,
                str(level.get("label", "")),
                str(level.get("requests", "")),
                str(level.get("failed", "")),
                *(
                    _num(level.get(key), ".1f")
                    for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p99_ms")
                ),
                _num(level.get("e2e_p50_ms"), ".0f"),
                _num(level.get("request_per_s"), ".2f"),
                _num(level.get("output_tok_per_s"), ".1f"),
                _num(level.get("goodput_per_s"), ".2f"),
                _status(row),
            )
    return table


def side_by_side_table(pairs: list[ServingVsInProcess]) -> Table:
    """Decode speed and TTFT through the server beside the same artifact in-process."""
    table = Table(title="serving vs in-process (same artifact, same device)")
    head = ["model", "scheme", "device", "in-process", "tok/s", "TTFT ms", "server"]
    head += ["level", "tok/s (1/TPOT)", "TTFT p50 ms", "served / in-process"]
    head += ["top-1 in-process", "top-1 served"]
    for name in head:
        table.add_column(
            name, justify="left" if name in _LEFT | {"in-process", "server"} else "right"
        )
    for p in pairs:
        table.add_row(
            p.model,
            p.scheme,
            p.device,
            p.in_process,
            _num(p.in_process_tok_per_s, ".1f"),
            _num(p.in_process_ttft_ms, ".1f"),
            p.server,
            p.first_level,
            _num(p.served_tok_per_s, ".1f"),
            _num(p.served_ttft_ms, ".1f"),
            _num(p.speed_ratio, ".2f"),
            _num(p.in_process_top1, ".4f"),
            _num(p.served_top1, ".4f"),
        )
    return table


_LEFT = {"model", "backend", "scheme", "device", "status", "level"}


def print_tables(tables: list[Table]) -> None:
    """Print tables to stdout, wide enough not to wrap in logs."""
    console = Console(width=None if Console().is_terminal else 220)
    for table in tables:
        console.print(table)

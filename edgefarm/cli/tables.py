"""Terminal tables for result rows and campaigns (rich)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}"


def _kib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:.0f}"


STATUS_WIDTH = 70


def _clip(text: str) -> str:
    """Keep table rows short; `edgefarm results show ID` has the whole message."""
    return text if len(text) <= STATUS_WIDTH else text[: STATUS_WIDTH - 1] + "…"


def results_table(rows: list[dict[str, Any]], title: str = "") -> Table:
    """One line per result: latency, throughput, memory, size, accuracy, validity."""
    table = Table(title=title or None, show_lines=False)
    for name, justify in [
        ("model", "left"),
        ("backend", "left"),
        ("scheme", "left"),
        ("device", "left"),
        ("p50 ms", "right"),
        ("p90 ms", "right"),
        ("p99 ms", "right"),
        ("cv %", "right"),
        ("items/s", "right"),
        ("peak RSS MiB", "right"),
        ("load s", "right"),
        ("size KiB", "right"),
        ("top1", "right"),
        ("agree", "right"),
        ("status", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        accuracy = row.get("accuracy") or {}
        if not row.get("ok"):
            status = _clip(f"FAILED {row.get('error_kind', '')}: {row.get('error_message', '')}")
        elif not row.get("valid"):
            status = _clip(f"invalid: {row.get('invalid_reason', '')}")
        else:
            status = "ok (reused)" if row.get("reused") else "ok"
        cv = row.get("lat_cv")
        table.add_row(
            str(row.get("model", "")),
            str(row.get("backend", "")),
            str(row.get("scheme", "")),
            str(row.get("device_name") or row.get("device_id", "")),
            _num(row.get("lat_p50_ms"), ".4f"),
            _num(row.get("lat_p90_ms"), ".4f"),
            _num(row.get("lat_p99_ms"), ".4f"),
            _num(cv * 100 if cv is not None else None, ".1f"),
            _num(row.get("throughput_per_s"), ",.0f"),
            _mib(row.get("peak_rss_bytes")),
            _num(row.get("load_time_s"), ".3f"),
            _kib(row.get("model_size_bytes")),
            _num(accuracy.get("top1"), ".4f"),
            _num(accuracy.get("agreement"), ".4f"),
            status,
        )
    return table


def print_table(table: Table) -> None:
    """Print a table to stdout, wide enough not to wrap in logs."""
    Console(width=200 if not Console().is_terminal else None).print(table)

"""Numbers with units, the same way in every renderer."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from results.regression.metrics import METRICS
from results.regression.types import Verdict
from results.units import fmt_joules

MIB = 1 << 20


def missing(value: float | None) -> bool:
    """True for None, NaN and infinities."""
    return value is None or not math.isfinite(value)


def fmt_bytes(value: float | None) -> str:
    """``123.4 MiB`` (or KiB / GiB), ``-`` when missing."""
    if value is None or missing(float(value)):
        return "-"
    size = float(value)
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def fmt_ms(value: float | None) -> str:
    """Milliseconds with sensible precision: ``8.77 µs``, ``1.25 ms``, ``312 ms``."""
    if value is None or missing(value):
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.3g} µs"
    if abs(value) < 100:
        return f"{value:.2f} ms"
    return f"{value:,.0f} ms"


def fmt_num(value: float | None, digits: int = 4) -> str:
    """A plain number to ``digits`` significant digits, ``-`` when missing."""
    if value is None or missing(value):
        return "-"
    return f"{value:.{digits}g}"


def fmt_pct(value: float | None, digits: int = 1, signed: bool = False) -> str:
    """A fraction as a percentage: ``0.123`` -> ``12.3%``."""
    if value is None or missing(value):
        return "-"
    sign = "+" if signed else ""
    return f"{value * 100:{sign}.{digits}f}%"


def fmt_value(value: float | None, unit: str) -> str:
    """A metric value in its unit (``bytes``, ``ms``, ``fraction``, ``tok/s``, ...)."""
    if value is None or missing(value):
        return "-"
    if unit in ("bytes", "B"):
        return fmt_bytes(value)
    if unit == "ms":
        return fmt_ms(value)
    if unit == "fraction":
        return fmt_pct(value, 2)
    if unit == "J":
        return fmt_joules(value)
    if unit in ("s",):
        return f"{value:.3g} s"
    return f"{fmt_num(value)} {unit}".rstrip()


def fmt_ratio(ratio: float | None) -> str:
    """A candidate / baseline ratio as a signed change: ``1.12`` -> ``+12.0%``."""
    if ratio is None or missing(ratio):
        return "-"
    return fmt_pct(ratio - 1.0, 1, signed=True)


def fmt_date(at: float) -> str:
    """A unix time as a UTC date, ``2025-01-31``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def fmt_interval(low: float | None, high: float | None) -> str:
    """A ratio's confidence interval as changes: ``+10.0% .. +18.0%``, ``-`` when missing."""
    if low is None or high is None or missing(low) or missing(high):
        return "-"
    return f"{fmt_ratio(low)} .. {fmt_ratio(high)}"


def verdict_figures(v: Verdict, unit: str) -> list[str]:
    """Baseline, candidate and change of a verdict; with a mirror metric (throughput of
    a latency series) both figures in each cell, as one finding."""
    cells = [fmt_value(v.baseline, unit), fmt_value(v.candidate, unit), fmt_ratio(v.ratio)]
    if v.mirror:
        mirror_unit = METRICS[v.mirror].unit if v.mirror in METRICS else ""
        mirrored = (
            fmt_value(v.mirror_baseline, mirror_unit),
            fmt_value(v.mirror_candidate, mirror_unit),
            fmt_ratio(v.mirror_ratio),
        )
        cells = [f"{a} / {b}" for a, b in zip(cells, mirrored, strict=True)]
    return cells

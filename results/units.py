"""Unit formatting any results module may import: it depends on no other project module."""

from __future__ import annotations

import math


def fmt_joules(value: float | None) -> str:
    """Energy with a readable prefix: ``0.0123`` -> ``12.3 mJ``; ``-`` when missing."""
    if value is None or not math.isfinite(value):
        return "-"
    for scale, unit in ((1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-6:.3g} µJ"

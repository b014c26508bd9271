"""Numbers and units any results module may import: it depends on no other project module."""

from __future__ import annotations

import math
from typing import Any


def fmt_joules(value: float | None) -> str:
    """Energy with a readable prefix: ``0.0123`` -> ``12.3 mJ``; ``-`` when missing."""
    if value is None or not math.isfinite(value):
        return "-"
    for scale, unit in ((1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-6:.3g} µJ"


def as_number(value: Any) -> float | None:
    """A finite float from a stored figure, or None (missing, not a number, a bool,
    NaN or infinite)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

"""The report as JSON: the model's fields, NaN and infinities as null, enums as text."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

from results.report.model import Report


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data (dataclasses to dicts, tuples to lists, NaN to None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if hasattr(value, "label") and isinstance(getattr(type(value), "label", None), property):
            data["label"] = value.label
        return data
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]  # lists, tuples, lazy ones (a history's nights)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_dict(report: Report) -> dict[str, Any]:
    """The report as a plain dict (what :func:`render_json` writes)."""
    data: dict[str, Any] = plain(report)
    return data


def render_json(report: Report) -> str:
    """The report as indented, strict JSON (no NaN)."""
    return json.dumps(to_dict(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n"

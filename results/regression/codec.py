"""Verdicts and change points as JSON-ready dicts (for the nightly run's stored summary)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from results.regression.types import ChangePoint, SeriesKey, Status, Verdict


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def key_to_dict(key: SeriesKey) -> dict[str, str]:
    """A series key as a dict."""
    return dataclasses.asdict(key)


def key_from_dict(data: dict[str, Any]) -> SeriesKey:
    """The inverse of :func:`key_to_dict`."""
    return SeriesKey(**{f.name: data[f.name] for f in dataclasses.fields(SeriesKey)})


def verdict_to_dict(v: Verdict) -> dict[str, Any]:
    """A verdict as a JSON-ready dict (NaN becomes None)."""
    return {
        "key": key_to_dict(v.key),
        "status": v.status.value,
        "baseline": _num(v.baseline),
        "candidate": _num(v.candidate),
        "ratio": _num(v.ratio),
        "ci_low": _num(v.ci_low),
        "ci_high": _num(v.ci_high),
        "p_value": _num(v.p_value),
        "message": v.message,
        "confirmed": v.confirmed,
        **(
            {
                "mirror": v.mirror,
                "mirror_baseline": _num(v.mirror_baseline),
                "mirror_candidate": _num(v.mirror_candidate),
            }
            if v.mirror
            else {}
        ),
    }


def verdict_from_dict(data: dict[str, Any]) -> Verdict:
    """The inverse of :func:`verdict_to_dict`."""
    return Verdict(
        key=key_from_dict(data["key"]),
        status=Status(data["status"]),
        baseline=_float(data["baseline"]),
        candidate=_float(data["candidate"]),
        ratio=_float(data["ratio"]),
        ci_low=_float(data.get("ci_low")),
        ci_high=_float(data.get("ci_high")),
        p_value=_float(data.get("p_value")),
        message=data.get("message", ""),
        confirmed=data.get("confirmed"),
        mirror=data.get("mirror", ""),
        mirror_baseline=_float(data.get("mirror_baseline")),
        mirror_candidate=_float(data.get("mirror_candidate")),
    )


def change_point_to_dict(c: ChangePoint) -> dict[str, Any]:
    """A change point as a JSON-ready dict."""
    return {
        "key": key_to_dict(c.key),
        "index": c.index,
        "run_id": c.run_id,
        "before": _num(c.before),
        "after": _num(c.after),
        "p_value": _num(c.p_value),
    }


def change_point_from_dict(data: dict[str, Any]) -> ChangePoint:
    """The inverse of :func:`change_point_to_dict`."""
    return ChangePoint(
        key=key_from_dict(data["key"]),
        index=int(data["index"]),
        run_id=data["run_id"],
        before=_float(data["before"]),
        after=_float(data["after"]),
        p_value=_float(data.get("p_value")),
    )

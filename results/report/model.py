"""The one report model: everything a renderer shows, computed from result rows.

:func:`build_report` is pure (no store, no clock): the terminal, Markdown, JSON and
HTML renderers all draw from the :class:`Report` it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from results.compare import ComparisonRow, compare, device_label, is_llm_row
from results.regression.types import Direction, SeriesHistory, SeriesKey, Status, Verdict
from results.serving import (
    ServingSweep,
    ServingVsInProcess,
    is_serving_row,
    side_by_side,
    sweeps,
)

Row = dict[str, Any]

SCHEMA = "edgefarm.report/1"

# Verdicts worth a reader's attention first.
STATUS_ORDER = {
    Status.REGRESSION: 0,
    Status.CHANGED: 1,
    Status.IMPROVEMENT: 2,
    Status.INSUFFICIENT: 3,
    Status.UNCHANGED: 4,
}


@dataclass(frozen=True)
class Fidelity:
    """Which accuracy figure a Pareto chart's y axis shows."""

    key: str  # key in the row's ``accuracy`` dict
    label: str  # axis label, with its good direction
    direction: Direction


CLASSIFIER_FIDELITY = (
    Fidelity("agreement", "agreement with full precision (higher is better)", Direction.HIGHER),
    Fidelity("top1", "top-1 accuracy (higher is better)", Direction.HIGHER),
)
LLM_FIDELITY = (
    Fidelity("kld_mean", "mean KLD vs full precision (lower is better)", Direction.LOWER),
)
CLASSIFIER_X = "p50 latency"
LLM_X = "p50 generation latency"


@dataclass(frozen=True)
class ParetoPoint:
    """One framework x scheme on a chart: latency, fidelity, memory."""

    backend: str
    scheme: str
    latency_ms: float
    fidelity: float
    memory_bytes: int | None
    optimal: bool  # on the Pareto front: no other point is as fast and as faithful

    @property
    def label(self) -> str:
        """``backend/scheme``."""
        return f"{self.backend}/{self.scheme}"


@dataclass(frozen=True)
class ParetoChart:
    """Latency vs fidelity for one model on one device; marker area is peak memory."""

    device: str
    model: str
    is_llm: bool
    x_label: str  # what the x axis shows, without its unit (renderers add it)
    fidelity: Fidelity
    points: tuple[ParetoPoint, ...]
    unplotted: tuple[str, ...] = ()  # "backend/scheme: why it is not on the chart"

    @property
    def front(self) -> tuple[ParetoPoint, ...]:
        """The Pareto-optimal points, fastest first."""
        return tuple(sorted((p for p in self.points if p.optimal), key=lambda p: p.latency_ms))


@dataclass(frozen=True)
class Failure:
    """A row that produced no usable measurement."""

    device: str
    model: str
    backend: str
    scheme: str
    reason: str


@dataclass(frozen=True)
class Summary:
    """Counts over the report's rows."""

    rows: int
    ok: int
    failed: int
    invalid: int
    devices: tuple[str, ...]
    models: tuple[str, ...]


@dataclass(frozen=True)
class HistoryPanel:
    """One series' nightly history with the night's verdict on it, if any."""

    history: SeriesHistory
    verdict: Verdict | None = None


@dataclass(frozen=True)
class Report:
    """What every renderer shows."""

    title: str
    summary: Summary
    pareto: tuple[ParetoChart, ...]
    comparison: tuple[ComparisonRow, ...]
    verdicts: tuple[Verdict, ...]
    histories: tuple[HistoryPanel, ...]
    failures: tuple[Failure, ...]
    notes: tuple[str, ...]
    # Serving measurements: each configuration's load sweep, and served vs in-process.
    serving: tuple[ServingSweep, ...] = ()
    serving_vs_in_process: tuple[ServingVsInProcess, ...] = ()
    schema: str = SCHEMA

    def unit_of(self, key: SeriesKey) -> str:
        """The unit of a series, from its history ("" when the report has none)."""
        return next((p.history.unit for p in self.histories if p.history.key == key), "")


def failure_reason(row: Row) -> str:
    """Why a row is unusable, or "" when it is a valid measurement."""
    if not row.get("ok"):
        message = str(row.get("error_message") or "").strip().splitlines()
        kind = row.get("error_kind") or "error"
        return f"failed ({kind}): {message[0]}" if message else f"failed ({kind})"
    if row.get("valid") is False:
        return f"invalid measurement: {row.get('invalid_reason') or 'no reason recorded'}"
    return ""


def dominates(a: ParetoPoint, b: ParetoPoint, direction: Direction) -> bool:
    """True when ``a`` is at least as fast and as faithful as ``b``, and better in one."""
    if direction is Direction.LOWER:
        fid_ge, fid_gt = a.fidelity <= b.fidelity, a.fidelity < b.fidelity
    else:
        fid_ge, fid_gt = a.fidelity >= b.fidelity, a.fidelity > b.fidelity
    return a.latency_ms <= b.latency_ms and fid_ge and (a.latency_ms < b.latency_ms or fid_gt)


def pareto_front(points: Sequence[ParetoPoint], direction: Direction) -> list[ParetoPoint]:
    """``points`` with ``optimal`` set: True for those no other point dominates."""
    out = []
    for p in points:
        optimal = not any(dominates(q, p, direction) for q in points if q is not p)
        out.append(
            ParetoPoint(p.backend, p.scheme, p.latency_ms, p.fidelity, p.memory_bytes, optimal)
        )
    return out


def _fidelity_for(rows: Sequence[Row], llm: bool) -> Fidelity:
    """The first fidelity figure any of the rows has (agreement before top-1)."""
    choices = LLM_FIDELITY if llm else CLASSIFIER_FIDELITY
    for choice in choices:
        if any((r.get("accuracy") or {}).get(choice.key) is not None for r in rows):
            return choice
    return choices[0]


def _chart(device: str, model: str, rows: Sequence[Row]) -> ParetoChart:
    llm = any(is_llm_row(r) for r in rows)
    fidelity = _fidelity_for(rows, llm)
    points: list[ParetoPoint] = []
    unplotted: list[str] = []
    for row in rows:
        name = f"{row['backend']}/{row['scheme']}"
        reason = failure_reason(row)
        value = (row.get("accuracy") or {}).get(fidelity.key)
        latency = row.get("lat_p50_ms")
        if not reason and latency is None:
            reason = "no latency measured"
        if not reason and value is None:
            reason = f"no {fidelity.key} measured"
        if reason or latency is None or value is None:
            unplotted.append(f"{name}: {reason}")
            continue
        memory = row.get("peak_rss_bytes")
        points.append(
            ParetoPoint(
                row["backend"],
                row["scheme"],
                float(latency),
                float(value),
                int(memory) if memory else None,
                False,
            )
        )
    x_label = LLM_X if llm else CLASSIFIER_X
    return ParetoChart(
        device,
        model,
        llm,
        x_label,
        fidelity,
        tuple(pareto_front(points, fidelity.direction)),
        tuple(unplotted),
    )


def pareto_charts(rows: Iterable[Row]) -> list[ParetoChart]:
    """One chart per device and model, in the order the pairs first appear."""
    by: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by.setdefault((device_label(row), str(row["model"])), []).append(row)
    return [_chart(device, model, members) for (device, model), members in by.items()]


def _summary(rows: Sequence[Row]) -> Summary:
    failed = sum(1 for r in rows if not r.get("ok"))
    invalid = sum(1 for r in rows if r.get("ok") and r.get("valid") is False)
    return Summary(
        rows=len(rows),
        ok=len(rows) - failed,
        failed=failed,
        invalid=invalid,
        devices=tuple(dict.fromkeys(device_label(r) for r in rows)),
        models=tuple(dict.fromkeys(str(r["model"]) for r in rows)),
    )


def _panels(histories: Iterable[SeriesHistory], verdicts: Sequence[Verdict]) -> list[HistoryPanel]:
    by_key = {v.key: v for v in verdicts}
    panels = [HistoryPanel(h, by_key.get(h.key)) for h in histories]
    panels.sort(key=lambda p: STATUS_ORDER.get(p.verdict.status, 9) if p.verdict else 9)
    return panels


def build_report(
    title: str,
    rows: list[Row],
    verdicts: Sequence[Verdict] = (),
    histories: Sequence[SeriesHistory] = (),
    notes: Sequence[str] = (),
) -> Report:
    """The report over result rows, with nightly verdicts and histories when given."""
    failures = [
        Failure(device_label(r), str(r["model"]), r["backend"], r["scheme"], failure_reason(r))
        for r in rows
        if failure_reason(r)
    ]
    measured = [r for r in rows if not is_serving_row(r)]  # serving has its own section
    return Report(
        title=title,
        summary=_summary(rows),
        pareto=tuple(pareto_charts(measured)),
        comparison=tuple(compare(measured)) if measured else (),
        verdicts=tuple(
            sorted(verdicts, key=lambda v: (STATUS_ORDER.get(v.status, 9), v.key.label()))
        ),
        histories=tuple(_panels(histories, verdicts)),
        failures=tuple(failures),
        notes=tuple(notes),
        serving=tuple(sweeps(rows)),
        serving_vs_in_process=tuple(side_by_side(rows)),
    )

"""The report's two charts as inline SVG: a Pareto chart and a nightly history chart.

Marks carry classes a test (or a stylesheet) can find: ``circle.point`` (one per
configuration), ``path.front``; ``circle.night``, ``line.trials``, ``rect.band``,
``line.changepoint``, ``circle.regression``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from results.regression.types import ChangePoint, Direction, SeriesHistory, Status
from results.report.fmt import MIB, fmt_bytes, fmt_date, fmt_ms, fmt_num, fmt_ratio, fmt_value
from results.report.model import HistoryPanel, ParetoChart
from results.report.svg import Frame, Scale, auto_scale, axes, element, group, padded, svg, tooltip
from results.serving import ServingSweep

MAX_RADIUS = 18.0
MIN_RADIUS = 3.0
DEFAULT_RADIUS = 5.0


def _radius(memory: int | None, largest: int) -> float:
    """Marker radius with area proportional to memory (never below MIN_RADIUS)."""
    if not memory or largest <= 0:
        return DEFAULT_RADIUS
    return max(MIN_RADIUS, MAX_RADIUS * math.sqrt(memory / largest))


def pareto_svg(chart: ParetoChart) -> str:
    """Latency (x) vs fidelity (y, better up) with marker area proportional to memory."""
    frame = Frame(720, 420, right=36)
    points = chart.points
    # sub-millisecond latencies read better in microseconds
    per = 1000.0 if points and max(p.latency_ms for p in points) < 1 else 1.0
    unit = ("µs" if per > 1 else "ms") + ("/token" if chart.is_llm else "")
    xs = [p.latency_ms * per for p in points] or [0.0, 1.0]
    x_ms = auto_scale(xs, frame.x0, frame.x1, pad=0.12)

    def x(ms: float) -> float:
        return x_ms(ms * per)

    lo, hi = padded(*_span([p.fidelity for p in points] or [0.0, 1.0]), 0.15)
    up_is_better = chart.fidelity.direction is Direction.HIGHER
    # better is always up: a lower-is-better figure (KLD) grows downwards
    y = Scale(lo, hi, frame.y1, frame.y0) if up_is_better else Scale(lo, hi, frame.y0, frame.y1)
    largest = max((p.memory_bytes or 0 for p in points), default=0)
    x_label = f"{chart.x_label}, {unit} (lower is better)"
    y_label = chart.fidelity.label + (" ↑" if up_is_better else " ↓")
    body = [axes(frame, x_ms, y, x_label, y_label)]
    body.append(element("text", "better ↖", x=frame.x0 + 6, y=frame.y0 + 14, class_="hint"))
    front = chart.front
    if len(front) > 1:
        d = f"M{x(front[0].latency_ms):.1f},{y(front[0].fidelity):.1f}"
        for p in front[1:]:
            d += f" H{x(p.latency_ms):.1f} V{y(p.fidelity):.1f}"
        body.append(element("path", d=d, class_="front"))
    marks, labels = [], []
    # big markers first so small ones stay visible on top
    for p in sorted(points, key=lambda p: -(p.memory_bytes or 0)):
        cx, cy = x(p.latency_ms), y(p.fidelity)
        tip = (
            f"{p.label}: {fmt_ms(p.latency_ms)}, {chart.fidelity.key} "
            f"{fmt_num(p.fidelity)}, peak memory {fmt_bytes(p.memory_bytes)}"
            + (" (Pareto-optimal)" if p.optimal else "")
        )
        marks.append(
            element(
                "circle",
                inner=tooltip(tip),
                cx=cx,
                cy=cy,
                r=_radius(p.memory_bytes, largest),
                class_="point optimal" if p.optimal else "point",
            )
        )
        if p.optimal:  # labelled above the marker, towards the middle of the chart
            right = cx < (frame.x0 + frame.x1) / 2
            r = _radius(p.memory_bytes, largest)
            labels.append(
                element(
                    "text",
                    p.label,
                    x=cx + (1 if right else -1) * r * 0.6,
                    y=cy - r - 4,
                    class_="point-label",
                    text_anchor="start" if right else "end",
                )
            )
    body += [group(marks, class_="marks"), group(labels, class_="labels")]
    if largest:
        body.append(
            element(
                "text",
                f"marker area ∝ peak memory (largest {fmt_bytes(largest)})",
                x=frame.x1,
                y=frame.y0 - 10,
                class_="caption",
                text_anchor="end",
            )
        )
    title = f"{chart.model} on {chart.device}: latency vs {chart.fidelity.key}"
    return svg(frame, body, title, "chart pareto")


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def _display(history: SeriesHistory) -> tuple[float, str]:
    """Divide values by this and show this unit (bytes are shown in MiB)."""
    if history.unit in ("bytes", "B"):
        return float(MIB), "MiB"
    if history.unit == "fraction":
        return 0.01, "%"
    return 1.0, history.unit


def _worse(cp: ChangePoint, direction: Direction) -> bool:
    return cp.after > cp.before if direction is Direction.LOWER else cp.after < cp.before


def history_svg(panel: HistoryPanel) -> str:
    """Night values with trial ranges, the baseline band, change points and regressions."""
    history, verdict = panel.history, panel.verdict
    frame = Frame(720, 320, top=36)
    scale_by, unit = _display(history)
    samples = history.samples
    values = [s.value / scale_by for s in samples]
    extent = list(values)
    for s in samples:
        extent += [t / scale_by for t in s.trials]
    if history.baseline_band:
        extent += [b / scale_by for b in history.baseline_band]
    lo, hi = padded(*_span(extent or [0.0, 1.0]), 0.12)
    y = Scale(lo, hi, frame.y1, frame.y0)
    n = max(len(samples), 1)
    x = Scale(-0.5, n - 0.5, frame.x0, frame.x1)
    better = "lower" if history.direction is Direction.LOWER else "higher"
    every = max(1, math.ceil(len(samples) / 8))  # about 8 date labels at most
    dates = [(float(i), fmt_date(s.at)) for i, s in enumerate(samples) if i % every == 0]
    y_label = f"{history.key.metric}, {unit} ({better} is better)"
    body = [axes(frame, x, y, "night (UTC date)", y_label, x_ticks=dates)]
    if history.baseline_band:
        b_lo, b_hi = sorted(b / scale_by for b in history.baseline_band)
        body.append(
            element(
                "rect",
                inner=tooltip(
                    f"baseline band {fmt_value(history.baseline_band[0], history.unit)}"
                    f" .. {fmt_value(history.baseline_band[1], history.unit)}"
                ),
                x=frame.x0,
                y=y(b_hi),
                width=frame.x1 - frame.x0,
                height=max(y(b_lo) - y(b_hi), 1.0),
                class_="band",
            )
        )
        body.append(
            element(
                "text",
                "baseline",
                x=frame.x1 - 4,
                y=y(b_lo) - 4,
                class_="band-label",
                text_anchor="end",
            )
        )
    for cp in history.change_points:
        px = x(cp.index - 0.5)
        kind = "changepoint worse" if _worse(cp, history.direction) else "changepoint"
        body.append(
            element(
                "line",
                inner=tooltip(f"change point at {cp.run_id}: {fmt_ratio(cp.ratio)}"),
                x1=px,
                x2=px,
                y1=frame.y0,
                y2=frame.y1,
                class_=kind,
            )
        )
        body.append(
            element("text", fmt_ratio(cp.ratio), x=px + 3, y=frame.y0 + 12, class_="cp-label")
        )
    ranges, nights = [], []
    for i, s in enumerate(samples):
        if len(s.trials) > 1:
            ranges.append(
                element(
                    "line",
                    x1=x(i),
                    x2=x(i),
                    y1=y(min(s.trials) / scale_by),
                    y2=y(max(s.trials) / scale_by),
                    class_="trials",
                )
            )
        nights.append(
            element(
                "circle",
                inner=tooltip(f"{fmt_date(s.at)} {s.run_id}: {fmt_value(s.value, history.unit)}"),
                cx=x(i),
                cy=y(s.value / scale_by),
                r=3.5,
                class_="night",
            )
        )
    if len(samples) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        body.append(element("path", d=d, class_="series-line"))
    body += [group(ranges, class_="ranges"), group(nights, class_="nights")]
    if verdict is not None and verdict.status is Status.REGRESSION and samples:
        last = len(samples) - 1
        body.append(
            element(
                "circle",
                inner=tooltip(verdict.message or f"regression {fmt_ratio(verdict.ratio)}"),
                cx=x(last),
                cy=y(values[last]),
                r=8,
                class_="regression",
            )
        )
    status = f" — {verdict.status.value} {fmt_ratio(verdict.ratio)}" if verdict else ""
    body.append(
        element("text", history.key.label() + status, x=frame.x0, y=18, class_="chart-title")
    )
    return svg(frame, body, history.key.label(), "chart history")


SWEEP_COLOURS = ("#2f6fdf", "#d9480f", "#2f9e44", "#9c36b5", "#e8890c", "#0c8599")


def serving_svg(device: str, model: str, sweeps: Sequence[ServingSweep]) -> str:
    """Latency vs throughput of each configuration's load sweep: output tokens/s (x)
    against p50 end-to-end request latency (y), one line per configuration, each point
    a load level (``circle.level``, labelled ``c=4`` / ``r=2/s ...``)."""
    frame = Frame(720, 400, right=150)
    points = [
        (s, p)
        for s in sweeps
        for p in s.points
        if p.output_tok_per_s is not None and p.e2e_p50_ms is not None
    ]
    xs = [p.output_tok_per_s for _, p in points if p.output_tok_per_s is not None] or [0.0, 1.0]
    ys = [p.e2e_p50_ms for _, p in points if p.e2e_p50_ms is not None] or [0.0, 1.0]
    x = Scale(*padded(0.0, max(xs), 0.1), frame.x0, frame.x1)
    y = auto_scale(ys, frame.y1, frame.y0)
    body = [
        axes(
            frame,
            x,
            y,
            "output tokens/s (higher is better)",
            "p50 end-to-end latency, ms (lower is better)",
        )
    ]
    for index, sweep in enumerate(sweeps):
        colour = SWEEP_COLOURS[index % len(SWEEP_COLOURS)]
        mine = [p for s, p in points if s is sweep]
        coords = [(x(p.output_tok_per_s or 0.0), y(p.e2e_p50_ms or 0.0)) for p in mine]
        if len(coords) > 1:
            d = "M" + " L".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
            body.append(element("path", d=d, class_="sweep", stroke=colour))
        for p, (cx, cy) in zip(mine, coords, strict=True):
            tip = (
                f"{sweep.label} {p.label}: {fmt_num(p.output_tok_per_s, 3)} tok/s, "
                f"E2E p50 {fmt_ms(p.e2e_p50_ms)}, TTFT p50 {fmt_ms(p.ttft_p50_ms)}, "
                f"TPOT p50 {fmt_ms(p.tpot_p50_ms)}, {p.failed}/{p.requests} failed"
            )
            body.append(
                element(
                    "circle", inner=tooltip(tip), cx=cx, cy=cy, r=4, class_="level", fill=colour
                )
            )
            body.append(element("text", p.label, x=cx + 6, y=cy - 6, class_="point-label"))
        body.append(
            element(
                "text",
                sweep.label,
                x=frame.x1 + 10,
                y=frame.y0 + 14 + 16 * index,
                class_="legend",
                fill=colour,
            )
        )
    title = f"{model} on {device}: latency vs throughput under load"
    return svg(frame, body, title, "chart serving")

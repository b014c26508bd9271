"""A few inline-SVG plotting helpers: scales, nice ticks, escaped elements, axes.

Everything returns text; no fonts, images or scripts are referenced, so a chart is
self-contained wherever it is pasted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

Number = float | int


def element(tag: str, text: str | None = None, *, inner: str | None = None, **attrs: object) -> str:
    """``<tag a="v">text</tag>`` with attributes and text escaped; ``class_`` -> ``class``.

    ``inner`` is already-rendered markup placed after the text. Underscores in
    attribute names become dashes (``text_anchor`` -> ``text-anchor``); attributes
    whose value is None are left out.
    """
    parts = [tag]
    for name, value in attrs.items():
        if value is None:
            continue
        key = "class" if name == "class_" else name.rstrip("_").replace("_", "-")
        if isinstance(value, float):
            value = f"{value:.2f}".rstrip("0").rstrip(".")
        parts.append(f'{key}="{escape(str(value), quote=True)}"')
    opening = " ".join(parts)
    if text is None and inner is None:
        return f"<{opening}/>"
    return f"<{opening}>{escape(text or '', quote=False)}{inner or ''}</{tag}>"


def group(children: list[str], class_: str) -> str:
    """``<g class=...>`` around already-rendered children."""
    return element("g", inner="".join(children), class_=class_)


def tooltip(text: str) -> str:
    """A ``<title>`` child: the browser shows it when hovering the parent shape."""
    return element("title", text)


def nice_step(span: float, count: int) -> float:
    """A 1-2-5 step giving about ``count`` intervals over ``span``."""
    raw = span / max(count, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def padded(lo: float, hi: float, fraction: float = 0.08) -> tuple[float, float]:
    """``[lo, hi]`` widened by ``fraction`` each side (and made non-empty)."""
    if hi < lo:
        lo, hi = hi, lo
    span = hi - lo
    if span == 0:
        span = abs(hi) * 0.1 or 1.0
        return lo - span, hi + span
    return lo - span * fraction, hi + span * fraction


@dataclass(frozen=True)
class Scale:
    """A linear or log10 map from data ``domain`` to pixel ``range``."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, value: Number) -> float:
        """The pixel position of ``value``."""
        lo, hi = self._t(self.lo), self._t(self.hi)
        v = self._t(max(float(value), self.lo) if self.log else float(value))
        frac = 0.5 if hi == lo else (v - lo) / (hi - lo)
        return self.start + frac * (self.end - self.start)

    def ticks(self, count: int = 5) -> list[float]:
        """Round values inside the domain to label the axis with."""
        lo, hi = min(self.lo, self.hi), max(self.lo, self.hi)
        if self.log:
            out = []
            for exp in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
                for m in (1, 2, 5):
                    v = m * 10.0**exp
                    if lo <= v <= hi:
                        out.append(v)
            return out
        step = nice_step(hi - lo, count)
        first = math.ceil(lo / step) * step
        return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def auto_scale(values: list[float], start: float, end: float, pad: float = 0.08) -> Scale:
    """A scale fitting ``values``: log10 when they are positive and span over 20x."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 20:
        return Scale(lo / 1.3, hi * 1.3, start, end, log=True)
    lo, hi = padded(lo, hi, pad)
    if min(values) >= 0 > lo:
        lo = 0.0
    return Scale(lo, hi, start, end)


def tick_label(value: float) -> str:
    """A compact axis label: ``0.05``, ``1.5``, ``120``, ``1.2k``."""
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Frame:
    """The plot area inside an SVG of ``width`` x ``height``."""

    width: int
    height: int
    left: int = 72
    right: int = 24
    top: int = 28
    bottom: int = 56

    @property
    def x0(self) -> float:
        """Left edge of the plot area."""
        return float(self.left)

    @property
    def x1(self) -> float:
        """Right edge of the plot area."""
        return float(self.width - self.right)

    @property
    def y0(self) -> float:
        """Top edge of the plot area."""
        return float(self.top)

    @property
    def y1(self) -> float:
        """Bottom edge of the plot area."""
        return float(self.height - self.bottom)


def axes(
    frame: Frame,
    x: Scale,
    y: Scale,
    x_label: str,
    y_label: str,
    x_ticks: list[tuple[float, str]] | None = None,
) -> str:
    """Grid lines, ticks, tick labels and axis titles for a plot area.

    ``x_ticks`` (value, label) replaces the x scale's own round ticks.
    """
    out = [
        element(
            "rect",
            x=frame.x0,
            y=frame.y0,
            width=frame.x1 - frame.x0,
            height=frame.y1 - frame.y0,
            class_="plot-area",
        )
    ]
    for value, label in x_ticks if x_ticks is not None else [(v, tick_label(v)) for v in x.ticks()]:
        px = x(value)
        out.append(element("line", x1=px, x2=px, y1=frame.y0, y2=frame.y1, class_="grid"))
        out.append(
            element("text", label, x=px, y=frame.y1 + 16, class_="tick", text_anchor="middle")
        )
    for value in y.ticks():
        py = y(value)
        out.append(element("line", x1=frame.x0, x2=frame.x1, y1=py, y2=py, class_="grid"))
        out.append(
            element(
                "text",
                tick_label(value),
                x=frame.x0 - 6,
                y=py + 4,
                class_="tick",
                text_anchor="end",
            )
        )
    out.append(
        element(
            "text",
            x_label,
            x=(frame.x0 + frame.x1) / 2,
            y=frame.height - 14,
            class_="axis-label",
            text_anchor="middle",
        )
    )
    cy = (frame.y0 + frame.y1) / 2
    out.append(
        element(
            "text",
            y_label,
            x=16,
            y=cy,
            class_="axis-label",
            text_anchor="middle",
            transform=f"rotate(-90 16 {cy:.1f})",
        )
    )
    return group(out, class_="axes")


def svg(frame: Frame, body: list[str], title: str, class_: str) -> str:
    """The ``<svg>`` element: accessible title, fixed viewBox, scalable width."""
    return element(
        "svg",
        inner=tooltip(title) + "".join(body),
        viewBox=f"0 0 {frame.width} {frame.height}",
        width=frame.width,
        height=frame.height,
        role="img",
        class_=class_,
    )

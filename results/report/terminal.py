"""The report as a plain-text terminal summary (rich tables, no colour codes)."""

from __future__ import annotations

import io

from results.compare import COLUMNS, INTERVAL_NOTE, cells, groups
from results.regression.metrics import METRICS
from results.regression.types import Status
from results.report.fmt import fmt_bytes, fmt_ms, fmt_num, fmt_ratio, fmt_value
from results.report.model import Report

LEFT = {"framework", "quantization", "fidelity"}


def render_terminal(report: Report, width: int = 140) -> str:
    """A summary for a terminal: counts, Pareto fronts, verdicts, comparison, failures."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False, emoji=False)
    s = report.summary

    def say(text: str = "") -> None:
        console.print(text, markup=False, soft_wrap=True)

    say(report.title)
    say(
        f"{s.rows} results: {s.ok} ok, {s.failed} failed, {s.invalid} invalid; "
        f"models: {', '.join(s.models) or '-'}; devices: {', '.join(s.devices) or '-'}"
    )
    for note in report.notes:
        say(f"note: {note}")
    if report.verdicts:
        counts = {st: sum(1 for v in report.verdicts if v.status is st) for st in Status}
        say()
        say("nightly: " + ", ".join(f"{n} {st.value}" for st, n in counts.items() if n))
        for v in report.verdicts:
            if v.status in (Status.REGRESSION, Status.CHANGED, Status.IMPROVEMENT):
                unit = report.unit_of(v.key)
                state = (
                    "" if v.confirmed is None else " (confirmed)" if v.confirmed else " (refuted)"
                )
                mirror = ""
                if v.mirror:
                    mirror_unit = METRICS[v.mirror].unit if v.mirror in METRICS else ""
                    mirror = (
                        f"; {v.mirror} {fmt_value(v.mirror_baseline, mirror_unit)} -> "
                        f"{fmt_value(v.mirror_candidate, mirror_unit)} "
                        f"({fmt_ratio(v.mirror_ratio)})"
                    )
                say(
                    f"  {v.status.value.upper()}{state}: {v.label()} "
                    f"{fmt_value(v.baseline, unit)} -> {fmt_value(v.candidate, unit)} "
                    f"({fmt_ratio(v.ratio)}){mirror}"
                )
    for chart in report.pareto:
        say()
        unit = "/token" if chart.is_llm else ""
        say(f"{chart.model} on {chart.device}: Pareto front (latency vs {chart.fidelity.key})")
        for p in chart.front:
            say(
                f"  {p.label:<28} {fmt_ms(p.latency_ms) + unit:>16}  "
                f"{chart.fidelity.key} {fmt_num(p.fidelity):<8} memory {fmt_bytes(p.memory_bytes)}"
            )
        dominated = [p.label for p in chart.points if not p.optimal]
        if dominated:
            say(f"  dominated: {', '.join(dominated)}")
        for u in chart.unplotted:
            say(f"  not compared: {u}")
    for (device, model), members in groups(list(report.comparison)).items():
        say()
        table = Table(title=f"{model} on {device}", title_justify="left")
        for name in COLUMNS:
            table.add_column(name, justify="left" if name in LEFT else "right")
        for r in members:
            table.add_row(*cells(r))
        console.print(table)
    if report.comparison:
        say(INTERVAL_NOTE)
    if report.failures:
        say()
        say("failed or invalid:")
        for f in report.failures:
            say(f"  {f.model} {f.backend}/{f.scheme} on {f.device}: {f.reason}")
    return out.getvalue()

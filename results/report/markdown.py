"""The report as Markdown, for a pull request or a chat message."""

from __future__ import annotations

from results.compare import COLUMNS, INTERVAL_NOTE, cells, groups
from results.regression.types import Verdict
from results.report.fmt import (
    fmt_bytes,
    fmt_interval,
    fmt_ms,
    fmt_num,
    verdict_figures,
)
from results.report.model import ParetoChart, Report


def md(text: object) -> str:
    """Text safe inside a Markdown table cell: no raw HTML, no column breaks."""
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
        .replace("\n", " ")
    )


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, cells escaped."""
    out = ["| " + " | ".join(md(h) for h in head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _pareto(chart: ParetoChart) -> list[str]:
    unit = "/token" if chart.is_llm else ""
    rows = [
        [
            p.label,
            fmt_ms(p.latency_ms) + unit,
            fmt_num(p.fidelity),
            fmt_bytes(p.memory_bytes),
            "yes" if p.optimal else "",
        ]
        for p in sorted(chart.points, key=lambda p: p.latency_ms)
    ]
    head = [
        "configuration",
        "latency p50",
        f"{chart.fidelity.key}",
        "peak memory",
        "Pareto-optimal",
    ]
    out = [f"### {md(chart.model)} on {md(chart.device)}", "", *table(head, rows)]
    out += [f"- not on the chart: {md(u)}" for u in chart.unplotted]
    return [*out, ""] if chart.unplotted else out


def _verdicts(report: Report, verdicts: tuple[Verdict, ...]) -> list[str]:
    rows = []
    for v in verdicts:
        unit = report.unit_of(v.key)
        rows.append(
            [
                v.label(),
                v.status.value,
                *verdict_figures(v, unit),
                fmt_interval(v.ci_low, v.ci_high),
                fmt_num(v.p_value, 3),
                "" if v.confirmed is None else ("yes" if v.confirmed else "no"),
            ]
        )
    head = ["series", "status", "baseline", "candidate", "change", "95% CI", "p", "confirmed"]
    return table(head, rows)


def render_markdown(report: Report) -> str:
    """The whole report as Markdown."""
    s = report.summary
    out = [
        f"# {md(report.title)}",
        "",
        f"{s.rows} results ({s.ok} ok, {s.failed} failed, {s.invalid} invalid) for "
        f"{len(s.models)} model(s) on {len(s.devices)} device(s): {md(', '.join(s.devices))}.",
        "",
    ]
    if report.notes:
        out += [*(f"- {md(n)}" for n in report.notes), ""]
    if report.verdicts:
        out += ["## Nightly regressions", "", *_verdicts(report, report.verdicts)]
    if report.pareto:
        out += ["## Latency vs fidelity", ""]
        for chart in report.pareto:
            out += _pareto(chart)
    if report.comparison:
        out += ["## Framework comparison", ""]
        for (device, model), members in groups(list(report.comparison)).items():
            out += [f"### {md(model)} on {md(device)}", ""]
            out += table(list(COLUMNS), [cells(r) for r in members])
        out += [
            "Speed-up, memory and size reductions are against the same framework's "
            "full-precision run; fidelity is against the shared full-precision reference. "
            + INTERVAL_NOTE,
            "",
        ]
    if report.failures:
        out += ["## Failed or invalid runs", ""]
        out += table(
            ["device", "model", "configuration", "reason"],
            [[f.device, f.model, f"{f.backend}/{f.scheme}", f.reason] for f in report.failures],
        )
    return "\n".join(out).rstrip("\n") + "\n"

"""The report as one self-contained HTML page: inline CSS and SVG, no scripts, no URLs.

A Content-Security-Policy forbids every external load, so a page that tried one would
fail visibly in a browser instead of silently depending on the network.
"""

from __future__ import annotations

from html import escape

from results.compare import COLUMNS, INTERVAL_NOTE, cells, groups
from results.report.charts import history_svg, pareto_svg, serving_svg
from results.report.fmt import (
    fmt_bytes,
    fmt_interval,
    fmt_ms,
    fmt_num,
    verdict_figures,
)
from results.report.model import ParetoChart, Report
from results.serving import ServingSweep

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1d2330; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccd; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d5d9e2; padding: 3px 8px; text-align: right; }
th { background: #f0f2f7; } td.l, th.l { text-align: left; }
tr.regression td { background: #fde8e8; } tr.improvement td { background: #e6f6ea; }
figure { margin: 8px 0 20px; } figcaption { color: #555; font-size: 12px; }
svg.chart { max-width: 100%; height: auto; background: #fff; }
svg .plot-area { fill: #fafbfd; stroke: #9aa3b5; }
svg .grid { stroke: #e3e6ee; stroke-width: 1; }
svg .tick { font-size: 11px; fill: #555; }
svg .axis-label { font-size: 12px; fill: #222; }
svg .hint, svg .caption { font-size: 11px; fill: #777; }
svg .chart-title { font-size: 13px; fill: #222; font-weight: 600; }
svg .point { fill: #9aa3b5; fill-opacity: 0.55; stroke: #5b6475; stroke-width: 1; }
svg .point.optimal { fill: #2f6fdf; fill-opacity: 0.65; stroke: #17408a; stroke-width: 1.5; }
svg .point-label { font-size: 11px; fill: #17408a; }
svg .front { fill: none; stroke: #2f6fdf; stroke-width: 1.5; stroke-dasharray: 5 3; }
svg .band { fill: #2f9e44; fill-opacity: 0.14; stroke: #2f9e44; stroke-opacity: 0.4; }
svg .band-label { font-size: 11px; fill: #2b7a3b; }
svg .series-line { fill: none; stroke: #2f6fdf; stroke-width: 1.5; }
svg .trials { stroke: #7d8aa5; stroke-width: 3; stroke-opacity: 0.6; }
svg .night { fill: #2f6fdf; stroke: #fff; stroke-width: 1; }
svg .changepoint { stroke: #e8890c; stroke-width: 1.5; stroke-dasharray: 4 3; }
svg .changepoint.worse { stroke: #d9480f; }
svg .cp-label { font-size: 11px; fill: #b35c00; }
svg .regression { fill: none; stroke: #d6336c; stroke-width: 2.5; }
svg .sweep { fill: none; stroke-width: 1.8; }
svg .level { stroke: #fff; stroke-width: 1; }
svg .legend { font-size: 12px; }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _table(
    head: list[str], rows: list[list[str]], left: int = 1, classes: list[str] | None = None
) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text."""

    def cell(tag: str, i: int, value: str) -> str:
        css = ' class="l"' if i < left else ""
        return f"<{tag}{css}>{_e(value)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for n, row in enumerate(rows):
        css = f' class="{_e(classes[n])}"' if classes and classes[n] else ""
        out.append(f"<tr{css}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _pareto_section(chart: ParetoChart) -> str:
    rows = [
        [
            p.label,
            fmt_ms(p.latency_ms) + ("/token" if chart.is_llm else ""),
            fmt_num(p.fidelity),
            fmt_bytes(p.memory_bytes),
            "yes" if p.optimal else "",
        ]
        for p in sorted(chart.points, key=lambda p: p.latency_ms)
    ]
    head = ["configuration", "latency p50", chart.fidelity.key, "peak memory", "Pareto-optimal"]
    parts = [f"<h3>{_e(chart.model)}</h3>"]
    if chart.points:
        parts.append(
            f"<figure>{pareto_svg(chart)}<figcaption>Pareto-optimal configurations are "
            "blue and labelled; marker area is proportional to peak memory.</figcaption></figure>"
        )
    parts.append(_table(head, rows))
    if chart.unplotted:
        items = "".join(f"<li>{_e(u)}</li>" for u in chart.unplotted)
        parts.append(f"<p>Not on the chart:</p><ul>{items}</ul>")
    return "\n".join(parts)


def _verdict_rows(report: Report) -> tuple[list[list[str]], list[str]]:
    verdicts = report.verdicts
    rows = [
        [
            v.label(),
            v.status.value,
            *verdict_figures(v, report.unit_of(v.key)),
            fmt_interval(v.ci_low, v.ci_high),
            fmt_num(v.p_value, 3),
            "" if v.confirmed is None else ("yes" if v.confirmed else "no"),
            v.message,
        ]
        for v in verdicts
    ]
    return rows, [v.status.value for v in verdicts]


SERVING_HEAD = [
    "configuration", "level", "requests", "failed", "TTFT p50", "TTFT p99", "TPOT p50",
    "ITL p99", "E2E p50", "E2E p99", "req/s", "out tok/s", "goodput/s", "the server's own",
]  # fmt: skip


def _serving_section(report: Report) -> str:
    """Per device and model: the latency-vs-throughput chart of every sweep and a table
    of its levels; then served vs in-process decode speed."""
    parts = ['<h2 id="serving">Serving: latency vs throughput</h2>']
    by: dict[tuple[str, str], list[ServingSweep]] = {}
    for sweep in report.serving:
        by.setdefault((sweep.device, sweep.model), []).append(sweep)
    for (device, model), members in by.items():
        parts.append(f"<h3>{_e(model)} on {_e(device)}</h3>")
        parts.append(
            f"<figure>{serving_svg(device, model, members)}<figcaption>Each line is one "
            "configuration's sweep; each point a load level (concurrency c or request "
            "rate r).</figcaption></figure>"
        )
        rows = [
            [
                f"{s.label} (start {fmt_num(s.startup_s, 3)} s)",
                p.label,
                str(p.requests),
                str(p.failed),
                *(fmt_ms(v) for v in (p.ttft_p50_ms, p.ttft_p99_ms, p.tpot_p50_ms)),
                *(fmt_ms(v) for v in (p.itl_p99_ms, p.e2e_p50_ms, p.e2e_p99_ms)),
                *(fmt_num(v, 3) for v in (p.request_per_s, p.output_tok_per_s, p.goodput_per_s)),
                ", ".join(f"{k} {fmt_num(v, 3)}" for k, v in sorted(p.server.items())),
            ]
            for s in members
            for p in s.points
        ]
        parts.append(_table(SERVING_HEAD, rows, left=2))
        slos = sorted({p.slo for s in members for p in s.points})
        parts.append(f"<p>Goodput: requests per second that met {_e('; '.join(slos))}.</p>")
    if report.serving_vs_in_process:
        parts.append("<h3>Served vs in-process (same artifact, same device)</h3>")
        head = ["model", "scheme", "device", "in-process", "decode tok/s", "TTFT"]
        head += ["server", "level", "tok/s (1/TPOT)", "TTFT p50", "served / in-process"]
        head += ["top-1 in-process", "top-1 served"]
        rows = [
            [
                v.model,
                v.scheme,
                v.device,
                v.in_process,
                fmt_num(v.in_process_tok_per_s, 3),
                fmt_ms(v.in_process_ttft_ms),
                v.server,
                v.first_level,
                fmt_num(v.served_tok_per_s, 3),
                fmt_ms(v.served_ttft_ms),
                fmt_num(v.speed_ratio, 2),
                fmt_num(v.in_process_top1),
                fmt_num(v.served_top1),
            ]
            for v in report.serving_vs_in_process
        ]
        parts.append(_table(head, rows, left=4))
        parts.append(
            "<p>In-process: one decode step of the runtime in the measuring process; "
            "served: the time per output token of single-stream requests through the "
            "server's HTTP API (tokenization, chat template, sampling and streaming "
            "included), and its time to first token. Top-1: agreement of the most likely "
            "next token with the full-precision reference, in-process over every scored "
            "position, served from the server's prompt log-probabilities (the same "
            "artifact should agree; a server serving another model does not).</p>"
        )
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """The whole report as a standalone HTML document."""
    s = report.summary
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>",
        f"<p>{s.rows} results ({s.ok} ok, {s.failed} failed, {s.invalid} invalid) for "
        f"{len(s.models)} model(s) on {len(s.devices)} device(s): {_e(', '.join(s.devices))}.</p>",
    ]
    if report.notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    if report.verdicts or report.histories:
        parts.append('<h2 id="nightly">Nightly regressions</h2>')
        if report.verdicts:
            rows, classes = _verdict_rows(report)
            head = ["series", "status", "baseline", "candidate", "change", "95% CI", "p"]
            head += ["confirmed", "note"]
            parts.append(_table(head, rows, left=2, classes=classes))
        for panel in report.histories:
            parts.append(
                f"<figure>{history_svg(panel)}<figcaption>Dots: night values; bars: "
                "trial range; shaded: baseline band; dashed: change points."
                "</figcaption></figure>"
            )
    device = None
    for chart in report.pareto:
        if chart.device != device:
            device = chart.device
            parts.append(f"<h2>Latency vs fidelity on {_e(device)}</h2>")
        parts.append(_pareto_section(chart))
    if report.comparison:
        parts.append('<h2 id="comparison">Framework comparison</h2>')
        for (dev, model), members in groups(list(report.comparison)).items():
            parts.append(f"<h3>{_e(model)} on {_e(dev)}</h3>")
            parts.append(_table(list(COLUMNS), [cells(r) for r in members], left=2))
        parts.append(
            "<p>Speed-up, memory and size reductions are against the same framework's "
            "full-precision run; fidelity is against the shared full-precision reference. "
            f"{_e(INTERVAL_NOTE)}</p>"
        )
    if report.serving:
        parts.append(_serving_section(report))
    if report.failures:
        parts.append('<h2 id="failures">Failed or invalid runs</h2>')
        rows = [[f.device, f.model, f"{f.backend}/{f.scheme}", f.reason] for f in report.failures]
        parts.append(_table(["device", "model", "configuration", "reason"], rows, left=4))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

"""Reports over result rows: one model (:func:`build_report`), four renderings (:func:`render`).

``render(build_report(title, rows, verdicts, histories), "html")`` is the single path
every report command takes.
"""

from __future__ import annotations

from results.report.model import Report, build_report

FORMATS = ("terminal", "markdown", "json", "html")


def render(report: Report, fmt: str) -> str:
    """The report rendered as ``terminal``, ``markdown``, ``json`` or ``html`` text."""
    if fmt == "terminal":
        from results.report.terminal import render_terminal

        return render_terminal(report)
    if fmt == "markdown":
        from results.report.markdown import render_markdown

        return render_markdown(report)
    if fmt == "json":
        from results.report.json_out import render_json

        return render_json(report)
    if fmt == "html":
        from results.report.html import render_html

        return render_html(report)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "Report", "build_report", "render"]

"""``edgefarm report``: reports over stored results."""

from __future__ import annotations

import click

from edgefarm.cli.options import home_option, open_store, store_option
from edgefarm.errors import UsageError


@click.group()
def report() -> None:
    """Reports over stored results."""


@report.command()
@click.option("--campaign", required=True, help="Campaign id (or unique prefix).")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "markdown"]), default="table", show_default=True
)
@store_option
@home_option
def compare(campaign: str, fmt: str, store_url: str | None, home: str | None) -> None:
    """Per device: each framework's quantizations against its own full-precision run —
    memory, speed, speed-up, memory and size reduction, fidelity — from measured rows."""
    from results.compare import COLUMNS, cells, groups, to_markdown
    from results.compare import compare as build

    with open_store(store_url, home) as store:
        record = store.get_campaign(campaign)
        if record is None:
            raise UsageError(f"no campaign '{campaign}' in {store.url}")
        results = store.results_for_campaign(record.campaign_id)
        rows = build(results, store.logit_checks(r["artifact_sha256"] for r in results))
    if not rows:
        raise UsageError(f"campaign {record.campaign_id} has no results yet")
    if fmt == "markdown":
        click.echo(to_markdown(rows), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 200)
    for (device, model), members in groups(rows).items():
        table = Table(title=f"{model} on {device}")
        for name in COLUMNS:
            table.add_column(
                name,
                justify="left" if name in {"framework", "quantization", "fidelity"} else "right",
            )
        for r in members:
            table.add_row(*cells(r))
        console.print(table)
    console.print(
        "speed-up, memory and size reductions: against the same framework's "
        "full-precision run; fidelity: against the shared reference"
    )


@report.command()
@click.option("--campaign", required=True, help="Campaign id (or unique prefix).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["terminal", "markdown", "json", "html"]),
    default="terminal",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to this file instead of standard output.",
)
@store_option
@home_option
def campaign(
    campaign: str, fmt: str, output: str | None, store_url: str | None, home: str | None
) -> None:
    """One campaign's report: Pareto charts (latency vs fidelity, memory as marker size)
    per device, the framework comparison and failures, as text, Markdown, JSON or a
    self-contained HTML page."""
    from pathlib import Path

    from results.regression.collect import pool_blocks
    from results.report import build_report, render

    with open_store(store_url, home) as store:
        record = store.get_campaign(campaign)
        if record is None:
            raise UsageError(f"no campaign '{campaign}' in {store.url}")
        rows = pool_blocks(
            store.results_for_campaign(record.campaign_id), samples_of=store.result_samples
        )
    if not rows:
        raise UsageError(f"campaign {record.campaign_id} has no results yet")
    reused = sum(1 for r in rows if r.get("reused"))
    notes = [f"campaign {record.campaign_id} ({record.status}), {len(rows)} results"]
    if reused:
        notes.append(f"{reused} results were reused from earlier identical measurements")
    text = render(build_report(f"edgefarm report: {record.name}", rows, notes=notes), fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {output}: {error.strerror}") from None
    click.echo(f"wrote {output} ({len(text.encode()):,} bytes, {fmt})")

"""``edgefarm results list|show|export`` (reads the store directly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgefarm.cli.options import home_option, store_option
from edgefarm.errors import UsageError
from edgefarm.home import default_store_url, edgefarm_home


def _rows(
    store_url: str | None,
    home: str | None,
    campaign: str | None,
    model: str | None,
    backend: str | None,
    device: str | None,
    limit: int | None,
) -> list[dict[str, Any]]:
    from results.store import ResultsStore

    with ResultsStore.open(store_url or default_store_url(edgefarm_home(home))) as store:
        if campaign:
            record = store.get_campaign(campaign)
            if record is None:
                raise UsageError(f"no campaign '{campaign}' in {store.url}")
            rows = store.results_for_campaign(record.campaign_id)
            return [
                r
                for r in rows
                if (not model or r["model"] == model) and (not backend or r["backend"] == backend)
            ][:limit]
        return store.query_results(model=model, backend=backend, device=device, limit=limit)


def _filters(f):  # type: ignore[no-untyped-def]
    for option in (
        click.option("--campaign", default=None, help="Campaign id (or unique prefix)."),
        click.option("--model", default=None),
        click.option("--backend", default=None),
        click.option("--device", default=None, help="Device id or name."),
        click.option("--limit", type=int, default=None),
        store_option,
        home_option,
    ):
        f = option(f)
    return f


@click.group()
def results() -> None:
    """List, show and export stored results."""


@results.command(name="list")
@_filters
@click.option("--json", "as_json", is_flag=True, help="JSON rows (samples omitted).")
def list_results(
    campaign: str | None,
    model: str | None,
    backend: str | None,
    device: str | None,
    limit: int | None,
    store_url: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """One line per stored result, newest first."""
    rows = _rows(store_url, home, campaign, model, backend, device, limit)
    if as_json:
        slim = [{k: v for k, v in r.items() if k != "samples_ms"} for r in rows]
        click.echo(json.dumps(slim, indent=2))
        return
    from edgefarm.cli.tables import print_tables, results_tables

    print_tables(results_tables(rows))


@results.command()
@click.argument("result_id", type=int)
@click.option("--samples", is_flag=True, help="Include raw per-iteration samples.")
@store_option
@home_option
def show(result_id: int, samples: bool, store_url: str | None, home: str | None) -> None:
    """Every stored field of one result, as JSON."""
    from results.store import ResultsStore

    with ResultsStore.open(store_url or default_store_url(edgefarm_home(home))) as store:
        row = store.get_result(result_id)
    if row is None:
        raise UsageError(f"no result with id {result_id}")
    if not samples:
        row = {k: v for k, v in row.items() if k != "samples_ms"}
    click.echo(json.dumps(row, indent=2))


@results.command()
@_filters
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "parquet"]),
    default="csv",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="File to write (required for parquet; default stdout).",
)
def export(
    campaign: str | None,
    model: str | None,
    backend: str | None,
    device: str | None,
    limit: int | None,
    store_url: str | None,
    home: str | None,
    fmt: str,
    output: str | None,
) -> None:
    """Export results with pandas as CSV, JSON or Parquet."""
    from results.export import export as write

    rows = _rows(store_url, home, campaign, model, backend, device, limit)
    out = write(rows, fmt, Path(output) if output else None)
    if output is None and isinstance(out, str):
        click.echo(out, nl=False)
    elif output is not None:
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)

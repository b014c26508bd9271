"""``edgefarm results list|show|export`` (reads the store directly)."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefarm.cli.options import home_option, open_store, store_option
from edgefarm.errors import UsageError

if TYPE_CHECKING:
    from results.store import ResultsStore


def _rows(
    store: ResultsStore,
    campaign: str | None,
    model: str | None,
    backend: str | None,
    device: str | None,
    limit: int | None,
    samples: bool = False,
) -> Iterator[dict[str, Any]]:
    """The matching rows, streamed: a campaign's in task order, else newest first."""
    if not campaign:
        yield from store.iter_results(
            model=model, backend=backend, device=device, limit=limit, samples=samples
        )
        return
    record = store.get_campaign(campaign)
    if record is None:
        raise UsageError(f"no campaign '{campaign}' in {store.url}")
    wanted = (
        r
        for r in store.iter_campaign_results(record.campaign_id, samples=samples)
        if (not model or r["model"] == model)
        and (not backend or r["backend"] == backend)
        and (not device or device in (r["device_id"], r["device_name"]))
    )
    yield from itertools.islice(wanted, limit)


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
    """One line per stored result, newest first (a campaign's: in task order)."""
    with open_store(store_url, home) as store:
        found = _rows(store, campaign, model, backend, device, limit)
        if as_json:  # streamed: one row at a time, whatever the count
            out = sys.stdout
            count = 0
            out.write("[")
            for row in found:
                out.write(",\n" if count else "\n")
                out.write(json.dumps(row, indent=2))
                count += 1
            out.write("\n]\n" if count else "]\n")
            return
        rows = list(found)
    from edgefarm.cli.tables import print_tables, results_tables

    print_tables(results_tables(rows))


@results.command()
@click.argument("result_id", type=int)
@click.option("--samples", is_flag=True, help="Include raw per-iteration samples.")
@store_option
@home_option
def show(result_id: int, samples: bool, store_url: str | None, home: str | None) -> None:
    """Every stored field of one result, as JSON."""
    with open_store(store_url, home) as store:
        row = store.get_result(result_id, samples=samples)
    if row is None:
        raise UsageError(f"no result with id {result_id}")
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
@click.option("--samples", is_flag=True, help="Include raw per-iteration samples (JSON text).")
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
    samples: bool,
) -> None:
    """Export results as CSV, JSON or Parquet, streamed in pieces (memory stays flat in
    the number of rows); raw samples only with --samples."""
    from results.export import export as write

    with open_store(store_url, home) as store:
        count = write(
            lambda: _rows(store, campaign, model, backend, device, limit, samples),
            fmt,
            Path(output) if output else None,
            stream=None if output else sys.stdout,
        )
    if output is not None:
        click.echo(f"wrote {count} rows to {output}", err=True)

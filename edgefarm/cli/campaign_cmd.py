"""``edgefarm campaign run|status|list``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from edgefarm.cli.options import (
    client_tls,
    client_tls_options,
    home_option,
    store_option,
    token_option,
    verbose_option,
)
from edgefarm.home import default_store_url, edgefarm_home
from edgefarm.logging_setup import configure_logging


@click.group()
def campaign() -> None:
    """Run and inspect sweep campaigns."""


@campaign.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="Use this coordinator (default: start a local farm on this machine).",
)
@token_option
@client_tls_options
@click.option("--dry-run", is_flag=True, help="Validate and show the sweep; run nothing.")
@click.option("--fresh", is_flag=True, help="Re-measure even when identical results exist.")
@store_option
@home_option
@verbose_option
def run(
    spec: str,
    coordinator: str | None,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    dry_run: bool,
    fresh: bool,
    store_url: str | None,
    home: str | None,
    verbose: int,
) -> None:
    """Run the campaign in SPEC, show progress, print the results table.

    Exits non-zero when a task failed.
    """
    from coordinator.runner import print_plan, run_campaign
    from coordinator.spec import CampaignSpec

    configure_logging(verbose)
    path = Path(spec)
    parsed = CampaignSpec.load(path)
    if dry_run:
        print_plan(parsed)
        return
    if coordinator:
        run_campaign(
            coordinator, token, path, fresh=fresh, tls=client_tls(tls_ca, tls_cert, tls_key)
        )
        return
    # The local farm is plaintext on loopback: the --tls-* settings are for --coordinator.
    from coordinator.localfarm import LocalFarm

    base = edgefarm_home(home)
    with LocalFarm(home=base, store_url=store_url or default_store_url(base), token=token) as farm:
        run_campaign(farm.address, token, path, fresh=fresh)


def _store(store_url: str | None, home: str | None):  # type: ignore[no-untyped-def]
    from results.store import ResultsStore

    return ResultsStore.open(store_url or default_store_url(edgefarm_home(home)))


@campaign.command()
@click.argument("campaign_id")
@store_option
@home_option
def status(campaign_id: str, store_url: str | None, home: str | None) -> None:
    """Show a campaign's state and task counts (read from the store)."""
    from edgefarm.errors import UsageError

    with _store(store_url, home) as store:
        record = store.get_campaign(campaign_id)
        if record is None:
            raise UsageError(f"no campaign '{campaign_id}' in {store.url}")
        counts = store.campaign_counts(record.campaign_id)
    click.echo(f"campaign {record.campaign_id} ({record.name}): {record.status}")
    click.echo("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v))
    click.echo(f"conversions: {record.conversions_run} run, {record.conversions_cached} cached")


@campaign.command(name="list")
@click.option("--limit", default=20, show_default=True)
@store_option
@home_option
def list_campaigns(limit: int, store_url: str | None, home: str | None) -> None:
    """Campaigns, newest first (read from the store)."""
    with _store(store_url, home) as store:
        records = store.list_campaigns(limit=limit)
        for record in records:
            counts = store.campaign_counts(record.campaign_id)
            when = datetime.fromtimestamp(record.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(
                f"{record.campaign_id}  {when}Z  {record.status:<9} {record.name:<20} "
                f"{counts.get('total', 0)} tasks, {counts.get('failed', 0)} failed"
            )
    if not records:
        click.echo("no campaigns yet")

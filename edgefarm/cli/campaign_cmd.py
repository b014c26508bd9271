"""``edgefarm campaign run|status|list``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgefarm.cli.options import (
    client_tls,
    client_tls_options,
    home_option,
    open_store,
    store_option,
    token_option,
    verbose_option,
)
from edgefarm.home import default_store_url, edgefarm_home
from edgefarm.logging_setup import configure_logging
from edgefarm.wire_limits import REATTACH_TIMEOUT_S

if TYPE_CHECKING:
    from rich.table import Table

    from results.records import AttemptRecord, TaskRecord


reattach_option = click.option(
    "--reattach-timeout",
    type=click.FloatRange(min=0),
    default=REATTACH_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a --coordinator that went away (e.g. restarted) before "
    "giving up; the campaign is re-attached, never submitted twice.",
)


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
@reattach_option
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
    reattach_timeout: float,
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
            coordinator,
            token,
            path,
            fresh=fresh,
            tls=client_tls(tls_ca, tls_cert, tls_key),
            reattach_s=reattach_timeout,
        )
        return
    # The local farm is plaintext on loopback: the --tls-* settings are for --coordinator.
    from coordinator.localfarm import LocalFarm

    base = edgefarm_home(home)
    with LocalFarm(home=base, store_url=store_url or default_store_url(base), token=token) as farm:
        run_campaign(farm.address, token, path, fresh=fresh)


@campaign.command()
@click.argument("campaign_id")
@click.option("--coordinator", required=True, metavar="HOST:PORT", help="The coordinator.")
@token_option
@client_tls_options
@reattach_option
@verbose_option
def watch(
    campaign_id: str,
    coordinator: str,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    reattach_timeout: float,
    verbose: int,
) -> None:
    """Follow a running campaign to its end (re-attaching after coordinator restarts),
    then print its results table. Exits non-zero when a task failed."""
    from coordinator.client import ControlClient
    from coordinator.runner import follow
    from edgefarm.cli.tables import print_tables, results_tables
    from edgefarm.errors import CampaignFailed

    configure_logging(verbose)
    tls = client_tls(tls_ca, tls_cert, tls_key)
    with ControlClient(coordinator, token, tls=tls) as client:
        final = follow(client, campaign_id, reattach_timeout)
        rows = client.results(campaign_id=final.campaign_id)
    print_tables(results_tables(rows, title=f"campaign {final.campaign_id}"))
    if final.tasks_failed:
        raise CampaignFailed(
            f"campaign {final.campaign_id}: {final.tasks_failed} of {final.tasks_total} "
            "tasks failed"
        )


@campaign.command()
@click.argument("campaign_id")
@store_option
@home_option
def status(campaign_id: str, store_url: str | None, home: str | None) -> None:
    """Show a campaign's state, task counts, each task's attempts and, while it runs,
    an ETA from the measured task durations (read from the store)."""
    from edgefarm.cli.tables import print_tables
    from edgefarm.domain import CampaignStatus
    from edgefarm.errors import UsageError
    from results.progress import describe_eta, estimate_eta

    with open_store(store_url, home) as store:
        record = store.get_campaign(campaign_id)
        if record is None:
            raise UsageError(f"no campaign '{campaign_id}' in {store.url}")
        counts = store.campaign_counts(record.campaign_id)
        task_records = store.tasks_for_campaign(record.campaign_id)
        attempts = store.attempts_for_campaign(record.campaign_id)
        names = {i.agent_id: i.agent_name for i in store.agent_identities()}
        names.update({d.agent_id: d.agent_name for d in store.list_devices_seen()})
    click.echo(f"campaign {record.campaign_id} ({record.name}): {record.status}")
    if record.error:
        click.echo(f"error: {record.error}")
    click.echo("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v))
    click.echo(f"conversions: {record.conversions_run} run, {record.conversions_cached} cached")
    if record.status == CampaignStatus.RUNNING:
        click.echo(describe_eta(estimate_eta(task_records, attempts)))
    if task_records:
        print_tables([_attempts_table(task_records, attempts, names)])


def _attempts_table(
    task_records: list[TaskRecord], attempts: list[AttemptRecord], names: dict[str, str]
) -> Table:
    """One row per task: its variant, device, status and every attempt."""
    import time

    from rich.table import Table

    from results.progress import format_duration

    now = time.time()
    by_task: dict[str, list[AttemptRecord]] = {}
    for a in attempts:
        by_task.setdefault(a.task_id, []).append(a)
    table = Table()
    for name in ("task", "variant", "device", "status", "attempts", "agent", "outcome"):
        table.add_column(name)
    table.add_column("duration", justify="right")
    for t in task_records:
        tried = by_task.get(t.task_id, [])
        agents, outcomes, durations = [], [], []
        for a in tried:
            agents.append(f"#{a.attempt} {names.get(a.agent_id, a.agent_id[:12] or '?')}")
            outcomes.append(f"{a.outcome}: {a.reason}" if a.reason else a.outcome)
            if a.outcome == "running" and a.started_at > 0:
                durations.append(f"{format_duration(max(0.0, now - a.started_at))} so far")
            else:
                durations.append(format_duration(a.duration_s))
        table.add_row(
            t.task_id[:8],
            f"{t.model}/{t.backend}/{t.scheme}",
            t.device_name or t.device_id,
            str(t.status),
            str(len(tried)),
            "\n".join(agents) or "-",
            "\n".join(outcomes) or "-",
            "\n".join(durations) or "-",
        )
    return table


@campaign.command(name="list")
@click.option("--limit", default=20, show_default=True)
@store_option
@home_option
def list_campaigns(limit: int, store_url: str | None, home: str | None) -> None:
    """Campaigns, newest first (read from the store)."""
    with open_store(store_url, home) as store:
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

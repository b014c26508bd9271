"""Client side of running a campaign: submit, follow progress, print the table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from coordinator.client import ControlClient
from coordinator.spec import CampaignSpec
from edgefarm.cli.tables import print_tables, results_tables
from edgefarm.errors import CampaignFailed


def print_plan(spec: CampaignSpec) -> None:
    """What a campaign would run (``--dry-run``)."""
    variants = spec.variants()
    click.echo(
        f"campaign {spec.name}: {len(variants)} variant(s) on devices matching {spec.selectors()}"
    )
    for v in variants:
        click.echo(f"  {v.model.name:<20} {v.backend:<12} {v.scheme}")
    s = spec.measure_settings()
    click.echo(
        f"measurement: {s.trials} trials x (warm-up {s.warmup_iterations}, >= "
        f"{s.min_iterations} iterations and >= {s.min_duration_s}s), {s.threads} thread(s)"
    )


def run_campaign(address: str, token: str, spec_path: Path, fresh: bool = False) -> str:
    """Submit and follow a campaign to the end; raises CampaignFailed if a task failed."""
    spec_text = spec_path.read_text()
    with ControlClient(address, token) as client:
        click.echo(f"submitting {spec_path} to {address} (preparing variants on Ray)...")
        reply = client.submit(spec_text, str(spec_path.resolve()), fresh=fresh)
        for warning in reply.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(
            f"campaign {reply.campaign_id}: {reply.tasks_total} tasks "
            f"({reply.tasks_reused} answered by earlier measurements); conversions: "
            f"{reply.conversions_run} run, {reply.conversions_cached} reused from artifacts"
        )
        final = _follow(client, reply.campaign_id, reply.tasks_total)
        rows = client.results(campaign_id=reply.campaign_id)
    print_tables(results_tables(rows, title=f"campaign {reply.campaign_id}"))
    if final.tasks_failed:
        raise CampaignFailed(
            f"campaign {reply.campaign_id}: {final.tasks_failed} of "
            f"{final.tasks_total} tasks failed"
        )
    return reply.campaign_id


def _follow(client: ControlClient, campaign_id: str, total: int):  # type: ignore[no-untyped-def]
    """Watch until finished: a progress bar on a terminal, event lines otherwise."""
    last = None
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as bar:
            handle = bar.add_task("measuring", total=total)
            for snapshot in client.watch(campaign_id):
                last = snapshot
                bar.update(
                    handle,
                    completed=snapshot.tasks_done + snapshot.tasks_failed,
                    description=snapshot.message[:60] or "measuring",
                )
    else:
        for snapshot in client.watch(campaign_id):
            last = snapshot
            if snapshot.message:
                done = snapshot.tasks_done + snapshot.tasks_failed
                click.echo(f"[{done}/{snapshot.tasks_total}] {snapshot.message}")
    assert last is not None
    return last

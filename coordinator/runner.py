"""Client side of running a campaign: submit, follow progress, print the table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from coordinator.client import ControlClient
from coordinator.interleave import RunShape
from coordinator.spec import CampaignSpec
from coordinator.uploads import upload_spec_files
from edgefarm.cli.tables import print_tables, results_tables
from edgefarm.errors import CampaignFailed
from edgefarm.transport import ClientTls


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


def run_campaign(
    address: str, token: str, spec_path: Path, fresh: bool = False, tls: ClientTls | None = None
) -> str:
    """Submit and follow a campaign to the end; raises CampaignFailed if a task failed."""
    with ControlClient(address, token, tls=tls) as client:
        campaign_id, failed, total = submit_and_follow(client, spec_path, fresh=fresh)
        rows = client.results(campaign_id=campaign_id)
    print_tables(results_tables(rows, title=f"campaign {campaign_id}"))
    if failed:
        raise CampaignFailed(f"campaign {campaign_id}: {failed} of {total} tasks failed")
    return campaign_id


def submit_and_follow(
    client: ControlClient, spec_path: Path, fresh: bool = False, shape: RunShape | None = None
) -> tuple[str, int, int]:
    """Upload the files the campaign in ``spec_path`` names, submit it and follow it to
    the end; returns ``(campaign_id, tasks_failed, tasks_total)``."""
    spec_text = spec_path.read_text()
    files = upload_spec_files(
        client,
        spec_path,
        spec_text,
        echo=lambda line: click.echo(line, err=line.startswith("warning:")),
    )
    click.echo(f"submitting {spec_path} to {client.address} (preparing variants on Ray)...")
    reply = client.submit(
        spec_text, str(spec_path.resolve()), fresh=fresh, shape=shape, files=files
    )
    for warning in reply.warnings:
        click.echo(f"warning: {warning}", err=True)
    replays = f", {reply.tasks_baseline} replaying the baseline" if reply.tasks_baseline else ""
    click.echo(
        f"campaign {reply.campaign_id}: {reply.tasks_total} tasks{replays} "
        f"({reply.tasks_reused} answered by earlier measurements); conversions: "
        f"{reply.conversions_run} run, {reply.conversions_cached} reused from artifacts"
    )
    final = _follow(client, reply.campaign_id, reply.tasks_total)
    return reply.campaign_id, final.tasks_failed, final.tasks_total


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

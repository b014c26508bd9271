"""Client side of running a campaign: submit, follow progress, print the table."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from coordinator.client import ControlClient
from coordinator.interleave import RunShape
from coordinator.spec import CampaignSpec
from coordinator.uploads import upload_spec_files
from edgefarm.cli.tables import print_tables, results_tables
from edgefarm.errors import CampaignFailed, ConnectionFailed
from edgefarm.transport import ClientTls
from edgefarm.wire_limits import REATTACH_TIMEOUT_S
from protos.edgefarm.v1 import control_pb2

T = TypeVar("T")
REATTACH_PAUSE_S = 2.0  # between tries to reach a coordinator that went away


def print_plan(spec: CampaignSpec) -> None:
    """What a campaign would run (``--dry-run``)."""
    variants = spec.variants()
    click.echo(
        f"campaign {spec.name}: {len(variants)} variant(s) on devices matching {spec.selectors()}"
    )
    model_width = max([20, *(len(v.model.name) for v in variants)])
    backend_width = max([12, *(len(v.backend) for v in variants)])
    for v in variants:
        click.echo(f"  {v.model.name:<{model_width}} {v.backend:<{backend_width}} {v.scheme}")
    s = spec.measure_settings()
    click.echo(
        f"measurement: {s.trials} trials x (warm-up {s.warmup_iterations}, >= "
        f"{s.min_iterations} iterations and >= {s.min_duration_s}s), {s.threads} thread(s)"
    )


def run_campaign(
    address: str,
    token: str,
    spec_path: Path,
    fresh: bool = False,
    tls: ClientTls | None = None,
    reattach_s: float = REATTACH_TIMEOUT_S,
) -> str:
    """Submit and follow a campaign to the end; raises CampaignFailed if a task failed."""
    with ControlClient(address, token, tls=tls) as client:
        campaign_id, failed, total = submit_and_follow(
            client, spec_path, fresh=fresh, reattach_s=reattach_s
        )
        rows = client.results(campaign_id=campaign_id)
    print_tables(results_tables(rows, title=f"campaign {campaign_id}"))
    if failed:
        raise CampaignFailed(f"campaign {campaign_id}: {failed} of {total} tasks failed")
    return campaign_id


def submit_and_follow(
    client: ControlClient,
    spec_path: Path,
    fresh: bool = False,
    shape: RunShape | None = None,
    reattach_s: float = REATTACH_TIMEOUT_S,
) -> tuple[str, int, int]:
    """Upload the files the campaign in ``spec_path`` names, submit it and follow it to
    the end; returns ``(campaign_id, tasks_failed, tasks_total)``.

    When the coordinator goes away (a restart), the submission is sent again under the
    same submission id, and the watch re-attaches, for up to ``reattach_s`` seconds of
    unreachability; the campaign is never submitted twice."""
    spec_text = spec_path.read_text()
    files = upload_spec_files(
        client,
        spec_path,
        spec_text,
        echo=lambda line: click.echo(line, err=line.startswith("warning:")),
    )
    click.echo(f"submitting {spec_path} to {client.address} (preparing variants on Ray)...")
    submission_id = uuid.uuid4().hex
    reply = _retry_while_unreachable(
        lambda: client.submit(
            spec_text,
            str(spec_path.resolve()),
            fresh=fresh,
            shape=shape,
            files=files,
            submission_id=submission_id,
        ),
        reattach_s,
    )
    for warning in reply.warnings:
        click.echo(f"warning: {warning}", err=True)
    replays = f", {reply.tasks_baseline} replaying the baseline" if reply.tasks_baseline else ""
    click.echo(
        f"campaign {reply.campaign_id}: {reply.tasks_total} tasks{replays} "
        f"({reply.tasks_reused} answered by earlier measurements); conversions: "
        f"{reply.conversions_run} run, {reply.conversions_cached} reused from artifacts"
    )
    final = follow(client, reply.campaign_id, reattach_s)
    return reply.campaign_id, final.tasks_failed, final.tasks_total


def _retry_while_unreachable(call: Callable[[], T], reattach_s: float) -> T:
    """``call()``, again while the coordinator is unreachable, for up to ``reattach_s``."""
    outage: float | None = None
    while True:
        try:
            return call()
        except ConnectionFailed as error:
            outage = _wait_out(outage, reattach_s, error)


def _wait_out(outage: float | None, reattach_s: float, error: ConnectionFailed) -> float:
    """One pause of an outage that began at ``outage`` (None: now); re-raises ``error``
    once the outage has lasted ``reattach_s``."""
    now = time.monotonic()
    if outage is None:
        click.echo(
            f"lost the coordinator ({error}); re-attaching for up to {reattach_s:g} s", err=True
        )
        outage = now
    elif now - outage > reattach_s:
        raise error
    time.sleep(REATTACH_PAUSE_S)
    return outage


def follow(
    client: ControlClient, campaign_id: str, reattach_s: float = REATTACH_TIMEOUT_S
) -> control_pb2.CampaignProgress:
    """Watch a campaign until it is finished, re-attaching after coordinator restarts:
    a progress bar on a terminal, event lines otherwise. Returns the last snapshot."""
    if not sys.stdout.isatty():
        return _watch(client, campaign_id, reattach_s, _print_event)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        handle = bar.add_task("measuring", total=None)

        def show(snapshot: control_pb2.CampaignProgress) -> None:
            bar.update(
                handle,
                total=snapshot.tasks_total or None,
                completed=snapshot.tasks_done + snapshot.tasks_failed,
                description=snapshot.message[:60] or snapshot.status,
            )

        return _watch(client, campaign_id, reattach_s, show)


def _print_event(snapshot: control_pb2.CampaignProgress) -> None:
    if snapshot.message:
        done = snapshot.tasks_done + snapshot.tasks_failed
        click.echo(f"[{done}/{snapshot.tasks_total}] {snapshot.message}")


def _watch(
    client: ControlClient,
    campaign_id: str,
    reattach_s: float,
    show: Callable[[control_pb2.CampaignProgress], None],
) -> control_pb2.CampaignProgress:
    last: control_pb2.CampaignProgress | None = None
    outage: float | None = None
    while True:
        try:
            for snapshot in client.watch(campaign_id):
                if outage is not None:
                    click.echo(f"re-attached to campaign {campaign_id}", err=True)
                    outage = None
                last = snapshot
                show(snapshot)
        except ConnectionFailed as error:
            outage = _wait_out(outage, reattach_s, error)
            continue
        if last is not None and last.finished:
            if last.status == "failed" and not last.tasks_total:
                raise CampaignFailed(f"campaign {campaign_id} failed: {last.message}")
            return last
        time.sleep(REATTACH_PAUSE_S)  # the stream ended early (coordinator stopping)

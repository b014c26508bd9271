"""``edgefarm agent serve``: run a device agent (imports nothing of the coordinator)."""

from __future__ import annotations

import asyncio
import socket

import click

from edgefarm.cli.options import home_option, parse_labels, token_option, verbose_option
from edgefarm.home import edgefarm_home
from edgefarm.logging_setup import configure_logging


@click.group()
def agent() -> None:
    """Run a device agent."""


@agent.command()
@click.option("--coordinator", required=True, metavar="HOST:PORT", help="Coordinator address.")
@token_option
@click.option("--name", default=None, help="Agent name (default: the hostname).")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="Label for campaign selectors (repeatable). 'device=NAME' names the device.",
)
@click.option("--work-dir", default=None, help="Artifact cache (default: HOME/agent-NAME).")
@home_option
@verbose_option
def serve(
    coordinator: str,
    token: str,
    name: str | None,
    labels: tuple[str, ...],
    work_dir: str | None,
    home: str | None,
    verbose: int,
) -> None:
    """Probe this device, dial the coordinator and measure what it assigns."""
    from pathlib import Path

    from agent.client import Agent, AgentConfig
    from agent.probe import probe_device

    configure_logging(verbose + 1)
    agent_name = name or socket.gethostname()
    base = Path(work_dir) if work_dir else edgefarm_home(home) / f"agent-{agent_name}"
    config = AgentConfig(
        coordinator=coordinator,
        token=token,
        name=agent_name,
        work_dir=base,
        labels=parse_labels(labels),
    )
    capabilities = probe_device()
    click.echo(
        f"edgefarm agent {agent_name} on device {capabilities.device_id} "
        f"({capabilities.arch}, {capabilities.logical_cores} cores, backends: "
        f"{', '.join(sorted(capabilities.backends)) or 'none'}) -> {coordinator}"
    )
    asyncio.run(Agent(config, capabilities).run())

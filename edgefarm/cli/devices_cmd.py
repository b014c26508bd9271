"""``edgefarm devices list``: declared devices merged with live registrations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edgefarm.cli.options import (
    client_tls,
    client_tls_options,
    home_option,
    open_store,
    store_option,
    token_option,
)
from edgefarm.errors import UsageError


@click.group()
def devices() -> None:
    """Show the device fleet."""


@devices.command(name="list")
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="Ask a running coordinator (live state). Default: read the store.",
)
@token_option
@client_tls_options
@click.option(
    "--inventory",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file of declared devices (store mode).",
)
@click.option(
    "--state",
    type=click.Choice(["online", "busy", "missing", "never_seen"]),
    default=None,
    help="Only devices in this state.",
)
@click.option(
    "--selector",
    default=None,
    metavar="KEY=VALUE,...",
    help="Only devices matching this selector (e.g. arch=arm64,label.rack=a).",
)
@click.option("--json", "as_json", is_flag=True)
@store_option
@home_option
def list_devices(
    coordinator: str | None,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    inventory: str | None,
    state: str | None,
    selector: str | None,
    as_json: bool,
    store_url: str | None,
    home: str | None,
) -> None:
    """Each device's state (online, busy, missing, never seen), last heartbeat, capabilities."""
    from inventory.fleet import FleetDevice, fleet_to_json, render_fleet_table

    fleet: list[FleetDevice]
    if coordinator:
        from coordinator.client import ControlClient
        from protos.convert import capabilities_from_pb

        tls = client_tls(tls_ca, tls_cert, tls_key)
        with ControlClient(coordinator, token, tls=tls) as client:
            fleet = [
                FleetDevice(
                    name=d.name,
                    device_id=d.device_id or None,
                    state=d.state,  # type: ignore[arg-type]
                    last_heartbeat=d.last_heartbeat_unix or None,
                    agents=list(d.agents),
                    labels=dict(d.labels),
                    capabilities=capabilities_from_pb(d.capabilities)
                    if d.HasField("capabilities")
                    else None,
                    declared=d.declared,
                    enrolment=dict(d.enrolment),
                )
                for d in client.list_devices(state or "", selector or "")
            ]
    else:
        from coordinator.control import live_agents_from_store
        from edgefarm.selectors import parse_selector
        from inventory.fleet import load_inventory, merge_fleet, select_fleet

        with open_store(store_url, home) as store:
            agents = live_agents_from_store(store)
        declared = load_inventory(Path(inventory) if inventory else None).devices
        try:
            wanted = parse_selector(selector) if selector else {}
        except ValueError as error:
            raise UsageError(f"--selector: {error}") from None
        fleet = merge_fleet(declared, agents, time.time(), missing_after_s=30.0)
        fleet = select_fleet(fleet, state or "", wanted)
    if as_json:
        click.echo(json.dumps(fleet_to_json(fleet), indent=2))
    elif not fleet and (state or selector):
        asked = " and ".join(p for p in (state, selector) if p)
        click.echo(f"no devices {asked} (of those declared or seen)")
    else:
        click.echo(render_fleet_table(fleet))


@devices.command()
@click.argument("name")
@click.option(
    "--coordinator",
    required=True,
    envvar="EDGEFARM_COORDINATOR",
    metavar="HOST:PORT",
    help="The coordinator to revoke on.",
)
@token_option
@client_tls_options
def revoke(
    name: str,
    coordinator: str,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Revoke the credentials of NAME (a device, or one agent by name or id): its
    connection is closed at once, its task goes back to the queue, and it is refused from
    then on until it is enrolled again."""
    from coordinator.client import ControlClient

    with ControlClient(coordinator, token, tls=client_tls(tls_ca, tls_cert, tls_key)) as client:
        revoked = client.revoke(name)
    if not revoked:
        click.echo(f"nothing to revoke: no enrolled agent matches {name!r}")
        return
    for agent_id in revoked:
        click.echo(f"revoked {agent_id}")

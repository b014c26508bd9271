"""``edgefarm quickstart``: the main job, a real local sweep with embedded defaults."""

from __future__ import annotations

from pathlib import Path

import click

from edgefarm.cli.options import home_option, store_option, verbose_option
from edgefarm.home import default_store_url, edgefarm_home
from edgefarm.logging_setup import configure_logging

DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "campaigns" / "quickstart.yaml"


@click.command()
@click.option(
    "--spec",
    type=click.Path(dir_okay=False),
    default=str(DEFAULT_SPEC),
    show_default=True,
    help="Campaign to run.",
)
@click.option("--fresh", is_flag=True, help="Re-measure even when identical results exist.")
@store_option
@home_option
@verbose_option
def quickstart(
    spec: str, fresh: bool, store_url: str | None, home: str | None, verbose: int
) -> None:
    """Start a local coordinator (local Ray) and agent on loopback, run the quickstart
    campaign on this machine, print the results and where they are stored."""
    from coordinator.localfarm import LocalFarm
    from coordinator.runner import run_campaign

    configure_logging(verbose)
    base = edgefarm_home(home)
    url = store_url or default_store_url(base)
    click.echo(f"starting a local farm in {base} (coordinator + 1 agent, real gRPC, local Ray)")
    with LocalFarm(home=base, store_url=url) as farm:
        run_campaign(farm.address, farm.token, Path(spec), fresh=fresh)
    click.echo(f"results store: {url}")
    click.echo("next: edgefarm results list --json | edgefarm results export --format csv")

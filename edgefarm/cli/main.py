"""Entry point of the ``edgefarm`` command.

Command groups are imported only when used, so ``edgefarm agent serve`` never
imports ray, the coordinator or the results store. Every EdgefarmError is printed
as one line and mapped to its exit code here, and only here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

import edgefarm
from edgefarm.errors import EdgefarmError, exit_code_for

COMMANDS = {
    "agent": ("edgefarm.cli.agent_cmd", "agent", "Run a device agent."),
    "coordinator": ("edgefarm.cli.coordinator_cmd", "coordinator", "Run the coordinator daemon."),
    "campaign": ("edgefarm.cli.campaign_cmd", "campaign", "Run and inspect sweep campaigns."),
    "results": ("edgefarm.cli.results_cmd", "results", "List, show and export stored results."),
    "devices": ("edgefarm.cli.devices_cmd", "devices", "Show the device fleet."),
    "report": ("edgefarm.cli.report_cmd", "report", "Reports over stored results."),
    "nightly": (
        "edgefarm.cli.nightly_cmd",
        "nightly",
        "Nightly regression runs of a suite against its baseline night.",
    ),
    "recommend": (
        "edgefarm.cli.recommend_cmd",
        "recommend",
        "Best configuration for a device within limits.",
    ),
    "quickstart": (
        "edgefarm.cli.quickstart_cmd",
        "quickstart",
        "Run the quickstart sweep on this machine.",
    ),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(edgefarm.__version__, prog_name="edgefarm")
def cli() -> None:
    """edgefarm: measure which runtime and quantization is best for a model on a device."""


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI; errors become one line on stderr and an exit code."""
    try:
        return cli.main(args=argv, prog_name="edgefarm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except EdgefarmError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_code_for(error))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)

"""``edgefarm coordinator serve``: the coordinator daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from edgefarm.cli.options import (
    home_option,
    server_tls,
    server_tls_options,
    store_option,
    token_option,
    verbose_option,
)
from edgefarm.errors import UsageError
from edgefarm.home import default_store_url, edgefarm_home
from edgefarm.logging_setup import configure_logging


@click.group()
def coordinator() -> None:
    """Run the coordinator daemon."""


@coordinator.command()
@click.option(
    "--listen",
    default="127.0.0.1:50051",
    show_default=True,
    metavar="ADDR",
    help="Address to serve gRPC on (port 0 picks a free port).",
)
@store_option
@token_option
@click.option(
    "--inventory",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file of declared devices.",
)
@click.option(
    "--lease", "lease_s", type=float, default=None, help="Lease duration in seconds (default 15)."
)
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=float,
    default=None,
    help="Agent heartbeat interval in seconds (default 2).",
)
@click.option(
    "--register-rate",
    default=None,
    metavar="BURST/PER_S",
    help="Registrations one peer address may make at once, then per second (default "
    "60/5). Raise it for many agents behind one NAT address.",
)
@click.option(
    "--forget-devices-after",
    "forget_days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="DAYS",
    help="Agents not heard from for this many days leave the live device list (default "
    "30; they stay in the store and return when they register).",
)
@click.option(
    "--model-root",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    metavar="DIR",
    help="Let submitted specs name file: paths on this machine, inside DIR only (by default "
    "the coordinator reads no spec paths: the CLI uploads the files).",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (port 0 picks a "
    "free port; the bound address is printed). Off by default.",
)
@server_tls_options
@home_option
@verbose_option
def serve(
    listen: str,
    store_url: str | None,
    token: str,
    inventory: str | None,
    lease_s: float | None,
    heartbeat_s: float | None,
    register_rate: str | None,
    forget_days: float | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    insecure: bool,
    model_root: str | None,
    metrics_listen: str | None,
    home: str | None,
    verbose: int,
) -> None:
    """Serve agents and the CLI; uses the Ray cluster in RAY_ADDRESS or starts a local one.

    Serves TLS with --tls-cert/--tls-key (and requires client certificates with
    --tls-client-ca); plaintext on a non-loopback address draws a warning unless
    --insecure says it is meant. SIGTERM or SIGINT stops it gracefully (exit 0); a local
    Ray cluster it started stops with it, even when it is killed.
    """
    from coordinator.server import CoordinatorConfig
    from coordinator.server import serve as run_server
    from edgefarm.transport import server_credentials

    configure_logging(verbose + 1)
    if metrics_listen is not None:
        from coordinator.metrics import parse_listen

        parse_listen(metrics_listen)  # a malformed address fails here, before Ray starts
    tls = server_tls(tls_cert, tls_key, tls_client_ca)
    if tls is not None:
        server_credentials(tls)  # a bad certificate file fails here, before Ray starts
    base = edgefarm_home(home)
    burst, per_s = parse_rate(register_rate) if register_rate else (None, None)
    config = CoordinatorConfig(
        listen=listen,
        store_url=store_url or default_store_url(base),
        home=base,
        token=token,
        inventory=Path(inventory) if inventory else None,
        tls=tls,
        insecure=insecure,
        model_root=Path(model_root).resolve() if model_root else None,
        metrics_listen=metrics_listen,
    )
    overrides: dict[str, float] = {}
    if lease_s is not None:
        overrides["lease_duration_s"] = lease_s
    if heartbeat_s is not None:
        overrides["heartbeat_interval_s"] = heartbeat_s
    if forget_days is not None:
        overrides["forget_after_s"] = forget_days * 86400.0
    if burst is not None and per_s is not None:
        overrides["register_burst"], overrides["register_per_s"] = burst, per_s
    if overrides:
        from dataclasses import replace

        config = replace(config, **overrides)  # type: ignore[arg-type]
    asyncio.run(run_server(config))


def parse_rate(text: str) -> tuple[float, float]:
    """``BURST/PER_S`` (e.g. ``60/5``) as two positive numbers; UsageError otherwise."""
    burst, _, per_s = text.partition("/")
    try:
        values = float(burst), float(per_s)
    except ValueError:
        values = (0.0, 0.0)
    if not all(v > 0 and v < float("inf") for v in values):
        raise UsageError(f"--register-rate {text!r}: give BURST/PER_S, e.g. 60/5")
    return values

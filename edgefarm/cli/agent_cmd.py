"""``edgefarm agent serve`` (this device) and ``edgefarm agent hub`` (Qualcomm AI Hub hosted
devices): run device agents. Imports nothing of the coordinator.

Both stop gracefully on SIGTERM / SIGINT: no new work, the task in hand finished and its
result delivered (or, past ``--drain-timeout`` or on a second signal, given back), exit 0.
"""

from __future__ import annotations

import asyncio
import socket

import click

from edgefarm.cli.options import (
    client_tls,
    client_tls_options,
    home_option,
    parse_labels,
    token_option,
    verbose_option,
)
from edgefarm.home import edgefarm_home
from edgefarm.logging_setup import configure_logging

DRAIN_TIMEOUT_S = 300.0  # agent.client.DRAIN_TIMEOUT_S (not imported: keeps --help light)

drain_timeout_option = click.option(
    "--drain-timeout",
    default=DRAIN_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM/SIGINT, how long to wait for the task in hand to finish and its result "
    "to be acknowledged; past it the task is cancelled and given back to the coordinator. "
    "A second signal ends the wait at once.",
)


@click.group()
def agent() -> None:
    """Run a device agent."""


@agent.command()
@click.option("--coordinator", required=True, metavar="HOST:PORT", help="Coordinator address.")
@token_option
@client_tls_options
@click.option("--name", default=None, help="Agent name (default: the hostname).")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="Label for campaign selectors (repeatable). 'device=NAME' names the device.",
)
@click.option("--work-dir", default=None, help="Artifact cache (default: HOME/agent-NAME).")
@click.option(
    "--credential-file",
    default=None,
    metavar="PATH",
    help="Where the agent keeps the credential issued at enrolment (default: WORK_DIR/credential).",
)
@click.option(
    "--cache-max-gb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Bound of the artifact cache; least recently used artifacts go first (0: unbounded).",
)
@drain_timeout_option
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port). "
    "Off by default.",
)
@click.option(
    "--backend-env",
    "backend_envs",
    multiple=True,
    metavar="NAME=PATH",
    help="Run backend NAME's measuring processes with the Python of the virtual environment "
    "at PATH (a runtime whose dependencies conflict with the agent's; repeatable). The "
    "environment needs the runtime, psutil and numpy.",
)
@home_option
@verbose_option
def serve(
    coordinator: str,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    name: str | None,
    labels: tuple[str, ...],
    work_dir: str | None,
    credential_file: str | None,
    cache_max_gb: float,
    drain_timeout: float,
    metrics_listen: str | None,
    backend_envs: tuple[str, ...],
    home: str | None,
    verbose: int,
) -> None:
    """Probe this device, dial the coordinator and measure what it assigns.

    SIGTERM/SIGINT stop it gracefully (see --drain-timeout); it then exits 0.
    """
    from pathlib import Path

    from agent.backend_envs import parse_backend_envs, probe_env_backends
    from agent.client import Agent, AgentConfig, serve_agents
    from agent.executor import LocalExecutor
    from agent.metrics import AgentMetrics
    from agent.probe import probe_device
    from edgefarm.transport import channel_credentials

    configure_logging(verbose + 1)
    tls = client_tls(tls_ca, tls_cert, tls_key)
    if tls is not None:
        channel_credentials(tls)  # a bad certificate file fails here, not at each reconnect
    envs = parse_backend_envs(backend_envs)
    env_backends = probe_env_backends(envs)
    agent_name = name or socket.gethostname()
    base = Path(work_dir) if work_dir else edgefarm_home(home) / f"agent-{agent_name}"
    config = AgentConfig(
        coordinator=coordinator,
        token=token,
        name=agent_name,
        work_dir=base,
        labels=parse_labels(labels),
        cache_max_bytes=int(cache_max_gb * 1e9) or None,
        tls=tls,
        credential_file=Path(credential_file) if credential_file else None,
    )
    metrics = AgentMetrics()
    if metrics_listen is not None:
        metrics.serve(metrics_listen)  # logs the bound address
    capabilities = probe_device(env_backends=env_backends)
    click.echo(
        f"edgefarm agent {agent_name} on device {capabilities.device_id} "
        f"({capabilities.arch}, {capabilities.logical_cores} cores, backends: "
        f"{', '.join(sorted(capabilities.backends)) or 'none'}) -> {coordinator}"
    )
    try:
        agents = [Agent(config, capabilities, LocalExecutor(envs), metrics=metrics)]
        asyncio.run(serve_agents(agents, drain_timeout))
    finally:
        metrics.close()


@agent.command()
@click.option("--coordinator", required=True, metavar="HOST:PORT", help="Coordinator address.")
@token_option
@client_tls_options
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="NAME",
    help="An AI Hub device by its exact name, e.g. 'Samsung Galaxy S24' (repeatable).",
)
@click.option(
    "--attribute",
    "attributes",
    multiple=True,
    metavar="KEY:VALUE",
    help="Devices with this hub attribute, e.g. chipset:qualcomm-snapdragon-8gen3, "
    "framework:qnn, os:android (repeatable; all must hold).",
)
@click.option(
    "--os", "os_version", default="", help="Hub OS version or range, e.g. '14' or '[13,15)'."
)
@click.option(
    "--max-devices",
    default=8,
    show_default=True,
    help="Refuse a selection matching more devices than this.",
)
@click.option("--hub-config", default=None, metavar="PATH", help="The AI Hub client.ini to use.")
@click.option(
    "--hub-profile",
    default=None,
    metavar="NAME",
    help="Use ~/.qai_hub/NAME.ini (as `qai-hub configure --profile NAME` writes it).",
)
@click.option("--name", default="qai-hub", show_default=True, help="Prefix of the agents' names.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Extra label (repeatable).")
@click.option("--work-dir", default=None, help="Job journal and caches (default: HOME/agent-NAME).")
@click.option(
    "--poll-interval",
    default=10.0,
    show_default=True,
    help="Seconds between job status polls.",
)
@click.option(
    "--job-timeout",
    default=7200.0,
    show_default=True,
    help="Seconds to wait for one hub job before failing the task (the job stays journalled).",
)
@click.option(
    "--rate-limit-backoff",
    default=5.0,
    show_default=True,
    help="First delay in seconds before resubmitting a rate-limited job (then doubling, jittered).",
)
@drain_timeout_option
@home_option
@verbose_option
def hub(
    coordinator: str,
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    devices: tuple[str, ...],
    attributes: tuple[str, ...],
    os_version: str,
    max_devices: int,
    hub_config: str | None,
    hub_profile: str | None,
    name: str,
    labels: tuple[str, ...],
    work_dir: str | None,
    poll_interval: float,
    job_timeout: float,
    rate_limit_backoff: float,
    drain_timeout: float,
    home: str | None,
    verbose: int,
) -> None:
    """Serve Qualcomm AI Hub hosted devices as farm devices (needs an AI Hub token).

    Each selected device registers as its own device; its tasks run as hub jobs
    (quantize, compile, profile, inference). See docs/qai-hub.md.
    """
    from pathlib import Path

    from agent.client import serve_agents
    from agent.hub.api import open_hub
    from agent.hub.config import load_hub_config
    from agent.hub.devices import select_devices
    from agent.hub.jobs import HubSettings
    from agent.hub.service import HubAgentOptions, hub_agents
    from edgefarm.transport import channel_credentials

    configure_logging(verbose + 1)
    tls = client_tls(tls_ca, tls_cert, tls_key)
    if tls is not None:
        channel_credentials(tls)  # a bad certificate file fails here, not at each reconnect
    config = load_hub_config(hub_config, hub_profile)
    api = open_hub(config)
    chosen = select_devices(api, devices, attributes, os_version, max_devices)
    base = Path(work_dir) if work_dir else edgefarm_home(home) / f"agent-{name}"
    options = HubAgentOptions(
        coordinator=coordinator,
        token=token,
        name=name,
        work_dir=base,
        labels=parse_labels(labels),
        tls=tls,
        settings=HubSettings(
            poll_interval_s=poll_interval,
            job_timeout_s=job_timeout,
            backoff_base_s=rate_limit_backoff,
        ),
    )
    for device in chosen:
        click.echo(
            f"edgefarm hub agent: {device.name} (os {device.os or '?'}, "
            f"{', '.join(device.attributes)}) -> {coordinator}"
        )
    asyncio.run(serve_agents(hub_agents(api, chosen, options), drain_timeout))

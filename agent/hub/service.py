"""A hub agent process: one farm agent per selected AI Hub device, all in one event loop.

Each hosted device registers as a device of its own (own capabilities, labels and
lease), so the coordinator schedules them like any other device and runs one task at a
time on each. They share one client, one job journal and its locks, so two devices
needing the same quantize job submit it once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import Agent, AgentConfig
from agent.hub.api import HubApi
from agent.hub.devices import HubDevice, capabilities, labels, slug
from agent.hub.executor import HubExecutor
from agent.hub.jobs import HubJobs, HubSettings
from agent.hub.journal import Journal
from edgefarm.transport import ClientTls

JOURNAL_DIR = "journal"


@dataclass
class HubAgentOptions:
    """How the hub agents present themselves and where they keep their files."""

    coordinator: str
    token: str
    name: str  # prefix of every agent's name: <name>-<device slug>
    work_dir: Path  # the journal and one artifact cache per device live here
    labels: dict[str, str] = field(default_factory=dict)
    settings: HubSettings = field(default_factory=HubSettings)
    tls: ClientTls | None = None  # how the agents dial the coordinator (None: plaintext)


def hub_agents(hub: HubApi, devices: list[HubDevice], options: HubAgentOptions) -> list[Agent]:
    """One agent per hosted device, sharing ``hub`` and one journal."""
    journal = Journal(options.work_dir / JOURNAL_DIR)
    jobs = HubJobs(hub, journal, options.settings)
    agents = []
    for device in devices:
        config = AgentConfig(
            coordinator=options.coordinator,
            token=options.token,
            name=f"{options.name}-{slug(device.name)}",
            work_dir=options.work_dir / slug(device.name),
            labels={**labels(device), **options.labels},
            tls=options.tls,
        )
        executor = HubExecutor(hub, device, jobs)
        agents.append(Agent(config, capabilities(device, hub.version), executor))
    return agents


async def serve(agents: list[Agent]) -> None:
    """Run every agent until one stops for good (e.g. its fleet token is refused)."""
    await asyncio.gather(*(agent.run() for agent in agents))

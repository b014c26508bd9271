"""The coordinator daemon: Ray, the store, the scheduler and both gRPC services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.artifacts import ArtifactStore
from coordinator.campaigns import CampaignPlanner
from coordinator.control import ControlService
from coordinator.gateway import AgentGateway
from coordinator.preparation import Preparer, init_ray
from coordinator.scheduler import HEARTBEAT_INTERVAL_S, LEASE_DURATION_S, MAX_ATTEMPTS, Scheduler
from protos.edgefarm.v1 import agent_pb2_grpc, control_pb2_grpc
from results.store import ResultsStore

log = logging.getLogger(__name__)

LEASE_CHECK_INTERVAL_S = 0.5
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.server.max_pending_requests", 10_000),
]


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the daemon needs to start."""

    listen: str
    store_url: str
    home: Path
    token: str
    inventory: Path | None = None
    lease_duration_s: float = LEASE_DURATION_S
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    max_attempts: int = MAX_ATTEMPTS


async def create_server(config: CoordinatorConfig) -> tuple[grpc.aio.Server, int, Scheduler]:
    """Build and start the gRPC server; returns (server, bound port, scheduler)."""
    store = ResultsStore.open(config.store_url)
    artifacts = ArtifactStore(config.home / "artifacts")
    scheduler = Scheduler(
        store,
        lease_duration_s=config.lease_duration_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
        max_attempts=config.max_attempts,
    )
    scheduler.restore(store.unfinished_tasks())
    planner = CampaignPlanner(scheduler, Preparer(store, artifacts, config.home / "hub-cache"))
    server = grpc.aio.server(options=GRPC_OPTIONS)
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(
        AgentGateway(scheduler, artifacts, config.token), server
    )
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlService(
            planner, config.token, config.inventory, missing_after_s=3 * config.heartbeat_interval_s
        ),
        server,
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    return server, port, scheduler


async def _watch_leases(scheduler: Scheduler) -> None:
    while True:
        await asyncio.sleep(LEASE_CHECK_INTERVAL_S)
        scheduler.expire_leases()


async def serve(config: CoordinatorConfig) -> None:
    """Run until SIGTERM / SIGINT, then stop gracefully."""
    init_ray()
    server, port, scheduler = await create_server(config)
    host = config.listen.rsplit(":", 1)[0]
    # Parsed by the local farm launcher: keep the format.
    print(f"edgefarm coordinator listening on {host}:{port}", flush=True)
    log.info("store: %s", config.store_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_leases(scheduler))
    await stop.wait()
    log.info("shutting down")
    watcher.cancel()
    await server.stop(grace=2.0)
    scheduler.store.close()

"""The coordinator daemon: Ray, the store, the scheduler and both gRPC services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.artifacts import ArtifactStore
from coordinator.campaigns import CampaignPlanner
from coordinator.control import ControlService
from coordinator.gateway import AgentGateway
from coordinator.preparation import Preparer, init_ray
from coordinator.scheduler import HEARTBEAT_INTERVAL_S, LEASE_DURATION_S, MAX_ATTEMPTS, Scheduler
from coordinator.store_writer import StoreWriter
from edgefarm.transport import ServerTls, is_loopback, server_credentials
from edgefarm.wire_limits import MAX_MESSAGE_BYTES
from protos.edgefarm.v1 import agent_pb2_grpc, control_pb2_grpc
from results.store import ResultsStore

log = logging.getLogger(__name__)

LEASE_CHECK_INTERVAL_S = 0.5
GIL_SWITCH_INTERVAL_S = 0.001
PLAINTEXT_WARNING = (
    "INSECURE: serving plaintext gRPC on %s, reachable from other machines: the fleet "
    "token, agent credentials and results cross the network in clear text and can be "
    "read or altered; serve TLS (--tls-cert/--tls-key), or pass --insecure to accept this"
)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),  # result queries can be large
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.server.max_pending_requests", 10_000),
    # A connection that stops answering pings (a black-holed agent) is closed within
    # ~15 s, so its stream stops counting as connected; agents ping every 10 s too.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
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
    tls: ServerTls | None = None  # serve TLS (mutual TLS with a client CA)
    insecure: bool = False  # plaintext on a non-loopback address was asked for explicitly
    # Submitted specs may name file: paths under this folder (else only uploads count).
    model_root: Path | None = None


async def create_server(config: CoordinatorConfig) -> tuple[grpc.aio.Server, int, Scheduler]:
    """Build and start the gRPC server; returns (server, bound port, scheduler)."""
    credentials = server_credentials(config.tls) if config.tls is not None else None
    store = ResultsStore.open(config.store_url)
    artifacts = ArtifactStore(config.home / "artifacts")
    scheduler = Scheduler(
        store,
        lease_duration_s=config.lease_duration_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
        max_attempts=config.max_attempts,
        writer=StoreWriter(background=True, ingest_url=config.store_url),
    )
    scheduler.restore(store.unfinished_tasks())
    planner = CampaignPlanner(scheduler, Preparer(store, artifacts, config.home / "hub-cache"))
    server = grpc.aio.server(options=GRPC_OPTIONS)
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(
        AgentGateway(scheduler, artifacts, config.token), server
    )
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlService(
            planner,
            config.token,
            config.inventory,
            missing_after_s=3 * config.heartbeat_interval_s,
            model_root=config.model_root,
        ),
        server,
    )
    if credentials is not None:
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    return server, port, scheduler


def say_transport(config: CoordinatorConfig) -> None:
    """One line on how clients reach this coordinator; a loud one for plaintext that
    other machines can reach, unless the operator chose it with --insecure."""
    if config.tls is not None:
        mutual = ", client certificates required" if config.tls.client_ca else ""
        log.info("serving TLS on %s%s", config.listen, mutual)
    elif is_loopback(config.listen):
        log.info("serving plaintext on loopback %s", config.listen)
    elif config.insecure:
        log.info("serving plaintext on %s (--insecure)", config.listen)
    else:
        log.warning(PLAINTEXT_WARNING, config.listen)


async def _watch_leases(scheduler: Scheduler) -> None:
    while True:
        await asyncio.sleep(LEASE_CHECK_INTERVAL_S)
        scheduler.expire_leases()
        scheduler.flush_heartbeats()


async def serve(config: CoordinatorConfig) -> None:
    """Run until SIGTERM / SIGINT, then stop gracefully."""
    # Threads that decode a large result hold the GIL in turns of this length; the
    # default 5 ms makes every hop of another agent's message wait that long (measured
    # with benchmarks/heartbeat_under_load.py: heartbeat p99 85 ms at 5 ms, 31 ms at 1 ms).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    say_transport(config)  # before Ray starts: the operator sees it at once
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
    scheduler.writer.close()
    scheduler.store.close()

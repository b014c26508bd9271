"""The coordinator daemon: Ray, the store, the scheduler, both gRPC services, the gRPC
health service and (optionally) Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # no stub

from coordinator.artifacts import ArtifactStore
from coordinator.campaigns import CampaignPlanner
from coordinator.control import ControlService
from coordinator.fleet_view import FORGET_AFTER_S
from coordinator.gateway import REGISTER_BURST, REGISTER_PER_S, AgentGateway, RateLimiter
from coordinator.gc_policy import CollectionPauses, keep_collections_short
from coordinator.metrics import CoordinatorMetrics, MetricsServer, serve_metrics
from coordinator.preparation import Preparer
from coordinator.ray_cluster import init_ray
from coordinator.scheduler import (
    HEARTBEAT_INTERVAL_S,
    LEASE_DURATION_S,
    MAX_ATTEMPTS,
    CloseMessage,
    Scheduler,
)
from coordinator.store_writer import StoreWriter
from edgefarm.transport import ServerTls, is_loopback, server_credentials
from edgefarm.wire_limits import MAX_MESSAGE_BYTES
from protos.edgefarm.v1 import agent_pb2_grpc, control_pb2_grpc
from results.store import ResultsStore

log = logging.getLogger(__name__)

LEASE_CHECK_INTERVAL_S = 0.5
STOP_GRACE_S = 5.0  # on SIGTERM, calls in flight (a submission, a query) get this long
LAST_GRACE_S = 2.0  # then gRPC's own stop waits this much longer before cancelling
HEALTH_NOTICE_S = 0.1  # how long health watchers get to hear NOT_SERVING
# Health-checked names: the whole server ("") and each service.
HEALTH_SERVICES = ("", "edgefarm.v1.AgentGateway", "edgefarm.v1.Control")


class HealthServicer(Protocol):
    """What the coordinator uses of ``grpc_health.v1.health.aio.HealthServicer``."""

    async def set(self, service: str, status: int) -> None:
        """Set ``service``'s status."""

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on."""


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
    # gRPC waits this long for a ping's answer (its default, 60 s, overrides the
    # keepalive timeout above: a black-holed stream lingered ~70 s without it).
    ("grpc.http2.ping_timeout_ms", 5_000),
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
    metrics_listen: str | None = None  # HOST:PORT for Prometheus metrics over HTTP
    register_burst: float = REGISTER_BURST  # registrations per peer address at once...
    register_per_s: float = REGISTER_PER_S  # ...and per second after that
    forget_after_s: float = FORGET_AFTER_S  # agents unseen this long leave the device list


class CallTracker(grpc.aio.ServerInterceptor):
    """Runs every call's handler in a task of its own, so that at shutdown the server,
    not gRPC, ends the calls still open: each ends with UNAVAILABLE, "coordinator
    shutting down". (A handler that gRPC cancels when the stop grace runs out logs
    ``Exception not handled ... CancelledError``.)"""

    def __init__(self) -> None:
        self.ending = False
        self._calls: dict[asyncio.Future[Any], bool] = {}  # running step -> streams out
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The handler, wrapped."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream), **codec)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream), **codec)

    def end_streams(self) -> None:
        """End every call that streams responses (watchers, agent streams, downloads)."""
        self.ending = True
        for step, streams in list(self._calls.items()):
            if streams:
                step.cancel()

    def end_all(self) -> None:
        """End every call still open."""
        self.ending = True
        for step in list(self._calls):
            step.cancel()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until no call is open; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    def _opened(self) -> None:
        self._open += 1
        self._idle.clear()

    def _closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._idle.set()

    async def _step(
        self, awaitable: Awaitable[Any], streams: bool, context: grpc.aio.ServicerContext
    ) -> Any:
        """Await ``awaitable`` as a task that :meth:`end_streams` / :meth:`end_all` may
        cancel; a call so ended is aborted with UNAVAILABLE."""
        step = asyncio.ensure_future(awaitable)
        self._calls[step] = streams
        try:
            return await step
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not (self.ending and step.cancelled()) or (current and current.cancelling()):
                raise  # the call itself was cancelled (the client went away)
        finally:
            self._calls.pop(step, None)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down")

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(behavior):
            return behavior  # a blocking handler (gRPC runs it on a thread): left as is

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._opened()
            try:
                return await self._step(behavior(request, context), False, context)
            finally:
                self._closed()

        return call

    def _stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write

            async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
                self._opened()
                try:
                    await self._step(behavior(request, context), True, context)
                finally:
                    self._closed()

            return written

        async def generated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._opened()
            responses = behavior(request, context)
            try:
                while True:
                    try:
                        response = await self._step(anext(responses), True, context)
                    except StopAsyncIteration:
                        return
                    yield response
            finally:
                with contextlib.suppress(Exception):
                    await responses.aclose()
                self._closed()

        return generated


@dataclass
class Coordinator:
    """A started coordinator: its gRPC server and what it serves."""

    server: grpc.aio.Server
    port: int
    scheduler: Scheduler
    health: HealthServicer
    metrics: CoordinatorMetrics
    calls: CallTracker

    async def shutdown(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop gracefully: report NOT_SERVING, stop leasing and taking calls, let
        results being written finish (and be acknowledged), close the agents' streams,
        give other calls in flight ``grace_s``, end what is left on the loop and close
        the store. The lease watcher must be stopped first."""
        await self.health.enter_graceful_shutdown()
        self.scheduler.stop_leasing()
        # From here on no new call is taken (an agent reconnecting at once is refused);
        # calls in flight go on until they end or ``grace_s`` has passed.
        stopping = asyncio.create_task(self.server.stop(grace_s + LAST_GRACE_S))
        await asyncio.sleep(HEALTH_NOTICE_S)  # health watchers hear NOT_SERVING
        await _results_written(self.scheduler, grace_s)
        for session in self.scheduler.online_sessions():
            # The stream ends with this status; the agent reconnects with backoff.
            session.outbox.put_nowait(CloseMessage("UNAVAILABLE", "coordinator shutting down"))
        self.calls.end_streams()
        if not await self.calls.wait_idle(grace_s):
            self.calls.end_all()
        await stopping
        await _end_leftover_tasks(grace_s)
        self.scheduler.writer.close()
        self.scheduler.store.close()


async def start_coordinator(
    config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None
) -> Coordinator:
    """Build and start the gRPC server (both services and the health service)."""
    credentials = server_credentials(config.tls) if config.tls is not None else None
    metrics = metrics or CoordinatorMetrics()
    store = ResultsStore.open(config.store_url)
    artifacts = ArtifactStore(config.home / "artifacts")
    scheduler = Scheduler(
        store,
        lease_duration_s=config.lease_duration_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
        max_attempts=config.max_attempts,
        writer=StoreWriter(background=True, ingest_url=config.store_url, store=store),
        events=metrics,
    )
    scheduler.writer.start_ingestion()
    metrics.watch(scheduler)
    scheduler.restore(store.unfinished_tasks())
    scheduler.fleet.forget_after_s = config.forget_after_s
    scheduler.fleet.load(store.list_devices_seen(), store.agent_identities())
    planner = CampaignPlanner(scheduler, Preparer(store, artifacts, config.home / "hub-cache"))
    calls = CallTracker()
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[calls])
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(
        AgentGateway(
            scheduler,
            artifacts,
            config.token,
            register_limiter=RateLimiter(config.register_burst, config.register_per_s),
        ),
        server,
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
    health: HealthServicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if credentials is not None:
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    planner.resume()  # campaigns a stop cut short while they were being prepared
    return Coordinator(server, port, scheduler, health, metrics, calls)


async def create_server(config: CoordinatorConfig) -> tuple[grpc.aio.Server, int, Scheduler]:
    """Build and start the gRPC server; returns (server, bound port, scheduler)."""
    coordinator = await start_coordinator(config)
    return coordinator.server, coordinator.port, coordinator.scheduler


async def _results_written(scheduler: Scheduler, timeout_s: float) -> None:
    """Wait (up to ``timeout_s``) until no accepted result is still being written, so
    its acknowledgement goes out before the streams close."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(lease.storing is not None for lease in list(scheduler.leases.values())):
            return
        await asyncio.sleep(0.05)


async def _end_leftover_tasks(timeout_s: float) -> None:
    """Cancel and await what still runs on the loop (a stream's reader, a watcher's
    wait), so nothing is destroyed pending when the loop closes."""
    current = asyncio.current_task()
    leftover = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftover:
        task.cancel()
    if leftover:
        await asyncio.wait(leftover, timeout=timeout_s)


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


def _on_stop_signal(stop: asyncio.Event) -> None:
    """The first SIGTERM / SIGINT stops gracefully; a second one exits at once (a local
    Ray cluster is still stopped, by its watchdog)."""
    if not stop.is_set():
        stop.set()
        return
    log.warning("second stop signal: exiting without waiting")
    os._exit(1)


async def serve(config: CoordinatorConfig) -> None:
    """Run until SIGTERM / SIGINT, then stop gracefully (see :meth:`Coordinator.shutdown`);
    a local Ray cluster stops with the coordinator, however it ends."""
    # Threads that decode a large result hold the GIL in turns of this length; the
    # default 5 ms makes every hop of another agent's message wait that long (measured
    # with benchmarks/heartbeat_under_load.py: heartbeat p99 85 ms at 5 ms, 31 ms at 1 ms).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    say_transport(config)  # before Ray starts: the operator sees it at once
    metrics = CoordinatorMetrics()
    metrics_server: MetricsServer | None = None
    if config.metrics_listen:  # before Ray too: a port in use fails at once
        metrics_server = serve_metrics(metrics.registry, config.metrics_listen)
        # Parsed by the local farm launcher (before the next line): keep the format.
        print(f"edgefarm coordinator metrics on {metrics_server.address}", flush=True)
    try:
        cluster = init_ray()
        try:
            await _serve(config, metrics)
        finally:
            cluster.shutdown()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        log.info("stopped")


async def _serve(config: CoordinatorConfig, metrics: CoordinatorMetrics) -> None:
    """Serve until a stop signal, then shut down gracefully."""
    stop = asyncio.Event()
    # After Ray: ray.init sets a SIGTERM handler of its own (sys.exit wherever the loop
    # is); this one replaces it.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, _on_stop_signal, stop)
    coordinator = await start_coordinator(config, metrics)
    host = config.listen.rsplit(":", 1)[0]
    # Parsed by the local farm launcher: keep the format.
    print(f"edgefarm coordinator listening on {host}:{coordinator.port}", flush=True)
    log.info("store: %s", config.store_url)
    pauses = CollectionPauses()
    pauses.install()
    metrics.watch_collections(pauses)
    watchers = [
        asyncio.create_task(_watch_leases(coordinator.scheduler)),
        asyncio.create_task(keep_collections_short()),
    ]
    await stop.wait()
    log.info("shutting down")
    for watcher in watchers:
        watcher.cancel()
    for watcher in watchers:
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    pauses.uninstall()
    await coordinator.shutdown()

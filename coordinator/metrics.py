"""Prometheus metrics of the coordinator, served over HTTP on ``--metrics-listen``.

Counters and the ingestion histogram are fed by the scheduler's event hooks
(:class:`CoordinatorMetrics` is a :class:`~coordinator.scheduler.SchedulerEvents`);
gauges are read from the scheduler at scrape time. Scrapes run on the HTTP server's
own thread while the event loop goes on changing the scheduler, so a scrape only
copies containers (``list(...)``) and reads plain attributes, never mutates, and
retries once when a container changed under it. Labels come from small fixed sets:
any reason the sets do not know counts as ``other``.

Metrics (all prefixed ``edgefarm_``):

- ``edgefarm_agents{state}``: registered agents by state (connected, silent, draining,
  disconnected)
- ``edgefarm_tasks{state}``: unfinished tasks by state (pending, leased)
- ``edgefarm_queue_depth``: tasks waiting for an agent
- ``edgefarm_grpc_streams``: open agent streams
- ``edgefarm_lease_expiries_total``: leases that ran out before their result came
- ``edgefarm_requeues_total{reason}``: tasks put back in the queue
- ``edgefarm_results_refused_total{reason}``: results refused
- ``edgefarm_result_ingestion_seconds``: from a result's arrival to the end of its write
- ``edgefarm_gc_collections_total{generation}``, ``edgefarm_gc_pause_seconds_total{generation}``
  and ``edgefarm_gc_longest_pause_seconds{generation}``: the garbage collector's stops of
  the coordinator process (see :mod:`coordinator.gc_policy`)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.gc_policy import CollectionPauses
from coordinator.scheduler import AgentSession, Scheduler, SchedulerEvents
from edgefarm.errors import UsageError
from edgefarm.wire_limits import SILENT_AFTER_HEARTBEATS

log = logging.getLogger(__name__)

AGENT_STATES = ("connected", "silent", "draining", "disconnected")
TASK_STATES = ("pending", "leased")
OTHER = "other"
# (words in the scheduler's reason, label): the first match names the label.
REQUEUE_REASONS = (
    ("expired", "lease_expired"),
    ("revoked", "agent_revoked"),
    ("abandon", "abandoned"),
)
REFUSAL_REASONS = (
    ("invalid", "invalid"),  # first: its detail is free text
    ("superseded", "lease_superseded"),
    ("another agent", "other_agent"),
    ("expired", "lease_expired"),
    ("no lease", "no_lease"),
)
INGESTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

T = TypeVar("T")


def reason_label(reason: str, known: Iterable[tuple[str, str]]) -> str:
    """The bounded label for a free-text ``reason`` (``other`` when none fits)."""
    text = reason.lower()
    return next((label for words, label in known if words in text), OTHER)


def agent_state(session: AgentSession, now: float, silent_after_s: float) -> str:
    """One of :data:`AGENT_STATES` for a session."""
    if not session.connected:
        return "disconnected"
    if getattr(session, "draining", False):
        return "draining"
    if now - session.last_heartbeat > silent_after_s:
        return "silent"
    return "connected"


def _snapshot(copy: Callable[[], T], fallback: T) -> T:
    """``copy()`` of a container the event loop may be changing; retried on a race."""
    for _ in range(3):
        try:
            return copy()
        except RuntimeError:  # changed size during iteration
            continue
    return fallback


class CoordinatorMetrics(SchedulerEvents):
    """The coordinator's metrics in their own registry; pass it to the scheduler as
    ``events``, then :meth:`watch` the scheduler for the scrape-time gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.lease_expiries = Counter(
            "edgefarm_lease_expiries",
            "Leases that ran out before their result came.",
            registry=self.registry,
        )
        self.requeues = Counter(
            "edgefarm_requeues",
            "Tasks put back in the queue, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.refused = Counter(
            "edgefarm_results_refused",
            "Results refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.ingestion = Histogram(
            "edgefarm_result_ingestion_seconds",
            "Seconds from a result's arrival to the end of its store write.",
            buckets=INGESTION_BUCKETS,
            registry=self.registry,
        )
        for _, label in REQUEUE_REASONS:
            self.requeues.labels(label)
        for _, label in REFUSAL_REASONS:
            self.refused.labels(label)
        self._scheduler: Scheduler | None = None

    # ----- scheduler events (on the event loop) ------------------------------

    def lease_expired(self) -> None:
        """Count a lease expiry."""
        self.lease_expiries.inc()

    def requeued(self, why: str) -> None:
        """Count a re-queue under its bounded reason."""
        self.requeues.labels(reason_label(why, REQUEUE_REASONS)).inc()

    def result_refused(self, reason: str) -> None:
        """Count a refused result under its bounded reason."""
        self.refused.labels(reason_label(reason, REFUSAL_REASONS)).inc()

    def result_stored(self, seconds: float) -> None:
        """Observe one result's ingestion time."""
        self.ingestion.observe(max(0.0, seconds))

    # ----- scrape-time gauges -------------------------------------------------

    def watch(self, scheduler: Scheduler) -> None:
        """Report ``scheduler``'s live state at each scrape."""
        if self._scheduler is None:
            self.registry.register(_SchedulerCollector(scheduler))
        self._scheduler = scheduler

    def watch_collections(self, pauses: CollectionPauses) -> None:
        """Report the garbage collector's stops counted by ``pauses`` at each scrape."""
        self.registry.register(_CollectionCollector(pauses))


class _CollectionCollector(Collector):
    """The garbage collector's stops of this process, per generation, at scrape time."""

    def __init__(self, pauses: CollectionPauses) -> None:
        self.pauses = pauses

    def collect(self) -> Iterator[Metric]:
        pauses = self.pauses
        count = CounterMetricFamily(
            "edgefarm_gc_collections",
            "Garbage collections of the coordinator process, by generation.",
            labels=["generation"],
        )
        seconds = CounterMetricFamily(
            "edgefarm_gc_pause_seconds",
            "Seconds the garbage collector stopped the coordinator process, by generation.",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "edgefarm_gc_longest_pause_seconds",
            "The longest garbage-collector stop so far, by generation.",
            labels=["generation"],
        )
        for generation in range(3):
            label = [str(generation)]
            count.add_metric(label, pauses.count[generation])
            seconds.add_metric(label, pauses.seconds[generation])
            longest.add_metric(label, pauses.longest[generation])
        yield from (count, seconds, longest)


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler at scrape time (off the event loop)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        sessions: list[AgentSession] = _snapshot(lambda: list(scheduler.sessions.values()), [])
        silent_after = SILENT_AFTER_HEARTBEATS * scheduler.heartbeat_interval_s
        now = scheduler.clock()
        agents = dict.fromkeys(AGENT_STATES, 0)
        for session in sessions:
            agents[agent_state(session, now, silent_after)] += 1
        pending = len(scheduler.pending)
        leased = len(scheduler.leases)

        family = GaugeMetricFamily(
            "edgefarm_agents", "Registered agents by state.", labels=["state"]
        )
        for state, count in agents.items():
            family.add_metric([state], count)
        yield family
        family = GaugeMetricFamily("edgefarm_tasks", "Unfinished tasks by state.", labels=["state"])
        family.add_metric(["pending"], pending)
        family.add_metric(["leased"], leased)
        yield family
        yield GaugeMetricFamily(
            "edgefarm_queue_depth", "Tasks waiting for an agent.", value=pending
        )
        yield GaugeMetricFamily(
            "edgefarm_grpc_streams",
            "Open agent streams.",
            value=float(sum(1 for session in sessions if session.connected)),
        )


@dataclass
class MetricsServer:
    """The HTTP endpoint serving a registry; :meth:`close` stops it."""

    server: WSGIServer
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as bound (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"metrics address must be HOST:PORT, got {listen!r}")
    return host, int(port)


def serve_metrics(registry: CollectorRegistry, listen: str) -> MetricsServer:
    """Serve ``registry`` on ``listen`` (HOST:PORT) from a daemon thread."""
    host, port = parse_listen(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise UsageError(f"cannot serve metrics on {listen}: {error}") from error
    bound = MetricsServer(server, host, int(server.server_port))
    log.info("serving metrics on http://%s/metrics", bound.address)
    return bound

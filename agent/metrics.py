"""The agent's Prometheus metrics, served over HTTP on ``--metrics-listen HOST:PORT``.

Each :class:`AgentMetrics` has its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so several agents or tests in one process never share
or collide on series. The artifact cache's size and hit counts are read at scrape time.

- ``edgefarm_agent_tasks_total{outcome}``: tasks run, by outcome
  (``ok`` | ``failed`` | ``cancelled`` | ``abandoned``);
- ``edgefarm_agent_task_failures_total{kind}``: failed tasks by error kind
  (e.g. ``timeout``, ``backend_crash``);
- ``edgefarm_agent_artifact_cache_bytes``: bytes in the artifact cache;
- ``edgefarm_agent_artifact_cache_hits_total`` / ``..._misses_total``: artifact fetches
  served from the cache / downloaded;
- ``edgefarm_agent_draining``: 1 while the agent is stopping (finishing its task), else 0;
- ``edgefarm_agent_connected``: 1 while its stream to the coordinator is open, else 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefarm.errors import ConfigError

if TYPE_CHECKING:
    from agent.artifact_cache import ArtifactCache

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "failed", "cancelled", "abandoned")


class _CacheCollector(Collector):
    """The artifact caches' size and hit/miss counts, read when scraped."""

    def __init__(self) -> None:
        self.caches: list[ArtifactCache] = []

    def collect(self) -> Iterator[Any]:
        size = GaugeMetricFamily(
            "edgefarm_agent_artifact_cache_bytes", "Bytes held in the artifact cache."
        )
        size.add_metric([], float(sum(cache.size_bytes() for cache in self.caches)))
        hits = CounterMetricFamily(
            "edgefarm_agent_artifact_cache_hits",
            "Artifact fetches served from the cache.",
        )
        hits.add_metric([], float(sum(cache.hits for cache in self.caches)))
        misses = CounterMetricFamily(
            "edgefarm_agent_artifact_cache_misses",
            "Artifact fetches that needed a download.",
        )
        misses.add_metric([], float(sum(cache.misses for cache in self.caches)))
        yield from (size, hits, misses)


class AgentMetrics:
    """An agent process's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "edgefarm_agent_tasks",
            "Tasks run by this agent, by outcome (ok, failed, cancelled, abandoned).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.tasks.labels(outcome=outcome)  # every outcome shows, at 0, from the start
        self.failures = Counter(
            "edgefarm_agent_task_failures",
            "Failed tasks by error kind.",
            ["kind"],
            registry=self.registry,
        )
        self.draining = Gauge(
            "edgefarm_agent_draining",
            "1 while the agent is stopping: it finishes its task and takes no new one.",
            registry=self.registry,
        )
        self.connected = Gauge(
            "edgefarm_agent_connected",
            "1 while the agent's stream to the coordinator is open.",
            registry=self.registry,
        )
        self._caches = _CacheCollector()
        self.registry.register(self._caches)
        self._server: Any = None

    def watch_cache(self, cache: ArtifactCache) -> None:
        """Report ``cache`` (its size is read at each scrape)."""
        self._caches.caches.append(cache)

    def task_done(self, outcome: str, error_kind: str = "") -> None:
        """Count one task that ended with ``outcome`` (and its error kind, if it failed)."""
        self.tasks.labels(outcome=outcome).inc()
        if outcome == "failed":
            self.failures.labels(kind=error_kind or "task_error").inc()

    def set_draining(self, draining: bool) -> None:
        """Record whether the agent is stopping."""
        self.draining.set(1 if draining else 0)

    def set_connected(self, connected: bool) -> None:
        """Record whether the stream to the coordinator is open."""
        self.connected.set(1 if connected else 0)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``HOST:PORT`` (port 0: any free port) in a daemon thread;
        the bound host and port."""
        host, port = parse_listen(listen)
        try:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise ConfigError(f"cannot serve agent metrics on {listen}: {error}") from None
        bound = self._server.server_address
        host, port = str(bound[0]), int(bound[1])
        shown = f"[{host}]" if ":" in host else host
        log.info("agent metrics on http://%s:%d/metrics", shown, port)
        return host, port

    def close(self) -> None:
        """Stop serving (if serving)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def text(self) -> str:
        """The metrics in Prometheus text format (what a scrape returns)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port number."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"--metrics-listen wants HOST:PORT (port 0: any free port), got {listen!r}"
        )
    return host, int(port_text)


def sample(text: str, name: str, labels: Iterable[tuple[str, str]] = ()) -> float | None:
    """The value of one series in Prometheus text (None if absent), for tests and checks."""
    want = ",".join(f'{k}="{v}"' for k, v in labels)
    series = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return None

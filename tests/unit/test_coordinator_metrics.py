"""Coordinator metrics: gauges read from a live scheduler, counters fed by its events,
the HTTP endpoint. A real SQLite store, a fake clock; no sockets but the endpoint's."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.metrics import (
    REFUSAL_REASONS,
    REQUEUE_REASONS,
    CoordinatorMetrics,
    parse_listen,
    reason_label,
    serve_metrics,
)
from coordinator.scheduler import AssignMessage, Scheduler
from edgefarm.domain import (
    CampaignStatus,
)
from edgefarm.errors import UsageError
from edgefarm.wire_limits import SILENT_AFTER_HEARTBEATS
from results.records import CampaignRecord
from results.store import ResultsStore
from tests.unit.scheduler_doubles import Clock, caps, result_for, task


@pytest.fixture
def farm(tmp_path: Path) -> tuple[Scheduler, Clock, CoordinatorMetrics]:
    store = ResultsStore.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    clock = Clock()
    metrics = CoordinatorMetrics()
    scheduler = Scheduler(store, lease_duration_s=10, max_attempts=3, clock=clock, events=metrics)
    metrics.watch(scheduler)
    return scheduler, clock, metrics


def value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def assigned(scheduler: Scheduler, agent_id: str) -> AssignMessage:
    outbox = scheduler.sessions[agent_id].outbox
    while not outbox.empty():
        message = outbox.get_nowait()
        if isinstance(message, AssignMessage):
            return message
    raise AssertionError("no assignment")


def test_gauges_read_agents_and_tasks_from_the_scheduler(
    farm: tuple[Scheduler, Clock, CoordinatorMetrics],
) -> None:
    scheduler, clock, metrics = farm
    sessions = {
        name: scheduler.register(name, name, {}, caps(f"dev-{name}"))
        for name in ("busy", "silent", "draining", "gone")
    }
    for name in ("busy", "silent", "draining"):
        scheduler.connect(sessions[name])
    sessions["draining"].draining = True
    clock.now += SILENT_AFTER_HEARTBEATS * scheduler.heartbeat_interval_s + 1
    sessions["busy"].last_heartbeat = clock.now
    sessions["draining"].last_heartbeat = clock.now
    tasks = [task(1, "dev-busy"), task(2, "dev-busy"), task(3, "dev-nobody")]
    scheduler.store.create_campaign(
        CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks
    )
    scheduler.add_tasks(tasks)

    assert value(metrics, "edgefarm_agents", state="connected") == 1
    assert value(metrics, "edgefarm_agents", state="silent") == 1
    assert value(metrics, "edgefarm_agents", state="draining") == 1
    assert value(metrics, "edgefarm_agents", state="disconnected") == 1
    assert value(metrics, "edgefarm_tasks", state="leased") == 1
    assert value(metrics, "edgefarm_tasks", state="pending") == 2
    assert value(metrics, "edgefarm_queue_depth") == 2
    assert value(metrics, "edgefarm_grpc_streams") == 3


def test_counters_and_ingestion_follow_scheduler_events(
    farm: tuple[Scheduler, Clock, CoordinatorMetrics],
) -> None:
    scheduler, clock, metrics = farm
    session = scheduler.register("a", "a", {}, caps("dev-a"))
    scheduler.connect(session)
    tasks = [task(1, "dev-a")]
    scheduler.store.create_campaign(
        CampaignRecord("c1", "c", "", CampaignStatus.RUNNING, 0.0), tasks
    )
    assert value(metrics, "edgefarm_lease_expiries_total") == 0
    scheduler.add_tasks(tasks)
    first = assigned(scheduler, session.agent_id)
    clock.now += 11  # the lease lapses; the task comes back to the only agent
    session.last_heartbeat = clock.now
    assert scheduler.expire_leases() == 1
    assert value(metrics, "edgefarm_lease_expiries_total") == 1
    assert value(metrics, "edgefarm_requeues_total", reason="lease_expired") == 1
    second = assigned(scheduler, session.agent_id)

    ack = asyncio.run(
        scheduler.accept_result(session, result_for(second, session.agent_id, "dev-a"))
    )
    assert ack.accepted
    assert value(metrics, "edgefarm_result_ingestion_seconds_count") == 1
    assert value(metrics, "edgefarm_tasks", state="leased") == 0
    unknown = replace(result_for(first, session.agent_id, "dev-a"), task_id="t-unknown")
    refused = asyncio.run(scheduler.accept_result(session, unknown))
    assert not refused.accepted
    assert value(metrics, "edgefarm_results_refused_total", reason="no_lease") == 1
    text = exposition(metrics)
    assert 'edgefarm_results_refused_total{reason="lease_superseded"} 0.0' in text


def exposition(metrics: CoordinatorMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_reason_labels_are_a_small_fixed_set() -> None:
    assert reason_label("lease expired", REQUEUE_REASONS) == "lease_expired"
    assert reason_label("agent revoked", REQUEUE_REASONS) == "agent_revoked"
    assert reason_label("abandoned", REQUEUE_REASONS) == "abandoned"
    assert reason_label("Lease superseded", REFUSAL_REASONS) == "lease_superseded"
    assert reason_label("lease held by another agent", REFUSAL_REASONS) == "other_agent"
    assert reason_label("no lease in force for this task", REFUSAL_REASONS) == "no_lease"
    assert reason_label("task 7f3a... from 10.0.0.9: weird", REFUSAL_REASONS) == "other"
    assert reason_label("invalid result: trial 2 expired", REFUSAL_REASONS) == "invalid"
    metrics = CoordinatorMetrics()
    for i in range(50):
        metrics.result_refused(f"unheard-of reason {i}")
    assert value(metrics, "edgefarm_results_refused_total", reason="other") == 50


def test_metrics_are_served_over_http_on_a_free_port() -> None:
    metrics = CoordinatorMetrics()
    metrics.lease_expired()
    server = serve_metrics(metrics.registry, "127.0.0.1:0")
    try:
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert "edgefarm_lease_expiries_total 1.0" in text
        assert "python_gc_objects_collected_total" not in text  # a registry of its own
    finally:
        server.close()


@pytest.mark.parametrize("bad", ["", "8080", "host:", "host:http", "host:70000", ":9000"])
def test_a_malformed_metrics_address_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_listen(bad)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)

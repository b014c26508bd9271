"""The agent's Prometheus metrics: counted by a real agent, served over HTTP, own registry."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import prometheus_client
import pytest

from agent.client import Agent
from agent.metrics import AgentMetrics, parse_listen, sample
from edgefarm.errors import ConfigError
from tests.unit.test_agent_drain import (
    MODEL,
    Coordinator,
    SleepyExecutor,
    run_scenario,
    until,
)


def scrape(address: tuple[str, int]) -> str:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return str(reply.read().decode("utf-8"))


def test_a_running_agent_counts_tasks_failures_cache_and_draining(tmp_path: Path) -> None:
    sleepy = SleepyExecutor()
    metrics = AgentMetrics()
    address = metrics.serve("127.0.0.1:0")
    assert address[1] > 0
    try:
        before = scrape(address)
        assert sample(before, "edgefarm_agent_tasks_total", [("outcome", "ok")]) == 0
        assert sample(before, "edgefarm_agent_draining") == 0
        assert sample(before, "edgefarm_agent_connected") == 0

        async def scenario(c: Coordinator, agent: Agent, running: asyncio.Task[None]) -> None:
            assert agent.metrics is metrics
            await until(agent.connected.is_set)
            assert sample(scrape(address), "edgefarm_agent_connected") == 1
            c.fake.assign("t-ok", sleep_s="0.05")
            c.fake.assign("t-bad", sleep_s="0.05", fail="1")
            await until(lambda: len(c.fake.of_kind("result")) == 2 and not agent.unacked)
            c.fake.assign("t-long", sleep_s="60")
            await asyncio.wait_for(sleepy.running.wait(), 10)
            agent.stop(drain_timeout_s=30)
            assert sample(scrape(address), "edgefarm_agent_draining") == 1
            agent.stop()  # a second stop: the task is given up
            await asyncio.wait_for(running, 10)

        run_scenario(tmp_path, scenario, sleepy, metrics)
        text = scrape(address)
    finally:
        metrics.close()
    tasks = "edgefarm_agent_tasks_total"
    assert sample(text, tasks, [("outcome", "ok")]) == 1
    assert sample(text, tasks, [("outcome", "failed")]) == 1
    assert sample(text, tasks, [("outcome", "abandoned")]) == 1
    assert sample(text, tasks, [("outcome", "cancelled")]) == 0
    assert sample(text, "edgefarm_agent_task_failures_total", [("kind", "timeout")]) == 1
    # Three tasks on one model: downloaded once, then served from the cache.
    assert sample(text, "edgefarm_agent_artifact_cache_misses_total") == 1
    assert sample(text, "edgefarm_agent_artifact_cache_hits_total") == 2
    assert sample(text, "edgefarm_agent_artifact_cache_bytes") == len(MODEL)
    assert sample(text, "edgefarm_agent_draining") == 1
    assert sample(text, "edgefarm_agent_connected") == 0  # the stream closed on stopping


def test_each_agent_has_its_own_registry() -> None:
    one, two = AgentMetrics(), AgentMetrics()
    one.task_done("failed", "backend_crash")
    crashes = ("edgefarm_agent_task_failures_total", [("kind", "backend_crash")])
    assert sample(one.text(), *crashes) == 1
    assert sample(two.text(), *crashes) is None
    global_text = prometheus_client.generate_latest().decode()
    assert "edgefarm_agent_" not in global_text


@pytest.mark.parametrize("listen", ["9100", "host:", ":9100", "host:99999", "host:http"])
def test_a_bad_listen_address_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(listen)


def test_listen_addresses_parse() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9101") == ("::1", 9101)

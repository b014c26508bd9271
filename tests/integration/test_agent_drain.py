"""Stopping an agent process with SIGTERM mid-task, on a real farm on loopback.

One coordinator (local Ray, long leases, so that only the agent's own word re-queues a
task quickly) serves both tests; each starts its own agent process with
``--metrics-listen`` and a noop task whose trial sleeps. The second test leaves its task
pending: keep it last.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.metrics import sample
from coordinator.localfarm import LocalFarm
from edgefarm.domain import TaskStatus
from results.store import ResultsStore
from tests.integration.conftest import ROOT, wait_until, write_spec

pytestmark = pytest.mark.integration
pytest.importorskip("ray", reason="the coordinator extra is not installed")

LEASE_S = 30.0  # far longer than any wait below: a quick re-queue is the agent's doing
METRICS_LINE = re.compile(r"agent metrics on http://([\d.]+):(\d+)/metrics")


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    tmp = tmp_path_factory.mktemp("drain-farm")
    farm = LocalFarm(
        home=tmp / "home",
        store_url=f"sqlite:///{tmp / 'r.sqlite'}",
        agents=0,
        lease_s=LEASE_S,
        heartbeat_s=0.5,
    )
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


class AgentProcess:
    """``edgefarm agent serve`` in a process of its own, its output in a log file."""

    def __init__(self, farm: LocalFarm, name: str, *extra: str) -> None:
        self.log_path = farm.log_dir / f"agent-{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "edgefarm.cli.main",
            "agent",
            "serve",
            "--coordinator",
            farm.address,
            "--token",
            farm.token,
            "--name",
            name,
            "--work-dir",
            str(farm.home / f"agent-{name}"),
            "--metrics-listen",
            "127.0.0.1:0",
            *extra,
        ]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(lambda: METRICS_LINE.search(self.log()) is not None, 60, "the metrics line")
        match = METRICS_LINE.search(self.log())
        assert match is not None
        self.metrics_url = f"http://{match.group(1)}:{match.group(2)}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return str(reply.read().decode("utf-8"))

    def metric(self, name: str, labels: list[tuple[str, str]] | None = None) -> float | None:
        return sample(self.scrape(), name, labels or [])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def submit_sleeper(farm: LocalFarm, tmp: Path, name: str, sleep_s: float) -> str:
    """A one-task noop campaign whose trial sleeps ``sleep_s``; its task id."""
    spec = write_spec(
        tmp / f"{name}.yaml",
        name,
        ["none"],
        backend="noop",
        trials=1,
        min_duration_s=0.01,
        options=f'{{noop_sleep_s: "{sleep_s}"}}',
    )
    with farm.client() as client:
        reply = client.submit(spec.read_text(), str(spec))
    with ResultsStore.open(farm.store_url) as store:
        (task,) = store.tasks_for_campaign(reply.campaign_id)
    return task.task_id


def task_status(farm: LocalFarm, task_id: str) -> TaskStatus | None:
    with ResultsStore.open(farm.store_url) as store:
        task = store.get_task(task_id)
    return None if task is None else task.status


def wait_measuring(agent: AgentProcess) -> None:
    """Until the agent downloads its artifacts (model, eval data; its trial starts
    next), and a moment more."""
    wait_until(
        lambda: (agent.metric("edgefarm_agent_artifact_cache_misses_total") or 0) >= 1,
        60,
        "the artifact download",
    )
    time.sleep(1.5)


def test_sigterm_finishes_the_task_delivers_its_result_and_exits_0(
    farm: LocalFarm, tmp_path: Path
) -> None:
    agent = AgentProcess(farm, "drainer")
    try:
        farm.wait_for_agents(1)
        assert agent.metric("edgefarm_agent_artifact_cache_misses_total") == 0
        assert agent.metric("edgefarm_agent_draining") == 0
        task_id = submit_sleeper(farm, tmp_path, "drain", sleep_s=4)
        wait_measuring(agent)
        agent.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: agent.metric("edgefarm_agent_draining") == 1, 10, "draining")
        assert (agent.metric("edgefarm_agent_artifact_cache_bytes") or 0) > 0
        assert agent.proc.wait(timeout=60) == 0
    finally:
        agent.kill()
    assert task_status(farm, task_id) == TaskStatus.DONE
    with ResultsStore.open(farm.store_url) as store:
        task = store.get_task(task_id)
        assert task is not None
        rows = store.results_for_campaign(task.campaign_id)
        attempts = store.attempts_for_task(task_id)
    (row,) = rows  # stored exactly once
    assert row["ok"]
    # Measured from just before the trials to just after them (the trial sleeps 4 s).
    assert row["measure_ended_at"] - row["measure_started_at"] >= 4
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "result")]
    log = agent.log()
    assert f"result of {task_id} (attempt 1) acknowledged: accepted" in log
    assert "agent stopped: every result delivered" in log
    assert "Traceback" not in log


def test_past_the_drain_timeout_the_task_is_given_back_and_requeued_at_once(
    farm: LocalFarm, tmp_path: Path
) -> None:
    agent = AgentProcess(farm, "quitter", "--drain-timeout", "1")
    try:
        farm.wait_for_agents(1)
        task_id = submit_sleeper(farm, tmp_path, "quit", sleep_s=60)
        wait_measuring(agent)
        assert task_status(farm, task_id) == TaskStatus.ASSIGNED
        begun = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0
        assert time.monotonic() - begun < 10
        stopped = time.monotonic()
    finally:
        agent.kill()
    # Re-queued on the agent's word, long before its lease (LEASE_S) would have run out.
    wait_until(lambda: task_status(farm, task_id) == TaskStatus.PENDING, 5, "the re-queue")
    assert time.monotonic() - stopped < LEASE_S / 2
    with ResultsStore.open(farm.store_url) as store:
        (attempt,) = store.attempts_for_task(task_id)
    assert (attempt.attempt, attempt.outcome) == (1, "abandoned")
    assert "drain timeout" in attempt.reason and attempt.ended_at is not None
    log = agent.log()
    assert f"gave up task {task_id} (attempt 1): drain timeout" in log
    assert "agent stopped (drain timeout)" in log
    assert "Traceback" not in log

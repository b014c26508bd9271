"""The coordinator process with real processes on loopback: its local Ray dies with it
(SIGKILL too), SIGTERM stops it cleanly with an agent and watchers attached, and the
gRPC health service and the Prometheus endpoint answer while it runs."""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.localfarm import LocalFarm
from coordinator.ray_cluster import OWNER_ENV
from tests.integration.conftest import HEARTBEAT_S, LEASE_S, wait_until, write_spec

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

RAY_GONE_WITHIN_S = 10.0
SERVICES = ("", "edgefarm.v1.AgentGateway", "edgefarm.v1.Control")
NOISE = (
    "Traceback",
    "Exception not handled",
    "Task was destroyed",
    "was never awaited",
    "SIGTERM received",
)


def ray_family(pid: int) -> tuple[list[psutil.Process], str]:
    """The coordinator's descendants (its local Ray and the Ray watchdog) and the mark
    its Ray processes carry."""
    family = psutil.Process(pid).children(recursive=True)
    owner = ""
    for process in family:
        try:
            owner = owner or process.environ().get(OWNER_ENV, "")
        except psutil.Error:
            continue
    names = {process.name() for process in family}
    assert {"gcs_server", "raylet"} <= names, names
    assert owner, "no Ray process carries the owner mark"
    return family, owner


def still_running(family: list[psutil.Process], owner: str) -> list[str]:
    """What is left of a coordinator's Ray: its former descendants and marked processes."""
    left = {
        process.pid: process
        for process in family
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    }
    for process in psutil.process_iter():
        try:
            if process.environ().get(OWNER_ENV) == owner:
                left[process.pid] = process
        except psutil.Error:
            continue
    names = []
    for pid, process in left.items():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{pid} {process.name()}")
        except psutil.Error:
            continue
    return names


def wait_ray_gone(family: list[psutil.Process], owner: str, since: float) -> float:
    """Seconds from ``since`` until nothing of the Ray session is left (fails after
    :data:`RAY_GONE_WITHIN_S`)."""
    deadline = since + RAY_GONE_WITHIN_S
    while True:
        left = still_running(family, owner)
        if not left:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"Ray processes left after the coordinator: {left}"
        time.sleep(0.2)


def test_no_ray_process_outlives_a_killed_or_stopped_coordinator(tmp_path: Path) -> None:
    farm = LocalFarm(home=tmp_path / "home", store_url=f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        farm.start_coordinator()
        assert farm.coordinator_proc is not None
        family, owner = ray_family(farm.coordinator_proc.pid)
        killed_at = time.monotonic()
        farm.coordinator_proc.kill()  # the coordinator alone, not its process group
        assert farm.coordinator_proc.wait(timeout=10) == -signal.SIGKILL
        gone_s = wait_ray_gone(family, owner, killed_at)
        print(f"SIGKILL: Ray gone after {gone_s:.1f} s")

        farm.start_coordinator()  # again, on the same port; then stopped by the farm
        assert farm.coordinator_proc is not None
        family, owner = ray_family(farm.coordinator_proc.pid)
        stopped_at = time.monotonic()
        farm.stop()
        print(f"LocalFarm.stop: {time.monotonic() - stopped_at:.1f} s")
        assert still_running(family, owner) == []  # gone by the time stop() returns
        text = (farm.log_dir / "coordinator.log").read_text()
        assert text.count("shutting down") == 1 and "stopped" in text
        for noise in NOISE:
            assert noise not in text, text
    finally:
        farm.stop()


class HealthWatch:
    """A gRPC health Watch stream on its own thread, recording the statuses it gets."""

    def __init__(self, address: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(address)
        self.statuses: list[int] = []
        self.ended: grpc.StatusCode | None = None
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for reply in self.call:
                self.statuses.append(reply.status)
        except grpc.RpcError as error:
            self.ended = error.code()

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class CampaignWatch:
    """``WatchCampaign`` on its own thread, as ``campaign run`` does."""

    def __init__(self, farm: LocalFarm, campaign_id: str) -> None:
        self.client = farm.client()
        self.snapshots: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(campaign_id,), daemon=True)
        self.thread.start()

    def _run(self, campaign_id: str) -> None:
        try:
            for snapshot in self.client.watch(campaign_id):
                self.snapshots.append(snapshot.status)
        except Exception as error:  # the coordinator went away: expected here
            self.error = error

    def close(self) -> None:
        self.client.close()


def check_health(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = {
            service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            for service in SERVICES
        }
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    return statuses


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("edgefarm_"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[LocalFarm]:
    farm = LocalFarm(
        home=tmp_path / "home",
        store_url=f"sqlite:///{tmp_path / 'r.sqlite'}",
        agents=1,
        lease_s=LEASE_S,
        heartbeat_s=HEARTBEAT_S,
        metrics_listen="127.0.0.1:0",
    )
    try:
        farm.start()
        yield farm
    finally:
        farm.stop()


def test_health_metrics_and_a_clean_sigterm_with_an_agent_and_watchers(
    farm: LocalFarm, tmp_path: Path
) -> None:
    assert farm.coordinator_proc is not None and farm.metrics_address
    family, owner = ray_family(farm.coordinator_proc.pid)

    serving = health_pb2.HealthCheckResponse.SERVING
    assert check_health(farm.address) == dict.fromkeys(SERVICES, serving)

    # A task in hand (long enough to be measuring at SIGTERM) and a watcher on it.
    spec = write_spec(tmp_path / "spec.yaml", "ops", ["fp32"], min_duration_s=20, trials=1)
    with farm.client() as client:
        campaign_id = client.submit(spec.read_text(), str(spec)).campaign_id
    watcher = CampaignWatch(farm, campaign_id)
    health_watch = HealthWatch(farm.address)

    def leased() -> bool:
        samples = scrape(farm.metrics_address)
        return samples.get('edgefarm_tasks{state="leased"}') == 1

    wait_until(leased, 60, "the task to be leased")
    samples = scrape(farm.metrics_address)
    assert samples['edgefarm_agents{state="connected"}'] == 1
    assert samples['edgefarm_agents{state="disconnected"}'] == 0
    assert samples["edgefarm_grpc_streams"] == 1
    assert samples["edgefarm_queue_depth"] == 0
    assert samples["edgefarm_lease_expiries_total"] == 0
    assert "edgefarm_result_ingestion_seconds_count" in samples
    wait_until(lambda: bool(watcher.snapshots), 10, "the campaign watcher's first snapshot")
    wait_until(lambda: bool(health_watch.statuses), 10, "the health watch's first status")
    assert health_watch.statuses[:1] == [serving]

    coordinator = farm.coordinator_proc
    stopped_at = time.monotonic()
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=30) == 0
    exit_s = time.monotonic() - stopped_at
    gone_s = wait_ray_gone(family, owner, stopped_at)
    print(f"SIGTERM: exit 0 after {exit_s:.1f} s, Ray gone after {gone_s:.1f} s")
    farm.coordinator_proc = None

    health_watch.thread.join(10)
    watcher.thread.join(10)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health_watch.statuses
    assert watcher.error is not None  # its stream ended with the coordinator
    health_watch.close()
    watcher.close()
    for log in farm._logs:
        log.flush()
    text = (farm.log_dir / "coordinator.log").read_text()
    assert "shutting down" in text and "stopped" in text
    for noise in NOISE:
        assert noise not in text, text
    for name in list(farm.agent_procs):
        farm.kill_agent(name)  # its task is abandoned with the coordinator gone

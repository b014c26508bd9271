"""Integration fixtures: a real farm on loopback (coordinator with local Ray, agent
processes, real onnxruntime, a real SQLite file)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.localfarm import LocalFarm
from results.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]

# Short liveness settings so lost agents are noticed within seconds.
LEASE_S = 4.0
HEARTBEAT_S = 0.5


def write_spec(
    path: Path,
    name: str,
    schemes: list[str],
    *,
    source: str = "builtin:digits-mlp",
    min_duration_s: float = 0.2,
    trials: int = 2,
    backend: str = "onnxruntime",
    options: str = "{}",
) -> Path:
    """A small campaign spec on the digits model."""
    path.write_text(
        f"""name: {name}
models:
  - name: digits-mlp
    source: {source}
backends:
  - name: {backend}
    schemes: [{", ".join(schemes)}]
    options: {options}
measurement:
  warmup_iterations: 5
  min_iterations: 50
  min_duration_s: {min_duration_s}
  trials: {trials}
  threads: 1
  max_other_cpu_cores: 0  # record only: the tests share a loaded CI host
  timeout_s: 60
"""
    )
    return path


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the edgefarm command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "edgefarm.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def make_farm(tmp_path: Path) -> Iterator[Callable[[int], LocalFarm]]:
    """Start farms with N agents; all are stopped at the end of the test."""
    farms: list[LocalFarm] = []

    def start(agents: int) -> LocalFarm:
        farm = LocalFarm(
            home=tmp_path / "home",
            store_url=f"sqlite:///{tmp_path / 'r.sqlite'}",
            agents=agents,
            lease_s=LEASE_S,
            heartbeat_s=HEARTBEAT_S,
        )
        farms.append(farm)
        farm.start()
        return farm

    yield start
    for farm in farms:
        farm.stop()


def open_store(farm: LocalFarm) -> ResultsStore:
    """The farm's store, opened read-mostly beside the coordinator (WAL)."""
    return ResultsStore.open(farm.store_url)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

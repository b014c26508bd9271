"""The Ray watchdog with stand-in processes (no Ray): when the process that started it
dies, it kills the processes carrying that process's mark and every descendant it had
seen, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from coordinator.ray_cluster import OWNER_ENV, external_address

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")

FAKE_COORDINATOR = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from coordinator.ray_cluster import OWNER_ENV, start_watchdog

    owner = sys.argv[1]
    watchdog = start_watchdog(owner)
    marked = subprocess.Popen(["sleep", "300"], env={**os.environ, OWNER_ENV: owner})
    plain = subprocess.Popen(["sleep", "300"])  # like a Ray agent that retitled itself
    print(watchdog.pid, marked.pid, plain.pid, flush=True)
    if sys.argv[2] == "exit":
        sys.stdin.readline()
        sys.exit(0)
    time.sleep(300)
    """
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if not gone(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if not gone(pid)]


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_the_watchdog_kills_the_dead_coordinators_processes_only(how: str) -> None:
    owner = f"test-{os.getpid()}-{how}"
    bystander = subprocess.Popen(["sleep", "300"], env={**os.environ, OWNER_ENV: "another"})
    coordinator = subprocess.Popen(
        [sys.executable, "-c", FAKE_COORDINATOR, owner, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert coordinator.stdout is not None
        pids = [int(pid) for pid in coordinator.stdout.readline().split()]
        time.sleep(1.5)  # the watchdog notes the coordinator's descendants each second
        assert not any(gone(pid) for pid in pids)
        if how == "sigkill":
            coordinator.kill()
        else:
            assert coordinator.stdin is not None
            coordinator.stdin.write("\n")
            coordinator.stdin.flush()
        coordinator.wait(timeout=10)
        assert wait_gone(pids, 5.0) == []  # the watchdog too, once it has swept
        assert not gone(bystander.pid)
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        bystander.kill()
        bystander.wait()
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()


def test_only_a_named_cluster_is_external(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert external_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert external_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert external_address() == "ray://head:10001"

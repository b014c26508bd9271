"""The coordinator's Ray cluster: the one ``RAY_ADDRESS`` names, or a local one that
lives exactly as long as the coordinator.

A local cluster started by ``ray.init`` outlives a driver killed with SIGKILL (its
GCS, raylet, workers and agents linger for a minute or more). So before starting one,
the coordinator marks its environment with a fresh token (every Ray process it starts,
and every worker those start, inherits it) and starts a small watchdog process that
holds the read end of a pipe only the coordinator can write to, and notes the
coordinator's descendants now and then. When the coordinator exits, however it exits,
the pipe reaches end of file and the watchdog SIGKILLs every process carrying the token,
every noted descendant still running, and their descendants (Ray's agents retitle
themselves, which wipes the token from their environment). A cluster named by
``RAY_ADDRESS`` is never touched.

The watchdog is this module run as ``python -m coordinator.ray_cluster TOKEN``; it
imports only :mod:`psutil`. POSIX only (it waits on the pipe with ``select``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

OWNER_ENV = "EDGEFARM_RAY_OWNER"  # marks every process of a coordinator's local Ray
SWEEP_LIMIT_S = 10.0  # the watchdog gives up killing after this long
WATCHDOG_EXIT_WAIT_S = 15.0  # how long a graceful shutdown waits for the watchdog
# How often the watchdog notes the coordinator's descendants: each second while Ray
# starts (its agents, which lose the mark, start then), every 5 s after that (workers
# started later keep the mark).
WATCH_POLL_S = 1.0
WATCH_SLOW_POLL_S = 5.0
WATCH_FAST_FOR_S = 60.0


def external_address() -> str | None:
    """The Ray cluster to join (``RAY_ADDRESS``), or None to start a local one."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return None if address in ("", "local") else address


@dataclass
class RayCluster:
    """The Ray cluster this coordinator uses; :meth:`shutdown` leaves nothing of a
    local one running."""

    address: str | None  # the external cluster's address; None for a local cluster
    owner: str = ""  # the token marking a local cluster's processes
    watchdog: subprocess.Popen[bytes] | None = None
    connected: bool = True  # this process called ray.init (else it found Ray running)

    def shutdown(self) -> None:
        """Disconnect; stop a local cluster and wait until its processes are gone."""
        import ray

        if self.connected:
            self.connected = False
            with contextlib.suppress(Exception):  # a half-dead cluster must not block exit
                ray.shutdown()
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        with contextlib.suppress(OSError):
            watchdog.stdin.close()  # end of file: the watchdog sweeps what is left
        try:
            watchdog.wait(timeout=WATCHDOG_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the Ray watchdog did not finish; killing it")
            watchdog.kill()
            watchdog.wait()


def init_ray() -> RayCluster:
    """Join the cluster named by RAY_ADDRESS, or start a local one owned by this
    process (it is stopped when this process ends, even by SIGKILL)."""
    import ray

    address = external_address()
    if ray.is_initialized():  # someone else's connection: theirs to shut down
        return RayCluster(address=address, connected=False)
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        log.info("joined the Ray cluster at %s", address)
        return RayCluster(address=address)
    owner = f"{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[OWNER_ENV] = owner  # before anything starts: every Ray process inherits it
    watchdog = start_watchdog(owner)
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except BaseException:
        RayCluster(address=None, owner=owner, watchdog=watchdog).shutdown()
        raise
    log.info("started a local Ray cluster (owner %s)", owner)
    return RayCluster(address=None, owner=owner, watchdog=watchdog)


def start_watchdog(owner: str) -> subprocess.Popen[bytes]:
    """Start the process that kills ``owner``'s processes once this one is gone. Only
    this process holds the pipe's write end (it is not inheritable), so the watchdog
    sees end of file exactly when this process exits or closes it."""
    env = {key: value for key, value in os.environ.items() if key != OWNER_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.ray_cluster", owner],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a signal to the coordinator's group spares it
    )


def owned_processes(owner: str) -> Iterator[psutil.Process]:
    """Live processes whose environment carries ``owner``'s mark (a process that
    retitled itself may have lost it: see :func:`sweep`)."""
    me = os.getpid()
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            if process.environ().get(OWNER_ENV) == owner:
                yield process
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or another user's


def _family(pid: int) -> dict[int, float]:
    """``pid``'s descendants now, as pid -> creation time (which tells a reused pid)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        with contextlib.suppress(psutil.Error):
            found[child.pid] = child.create_time()
    return found


def _targets(owner: str, seen: dict[int, float]) -> list[psutil.Process]:
    """What to kill: every marked process, every process seen under the coordinator
    that still runs (same pid and creation time), and the descendants of both (Ray's
    agents retitle themselves, which wipes their environment)."""
    me = os.getpid()
    targets: dict[int, psutil.Process] = {}
    roots = list(owned_processes(owner))
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == created:
                roots.append(process)
    for process in roots:
        targets[process.pid] = process
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                targets[child.pid] = child
    alive = []
    for pid, process in targets.items():
        with contextlib.suppress(psutil.Error):
            if pid != me and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def sweep(owner: str, seen: dict[int, float] | None = None, limit_s: float = SWEEP_LIMIT_S) -> int:
    """SIGKILL ``owner``'s processes until two scans in a row find none (a dying raylet
    may still start a worker); returns how many were killed."""
    seen = dict(seen or {})
    killed = 0
    quiet_scans = 0
    deadline = time.monotonic() + limit_s
    while quiet_scans < 2 and time.monotonic() < deadline:
        found = _targets(owner, seen)
        quiet_scans = 0 if found else quiet_scans + 1
        for process in found:
            with contextlib.suppress(psutil.Error):
                seen[process.pid] = process.create_time()  # orphans stay known
                process.kill()
                killed += 1
        if found:
            psutil.wait_procs(found, timeout=1.0)
        time.sleep(0.05)
    return killed


def watch(owner: str, parent: int) -> None:
    """Until stdin reaches end of file, note ``parent``'s descendants now and then;
    then kill ``owner``'s processes and every noted one still running."""
    seen: dict[int, float] = {}
    stdin = sys.stdin.buffer
    started = time.monotonic()
    while True:
        seen.update(_family(parent))
        fast = time.monotonic() - started < WATCH_FAST_FOR_S
        try:
            ready, _, _ = select.select(
                [stdin], [], [], WATCH_POLL_S if fast else WATCH_SLOW_POLL_S
            )
            if ready and not os.read(stdin.fileno(), 4096):
                break
        except OSError:
            break
    seen.pop(os.getpid(), None)
    killed = sweep(owner, seen)
    if killed:
        print(f"edgefarm ray watchdog: stopped {killed} leftover Ray process(es)", file=sys.stderr)


if __name__ == "__main__":
    watch(sys.argv[1], os.getppid())

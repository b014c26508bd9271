"""A farm on this machine: a coordinator and agents as separate processes on loopback.

Used by ``edgefarm quickstart``, by ``edgefarm campaign run`` without
``--coordinator``, and by the integration tests. The processes talk real gRPC; the
coordinator starts its own local Ray. Plaintext by default (loopback only); with
``server_tls`` the coordinator serves TLS and agents and the farm's client dial with
``client_tls`` (or an agent's own, for mutual TLS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from coordinator.client import ControlClient
from edgefarm.errors import ConnectionFailed
from edgefarm.transport import ClientTls, ServerTls

LISTEN_LINE = re.compile(r"listening on (\S+:\d+)")
METRICS_LINE = re.compile(r"coordinator metrics on (\S+:\d+)")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0  # a process SIGTERM did not end in this long is killed
GONE_TIMEOUT_S = 15.0  # how long stop() waits for the coordinator's Ray processes to go


@dataclass
class LocalFarm:
    """Start with :meth:`start` (or ``with``); stop with :meth:`stop`."""

    home: Path
    store_url: str
    token: str = "edgefarm-local"
    agents: int = 1
    lease_s: float | None = None
    heartbeat_s: float | None = None
    agent_labels: dict[str, str] = field(default_factory=dict)
    server_tls: ServerTls | None = None  # the coordinator serves TLS
    client_tls: ClientTls | None = None  # how agents and client() dial it
    metrics_listen: str | None = None  # the coordinator's --metrics-listen
    coordinator_args: list[str] = field(default_factory=list)  # more `coordinator serve` options
    address: str = ""
    metrics_address: str = ""  # where the coordinator serves metrics, once started
    coordinator_proc: subprocess.Popen[str] | None = None
    agent_procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    _logs: list[IO[str]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        """Where the processes' output goes."""
        path = self.home / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __enter__(self) -> LocalFarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the coordinator, then the agents; wait until all agents are online."""
        self.start_coordinator()
        for index in range(self.agents):
            self.start_agent(f"local-{index + 1}")
        self.wait_for_agents(self.agents)

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "edgefarm.cli.main"]

    def start_coordinator(self, listen: str = "127.0.0.1:0") -> None:
        """Start (or restart) the coordinator; on restart it keeps its port."""
        if self.address:
            listen = self.address
        cmd = [
            *self._cli(),
            "coordinator",
            "serve",
            "--listen",
            listen,
            "--store",
            self.store_url,
            "--home",
            str(self.home),
            "--token",
            self.token,
        ]
        if self.lease_s is not None:
            cmd += ["--lease", str(self.lease_s)]
        if self.heartbeat_s is not None:
            cmd += ["--heartbeat", str(self.heartbeat_s)]
        if self.metrics_listen is not None:
            cmd += ["--metrics-listen", self.metrics_listen]
        cmd += self.coordinator_args
        if self.server_tls is not None:
            cmd += ["--tls-cert", str(self.server_tls.cert), "--tls-key", str(self.server_tls.key)]
            if self.server_tls.client_ca is not None:
                cmd += ["--tls-client-ca", str(self.server_tls.client_ca)]
        log = (self.log_dir / "coordinator.log").open("a")
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )
        self.coordinator_proc = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            metrics = METRICS_LINE.search(line)
            if metrics:
                self.metrics_address = metrics.group(1)
            match = LISTEN_LINE.search(line)
            if match:
                self.address = match.group(1)
                return
        _kill_group(proc)
        raise ConnectionFailed(
            f"local coordinator did not start; see {self.log_dir / 'coordinator.log'}"
        )

    def start_agent(
        self, name: str, labels: dict[str, str] | None = None, tls: ClientTls | None = None
    ) -> None:
        """Start one agent process named ``name`` (dialling with ``tls``, default
        :attr:`client_tls`)."""
        cmd = self._agent_cmd("serve", name, tls)
        # The credential belongs to this farm's store: another --store in the same home
        # enrols its own (and neither refuses the other's agent).
        store_key = hashlib.sha256(self.store_url.encode()).hexdigest()[:16]
        cmd += ["--credential-file", str(self.home / "credentials" / store_key / name)]
        for key, value in {**self.agent_labels, **(labels or {})}.items():
            cmd += ["--label", f"{key}={value}"]
        self._spawn(name, cmd, dict(os.environ))

    def start_hub_agent(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        """Start an ``edgefarm agent hub`` process named ``name``: one agent per Qualcomm
        AI Hub device its ``args`` select (``--device``, ``--attribute``, ``--hub-config``)."""
        cmd = [*self._agent_cmd("hub", name), *args]
        self._spawn(name, cmd, dict(os.environ) if env is None else env)

    def _agent_cmd(self, mode: str, name: str, tls: ClientTls | None = None) -> list[str]:
        """``edgefarm agent MODE`` connected to this farm, named ``name``."""
        return [
            *self._cli(),
            "agent",
            mode,
            "--coordinator",
            self.address,
            "--token",
            self.token,
            "--name",
            name,
            "--work-dir",
            str(self.home / f"agent-{name}"),
            *tls_args(tls or self.client_tls),
        ]

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = (self.log_dir / f"agent-{name}.log").open("a")
        self._logs.append(log)
        self.agent_procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )

    def client(self) -> ControlClient:
        """A Control client for this farm."""
        return ControlClient(self.address, self.token, tls=self.client_tls)

    def wait_for_agents(self, count: int, timeout_s: float = 60.0) -> None:
        """Block until ``count`` agents are online."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                try:
                    online = sum(
                        len(d.agents)
                        for d in client.list_devices()
                        if d.state in {"online", "busy"}
                    )
                except ConnectionFailed:
                    online = 0
                if online >= count:
                    return
                for name, proc in self.agent_procs.items():
                    if proc.poll() is not None:
                        raise ConnectionFailed(
                            f"agent {name} exited with {proc.returncode}; "
                            f"see {self.log_dir / f'agent-{name}.log'}"
                        )
                time.sleep(0.2)
        raise ConnectionFailed(f"{count} agent(s) did not come online in {timeout_s:.0f}s")

    def kill_agent(self, name: str) -> None:
        """SIGKILL an agent (its measuring child dies with it)."""
        proc = self.agent_procs.pop(name)
        proc.kill()
        proc.wait()

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator; returns once its local Ray's processes are gone too
        (its watchdog stops them)."""
        proc = self.coordinator_proc
        if proc is not None:
            family = _descendants(proc.pid)
            _kill_group(proc)
            _wait_gone(family)
            self.coordinator_proc = None

    def stop(self) -> None:
        """Stop every process: agents first, then the coordinator (SIGTERM, then SIGKILL
        after :data:`STOP_TIMEOUT_S`); returns once the coordinator's Ray is gone."""
        agents = [*self.agent_procs.values()]
        for proc in agents:
            if proc.poll() is None:
                proc.terminate()
        for proc in agents:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.agent_procs.clear()
        coordinator, self.coordinator_proc = self.coordinator_proc, None
        if coordinator is not None:
            family = _descendants(coordinator.pid) if coordinator.poll() is None else []
            if coordinator.poll() is None:
                coordinator.terminate()
            try:
                coordinator.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill_group(coordinator)
            _wait_gone(family)
        for log in self._logs:
            log.close()
        self._logs.clear()


def _descendants(pid: int) -> list[psutil.Process]:
    """The processes under ``pid`` now (its local Ray, the Ray watchdog)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a process started in its own session, with its process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _wait_gone(processes: list[psutil.Process]) -> None:
    """Wait (up to :data:`GONE_TIMEOUT_S`) until ``processes`` have exited."""
    if processes:
        psutil.wait_procs(processes, timeout=GONE_TIMEOUT_S)


def tls_args(tls: ClientTls | None) -> list[str]:
    """The ``--tls-*`` options of a client command dialling with ``tls``."""
    if tls is None:
        return []
    args = []
    for option, path in (("--tls-ca", tls.ca), ("--tls-cert", tls.cert), ("--tls-key", tls.key)):
        if path is not None:
            args += [option, str(path)]
    return args

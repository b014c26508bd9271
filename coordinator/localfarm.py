"""A farm on this machine: a coordinator and agents as separate processes on loopback.

Used by ``edgefarm quickstart``, by ``edgefarm campaign run`` without
``--coordinator``, and by the integration tests. The processes talk real gRPC; the
coordinator starts its own local Ray. Plaintext by default (loopback only); with
``server_tls`` the coordinator serves TLS and agents and the farm's client dial with
``client_tls`` (or an agent's own, for mutual TLS).
"""

from __future__ import annotations

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

from coordinator.client import ControlClient
from edgefarm.errors import ConnectionFailed
from edgefarm.transport import ClientTls, ServerTls

LISTEN_LINE = re.compile(r"listening on (\S+:\d+)")
START_TIMEOUT_S = 120.0


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
    address: str = ""
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
            match = LISTEN_LINE.search(line)
            if match:
                self.address = match.group(1)
                return
        proc.kill()
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
        """SIGKILL the coordinator (its local Ray is stopped too)."""
        proc = self.coordinator_proc
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.coordinator_proc = None

    def stop(self) -> None:
        """Stop every process: agents first, then the coordinator (SIGTERM, then SIGKILL)."""
        procs = [*self.agent_procs.values()]
        if self.coordinator_proc is not None:
            procs.append(self.coordinator_proc)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.agent_procs.clear()
        self.coordinator_proc = None
        for log in self._logs:
            log.close()
        self._logs.clear()


def tls_args(tls: ClientTls | None) -> list[str]:
    """The ``--tls-*`` options of a client command dialling with ``tls``."""
    if tls is None:
        return []
    args = []
    for option, path in (("--tls-ca", tls.ca), ("--tls-cert", tls.cert), ("--tls-key", tls.key)):
        if path is not None:
            args += [option, str(path)]
    return args

"""A local HTTP server a serving backend starts: on a free loopback port, with a scrubbed
environment, tied to the process that started it, waited for (the start-up time is a
metric), and stopped.

Servers read settings from environment variables too (llama-cpp-python's ``HOST``,
``PORT``, ``N_CTX``...; vLLM's ``VLLM_*``), so a server starts with only the variables in
:data:`KEEP_ENV` plus what its backend sets. It is killed when the trial child that
started it dies (Linux ``PR_SET_PDEATHSIG``): a trial killed at its time limit leaves no
server behind. Ready means an accepted connection, or ``GET`` of the server's health
path answering 200 for servers that bind their port before the model is loaded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from typing import ClassVar

from edgefarm.errors import BackendCrash, ModelLoadError, TaskTimeout

STDERR_TAIL_BYTES = 4096
_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)\b.*:")
KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """In the server, before exec: SIGKILL it when the process that started it dies.
    Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class ServerProcess(ABC):
    """A server's process: :meth:`start` (timed), :attr:`base_url`, :meth:`stop`."""

    NAME: ClassVar[str] = "the server"  # as messages name it
    READY_PATH: ClassVar[str | None] = None  # None: an accepted connection means ready

    def __init__(self, python: str = sys.executable, startup_timeout_s: float = 120.0) -> None:
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.startup_s = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: tempfile.SpooledTemporaryFile[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The command line, for :attr:`port`."""

    def extra_env(self) -> dict[str, str]:
        """Variables the server gets beyond :data:`KEEP_ENV`."""
        return {}

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerProcess:
        """Start the server and wait until it is ready (timed: :attr:`startup_s`)."""
        self.port = self.port or free_port()
        env = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
        env.update(self.extra_env())
        self._log = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # safe: the trial child that starts it runs no threads
        )
        deadline = started + self.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise self._died("exited while starting")
            if self._ready():
                self.startup_s = time.perf_counter() - started
                return self
            time.sleep(0.05 if self.READY_PATH is None else 0.25)
        self.stop()
        raise TaskTimeout(f"{self.NAME} did not start within {self.startup_timeout_s:g} s")

    def _ready(self) -> bool:
        if self.READY_PATH is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", self.READY_PATH)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def output_tail(self) -> str:
        """The server's last error line (an exception's), else its last line."""
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - STDERR_TAIL_BYTES))
        lines = [ln.strip() for ln in self._log.read().decode("utf-8", "replace").splitlines()]
        errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
        return (errors or [ln for ln in lines if ln] or [""])[-1][:300]

    def _died(self, what: str) -> Exception:
        code = self.process.returncode if self.process is not None else None
        tail = self.output_tail()
        if code is not None and code < 0:
            return BackendCrash(
                f"{self.NAME} was killed by signal {-code} ({what})" + (f": {tail}" if tail else "")
            )
        return ModelLoadError(
            f"{self.NAME} {what} with code {code}" + (f": {tail}" if tail else "")
        )

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

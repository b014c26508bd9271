"""The ``llama-server`` backend: llama.cpp's server (llama-cpp-python's ``python -m
llama_cpp.server``) for one GGUF artifact, started on loopback with explicit threads and
context, waited for (the start-up time is the trial's load time), and stopped.

The server reads its settings from environment variables too (``HOST``, ``PORT``,
``N_CTX``... override the flags), so it starts with a scrubbed environment. Flags that
matter for measuring: ``--interrupt_requests False`` (by default a request arriving while
another streams ends the running stream early) and ``--logits_all`` (False for speed;
True only when log-probabilities are wanted, at n_ctx x n_vocab floats of memory). The
server runs one request at a time (its generation holds a lock): a concurrency sweep
measures its queueing. It has no health endpoint and loads the model before it binds its
port, so an accepted connection means ready; ``GET /v1/models`` is asked once then.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from agent.backends.base import check_options
from agent.backends.gguf_check import check_gguf
from agent.backends.serving import Endpoint, ServingBackend
from edgefarm.domain import MeasureSettings
from edgefarm.errors import BackendCrash, ModelLoadError, TaskTimeout

MODEL_ALIAS = "model"
STDERR_TAIL_BYTES = 4096
_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)\b.*:")
_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LlamaServer:
    """A running server: its base URL, model alias and how long it took to start."""

    model: Path
    threads: int
    n_ctx: int
    logits_all: bool = False
    python: str = sys.executable
    startup_timeout_s: float = 120.0
    port: int = 0
    startup_s: float = 0.0
    process: subprocess.Popen[bytes] | None = None
    _log: tempfile.SpooledTemporaryFile[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        """Start the server and wait until it accepts connections (timed)."""
        self.port = self.port or free_port()
        command = [
            self.python, "-m", "llama_cpp.server",
            "--model", str(self.model), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
            "--n_gpu_layers", "0",
            "--interrupt_requests", "False",
            "--logits_all", str(self.logits_all),
            "--verbose", "False",
        ]  # fmt: skip
        env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
        self._log = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
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
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                self.startup_s = time.perf_counter() - started
                return self
            time.sleep(0.05)
        self.stop()
        raise TaskTimeout(f"llama.cpp's server did not start within {self.startup_timeout_s:g} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
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
                f"llama.cpp's server was killed by signal {-code} ({what})"
                + (f": {tail}" if tail else "")
            )
        return ModelLoadError(
            f"llama.cpp's server {what} with code {code}" + (f": {tail}" if tail else "")
        )

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the server, before exec: SIGKILL it when the process that started it dies (a
    trial child killed at its time limit must not leave a server behind). Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


# The server extra's modules (llama-cpp-python[server]); the backend needs them all.
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


class LlamaServerBackend(ServingBackend):
    """GGUF models served by llama.cpp's server, measured through its endpoint."""

    NAME: ClassVar[str] = "llama-server"
    MODULE: ClassVar[str] = "llama_cpp"
    EXTRA: ClassVar[str] = "serving"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("llama-cpp-python",)

    def __init__(self) -> None:
        self.server: LlamaServer | None = None

    @classmethod
    def installed_version(cls) -> str | None:
        """llama-cpp-python's version when its server extra is installed too."""
        import importlib.util

        if any(importlib.util.find_spec(m) is None for m in SERVER_MODULES):
            return None
        return super().installed_version()

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Check the GGUF, start the server on it and wait until it accepts connections."""
        check_options(self.NAME, options, frozenset())
        check_gguf(model_path)
        self.server = LlamaServer(
            model_path,
            threads=settings.threads,
            n_ctx=settings.context_tokens,
            startup_timeout_s=min(120.0, settings.timeout_s),
        ).start()
        self.endpoint = Endpoint(self.server.base_url, MODEL_ALIAS)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def server_pid(self) -> int | None:
        process = self.server.process if self.server is not None else None
        return process.pid if process is not None and process.poll() is None else None

    def version(self) -> str:
        """llama-cpp-python's version."""
        return str(self.require().__version__)

    def environment(self) -> dict[str, str]:
        """Version, server, threads, context."""
        env = {
            "llama_cpp.version": self.version(),
            "serving.server": "llama_cpp.server (one request at a time)",
        }
        if self.server is not None:
            env["serving.threads"] = str(self.server.threads)
            env["serving.n_ctx"] = str(self.server.n_ctx)
            env["serving.startup_s"] = f"{self.server.startup_s:.3f}"
        return env

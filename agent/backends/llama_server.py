"""The ``llama-server`` backend: llama.cpp's server (llama-cpp-python's ``python -m
llama_cpp.server``) for one GGUF artifact, started on loopback with explicit threads and
context, waited for (the start-up time is the trial's load time), and stopped.

The server reads settings from environment variables too (``HOST``, ``PORT``, ``N_CTX``
override the flags), so it starts with a scrubbed environment
(:mod:`agent.backends.server_process`). Flags that matter for measuring:
``--interrupt_requests False`` (by default a request arriving while another streams ends
the running stream early) and ``--logits_all`` (False for speed; True only for the
fidelity pass, which needs prompt log-probabilities). The server runs one request at a
time (its generation holds a lock): a concurrency sweep measures its queueing. It has no
health route and loads the model before it binds its port: an accepted connection means
ready.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from agent.backends.base import check_options
from agent.backends.gguf_check import check_gguf
from agent.backends.server_process import ServerProcess
from agent.backends.serving import Endpoint, ServingBackend
from edgefarm.domain import MeasureSettings

MODEL_ALIAS = "model"
FIDELITY_ROOM = 16  # context beyond a fidelity chunk (the answer's token, special tokens)


class LlamaServer(ServerProcess):
    """llama-cpp-python's server on one GGUF (``with LlamaServer(...) as server:``)."""

    NAME: ClassVar[str] = "llama.cpp's server"

    def __init__(
        self,
        model: Path,
        threads: int,
        n_ctx: int,
        logits_all: bool = False,
        python: str = sys.executable,
        startup_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(python, startup_timeout_s)
        self.model, self.threads, self.n_ctx, self.logits_all = model, threads, n_ctx, logits_all

    def command(self) -> list[str]:
        return [
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

    def __enter__(self) -> LlamaServer:
        self.start()
        return self


# The server extra's modules (llama-cpp-python[server]); the backend needs them all.
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


class LlamaServerBackend(ServingBackend):
    """GGUF models served by llama.cpp's server, measured through its endpoint."""

    NAME: ClassVar[str] = "llama-server"
    MODULE: ClassVar[str] = "llama_cpp"
    EXTRA: ClassVar[str] = "serving"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("llama-cpp-python",)
    # llama-cpp-python 0.3's echo gives token j the log-probabilities computed after
    # token j (the next token's distribution): measured, top-1 agreement 0.04 read as
    # OpenAI's alignment and 0.84 (the in-process figure of the same GGUF) read shifted.
    LOGPROBS_SHIFT: ClassVar[int | None] = 1

    def __init__(self) -> None:
        self.server: LlamaServer | None = None
        self.model_path = Path()
        self.settings = MeasureSettings()

    @classmethod
    def installed_version(cls) -> str | None:
        """llama-cpp-python's version when its server extra is installed too."""
        if any(importlib.util.find_spec(m) is None for m in SERVER_MODULES):
            return None
        return super().installed_version()

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Check the GGUF, start the server on it and wait until it accepts connections."""
        check_options(self.NAME, options, frozenset())
        check_gguf(model_path)
        self.model_path, self.settings = model_path, settings
        self.server = LlamaServer(
            model_path,
            threads=settings.threads,
            n_ctx=settings.context_tokens,
            startup_timeout_s=min(120.0, settings.timeout_s),
        )
        self.server.start()
        self.endpoint = Endpoint(self.server.base_url, MODEL_ALIAS)

    @contextlib.contextmanager
    def fidelity_endpoint(self, n_ctx: int) -> Iterator[Endpoint]:
        """A second server on the same GGUF with ``logits_all`` (which prompt
        log-probabilities need, and which would slow the measured one)."""
        room = n_ctx + FIDELITY_ROOM  # the prompt is a whole chunk; one token is generated
        with LlamaServer(
            self.model_path, threads=self.settings.threads, n_ctx=room, logits_all=True
        ) as server:
            yield Endpoint(server.base_url, MODEL_ALIAS)

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

"""What a serving runtime is: something that answers OpenAI-compatible chat completions.

A :class:`ServingBackend` is measured by the serving workload (:mod:`agent.serving`),
not by the timing loop: ``load`` makes its endpoint ready (starting a server when the
backend runs one; the time it takes is the trial's load time), :attr:`endpoint` says
where requests go, and ``stop`` ends whatever ``load`` started.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from agent.backends.base import Backend
from agent.backends.server_process import ServerProcess
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError


@dataclass(frozen=True)
class Endpoint:
    """A chat endpoint: ``http(s)://host:port/v1`` (OpenAI-compatible) or an Ollama
    server's root, a model name, a key."""

    base_url: str
    model: str
    api_key: str = ""
    # "openai" (POST {base}/chat/completions, server-sent events) or "ollama" (Ollama's
    # native POST {base}/api/chat, newline-delimited JSON with its own timings)
    api: str = "openai"

    def parts(self) -> tuple[str, str, int, str, bool]:
        """(host, host header, port, path prefix, tls) of ``base_url``; ValueError when
        it is not an http(s) URL with a host."""
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"endpoint {self.base_url!r:.200}: expected http(s)://HOST[:PORT]/PATH"
            )
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        return url.hostname, url.netloc, port, url.path.rstrip("/"), tls

    def connection(self, timeout_s: float) -> http.client.HTTPConnection:
        """A (not yet connected) HTTP or HTTPS connection to the endpoint's host."""
        host, _, port, _, tls = self.parts()
        if tls:
            return http.client.HTTPSConnection(
                host, port, timeout=timeout_s, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(host, port, timeout=timeout_s)


class ServingBackend(Backend):
    """A runtime measured through its OpenAI-compatible endpoint."""

    endpoint: Endpoint | None = None
    server: ServerProcess | None = None  # the server load started, if it started one
    # The task's scheme, set before load: a server may serve it as a setting (vLLM: dtype).
    scheme: str = ""
    # Prometheus text metrics under the server's root, read around every load level.
    metrics_path: str | None = None
    # How the server aligns echoed prompt log-probabilities (agent.serving.fidelity.
    # score_chunk): 0 as OpenAI, 1 one token late; None: unknown, found by trying both.
    LOGPROBS_SHIFT: ClassVar[int | None] = None

    def stop(self) -> None:
        """End what :meth:`load` started (its server, if any)."""
        if self.server is not None:
            self.server.stop()

    @contextlib.contextmanager
    def fidelity_endpoint(self, n_ctx: int) -> Iterator[Endpoint]:
        """Where prompt log-probabilities of ``n_ctx``-token chunks are asked for, after
        the load levels and before :meth:`stop`: the measured endpoint by default (its
        context must hold a chunk and one generated token)."""
        if self.endpoint is None:
            raise TaskError(f"{self.NAME} has no endpoint")
        yield self.endpoint

    def server_pid(self) -> int | None:
        """The server process this backend started (its CPU and memory are the
        measurement's), or None for an endpoint it did not start."""
        process = self.server.process if self.server is not None else None
        return process.pid if process is not None and process.poll() is None else None

    def serving_environment(self) -> dict[str, str]:
        """What the endpoint is, for the result's environment (never a secret)."""
        if self.endpoint is None:
            return {}
        return {"serving.endpoint": self.endpoint.base_url, "serving.model": self.endpoint.model}

    # Serving backends are not timed by the iteration loop.
    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> Any:
        raise TaskError(f"{self.NAME} is measured through its endpoint, not the timing loop")

    def run_once(self, inputs: Any) -> None:
        raise TaskError(f"{self.NAME} is measured through its endpoint, not the timing loop")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise TaskError(f"{self.NAME} is measured through its endpoint, not predict()")

    def read_eval_inputs(self, eval_path: Path, settings: MeasureSettings) -> np.ndarray:
        raise TaskError(f"{self.NAME} reads its prompts through the serving workload")

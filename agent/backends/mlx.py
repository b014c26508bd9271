"""The MLX backend (mlx-lm): MLX language models, one sequence.

The artifact is an mlx-lm model folder (``config.json``, ``model*.safetensors``, the
tokenizer) packed as one uncompressed tar (:func:`pack_folder`); ``load`` also takes
the folder itself. What is timed mirrors :mod:`agent.backends.llama_cpp`:

- **Timed iteration = one generation (decode) step**: the model applied to one token
  at the next position, with the KV cache (``model(token, cache=cache)``), forced with
  ``mx.eval`` on its logits (MLX is lazy: nothing runs until something is evaluated).
  The tokens come from a fixed stream (the LLM reference's tokens, else a built-in
  paragraph), after a ``settings.prompt_tokens`` prompt evaluated before the timing
  loop. ``warmup + min_iterations`` steps must fit in ``settings.context_tokens``
  (else :class:`TaskError`); a step that finds the context full first trims the KV
  cache back to the prompt (an offset change: the next step overwrites the cells).
- ``extra_metrics``: ``prompt_tok_per_s`` and ``ttft_ms`` (medians of
  :data:`agent.llm_eval.PROMPT_REPEATS` prompt evaluations from an empty cache; TTFT adds the greedy
  pick of the first token), ``prompt_tokens`` and ``context_tokens``: the same keys as
  llama-cpp; and ``unpack_ms``, the share of the trial's load time spent extracting the
  tar (0 for a folder). The prompt is evaluated as mlx-lm's generator does it: all but the last
  token fill the cache (only the cache is evaluated, so no logits are computed for
  them), then the last token gives the logits.
- ``evaluate``: full-sequence logits of each reference chunk (:func:`token_chunks`)
  from an empty context -> log-softmax -> :func:`fidelity_from_chunks`, against the
  shared llama.cpp F16 reference: perplexity, ppl_ratio, KL divergence, top-1 agreement.

Device and threads: MLX runs on its default device (the GPU through Metal on Apple
silicon, the CPU elsewhere) and has no thread setting; ``environment()`` records the
device, the BLAS library loaded (Linux) and the dtypes, quantization and RoPE base in
use. A model whose ``config.json`` lacks a top-level ``rope_theta`` silently runs with
mlx-lm's default base: this backend measures it as it is, and the fidelity shows it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.backends.archive import extract_tar, pack_folder
from agent.backends.base import check_model_file, check_options, one_line
from agent.backends.language_model import LanguageModelBackend
from agent.llm_eval import (
    FALLBACK_TEXT,
    check_decode_budget,
    check_token_ids,
    evaluate_reference,
    prompt_metrics,
    token_chunks,
)
from agent.llm_fidelity import log_softmax
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ArtifactError, ModelLoadError, TaskError, UnsupportedArchitecture

CONFIG_FILE = "config.json"
WEIGHTS_GLOB = "*.safetensors"
# Set by the converter when the MLX model matches its checkpoint only up to a length
# (Phi-3 LongRoPE: mlx-lm applies one factor set at every length); longer contexts
# are refused rather than measured wrong.
MAX_CONTEXT_KEY = "edgefarm_max_context_tokens"

__all__ = [
    "MAX_CONTEXT_KEY",
    "MlxBackend",
    "check_model_folder",
    "pack_folder",
    "unpack_file",
    "unpack_folder",
]


# ----- the artifact: a folder as one uncompressed tar (agent.backends.archive) -------


def unpack_folder(data: bytes, out_dir: Path) -> Path:
    """Extract a :func:`pack_folder` tar into ``out_dir`` (absent or empty); return it.

    Raises :class:`ModelLoadError` for anything but an uncompressed tar of plain files
    and folders with safe relative names, or when the result lacks ``config.json`` or
    ``*.safetensors`` weights (:func:`check_model_folder`).
    """
    folder = extract_tar(data, Path(out_dir), "data")
    check_model_folder(folder)
    return folder


def unpack_file(archive: Path, out_dir: Path) -> Path:
    """:func:`unpack_folder` reading the tar from a file (no copy of it in memory)."""
    folder = extract_tar(archive, Path(out_dir), archive.name)
    check_model_folder(folder)
    return folder


def check_model_folder(folder: Path) -> dict[str, Any]:
    """A model folder's parsed ``config.json``; :class:`ModelLoadError` unless the folder
    holds a JSON-object ``config.json`` and at least one ``*.safetensors`` file."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"the model folder has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"the model folder's {CONFIG_FILE} is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"the model folder's {CONFIG_FILE} is not a JSON object")
    if not any(p.is_file() and p.stat().st_size > 0 for p in folder.glob(WEIGHTS_GLOB)):
        raise ModelLoadError(f"the model folder has no {WEIGHTS_GLOB} weights")
    return config


# ----- timing ----------------------------------------------------------------------


class MlxDecodeStep:
    """One generation step per call: the next token of a fixed stream, with the KV cache.

    ``tokens[p]`` is the token evaluated at position ``p``; positions below
    ``prompt_len`` are the prompt (already in ``cache``). A call that finds the context
    full first rewinds: it trims the cache back to ``prompt_len``, or, for a cache that
    cannot be trimmed, takes a fresh one with the prompt from ``refill``.
    """

    __slots__ = (
        "cache",
        "context_tokens",
        "eval",
        "logits",
        "model",
        "pos",
        "prompt_len",
        "refill",
        "steps",
        "trimmable",
    )

    def __init__(
        self,
        mx: Any,
        model: Any,
        cache: list[Any],
        tokens: np.ndarray,
        prompt_len: int,
        refill: Callable[[], list[Any]],
    ) -> None:
        self.model = model
        self.cache = cache
        self.eval = mx.eval
        self.prompt_len = prompt_len
        self.pos = prompt_len
        self.context_tokens = len(tokens)
        self.refill = refill
        self.logits: Any = None  # the last step's (evaluated) logits
        self.trimmable = all(layer.is_trimmable() for layer in cache)
        # built once: no conversion per step
        self.steps = [mx.array([[int(t)]], dtype=mx.int32) for t in tokens]

    def __call__(self) -> None:
        """Evaluate one token (the timed unit)."""
        pos = self.pos
        if pos >= self.context_tokens:
            if self.trimmable:
                for layer in self.cache:
                    layer.trim(pos - self.prompt_len)
            else:
                self.cache = self.refill()
            pos = self.prompt_len
        self.logits = self.model(self.steps[pos], cache=self.cache)
        self.eval(self.logits)
        self.pos = pos + 1


class MlxBackend(LanguageModelBackend):
    """Measures mlx-lm language models (an MLX model folder, packed as a tar)."""

    NAME: ClassVar[str] = "mlx"
    MODULE: ClassVar[str] = "mlx_lm"
    EXTRA: ClassVar[str] = "mlx"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("mlx-lm",)
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._mx: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._config: dict[str, Any] = {}
        self._unpacked: tempfile.TemporaryDirectory[str] | None = None
        self._settings = MeasureSettings()
        self._tokens: np.ndarray | None = None
        self._n_vocab: int | None = None
        self._step: MlxDecodeStep | None = None
        self._unpack_s = 0.0  # part of the load time: extracting the tar artifact
        self._fidelity_environment: dict[str, str] = {}  # the KLD method, after evaluate

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack and check the model folder (a tar, or a folder), then ``mlx_lm.load`` it."""
        check_options(self.NAME, options, self.OPTIONS)
        check_decode_budget(settings)
        self._settings = settings
        model_path = Path(model_path)
        if model_path.is_dir():
            folder = model_path
            check_model_folder(folder)
        else:
            check_model_file(model_path)
            started = time.perf_counter()
            self._unpacked = tempfile.TemporaryDirectory(prefix="edgefarm-mlx-")
            folder = unpack_file(model_path, Path(self._unpacked.name) / "model")
            self._unpack_s = time.perf_counter() - started
        mlx_lm = self.require()
        import mlx.core as mx

        self._mx = mx
        try:
            self._model, self._tokenizer, self._config = mlx_lm.load(
                str(folder), return_config=True
            )
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
            raise ModelLoadError(
                one_line(f"mlx-lm could not load {model_path.name}: {type(err).__name__}: {err}")
            ) from err
        self._check_context(settings.context_tokens, "context_tokens")

    def _check_context(self, tokens: int, what: str) -> None:
        """Refuse a sequence longer than the converter says the model is right for."""
        limit = self._config.get(MAX_CONTEXT_KEY)
        if isinstance(limit, int) and tokens > limit:
            raise UnsupportedArchitecture(
                f"{self._config.get('model_type', 'this model')}: mlx-lm applies one RoPE "
                f"scaling at every length, so this MLX model matches its checkpoint up to "
                f"{limit} tokens; {what} is {tokens} (mlx)"
            )

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The token at every context position: the eval tokens (or fallback text), cycled.

        The first ``prompt_tokens`` are the prompt; the rest feed the decode steps.
        """
        if batch_size != 1:
            raise TaskError(f"mlx measures one sequence: batch_size must be 1, not {batch_size}")
        if eval_inputs is not None and len(eval_inputs) > 0:
            source = np.asarray(eval_inputs, dtype=np.int32).ravel()
            try:
                check_token_ids(source, self._vocab_size(), "eval token")
            except ValueError as err:
                raise ArtifactError(f"the eval text does not fit this model: {err}") from None
        else:
            source = np.asarray(self._tokenizer.encode(FALLBACK_TEXT), dtype=np.int32)
        self._tokens = np.resize(source, self._settings.context_tokens)
        return self._tokens

    def timed_call(self, inputs: Any) -> MlxDecodeStep:
        """Evaluate the prompt into a fresh KV cache (untimed), then hand out the step."""
        tokens = np.asarray(inputs, dtype=np.int32)
        prompt = tokens[: self._settings.prompt_tokens]

        def refill() -> list[Any]:
            cache = self._new_cache()
            self._prefill(cache, prompt)
            return cache

        self._step = MlxDecodeStep(self._mx, self._model, refill(), tokens, len(prompt), refill)
        return self._step

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Prompt processing speed and time to first token (medians), prompt and context,
        and ``unpack_ms``: the part of the load time spent extracting the tar artifact."""
        if self._tokens is None:
            raise TaskError("extra_metrics needs make_inputs first")
        mx = self._mx
        prompt = self._tokens[: settings.prompt_tokens]
        metrics = prompt_metrics(
            self._new_cache,
            lambda cache: self._prefill(cache, prompt),
            lambda logits: int(mx.argmax(logits[0, -1]).item()),
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
            eval_path, self._chunk_logprobs, self._vocab_size(), self._fidelity_environment
        )

    def version(self) -> str:
        """mlx-lm's version."""
        return str(self.require().__version__)

    def environment(self) -> dict[str, str]:
        """Versions, device, BLAS, dtypes, quantization and the RoPE base in use."""
        mlx_lm = self.require()
        import mlx.core as mx

        env = {
            "mlx.version": str(getattr(mx, "__version__", "unknown")),
            "mlx_lm.version": str(mlx_lm.__version__),
            "mlx.device": str(mx.default_device()),
            "mlx.metal_available": str(bool(mx.metal.is_available())),
            "mlx.threads": "no thread setting in MLX",
            "mlx.decode_step": "model(1 fixed-stream token, KV cache) + mx.eval after the prompt",
            "mlx.n_ctx": str(self._settings.context_tokens),
        }
        blas = _loaded_blas()
        if blas:
            env["mlx.blas"] = blas
        if self._model is not None:
            env.update(_model_environment(self._model, self._config))
        env.update(self._fidelity_environment)
        return env

    # ----- helpers -------------------------------------------------------------------

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return list(make_prompt_cache(self._model))

    def _prefill(self, cache: list[Any], prompt: np.ndarray) -> Any:
        """Evaluate ``prompt`` into ``cache``; the last position's logits, evaluated."""
        mx = self._mx
        if len(prompt) > 1:
            self._model(mx.array(prompt[None, :-1], dtype=mx.int32), cache=cache)
            mx.eval([layer.state for layer in cache])
        logits = self._model(mx.array(prompt[None, -1:], dtype=mx.int32), cache=cache)
        mx.eval(logits)
        return logits

    def _vocab_size(self) -> int:
        """The width of the model's logits (one forward pass, once)."""
        if self._n_vocab is None:
            mx = self._mx
            logits = self._model(mx.array([[0]], dtype=mx.int32))
            mx.eval(logits)
            self._n_vocab = int(logits.shape[-1])
        return self._n_vocab

    def _chunk_logprobs(self, tokens: np.ndarray, n_ctx: int) -> Iterator[np.ndarray]:
        """Float32 log-softmax rows of each reference chunk, from an empty context."""
        mx = self._mx
        self._check_context(n_ctx, "the reference's n_ctx")
        for chunk in token_chunks(np.asarray(tokens, dtype=np.int32), n_ctx):
            logits = self._model(mx.array(chunk[None, :], dtype=mx.int32))
            rows = logits[0, :-1].astype(mx.float32)
            mx.eval(rows)
            yield log_softmax(np.asarray(rows))


def _model_environment(model: Any, config: dict[str, Any]) -> dict[str, str]:
    """What the loaded model runs with: dtypes, quantization, RoPE base, architecture."""
    from mlx.utils import tree_flatten

    dtypes: Counter[str] = Counter()
    flat: Any = tree_flatten(model.parameters())
    for _, array in flat:
        dtypes[str(array.dtype).removeprefix("mlx.core.")] += int(array.size)
    quant = config.get("quantization")
    args = getattr(model, "args", None)
    rope_theta = getattr(args, "rope_theta", None)
    env = {
        "mlx.model_type": str(config.get("model_type", "")),
        "mlx.parameter_dtypes": ",".join(f"{k}:{v}" for k, v in sorted(dtypes.items())),
        "mlx.quantization": (
            ",".join(f"{k}={quant[k]}" for k in ("bits", "group_size", "mode") if k in quant)
            if isinstance(quant, dict)
            else "none"
        ),
        "mlx.rope_theta": "" if rope_theta is None else repr(float(rope_theta)),
    }
    if config.get(MAX_CONTEXT_KEY) is not None:
        env["mlx.max_context_tokens"] = str(config[MAX_CONTEXT_KEY])
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        env["mlx.config_rope_parameters_theta"] = repr(float(params["rope_theta"]))
    return env


def _loaded_blas() -> str:
    """The BLAS/LAPACK libraries that MLX's wheel mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    names = {
        Path(line.split()[-1]).name
        for line in maps.splitlines()
        if "mlx" in line and ("blas" in line or "lapack" in line)
    }
    return ",".join(sorted(names))

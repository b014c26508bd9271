"""The llama.cpp backend (llama-cpp-python): GGUF language models, one sequence.

What is timed:

- **Timed iteration = one generation (decode) step**: ``Llama.eval`` of one token at
  the next position of a context that starts with a ``settings.prompt_tokens`` prompt.
  The tokens come from a fixed stream (the eval text's tokens when the task has an LLM
  reference, else a built-in English paragraph), not from sampling: the cost of a
  decode step does not depend on which token it is, and a fixed stream keeps every
  trial identical (llama-bench's ``tg`` decodes fixed/random tokens the same way).
  The prompt is evaluated before the timing loop starts.
- The context holds ``settings.context_tokens`` tokens. ``warmup + min_iterations``
  steps must fit after the prompt (else :class:`TaskError`), so the minimum samples
  run at depths ``prompt_tokens .. context_tokens`` without a reset. When
  ``min_duration_s`` asks for more steps than fit, the step that finds the context full
  rewinds it to the end of the prompt first (a position reset only: the next ``eval``
  drops the KV cells past it); that rare step includes the rewind, a few microseconds.
- ``extra_metrics``: prompt processing speed ``prompt_tok_per_s`` (median of
  :data:`agent.llm_eval.PROMPT_REPEATS` evaluations of the prompt from an empty KV cache) and
  ``ttft_ms`` (median of: evaluate the prompt from an empty cache, then pick the first
  token greedily), plus ``prompt_tokens``, ``context_tokens`` and ``bits_per_weight``
  (the GGUF's tensor bytes over its elements). Generation speed is
  not repeated here: it is ``1000 / mean decode ms`` of the trial's samples
  (:attr:`MeasurementResult.throughput_per_s`, batch size 1).
- ``evaluate``: perplexity, KL divergence and top-1 agreement against the reference in
  the task's eval file (:mod:`agent.llm_eval`), on a second context opened exactly
  as the reference's was.

No options yet; the llama.cpp build itself (its CPU flags) is recorded in
``environment()`` as ``llama_cpp.system_info``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from agent.backends.base import check_options
from agent.backends.gguf_check import check_gguf
from agent.backends.language_model import LanguageModelBackend
from agent.llm_eval import (
    FALLBACK_TEXT,
    check_decode_budget,
    check_token_ids,
    fidelity_environment,
    load_llm_reference,
    measure_fidelity,
    open_llama,
    prompt_metrics,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import ArtifactError, TaskError

if TYPE_CHECKING:
    from llama_cpp import Llama

BITS_PER_WEIGHT = "bits_per_weight"


class DecodeStep:
    """One generation step per call: evaluate the next token of a fixed stream.

    ``tokens[p]`` is the token evaluated at position ``p``; positions below
    ``prompt_len`` are the prompt (already evaluated). A call that finds the context
    full first rewinds it to ``prompt_len``.
    """

    __slots__ = ("context_tokens", "llm", "prompt_len", "steps")

    def __init__(self, llm: Llama, tokens: np.ndarray, prompt_len: int) -> None:
        self.llm = llm
        self.prompt_len = prompt_len
        self.context_tokens = len(tokens)
        self.steps = [[int(t)] for t in tokens]  # built once: no conversion per step

    def __call__(self) -> None:
        """Evaluate one token (the timed unit)."""
        llm = self.llm
        pos = llm.n_tokens
        if pos >= self.context_tokens:
            pos = llm.n_tokens = self.prompt_len
        llm.eval(self.steps[pos])


class LlamaCppBackend(LanguageModelBackend):
    """Measures GGUF language models with llama-cpp-python."""

    NAME: ClassVar[str] = "llama-cpp"
    MODULE: ClassVar[str] = "llama_cpp"
    EXTRA: ClassVar[str] = "llama-cpp"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("llama-cpp-python",)
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._llm: Any = None
        self._model_path: Path | None = None
        self._settings = MeasureSettings()
        self._tokens: np.ndarray | None = None
        self._step: DecodeStep | None = None
        self._fidelity_environment: dict[str, str] = {}  # the KLD method, after evaluate

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Validate the GGUF and open one context of ``settings.context_tokens`` tokens."""
        check_options(self.NAME, options, self.OPTIONS)
        check_decode_budget(settings)
        self._settings = settings
        self._model_path = model_path
        self._llm = open_llama(
            model_path, settings.context_tokens, settings.threads, logits_all=False
        )

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The token at every context position: the eval tokens (or fallback text), cycled.

        The first ``prompt_tokens`` are the prompt; the rest feed the decode steps.
        """
        if batch_size != 1:
            raise TaskError(
                f"llama-cpp measures one sequence: batch_size must be 1, not {batch_size}"
            )
        if eval_inputs is not None and len(eval_inputs) > 0:
            source = np.asarray(eval_inputs, dtype=np.int32).ravel()
            try:
                check_token_ids(source, self._llm.n_vocab(), "eval token")
            except ValueError as err:
                raise ArtifactError(f"the eval text does not fit this model: {err}") from None
        else:
            source = np.asarray(self._llm.tokenize(FALLBACK_TEXT.encode("utf-8")), dtype=np.int32)
        n = self._settings.context_tokens
        self._tokens = np.resize(source, n)  # repeats the source when it is shorter
        return self._tokens

    def timed_call(self, inputs: Any) -> DecodeStep:
        """Evaluate the prompt (untimed), then hand out the decode step."""
        tokens = np.asarray(inputs, dtype=np.int32)
        prompt_len = self._settings.prompt_tokens
        self._reset()
        self._llm.eval(tokens[:prompt_len].tolist())
        self._step = DecodeStep(self._llm, tokens, prompt_len)
        return self._step

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Prompt processing speed and time to first token (medians), prompt and context,
        and the model's effective bits per weight (its tensor data over its elements:
        where K-quants fall back to other types, a type's name alone misleads)."""
        if self._tokens is None or self._model_path is None:
            raise TaskError("extra_metrics needs make_inputs first")
        llm = self._llm
        prompt = self._tokens[: settings.prompt_tokens].tolist()

        def first_token(_: object) -> int:  # greedy pick from the last position's logits
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            return int(np.argmax(logits))

        metrics = prompt_metrics(
            self._reset, lambda _: llm.eval(prompt), first_token, len(prompt), settings
        )
        metrics[BITS_PER_WEIGHT] = check_gguf(self._model_path).bits_per_weight
        return metrics

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """Fidelity to the LLM reference in ``eval_path`` (perplexity, KLD, agreement)."""
        if self._model_path is None:
            raise TaskError("evaluate needs load first")
        reference = load_llm_reference(eval_path)
        self._fidelity_environment = fidelity_environment(reference)
        llm = open_llama(
            self._model_path, int(reference["n_ctx"]), settings.threads, logits_all=True
        )
        try:
            return measure_fidelity(llm, reference)
        finally:
            llm.close()

    def version(self) -> str:
        """llama-cpp-python's version."""
        return str(self.require().__version__)

    def environment(self) -> dict[str, str]:
        """Version, the llama.cpp build's system info, context/batch/threads, GGUF summary."""
        llama_cpp = self.require()
        env = {
            "llama_cpp.version": str(llama_cpp.__version__),
            "llama_cpp.system_info": _decode(llama_cpp.llama_print_system_info()),
            "llama_cpp.decode_step": "eval of 1 fixed-stream token after the prompt",
        }
        if self._llm is not None:
            params = self._llm.context_params
            env.update(
                {
                    "llama_cpp.n_threads": str(params.n_threads),
                    "llama_cpp.n_threads_batch": str(params.n_threads_batch),
                    "llama_cpp.n_ctx": str(self._settings.context_tokens),
                    "llama_cpp.n_ctx_allocated": str(self._llm.n_ctx()),
                    "llama_cpp.n_batch": str(params.n_batch),
                    "llama_cpp.n_ubatch": str(params.n_ubatch),
                }
            )
        if self._model_path is not None:
            summary = check_gguf(self._model_path)
            env.update(
                {
                    "gguf.version": str(summary.version),
                    "gguf.architecture": summary.architecture,
                    "gguf.tensor_types": ",".join(
                        f"{name}:{count}" for name, count in summary.tensor_types.items()
                    ),
                    "gguf.n_parameters": str(summary.n_parameters),
                }
            )
        env.update(self._fidelity_environment)
        return env

    def _reset(self) -> None:
        """Empty the context: no tokens, no KV cells."""
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())

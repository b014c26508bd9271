"""The LLM mode of the onnxruntime backend: causal-LM ONNX graphs with a KV cache.

The campaign's backend stays ``onnxruntime``: :class:`~agent.backends.onnxruntime.
OnnxRuntimeBackend` hands a model to :class:`OnnxRuntimeLlmBackend` when
:func:`llm_mode` says so (option ``task: llm``, or ``auto`` and a graph with an
``input_ids`` input and a 3-D ``logits`` output).

The graph layout is the decoder-with-past one written by
:mod:`coordinator.conversion.hf_to_onnx` (and by Optimum): inputs ``input_ids``,
optional ``attention_mask`` (past + new tokens) and ``position_ids``, and
``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head_dim]``; outputs
``logits`` and ``present.{i}.key|value``. A graph without past inputs is refused
(:class:`TaskError`): without a cache a "decode step" would be a full forward over
a window, a different measurement.

What is timed (the same protocol as the llama-cpp backend, so the figures compare):

- **Timed iteration = one decode step**: one ``run_with_ort_values`` of one token at
  the next position, with the previous step's ``present`` tensors fed back as the
  past (OrtValues: no copy to numpy between steps). Tokens come from a fixed stream
  (the LLM reference's tokens, cycled; else seeded random ids: a step's cost does
  not depend on the token). The prompt (``settings.prompt_tokens``) is run before the
  timing loop; steps run at depths ``prompt_tokens .. context_tokens``, and the step
  that finds the context full first rewinds to the prompt's cache (a reference swap).
- ``extra_metrics``: ``prompt_tok_per_s`` (median of :data:`agent.llm_eval.PROMPT_REPEATS` prompt
  runs from an empty cache) and ``ttft_ms`` (prompt run plus the greedy pick of the
  first token), ``prompt_tokens``, ``context_tokens``. The graph computes logits for
  every prompt position (llama.cpp only for the last one), which the prompt figures
  include.
- ``evaluate``: the reference's chunks (:func:`agent.llm_eval.token_chunks`), each
  from an empty cache, log-softmax of the logits, scored by
  :func:`agent.llm_eval.fidelity_from_chunks` against the shared llama.cpp reference.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent import llm_fidelity
from agent.backends.base import SYNTHETIC_INPUT_SEED, check_options
from agent.backends.language_model import LanguageModelBackend
from agent.backends.onnxruntime import (
    OnnxRuntimeBackend,
    open_session,
    session_options_to_check,
)
from agent.llm_eval import (
    LLM_KIND,
    check_decode_budget,
    decode_token_stream,
    evaluate_reference,
    load_reference_tokens,
    prompt_metrics,
    token_chunks,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError

TASKS = ("auto", "llm", "classify")

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "logits",
)
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."

_INT_TYPES: dict[str, type[np.generic]] = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_FLOAT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def llm_reference_tokens(path: Path) -> np.ndarray | None:
    """The token sequence when ``path`` is an LLM reference file, else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "kind" not in npz.files or str(npz["kind"]) != LLM_KIND:
                return None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # not ours to report: the classification reader says what is wrong
    return load_reference_tokens(path)


def is_causal_lm(session: Any) -> bool:
    """Whether the graph looks like a causal LM: ``input_ids`` in, 3-D ``logits`` out."""
    names = {meta.name for meta in session.get_inputs()}
    logits = next((m for m in session.get_outputs() if m.name == LOGITS), None)
    return INPUT_IDS in names and logits is not None and len(logits.shape) == 3


def llm_mode(
    session: Any,
    environment: dict[str, str],
    settings: MeasureSettings,
    options: dict[str, str],
    eval_is_llm: bool,
) -> OnnxRuntimeLlmBackend | None:
    """The LLM mode for this session, or None when the model is measured as before.

    Option ``task``: ``llm`` forces the LLM mode, ``classify`` the generic one, ``auto``
    (default) picks the LLM mode for a causal-LM graph (:func:`is_causal_lm`). An LLM
    reference as eval file needs the LLM mode.
    """
    task = options.get("task", "auto")
    if task not in TASKS:
        raise TaskError(f"unknown onnxruntime task '{task}' (known: {', '.join(TASKS)})")
    if task == "llm" or (task == "auto" and is_causal_lm(session)):
        backend = OnnxRuntimeLlmBackend()
        backend.attach(session, environment, settings)
        return backend
    if eval_is_llm:
        raise TaskError(
            "the eval file is an LLM reference, but the model is not measured as a causal LM "
            f"(task '{task}'; a causal LM has an input_ids input and a 3-D logits output)"
        )
    return None


@dataclass(frozen=True)
class KvGraph:
    """Names and types of a decoder-with-past graph (see the module docstring)."""

    past: tuple[str, ...]  # past_key_values.* inputs, in graph order
    present: tuple[str, ...]  # the matching present.* outputs
    cache_shape: tuple[int, int]  # (kv_heads, head_dim) of every cache tensor
    cache_dtype: type[np.generic]
    id_dtype: type[np.generic]
    mask_dtype: type[np.generic] | None  # None: the graph has no attention_mask
    position_dtype: type[np.generic] | None  # None: the graph has no position_ids
    vocab: int | None  # the logits' last dimension when static

    @classmethod
    def of(cls, session: Any) -> KvGraph:
        """Read the layout from the session; :class:`TaskError` when it does not fit."""
        inputs = {meta.name: meta for meta in session.get_inputs()}
        outputs = {meta.name: meta for meta in session.get_outputs()}
        if not is_causal_lm(session):
            raise TaskError(
                "not a causal-LM graph: the LLM mode needs an input_ids input and a 3-D "
                f"logits output (inputs: {', '.join(inputs)})"
            )
        past = tuple(name for name in inputs if name.startswith(PAST_PREFIX))
        if not past:
            raise TaskError(
                "the LLM mode needs a KV-cache graph (past_key_values.* inputs, present.* "
                "outputs), as coordinator.conversion.hf_to_onnx exports"
            )
        unknown = sorted(set(inputs) - {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past})
        if unknown:
            raise TaskError(f"unsupported causal-LM graph input(s): {', '.join(unknown)}")
        present = tuple(PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in past)
        missing = [name for name in present if name not in outputs]
        if missing:
            raise TaskError(f"the graph lacks the present output(s) {', '.join(missing)}")
        shapes = {(meta.shape[1], meta.shape[3]) for meta in (inputs[n] for n in past)}
        dtypes = {inputs[n].type for n in past}
        if len(shapes) != 1 or not all(isinstance(d, int) for d in next(iter(shapes))):
            raise TaskError(f"cache inputs need one static [_, heads, _, head_dim]: {shapes}")
        if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOAT_TYPES:
            raise TaskError(f"unsupported cache type(s): {', '.join(sorted(dtypes))}")
        vocab = outputs[LOGITS].shape[2]

        def int_type(name: str) -> type[np.generic] | None:
            if name not in inputs:
                return None
            dtype = _INT_TYPES.get(inputs[name].type)
            if dtype is None:
                raise TaskError(f"unsupported type {inputs[name].type} of input {name}")
            return dtype

        id_dtype = int_type(INPUT_IDS)
        assert id_dtype is not None
        return cls(
            past=past,
            present=present,
            cache_shape=next(iter(shapes)),
            cache_dtype=_FLOAT_TYPES[next(iter(dtypes))],
            id_dtype=id_dtype,
            mask_dtype=int_type(ATTENTION_MASK),
            position_dtype=int_type(POSITION_IDS),
            vocab=vocab if isinstance(vocab, int) and vocab > 0 else None,
        )

    def token_feed(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """``input_ids`` (and mask, positions) for tokens ``ids`` at positions ``start..``."""
        n = len(ids)
        feed = {INPUT_IDS: np.asarray(ids, dtype=self.id_dtype).reshape(1, n)}
        if self.mask_dtype is not None:
            feed[ATTENTION_MASK] = np.ones((1, start + n), dtype=self.mask_dtype)
        if self.position_dtype is not None:
            feed[POSITION_IDS] = np.arange(start, start + n, dtype=self.position_dtype)[None]
        return feed

    def step_feeds(self, tokens: np.ndarray, first: int) -> list[dict[str, np.ndarray]]:
        """The one-token feed at every position ``p >= first`` of ``tokens`` (empty before).

        Masks are views of one buffer: ``context`` arrays, not ``context**2 / 2`` ints.
        """
        n = len(tokens)
        ids = np.asarray(tokens, dtype=self.id_dtype).reshape(n, 1, 1)
        ones = np.ones((1, n), dtype=self.mask_dtype or np.int64)
        positions = np.arange(n, dtype=self.position_dtype or np.int64).reshape(n, 1, 1)
        feeds: list[dict[str, np.ndarray]] = [{} for _ in range(first)]
        for p in range(first, n):
            feed = {INPUT_IDS: ids[p]}
            if self.mask_dtype is not None:
                feed[ATTENTION_MASK] = ones[:, : p + 1]
            if self.position_dtype is not None:
                feed[POSITION_IDS] = positions[p]
            feeds.append(feed)
        return feeds

    def empty_cache(self) -> dict[str, np.ndarray]:
        """A past of length 0 (a prompt from an empty context)."""
        heads, head_dim = self.cache_shape
        empty = np.zeros((1, heads, 0, head_dim), dtype=self.cache_dtype)
        return dict.fromkeys(self.past, empty)


class OrtDecodeStep:
    """One generation step per call: run the next token of a fixed stream on the cache.

    ``feeds[p]`` holds the OrtValues of the token at position ``p`` (ids, mask,
    positions; empty inside the prompt); ``prompt_cache`` the present tensors after
    the prompt.
    """

    __slots__ = (
        "cache",
        "context_tokens",
        "feeds",
        "logits",
        "outputs",
        "past",
        "pos",
        "prompt_cache",
        "prompt_len",
        "run",
    )

    def __init__(
        self,
        session: Any,
        graph: KvGraph,
        feeds: list[dict[str, Any]],
        prompt_len: int,
        prompt_cache: dict[str, Any],
    ) -> None:
        self.run = session.run_with_ort_values
        self.outputs = [LOGITS, *graph.present]
        self.past = graph.past
        self.feeds = feeds
        self.context_tokens = len(feeds)
        self.prompt_len = self.pos = prompt_len
        self.prompt_cache = self.cache = prompt_cache
        self.logits: Any = None  # the last step's logits (an OrtValue)

    def __call__(self) -> None:
        """Decode one token (the timed unit)."""
        pos = self.pos
        if pos >= self.context_tokens:
            pos, self.cache = self.prompt_len, self.prompt_cache
        results = self.run(self.outputs, {**self.feeds[pos], **self.cache})
        self.logits, self.cache = results[0], dict(zip(self.past, results[1:], strict=True))
        self.pos = pos + 1


class OnnxRuntimeLlmBackend(LanguageModelBackend):
    """Measures causal-LM ONNX graphs (with a KV cache) with onnxruntime."""

    NAME: ClassVar[str] = OnnxRuntimeBackend.NAME
    MODULE: ClassVar[str] = OnnxRuntimeBackend.MODULE
    EXTRA: ClassVar[str] = OnnxRuntimeBackend.EXTRA
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = OnnxRuntimeBackend.DISTRIBUTIONS
    OPTIONS: ClassVar[frozenset[str]] = OnnxRuntimeBackend.OPTIONS

    def __init__(self) -> None:
        self._ort: Any = None
        self._session: Any = None
        self._graph: KvGraph | None = None
        self._environment: dict[str, str] = {}
        self._settings = MeasureSettings()
        self._tokens: np.ndarray | None = None
        self._step: OrtDecodeStep | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None  # an unpacked model
        self._fidelity_environment: dict[str, str] = {}  # the KLD method, after evaluate

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Open the session (as the onnxruntime backend does) and read the graph layout."""
        check_options(self.NAME, session_options_to_check(options), self.OPTIONS)
        if options.get("task", "llm") not in ("auto", "llm"):
            raise TaskError(f"the LLM mode cannot run task '{options['task']}'")
        ort = self.require()
        self._workdir = tempfile.TemporaryDirectory(prefix="edgefarm-onnxruntime-")
        session, environment = open_session(
            ort, model_path, settings, options, Path(self._workdir.name)
        )
        self.attach(session, environment, settings)

    def attach(self, session: Any, environment: dict[str, str], settings: MeasureSettings) -> None:
        """Measure an open session (the onnxruntime backend's) in the LLM mode."""
        check_decode_budget(settings)
        self._ort = self.require()
        self._graph = KvGraph.of(session)
        self._session = session
        self._environment = dict(environment)
        self._settings = settings

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The token at every context position: the eval tokens (or seeded ids), cycled."""
        length = self._settings.context_tokens
        synthetic = np.random.default_rng(SYNTHETIC_INPUT_SEED).integers(0, self._vocab(), length)
        self._tokens = decode_token_stream(
            eval_inputs, batch_size, self._vocab(), length, "onnxruntime", synthetic
        )
        return self._tokens

    def timed_call(self, inputs: Any) -> OrtDecodeStep:
        """Run the prompt (untimed), then hand out the decode step."""
        tokens = np.asarray(inputs, dtype=np.int64)
        graph = self._graph_or_raise()
        prompt_len = self._settings.prompt_tokens
        ov = self._ort.OrtValue.ortvalue_from_numpy
        feeds = [
            {name: ov(array) for name, array in feed.items()}
            for feed in graph.step_feeds(tokens, prompt_len)
        ]
        results = self._run_prompt(tokens[:prompt_len])
        prompt_cache = dict(zip(graph.past, results[1:], strict=True))
        self._step = OrtDecodeStep(self._session, graph, feeds, prompt_len, prompt_cache)
        return self._step

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Prompt processing speed and time to first token (medians), prompt and context."""
        if self._tokens is None:
            raise TaskError("extra_metrics needs make_inputs first")
        prompt = self._tokens[: settings.prompt_tokens]
        return prompt_metrics(
            lambda: None,
            lambda _: self._run_prompt(prompt),
            lambda results: int(np.argmax(results[0].numpy()[0, -1])),
            len(prompt),
            settings,
        )

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """Fidelity to the LLM reference in ``eval_path`` (perplexity, KLD, agreement)."""
        self._fidelity_environment = {}
        return evaluate_reference(
            eval_path, self.chunk_logprobs, self._vocab(), self._fidelity_environment
        )

    def chunk_logprobs(self, tokens: np.ndarray, n_ctx: int) -> Iterator[np.ndarray]:
        """Float32 log-softmax rows predicting tokens ``1..`` of each reference chunk."""
        graph = self._graph_or_raise()
        for chunk in token_chunks(np.asarray(tokens, dtype=np.int64), n_ctx):
            feed = {**graph.token_feed(chunk, 0), **graph.empty_cache()}
            logits = self._session.run([LOGITS], feed)[0]
            yield llm_fidelity.log_softmax(logits[0, : len(chunk) - 1])

    def version(self) -> str:
        """onnxruntime's version."""
        return str((self._ort or self.require()).__version__)

    def environment(self) -> dict[str, str]:
        """The session's environment plus the LLM mode's: KV cache, context, layers."""
        env = dict(self._environment)
        if self._graph is not None:
            env.update(
                {
                    "onnxruntime.task": "llm",
                    "onnxruntime.kv_cache": "true",
                    "onnxruntime.decode_step": (
                        "run_with_ort_values of 1 fixed-stream token, present fed back as past"
                    ),
                    "onnxruntime.n_ctx": str(self._settings.context_tokens),
                    "onnxruntime.cache_tensors": str(len(self._graph.past)),
                    "onnxruntime.cache_dtype": np.dtype(self._graph.cache_dtype).name,
                }
            )
        env.update(self._fidelity_environment)
        return env

    def _run_prompt(self, prompt: np.ndarray) -> list[Any]:
        """Logits and present OrtValues of ``prompt`` from an empty cache."""
        graph = self._graph_or_raise()
        ov = self._ort.OrtValue.ortvalue_from_numpy
        feed = {**graph.token_feed(prompt, 0), **graph.empty_cache()}
        ort_feed = {name: ov(np.ascontiguousarray(a)) for name, a in feed.items()}
        return list(self._session.run_with_ort_values([LOGITS, *graph.present], ort_feed))

    def _vocab(self) -> int:
        """The vocabulary size: the logits' static last dimension, else one token's run."""
        graph = self._graph_or_raise()
        if graph.vocab is not None:
            return graph.vocab
        feed = {**graph.token_feed(np.zeros(1, np.int64), 0), **graph.empty_cache()}
        return int(self._session.run([LOGITS], feed)[0].shape[-1])

    def _graph_or_raise(self) -> KvGraph:
        if self._graph is None:
            raise TaskError("the onnxruntime LLM mode needs load first")
        return self._graph

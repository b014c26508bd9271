"""The LLM mode of the OpenVINO backend: causal-LM IRs with a KV cache.

The campaign's backend stays ``openvino``: :class:`~agent.backends.openvino.OpenVinoBackend`
hands a compiled model to :class:`OpenVinoLlmBackend` when :func:`llm_mode` says so
(option ``task: llm``, or ``auto`` and an IR with an ``input_ids`` input and a 3-D
``logits`` output), the same rule as the onnxruntime backend's LLM mode.

The IR is the stateless one OpenVINO converts from the ONNX export of
:mod:`coordinator.conversion.hf_to_onnx` (any scheme of
:mod:`coordinator.conversion.openvino_schemes`): inputs ``input_ids``, optional
``attention_mask`` and ``position_ids``, ``past_key_values.{i}.key|value``; outputs
``logits`` and ``present.{i}.key|value``. The layout is read into the onnxruntime mode's
:class:`~agent.backends.onnxruntime_llm.KvGraph` (whose feed builders are reused), plus
the port index of every name. An IR without past inputs is refused (:class:`TaskError`).

What is timed (the protocol of the llama-cpp and onnxruntime LLM modes):

- **Timed iteration = one decode step**: one synchronous infer of one token at the next
  position, with the previous step's ``present`` tensors set as this step's past. Two
  infer requests take turns, so a step reads the other request's output tensors as its
  inputs: no copy between steps (``set_tensor`` shares memory; the token, mask and
  position tensors are made once, before timing). The prompt (``settings.prompt_tokens``)
  runs before the timing loop on a third request; steps run at depths
  ``prompt_tokens .. context_tokens``, and the step that finds the context full
  starts again from the prompt's cache (a reference swap).
- ``extra_metrics``: ``prompt_tok_per_s`` (median of
  :data:`agent.llm_eval.PROMPT_REPEATS` prompt runs from an empty cache), ``ttft_ms``
  (prompt run plus the greedy pick of the first token), ``prompt_tokens``,
  ``context_tokens``. The graph computes logits for every prompt position (llama.cpp
  only for the last one), which the prompt figures include.
- ``evaluate``: the reference's chunks (:func:`agent.llm_eval.token_chunks`), each from
  an empty cache, log-softmax of the logits, scored by
  :func:`agent.llm_eval.fidelity_from_chunks` against the shared llama.cpp reference.

The precision is the backend's ``inference_precision`` option (default ``f32``); what
the compiled model actually runs with is in the environment (``openvino.inference_precision``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent import llm_fidelity
from agent.backends.base import SYNTHETIC_INPUT_SEED, check_options
from agent.backends.language_model import LanguageModelBackend
from agent.backends.onnxruntime_llm import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
    TASKS,
    KvGraph,
    llm_reference_tokens,
)
from agent.backends.openvino import OpenVinoBackend, _native_infer
from agent.llm_eval import (
    check_decode_budget,
    decode_token_stream,
    evaluate_reference,
    prompt_metrics,
    token_chunks,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import TaskError

__all__ = [
    "OpenVinoLlmBackend",
    "OvDecodeStep",
    "OvKvGraph",
    "is_causal_lm",
    "llm_mode",
    "llm_reference_tokens",
]

_INT_TYPES = (np.int64, np.int32)
_FLOAT_TYPES = (np.float32, np.float16)

# infer(request, {input index: Tensor}, share_outputs, decode_strings): sets the
# tensors (shared, not copied) and runs synchronously.
Infer = Callable[[Any, dict[int, Any], bool, bool], object]


def _names(ports: Any) -> dict[str, int]:
    """Every tensor name of ``ports`` -> the port's index."""
    return {name: index for index, port in enumerate(ports) for name in port.get_names()}


def is_causal_lm(compiled: Any) -> bool:
    """Whether the IR looks like a causal LM: ``input_ids`` in, 3-D ``logits`` out."""
    outputs = _names(compiled.outputs)
    if INPUT_IDS not in _names(compiled.inputs) or LOGITS not in outputs:
        return False
    rank = compiled.outputs[outputs[LOGITS]].get_partial_shape().rank
    return bool(rank.is_static and rank.get_length() == 3)


def llm_mode(
    ov: Any,
    compiled: Any,
    environment: dict[str, str],
    settings: MeasureSettings,
    options: dict[str, str],
    eval_is_llm: bool,
) -> OpenVinoLlmBackend | None:
    """The LLM mode for this compiled model, or None when it is measured as before.

    Option ``task``: ``llm`` forces the LLM mode, ``classify`` the generic one, ``auto``
    (default) picks the LLM mode for a causal-LM IR (:func:`is_causal_lm`). An LLM
    reference as eval file needs the LLM mode.
    """
    task = options.get("task", "auto")
    if task not in TASKS:
        raise TaskError(f"unknown openvino task '{task}' (known: {', '.join(TASKS)})")
    if task == "llm" or (task == "auto" and is_causal_lm(compiled)):
        backend = OpenVinoLlmBackend()
        backend.attach(ov, compiled, environment, settings)
        return backend
    if eval_is_llm:
        raise TaskError(
            "the eval file is an LLM reference, but the model is not measured as a causal LM "
            f"(task '{task}'; a causal LM has an input_ids input and a 3-D logits output)"
        )
    return None


@dataclass(frozen=True)
class OvKvGraph:
    """A decoder-with-past IR: its :class:`KvGraph` and the port index of every name."""

    graph: KvGraph
    inputs: dict[str, int]  # input name -> input index
    logits: int  # output index of the logits
    present: tuple[int, ...]  # output indices of the present tensors, matching graph.past

    @classmethod
    def of(cls, compiled: Any) -> OvKvGraph:
        """Read the layout from a compiled model; :class:`TaskError` when it does not fit."""
        inputs, outputs = _names(compiled.inputs), _names(compiled.outputs)
        if not is_causal_lm(compiled):
            raise TaskError(
                "not a causal-LM IR: the LLM mode needs an input_ids input and a 3-D "
                f"logits output (inputs: {', '.join(sorted(inputs))})"
            )
        past = tuple(
            sorted((n for n in inputs if n.startswith(PAST_PREFIX)), key=inputs.__getitem__)
        )
        if not past:
            raise TaskError(
                "the LLM mode needs a KV-cache graph (past_key_values.* inputs, present.* "
                "outputs), as coordinator.conversion.hf_to_onnx exports"
            )
        names = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past)
        used = {name: inputs[name] for name in names if name in inputs}
        unknown = [
            p.get_any_name() for i, p in enumerate(compiled.inputs) if i not in used.values()
        ]
        if unknown:
            raise TaskError(f"unsupported causal-LM graph input(s): {', '.join(unknown)}")
        present = tuple(PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in past)
        missing = [name for name in present if name not in outputs]
        if missing:
            raise TaskError(f"the graph lacks the present output(s) {', '.join(missing)}")
        cache_ports = [compiled.inputs[inputs[n]] for n in past]
        shapes = {_heads_and_dim(port) for port in cache_ports}
        dtypes = {_dtype(port) for port in cache_ports}
        if len(shapes) != 1 or None in shapes:
            raise TaskError(f"cache inputs need one static [_, heads, _, head_dim]: {shapes}")
        cache_dtype = next(iter(dtypes))
        if len(dtypes) != 1 or cache_dtype not in _FLOAT_TYPES:
            raise TaskError(f"unsupported cache type(s): {sorted(d.__name__ for d in dtypes)}")
        vocab_dim = compiled.outputs[outputs[LOGITS]].get_partial_shape()[2]

        def int_type(name: str) -> type[np.generic] | None:
            if name not in inputs:
                return None
            dtype = _dtype(compiled.inputs[inputs[name]])
            if dtype not in _INT_TYPES:
                raise TaskError(f"unsupported type {dtype.__name__} of input {name}")
            return dtype

        id_dtype = int_type(INPUT_IDS)
        assert id_dtype is not None
        heads_and_dim = next(iter(shapes))
        assert heads_and_dim is not None
        graph = KvGraph(
            past=past,
            present=present,
            cache_shape=heads_and_dim,
            cache_dtype=cache_dtype,
            id_dtype=id_dtype,
            mask_dtype=int_type(ATTENTION_MASK),
            position_dtype=int_type(POSITION_IDS),
            vocab=vocab_dim.get_length() if vocab_dim.is_static else None,
        )
        return cls(
            graph=graph,
            inputs=used,
            logits=outputs[LOGITS],
            present=tuple(outputs[name] for name in present),
        )

    def tensors(self, ov: Any, feed: dict[str, np.ndarray]) -> dict[int, Any]:
        """``feed`` as OpenVINO tensors sharing the arrays' memory, keyed by input index."""
        return {
            self.inputs[name]: ov.Tensor(np.ascontiguousarray(array), shared_memory=True)
            for name, array in feed.items()
        }

    def prompt_feed(self, ov: Any, prompt: np.ndarray) -> dict[int, Any]:
        """The tensors of ``prompt`` run from an empty cache."""
        return self.tensors(ov, {**self.graph.token_feed(prompt, 0), **self.graph.empty_cache()})


def _heads_and_dim(port: Any) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of a ``[batch, heads, past, head_dim]`` cache port when static."""
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return None
    heads, head_dim = shape[1], shape[3]
    if not (heads.is_static and head_dim.is_static):
        return None
    return heads.get_length(), head_dim.get_length()


def _dtype(port: Any) -> type[np.generic]:
    """The numpy scalar type of a port."""
    try:
        scalar: type[np.generic] = np.dtype(port.get_element_type().to_dtype()).type
    except Exception as err:
        raise TaskError(f"unsupported model input type {port.get_element_type()}") from err
    return scalar


class OvDecodeStep:
    """One generation step per call: infer the next token of a fixed stream on the cache.

    ``feeds[p]`` holds the tensors of the token at position ``p`` (ids, mask, positions;
    empty inside the prompt); ``prompt_cache`` the prompt request's present tensors.
    Step ``p`` runs on ``requests[p % 2]``: its past is the other request's outputs.
    """

    __slots__ = (
        "cache",
        "context_tokens",
        "feeds",
        "infer",
        "logits",
        "logits_at",
        "past",
        "pos",
        "present",
        "prompt_cache",
        "prompt_len",
        "requests",
    )

    def __init__(
        self,
        infer: Infer,
        requests: tuple[Any, Any],
        layout: OvKvGraph,
        feeds: list[dict[int, Any]],
        prompt_len: int,
        prompt_cache: tuple[Any, ...],
    ) -> None:
        self.infer = infer
        self.requests = requests
        self.past = tuple(layout.inputs[name] for name in layout.graph.past)
        self.present = layout.present
        self.logits_at = layout.logits
        self.feeds = feeds
        self.context_tokens = len(feeds)
        self.prompt_len = self.pos = prompt_len
        self.prompt_cache = self.cache = prompt_cache
        self.logits: Any = None  # the last step's logits (an openvino.Tensor)

    def __call__(self) -> None:
        """Decode one token (the timed unit)."""
        pos, cache = self.pos, self.cache
        if pos >= self.context_tokens:
            pos, cache = self.prompt_len, self.prompt_cache
        request = self.requests[pos & 1]
        feed = {**self.feeds[pos], **dict(zip(self.past, cache, strict=True))}
        self.infer(request, feed, True, True)
        outputs = request.output_tensors
        self.logits = outputs[self.logits_at]
        self.cache = tuple(map(outputs.__getitem__, self.present))
        self.pos = pos + 1


class OpenVinoLlmBackend(LanguageModelBackend):
    """Measures causal-LM OpenVINO IRs (with a KV cache) with the OpenVINO runtime."""

    NAME: ClassVar[str] = OpenVinoBackend.NAME
    MODULE: ClassVar[str] = OpenVinoBackend.MODULE
    EXTRA: ClassVar[str] = OpenVinoBackend.EXTRA
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = OpenVinoBackend.DISTRIBUTIONS
    OPTIONS: ClassVar[frozenset[str]] = OpenVinoBackend.OPTIONS

    def __init__(self) -> None:
        self._ov: Any = None
        self._compiled: Any = None
        self._owner: OpenVinoBackend | None = None  # keeps a standalone load's IR alive
        self._layout: OvKvGraph | None = None
        self._infer: Infer | None = None
        self._spare: Any = None  # the request of prompt metrics and evaluate
        self._environment: dict[str, str] = {}
        self._settings = MeasureSettings()
        self._tokens: np.ndarray | None = None
        self._step: OvDecodeStep | None = None
        self._fidelity_environment: dict[str, str] = {}  # the KLD method, after evaluate

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack and compile the IR as the openvino backend does, in its LLM mode."""
        check_options(self.NAME, options, self.OPTIONS)
        if options.get("task", "llm") not in ("auto", "llm"):
            raise TaskError(f"the LLM mode cannot run task '{options['task']}'")
        owner = self._owner = OpenVinoBackend()
        owner.load(model_path, settings, {**options, "task": "llm"})
        self.attach(owner._ov, owner._compiled, owner._environment, settings)

    def attach(
        self, ov: Any, compiled: Any, environment: dict[str, str], settings: MeasureSettings
    ) -> None:
        """Measure a compiled model (the openvino backend's) in the LLM mode."""
        check_decode_budget(settings)
        self._layout = OvKvGraph.of(compiled)
        self._ov, self._compiled = ov, compiled
        native = _native_infer(ov)
        self._infer = native if native is not None else _wrapper_infer
        self._environment = dict(environment)
        self._settings = settings

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> np.ndarray:
        """The token at every context position: the eval tokens (or seeded ids), cycled."""
        length = self._settings.context_tokens
        synthetic = np.random.default_rng(SYNTHETIC_INPUT_SEED).integers(0, self._vocab(), length)
        self._tokens = decode_token_stream(
            eval_inputs, batch_size, self._vocab(), length, "openvino", synthetic
        )
        return self._tokens

    def timed_call(self, inputs: Any) -> OvDecodeStep:
        """Run the prompt (untimed) on its own request, then hand out the decode step."""
        tokens = np.asarray(inputs, dtype=np.int64)
        layout, infer = self._layout_or_raise(), self._infer_or_raise()
        prompt_len = self._settings.prompt_tokens
        feeds = [
            layout.tensors(self._ov, feed) for feed in layout.graph.step_feeds(tokens, prompt_len)
        ]
        prompt_request = self._compiled.create_infer_request()
        outputs = self._run(prompt_request, layout.prompt_feed(self._ov, tokens[:prompt_len]))
        prompt_cache = tuple(outputs[i] for i in layout.present)
        requests = (self._compiled.create_infer_request(), self._compiled.create_infer_request())
        self._step = OvDecodeStep(infer, requests, layout, feeds, prompt_len, prompt_cache)
        return self._step

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """Prompt processing speed and time to first token (medians), prompt and context."""
        if self._tokens is None:
            raise TaskError("extra_metrics needs make_inputs first")
        layout = self._layout_or_raise()
        prompt = self._tokens[: settings.prompt_tokens]
        request = self._spare_request()
        return prompt_metrics(
            lambda: layout.prompt_feed(self._ov, prompt),
            lambda feed: self._run(request, feed),
            lambda outputs: int(np.argmax(outputs[layout.logits].data[0, -1])),
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
        layout = self._layout_or_raise()
        request = self._spare_request()
        for chunk in token_chunks(np.asarray(tokens, dtype=np.int64), n_ctx):
            outputs = self._run(request, layout.prompt_feed(self._ov, chunk))
            yield llm_fidelity.log_softmax(outputs[layout.logits].data[0, : len(chunk) - 1])

    def version(self) -> str:
        """OpenVINO's full version (with its build number)."""
        return str((self._ov or self.require()).get_version())

    def environment(self) -> dict[str, str]:
        """The compiled model's environment (actual precision ...) plus the LLM mode's."""
        env = dict(self._environment)
        if self._layout is not None:
            graph = self._layout.graph
            env.update(
                {
                    "openvino.task": "llm",
                    "openvino.kv_cache": "true",
                    "openvino.decode_step": (
                        "synchronous infer of 1 fixed-stream token, present tensors set as "
                        "past (shared, two requests in turn)"
                    ),
                    "openvino.n_ctx": str(self._settings.context_tokens),
                    "openvino.cache_tensors": str(len(graph.past)),
                    "openvino.cache_dtype": np.dtype(graph.cache_dtype).name,
                }
            )
        env.update(self._fidelity_environment)
        return env

    def _run(self, request: Any, feed: dict[int, Any]) -> list[Any]:
        """Infer ``feed`` on ``request``; its output tensors (views, not copies)."""
        self._infer_or_raise()(request, feed, True, True)
        outputs: list[Any] = request.output_tensors
        return outputs

    def _spare_request(self) -> Any:
        if self._spare is None:
            self._spare = self._compiled.create_infer_request()
        return self._spare

    def _vocab(self) -> int:
        """The vocabulary size: the logits' static last dimension, else one token's run."""
        layout = self._layout_or_raise()
        if layout.graph.vocab is not None:
            return layout.graph.vocab
        outputs = self._run(self._spare_request(), layout.prompt_feed(self._ov, np.zeros(1)))
        return int(outputs[layout.logits].data.shape[-1])

    def _layout_or_raise(self) -> OvKvGraph:
        if self._layout is None:
            raise TaskError("the openvino LLM mode needs load first")
        return self._layout

    def _infer_or_raise(self) -> Infer:
        if self._infer is None:
            raise TaskError("the openvino LLM mode needs load first")
        return self._infer


def _wrapper_infer(request: Any, feed: dict[int, Any], share: bool, _decode: bool) -> object:
    """The Python ``InferRequest.infer`` (when OpenVINO's native one is not found)."""
    return request.infer(feed, share_inputs=True, share_outputs=share)

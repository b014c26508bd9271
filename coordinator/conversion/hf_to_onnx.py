"""A Hugging Face causal LM exported to one ONNX graph with a KV cache.

The graph (``kv_cache: true``) is the usual decoder-with-past layout, one graph for
both prompt processing and decoding:

- inputs: ``input_ids`` int64 ``[batch, seq]``; ``attention_mask`` int64
  ``[batch, past + seq]`` (1 = a real token, for the past and the new tokens);
  ``position_ids`` int64 ``[batch, seq]``; for each layer ``i``
  ``past_key_values.{i}.key`` / ``.value`` float32 ``[batch, kv_heads, past, head_dim]``
  (``past`` may be 0: a prompt from an empty cache);
- outputs: ``logits`` float32 ``[batch, seq, vocab]`` (every new position) and
  ``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past + seq, head_dim]``, the
  past with the new tokens appended (feed them back as the next step's past).

New tokens sit in cache slots ``past .. past + seq - 1``; query slot ``q`` attends to
key slot ``k`` when ``k <= q`` and ``attention_mask[k] == 1`` (and, in a sliding-window
layer of width ``w``, ``k > q - w``). The 4-D additive masks are built inside the graph
from tensors only (no traced Python sizes), and handed to transformers as prepared
masks, so no shape seen at export time is baked in: one mask per layer type for models
whose config lists ``layer_types`` (Qwen3, Gemma 3: sliding layers get the banded
mask), one banded mask for a model whose config has a ``sliding_window`` but no layer
types (Phi-3), one causal mask otherwise (Llama). Every layer keeps its whole past in
the cache (the graph's cache tensors all have the same length); the mask does the
windowing. Eager attention is exported (plain MatMul/Softmax), with the legacy
TorchScript exporter (``dynamo=False``, seconds rather than a minute). Linear layers on
3-D activations export as MatMul, never Gemm, so onnxruntime's 4-bit MatMulNBits
quantizer applies to every projection and the LM head; :func:`export_causal_lm`
checks that.

RoPE: Phi-3's LongRoPE picks its short or long frequency factors from the sequence
length (``max(position_ids) + 1 > original_max_position_embeddings``) and transformers
writes the choice into a buffer in place, which the TorchScript exporter cannot trace
(``aten::copy``). During export the rotary module's forward is replaced by one that
selects between the two precomputed frequency sets with ``Where`` in the graph: the
same choice, at every length, with no in-place update. The check after export runs a
prompt in each regime when the original length is small enough to afford it.

Weights: a model whose weights exceed :data:`~coordinator.conversion.onnx_files.
EXTERNAL_DATA_THRESHOLD` (protobuf's 2 GB limit) is written as ``model.onnx`` plus ONE
external-data file ``model.onnx.data`` beside it (:mod:`coordinator.conversion.onnx_files`);
a smaller one as one file, unless ``external_data=True``. The graph's ``metadata_props``
name the source architecture (``edgefarm.model_type``, ``edgefarm.architecture``), so
converters that only see the ONNX file can name it in their errors.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import one_line
from coordinator.conversion import onnx_files
from edgefarm.errors import ConversionError, MissingExtra, UnsupportedArchitecture, UsageError

DEFAULT_OPSET = 17
KV_CACHE = True

# The export's example shapes: all different from each other and from the model's head
# counts, so that no dimension can be mistaken for another while tracing.
_EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_SEQ = 2, 5, 7
# The check after export: a prompt, then one decode step on its cache; again with a
# prompt past the sliding window and past LongRoPE's original length when either is at
# most _CHECK_MAX_PROMPT tokens (a few seconds of transformers on a 1B model).
_CHECK_PROMPT = 11
_CHECK_PAST_LIMIT = 5  # tokens beyond a window / original length in the longer prompts
_CHECK_MAX_PROMPT = 1100
# max |logit difference| onnxruntime vs torch over the largest |logit|: the same measure
# and float32 tolerance as logit_check's. Honest: 1e-5 (SmolLM2) to 2e-4 (sharp-attention
# random Gemma 3, 69 tokens: transformers' own float32 differs from float64 as much);
# wrong: a full mask on Gemma 3's sliding layers 1.6e-2, a wrong RoPE base 1.7e-3 and up.
_CHECK_RTOL = 1e-3
_SEED = 0
BACKEND = "onnxruntime"
ARCH_KEY, CLASS_KEY = "edgefarm.model_type", "edgefarm.architecture"
SLIDING, FULL = "sliding_attention", "full_attention"


def input_names(n_layers: int) -> list[str]:
    """The graph's input names, in order."""
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layers: int) -> list[str]:
    """The graph's output names, in order."""
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def export_causal_lm(
    hf_folder: Path,
    out: Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Export the causal LM in ``hf_folder`` to ``out`` (a ``.onnx`` KV-cache graph).

    The weights go into ``out.name + ".data"`` beside ``out`` when ``external_data`` is
    true, or (``None``) when they would not fit one protobuf (over ~1.8 GB); nothing
    else is left in ``out``'s folder. After export, onnxruntime runs a prompt and one
    decode step on the cache it returned and must give transformers' logits within
    ``1e-3`` of the largest ``|logit|``, also for a prompt longer than a sliding window
    and one in LongRoPE's long regime (when those lengths are at most 1100 tokens).

    Returns the provenance: tool versions, opset, ``kv_cache``, input/output names, the
    model's shape parameters, the attention masks and RoPE handling, op-type counts,
    export and check figures, the files written (``files``: names beside ``out``) and
    their total size. Raises :class:`MissingExtra` without torch/transformers/onnx/
    onnxruntime, :class:`UsageError` for a missing folder,
    :class:`UnsupportedArchitecture` for a model the exporter cannot take (the reason
    names the architecture and onnxruntime), and :class:`ConversionError` for a graph
    with Gemm nodes or logits that do not match (no file is then left behind).
    """
    hf_folder, out = Path(hf_folder), Path(out)
    if not (hf_folder / "config.json").is_file():
        raise UsageError(f"not a Hugging Face model folder (no config.json): {hf_folder}")
    try:
        import onnx
        import onnxruntime
        import torch
        import transformers
    except ImportError as exc:
        raise MissingExtra("hf", exc.name or "transformers") from exc

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except (ValueError, KeyError) as err:  # no causal-LM class for this config
        model_type = json.loads((hf_folder / "config.json").read_text(encoding="utf-8")).get(
            "model_type", "unknown"
        )
        raise UnsupportedArchitecture(
            one_line(
                f"{model_type}: transformers cannot load it for the ONNX export ({BACKEND}): {err}"
            )
        ) from err
    arch = f"{model.config.model_type} ({type(model).__name__})"
    shape = _shape_params(model.config)
    masks = _mask_plan(model.config, arch)
    n_layers = shape["layers"]
    wrapper = _kv_wrapper(model, n_layers, masks)
    example = _example_inputs(shape, _EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_SEQ)
    names_in, names_out = input_names(n_layers), output_names(n_layers)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.parent / onnx_files.data_file_name(out)):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    # the exporter writes into a scratch folder beside out: a model over 2 GB comes out
    # as one external file per tensor, gathered into one data file afterwards
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as scratch:
        raw = Path(scratch) / out.name
        with (
            torch.inference_mode(),
            warnings.catch_warnings(),
            _export_friendly_rope(model, torch, arch) as rope,
        ):
            # tracing notes about constants (empty cache tensors, the embedding's padding
            # index): harmless here, and the check below would catch a wrong trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            try:
                torch.onnx.export(
                    wrapper,
                    tuple(torch.from_numpy(a) for a in example.values()),
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names_in,
                    output_names=names_out,
                    dynamic_axes=_dynamic_axes(names_in, names_out),
                    do_constant_folding=True,
                )
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
                raise UnsupportedArchitecture(
                    one_line(f"{arch} cannot be exported to ONNX for {BACKEND}: {err}")
                ) from err
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        exported = onnx.load(str(raw), load_external_data=False)
        op_types = dict(sorted(Counter(node.op_type for node in exported.graph.node).items()))
        onnx_files.set_metadata(exported, metadata(model))
        files = _place(exported, raw, out, external_data)
        del exported
        place_s = time.perf_counter() - started

    try:
        if op_types.get("Gemm"):
            raise ConversionError(
                f"the ONNX export of {hf_folder.name} ({arch}) has {op_types['Gemm']} Gemm "
                "node(s): 4-bit MatMulNBits quantization would skip them"
            )
        check = _check_against_torch(onnxruntime, torch, model, out, shape, arch)
    except ConversionError:
        for path in files:  # never leave a graph that failed its checks where a store may take it
            path.unlink(missing_ok=True)
        raise
    return {
        "tool": "torch.onnx.export",
        "exporter": "torchscript (dynamo=False)",
        "tool_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "source": {
            "folder": hf_folder.name,
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
        },
        "opset": opset,
        "kv_cache": KV_CACHE,
        "attention": "eager (MatMul + Softmax, additive 4-D masks built in the graph)",
        "attention_masks": masks,
        "rope": rope,
        "metadata": metadata(model),
        "inputs": names_in,
        "outputs": names_out,
        **{f"model_{k}": v for k, v in shape.items()},
        "op_types": op_types,
        "export_s": round(export_s, 2),
        "external_data_s": round(place_s, 2),
        "check": check,
        "external_data": len(files) > 1,
        "files": [path.name for path in files],
        "size_bytes": sum(path.stat().st_size for path in files),
    }


def _place(exported: Any, raw: Path, out: Path, external_data: bool | None) -> list[Path]:
    """Write the exported model (``exported``: ``raw`` loaded without external data,
    metadata set) as ``out`` (+ one data file); the files written."""
    if onnx_files.uses_external_data(exported):  # the exporter had to: over 2 GB
        if external_data is False:
            raise UsageError(
                f"{out.name}: the model is over 2 GB, so its weights must be external data"
            )
        return onnx_files.consolidate_external_data(raw, out, exported)
    return onnx_files.save_model(exported, out, external=bool(external_data))


def metadata(model: Any) -> dict[str, str]:
    """What the graph records about its source (``metadata_props``): the architecture,
    read back by the converters that only see the ONNX file."""
    return {
        ARCH_KEY: str(model.config.model_type),
        CLASS_KEY: type(model).__name__,
    }


def _shape_params(config: Any) -> dict[str, int]:
    """Layers, KV heads, head size and vocabulary size of a decoder config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return {
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab": int(config.vocab_size),
    }


def _example_inputs(
    shape: dict[str, int], batch: int, past: int, seq: int, seed: int = _SEED
) -> dict[str, np.ndarray]:
    """A feed for the graph: random tokens and cache, every slot attended."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, shape["vocab"], size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    kv = (batch, shape["kv_heads"], past, shape["head_dim"])
    for i in range(shape["layers"]):
        feed[f"past_key_values.{i}.key"] = rng.standard_normal(kv).astype(np.float32)
        feed[f"past_key_values.{i}.value"] = rng.standard_normal(kv).astype(np.float32)
    return feed


def _dynamic_axes(names_in: list[str], names_out: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for name in names_in[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in names_out[1:]:
        axes[name] = {0: "batch", 2: "total"}
    return axes


def _mask_plan(config: Any, arch: str) -> dict[str, Any]:
    """Which attention mask the model gets: ``{"kind": "per_layer_type", "types":
    {type: window or None}}`` for configs with ``layer_types``, else ``{"kind":
    "single", "window": window or None}``."""
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return {"kind": "single", "window": window}
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise UnsupportedArchitecture(
            f"{arch}: attention layer type(s) {', '.join(unknown)} are not exported to "
            f"ONNX for {BACKEND} (known: {FULL}, {SLIDING})"
        )
    if SLIDING in layer_types and window is None:
        raise UnsupportedArchitecture(
            f"{arch}: sliding-window layers without a sliding_window in the config "
            f"cannot be exported to ONNX for {BACKEND}"
        )
    types = {t: (window if t == SLIDING else None) for t in sorted(set(layer_types))}
    return {"kind": "per_layer_type", "types": types}


def _kv_wrapper(model: Any, n_layers: int, masks: dict[str, Any]) -> Any:
    """``model`` as a module with flat tensor inputs/outputs (see the module docstring)."""
    import torch
    from transformers import DynamicCache

    class KvCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            # no config: every layer is a plain DynamicLayer that keeps its whole past
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]
            )
            prepared: Any
            if masks["kind"] == "single":
                prepared = _additive_mask(torch, input_ids, attention_mask, masks["window"])
            else:
                prepared = {
                    layer_type: _additive_mask(torch, input_ids, attention_mask, window)
                    for layer_type, window in masks["types"].items()
                }
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=prepared,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = outputs.past_key_values
            flat = []
            for layer in present.layers:
                flat += [layer.keys, layer.values]
            return (outputs.logits, *flat)

    return KvCausalLM().eval()


def _additive_mask(
    torch: Any, input_ids: Any, attention_mask: Any, window: int | None = None
) -> Any:
    """``[batch, 1, seq, total]`` float mask: 0 where attended, the dtype minimum elsewhere.

    Built from tensor ops only (cumulative sums, not traced sizes) so that it stays
    correct for every sequence and past length. With a ``window``, query slot ``q``
    sees key slots ``q - window < k <= q`` only (transformers' sliding window).
    """
    total_ones, new_ones = torch.ones_like(attention_mask), torch.ones_like(input_ids)
    slots = torch.cumsum(total_ones, dim=1) - 1  # [b, total]: 0 .. total-1
    past = total_ones.sum(dim=1, keepdim=True) - new_ones.sum(dim=1, keepdim=True)  # [b, 1]
    query_slots = torch.cumsum(new_ones, dim=1) - 1 + past  # [b, seq]: past .. total-1
    keys, queries = slots[:, None, None, :], query_slots[:, None, :, None]
    allowed = (keys <= queries) & (attention_mask[:, None, None, :] > 0)
    if window is not None:
        allowed = allowed & (keys > queries - window)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


@contextlib.contextmanager
def _export_friendly_rope(model: Any, torch: Any, arch: str) -> Iterator[dict[str, Any]]:
    """Replace, for the export only, the forward of rotary modules that update their
    frequencies in place (LongRoPE) by one that selects them with ``where``; yields what
    was done (for the provenance). Dynamic (NTK) RoPE is refused: its frequencies depend
    on a Python-side cache that tracing would freeze."""
    patched: list[Any] = []
    info: dict[str, Any] = {"kind": "static"}
    try:
        for module in model.modules():
            rope_type = getattr(module, "rope_type", None)
            if not isinstance(rope_type, str | dict) or not hasattr(module, "inv_freq"):
                continue
            types = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
            if any("dynamic" in t for t in types):
                raise UnsupportedArchitecture(
                    f"{arch}: dynamic RoPE scaling cannot be exported to ONNX for {BACKEND}"
                )
            if "longrope" not in types:
                continue
            if not isinstance(rope_type, str):
                raise UnsupportedArchitecture(
                    f"{arch}: per-layer-type LongRoPE cannot be exported to ONNX for {BACKEND}"
                )
            info = _patch_longrope(module, model.config, torch)
            patched.append(module)
        yield info
    finally:
        for module in patched:
            vars(module).pop("forward", None)


def _patch_longrope(module: Any, config: Any, torch: Any) -> dict[str, Any]:
    """Give a LongRoPE rotary ``module`` an export-friendly forward (see the docstring)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = int(config.rope_parameters["original_max_position_embeddings"])
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=original + 1)
    long_inv = long_inv.to(torch.float32)
    short_inv = module.original_inv_freq.detach().clone().to(torch.float32)
    scaling = float(module.attention_scaling)

    def forward(x: Any, position_ids: Any) -> tuple[Any, Any]:
        seq_len = torch.max(position_ids) + 1
        inv_freq = torch.where(seq_len > original, long_inv, short_inv)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    module.forward = forward
    return {
        "kind": "longrope",
        "selection": f"Where(max(position_ids) + 1 > {original}, long, short) in the graph",
        "original_max_position_embeddings": original,
        "attention_scaling": scaling,
    }


def _check_lengths(config: Any) -> dict[str, int]:
    """The prompt lengths the check runs: always a short one; one past the sliding
    window and one in LongRoPE's long regime when those are affordable."""
    lengths = {"short": _CHECK_PROMPT}
    window = getattr(config, "sliding_window", None)
    if window and int(window) + _CHECK_PAST_LIMIT <= _CHECK_MAX_PROMPT:
        lengths["past_sliding_window"] = int(window) + _CHECK_PAST_LIMIT
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type") == "longrope":
        original = int(params["original_max_position_embeddings"])
        if original + _CHECK_PAST_LIMIT <= _CHECK_MAX_PROMPT:
            lengths["longrope_long"] = original + _CHECK_PAST_LIMIT
    return lengths


def _check_against_torch(
    ort: Any, torch: Any, model: Any, path: Path, shape: dict[str, int], arch: str
) -> dict[str, Any]:
    """Prompt then one cached decode step in onnxruntime vs transformers, for each
    length of :func:`_check_lengths`; the differences."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lengths = _check_lengths(model.config)
    cases = {
        name: _check_case(session, torch, model, shape, length, seed)
        for seed, (name, length) in enumerate(lengths.items())
    }
    worst = max(
        max(c["max_abs_diff_prompt"], c["max_abs_diff_decode_step"]) for c in cases.values()
    )
    scale = max(c["max_abs_logit"] for c in cases.values())
    relative = worst / scale if scale > 0 else float("inf")
    if not relative <= _CHECK_RTOL:  # NaN fails too
        detail = ", ".join(
            f"{name} ({c['prompt_tokens']} tokens): {c['max_abs_diff_prompt']:.2e} prompt, "
            f"{c['max_abs_diff_decode_step']:.2e} decode step"
            for name, c in cases.items()
        )
        raise ConversionError(
            f"the ONNX export of {arch} does not match transformers: max |logit diff| "
            f"{worst:.2e} is {relative:.2e} of the largest |logit| ({scale:.4g}), over "
            f"{_CHECK_RTOL} ({detail})"
        )
    short = cases["short"]
    return {
        "prompt_tokens": short["prompt_tokens"],
        "max_abs_diff_prompt": short["max_abs_diff_prompt"],
        "max_abs_diff_decode_step": short["max_abs_diff_decode_step"],
        "max_abs_diff": worst,
        "max_abs_logit": scale,
        "relative": relative,
        "tolerance_relative": _CHECK_RTOL,
        "cases": cases,
    }


def _check_case(
    session: Any, torch: Any, model: Any, shape: dict[str, int], length: int, seed: int
) -> dict[str, Any]:
    """One prompt of ``length`` tokens and one decode step: the max logit differences."""
    n_layers = shape["layers"]
    prompt = _example_inputs(shape, 1, 0, length, seed=_SEED + 2 * seed)
    rng = np.random.default_rng(_SEED + 2 * seed + 1)
    next_id = rng.integers(0, shape["vocab"], size=(1, 1), dtype=np.int64)

    names_out = output_names(n_layers)
    first = dict(zip(names_out, session.run(None, prompt), strict=True))
    step = {
        "input_ids": next_id,
        "attention_mask": np.ones((1, length + 1), dtype=np.int64),
        "position_ids": np.array([[length]], dtype=np.int64),
    }
    for i in range(n_layers):
        step[f"past_key_values.{i}.key"] = first[f"present.{i}.key"]
        step[f"past_key_values.{i}.value"] = first[f"present.{i}.value"]
    second = session.run(["logits"], step)[0]

    ids = np.concatenate([prompt["input_ids"], next_id], axis=1)
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    return {
        "prompt_tokens": length,
        "max_abs_logit": float(np.max(np.abs(expected))),
        "max_abs_diff_prompt": float(np.max(np.abs(first["logits"] - expected[:, :length]))),
        "max_abs_diff_decode_step": float(np.max(np.abs(second - expected[:, length:]))),
    }

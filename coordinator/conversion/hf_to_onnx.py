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
key slot ``k`` when ``k <= q`` and ``attention_mask[k] == 1``. The 4-D additive mask is
built inside the graph from tensors only (no traced Python sizes), and handed to
transformers as a prepared mask, so no shape seen at export time is baked in. Eager
attention is exported (plain MatMul/Softmax), with the legacy TorchScript exporter
(``dynamo=False``, seconds rather than a minute). Linear layers on 3-D activations
export as MatMul, never Gemm, so onnxruntime's 4-bit MatMulNBits quantizer applies to
every projection and the LM head; :func:`export_causal_lm` checks that.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgefarm.errors import MissingExtra, UsageError

DEFAULT_OPSET = 17
KV_CACHE = True

# The export's example shapes: all different from each other and from the model's head
# counts, so that no dimension can be mistaken for another while tracing.
_EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_SEQ = 2, 5, 7
# The check after export: a prompt, then one decode step on its cache.
_CHECK_PROMPT = 11
_CHECK_ATOL = 1e-3  # max |logit difference| onnxruntime vs torch (float32, logits ~ +-30)
_SEED = 0


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


def export_causal_lm(hf_folder: Path, out: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export the causal LM in ``hf_folder`` to ``out`` (one ``.onnx`` file, KV-cache graph).

    After export, onnxruntime runs a prompt and one decode step on the cache it returned
    and must give transformers' logits within ``1e-3``. Returns the provenance: tool
    versions, opset, ``kv_cache``, input/output names, the model's shape parameters,
    op-type counts, export and check figures and the file size. Raises
    :class:`MissingExtra` without torch/transformers/onnx/onnxruntime and
    :class:`UsageError` for a missing folder, a graph with Gemm nodes or logits that
    do not match (the file is then removed). One file, no external data: for models
    whose weights fit the 2 GB protobuf limit (SmolLM2-135M: ~650 MB, the tied
    embedding stored twice, as the Gather table and the LM head's MatMul weight).
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

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    shape = _shape_params(model.config)
    n_layers = shape["layers"]
    wrapper = _kv_wrapper(model, n_layers)
    example = _example_inputs(shape, _EXAMPLE_BATCH, _EXAMPLE_PAST, _EXAMPLE_SEQ)
    names_in, names_out = input_names(n_layers), output_names(n_layers)

    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        # tracing notes about constants (empty cache tensors, the embedding's padding
        # index): harmless here, and the check below would catch a wrong trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            tuple(torch.from_numpy(a) for a in example.values()),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=_dynamic_axes(names_in, names_out),
            do_constant_folding=True,
        )
    export_s = time.perf_counter() - started

    graph = onnx.load(str(out), load_external_data=False)
    op_types = dict(sorted(Counter(node.op_type for node in graph.graph.node).items()))
    try:
        if op_types.get("Gemm"):
            raise UsageError(
                f"the export of {hf_folder.name} has {op_types['Gemm']} Gemm node(s): "
                "4-bit MatMulNBits quantization would skip them"
            )
        check = _check_against_torch(onnxruntime, torch, model, out, shape)
    except UsageError:
        out.unlink()  # never leave a graph that failed its checks where a store may take it
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
        "source": {"folder": hf_folder.name, "architecture": type(model).__name__},
        "opset": opset,
        "kv_cache": KV_CACHE,
        "attention": "eager (MatMul + Softmax, additive 4-D mask built in the graph)",
        "inputs": names_in,
        "outputs": names_out,
        **{f"model_{k}": v for k, v in shape.items()},
        "op_types": op_types,
        "export_s": round(export_s, 2),
        "check": check,
        "size_bytes": out.stat().st_size,
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


def _kv_wrapper(model: Any, n_layers: int) -> Any:
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
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
                config=self.model.config,
            )
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=_additive_mask(torch, input_ids, attention_mask),
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


def _additive_mask(torch: Any, input_ids: Any, attention_mask: Any) -> Any:
    """``[batch, 1, seq, total]`` float mask: 0 where attended, the dtype minimum elsewhere.

    Built from tensor ops only (cumulative sums, not traced sizes) so that it stays
    correct for every sequence and past length.
    """
    total_ones, new_ones = torch.ones_like(attention_mask), torch.ones_like(input_ids)
    slots = torch.cumsum(total_ones, dim=1) - 1  # [b, total]: 0 .. total-1
    past = total_ones.sum(dim=1, keepdim=True) - new_ones.sum(dim=1, keepdim=True)  # [b, 1]
    query_slots = torch.cumsum(new_ones, dim=1) - 1 + past  # [b, seq]: past .. total-1
    causal = slots[:, None, None, :] <= query_slots[:, None, :, None]
    allowed = causal & (attention_mask[:, None, None, :] > 0)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _check_against_torch(
    ort: Any, torch: Any, model: Any, path: Path, shape: dict[str, int]
) -> dict[str, Any]:
    """Prompt then one cached decode step in onnxruntime vs transformers; the differences."""
    n_layers = shape["layers"]
    prompt = _example_inputs(shape, 1, 0, _CHECK_PROMPT)
    rng = np.random.default_rng(_SEED + 1)
    next_id = rng.integers(0, shape["vocab"], size=(1, 1), dtype=np.int64)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names_out = output_names(n_layers)
    first = dict(zip(names_out, session.run(None, prompt), strict=True))
    step = {
        "input_ids": next_id,
        "attention_mask": np.ones((1, _CHECK_PROMPT + 1), dtype=np.int64),
        "position_ids": np.array([[_CHECK_PROMPT]], dtype=np.int64),
    }
    for i in range(n_layers):
        step[f"past_key_values.{i}.key"] = first[f"present.{i}.key"]
        step[f"past_key_values.{i}.value"] = first[f"present.{i}.value"]
    second = session.run(["logits"], step)[0]

    ids = np.concatenate([prompt["input_ids"], next_id], axis=1)
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    prompt_diff = float(np.max(np.abs(first["logits"] - expected[:, :_CHECK_PROMPT])))
    step_diff = float(np.max(np.abs(second - expected[:, _CHECK_PROMPT:])))
    if not max(prompt_diff, step_diff) <= _CHECK_ATOL:
        raise UsageError(
            f"the ONNX export's logits differ from transformers': max |diff| "
            f"{prompt_diff:.2e} (prompt), {step_diff:.2e} (cached decode step) > {_CHECK_ATOL}"
        )
    return {
        "prompt_tokens": _CHECK_PROMPT,
        "max_abs_diff_prompt": prompt_diff,
        "max_abs_diff_decode_step": step_diff,
        "atol": _CHECK_ATOL,
    }

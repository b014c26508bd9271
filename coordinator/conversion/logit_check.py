"""Every full-precision conversion checked against the source checkpoint's own logits.

The reference is the checkpoint run once by transformers in float32 with eager attention
(:func:`checkpoint_logits`): the first ``n_tokens`` ids of a text (BOS first when the
tokenizer or config names one) and the logits at every position, ``[n, vocab]``. Each
conversion is run on exactly those ids, from an empty cache, by its own runtime
(:func:`gguf_logits`, :func:`onnx_logits`, :func:`openvino_logits`, :func:`mlx_logits`);
no runtime re-tokenizes. :func:`check_conversion` compares: the maximum absolute logit
difference, that difference relative to the reference's largest ``|logit|``, and the
share of positions whose argmax agrees. It returns the ``logit_check`` provenance, or
raises :class:`ConversionError` when the relative difference exceeds the format's
tolerance (:data:`TOLERANCES`).

Tolerances (:data:`TOLERANCES`) are relative to the reference's largest |logit|: rounding
weights to float16 moves logits in proportion to their size. They were measured on the
tiny random checkpoints of :mod:`coordinator.models.checkpoints` (32 tokens of
:data:`agent.llm_eval.FALLBACK_TEXT`, BOS first; transformers 5.23, torch 2.13, llama.cpp
of llama-cpp-python 0.3.36 (AVX2 build), onnxruntime 1.31.1, OpenVINO 2026.4.1 (CPU, f32
inference precision), mlx 0.32.4 / mlx-lm 0.32.2 on Linux CPU), as built ("stock") and
with sharp attention ("sharp": q/k scaled x3, via the q/k norms for Qwen3 and Gemma 3,
attention output x4). A random checkpoint's attention is near-uniform, so its logits
hardly depend on positions and a wrong RoPE base moves them little; sharp attention, as in
trained models, makes RoPE matter. Max |logit| is 129-140 (stock), 92-127 (sharp); std 8.

Honest conversions, max |diff| / max |logit|, stock | sharp (the largest sharp ones in
absolute terms: Gemma 3 GGUF F16 0.74, OpenVINO fp16 0.27, MLX fp16 0.31 and 0.80)::

    format           llama            qwen3            phi3             gemma3
    gguf-f16         1.1e-4 | 1.6e-4  1.1e-4 | 1.3e-3  1.1e-4 | 1.9e-4  1.6e-4 | 8.1e-3
    onnx-fp32        4.3e-7 | 3.6e-7  6.5e-7 | 1.2e-6  8.7e-7 | 6.0e-7  5.9e-7 | 2.7e-6
    openvino-fp32    4.3e-7 | 3.6e-7  6.5e-7 | 1.3e-6  8.7e-7 | 7.2e-7  4.7e-7 | 5.6e-6
    openvino-fp16    8.6e-5 | 1.2e-4  8.9e-5 | 9.1e-4  8.6e-5 | 1.6e-4  1.3e-4 | 2.9e-3
    mlx-fp16         8.6e-5 | 1.2e-4  8.8e-5 | 7.0e-4  8.6e-5 | 1.3e-4  1.2e-4 | 3.4e-3
    mlx-fp16, fp16   4.2e-4 | 3.0e-4  4.6e-4 | 1.6e-3  5.1e-4 | 2.9e-4  3.1e-4 | 8.8e-3
      arithmetic

Silently wrong conversions, the same measure (every format within 2% of the others)::

    wrong conversion                          llama    qwen3    phi3     gemma3
    RoPE base 1e4 (phi3: 1e6), stock          7.1e-4   1.6e-2   1.7e-3   1.7e-2
    RoPE base 1e4 (phi3: 1e6), sharp          3.2e-2   2.8e-1   1.05e-1  1.6e-1
    Phi-3 longrope ignored (plain RoPE)                         1.6e-3 (stock), 4.9e-2 (sharp)
    mlx-lm longrope (long_factor at every                       1.7e-3 (stock), 9.0e-2 (sharp)
      length), MLX fp16

The float32 formats' tolerance (1e-3) sits 180x above their largest honest error and 32x
below the smallest sharp wrong one. The float16 formats' (1e-2) sits 3x above (sharp
Gemma 3) and 3x below; GGUF F16's (1.5e-2: llama.cpp's F16 matmuls round the activations
to float16 too) 2x and 2x. MLX is checked computing in float32 (:func:`mlx_logits`: the
float16 weights upcast exactly), so the check sees the artifact, not float16 arithmetic
(8.8e-3 on sharp Gemma 3). On the stock checkpoints the small wrong cases (7.1e-4 ..
1.7e-3) are caught only by the float32 formats' tolerance: test checkpoints need sharp
attention for a RoPE mistake to show. The mlx-lm longrope row is mlx-lm reading the
source's ``rope_scaling`` as it is; :mod:`coordinator.conversion.mlx_convert` rewrites it.
"""

from __future__ import annotations

import gc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import one_line
from edgefarm.errors import ArtifactError, ConversionError, MissingExtra, UsageError

REFERENCE = "transformers float32"
DEFAULT_TOKENS = 32
KIND = "checkpoint_logits"

# Largest max|diff| / max|reference logit| each full-precision format may show.
TOLERANCES: dict[str, float] = {
    "gguf-f16": 1.5e-2,
    "onnx-fp32": 1e-3,
    "openvino-fp32": 1e-3,
    "openvino-fp16": 1e-2,
    "mlx-fp16": 1e-2,
}
FORMAT_NAMES: dict[str, str] = {
    "gguf-f16": "GGUF F16",
    "onnx-fp32": "ONNX fp32",
    "openvino-fp32": "OpenVINO IR fp32",
    "openvino-fp16": "OpenVINO IR fp16",
    "mlx-fp16": "MLX fp16",
}
OPENVINO_PRECISIONS = ("f32", "f16", "bf16")


# ----- the reference ------------------------------------------------------------------


def checkpoint_tokens(tokenizer: Any, config: Any, text: str, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` ids of ``text`` (int64), the BOS id first when the tokenizer
    (else the config) names one. Every runtime gets these ids; none re-tokenizes."""
    if n_tokens < 1:
        raise UsageError(f"the logit check needs at least 1 token, got n_tokens={n_tokens}")
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    if not ids:
        raise UsageError("the logit check's text gives no tokens")
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def checkpoint_logits(
    folder: Path, text: str, n_tokens: int = DEFAULT_TOKENS
) -> dict[str, np.ndarray]:
    """The checkpoint's own logits on ``text``: ``{"tokens": int64 [n], "logits": float32
    [n, vocab]}`` from one transformers forward pass (float32, eager attention).

    The model is loaded once and freed before returning. Raises :class:`UsageError` for a
    folder without ``config.json``, :class:`MissingExtra` without torch/transformers and
    :class:`ConversionError` when transformers cannot load or run the checkpoint.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UsageError(f"not a Hugging Face checkpoint folder (no config.json): {folder}")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingExtra("hf", exc.name or "transformers") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConversionError(
            one_line(f"transformers could not load checkpoint {folder.name}: {err}")
        ) from err
    try:
        tokens = checkpoint_tokens(tokenizer, model.config, text, n_tokens)
        _check_ids(tokens, int(model.config.get_text_config().vocab_size), folder.name)
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(tokens)[None], use_cache=False)
        logits = out.logits[0].to(torch.float32).numpy().copy()
    except RuntimeError as err:
        raise ConversionError(
            one_line(f"transformers could not run checkpoint {folder.name}: {err}")
        ) from err
    finally:
        del model
        gc.collect()
    return {"tokens": tokens, "logits": logits}


def save_checkpoint_logits(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the reference (:func:`checkpoint_logits`) as an uncompressed ``.npz``."""
    tokens, logits = _validated(arrays, Path(path).name)
    with open(path, "wb") as out:
        np.savez(out, kind=np.array(KIND), tokens=tokens, logits=logits)


def load_checkpoint_logits(path: Path) -> dict[str, np.ndarray]:
    """Read a reference written by :func:`save_checkpoint_logits`; :class:`ArtifactError`
    (one line) when the file is unreadable, of another kind or malformed."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ("kind", "tokens", "logits") if name not in npz.files]
            if missing:
                raise ArtifactError(
                    f"checkpoint logits {path.name} lack array(s): {', '.join(missing)}"
                )
            kind, tokens, logits = str(npz["kind"]), npz["tokens"], npz["logits"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(one_line(f"cannot read checkpoint logits {path}: {err}")) from err
    if kind != KIND:
        raise ArtifactError(f"{path.name} holds '{kind}', not checkpoint logits")
    tokens, logits = _validated({"tokens": tokens, "logits": logits}, path.name)
    return {"tokens": tokens, "logits": logits}


def _validated(arrays: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``tokens`` int64 [n] and ``logits`` float32 [n, vocab], finite, ids in the vocab."""
    if "tokens" not in arrays or "logits" not in arrays:
        raise ArtifactError(f"checkpoint logits {name} need arrays tokens and logits")
    tokens, logits = np.asarray(arrays["tokens"]), np.asarray(arrays["logits"])
    if tokens.ndim != 1 or len(tokens) < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ArtifactError(
            f"checkpoint logits {name}: tokens must be 1-D integers, got {tokens.dtype} "
            f"{tokens.shape}"
        )
    if logits.ndim != 2 or logits.shape[0] != len(tokens) or logits.shape[1] < 1:
        raise ArtifactError(
            f"checkpoint logits {name}: logits have shape {logits.shape}, expected "
            f"({len(tokens)}, vocab)"
        )
    if not np.issubdtype(logits.dtype, np.floating) or not np.all(np.isfinite(logits)):
        raise ArtifactError(f"checkpoint logits {name}: logits must be finite floats")
    _check_ids(tokens, logits.shape[1], name, error=ArtifactError)
    return tokens.astype(np.int64), logits.astype(np.float32)


def _check_ids(
    tokens: np.ndarray, vocab: int, name: str, error: type[Exception] = ConversionError
) -> None:
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise error(
            f"token ids of {name} span {int(tokens.min())}..{int(tokens.max())}, outside "
            f"its vocabulary of {vocab}"
        )


# ----- the runtimes -------------------------------------------------------------------


def gguf_logits(path: Path, tokens: np.ndarray, threads: int = 1) -> np.ndarray:
    """llama.cpp's logits ``[n, vocab]`` (float32) for ``tokens`` at every position, from
    an empty cache, with the farm's loader (:func:`agent.llm_eval.open_llama`)."""
    try:
        from agent.llm_eval import check_token_ids, open_llama
    except ImportError as exc:
        raise MissingExtra("llama-cpp", exc.name or "llama_cpp") from exc
    ids = _ids(tokens)
    llm = open_llama(Path(path), max(len(ids), 2), threads, logits_all=True)
    try:
        check_token_ids(ids, llm.n_vocab(), "logit-check token")
        llm.eval(ids.tolist())
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def onnx_logits(path: Path, tokens: np.ndarray, threads: int = 1) -> np.ndarray:
    """onnxruntime's logits ``[n, vocab]`` (float32) for ``tokens``: one run of the
    KV-cache graph (:mod:`coordinator.conversion.hf_to_onnx`) with a past of length 0.

    ``path`` is the ``.onnx`` file or its folder (external data beside it).
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingExtra("onnxruntime", exc.name or "onnxruntime") from exc
    from agent.backends.onnxruntime import open_session
    from agent.backends.onnxruntime_llm import LOGITS, KvGraph
    from edgefarm.domain import MeasureSettings

    session, _ = open_session(onnxruntime, Path(path), MeasureSettings(threads=threads), {})
    graph = KvGraph.of(session)
    ids = _ids(tokens)
    feed = {**graph.token_feed(ids, 0), **graph.empty_cache()}
    logits = session.run([LOGITS], feed)[0]
    return np.asarray(logits[0], dtype=np.float32)


def openvino_logits(
    xml_path: Path, tokens: np.ndarray, precision: str = "f32", threads: int = 1
) -> np.ndarray:
    """OpenVINO's logits ``[n, vocab]`` (float32) for ``tokens`` on the CPU: the IR of the
    KV-cache graph run once from an empty cache at inference precision ``precision``."""
    if precision not in OPENVINO_PRECISIONS:
        raise UsageError(
            f"unknown inference precision '{precision}' (known: {', '.join(OPENVINO_PRECISIONS)})"
        )
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtra("openvino", exc.name or "openvino") from exc
    from agent.backends.openvino_llm import OvKvGraph
    from coordinator.conversion.telemetry import decline_openvino_telemetry

    decline_openvino_telemetry()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    try:
        compiled = core.compile_model(core.read_model(str(xml_path)), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError and friends
        raise ConversionError(
            one_line(f"openvino could not load {Path(xml_path).name}: {err}")
        ) from err
    layout = OvKvGraph.of(compiled)
    request = compiled.create_infer_request()
    request.infer(layout.prompt_feed(ov, _ids(tokens)))
    return np.array(request.get_output_tensor(layout.logits).data[0], dtype=np.float32)


def mlx_logits(folder: Path, tokens: np.ndarray, dtype: str | None = "float32") -> np.ndarray:
    """mlx-lm's logits ``[n, vocab]`` (float32) for ``tokens``: the MLX folder loaded with
    ``mlx_lm.load`` (as the farm's MLX backend does) and run once without a cache.

    ``dtype`` (default float32) is the dtype the model computes in: float16 weights upcast
    exactly, so the check sees the artifact's weights, config and mlx-lm's model code
    without float16 arithmetic noise; ``None`` computes in the stored dtypes.
    """
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise MissingExtra("mlx", exc.name or "mlx_lm") from exc
    try:
        model = mlx_lm.load(str(folder))[0]
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
        raise ConversionError(
            one_line(f"mlx-lm could not load {Path(folder).name}: {type(err).__name__}: {err}")
        ) from err
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    ids = _ids(tokens)
    logits = model(mx.array(ids[None, :].astype(np.int32)))[0].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits, dtype=np.float32)


def _ids(tokens: np.ndarray) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64).ravel()
    if len(ids) < 1:
        raise UsageError("the logit check needs at least 1 token")
    return ids


# ----- the check ----------------------------------------------------------------------


def check_conversion(
    fmt: str,
    reference: dict[str, np.ndarray],
    logits: np.ndarray,
    tolerance: float | None = None,
    *,
    model: str = "the model",
) -> dict[str, Any]:
    """Compare a conversion's ``logits`` with the checkpoint's (``reference``).

    ``tolerance`` is the largest allowed max |diff| relative to the reference's max
    |logit| (default: :data:`TOLERANCES` of ``fmt``). Returns the provenance
    ``{"logit_check": {format, tokens, max_abs_diff, relative, top1_agreement, tolerance,
    reference, reference_max_abs}}``; raises :class:`ConversionError` (one line naming
    the format, the model, the measured difference and the tolerance) when the logits
    have another shape, are not finite or differ by more than the tolerance.
    """
    if tolerance is None:
        if fmt not in TOLERANCES:
            raise UsageError(
                f"no logit tolerance for format '{fmt}' (known: {', '.join(TOLERANCES)})"
            )
        tolerance = TOLERANCES[fmt]
    name = FORMAT_NAMES.get(fmt, fmt)
    ref = np.asarray(reference["logits"], dtype=np.float32)
    got = np.asarray(logits, dtype=np.float32)
    if got.shape != ref.shape:
        raise ConversionError(
            f"{name} conversion of {model}: logits of shape {got.shape}, the checkpoint's "
            f"are {ref.shape}"
        )
    diff = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    relative = diff / scale if scale > 0 else float("inf")
    top1 = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))
    if not relative <= tolerance:  # NaN fails too
        raise ConversionError(
            f"{name} conversion of {model} does not keep the model: max |logit diff| "
            f"{diff:.4g} vs {REFERENCE} over {len(ref)} tokens is {relative:.3g} of the "
            f"largest |logit| ({scale:.4g}), over the tolerance {tolerance:.3g} "
            f"(top-1 agreement {top1:.0%})"
        )
    return {
        "logit_check": {
            "format": fmt,
            "tokens": len(ref),
            "max_abs_diff": diff,
            "relative": relative,
            "top1_agreement": top1,
            "tolerance": tolerance,
            "reference": REFERENCE,
            "reference_max_abs": scale,
        }
    }

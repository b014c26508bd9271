"""Every full-precision conversion checked against the source checkpoint's own logits.

The reference is the checkpoint run once by transformers in float32 with eager attention
(:func:`checkpoint_logits`): the first ``n_tokens`` ids of a text (BOS first when the
tokenizer or config names one) and the logits at every position, ``[n, vocab]``. Each
conversion is run on exactly those ids, from an empty cache, by its own runtime
(:func:`gguf_logits`, :func:`onnx_logits`, :func:`openvino_logits`, :func:`mlx_logits`,
:func:`genai_logits`);
no runtime re-tokenizes. :func:`check_conversion` compares (:func:`logit_difference`):
the root mean square of the logit difference relative to the standard deviation of the
reference's logits (``relative``), the maximum absolute difference and the share of
positions whose argmax agrees. It returns the ``logit_check`` provenance, or raises
:class:`ConversionError` when ``relative`` exceeds the format's tolerance
(:data:`TOLERANCES`).

Measured on the tiny random checkpoints of :mod:`coordinator.models.checkpoints` (final
norm x8: logit std 2.56, max |logit| 12.3-13.3; sharp attention: q/k x3, o_proj x4; 32
tokens of :data:`agent.llm_eval.FALLBACK_TEXT`, BOS first; transformers 5.23, torch 2.13,
llama.cpp of llama-cpp-python 0.3.36 (AVX2 build), onnxruntime 1.31.1, OpenVINO 2026.4.1
(CPU, f32 inference precision), mlx 0.32.4 / mlx-lm 0.32.2 on Linux CPU, onnxruntime-genai
0.18.0's builder and generator). Honest
conversions, RMS |diff| / std(logits) | max |diff| / max |logit|::

    format           llama            qwen3            phi3             gemma3
    gguf-f16         6.9e-4 | 7.7e-4  3.1e-3 | 9.2e-3  9.6e-4 | 1.2e-3  2.0e-2 | 5.8e-2
    onnx-fp32        6.0e-7 | 8.9e-7  5.0e-6 | 2.2e-5  8.2e-7 | 1.0e-6  1.9e-5 | 4.5e-5
    openvino-fp32    6.1e-7 | 8.2e-7  4.8e-6 | 2.2e-5  8.4e-7 | 1.0e-6  1.9e-5 | 4.3e-5
    openvino-fp16    5.1e-4 | 5.2e-4  2.8e-3 | 7.7e-3  7.7e-4 | 1.1e-3  1.3e-2 | 3.7e-2
    mlx-fp16         5.0e-4 | 5.1e-4  2.4e-3 | 5.3e-3  6.4e-4 | 7.6e-4  1.4e-2 | 3.2e-2
    mlx-fp16, fp16   8.6e-4 | 9.0e-4  5.0e-3 | 1.3e-2  1.2e-3 | 1.4e-3  3.2e-2 | 7.9e-2
      arithmetic
    genai-fp32       4.9e-7 | 7.1e-7  1.6e-6 | 3.3e-6  5.7e-7 | 7.4e-7  (builder fails)

Silently wrong conversions, the same two measures (every format within 1% of the
others and of transformers itself running the wrong config)::

    wrong conversion          llama            qwen3           phi3             gemma3
    RoPE base 1e4             1.2e-1 | 1.8e-1  8.1e-1 | 1.07   4.4e-1 | 7.3e-1  3.0e-1 | 5.0e-1
      (phi3: 1e6)
    Phi-3 longrope ignored                                     2.6e-1 | 4.0e-1
    mlx-lm longrope (long_factor                               4.7e-1 | 7.3e-1
      at every length), MLX fp16

The RMS measure separates better: the float16 rounding peaks at a few logits while a
wrong RoPE moves all of them. The largest honest float16 error over the smallest wrong
one is 1 : 6.1 (GGUF F16), 1 : 8.7 (MLX), 1 : 9.3 (OpenVINO fp16) by RMS, but 1 : 3.1,
1 : 5.6, 1 : 4.8 by the maximum (normalising by the standard deviation instead of max
|logit| changes nothing: max |logit| / std is 4.8-5.2 on all four). The tolerances sit
between: GGUF F16 5e-2 (2.6x above Gemma 3's honest 2.0e-2, 2.4x below Llama's wrong
RoPE 1.2e-1; llama.cpp's F16 matmuls round the activations to float16 too), OpenVINO
fp16 and MLX fp16 4e-2 (3.1x and 2.9x above, 3.0x below), the float32 formats 1e-3 (53x
above, 119x below). MLX is checked computing in float32 (:func:`mlx_logits`: the float16
weights upcast exactly), so the check sees the artifact, not float16 arithmetic (3.2e-2
on Gemma 3). Gemma 3 (6 layers, sharp attention) amplifies rounding most. The mlx-lm
longrope row is mlx-lm reading the source's ``rope_scaling`` as it is;
:mod:`coordinator.conversion.mlx_convert` rewrites it.
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

# Largest RMS logit difference / std of the reference logits each full-precision
# format may show (measured: the module docstring).
TOLERANCES: dict[str, float] = {
    "gguf-f16": 5e-2,
    "onnx-fp32": 1e-3,
    "openvino-fp32": 1e-3,
    "openvino-fp16": 4e-2,
    "mlx-fp16": 4e-2,
    "genai-fp32": 1e-3,
}
FORMAT_NAMES: dict[str, str] = {
    "gguf-f16": "GGUF F16",
    "onnx-fp32": "ONNX fp32",
    "openvino-fp32": "OpenVINO IR fp32",
    "openvino-fp16": "OpenVINO IR fp16",
    "mlx-fp16": "MLX fp16",
    "genai-fp32": "ONNX GenAI fp32",
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


def genai_logits(folder: Path, tokens: np.ndarray, threads: int = 1) -> np.ndarray:
    """onnxruntime-genai's logits ``[n, vocab]`` (float32) for ``tokens``: the ONNX GenAI
    folder opened by the farm's backend (CPU provider) and the tokens appended to one
    fresh generator as a prompt."""
    from agent.backends.onnxruntime_genai import OnnxRuntimeGenaiBackend
    from edgefarm.domain import MeasureSettings
    from edgefarm.errors import TaskError

    ids = _ids(tokens).astype(np.int32)
    backend = OnnxRuntimeGenaiBackend()
    try:
        settings = MeasureSettings(
            threads=threads,
            prompt_tokens=1,
            warmup_iterations=0,
            min_iterations=1,
            context_tokens=max(len(ids), 2),
        )
        backend.load(Path(folder), settings, {})
        return backend.prompt_logits(ids)
    except TaskError as err:  # a load or run failure of the runtime
        raise ConversionError(
            one_line(f"onnxruntime-genai could not run {Path(folder).name}: {err}")
        ) from err


def _ids(tokens: np.ndarray) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64).ravel()
    if len(ids) < 1:
        raise UsageError("the logit check needs at least 1 token")
    return ids


# ----- the check ----------------------------------------------------------------------


def logit_difference(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """How far ``logits`` are from ``reference`` (both ``[n, vocab]``, same shape):
    ``max_abs_diff``, ``rms_diff`` (root mean square of the difference),
    ``reference_std`` and ``reference_max_abs`` of the reference, ``relative``
    (``rms_diff / reference_std``: what :data:`TOLERANCES` bound) and
    ``top1_agreement`` (share of positions whose argmax agrees)."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(logits, dtype=np.float64)
    diff = got - ref
    rms = float(np.sqrt(np.mean(np.square(diff))))
    std = float(np.std(ref))
    return {
        "max_abs_diff": float(np.max(np.abs(diff))),
        "rms_diff": rms,
        "reference_std": std,
        "reference_max_abs": float(np.max(np.abs(ref))),
        "relative": rms / std if std > 0 else float("inf"),
        "top1_agreement": float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1))),
    }


def check_conversion(
    fmt: str,
    reference: dict[str, np.ndarray],
    logits: np.ndarray,
    tolerance: float | None = None,
    *,
    model: str = "the model",
) -> dict[str, Any]:
    """Compare a conversion's ``logits`` with the checkpoint's (``reference``).

    ``tolerance`` is the largest allowed RMS difference relative to the standard
    deviation of the reference logits (default: :data:`TOLERANCES` of ``fmt``). Returns
    the provenance ``{"logit_check": {format, tokens, max_abs_diff, relative,
    top1_agreement, tolerance, reference, reference_max_abs, rms_diff, reference_std}}``;
    raises :class:`ConversionError` (one line naming the format, the model, the measured
    difference and the tolerance) when the logits have another shape, are not finite or
    differ by more than the tolerance.
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
    measured = logit_difference(ref, got)
    relative, top1 = measured["relative"], measured["top1_agreement"]
    if not relative <= tolerance:  # NaN fails too
        raise ConversionError(
            f"{name} conversion of {model} does not keep the model: RMS logit difference "
            f"{measured['rms_diff']:.4g} vs {REFERENCE} over {len(ref)} tokens is "
            f"{relative:.3g} of the logits' standard deviation "
            f"({measured['reference_std']:.4g}), over the tolerance {tolerance:.3g} "
            f"(max |diff| {measured['max_abs_diff']:.4g}, top-1 agreement {top1:.0%})"
        )
    return {
        "logit_check": {
            "format": fmt,
            "tokens": len(ref),
            "max_abs_diff": measured["max_abs_diff"],
            "relative": relative,
            "top1_agreement": top1,
            "tolerance": tolerance,
            "reference": REFERENCE,
            "reference_max_abs": measured["reference_max_abs"],
            "rms_diff": measured["rms_diff"],
            "reference_std": measured["reference_std"],
        }
    }

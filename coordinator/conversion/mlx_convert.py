"""MLX model folders made from a Hugging Face folder with mlx-lm's converter, offline.

Schemes (:data:`MLX_SCHEMES`):

- ``fp16``: every weight in float16 (what the llama.cpp F16 reference runs);
- ``q8`` / ``q4``: mlx-lm's affine quantization of the linear and embedding weights to
  8 / 4 bits in groups of ``group_size`` (default 64; 32, 64 or 128) with one scale and
  one bias per group; the other tensors, the scales and biases, and so the activations,
  are in ``dtype`` (default float32). On MLX's Linux CPU build a float16 quantized
  matmul is ~40x slower than a float32 one (one token through SmolLM2's 49152 x 576
  output layer: ~800 ms vs ~20 ms) and a 4-bit model in float16 decodes at ~0.2 tok/s;
  float32 scales cost half a bit per weight more at group size 64. Apple-silicon
  campaigns that want mlx-lm's usual artifacts pass ``dtype: float16`` (or bfloat16).

The RoPE guard: transformers 5 keeps the RoPE base only in ``rope_parameters``, while
mlx-lm's model classes read a top-level ``rope_theta`` and silently fall back to their
default (10000 for llama; SmolLM2's is 100000) without one, which ruins the output
without any error. :func:`convert_mlx` takes the base from the source config
(``rope_parameters``, then ``rope_scaling``, then the top level) and makes sure the
output ``config.json`` carries it at the top level (copied in when missing, corrected
when different), and records what it did as ``rope_theta_action``.

The config normalisation (:func:`mlx_config`): mlx-lm 0.32.2 reads the hub's keys, not
transformers 5's ``rope_parameters``. What each architecture needs at the top level:

- ``llama``: ``rope_theta`` (default 10000 otherwise); ``qwen3``: ``rope_theta`` (it also
  reads ``rope_parameters``);
- ``phi3``: ``rope_theta``, ``partial_rotary_factor`` (default 1.0),
  ``original_max_position_embeddings`` (default 4096) and ``rope_scaling`` with ``type``
  (it refuses ``rope_type`` alone), ``short_factor`` and ``long_factor``. mlx-lm's
  LongRoPE applies ``long_factor`` at every length, while transformers applies
  ``short_factor`` up to ``original_max_position_embeddings`` tokens and ``long_factor``
  beyond; the config therefore gets ``short_factor`` as its ``long_factor``, which is
  transformers' computation for contexts up to that length (4096 for Phi-4-mini; the
  farm measures 512 by default) and is recorded in the provenance (``longrope``); the
  config also gets ``edgefarm_max_context_tokens``, above which the MLX backend refuses
  to measure (:class:`UnsupportedArchitecture`) rather than measure a wrong model. A
  config whose ``attention_factor`` or ``factor`` differ from what mlx-lm derives
  (``sqrt(1 + ln(max / original) / ln(original))``) is refused;
- ``gemma3_text``: ``rope_theta`` (global layers), ``rope_local_base_freq`` (sliding
  layers), ``sliding_window_pattern`` (mlx-lm places the global layers at every n-th
  index: a ``layer_types`` list that is not of that form is refused) and the global
  layers' ``rope_scaling`` when it is not the default.

A model type mlx-lm has no module for, or a configuration it cannot represent, raises
:class:`UnsupportedArchitecture` naming the model type and ``mlx``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.backends.mlx import MAX_CONTEXT_KEY, check_model_folder, pack_folder, unpack_folder
from coordinator.conversion.files import folder_manifest
from edgefarm.errors import (
    MissingExtra,
    ModelLoadError,
    UnsupportedArchitecture,
    UnsupportedScheme,
    UsageError,
)

MLX_SCHEMES = ("fp16", "q8", "q4")
SCHEME_BITS: dict[str, int | None] = {"fp16": None, "q8": 8, "q4": 4}
FULL_PRECISION_DTYPE = "float16"  # the fp16 scheme's dtype (fixed: the name says it)
DEFAULT_QUANTIZED_DTYPE = "float32"  # scales, biases and other tensors of q8 / q4
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_GROUP_SIZE = 64
GROUP_SIZES = (32, 64, 128)
QUANT_MODE = "affine"
PARAMS = frozenset({"group_size", "dtype"})
BACKEND = "mlx"
SLIDING, FULL = "sliding_attention", "full_attention"


def convert_mlx(
    hf_folder: Path, out_dir: Path, scheme: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Convert the Hugging Face folder ``hf_folder`` to an MLX folder ``out_dir``.

    ``out_dir`` must be absent or empty. ``params`` may hold ``group_size`` (q8/q4) and
    ``dtype`` (q8/q4: one of :data:`DTYPES`). Works offline: ``hf_folder`` must be a
    local folder. Returns the provenance: tool versions, scheme, bits, group size,
    dtype, the RoPE base and what the guard did, and every file with its size and
    sha256, and what :func:`mlx_config` changed. Raises :class:`UnsupportedScheme`,
    :class:`UsageError` (bad folder or parameter), :class:`MissingExtra` without mlx-lm,
    :class:`UnsupportedArchitecture` for a model mlx-lm cannot represent,
    :class:`ModelLoadError` when mlx-lm cannot read the source.
    """
    if scheme not in MLX_SCHEMES:
        raise UnsupportedScheme(f"unknown MLX scheme '{scheme}' (known: {', '.join(MLX_SCHEMES)})")
    bits = SCHEME_BITS[scheme]
    group_size, dtype = _settings(scheme, params or {})
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    if not hf_folder.is_dir():
        raise UsageError(f"Hugging Face model folder not found: {hf_folder}")
    try:
        source_config = check_model_folder(hf_folder)
    except ModelLoadError as err:
        raise UsageError(f"{hf_folder} is not a model folder: {err}") from None
    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UsageError(f"output folder is not empty: {out_dir}")
        out_dir.rmdir()  # mlx-lm insists on creating it
    try:
        from mlx_lm import convert
    except ImportError as exc:
        raise MissingExtra("mlx", exc.name or "mlx_lm") from exc

    rope_theta, rope_source = source_rope_theta(source_config)
    normalised, normalisation = mlx_config(source_config)
    with tempfile.TemporaryDirectory(prefix="edgefarm-mlx-source-") as staging:
        source = _staged_source(hf_folder, Path(staging), normalised)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
                convert(
                    hf_path=str(source),
                    mlx_path=str(out_dir),
                    quantize=bits is not None,
                    q_bits=bits,
                    q_group_size=group_size,
                    q_mode=QUANT_MODE,
                    dtype=dtype,
                )
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise ModelLoadError(f"mlx-lm could not convert {hf_folder.name}: {err}") from err
    action = _guard_config(out_dir / "config.json", rope_theta, dtype, source_config)

    files = folder_manifest(out_dir)
    return {
        "tool": "mlx-lm",
        "tool_versions": {
            "mlx": importlib.metadata.version("mlx"),
            "mlx-lm": importlib.metadata.version("mlx-lm"),
        },
        "scheme": scheme,
        "bits": bits,
        "group_size": group_size,
        "mode": QUANT_MODE if bits is not None else None,
        "dtype": dtype,
        "rope_theta": rope_theta,
        "rope_theta_source": rope_source,
        "rope_theta_action": action,
        "config_normalisation": normalisation,
        "files": files,
        "size_bytes": sum(f["size_bytes"] for f in files),
    }


def convert_mlx_archive(
    hf_archive: bytes, scheme: str, params: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """:func:`convert_mlx` from and to single-file artifacts: the Hugging Face folder as
    an uncompressed tar in, the MLX folder as a :func:`pack_folder` tar and the
    provenance out."""
    with tempfile.TemporaryDirectory(prefix="edgefarm-mlx-convert-") as tmp:
        hf = unpack_folder(hf_archive, Path(tmp) / "hf")
        out = Path(tmp) / "mlx"
        provenance = convert_mlx(hf, out, scheme, params)
        shutil.rmtree(hf)
        return pack_folder(out), provenance


def source_rope_theta(config: dict[str, Any]) -> tuple[float | None, str | None]:
    """The RoPE base of a Hugging Face config and where it was found, or (None, None).

    ``rope_parameters`` (transformers 5; per layer type, the global layers' base) first,
    then ``rope_scaling``, then the top level.
    """
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and isinstance(params.get(FULL), dict):
            params, key = params[FULL], f"{key}.{FULL}"
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"]), f"{key}.rope_theta"
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"]), "rope_theta"
    return None, None


def mlx_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` with the top-level keys mlx-lm reads (see the module docstring), and
    what was set (key -> value, plus ``longrope`` for Phi-3). Raises
    :class:`UnsupportedArchitecture` for a model mlx-lm cannot represent."""
    model_type = str(config.get("model_type", ""))
    if importlib.util.find_spec("mlx_lm") is not None and not _mlx_has_model(model_type):
        raise UnsupportedArchitecture(
            f"{model_type or 'a model without model_type'}: mlx-lm has no model for this "
            f"architecture ({BACKEND})"
        )
    out = json.loads(json.dumps(config))
    changes: dict[str, Any] = {}
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}

    def put(key: str, value: Any) -> None:
        if value is not None and out.get(key) != value:
            out[key] = changes[key] = value

    if model_type == "gemma3_text":
        _gemma3(out, params, put)
    else:
        put("rope_theta", params.get("rope_theta"))
    if model_type == "phi3" and params.get("rope_type") == "longrope":
        changes["longrope"] = _phi3_longrope(out, params, put)
    return out, changes


def _gemma3(out: dict[str, Any], params: dict[str, Any], put: Any) -> None:
    """Gemma 3: both RoPE bases, the sliding-window pattern and the global scaling."""
    full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
    put("rope_theta", full.get("rope_theta"))
    put("rope_local_base_freq", sliding.get("rope_theta"))
    rope_types = {
        "global": (full.get("rope_type", "default"), ("default", "linear")),
        "sliding": (sliding.get("rope_type", "default"), ("default",)),
    }
    for name, (rope_type, allowed) in rope_types.items():
        if rope_type not in allowed:
            raise UnsupportedArchitecture(
                f"gemma3_text: mlx-lm applies no {rope_type!r} RoPE on the {name} layers "
                f"({BACKEND})"
            )
    if full.get("rope_type") == "linear":
        put("rope_scaling", {"type": "linear", "factor": float(full["factor"])})
    types = out.get("layer_types")
    if types:
        globals_at = [i for i, t in enumerate(types) if t == FULL]
        pattern = globals_at[0] + 1 if globals_at else len(types) + 1
        expected = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(len(types))]
        if list(types) != expected:
            raise UnsupportedArchitecture(
                "gemma3_text: mlx-lm places a global layer at every n-th index; this "
                f"model's layer_types do not follow one such pattern ({BACKEND})"
            )
        put("sliding_window_pattern", pattern)


def _phi3_longrope(out: dict[str, Any], params: dict[str, Any], put: Any) -> dict[str, Any]:
    """Phi-3 LongRoPE in the keys mlx-lm reads, short factors in place of long ones."""
    original = int(params["original_max_position_embeddings"])
    maximum = int(out.get("max_position_embeddings") or original)
    ratio = maximum / original
    derived = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1.0 else 1.0
    factor, attention = params.get("factor"), params.get("attention_factor")
    if (factor is not None and not math.isclose(float(factor), ratio)) or (
        attention is not None and not math.isclose(float(attention), derived)
    ):
        raise UnsupportedArchitecture(
            "phi3: mlx-lm derives LongRoPE's scaling from max_position_embeddings / "
            "original_max_position_embeddings, this config sets factor / attention_factor "
            f"otherwise ({BACKEND})"
        )
    put("partial_rotary_factor", params.get("partial_rotary_factor"))
    put("original_max_position_embeddings", original)
    put(MAX_CONTEXT_KEY, original)  # the MLX backend refuses longer sequences
    put(
        "rope_scaling",
        {
            "type": "longrope",
            "short_factor": list(params["short_factor"]),
            "long_factor": list(params["short_factor"]),
        },
    )
    return {
        "mlx_lm_applies": "long_factor at every length",
        "transformers_applies": f"short_factor up to {original} tokens, long_factor beyond",
        "written": f"short_factor as long_factor: transformers' RoPE up to {original} tokens",
        "valid_up_to_tokens": original,
        "attention_scaling": derived,
    }


def _mlx_has_model(model_type: str) -> bool:
    """Whether mlx-lm has a model module for ``model_type`` (after its remapping)."""
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    return bool(name) and importlib.util.find_spec(f"mlx_lm.models.{name}") is not None


def _staged_source(hf_folder: Path, staging: Path, config: dict[str, Any]) -> Path:
    """A view of ``hf_folder`` with ``config`` as its ``config.json``: every other file
    a symbolic link (nothing is copied)."""
    staging.mkdir(parents=True, exist_ok=True)
    for path in hf_folder.iterdir():
        if path.name != "config.json":
            (staging / path.name).symlink_to(path.resolve())
    (staging / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return staging


def _settings(scheme: str, params: dict[str, Any]) -> tuple[int | None, str]:
    """The group size (None for fp16) and dtype of a conversion, checked."""
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise UsageError(
            f"unknown MLX conversion parameter(s): {', '.join(unknown)} "
            f"(known: {', '.join(sorted(PARAMS))})"
        )
    if SCHEME_BITS[scheme] is None:
        if params:
            raise UsageError(f"the {scheme} scheme takes no parameters, got {sorted(params)}")
        return None, FULL_PRECISION_DTYPE
    group_size = params.get("group_size", DEFAULT_GROUP_SIZE)
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size not in GROUP_SIZES
    ):
        raise UsageError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    dtype = params.get("dtype", DEFAULT_QUANTIZED_DTYPE)
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return group_size, str(dtype)


def _guard_config(
    config_json: Path, rope_theta: float | None, dtype: str, source: dict[str, Any]
) -> str:
    """Give the output config the source's RoPE base at the top level (and the real
    dtype); returns what was done relative to the source's top level: ``kept``,
    ``added``, ``corrected`` or ``none``."""
    data = json.loads(config_json.read_text(encoding="utf-8"))
    if rope_theta is None:
        action = "none"
    elif source.get("rope_theta") is None:
        action = "added"
    elif float(source["rope_theta"]) != rope_theta:
        action = "corrected"
    else:
        action = "kept"
    if rope_theta is not None:
        data["rope_theta"] = rope_theta
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = dtype  # mlx-lm keeps the source's value, not what it wrote
    config_json.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    check = json.loads(config_json.read_text(encoding="utf-8"))
    if rope_theta is not None and float(check.get("rope_theta", -1.0)) != rope_theta:
        raise UsageError(f"could not set rope_theta={rope_theta} in {config_json}")
    return action

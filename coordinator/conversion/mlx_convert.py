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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.backends.mlx import check_model_folder, pack_folder, unpack_folder
from coordinator.conversion.files import folder_manifest
from edgefarm.errors import MissingExtra, ModelLoadError, UnsupportedScheme, UsageError

MLX_SCHEMES = ("fp16", "q8", "q4")
SCHEME_BITS: dict[str, int | None] = {"fp16": None, "q8": 8, "q4": 4}
FULL_PRECISION_DTYPE = "float16"  # the fp16 scheme's dtype (fixed: the name says it)
DEFAULT_QUANTIZED_DTYPE = "float32"  # scales, biases and other tensors of q8 / q4
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_GROUP_SIZE = 64
GROUP_SIZES = (32, 64, 128)
QUANT_MODE = "affine"
PARAMS = frozenset({"group_size", "dtype"})


def convert_mlx(
    hf_folder: Path, out_dir: Path, scheme: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Convert the Hugging Face folder ``hf_folder`` to an MLX folder ``out_dir``.

    ``out_dir`` must be absent or empty. ``params`` may hold ``group_size`` (q8/q4) and
    ``dtype`` (q8/q4: one of :data:`DTYPES`). Works offline: ``hf_folder`` must be a
    local folder. Returns the provenance: tool versions, scheme, bits, group size,
    dtype, the RoPE base and what the guard did, and every file with its size and
    sha256. Raises :class:`UnsupportedScheme`, :class:`UsageError` (bad folder or
    parameter), :class:`MissingExtra` without mlx-lm, :class:`ModelLoadError` when
    mlx-lm cannot read the source.
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
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
            convert(
                hf_path=str(hf_folder),
                mlx_path=str(out_dir),
                quantize=bits is not None,
                q_bits=bits,
                q_group_size=group_size,
                q_mode=QUANT_MODE,
                dtype=dtype,
            )
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ModelLoadError(f"mlx-lm could not convert {hf_folder.name}: {err}") from err
    action = _guard_config(out_dir / "config.json", rope_theta, dtype)

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

    ``rope_parameters`` (transformers 5) first, then ``rope_scaling``, then the top level.
    """
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"]), f"{key}.rope_theta"
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"]), "rope_theta"
    return None, None


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


def _guard_config(config_json: Path, rope_theta: float | None, dtype: str) -> str:
    """Give the output config the source's RoPE base at the top level (and the real
    dtype); returns what was done: ``kept``, ``added``, ``corrected`` or ``none``."""
    data = json.loads(config_json.read_text(encoding="utf-8"))
    if rope_theta is None:
        action = "none"
    elif data.get("rope_theta") is None:
        action = "added"
    elif float(data["rope_theta"]) != rope_theta:
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

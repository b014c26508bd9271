"""A Hugging Face model folder made from a GGUF file, with transformers.

transformers dequantizes a GGUF into a float model but refuses to ``save_pretrained``
a GGUF-loaded model, so the weights are copied into a fresh model built from the same
config (with the GGUF ``quantization_config`` removed) and that one is saved. The folder
holds ``config.json``, ``generation_config.json``, the tokenizer read from the same GGUF
and ``model.safetensors``.

transformers 5 keeps the RoPE base only inside ``rope_parameters``; other loaders
(mlx-lm) read a top-level ``rope_theta`` and silently fall back to a wrong default
without it, so ``config.json`` always gets one when the model has a RoPE base.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from coordinator.conversion.files import file_sha256, folder_manifest
from edgefarm.errors import MissingExtra, UsageError

DTYPES = ("float32", "float16", "bfloat16")


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write a Hugging Face model folder made from ``gguf_path`` into ``out_dir``.

    ``out_dir`` must be absent or empty. Weights are dequantized by transformers and
    saved as ``dtype`` (one of :data:`DTYPES`). Returns the provenance: tool versions,
    source sha256, dtype, parameter count, RoPE base and every file written with its
    size and sha256. Raises :class:`MissingExtra` without torch/transformers/gguf and
    :class:`UsageError` for a missing source, a non-empty ``out_dir`` or a bad dtype.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"output folder is not empty: {out_dir}")

    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingExtra("hf", exc.name or "transformers") from exc
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as exc:
        raise MissingExtra("hf", "gguf") from exc

    source_sha256 = file_sha256(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    parameters = sum(p.numel() for p in fresh.parameters())
    architecture = type(fresh).__name__
    del loaded

    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    del fresh
    tokenizer.save_pretrained(out_dir)
    rope_theta, rope_source = _rope_theta(config.to_dict(), gguf_path)
    if rope_theta is not None:
        _set_top_level_rope_theta(out_dir / "config.json", rope_theta)

    files = folder_manifest(out_dir)
    return {
        "tool": "transformers",
        "tool_versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "source": {
            "name": gguf_path.name,
            "sha256": source_sha256,
            "size_bytes": gguf_path.stat().st_size,
        },
        "dtype": dtype,
        "architecture": architecture,
        "parameters": parameters,
        "rope_theta": rope_theta,
        "rope_theta_source": rope_source,
        "files": files,
        "size_bytes": sum(f["size_bytes"] for f in files),
    }


def gguf_rope_freq_base(gguf_path: Path) -> float | None:
    """The GGUF's ``<architecture>.rope.freq_base`` metadata value, or None."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        return None
    field = reader.get_field(f"{arch_field.contents()}.rope.freq_base")
    return None if field is None else float(field.contents())


def _rope_theta(config: dict[str, Any], gguf_path: Path) -> tuple[float | None, str | None]:
    """The RoPE base and where it came from: the config first, then the GGUF metadata."""
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"]), f"config.{key}"
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"]), "config.rope_theta"
    base = gguf_rope_freq_base(gguf_path)
    return (base, "gguf.rope.freq_base") if base is not None else (None, None)


def _set_top_level_rope_theta(config_json: Path, rope_theta: float) -> None:
    """Add a top-level ``rope_theta`` to a saved config.json, keeping its layout."""
    data = json.loads(config_json.read_text(encoding="utf-8"))
    data["rope_theta"] = rope_theta
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

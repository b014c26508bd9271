"""Hugging Face checkpoint folder -> ONNX Runtime GenAI model folder, with
``onnxruntime_genai.models.builder`` (Olive's ModelBuilder pass and Foundry Local use the
same format: ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` + tokenizer).

Schemes (:data:`GENAI_SCHEMES`), all built offline for an execution provider
(``execution_provider``, default ``cpu``; recorded, and written by the builder into
``genai_config.json``):

- ``int4`` / ``int8``: weight-only MatMulNBits quantization of every linear layer and
  the LM head (and the tied embedding, GatherBlockQuantized), in blocks of
  ``block_size`` weights (16, 32, 64, 128, 256; default 32) with one scale per block.
  ``algo`` picks the builder's method: ``rtn`` (round to nearest, the default) or
  ``k_quant``; ``mixed_precision`` (e.g. ``last_matmul:int8,mixed_layers:int8``, the
  builder's ``matmul_mixed_precision``) quantizes selected MatMul groups to another
  width: ``k_quant`` with ``last_matmul:int8,mixed_layers:int8`` is llama.cpp's
  Q4_K_M-like mix. ``accuracy_level`` (1 fp32, 2 fp16, 3 bf16, 4 int8 activations;
  default: the builder's, 4 on CPU) and ``symmetric`` (default true) are passed as given.
- ``fp32``: float32 weights and activations.
- ``fp16``: float16 weights and I/O. The builder (0.18) does not list FP16 CPU as a valid
  combination: it builds the model, onnxruntime 1.31.1's CPU provider runs a prompt
  through it, but the first decode step fails inside a Cast the runtime inserts
  ("Shape mismatch attempting to re-use buffer"); the backend reports that as a typed
  one-line error.

The builder runs in a child process (the coordinator never holds the model; the
builder reads the safetensors itself), offline, with its output in a log and under a
time limit; a failure raises :class:`ConversionError` (or
:class:`UnsupportedArchitecture` for an architecture it has no class for) quoting the
builder's last error line. The user's folder is never modified: the builder reads a
staging folder of symbolic links with a normalised copy of ``config.json``
(:func:`coordinator.conversion.hf_to_gguf.normalized_config`: transformers 5 writes
``rope_parameters``, the hub and the builder's older paths read ``rope_theta`` /
``rope_scaling`` / ``rope_local_base_freq``, and the builder's Phi-3 path the old scaling
key ``type``). Gemma 3 does not build with the builder of onnxruntime-genai 0.18: it
reads ``rope_parameters["rope_type"]`` from the config transformers 5 loads, which nests
Gemma 3's RoPE per layer type. The output is written into a temporary
folder beside ``out_dir`` and renamed into place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.backends.onnxruntime_genai import GENAI_CONFIG, check_genai_folder
from coordinator.conversion.files import file_sha256, folder_manifest
from coordinator.conversion.hf_to_gguf import (
    _log_tail,
    _run_logged,
    last_error_line,
    normalized_config,
    read_config,
)
from edgefarm.errors import (
    ConversionError,
    MissingExtra,
    ModelLoadError,
    UnsupportedArchitecture,
    UnsupportedScheme,
    UsageError,
)

TOOL = "onnxruntime-genai model builder"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
GENAI_SCHEMES = ("int4", "int8", "fp32", "fp16")
QUANTIZED = frozenset({"int4", "int8"})
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
ALGOS = ("rtn", "k_quant")
MIX_SELECTORS = frozenset({"last_matmul", "mixed_layers"})
MIX_TYPES = frozenset({"int4", "int8"})
ACCURACY_LEVELS = (1, 2, 3, 4)
QUANT_PARAMS = frozenset(
    {"block_size", "algo", "mixed_precision", "accuracy_level", "symmetric", "execution_provider"}
)
FLOAT_PARAMS = frozenset({"execution_provider"})
DEFAULT_TIMEOUT_S = 3600.0  # a 4B model builds in minutes; this only stops a hang
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_UNSUPPORTED = re.compile(r"The (.+) model is not currently supported")
_QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized")
# model_type values whose RoPE transformers 5 nests per layer type, which the builder's
# generic path cannot read (measured with onnxruntime-genai 0.18: KeyError 'rope_type').
NESTED_ROPE_FAILS = frozenset({"gemma3", "gemma3_text"})


def convert_genai(
    hf_folder: Path,
    out_dir: Path,
    scheme: str,
    params: dict[str, Any] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Build the ONNX GenAI folder ``out_dir`` (absent or empty) from ``hf_folder``.

    ``params``: see the module docstring (:data:`QUANT_PARAMS` for int4/int8,
    ``execution_provider`` only for fp32/fp16). Returns the provenance: tool versions,
    scheme, execution provider, block size, algorithm, mix, the exact builder options,
    what the config normalisation added, the weight types in the graph, the source
    ``config.json``'s sha256, every output file with size and sha256, wall seconds and the
    builder's peak RSS. Raises :class:`UnsupportedScheme`, :class:`UsageError` (bad
    folder or parameter), :class:`MissingExtra` without the builder or torch /
    transformers, :class:`UnsupportedArchitecture`, :class:`ConversionError`.
    """
    if scheme not in GENAI_SCHEMES:
        raise UnsupportedScheme(
            f"unknown ONNX GenAI scheme '{scheme}' (known: {', '.join(GENAI_SCHEMES)})"
        )
    settings = genai_settings(scheme, params or {})
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    if not hf_folder.is_dir():
        raise UsageError(f"Hugging Face model folder not found: {hf_folder}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"output folder is not empty: {out_dir}")
    config = read_config(hf_folder)
    _refuse_known_failures(config)
    _require_modules()
    options = builder_options(settings)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging = work / "source"
        added = _stage(hf_folder, staging, config)
        partial = work / "genai"
        command = [
            sys.executable, "-m", BUILDER_MODULE,
            "-i", str(staging), "-o", str(partial),
            "-p", scheme, "-e", settings["execution_provider"],
            "-c", str(work / "cache"),
            "--extra_options", *(f"{k}={v}" for k, v in options.items()),
        ]  # fmt: skip
        log = log_path or work / "build.log"
        started = time.monotonic()
        code, peak_rss, peak_anon = _run_logged(command, _builder_env(), log, timeout_s, work)
        wall_s = time.monotonic() - started
        if code == "timeout":
            raise ConversionError(
                f"the ONNX GenAI builder ran past its {timeout_s:.0f} s limit on {hf_folder.name}"
            )
        if code != 0 or not (partial / GENAI_CONFIG).is_file():
            _raise_failure(_log_tail(log), config, hf_folder)
        try:
            genai_config = check_genai_folder(partial)
        except ModelLoadError as err:
            raise ConversionError(
                f"the ONNX GenAI builder wrote an unusable folder for {hf_folder.name}: {err}"
            ) from None
        weights = weight_types(partial / _decoder_file(genai_config))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = folder_manifest(out_dir)
    return {
        "tool": TOOL,
        "tool_versions": _versions(),
        "scheme": scheme,
        "precision": scheme,
        **settings,
        "builder_options": options,
        "architecture": _architecture(config),
        "genai_model_type": str(genai_config["model"].get("type", "")),
        "context_length": genai_config["model"].get("context_length"),
        "config_normalisation": added,
        "source_config_sha256": file_sha256(hf_folder / "config.json"),
        "weight_types": weights,
        "files": files,
        "size_bytes": sum(f["size_bytes"] for f in files),
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": peak_rss,
        "peak_anon_rss_bytes": peak_anon,
    }


def genai_settings(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    """The checked conversion settings of ``scheme``: ``execution_provider`` always;
    ``block_size``, ``algo``, ``mixed_precision``, ``accuracy_level`` (None: the
    builder's default) and ``symmetric`` for int4/int8."""
    allowed = QUANT_PARAMS if scheme in QUANTIZED else FLOAT_PARAMS
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise UsageError(
            f"unknown parameter(s) for ONNX GenAI scheme {scheme}: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    provider = params.get("execution_provider", "cpu")
    if provider not in EXECUTION_PROVIDERS:
        raise UsageError(
            f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, got {provider!r}"
        )
    settings: dict[str, Any] = {"execution_provider": provider}
    if scheme not in QUANTIZED:
        return settings
    block = params.get("block_size", DEFAULT_BLOCK_SIZE)
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise UsageError(f"block_size must be one of {BLOCK_SIZES}, got {block!r}")
    algo = params.get("algo", "rtn")
    if algo not in ALGOS:
        raise UsageError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    level = params.get("accuracy_level")
    if level is not None and (isinstance(level, bool) or level not in ACCURACY_LEVELS):
        raise UsageError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {level!r}")
    symmetric = params.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise UsageError(f"symmetric must be true or false, got {symmetric!r}")
    return {
        **settings,
        "block_size": int(block),
        "algo": algo,
        "mixed_precision": _mix(params.get("mixed_precision")),
        "accuracy_level": level,
        "symmetric": symmetric,
    }


def builder_options(settings: dict[str, Any]) -> dict[str, str]:
    """The builder's ``--extra_options`` for ``settings`` (sorted, as strings)."""
    options = {"hf_token": "false", "hf_remote": "false"}
    if "block_size" in settings:
        options |= {
            "block_size": str(settings["block_size"]),
            "algo_config": settings["algo"],
            "is_symmetric": str(settings["symmetric"]).lower(),
        }
        if settings["mixed_precision"]:
            options["matmul_mixed_precision"] = settings["mixed_precision"]
        if settings["accuracy_level"] is not None:
            options["accuracy_level"] = str(settings["accuracy_level"])
    return dict(sorted(options.items()))


def weight_types(model: Path) -> dict[str, int]:
    """How the graph holds its weights: ``<op>:<bits>`` -> node count for the quantized
    ops, ``MatMul`` for float ones (the graph alone is read, not its external data)."""
    try:
        import onnx
    except ImportError:
        return {}
    graph = onnx.load(str(model), load_external_data=False).graph
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in _QUANT_OPS:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            counts[f"{node.op_type}:{bits}"] += 1
        elif node.op_type == "MatMul":
            counts["MatMul"] += 1
    return dict(sorted(counts.items()))


def _mix(value: Any) -> str | None:
    """``mixed_precision`` as the builder's ``selector:type,...`` string, checked."""
    if value is None or value == "":
        return None
    pairs = value.split(",") if isinstance(value, str) else value
    if not isinstance(pairs, list):
        raise UsageError(f"mixed_precision must be 'selector:type,...', got {value!r}")
    parsed = []
    for pair in pairs:
        selector, _, kind = str(pair).strip().partition(":")
        if selector not in MIX_SELECTORS or kind not in MIX_TYPES:
            raise UsageError(
                f"mixed_precision entry {pair!r}: selectors {', '.join(sorted(MIX_SELECTORS))}, "
                f"types {', '.join(sorted(MIX_TYPES))} (e.g. last_matmul:int8)"
            )
        parsed.append(f"{selector}:{kind}")
    return ",".join(parsed)


def _stage(folder: Path, staging: Path, config: dict[str, Any]) -> list[str]:
    """A folder of symbolic links to ``folder``'s entries with a normalised
    ``config.json``; the keys the normalisation added."""
    staging.mkdir(parents=True)
    source = folder.resolve()
    for entry in source.iterdir():
        if entry.name != "config.json":
            (staging / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    normalized, added = normalized_config(config)
    # The builder's Phi-3 path reads the hub's old scaling key "type" (the mscale
    # policy) beside "rope_type"; transformers 5 writes only "rope_type".
    for key in ("rope_parameters", "rope_scaling"):
        scaling = normalized.get(key)
        scaled = isinstance(scaling, dict) and scaling.get("rope_type") not in (None, "default")
        if scaled and isinstance(scaling, dict) and "type" not in scaling:
            normalized[key] = {**scaling, "type": scaling["rope_type"]}
            added.append(f"{key}.type")
    (staging / "config.json").write_text(json.dumps(normalized, indent=2) + "\n", "utf-8")
    return added


def _builder_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_OFFLINE)
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _require_modules() -> None:
    """The builder and its imports (checked, not imported here)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise MissingExtra("onnxruntime-genai", "onnxruntime_genai")
    for module in ("torch", "transformers", "onnx_ir"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra("hf" if module != "onnx_ir" else "coordinator", module)


def _refuse_known_failures(config: dict[str, Any]) -> None:
    """Architectures this builder version is known to fail on, refused up front."""
    text = config.get("text_config")
    types = {config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None}
    if types & NESTED_ROPE_FAILS:
        raise UnsupportedArchitecture(
            f"{_architecture(config)}: the ONNX GenAI builder of onnxruntime-genai "
            f"{_version('onnxruntime-genai')} cannot read its per-layer-type RoPE parameters "
            "as transformers 5 loads them"
        )


def _raise_failure(tail: list[str], config: dict[str, Any], folder: Path) -> None:
    architecture = _architecture(config)
    message = last_error_line(tail)
    if any(_UNSUPPORTED.search(line) for line in tail):
        raise UnsupportedArchitecture(
            f"{architecture}: the ONNX GenAI builder has no model for this architecture "
            f"(onnxruntime-genai {_version('onnxruntime-genai')})"
        )
    raise ConversionError(
        f"the ONNX GenAI builder failed on {folder.name} ({architecture}): {message}"
    )


def _architecture(config: dict[str, Any]) -> str:
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return str(config.get("model_type") or "unknown architecture")


def _decoder_file(genai_config: dict[str, Any]) -> str:
    return str(genai_config["model"]["decoder"].get("filename", "model.onnx"))


def _versions() -> dict[str, str]:
    return {
        name: _version(name)
        for name in ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx-ir")
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"

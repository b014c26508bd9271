"""OpenVINO IR variants of an ONNX model, made with OpenVINO and NNCF.

============= ==================================================================
fp32          ``ov.convert_model`` + ``ov.save_model(compress_to_fp16=False)``
fp16          the same with ``compress_to_fp16=True`` (f16 weights, f32 compute)
int8-weights  ``nncf.compress_weights(mode=INT8_ASYM)``: 8-bit per-channel weights
int4-sym      ``nncf.compress_weights(mode=INT4_SYM)``: 4-bit group-wise weights
int4-asym     ``nncf.compress_weights(mode=INT4_ASYM)``: the same with zero points
int8-ptq      ``nncf.quantize``: static INT8 weights and activations, calibrated
============= ==================================================================

INT4 parameters: ``group_size`` (default 64: it divides the 64- and 256-wide inputs of
the digits MLP, where 128 would not divide the first layer's 64), ``ratio`` (share of
the eligible weights in 4 bits, the rest INT8; default 1.0), ``all_layers`` (default
False: NNCF's default keeps the last layer, e.g. a classifier head, in INT8) and
``group_size_fallback`` for weights whose input width the group size does not divide:
``adjust`` (default: NNCF picks the largest power of two below ``group_size`` that
divides the width, down to 32, else INT8), ``ignore`` (leave them uncompressed) or
``error`` (refuse, with a :class:`UsageError` naming the layers). What each weight got
is in the provenance (``weight_storage``), so a fallback is never silent.

Node names OpenVINO makes up are renumbered in graph order (:func:`canonical_names`), so
the same model, scheme and parameters give the same IR bytes; the IR also records the
source file's name (not its folder), so convert from a fixed file name. The IR is two
files: :func:`agent.backends.openvino.pack_ir` turns it into the single tar the artifact
store holds. openvino, nncf and onnx are imported only when converting.

The source may keep its weights as external data (``model.onnx`` + ``model.onnx.data``,
:mod:`coordinator.conversion.onnx_files`): OpenVINO reads them from beside the graph. A
graph OpenVINO cannot convert raises :class:`UnsupportedArchitecture` naming the
architecture the export recorded in the graph's metadata and ``openvino``.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import one_line
from agent.backends.openvino import pack_ir, unpack_ir
from coordinator.conversion.files import merge_scheme_params
from coordinator.conversion.telemetry import decline_openvino_telemetry
from edgefarm.errors import UnsupportedArchitecture, UnsupportedScheme, UsageError

__all__ = [
    "OPENVINO_SCHEMES",
    "SCHEME_DEFAULTS",
    "convert_openvino",
    "pack_ir",
    "unpack_ir",
    "weight_storage",
]

OPENVINO_SCHEMES = ("fp32", "fp16", "int8-weights", "int4-sym", "int4-asym", "int8-ptq")

_INT4_DEFAULTS: dict[str, Any] = {
    "group_size": 64,
    "ratio": 1.0,
    "all_layers": False,
    "group_size_fallback": "adjust",
}

# Every parameter a scheme accepts, with its default.
SCHEME_DEFAULTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp16": {},
    "int8-weights": {},
    "int4-sym": dict(_INT4_DEFAULTS),
    "int4-asym": dict(_INT4_DEFAULTS),
    "int8-ptq": {"subset_size": 300, "preset": "performance", "fast_bias_correction": True},
}

_FALLBACKS = ("adjust", "ignore", "error")
_PRESETS = ("performance", "mixed")

# Ops whose weight is a constant input, and which input it is.
_WEIGHT_INPUT = {
    "MatMul": 1,
    "Convolution": 1,
    "GroupConvolution": 1,
    "ConvolutionBackpropData": 1,
    "Gather": 0,
}
# A name OpenVINO made up: "<OpType>_<process-wide counter>", alone or inside a longer
# name ("Transpose_6773/zero_point").
_AUTO_NAME = re.compile(r"(?<![\w.])([A-Z][A-Za-z0-9]*)_(\d+)(?!\w)")
# Ops between a stored weight and its consumer in a decompression subgraph.
_DECOMPRESSION_OPS = ("Convert", "Multiply", "Subtract", "Reshape", "Transpose")

# A converter returns the model to save, whether to save it with compress_to_fp16, details.
_Result = tuple[Any, bool, dict[str, Any]]
Converter = Callable[[Any, "np.ndarray | None", dict[str, Any]], _Result]


def convert_openvino(
    src_onnx: Path,
    dst_xml: Path,
    scheme: str,
    calibration_inputs: np.ndarray | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``src_onnx`` as an OpenVINO IR (``dst_xml`` + its ``.bin``) in ``scheme``.

    Returns the provenance: tool versions, scheme, the parameters actually used, the
    NNCF call, the IR's op-type counts, how each weight is stored and the sizes.
    Raises :class:`UnsupportedScheme` for an unknown scheme and :class:`UsageError`
    for bad parameters, a group size NNCF refuses, or (``int8-ptq``) no calibration,
    and :class:`UnsupportedArchitecture` for a graph OpenVINO cannot convert.
    """
    if scheme not in OPENVINO_SCHEMES:
        raise UnsupportedScheme(
            f"unknown OpenVINO scheme '{scheme}' (known: {', '.join(OPENVINO_SCHEMES)})"
        )
    used = _resolve_params(scheme, params or {})
    if not src_onnx.is_file():
        raise UsageError(f"source model not found: {src_onnx}")
    if dst_xml.suffix != ".xml":
        raise UsageError(f"an OpenVINO IR is written to a .xml path, got {dst_xml}")
    if scheme == "int8-ptq" and (calibration_inputs is None or len(calibration_inputs) == 0):
        raise UsageError("scheme int8-ptq needs calibration inputs (none were given)")

    decline_openvino_telemetry()
    import openvino as ov

    try:
        model = ov.convert_model(str(src_onnx))
    except Exception as err:  # OpenVINO's frontends raise several unrelated types
        raise UnsupportedArchitecture(
            one_line(
                f"{_architecture(src_onnx)}: OpenVINO cannot convert its ONNX graph "
                f"(openvino): {err}"
            )
        ) from err
    converted, to_fp16, details = _CONVERTERS[scheme](model, calibration_inputs, used)
    renamed = canonical_names(converted, _onnx_names(src_onnx))
    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(converted, str(dst_xml), compress_to_fp16=to_fp16)

    saved = ov.Core().read_model(str(dst_xml))
    xml_bytes = dst_xml.stat().st_size
    bin_bytes = dst_xml.with_suffix(".bin").stat().st_size
    return {
        "tool": "openvino",
        "tool_version": ov.get_version(),
        "nncf_version": _version("nncf"),
        "scheme": scheme,
        "parameters": used,
        **details,
        "compress_to_fp16": to_fp16,
        "renumbered_auto_names": renamed,
        "op_types": op_type_counts(saved),
        "weight_storage": weight_storage(saved),
        "xml_bytes": xml_bytes,
        "bin_bytes": bin_bytes,
        "size_bytes": xml_bytes + bin_bytes,
    }


def op_type_counts(model: Any) -> dict[str, int]:
    """How many ops of each type an ``openvino.Model`` has (constants included)."""
    return dict(sorted(Counter(op.get_type_name() for op in model.get_ordered_ops()).items()))


def weight_storage(model: Any) -> dict[str, int]:
    """How the weights of an ``openvino.Model`` are stored: ``"<type>"`` or
    ``"<type>/g<group size>"`` -> number of weights.

    A weight is the constant feeding a MatMul / Convolution / Gather, reached through
    its decompression ops (Convert, Subtract, Multiply, Reshape). ``i4/g64`` is a 4-bit
    weight in groups of 64, ``u8`` an 8-bit per-channel one, ``f32`` an uncompressed
    one; ``other`` a weight computed at run time.
    """
    found: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        index = _WEIGHT_INPUT.get(op.get_type_name())
        if index is None or op.get_input_size() <= index:
            continue
        source = op.input_value(index).get_node()
        rank = len(op.get_input_partial_shape(index))
        while source.get_type_name() in _DECOMPRESSION_OPS:
            source = source.input_value(0).get_node()
        if source.get_type_name() != "Constant":
            found["other"] += 1
            continue
        key = str(source.get_element_type().get_type_name())
        shape = list(source.get_output_shape(0))
        if len(shape) == rank + 1 and key not in ("f32", "f16", "bf16"):
            key += f"/g{shape[-1]}"
        found[key] += 1
    return dict(sorted(found.items()))


def canonical_names(model: Any, keep: set[str]) -> int:
    """Renumber the names OpenVINO made up, in graph order; the count renumbered.

    OpenVINO names unnamed nodes ``<OpType>_<counter>`` with a counter global to the
    process, so converting the same model twice (e.g. in a reused Ray worker) would
    give different ``.xml`` bytes and so a different artifact hash. Names in ``keep``
    (the source model's own node and tensor names) are never touched.
    """
    numbering: dict[str, str] = {}
    counters: Counter[str] = Counter()

    def renumber(match: re.Match[str]) -> str:
        token, op_type = match.group(0), match.group(1)
        if token in keep:
            return token
        if token not in numbering:
            candidate = token
            while candidate == token or candidate in keep:
                counters[op_type] += 1
                candidate = f"{op_type}_{counters[op_type]}"
            numbering[token] = candidate
        return numbering[token]

    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if name not in keep:
            op.set_friendly_name(_AUTO_NAME.sub(renumber, name))
    return len(numbering)


def _onnx_names(src_onnx: Path) -> set[str]:
    """The node and tensor names of an ONNX model (its weights are not loaded)."""
    import onnx

    graph = onnx.load(str(src_onnx), load_external_data=False).graph
    names = {node.name for node in graph.node}
    names.update(name for node in graph.node for name in (*node.input, *node.output))
    names.update(t.name for t in graph.initializer)
    return names - {""}


def _architecture(src_onnx: Path) -> str:
    """The architecture the ONNX export recorded in the graph's metadata, if any."""
    from coordinator.conversion.hf_to_onnx import ARCH_KEY, CLASS_KEY
    from coordinator.conversion.onnx_files import read_metadata

    try:
        meta = read_metadata(src_onnx)
    except Exception:  # an unreadable graph: OpenVINO's own message says more
        return f"the model in {src_onnx.name}"
    if ARCH_KEY not in meta:
        return f"the model in {src_onnx.name}"
    return f"{meta[ARCH_KEY]} ({meta.get(CLASS_KEY, '?')})"


def _resolve_params(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    used = merge_scheme_params(scheme, SCHEME_DEFAULTS[scheme], params)
    if scheme.startswith("int4-"):
        group = used["group_size"]
        if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
            raise UsageError(
                f"{scheme} group_size must be a positive integer (or -1 for per-channel), "
                f"got {group!r}"
            )
        ratio = used["ratio"]
        if not isinstance(ratio, int | float) or not 0.0 <= float(ratio) <= 1.0:
            raise UsageError(f"{scheme} ratio must be a number from 0 to 1, got {ratio!r}")
        if used["group_size_fallback"] not in _FALLBACKS:
            raise UsageError(
                f"unknown group_size_fallback {used['group_size_fallback']!r} "
                f"(known: {', '.join(_FALLBACKS)})"
            )
    if scheme == "int8-ptq":
        if used["preset"] not in _PRESETS:
            raise UsageError(f"unknown preset {used['preset']!r} (known: {', '.join(_PRESETS)})")
        if not isinstance(used["subset_size"], int) or used["subset_size"] < 1:
            raise UsageError(f"int8-ptq subset_size must be >= 1, got {used['subset_size']!r}")
    return used


def _fp32(model: Any, _calib: np.ndarray | None, _p: dict[str, Any]) -> _Result:
    return model, False, {"function": "openvino.save_model"}


def _fp16(model: Any, _calib: np.ndarray | None, _p: dict[str, Any]) -> _Result:
    return model, True, {"function": "openvino.save_model"}


def _int8_weights(model: Any, _calib: np.ndarray | None, _p: dict[str, Any]) -> _Result:
    import nncf

    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return compressed, False, {"function": "nncf.compress_weights", "mode": "INT8_ASYM"}


def _int4(mode: str) -> Converter:
    def convert(model: Any, _calib: np.ndarray | None, p: dict[str, Any]) -> _Result:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedCompressionParameters,
            GroupSizeFallbackMode,
        )

        fallback = GroupSizeFallbackMode(p["group_size_fallback"])
        try:
            compressed = nncf.compress_weights(
                model,
                mode=getattr(nncf.CompressWeightsMode, mode),
                group_size=int(p["group_size"]),
                ratio=float(p["ratio"]),
                all_layers=bool(p["all_layers"]),
                advanced_parameters=AdvancedCompressionParameters(
                    group_size_fallback_mode=fallback
                ),
            )
        except nncf.errors.InvalidGroupSizeError as err:
            message = " ".join(str(err).split())
            raise UsageError(
                f"{mode.lower()} group_size {p['group_size']} does not fit this model "
                f"({message}); pass another group_size, or group_size_fallback: adjust"
            ) from err
        return compressed, False, {"function": "nncf.compress_weights", "mode": mode}

    return convert


def _int8_ptq(model: Any, calib: np.ndarray | None, p: dict[str, Any]) -> _Result:
    import nncf

    assert calib is not None  # checked by convert_openvino
    inputs = np.ascontiguousarray(calib, dtype=np.float32)
    dataset = nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))])
    subset = min(int(p["subset_size"]), len(inputs))
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset(p["preset"]),
        subset_size=subset,
        fast_bias_correction=bool(p["fast_bias_correction"]),
    )
    return (
        quantized,
        False,
        {
            "function": "nncf.quantize",
            "calibration_examples": len(inputs),
            "calibration_examples_used": subset,
        },
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_CONVERTERS: dict[str, Converter] = {
    "fp32": _fp32,
    "fp16": _fp16,
    "int8-weights": _int8_weights,
    "int4-sym": _int4("INT4_SYM"),
    "int4-asym": _int4("INT4_ASYM"),
    "int8-ptq": _int8_ptq,
}

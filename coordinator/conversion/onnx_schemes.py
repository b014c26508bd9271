"""Quantization schemes for ONNX models, done with onnxruntime's own tools.

=============== ===========================================================
fp32            the source model, copied
fp16            ``convert_float_to_float16(keep_io_types=True)``: float32 in/out
int8-dynamic    ``quantize_dynamic``, QInt8 weights (``per_channel`` param)
int8-static     ``quantize_static``, QDQ format, calibrated on training examples
int4-weight     MatMulNBits, 4-bit block-wise weights (``block_size``, ``symmetric``)
=============== ===========================================================

A source whose weights are external data (``model.onnx`` + ``model.onnx.data``, see
:mod:`coordinator.conversion.onnx_files`) gives a result in the same layout: ``dst`` and
``dst.name + ".data"`` beside it; a single-file source gives a single file unless the
result is over the protobuf limit. The source's folder is never written to: the int8
quantizers write a shape-inferred copy of the graph beside their input, so they read
an external-data source from a copy in a temporary folder beside ``dst`` (onnx refuses
external data reached through symbolic or hard links); the other schemes only read it.

``quant_pre_process`` (shape inference + graph optimization) runs only before
``int8-static``, where its MatMul + Add -> Gemm fusion gives QDQ Gemm nodes that
onnxruntime runs faster; it is never run before ``int4-weight`` (the MatMulNBits
quantizer only replaces MatMul, not Gemm), and not before ``int8-dynamic`` (it made
no difference there). Symbolic shape inference is skipped when sympy is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from coordinator.conversion import onnx_files
from coordinator.conversion.files import merge_scheme_params
from edgefarm.errors import UnsupportedScheme, UsageError

ONNX_SCHEMES = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight")

# Every parameter a scheme accepts, with its default.
SCHEME_DEFAULTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp16": {},
    "int8-dynamic": {"per_channel": False, "reduce_range": False},
    "int8-static": {
        "per_channel": False,
        "calibrate_method": "minmax",
        "calibration_batch_size": 32,
        "preprocess": True,
    },
    "int4-weight": {"block_size": 32, "symmetric": True, "accuracy_level": None},
}

_CALIBRATE_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

Converter = Callable[[Path, Path, "np.ndarray | None", dict[str, Any]], dict[str, Any]]


def quantize_onnx(
    src: Path,
    dst: Path,
    scheme: str,
    calibration_inputs: np.ndarray | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``src`` converted to ``scheme`` at ``dst``; return its provenance.

    Provenance: tool, tool version, scheme, the parameters actually used, the op-type
    counts of the result, the files written (``files``: names beside ``dst``, the
    external-data file second when there is one) and their total size. Raises
    :class:`UnsupportedScheme` for an unknown scheme and :class:`UsageError` for bad
    parameters or (``int8-static``) missing calibration inputs.
    """
    if scheme not in ONNX_SCHEMES:
        raise UnsupportedScheme(
            f"unknown ONNX scheme '{scheme}' (known: {', '.join(ONNX_SCHEMES)})"
        )
    used = _resolve_params(scheme, params or {})
    if not src.is_file():
        raise UsageError(f"source model not found: {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = onnx_files.has_external_data(src)
    (dst.parent / onnx_files.data_file_name(dst)).unlink(missing_ok=True)
    with (
        _root_logging_untouched(),
        tempfile.TemporaryDirectory(prefix=".quant-src-", dir=dst.parent) as tmp,
    ):
        staged = _staged(src, Path(tmp)) if external and scheme.startswith("int8") else src
        details = _CONVERTERS[scheme](
            staged, dst, calibration_inputs, {**used, _EXTERNAL: external}
        )
    files = onnx_files.model_files(dst)
    for path in files[1:]:
        path.chmod(0o644)  # onnx and onnxruntime create external data owner-only
    return {
        "tool": "onnxruntime",
        "tool_version": onnxruntime.__version__,
        "onnx_version": onnx.__version__,
        "scheme": scheme,
        "parameters": used,
        **details,
        "op_types": op_type_counts(onnx.load(str(dst), load_external_data=False)),
        "external_data": len(files) > 1,
        "files": [path.name for path in files],
        "size_bytes": sum(path.stat().st_size for path in files),
    }


# Passed to the converters beside the scheme's parameters: whether the source keeps its
# weights as external data (the result then does too).
_EXTERNAL = "_external_data"


def _staged(src: Path, folder: Path) -> Path:
    """``src`` and its external-data files copied into ``folder``."""
    for path in onnx_files.model_files(src):
        shutil.copyfile(path, folder / path.name)
    return folder / src.name


def op_type_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph has."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _resolve_params(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    used = merge_scheme_params(scheme, SCHEME_DEFAULTS[scheme], params)
    if scheme == "int4-weight":
        block = used["block_size"]
        if not isinstance(block, int) or block < 16 or block & (block - 1):
            raise UsageError(f"int4-weight block_size must be a power of two >= 16, got {block!r}")
    if scheme == "int8-static" and used["calibrate_method"] not in _CALIBRATE_METHODS:
        raise UsageError(
            f"unknown calibrate_method {used['calibrate_method']!r} "
            f"(known: {', '.join(_CALIBRATE_METHODS)})"
        )
    return used


def _fp32(src: Path, dst: Path, _calib: np.ndarray | None, _p: dict[str, Any]) -> dict[str, Any]:
    onnx_files.copy_model(src, dst)
    return {}


def _save(model: onnx.ModelProto, dst: Path, p: dict[str, Any]) -> None:
    """Save a converted model: with external data when the source had it (or when large)."""
    onnx_files.save_model(model, dst, external=True if p[_EXTERNAL] else None)


def _fp16(src: Path, dst: Path, _calib: np.ndarray | None, p: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _save(model, dst, p)
    return {"function": "onnxruntime.transformers.float16.convert_float_to_float16"}


def _int8_dynamic(
    src: Path, dst: Path, _calib: np.ndarray | None, p: dict[str, Any]
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        per_channel=bool(p["per_channel"]),
        reduce_range=bool(p["reduce_range"]),
        weight_type=QuantType.QInt8,
        use_external_data_format=bool(p[_EXTERNAL]),
    )
    return {"function": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8"}


def _int8_static(
    src: Path, dst: Path, calib: np.ndarray | None, p: dict[str, Any]
) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if calib is None or len(calib) == 0:
        raise UsageError("scheme int8-static needs calibration inputs (none were given)")
    symbolic = importlib.util.find_spec("sympy") is not None
    with tempfile.TemporaryDirectory(prefix="edgefarm-quant-") as tmp:
        model_in = src
        if p["preprocess"]:
            model_in = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=not symbolic)
        input_name = onnx.load(str(model_in)).graph.input[0].name
        reader = ArrayCalibrationReader(input_name, calib, int(p["calibration_batch_size"]))
        quantize_static(
            model_in,
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=bool(p["per_channel"]),
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, _CALIBRATE_METHODS[p["calibrate_method"]]),
            use_external_data_format=bool(p[_EXTERNAL]),
        )
    return {
        "function": "onnxruntime.quantization.quantize_static",
        "quant_format": "QDQ",
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "calibration_examples": len(calib),
        "preprocess_symbolic_shape_inference": bool(p["preprocess"]) and symbolic,
    }


def _int4_weight(
    src: Path, dst: Path, _calib: np.ndarray | None, p: dict[str, Any]
) -> dict[str, Any]:
    model = onnx.load(str(src))
    block_size, symmetric, level = int(p["block_size"]), bool(p["symmetric"]), p["accuracy_level"]
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:  # onnxruntime 1.31's module needs the onnx-ir package
        quantized = quantize_matmul_4bits_native(model, block_size, symmetric, level)
        implementation = (
            "onnxruntime.capi._pybind_state.quantize_matmul_4bits "
            f"(MatMulNBitsQuantizer unavailable: {err})"
        )
    else:
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=block_size, is_symmetric=symmetric, accuracy_level=level
        )
        quantizer.process()
        quantized = quantizer.model.model
        implementation = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
    _save(quantized, dst, p)
    return {"implementation": implementation, "bits": 4}


class ArrayCalibrationReader:
    """Feeds calibration inputs to ``quantize_static`` in batches.

    Implements onnxruntime's ``CalibrationDataReader`` protocol (``get_next``/``rewind``).
    """

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 32) -> None:
        self.input_name = input_name
        self.inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        self.batch_size = max(1, batch_size)
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as a feed dict, or None when done."""
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        """Start again from the first batch."""
        n = len(self.inputs)
        self._batches = (self.inputs[i : i + self.batch_size] for i in range(0, n, self.batch_size))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


def quantize_matmul_4bits_native(
    model: onnx.ModelProto, block_size: int, symmetric: bool, accuracy_level: int | None
) -> onnx.ModelProto:
    """Replace each MatMul with a 2-D float32 constant weight by a 4-bit MatMulNBits.

    The same packing as ``MatMulNBitsQuantizer`` (QOperator format, DEFAULT algorithm),
    done by the same onnxruntime kernel, for installs whose quantizer module cannot be
    imported. Works in place on ``model`` and returns it.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        array = numpy_helper.to_array(weight) if weight is not None else None
        if weight is None or array is None or array.ndim != 2 or array.dtype != np.float32:
            new_nodes.append(node)
            continue
        rows, cols = array.shape
        k_blocks = math.ceil(rows / block_size)
        padded = np.zeros((k_blocks * block_size, cols), dtype=np.float32)
        padded[:rows] = array
        packed = np.zeros((cols, k_blocks, block_size // 2), dtype=np.uint8)
        scales = np.zeros((cols, k_blocks), dtype=np.float32)
        zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)
        quantize_matmul_4bits(
            packed, padded, scales, zero_points, block_size, cols, rows, symmetric
        )

        inputs = [node.input[0], f"{weight.name}_Q4", f"{weight.name}_scales"]
        graph.initializer.extend(
            [numpy_helper.from_array(packed, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
        )
        if not symmetric:
            inputs.append(f"{weight.name}_zero_points")
            graph.initializer.append(numpy_helper.from_array(zero_points, inputs[3]))
        attributes: dict[str, Any] = {"K": rows, "N": cols, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        new_nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=f"{node.name}_Q4" if node.name else "",
                domain="com.microsoft",
                **attributes,
            )
        )
        uses[weight.name] -= 1
        if uses[weight.name] == 0:
            replaced.add(weight.name)

    graph.ClearField("node")
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


@contextlib.contextmanager
def _root_logging_untouched() -> Iterator[None]:
    """Undo the root-logger set-up onnxruntime's tools do (``basicConfig`` on import,
    or module-level ``logging.warning`` calls): edgefarm leaves logging to the app."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


_CONVERTERS: dict[str, Converter] = {
    "fp32": _fp32,
    "fp16": _fp16,
    "int8-dynamic": _int8_dynamic,
    "int8-static": _int8_static,
    "int4-weight": _int4_weight,
}

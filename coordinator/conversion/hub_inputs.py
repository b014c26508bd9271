"""The hub inputs file of a model (see :mod:`agent.hub.bundle`): input shapes from the
ONNX graph, the calibration set and the eval set, in one artifact per model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from agent.evaldata import ARRAYS as EVAL_ARRAYS
from agent.hub.bundle import InputSpec, save_hub_inputs


def onnx_input_spec(model: Path) -> list[InputSpec]:
    """The graph inputs of an ONNX model (initializers excluded), symbolic dims as None;
    the weights are not read."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        specs.append(InputSpec(name=value.name, shape=dims, dtype=dtype))
    return specs


def build_hub_inputs(
    model: Path, eval_npz: bytes | None, calibration_npz: bytes | None
) -> tuple[bytes, dict[str, Any]]:
    """The hub inputs file's bytes and its provenance."""
    spec = onnx_input_spec(model)
    calibration = None
    if calibration_npz is not None:
        with np.load(io.BytesIO(calibration_npz), allow_pickle=False) as npz:
            calibration = np.array(npz["inputs"], dtype=np.float32)
    eval_arrays = None
    if eval_npz is not None:
        with np.load(io.BytesIO(eval_npz), allow_pickle=False) as npz:
            if set(EVAL_ARRAYS) <= set(npz.files):
                eval_arrays = {name: np.array(npz[name]) for name in EVAL_ARRAYS}
    out = io.BytesIO()
    save_hub_inputs(out, spec, calibration, eval_arrays)
    provenance = {
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in spec],
        "calibration_examples": 0 if calibration is None else len(calibration),
        "eval_examples": 0 if eval_arrays is None else len(eval_arrays["labels"]),
    }
    return out.getvalue(), provenance

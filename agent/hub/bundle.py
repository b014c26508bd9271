"""The hub inputs file: what a Qualcomm AI Hub task ships besides the FP32 ONNX model.

An ``.npz`` the coordinator builds once per model (``coordinator.conversion.hub_inputs``)
and sends as the task's eval data. Arrays:

- ``input_spec``: 0-d text, JSON list of the model's inputs ``{"name", "shape", "dtype"}``
  (``shape`` holds ``null`` for symbolic dimensions); hub compile jobs need static shapes;
- ``calibration``: float32 examples for the hub's quantize job (absent when the model has
  no calibration set);
- ``inputs``, ``labels``, ``reference``: the eval set exactly as in :mod:`agent.evaldata`
  (absent when the model has none), so accuracy is scored as on-device backends score it.

Light: numpy only (the coordinator imports it too).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.evaldata import ARRAYS as EVAL_ARRAYS
from agent.evaldata import EvalData, load_eval_data
from edgefarm.errors import ArtifactError


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (None for a symbolic dimension) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def static_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape with the first dimension set to ``batch_size`` and other symbolic
        dimensions set to 1."""
        dims = [d if d is not None and d > 0 else 1 for d in self.shape]
        if dims:
            dims[0] = batch_size
        return tuple(dims)


@dataclass(frozen=True)
class HubInputs:
    """The contents of a hub inputs file."""

    input_spec: list[InputSpec]
    calibration: np.ndarray | None
    eval: EvalData | None


def save_hub_inputs(
    out: IO[bytes] | Path,
    input_spec: list[InputSpec],
    calibration: np.ndarray | None = None,
    eval_arrays: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a hub inputs file to ``out`` (a path or a binary stream)."""
    spec = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in input_spec]
    arrays: dict[str, Any] = {"input_spec": np.array(json.dumps(spec))}
    if calibration is not None:
        arrays["calibration"] = np.ascontiguousarray(calibration, dtype=np.float32)
    if eval_arrays is not None:
        arrays.update({name: eval_arrays[name] for name in EVAL_ARRAYS if name in eval_arrays})
    if isinstance(out, Path):
        with open(out, "wb") as stream:
            np.savez(stream, **arrays)
    else:
        np.savez(out, **arrays)


def load_hub_inputs(path: Path) -> HubInputs:
    """Read a hub inputs file; :class:`ArtifactError` when it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if "input_spec" not in files:
                raise ArtifactError(f"hub inputs {path.name} lack the array input_spec")
            raw = json.loads(str(npz["input_spec"]))
            calibration = (
                np.array(npz["calibration"], dtype=np.float32) if "calibration" in files else None
            )
        spec = [
            InputSpec(
                name=str(item["name"]),
                shape=tuple(None if d is None else int(d) for d in item["shape"]),
                dtype=str(item.get("dtype", "float32")),
            )
            for item in raw
        ]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"cannot read hub inputs {path}: {err}") from err
    if not spec:
        raise ArtifactError(f"hub inputs {path.name}: the model declares no inputs")
    evaluation = load_eval_data(path) if set(EVAL_ARRAYS) <= files else None
    return HubInputs(input_spec=spec, calibration=calibration, eval=evaluation)

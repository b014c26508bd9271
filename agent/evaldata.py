"""The eval data file: an ``.npz`` the coordinator builds and the agent reads.

Arrays:

- ``inputs``: float32, ``(N, features...)``, preprocessed exactly as the model expects;
- ``labels``: int64, ``(N,)``, the true classes;
- ``reference``: float32, ``(N, classes)``, the FP32 model's outputs for ``inputs``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefarm.errors import ArtifactError

ARRAYS = ("inputs", "labels", "reference")


@dataclass(frozen=True)
class EvalData:
    """A labelled eval set with the FP32 reference outputs."""

    inputs: np.ndarray
    labels: np.ndarray
    reference: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def save_eval_data(
    path: Path, inputs: np.ndarray, labels: np.ndarray, reference: np.ndarray
) -> None:
    """Write an eval data file (checked as :func:`load_eval_data` would read it)."""
    data = EvalData(
        inputs=np.ascontiguousarray(inputs, dtype=np.float32),
        labels=np.ascontiguousarray(labels, dtype=np.int64),
        reference=np.ascontiguousarray(reference, dtype=np.float32),
    )
    _check(data, path)
    with open(path, "wb") as out:
        np.savez(out, inputs=data.inputs, labels=data.labels, reference=data.reference)


def load_eval_data(path: Path) -> EvalData:
    """Read and check an eval data file; raise :class:`ArtifactError` if it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ARRAYS if name not in npz.files]
            if missing:
                raise ArtifactError(f"eval data {path.name} lacks array(s): {', '.join(missing)}")
            data = EvalData(
                inputs=npz["inputs"].astype(np.float32, copy=False),
                labels=npz["labels"].astype(np.int64, copy=False),
                reference=npz["reference"].astype(np.float32, copy=False),
            )
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"cannot read eval data {path}: {err}") from err
    _check(data, path)
    return data


def load_eval_inputs(path: Path, count: int) -> np.ndarray:
    """The first ``count`` eval inputs only (for the timed iterations' fixed input)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "inputs" not in npz.files:
                raise ArtifactError(f"eval data {path.name} lacks array: inputs")
            return np.array(npz["inputs"][:count], dtype=np.float32)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"cannot read eval data {path}: {err}") from err


def _check(data: EvalData, path: Path) -> None:
    n = len(data.labels)
    if data.labels.ndim != 1 or n == 0:
        raise ArtifactError(f"eval data {path.name}: labels must be a non-empty 1-D array")
    if len(data.inputs) != n or len(data.reference) != n:
        raise ArtifactError(
            f"eval data {path.name}: {len(data.inputs)} inputs, {n} labels and "
            f"{len(data.reference)} reference rows differ"
        )
    if data.reference.ndim != 2:
        raise ArtifactError(f"eval data {path.name}: reference must be (examples, classes)")

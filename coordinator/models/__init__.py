"""Models the coordinator can build itself, and the calibration file they come with.

A calibration file is an ``.npz`` with one float32 array ``inputs`` (examples drawn
from the training split), used by static quantization.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edgefarm.errors import ArtifactError


def save_calibration_inputs(path: Path, inputs: np.ndarray) -> None:
    """Write a calibration file."""
    with open(path, "wb") as out:
        np.savez(out, inputs=np.ascontiguousarray(inputs, dtype=np.float32))


def load_calibration_inputs(path: Path) -> np.ndarray:
    """Read a calibration file's ``inputs``; raise :class:`ArtifactError` if unusable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.array(npz["inputs"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ArtifactError(f"cannot read calibration inputs {path}: {err}") from err

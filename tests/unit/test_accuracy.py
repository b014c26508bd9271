"""Accuracy metrics and the eval data file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.accuracy import classification_accuracy
from agent.evaldata import load_eval_data, load_eval_inputs, save_eval_data
from edgefarm.errors import ArtifactError


def test_metrics_of_a_hand_checked_example() -> None:
    labels = np.array([0, 1, 2, 1])
    reference = np.array(
        [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.0, 0.6, 0.4]], dtype=np.float32
    )
    # differs from the reference on example 2 (picks class 2) and example 3 (class 0)
    outputs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]], dtype=np.float32
    )
    got = classification_accuracy(outputs, labels, reference)
    assert got["examples"] == 4
    assert got["reference_top1"] == pytest.approx(3 / 4)  # reference misses example 2
    assert got["top1"] == pytest.approx(3 / 4)  # outputs miss example 3
    assert got["agreement"] == pytest.approx(2 / 4)
    assert got["max_abs_diff"] == pytest.approx(0.6)  # example 2, class 1 and 2
    assert set(got) == {"top1", "agreement", "reference_top1", "max_abs_diff", "examples"}


def test_identical_outputs_agree_fully() -> None:
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((50, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 50)
    got = classification_accuracy(reference.copy(), labels, reference)
    assert got["agreement"] == 1.0
    assert got["max_abs_diff"] == 0.0
    assert (
        got["top1"]
        == got["reference_top1"]
        == pytest.approx(float(np.mean(np.argmax(reference, axis=1) == labels)))
    )


def test_bad_shapes_are_refused() -> None:
    ref = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        classification_accuracy(np.zeros((3, 5)), np.zeros(3, dtype=np.int64), ref)
    with pytest.raises(ValueError, match="at least one"):
        classification_accuracy(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), ref[:0])


def _arrays(n: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((n, 8)).astype(np.float32),
        rng.integers(0, 3, n).astype(np.int64),
        rng.standard_normal((n, 3)).astype(np.float32),
    )


def test_eval_data_round_trip(tmp_path: Path) -> None:
    inputs, labels, reference = _arrays()
    path = tmp_path / "eval.npz"
    save_eval_data(path, inputs.astype(np.float64), labels, reference)
    data = load_eval_data(path)
    assert len(data) == 12
    assert data.inputs.dtype == np.float32 and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.inputs, inputs)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.reference, reference)
    np.testing.assert_array_equal(load_eval_inputs(path, 5), inputs[:5])


def test_eval_data_errors(tmp_path: Path) -> None:
    inputs, labels, reference = _arrays()
    with pytest.raises(ArtifactError, match="differ"):
        save_eval_data(tmp_path / "x.npz", inputs[:5], labels, reference)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz at all")
    with pytest.raises(ArtifactError, match="cannot read"):
        load_eval_data(garbage)

    partial = tmp_path / "partial.npz"
    np.savez(partial, inputs=inputs, labels=labels)
    with pytest.raises(ArtifactError, match="reference"):
        load_eval_data(partial)

    with pytest.raises(ArtifactError):
        load_eval_data(tmp_path / "missing.npz")

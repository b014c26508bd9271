"""Accuracy of a model variant's outputs: arrays in, metrics out."""

from __future__ import annotations

import numpy as np


def top1_outcomes(outputs: np.ndarray, labels: np.ndarray) -> list[int]:
    """Per example: 1 when the argmax output equals the label, else 0 (eval-set order)."""
    predicted = np.argmax(np.asarray(outputs).reshape(len(outputs), -1), axis=1)
    return [int(x) for x in (predicted == np.asarray(labels))]


def classification_accuracy(
    outputs: np.ndarray, labels: np.ndarray, reference: np.ndarray
) -> dict[str, float]:
    """Classification metrics of ``outputs`` (N x classes) against labels and FP32 reference.

    - ``top1``: share of examples whose argmax output equals the label;
    - ``agreement``: share whose argmax equals the reference's argmax;
    - ``reference_top1``: the reference's own top1;
    - ``max_abs_diff``: largest absolute difference between outputs and reference;
    - ``examples``: N.
    """
    outputs = np.asarray(outputs)
    reference = np.asarray(reference)
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("accuracy needs at least one example")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    outputs = outputs.reshape(len(outputs), -1)
    reference = reference.reshape(len(reference), -1)
    if outputs.shape != reference.shape or len(outputs) != n:
        raise ValueError(
            f"shapes differ: outputs {outputs.shape}, reference {reference.shape}, labels ({n},)"
        )
    predicted = np.argmax(outputs, axis=1)
    expected = np.argmax(reference, axis=1)
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    return {
        "top1": float(np.mean(predicted == labels)),
        "agreement": float(np.mean(predicted == expected)),
        "reference_top1": float(np.mean(expected == labels)),
        "max_abs_diff": float(np.max(diff)),
        "examples": float(n),
    }

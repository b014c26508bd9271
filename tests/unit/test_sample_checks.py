"""A result's latency samples are finite and non-negative, whether a trial has a few
(checked in Python) or many (checked in numpy): the same answer either way."""

from __future__ import annotations

import math
from array import array
from dataclasses import replace

import pytest

from coordinator.validation import _FEW_SAMPLES, check_samples
from edgefarm.domain import MeasurementResult
from tests.unit.scheduler_doubles import valid_trial


def _result(samples: list[float] | array[float]) -> MeasurementResult:
    good = valid_trial()
    trial = replace(good, samples_ms=samples)
    return MeasurementResult(
        task_id="t", attempt=1, lease_id="l", agent_id="a", device_id="d", ok=True,
        trials=[good, trial],
    )  # fmt: skip


@pytest.mark.parametrize("count", [3, _FEW_SAMPLES, _FEW_SAMPLES + 1, 5000])
@pytest.mark.parametrize("packed", [False, True], ids=["list", "array"])
@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (None, None),
        (0.0, None),
        (-0.0, None),
        (math.nan, "trials[1].samples_ms has a value that is not a finite number"),
        (math.inf, "trials[1].samples_ms has a value that is not a finite number"),
        (-math.inf, "trials[1].samples_ms has a value that is not a finite number"),
        (-1e-9, "trials[1].samples_ms has a negative latency"),
    ],
)
def test_samples_checked_alike_few_or_many(
    count: int, packed: bool, bad: float | None, problem: str | None
) -> None:
    samples = [1.5] * count
    if bad is not None:
        samples[count // 2] = bad
    values: list[float] | array[float] = array("d", samples) if packed else samples
    assert check_samples(_result(values)) == problem

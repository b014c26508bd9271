"""Checks of every message an agent sends, before it touches the scheduler or the store.

Each check returns ``None`` for a good message or a one-line reason naming the
field that is wrong; the gateway answers with that reason (an unaccepted ack or
INVALID_ARGUMENT). Bounds come from :mod:`edgefarm.wire_limits`.
"""

from __future__ import annotations

import math
import re
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from edgefarm.domain import SERVING_LATENCIES, MeasurementResult
from edgefarm.wire_limits import (
    MAX_EXAMPLE_OUTCOMES,
    MAX_LIST_ENTRIES,
    MAX_MAP_ENTRIES,
    MAX_NAME_BYTES,
    MAX_SAMPLES_PER_RESULT,
    MAX_SAMPLES_PER_TRIAL,
    MAX_SERVING_ERRORS,
    MAX_SERVING_LEVELS,
    MAX_STRING_BYTES,
    MAX_TRIALS,
)
from protos.edgefarm.v1 import agent_pb2, common_pb2

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_ID_BYTES = MAX_NAME_BYTES  # task, lease and session ids are short
# How far an agent's clock may run ahead of the coordinator's in measurement times.
MAX_CLOCK_AHEAD_S = 86_400.0


def _too_long(value: str, limit: int = MAX_STRING_BYTES) -> bool:
    return len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit


def _check_strings(fields: Iterable[tuple[str, str]], limit: int = MAX_STRING_BYTES) -> str | None:
    for name, value in fields:
        if _too_long(value, limit):
            return f"{name} is longer than {limit} bytes"
    return None


def _check_map(name: str, values: Mapping[str, object], numbers: bool = False) -> str | None:
    if len(values) > MAX_MAP_ENTRIES:
        return f"{name} has {len(values)} entries (at most {MAX_MAP_ENTRIES})"
    for key, value in values.items():
        if _too_long(key, MAX_NAME_BYTES):
            return f"{name} has a key longer than {MAX_NAME_BYTES} bytes"
        if numbers:
            if not math.isfinite(float(value)):  # type: ignore[arg-type]
                return f"{name}[{key[:40]!r}] is not a finite number"
        elif _too_long(str(value)):
            return f"{name}[{key[:40]!r}] is longer than {MAX_STRING_BYTES} bytes"
    return None


def _check_list(name: str, values: Iterable[str]) -> str | None:
    items = list(values)
    if len(items) > MAX_LIST_ENTRIES:
        return f"{name} has {len(items)} entries (at most {MAX_LIST_ENTRIES})"
    return _check_strings((f"{name}[{i}]", v) for i, v in enumerate(items))


def check_register(request: agent_pb2.RegisterRequest) -> str | None:
    """A Register request's fields are present and within bounds."""
    caps = request.capabilities
    if not request.name or not caps.device_id:
        return "name and capabilities.device_id are required"
    problem = _check_strings(
        [("name", request.name), ("capabilities.device_id", caps.device_id)], MAX_NAME_BYTES
    ) or _check_strings(
        [
            ("token", request.token),
            ("credential", request.credential),
            ("agent_version", request.agent_version),
            ("capabilities.hostname", caps.hostname),
            ("capabilities.os", caps.os),
            ("capabilities.os_release", caps.os_release),
            ("capabilities.arch", caps.arch),
            ("capabilities.cpu_model", caps.cpu_model),
            ("capabilities.python_version", caps.python_version),
        ]
    )
    if problem:
        return problem
    if any(ch.isspace() or not ch.isprintable() for ch in request.name):
        return "name must be printable and contain no whitespace"
    return (
        _check_map("labels", request.labels)
        or _check_map("capabilities.backends", caps.backends)
        or _check_map("capabilities.extra", caps.extra)
        or _check_list("capabilities.cpu_flags", caps.cpu_flags)
        or _check_list("capabilities.accelerators", caps.accelerators)
    )


def check_ids(task_id: str, lease_id: str) -> str | None:
    """Task and lease ids of a heartbeat or progress message are short."""
    return _check_strings([("task_id", task_id), ("lease_id", lease_id)], _ID_BYTES)


_FEW_SAMPLES = 64  # up to this many samples a trial, checked in Python


def check_samples(result: MeasurementResult) -> str | None:
    """Every latency sample is a finite, non-negative number (checked in numpy, on the
    decoded result, so a million samples cost no walk in Python; a few in Python, which
    costs less than numpy's setup)."""
    for index, trial in enumerate(result.trials):
        samples = trial.samples_ms
        if len(samples) <= _FEW_SAMPLES and not isinstance(samples, array):
            if all(0.0 <= v < math.inf for v in samples):  # False for NaN, too
                continue
            if not all(math.isfinite(v) for v in samples):
                return f"trials[{index}].samples_ms has a value that is not a finite number"
            return f"trials[{index}].samples_ms has a negative latency"
        if isinstance(samples, array):
            values = np.frombuffer(samples, dtype=np.float64)
        else:
            values = np.asarray(samples, dtype=np.float64)
        if not values.size:
            continue
        if not np.isfinite(values).all():
            return f"trials[{index}].samples_ms has a value that is not a finite number"
        if (values < 0).any():
            return f"trials[{index}].samples_ms has a negative latency"
    return None


def check_result(result: common_pb2.TaskResult, now: float | None = None) -> str | None:
    """A TaskResult is within the limits and its figures other than the samples are
    finite (the samples: :func:`check_samples`, once decoded); its measurement times
    pass :func:`check_measure_times` against ``now`` (default: the current time)."""
    problem = _check_strings(
        [("task_id", result.task_id), ("lease_id", result.lease_id)], _ID_BYTES
    ) or _check_strings(
        [
            ("error_kind", result.error_kind),
            ("error_message", result.error_message),
            ("backend_version", result.backend_version),
        ]
    )
    if problem:
        return problem
    if not result.task_id:
        return "task_id is required"
    if len(result.trials) > MAX_TRIALS:
        return f"{len(result.trials)} trials (at most {MAX_TRIALS})"
    total = 0
    for index, trial in enumerate(result.trials):
        count = len(trial.samples_ms)
        total += count
        if count > MAX_SAMPLES_PER_TRIAL:
            return f"trials[{index}] has {count} samples (at most {MAX_SAMPLES_PER_TRIAL})"
        if total > MAX_SAMPLES_PER_RESULT:
            return f"the result has more than {MAX_SAMPLES_PER_RESULT} samples"
        for name in ("duration_s", "load_time_s"):
            value = getattr(trial, name)
            if not math.isfinite(value) or value < 0:
                return f"trials[{index}].{name} must be a finite, non-negative number"
        problem = _check_strings(
            [(f"trials[{index}].invalid_reason", trial.invalid_reason)]
        ) or _check_map(f"trials[{index}].metrics", trial.metrics, numbers=True)
        if problem:
            return problem
        problem = _check_serving(index, trial.serving)
        if problem:
            return problem
    if len(result.example_outcomes) > MAX_EXAMPLE_OUTCOMES:
        return (
            f"example_outcomes has {len(result.example_outcomes)} entries "
            f"(at most {MAX_EXAMPLE_OUTCOMES})"
        )
    if result.example_outcomes.translate(None, b"\x00\x01"):
        return "example_outcomes holds a byte other than 0 or 1"
    return (
        check_measure_times(result.measure_started_at, result.measure_ended_at, now)
        or _check_map("accuracy", result.accuracy, numbers=True)
        or _check_map("environment", result.environment)
    )


def _check_serving(index: int, levels: Sequence[common_pb2.ServingLevel]) -> str | None:
    """A serving trial's levels are within the limits, their figures finite and >= 0."""
    if len(levels) > MAX_SERVING_LEVELS:
        return f"trials[{index}].serving has {len(levels)} levels (at most {MAX_SERVING_LEVELS})"
    for n, level in enumerate(levels):
        where = f"trials[{index}].serving[{n}]"
        if len(level.errors) > MAX_SERVING_ERRORS:
            return f"{where}.errors has {len(level.errors)} entries (at most {MAX_SERVING_ERRORS})"
        problem = _check_strings(
            [(f"{where}.label", level.label), (f"{where}.arrival", level.arrival)],
            MAX_NAME_BYTES,
        ) or _check_strings((f"{where}.errors", e) for e in level.errors)
        if problem:
            return problem
        problem = _check_map(f"{where}.server", level.server, numbers=True)
        if problem:
            return problem
        if level.failed > level.requests or level.goodput_requests > level.requests:
            return f"{where}: more failed or good requests than requests"
        scalars = [level.rate, level.wall_s, level.slo_ttft_ms, level.slo_tpot_ms]
        lists = {name: getattr(level, name) for name in SERVING_LATENCIES}
        if any(len(values) > MAX_SAMPLES_PER_TRIAL for values in lists.values()):
            return f"{where} has a list of more than {MAX_SAMPLES_PER_TRIAL} entries"
        for name, values in {"figures": scalars, **lists}.items():
            numbers = np.asarray(values, dtype=np.float64)
            if not np.all(np.isfinite(numbers)) or np.any(numbers < 0):
                return f"{where}.{name} must hold finite, non-negative numbers"
    return None


def check_measure_times(started_at: float, ended_at: float, now: float | None = None) -> str | None:
    """Measurement start / end (unix seconds, agent clock, 0 = unknown): finite,
    non-negative, start <= end when both are set, at most :data:`MAX_CLOCK_AHEAD_S`
    ahead of ``now`` (default: this machine's clock)."""
    current = time.time() if now is None else now
    for name, value in (("measure_started_at", started_at), ("measure_ended_at", ended_at)):
        if not math.isfinite(value) or value < 0:
            return f"{name} must be a finite, non-negative number of unix seconds (0: unknown)"
        if value - current > MAX_CLOCK_AHEAD_S:
            return (
                f"{name} is {value - current:.0f} s ahead of the coordinator's clock "
                f"(at most {MAX_CLOCK_AHEAD_S:.0f} s)"
            )
    if started_at and ended_at and started_at > ended_at:
        return f"measure_started_at ({started_at:.3f}) is after measure_ended_at ({ended_at:.3f})"
    return None


def check_sha256(value: str) -> str | None:
    """An artifact address: 64 lowercase hex digits."""
    if not SHA256_HEX.match(value):
        return "sha256 must be 64 lowercase hex digits"
    return None

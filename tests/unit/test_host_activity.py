"""Other processes' CPU during a trial: the meter, the limit, and re-measuring."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import runner
from agent.host_activity import (
    BUSY_RETRIES,
    BUSY_SHARE,
    MIN_JUDGED_S,
    OTHER_CPU_METRIC,
    OtherCpuMeter,
    busy_reason,
    other_cpu_limit,
)
from agent.runner import run_measurement
from coordinator.models.digits import build_digits_model
from edgefarm.domain import AUTO_OTHER_CPU, MeasureSettings

# a real model whose timed loop lasts its minimum duration (a noop loop would stop at
# max_iterations long before, too short for the guard to judge)
QUICK = {"warmup_iterations": 5, "min_iterations": 10, "min_duration_s": 0.5, "trials": 1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = build_digits_model(tmp_path_factory.mktemp("digits"), seed=0, hidden_layers=(64,))
    return bundle.model_path


SPIN = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"


@pytest.fixture()
def spinner() -> Iterator[None]:
    """Another process keeping one core busy."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _spin_here(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_own_work_is_not_counted() -> None:
    with OtherCpuMeter() as idle:
        time.sleep(0.8)  # whatever the rest of the host does anyway (incl. steal)
    with OtherCpuMeter() as meter:
        _spin_here(0.8)  # about one core, all of it this process's
    assert 0.0 <= meter.cores < idle.cores + 0.5


def test_another_busy_process_is_counted(spinner: None) -> None:
    with OtherCpuMeter() as meter:
        time.sleep(1.0)
    assert meter.cores > 0.6


def test_busy_reason() -> None:
    assert busy_reason(0.9, 0.0) == ""  # no limit: record only
    assert busy_reason(0.2, 0.25) == ""
    assert busy_reason(0.9, 0.25) == (
        "host busy: other processes used 0.90 cores during the timed loop (limit 0.25)"
    )
    # a loop too short for the kernel's ticks is not judged; a long enough one is
    assert busy_reason(0.9, 0.25, duration_s=MIN_JUDGED_S / 2) == ""
    assert busy_reason(0.9, 0.25, duration_s=MIN_JUDGED_S).startswith("host busy")


def test_the_guard_is_on_by_default_at_a_share_of_the_cores() -> None:
    assert MeasureSettings().max_other_cpu_cores == AUTO_OTHER_CPU
    assert other_cpu_limit(AUTO_OTHER_CPU, 2) == 0.5 == BUSY_SHARE * 2
    assert other_cpu_limit(AUTO_OTHER_CPU, 16) == 4.0
    assert other_cpu_limit(AUTO_OTHER_CPU, 0) == BUSY_SHARE  # unknown count: one core
    assert other_cpu_limit(0.3, 2) == 0.3 and other_cpu_limit(0.0, 2) == 0.0


def _trial(cores: float) -> dict[str, Any]:
    return {
        "trial": {
            "samples_ms": [1.0],
            "warmup_iterations": 0,
            "duration_s": 1.0,
            "load_time_s": 0.1,
            "peak_rss_bytes": 1,
            "load_rss_delta_bytes": 1,
            "valid": not busy_reason(cores, 0.25),
            "invalid_reason": busy_reason(cores, 0.25),
            "metrics": {OTHER_CPU_METRIC: cores},
        },
        "accuracy": {},
        "backend_version": "1",
        "environment": {},
        "model_size_bytes": 1,
    }


def _with_readings(monkeypatch: pytest.MonkeyPatch, readings: list[float]) -> list[float]:
    left = list(readings)

    async def fake_child(*_args: Any) -> dict[str, Any]:
        return _trial(left.pop(0))

    monkeypatch.setattr(runner, "_run_child", fake_child)
    return left


def test_a_trial_on_a_busy_host_is_measured_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = MeasureSettings(trials=2, max_other_cpu_cores=0.25)
    left = _with_readings(monkeypatch, [0.9, 0.1, 0.05])
    report = asyncio.run(run_measurement("noop", "fp32", tmp_path, None, settings, {}))
    assert left == [] and all(t.valid for t in report.trials)
    # still busy after the retries: the last reading stands, invalid with its reason
    left = _with_readings(monkeypatch, [0.9] * (1 + BUSY_RETRIES) + [0.1])
    report = asyncio.run(run_measurement("noop", "fp32", tmp_path, None, settings, {}))
    first, second = report.trials
    assert left == [] and not first.valid and first.invalid_reason.startswith("host busy")
    assert second.valid
    # a trial the child did not reject (no limit, or a loop too short to judge) stands
    left = _with_readings(monkeypatch, [0.1, 0.1])
    report = asyncio.run(
        run_measurement("noop", "fp32", tmp_path, None, MeasureSettings(trials=2), {})
    )
    assert left == [] and len(report.trials) == 2


def test_real_trial_records_and_enforces_the_limit(digits: Path, spinner: None) -> None:
    settings = MeasureSettings(**QUICK, max_other_cpu_cores=0.3)  # type: ignore[arg-type]
    report = asyncio.run(run_measurement("onnxruntime", "fp32", digits, None, settings, {}))
    (trial,) = report.trials
    assert trial.metrics[OTHER_CPU_METRIC] > 0.3
    assert not trial.valid and "host busy" in trial.invalid_reason


def test_a_loaded_host_fails_by_default(digits: Path) -> None:
    """Enough busy loops to take more than the default share of this host's cores: the
    trial is measured 1 + BUSY_RETRIES times and stored invalid with the reason."""
    limit = other_cpu_limit(AUTO_OTHER_CPU)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(int(limit) + 1)]
    time.sleep(0.3)
    try:
        settings = MeasureSettings(**QUICK)  # type: ignore[arg-type]
        report = asyncio.run(run_measurement("onnxruntime", "fp32", digits, None, settings, {}))
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    (trial,) = report.trials
    assert trial.metrics[OTHER_CPU_METRIC] > limit
    assert not trial.valid and trial.invalid_reason.startswith("host busy"), trial


def test_a_quiet_host_passes_by_default(digits: Path) -> None:
    """A host as quiet as an idle local farm (coordinator, Ray and agent waiting) stays
    well under the default limit. Skipped when something else already loads the host."""
    limit = other_cpu_limit(AUTO_OTHER_CPU)
    with OtherCpuMeter() as before:
        time.sleep(1.0)
    if before.cores > limit / 2:
        pytest.skip(f"the host is not quiet ({before.cores:.2f} other cores)")
    settings = MeasureSettings(**QUICK)  # type: ignore[arg-type]
    report = asyncio.run(run_measurement("onnxruntime", "fp32", digits, None, settings, {}))
    (trial,) = report.trials
    assert trial.valid, trial.invalid_reason
    assert trial.metrics[OTHER_CPU_METRIC] <= limit

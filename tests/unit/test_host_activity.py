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
from agent.host_activity import BUSY_RETRIES, OTHER_CPU_METRIC, OtherCpuMeter, busy_reason
from agent.runner import run_measurement
from edgefarm.domain import MeasureSettings

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
    # no limit: nothing is measured again
    left = _with_readings(monkeypatch, [0.9, 0.9])
    report = asyncio.run(
        run_measurement("noop", "fp32", tmp_path, None, MeasureSettings(trials=2), {})
    )
    assert left == [] and len(report.trials) == 2


def test_real_trial_records_and_enforces_the_limit(tmp_path: Path, spinner: None) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"\x00" * 64)
    quick = {"warmup_iterations": 1, "min_iterations": 10, "min_duration_s": 0.5, "trials": 1}
    settings = MeasureSettings(**quick, max_other_cpu_cores=0.3)  # type: ignore[arg-type]
    report = asyncio.run(run_measurement("noop", "fp32", model, None, settings, {}))
    (trial,) = report.trials
    assert trial.metrics[OTHER_CPU_METRIC] > 0.3
    assert not trial.valid and "host busy" in trial.invalid_reason

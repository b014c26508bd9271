"""The trial scheme's timing loop and the memory readings."""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from agent.measure import current_rss_bytes, time_iterations
from edgefarm.domain import MeasureSettings

MiB = 1024 * 1024


class Counter:
    """A callable that counts its calls and optionally sleeps in each."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    def __call__(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)


def settings(**kw: float) -> MeasureSettings:
    base: dict[str, float] = {
        "warmup_iterations": 3,
        "min_iterations": 10,
        "min_duration_s": 0.0,
        "max_iterations": 1_000_000,
        "max_duration_s": 10.0,
    }
    base.update(kw)
    return MeasureSettings(**base)  # type: ignore[arg-type]


def test_meets_both_minimums_and_counts_warmup_apart() -> None:
    run = Counter()
    result = time_iterations(
        run, settings(warmup_iterations=7, min_iterations=50, min_duration_s=0.05)
    )
    assert result.valid and result.invalid_reason == ""
    assert len(result.samples_ms) >= 50
    assert result.duration_s >= 0.05
    assert run.calls == len(result.samples_ms) + 7  # warm-up calls are not samples


def test_stops_as_soon_as_both_minimums_are_met() -> None:
    run = Counter(sleep_s=0.001)
    result = time_iterations(run, settings(min_iterations=20, min_duration_s=0.001))
    assert result.valid
    assert len(result.samples_ms) == 20  # duration was met after the first call


def test_samples_are_milliseconds() -> None:
    result = time_iterations(
        Counter(sleep_s=0.002), settings(warmup_iterations=0, min_iterations=15)
    )
    median = statistics.median(result.samples_ms)
    assert 2.0 <= median < 50.0
    assert all(s >= 2.0 for s in result.samples_ms)
    assert result.duration_s * 1000 >= sum(result.samples_ms)


def test_max_iterations_makes_trial_invalid() -> None:
    result = time_iterations(Counter(), settings(min_duration_s=10.0, max_iterations=30))
    assert not result.valid
    assert len(result.samples_ms) == 30
    assert "max_iterations=30" in result.invalid_reason
    assert "min_duration_s=10 not met" in result.invalid_reason
    assert "min_iterations" not in result.invalid_reason


def test_max_duration_makes_trial_invalid() -> None:
    started = time.perf_counter()
    result = time_iterations(
        Counter(sleep_s=0.001), settings(min_iterations=10**9, max_duration_s=0.05)
    )
    assert time.perf_counter() - started < 5.0
    assert not result.valid
    assert 0.05 <= result.duration_s < 5.0
    assert "max_duration_s=0.05" in result.invalid_reason
    assert "min_iterations=1000000000 not met" in result.invalid_reason


def test_gc_is_restored_after_the_loop() -> None:
    assert gc.isenabled()
    time_iterations(Counter(), settings())
    assert gc.isenabled()


def test_rss_readings_follow_an_allocation() -> None:
    # In a fresh process: in this long-lived one the allocator may hand back pages that
    # are already resident, and RSS would not move.
    code = (
        "import numpy as np\n"
        "from agent.measure import current_rss_bytes, peak_rss_bytes\n"
        "MiB = 1 << 20\n"
        "before_peak, before = peak_rss_bytes(), current_rss_bytes()\n"
        "assert before > 0\n"
        "block = np.ones(64 * MiB, dtype=np.uint8)\n"
        "assert current_rss_bytes() - before >= 48 * MiB, current_rss_bytes() - before\n"
        "assert peak_rss_bytes() >= before_peak\n"
        "assert peak_rss_bytes() >= current_rss_bytes() - 4 * MiB\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_child_peak_rss_is_not_the_parents() -> None:
    """ru_maxrss survives exec; a child must not report its parent's memory as its own."""
    block = np.ones(300 * MiB, dtype=np.uint8)
    code = "from agent.measure import peak_rss_bytes; print(peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak = int(out.stdout)
    assert 0 < child_peak < 200 * MiB
    assert current_rss_bytes() > 300 * MiB
    del block

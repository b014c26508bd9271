"""The timing loop of one trial, and the process's memory readings.

The loop body is kept to two clock reads, the call and one list append: its own
overhead is part of every sample, so it is benchmarked against a bare loop.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from edgefarm.domain import MeasureSettings


@dataclass
class TimingResult:
    """The samples of one trial's timed loop and whether it met its minimums."""

    samples_ms: list[float]
    duration_s: float  # wall time from the first timed call to the end of the last
    valid: bool
    invalid_reason: str = ""


def time_iterations(run: Callable[[], object], settings: MeasureSettings) -> TimingResult:
    """Warm up, then time ``run`` until both minimums are met or a maximum stops it.

    ``settings.warmup_iterations`` untimed calls come first. Timed calls go on until
    both ``min_iterations`` and ``min_duration_s`` are met; reaching ``max_iterations``
    or ``max_duration_s`` first stops the loop and makes the trial invalid, with a
    reason naming the minimum that was not met. The garbage collector is off during
    the timed loop (as in :mod:`timeit`).
    """
    for _ in range(settings.warmup_iterations):
        run()

    clock = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    min_iterations = settings.min_iterations
    max_iterations = settings.max_iterations
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        min_end = start + int(settings.min_duration_s * 1e9)
        max_end = start + int(settings.max_duration_s * 1e9)
        count = 0
        while True:
            t0 = clock()
            run()
            t1 = clock()
            append(t1 - t0)
            count += 1
            if count >= min_iterations and t1 >= min_end:
                stopped_by = ""
                break
            if count >= max_iterations:
                stopped_by = f"max_iterations={max_iterations}"
                break
            if t1 >= max_end:
                stopped_by = f"max_duration_s={settings.max_duration_s:g}"
                break
    finally:
        if gc_was_enabled:
            gc.enable()

    duration_s = (t1 - start) / 1e9
    samples_ms = [ns / 1e6 for ns in samples]
    if not stopped_by:
        return TimingResult(samples_ms, duration_s, valid=True)
    unmet = []
    if count < min_iterations:
        unmet.append(f"min_iterations={min_iterations} not met ({count} iterations)")
    if t1 < min_end:
        unmet.append(f"min_duration_s={settings.min_duration_s:g} not met ({duration_s:.3f} s)")
    reason = f"stopped at {stopped_by}: " + "; ".join(unmet)
    return TimingResult(samples_ms, duration_s, valid=False, invalid_reason=reason)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` survives
    ``execve`` and so reports the *parent's* RSS in a freshly spawned child. Elsewhere
    it is ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)

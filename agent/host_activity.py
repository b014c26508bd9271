"""How busy the rest of the host was while a trial was timed.

Other processes on the measuring cores distort timings. The meter reads the host's
busy CPU time (user, nice, system, irq, softirq and hypervisor steal) and this
process's own CPU time around the timed loop; the difference over the wall time is
the average number of cores other processes (or the hypervisor) took meanwhile.
The kernel counts CPU time in ticks (usually 10 ms), so loops shorter than about a
second read to within roughly 0.1 core.

The guard is on by default (``MeasureSettings.max_other_cpu_cores`` =
``edgefarm.domain.AUTO_OTHER_CPU``):
a trial during which other processes took more than ``BUSY_SHARE`` (a quarter) of the
host's logical cores on average is measured again, up to ``BUSY_RETRIES`` times, and
stored invalid with the reason if the host stays busy. On a 2-core host that is half a
core: a quiet local farm (its own coordinator, Ray and agent idle meanwhile) reads
0.0-0.15 cores, one busy process a full core. A campaign may set its own limit in cores,
or 0 to only record the reading. Timed loops shorter than ``MIN_JUDGED_S`` are not
judged: the kernel's 10 ms ticks make their reading too coarse.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

import psutil

OTHER_CPU_METRIC = "host_other_cpu_cores"  # the trial metric holding the reading
BUSY_RETRIES = 2  # times a trial rejected for a busy host is measured again
BUSY_SHARE = 0.25  # default limit: this share of the host's logical cores
MIN_JUDGED_S = 0.2  # shorter timed loops are recorded, never rejected
BUSY_PREFIX = "host busy:"  # how a rejection's reason starts

_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _host_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(float(getattr(times, name, 0.0)) for name in _BUSY_FIELDS)


def _own_cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class OtherCpuMeter:
    """``with OtherCpuMeter() as meter: ...`` then ``meter.cores``."""

    def __init__(self, own_pids: tuple[int, ...] = ()) -> None:
        self._process = psutil.Process()
        # processes whose CPU counts as ours (a server this trial started and measures)
        self._own = [psutil.Process(pid) for pid in own_pids]
        self._start = (0.0, 0.0, 0.0)
        self.cores = 0.0  # average cores used by everything but this process

    def __enter__(self) -> OtherCpuMeter:
        self._start = (time.perf_counter(), _host_busy_s(), self._own_s())
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        others = (_host_busy_s() - busy0) - (self._own_s() - own0)
        self.cores = max(0.0, others / wall) if wall > 0 else 0.0

    def _own_s(self) -> float:
        total = _own_cpu_s(self._process)
        for process in self._own:
            try:
                total += _own_cpu_s(process)
            except psutil.Error:  # it ended: its last reading is lost, not the trial
                continue
        return total


def other_cpu_limit(setting: float, logical_cpus: int | None = None) -> float:
    """The limit in cores for a ``max_other_cpu_cores`` setting: ``AUTO_OTHER_CPU``
    (any negative value) is ``BUSY_SHARE`` of the host's logical cores; 0 is no limit."""
    if setting >= 0:
        return setting
    cpus = logical_cpus if logical_cpus is not None else (os.cpu_count() or 1)
    return BUSY_SHARE * max(1, cpus)


def busy_reason(other_cores: float, limit: float, duration_s: float | None = None) -> str:
    """Why a trial is rejected for a busy host, or '' (``limit`` <= 0: never rejected;
    a timed loop shorter than ``MIN_JUDGED_S``: never rejected)."""
    if limit <= 0 or other_cores <= limit:
        return ""
    if duration_s is not None and duration_s < MIN_JUDGED_S:
        return ""
    return (
        f"{BUSY_PREFIX} other processes used {other_cores:.2f} cores during the timed loop "
        f"(limit {limit:g})"
    )

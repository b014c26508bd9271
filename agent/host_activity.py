"""How busy the rest of the host was while a trial was timed.

Other processes on the measuring cores distort timings. The meter reads the host's
busy CPU time (user, nice, system, irq, softirq and hypervisor steal) and this
process's own CPU time around the timed loop; the difference over the wall time is
the average number of cores other processes (or the hypervisor) took meanwhile.
The kernel counts CPU time in ticks (usually 10 ms), so loops shorter than about a
second read to within roughly 0.1 core.
"""

from __future__ import annotations

import time
from types import TracebackType

import psutil

OTHER_CPU_METRIC = "host_other_cpu_cores"  # the trial metric holding the reading
BUSY_RETRIES = 2  # times a trial rejected for a busy host is measured again

_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _host_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(float(getattr(times, name, 0.0)) for name in _BUSY_FIELDS)


def _own_cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class OtherCpuMeter:
    """``with OtherCpuMeter() as meter: ...`` then ``meter.cores``."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._start = (0.0, 0.0, 0.0)
        self.cores = 0.0  # average cores used by everything but this process

    def __enter__(self) -> OtherCpuMeter:
        self._start = (time.perf_counter(), _host_busy_s(), _own_cpu_s(self._process))
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        others = (_host_busy_s() - busy0) - (_own_cpu_s(self._process) - own0)
        self.cores = max(0.0, others / wall) if wall > 0 else 0.0


def busy_reason(other_cores: float, limit: float) -> str:
    """Why a trial is rejected for a busy host, or '' (``limit`` 0: never rejected)."""
    if limit <= 0 or other_cores <= limit:
        return ""
    return (
        f"host busy: other processes used {other_cores:.2f} cores during the timed loop "
        f"(limit {limit:g})"
    )

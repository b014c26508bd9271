"""Energy of a timed loop from Linux RAPL (``/sys/class/powercap``), where readable.

Each top-level ``intel-rapl:N`` zone is a CPU package; its ``intel-rapl:N:M`` subzones
name their domain (``core``, ``uncore``, ``dram``). A zone's ``energy_uj`` is a counter
in microjoules that wraps at ``max_energy_range_uj``: a reading lower than the one
before it wrapped once (the loop is far shorter than a wrap period, minutes at most).
Energy of the loop = the packages' deltas plus the DRAM subzones' (package energy
includes cores and uncore, not DRAM). Idle power is read over a short quiet window just
before the loop and subtracted when asked (``energy_active_j``): the method is recorded.

``energy_uj`` is readable by root only on most kernels since 2020 (CVE-2020-8694); a tree
that exists but cannot be read gives no figures and says so. Where no source exists the
metrics are absent (never zero) and :func:`rapl_status` says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
IDLE_WINDOW_S = 0.5  # quiet window before the loop for the idle baseline


@dataclass(frozen=True)
class RaplZone:
    """One counter: its name (``package-0``, ``dram``), file and wrap range."""

    name: str
    energy_file: Path
    max_range_uj: int


def rapl_zones(root: Path = POWERCAP) -> list[RaplZone]:
    """The package zones and their DRAM subzones under ``root`` (empty if none)."""
    zones: list[RaplZone] = []
    if not root.is_dir():
        return zones
    for package in sorted(root.glob("intel-rapl:[0-9]*")):
        if package.name.count(":") != 1:
            continue
        candidates = [package, *sorted(package.glob(f"{package.name}:[0-9]*"))]
        for zone in candidates:
            name = _read_text(zone / "name")
            if zone is not package and name != "dram":
                continue  # core/uncore are inside the package's count
            max_range = _read_int(zone / "max_energy_range_uj")
            if name and max_range:
                zones.append(RaplZone(name, zone / "energy_uj", max_range))
    return zones


def rapl_status(root: Path = POWERCAP) -> tuple[list[RaplZone], str]:
    """The readable zones, and ``""`` or why there are none (one line)."""
    zones = rapl_zones(root)
    if not zones:
        if not root.exists():
            return [], f"no RAPL: {root} does not exist"
        return [], f"no RAPL: no intel-rapl package zone under {root}"
    unreadable = [z for z in zones if _read_int(z.energy_file) is None]
    if unreadable:
        return [], (
            f"RAPL present but {unreadable[0].energy_file} is not readable by this user "
            "(root only on most kernels; grant read access to measure energy)"
        )
    return zones, ""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Microjoules between two readings of a counter that wraps at ``max_range``."""
    return after - before if after >= before else after + max_range - before


class EnergyMeter:
    """``with EnergyMeter(zones) as meter: <loop>`` then :meth:`figures`.

    Reads every zone around the block; with ``idle_window_s`` > 0 it first reads the
    idle power over that long (sleeping) for the baseline."""

    def __init__(self, zones: list[RaplZone], idle_window_s: float = IDLE_WINDOW_S) -> None:
        self.zones = zones
        self.idle_window_s = idle_window_s
        self.idle_w: float | None = None
        self.joules: float | None = None
        self.seconds = 0.0
        self._start: list[int | None] = []
        self._t0 = 0.0

    def _read(self) -> list[int | None]:
        return [_read_int(z.energy_file) for z in self.zones]

    def _joules(self, before: list[int | None], after: list[int | None]) -> float | None:
        total = 0
        for zone, a, b in zip(self.zones, before, after, strict=True):
            if a is None or b is None:
                return None
            total += counter_delta(a, b, zone.max_range_uj)
        return total / 1e6

    def __enter__(self) -> EnergyMeter:
        if self.zones and self.idle_window_s > 0:
            first, t0 = self._read(), time.perf_counter()
            time.sleep(self.idle_window_s)
            idle = self._joules(first, self._read())
            elapsed = time.perf_counter() - t0
            self.idle_w = idle / elapsed if idle is not None and elapsed > 0 else None
        self._start, self._t0 = self._read(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.zones:
            self.joules = self._joules(self._start, self._read())

    def figures(self, iterations: int) -> dict[str, float]:
        """Trial metrics: ``energy_j``, ``power_w``, ``energy_per_inference_j`` (per
        timed iteration: per token for language models, per batch otherwise),
        ``inferences_per_j``, and with the idle baseline ``idle_power_w``,
        ``energy_active_j`` and ``energy_active_per_inference_j``. Empty without a
        reading."""
        if self.joules is None or self.seconds <= 0 or iterations < 1:
            return {}
        out = {
            "energy_j": self.joules,
            "power_w": self.joules / self.seconds,
            "energy_per_inference_j": self.joules / iterations,
        }
        if self.joules > 0:
            out["inferences_per_j"] = iterations / self.joules
        if self.idle_w is not None:
            active = max(0.0, self.joules - self.idle_w * self.seconds)
            out["idle_power_w"] = self.idle_w
            out["energy_active_j"] = active
            out["energy_active_per_inference_j"] = active / iterations
        return out


def energy_environment(zones: list[RaplZone], reason: str) -> dict[str, str]:
    """The energy source and method for a result's environment, or why there is none."""
    if not zones:
        return {"energy.source": f"none: {reason}; no other energy source on this agent"}
    return {
        "energy.source": "rapl: " + ", ".join(z.name for z in zones),
        "energy.method": (
            "counter deltas around the timed loop (package + dram); idle power over "
            f"{IDLE_WINDOW_S:g} s before it, subtracted in energy_active_*"
        ),
    }

"""Linux RAPL energy counters (``/sys/class/powercap``).

Each top-level ``intel-rapl:N`` zone is a CPU package; its ``intel-rapl:N:M`` subzones
name their domain (``core``, ``uncore``, ``dram``). A zone's ``energy_uj`` is a counter
in microjoules that wraps at ``max_energy_range_uj``: a reading lower than the one
before it wrapped once (a timed loop is far shorter than a wrap period, minutes at
most). Energy = the packages' deltas plus the DRAM subzones' (package energy includes
cores and uncore, not DRAM).

``energy_uj`` is readable by root only on most kernels since 2020 (CVE-2020-8694); a tree
that exists but cannot be read gives no source and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.sysfs import SYS

POWERCAP = SYS / "class" / "powercap"


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
    """Units between two readings of a counter that wraps at ``max_range``."""
    return after - before if after >= before else after + max_range - before


class RaplSource:
    """The RAPL zones as one energy source (:class:`agent.energy.EnergySource`)."""

    kind = "rapl"

    def __init__(self, zones: list[RaplZone]) -> None:
        self.zones = zones
        self.name = "rapl: " + ", ".join(z.name for z in zones)
        self.method = "RAPL counter deltas (package + dram), wrap-around handled"
        self._start: list[int | None] = []

    def _read(self) -> list[int | None]:
        return [_read_int(z.energy_file) for z in self.zones]

    def begin(self) -> None:
        """Read every counter."""
        self._start = self._read()

    def end(self) -> float | None:
        """Joules since :meth:`begin`; None when a counter could not be read."""
        total = 0
        for zone, a, b in zip(self.zones, self._start, self._read(), strict=True):
            if a is None or b is None:
                return None
            total += counter_delta(a, b, zone.max_range_uj)
        return total / 1e6

    def extra_figures(self) -> dict[str, float]:
        """Nothing beyond energy."""
        return {}

"""Energy of a timed loop, from whatever meters the device exposes.

Sources: Linux RAPL (:mod:`agent.energy.rapl`: CPU packages and DRAM), NVIDIA GPUs
through NVML (:mod:`agent.energy.nvml`) and macOS ``powermetrics``
(:mod:`agent.energy.powermetrics`: CPU, GPU and ANE; needs root). The loop's energy is
the sum over the sources found. Idle power is read over a short quiet window just
before the loop and subtracted in ``energy_active_*``; the source and method are
recorded with the result. Where no source exists the metrics are absent (never zero)
and :func:`energy_environment` says why for each kind of meter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from agent.energy.nvml import NvmlLibrary, nvml_status
from agent.energy.powermetrics import powermetrics_status
from agent.energy.rapl import (
    POWERCAP,
    RaplSource,
    RaplZone,
    counter_delta,
    rapl_status,
    rapl_zones,
)

__all__ = [
    "EnergyMeter",
    "EnergySource",
    "RaplSource",
    "RaplZone",
    "counter_delta",
    "energy_environment",
    "energy_sources",
    "rapl_status",
    "rapl_zones",
]

IDLE_WINDOW_S = 0.5  # quiet window before the loop for the idle baseline


class EnergySource(Protocol):
    """One meter: :meth:`begin`, then :meth:`end` gives the joules in between."""

    kind: str  # rapl, nvml, powermetrics
    name: str  # what it measures, e.g. ``rapl: package-0, dram``
    method: str  # how

    def begin(self) -> None:
        """Start a measurement."""
        ...

    def end(self) -> float | None:
        """Joules since :meth:`begin`, None when a reading failed."""
        ...

    def extra_figures(self) -> dict[str, float]:
        """Other figures of the last measurement (e.g. thermal pressure)."""
        ...


def energy_sources(
    powercap: Path = POWERCAP, nvml: NvmlLibrary | None = None
) -> tuple[list[EnergySource], list[str]]:
    """The meters readable here, and why each other kind is not (one line each)."""
    sources: list[EnergySource] = []
    reasons: list[str] = []
    zones, why = rapl_status(powercap)
    if zones:
        sources.append(RaplSource(zones))
    else:
        reasons.append(why)
    for source, why in (nvml_status(nvml), powermetrics_status()):
        if source is not None:
            sources.append(source)
        elif why:
            reasons.append(why)
    return sources, reasons


class EnergyMeter:
    """``with EnergyMeter(sources) as meter: <loop>`` then :meth:`figures`.

    Measures every source around the block; with ``idle_window_s`` > 0 it first
    measures the idle power over that long (sleeping) for the baseline."""

    def __init__(self, sources: list[EnergySource], idle_window_s: float = IDLE_WINDOW_S) -> None:
        self.sources = sources
        self.idle_window_s = idle_window_s
        self.idle_w: float | None = None
        self.joules: float | None = None
        self.by_kind: dict[str, float] = {}
        self.seconds = 0.0
        self._t0 = 0.0

    def _measure(self) -> dict[str, float | None]:
        return {source.kind: source.end() for source in self.sources}

    def _begin(self) -> None:
        for source in self.sources:
            source.begin()

    def __enter__(self) -> EnergyMeter:
        if self.sources and self.idle_window_s > 0:
            self._begin()
            t0 = time.perf_counter()
            time.sleep(self.idle_window_s)
            idle = _total(self._measure())
            elapsed = time.perf_counter() - t0
            self.idle_w = idle / elapsed if idle is not None and elapsed > 0 else None
        self._begin()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.sources:
            readings = self._measure()
            self.joules = _total(readings)
            self.by_kind = {k: v for k, v in readings.items() if v is not None}

    def figures(self, inferences: int) -> dict[str, float]:
        """Trial metrics: ``energy_j``, ``power_w``, ``energy_per_inference_j`` (per
        item of the timed loop's batches; per generated token for language models),
        ``inferences_per_j``; with the idle baseline ``idle_power_w``,
        ``energy_active_j`` and ``energy_active_per_inference_j``; with several sources
        ``energy_<kind>_j`` each; and the sources' own figures. Empty without a
        reading."""
        if self.joules is None or self.seconds <= 0 or inferences < 1:
            return {}
        out = {
            "energy_j": self.joules,
            "power_w": self.joules / self.seconds,
            "energy_per_inference_j": self.joules / inferences,
        }
        if self.joules > 0:
            out["inferences_per_j"] = inferences / self.joules
        if self.idle_w is not None:
            active = max(0.0, self.joules - self.idle_w * self.seconds)
            out["idle_power_w"] = self.idle_w
            out["energy_active_j"] = active
            out["energy_active_per_inference_j"] = active / inferences
        if len(self.by_kind) > 1:
            out.update({f"energy_{kind}_j": j for kind, j in self.by_kind.items()})
        for source in self.sources:
            out.update(source.extra_figures())
        return out


def _total(readings: dict[str, float | None]) -> float | None:
    values = list(readings.values())
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def energy_environment(sources: list[EnergySource], reasons: list[str]) -> dict[str, str]:
    """The energy sources and method for a result's environment, or why there are none."""
    if not sources:
        why = "; ".join(reasons) or "no energy meter"
        return {"energy.source": f"none: {why}"}
    return {
        "energy.source": "; ".join(s.name for s in sources),
        "energy.method": "; ".join(s.method for s in sources)
        + f"; idle power over {IDLE_WINDOW_S:g} s before the loop, subtracted in energy_active_*",
        **({"energy.unavailable": "; ".join(reasons)} if reasons else {}),
    }

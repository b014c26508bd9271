"""The device's state around a trial, as Linux exposes it under ``/sys``: temperatures,
CPU clocks and governor, throttling counters, mains or battery.

- ``class/thermal/thermal_zone*/temp`` (millidegrees C) and ``type``;
- ``devices/system/cpu/cpu*/cpufreq/scaling_cur_freq`` (kHz) and ``scaling_governor``;
- ``devices/system/cpu/cpu*/thermal_throttle/{core,package}_throttle_count`` (x86);
- ``class/power_supply/*/type`` with ``online`` (Mains) or ``status`` (Battery).

On macOS the thermal pressure comes from ``powermetrics`` during the loop
(:mod:`agent.energy.powermetrics`, root only) and counts as throttling in
:func:`throttle_reason`.

:func:`read_state` takes one snapshot (every value optional: a device exposes what it
exposes); :func:`state_metrics` turns the snapshots before and after a trial into trial
metrics, and :func:`state_environment` says what was exposed and what was not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.energy.powermetrics import PRESSURE_LEVELS
from agent.sysfs import SYS

HOT_PREFIX = "device hot:"  # how a thermal-guard rejection's reason starts
THROTTLED_PREFIX = "device throttled:"
POLL_S = 1.0


@dataclass
class DeviceState:
    """One snapshot; empty collections for what the device does not expose."""

    temps_c: dict[str, float] = field(default_factory=dict)  # zone type -> degrees C
    freqs_mhz: list[float] = field(default_factory=list)  # one per CPU
    governors: list[str] = field(default_factory=list)
    throttle_count: int | None = None  # summed over CPUs (core + package)
    on_mains: bool | None = None
    battery_status: str = ""


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def read_state(root: Path | None = None) -> DeviceState:
    """A snapshot of the device's state under ``root`` (default :data:`SYS`)."""
    root = root if root is not None else SYS
    state = DeviceState()
    for zone in sorted((root / "class" / "thermal").glob("thermal_zone*")):
        milli = _number(zone / "temp")
        if milli is not None:
            kind = _text(zone / "type") or zone.name
            key = kind if kind not in state.temps_c else f"{kind}.{zone.name}"
            state.temps_c[key] = milli / 1000.0
    throttles = 0
    seen_throttle = False
    for cpu in sorted((root / "devices" / "system" / "cpu").glob("cpu[0-9]*")):
        khz = _number(cpu / "cpufreq" / "scaling_cur_freq")
        if khz is not None:
            state.freqs_mhz.append(khz / 1000.0)
        governor = _text(cpu / "cpufreq" / "scaling_governor")
        if governor:
            state.governors.append(governor)
        for name in ("core_throttle_count", "package_throttle_count"):
            count = _number(cpu / "thermal_throttle" / name)
            if count is not None:
                throttles += int(count)
                seen_throttle = True
    state.throttle_count = throttles if seen_throttle else None
    for supply in sorted((root / "class" / "power_supply").glob("*")):
        supply_type = _text(supply / "type")
        if supply_type == "Mains":
            online = _number(supply / "online")
            if online is not None:
                state.on_mains = bool(online) or bool(state.on_mains)
        elif supply_type == "Battery":
            state.battery_status = _text(supply / "status") or state.battery_status
            if state.on_mains is None and state.battery_status == "Discharging":
                state.on_mains = False
    return state


def state_metrics(before: DeviceState, after: DeviceState) -> dict[str, float]:
    """Trial metrics from the snapshots around it (only what both expose)."""
    out: dict[str, float] = {}
    for when, state in (("before", before), ("after", after)):
        if state.temps_c:
            out[f"temp_max_c_{when}"] = max(state.temps_c.values())
        if state.freqs_mhz:
            out[f"cpu_mhz_mean_{when}"] = sum(state.freqs_mhz) / len(state.freqs_mhz)
    if before.throttle_count is not None and after.throttle_count is not None:
        out["throttle_events"] = float(max(0, after.throttle_count - before.throttle_count))
    if after.on_mains is not None:
        out["on_mains"] = 1.0 if after.on_mains else 0.0
    return out


def state_environment(state: DeviceState) -> dict[str, str]:
    """What the device exposes, for the result's environment; "not exposed" otherwise."""
    missing = "not exposed by this device"
    return {
        "device.thermal_zones": ", ".join(sorted(state.temps_c)) or missing,
        "device.cpufreq_governor": ", ".join(sorted(set(state.governors))) or missing,
        "device.throttle_counters": "yes" if state.throttle_count is not None else missing,
        "device.power_source": (
            ("mains" if state.on_mains else "battery") if state.on_mains is not None else missing
        )
        + (f" (battery {state.battery_status})" if state.battery_status else ""),
    }


@dataclass(frozen=True)
class Cooldown:
    """What the cool-down wait before a trial found."""

    waited_s: float
    temp_c: float | None  # the hottest zone when the wait ended (None: no zones)
    reason: str  # "" when cool enough (or unguarded), else why the trial is invalid


def wait_until_cool(limit_c: float, timeout_s: float, root: Path | None = None) -> Cooldown:
    """Wait until every thermal zone is at most ``limit_c`` (0: no guard), polling each
    :data:`POLL_S` for at most ``timeout_s``."""
    started = time.monotonic()
    while True:
        temps = read_state(root).temps_c
        hottest = max(temps.values()) if temps else None
        waited = time.monotonic() - started
        if limit_c <= 0 or hottest is None or hottest <= limit_c:
            return Cooldown(waited, hottest, "")
        if waited >= timeout_s:
            return Cooldown(
                waited,
                hottest,
                f"{HOT_PREFIX} {hottest:.1f} C after waiting {waited:.0f} s to cool below "
                f"{limit_c:g} C",
            )
        time.sleep(min(POLL_S, max(0.0, timeout_s - waited)))


def throttle_reason(
    limit_c: float, before: DeviceState, after: DeviceState, pressure: float | None = None
) -> str:
    """With the guard on, why a trial during which the device throttled is invalid:
    throttle events counted by the kernel, or macOS thermal pressure above Nominal
    (``pressure``: the worst level powermetrics saw, 0 = Nominal)."""
    if limit_c <= 0:
        return ""
    if pressure is not None and pressure > 0:
        level = PRESSURE_LEVELS[min(int(pressure), len(PRESSURE_LEVELS) - 1)]
        return f"{THROTTLED_PREFIX} macOS thermal pressure {level} during the trial"
    if before.throttle_count is None or after.throttle_count is None:
        return ""
    events = after.throttle_count - before.throttle_count
    return f"{THROTTLED_PREFIX} {events} throttle events during the trial" if events > 0 else ""


def guard_reasons(
    limit_c: float,
    cooldown: Cooldown,
    before: DeviceState,
    after: DeviceState,
    metrics: dict[str, float],
) -> list[str]:
    """The thermal guard's verdict on a finished trial: why it is invalid (started hot,
    or throttled during its loop), empty when it is not or the guard is off. With the
    guard on it adds the wait before the trial to ``metrics`` (``cooldown_wait_s``)."""
    if limit_c <= 0:
        return []
    metrics["cooldown_wait_s"] = cooldown.waited_s
    pressure = metrics.get("thermal_pressure_max")
    reasons = [cooldown.reason, throttle_reason(limit_c, before, after, pressure)]
    return [r for r in reasons if r]

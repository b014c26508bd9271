"""Energy (RAPL) and device-state readers against fixture trees laid out as the kernel
lays out /sys (powercap with a counter that wraps, thermal zones, cpufreq, throttle
counters, power supplies), and a real trial on this machine, which exposes none of them:
the figures are absent, the result says why, and nothing else changes."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.device_state import read_state, state_environment, state_metrics
from agent.energy import EnergyMeter, RaplSource, counter_delta, rapl_status, rapl_zones
from agent.runner import run_measurement
from edgefarm.domain import MeasureSettings

MAX_RANGE = 262_143_328_850  # a real package's max_energy_range_uj


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def rapl_tree(root: Path, package_uj: int, dram_uj: int) -> Path:
    """powercap/intel-rapl:0 (package-0) with core and dram subzones."""
    powercap = root / "class" / "powercap"
    zone = powercap / "intel-rapl:0"
    write(zone / "name", "package-0")
    write(zone / "energy_uj", str(package_uj))
    write(zone / "max_energy_range_uj", str(MAX_RANGE))
    for index, name, value in ((0, "core", 5), (1, "dram", dram_uj)):
        sub = zone / f"intel-rapl:0:{index}"
        write(sub / "name", name)
        write(sub / "energy_uj", str(value))
        write(sub / "max_energy_range_uj", str(MAX_RANGE))
    write(powercap / "intel-rapl-mmio:0" / "name", "package-0")  # the MMIO twin: ignored
    return powercap


def test_rapl_zones_are_packages_and_dram() -> None:
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(990, 40, 1000) == 50  # wrapped once


def test_energy_over_a_loop_with_a_counter_that_wraps(tmp_path: Path) -> None:
    powercap = rapl_tree(tmp_path, package_uj=MAX_RANGE - 2_000_000, dram_uj=10_000_000)
    zones, reason = rapl_status(powercap)
    assert reason == "" and [z.name for z in zones] == ["package-0", "dram"]
    with EnergyMeter([RaplSource(zones)], idle_window_s=0) as meter:
        # the loop: the package counter wraps (2 J to the top, then 3 J), DRAM adds 1 J
        write(powercap / "intel-rapl:0" / "energy_uj", "3000000")
        write(powercap / "intel-rapl:0" / "intel-rapl:0:1" / "energy_uj", "11000000")
    figures = meter.figures(inferences=100)
    assert figures["energy_j"] == pytest.approx(6.0)
    assert figures["energy_per_inference_j"] == pytest.approx(0.06)
    assert figures["inferences_per_j"] == pytest.approx(100 / 6)
    assert figures["power_w"] == pytest.approx(6.0 / meter.seconds)
    assert "idle_power_w" not in figures  # no baseline window asked for


def test_the_idle_baseline_is_measured_and_subtracted(tmp_path: Path) -> None:
    powercap = rapl_tree(tmp_path, package_uj=0, dram_uj=0)
    zones, _ = rapl_status(powercap)
    meter = EnergyMeter([RaplSource(zones)], idle_window_s=0.05)
    meter.idle_w = None
    with meter:
        write(powercap / "intel-rapl:0" / "energy_uj", "4000000")
    # the idle window read an unchanged counter: 0 W idle, all 4 J are the loop's
    figures = meter.figures(inferences=4)
    assert figures["idle_power_w"] == 0.0 and figures["energy_active_j"] == pytest.approx(4.0)
    assert figures["energy_active_per_inference_j"] == pytest.approx(1.0)


def test_no_rapl_or_an_unreadable_one_gives_no_figures_and_says_why(tmp_path: Path) -> None:
    zones, reason = rapl_status(tmp_path / "absent")
    assert zones == [] and reason.startswith("no RAPL:") and "does not exist" in reason
    assert EnergyMeter([]).figures(10) == {}
    powercap = rapl_tree(tmp_path, 1, 1)
    (powercap / "intel-rapl:0" / "energy_uj").unlink()
    (powercap / "intel-rapl:0" / "energy_uj").mkdir()  # present, not readable as a number
    zones, reason = rapl_status(powercap)
    assert zones == [] and "is not readable by this user" in reason
    assert rapl_zones(tmp_path / "absent") == []


def test_device_state_from_a_laptop_tree(tmp_path: Path) -> None:
    for n, (kind, milli) in enumerate((("x86_pkg_temp", 61000), ("acpitz", 48500))):
        write(tmp_path / f"class/thermal/thermal_zone{n}/type", kind)
        write(tmp_path / f"class/thermal/thermal_zone{n}/temp", str(milli))
    for cpu, khz in enumerate((2_400_000, 1_800_000)):
        base = tmp_path / f"devices/system/cpu/cpu{cpu}"
        write(base / "cpufreq/scaling_cur_freq", str(khz))
        write(base / "cpufreq/scaling_governor", "powersave")
        write(base / "thermal_throttle/core_throttle_count", "3")
        write(base / "thermal_throttle/package_throttle_count", "1")
    write(tmp_path / "class/power_supply/AC/type", "Mains")
    write(tmp_path / "class/power_supply/AC/online", "0")
    write(tmp_path / "class/power_supply/BAT0/type", "Battery")
    write(tmp_path / "class/power_supply/BAT0/status", "Discharging")
    before = read_state(tmp_path)
    assert before.temps_c == {"x86_pkg_temp": 61.0, "acpitz": 48.5}
    assert before.freqs_mhz == [2400.0, 1800.0] and before.throttle_count == 8
    assert before.on_mains is False and before.battery_status == "Discharging"
    write(tmp_path / "devices/system/cpu/cpu1/thermal_throttle/core_throttle_count", "5")
    write(tmp_path / "class/thermal/thermal_zone0/temp", "83000")
    after = read_state(tmp_path)
    assert state_metrics(before, after) == {
        "temp_max_c_before": 61.0,
        "temp_max_c_after": 83.0,
        "cpu_mhz_mean_before": 2100.0,
        "cpu_mhz_mean_after": 2100.0,
        "throttle_events": 2.0,
        "on_mains": 0.0,
    }
    assert state_environment(after) == {
        "device.thermal_zones": "acpitz, x86_pkg_temp",
        "device.cpufreq_governor": "powersave",
        "device.throttle_counters": "yes",
        "device.power_source": "battery (battery Discharging)",
    }


@pytest.mark.skipif(
    os.path.exists("/sys/class/powercap/intel-rapl:0")
    or any(Path("/sys/class/thermal").glob("thermal_zone*")),
    reason="this machine exposes RAPL or thermal zones",
)
def test_a_trial_on_a_machine_without_sources_has_the_reasons_and_nothing_else() -> None:
    settings = MeasureSettings(
        warmup_iterations=1, min_iterations=20, min_duration_s=0.01, max_duration_s=1, trials=1,
        max_other_cpu_cores=0,
    )  # fmt: skip
    report = asyncio.run(run_measurement("noop", "none", Path(__file__), None, settings, {}))
    (trial,) = report.trials
    assert trial.valid and len(trial.samples_ms) >= 20
    assert not any(
        k.startswith(("energy", "power", "idle_power", "inferences")) for k in trial.metrics
    )
    assert not any(k.startswith(("temp_", "cpu_mhz", "throttle")) for k in trial.metrics)
    assert report.environment["energy.source"].startswith("none: no RAPL")
    assert report.environment["device.thermal_zones"] == "not exposed by this device"


# ----------------------------------------------------------------------- the thermal guard

GUARDED = MeasureSettings(
    warmup_iterations=1, min_iterations=20, min_duration_s=0.01, max_duration_s=1, trials=1,
    max_other_cpu_cores=0, max_start_temp_c=70.0, cooldown_timeout_s=1.0, timeout_s=60,
)  # fmt: skip


def hot_device(root: Path, milli: int) -> Path:
    write(root / "class/thermal/thermal_zone0/type", "x86_pkg_temp")
    write(root / "class/thermal/thermal_zone0/temp", str(milli))
    write(root / "devices/system/cpu/cpu0/thermal_throttle/core_throttle_count", "0")
    return root


def _trial(settings: MeasureSettings, options: dict[str, str] | None = None) -> Any:
    report = asyncio.run(
        run_measurement("noop", "none", Path(__file__), None, settings, options or {})
    )
    return report.trials[0]


def test_a_device_that_stays_hot_is_measured_again_then_stored_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EDGEFARM_SYS_ROOT", str(hot_device(tmp_path, 91_000)))
    with caplog.at_level(logging.INFO, logger="agent.runner"):
        trial = _trial(GUARDED)
    assert not trial.valid
    assert trial.invalid_reason == "device hot: 91.0 C after waiting 1 s to cool below 70 C"
    assert caplog.text.count("measuring it again") == 2
    assert trial.metrics["cooldown_wait_s"] >= 1.0 and trial.metrics["temp_max_c_before"] == 91


def test_the_guard_waits_for_the_device_to_cool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = hot_device(tmp_path, 85_000)
    monkeypatch.setenv("EDGEFARM_SYS_ROOT", str(root))
    cool = threading.Timer(1.5, write, (root / "class/thermal/thermal_zone0/temp", "55000"))
    cool.start()
    trial = _trial(replace(GUARDED, cooldown_timeout_s=20.0))
    cool.join()
    assert trial.valid, trial.invalid_reason
    assert 1.0 <= trial.metrics["cooldown_wait_s"] < 20 and trial.metrics["temp_max_c_before"] == 55


def test_a_trial_during_which_the_device_throttled_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = hot_device(tmp_path, 50_000)
    monkeypatch.setenv("EDGEFARM_SYS_ROOT", str(root))
    counter = root / "devices/system/cpu/cpu0/thermal_throttle/core_throttle_count"
    # the throttle counter rises once, while the first attempt loads (noop sleeps 1.5 s)
    bump = threading.Timer(0.75, write, (counter, "4"))
    bump.start()
    with caplog.at_level(logging.INFO, logger="agent.runner"):
        trial = _trial(GUARDED, {"noop_sleep_s": "1.5"})
    bump.join()
    assert caplog.text.count("measuring it again") == 1  # the first attempt throttled
    assert trial.valid and trial.metrics["throttle_events"] == 0.0

"""The energy sources beside RAPL: NVML (a test double of the library: no NVIDIA GPU
here), macOS ``powermetrics`` (its text output, parsed from fixtures and streamed by a
real subprocess), several sources summed, and a real trial reading a RAPL tree."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.device_state import DeviceState, throttle_reason
from agent.energy import EnergyMeter, RaplSource, energy_environment, energy_sources
from agent.energy.nvml import NvmlSource, nvml_status
from agent.energy.powermetrics import PowermetricsParser, PowermetricsSource, powermetrics_status
from agent.energy.rapl import rapl_status
from agent.runner import run_measurement
from edgefarm.domain import MeasureSettings

FIXTURES = Path(__file__).parent.parent / "fixtures" / "powermetrics"


class FakeNvml:
    """NVML as the source sees it: per-GPU counters in mJ, None where unsupported."""

    def __init__(self, counters: list[int | None]) -> None:
        self.counters = counters

    def device_count(self) -> int:
        return len(self.counters)

    def device_name(self, index: int) -> str:
        return "NVIDIA H100 PCIe"

    def energy_mj(self, index: int) -> int | None:
        return self.counters[index]


def test_nvml_energy_is_the_counters_delta() -> None:
    library = FakeNvml([1_000_000, None])  # GPU 1: pre-Volta, no energy counter
    source, reason = nvml_status(library)
    assert reason == "" and isinstance(source, NvmlSource) and source.gpus == [0]
    assert source.name == "nvml: gpu0 (NVIDIA H100 PCIe)"
    source.begin()
    library.counters[0] = 1_012_500
    assert source.end() == pytest.approx(12.5)
    source.begin()
    library.counters[0] = 300  # the driver reloaded: the counter restarted
    assert source.end() is None


def test_nvml_absent_or_unsupported_says_why() -> None:
    assert nvml_status(FakeNvml([])) == (None, "no NVML: no NVIDIA GPU")
    source, reason = nvml_status(FakeNvml([None]))
    assert source is None and "none reports its energy counter" in reason
    # this machine: no driver library, one line saying so
    source, reason = nvml_status()
    assert source is None and reason.startswith("no NVML:") and "\n" not in reason


def test_powermetrics_apple_silicon_output() -> None:
    lines = (FIXTURES / "apple_silicon.txt").read_text().splitlines()
    parsed = PowermetricsParser().feed_all(lines)
    assert parsed.samples == 3
    expected = (6252 * 102.37 + 6521 * 100.84 + 5908 * 101.05) / (102.37 + 100.84 + 101.05)
    assert parsed.mean_power_w() == pytest.approx(expected / 1000)
    assert parsed.pressure == 1  # Moderate in the second sample


def test_powermetrics_intel_mac_output_and_parts_without_a_combined_line() -> None:
    lines = (FIXTURES / "intel_mac.txt").read_text().splitlines()
    parsed = PowermetricsParser().feed_all(lines)
    expected = (18.42 * 100.92 + 19.10 * 99.41) / (100.92 + 99.41)
    assert parsed.samples == 2 and parsed.mean_power_w() == pytest.approx(expected)
    assert parsed.pressure == 2  # Heavy
    parts = [
        "*** Sampled system activity (Thu Dec  3 10:14:02 2026 +0000) (200.0ms elapsed) ***",
        "CPU Power: 900 mW",
        "GPU Power: 100 mW",
        "ANE Power: 0 mW",
        "GPU Power: 100 mW",  # the GPU section repeats it: counted once
        "*** Sampled system activity (x) (truncated",  # a cut-off header: not a sample
    ]
    parsed = PowermetricsParser().feed_all(parts)
    assert parsed.samples == 1 and parsed.mean_power_w() == pytest.approx(1.0)
    assert PowermetricsParser().feed_all(["garbage", "CPU Power: 5 mW"]).mean_power_w() is None


def test_powermetrics_streams_from_a_process_and_is_stopped(tmp_path: Path) -> None:
    """A stand-in for ``sudo -n powermetrics``: prints the recorded output, then keeps
    running until stopped, as powermetrics does."""
    script = tmp_path / "powermetrics.py"
    script.write_text(
        "import sys, time\n"
        f"sys.stdout.write(open({str(FIXTURES / 'apple_silicon.txt')!r}).read())\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    source = PowermetricsSource((sys.executable, str(script)))
    with EnergyMeter([source], idle_window_s=0) as meter:
        time.sleep(0.5)
    assert source._process is not None and source._process.returncode is not None
    mean_w = source.parser.mean_power_w()
    assert mean_w is not None and 6.0 < mean_w < 6.5
    figures = meter.figures(inferences=10)
    assert figures["energy_j"] == pytest.approx(mean_w * meter.seconds, rel=0.01)
    assert figures["thermal_pressure_max"] == 1.0
    # not on a Mac: no source and nothing to say; a missing binary says so
    if sys.platform != "darwin":
        assert powermetrics_status() == (None, "")
    missing = powermetrics_status(("/nonexistent/powermetrics",))
    assert missing == (None, "no powermetrics: /nonexistent/powermetrics not found")


def test_thermal_pressure_counts_as_throttling_when_the_guard_is_on() -> None:
    state = DeviceState()
    assert throttle_reason(80.0, state, state, 2.0) == (
        "device throttled: macOS thermal pressure Heavy during the trial"
    )
    assert throttle_reason(80.0, state, state, 0.0) == ""
    assert throttle_reason(0.0, state, state, 2.0) == ""  # guard off


def rapl_tree(root: Path, package_uj: int) -> Path:
    zone = root / "class" / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{package_uj}\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    return zone


def test_several_sources_are_summed_and_each_is_kept(tmp_path: Path) -> None:
    zone = rapl_tree(tmp_path, 1_000_000)
    zones, _ = rapl_status(tmp_path / "class" / "powercap")
    library = FakeNvml([5_000])
    sources, reasons = energy_sources(tmp_path / "class" / "powercap", library)
    assert [s.kind for s in sources] == ["rapl", "nvml"] and reasons == []
    with EnergyMeter(sources, idle_window_s=0) as meter:
        (zone / "energy_uj").write_text("3000000\n")  # CPU package: 2 J
        library.counters[0] = 8_000  # GPU: 3 J
    figures = meter.figures(inferences=5)
    assert figures["energy_j"] == pytest.approx(5.0)
    assert figures["energy_rapl_j"] == pytest.approx(2.0)
    assert figures["energy_nvml_j"] == pytest.approx(3.0)
    assert figures["energy_per_inference_j"] == pytest.approx(1.0)
    environment = energy_environment(sources, reasons)
    assert environment["energy.source"] == "rapl: package-0; nvml: gpu0 (NVIDIA H100 PCIe)"
    assert "idle power over 0.5 s" in environment["energy.method"]
    assert RaplSource(zones).name == "rapl: package-0"


class Ticker:
    """Adds to a RAPL counter every few milliseconds, as the kernel would."""

    def __init__(self, energy_file: Path, microjoules_per_tick: int) -> None:
        self.file, self.step = energy_file, microjoules_per_tick
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        value = int(self.file.read_text())
        while not self.stop.wait(0.005):
            value += self.step
            tmp = self.file.with_name("energy_uj.tmp")
            tmp.write_text(f"{value}\n")
            tmp.replace(self.file)

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_a_trial_on_a_device_with_rapl_carries_joules_per_inference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real trial (the agent's child process) on a RAPL tree whose package counter
    rises while it runs: the result carries energy, power and energy per inference."""
    zone = rapl_tree(tmp_path, 5_000)
    monkeypatch.setenv("EDGEFARM_SYS_ROOT", str(tmp_path))
    settings = MeasureSettings(
        warmup_iterations=1, min_iterations=40, min_duration_s=0.2, max_duration_s=5,
        trials=1, max_other_cpu_cores=0, batch_size=1,
    )  # fmt: skip
    with Ticker(zone / "energy_uj", 10_000):  # 10 mJ every ~5 ms: about 2 W
        report = asyncio.run(
            run_measurement("noop", "none", Path(__file__), None, settings, {"noop_call_s": "0.01"})
        )
    (trial,) = report.trials
    assert trial.valid, trial.invalid_reason
    metrics = trial.metrics
    assert metrics["energy_j"] > 0 and 0.2 < metrics["power_w"] < 20
    per = metrics["energy_per_inference_j"]
    assert per == pytest.approx(metrics["energy_j"] / len(trial.samples_ms))
    assert metrics["inferences_per_j"] == pytest.approx(1 / per)
    assert "idle_power_w" in metrics and metrics["energy_active_j"] <= metrics["energy_j"]
    assert report.environment["energy.source"] == "rapl: package-0"

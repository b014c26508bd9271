"""Apple Silicon (and Intel Mac) power from ``powermetrics``, sampled during the loop.

``powermetrics`` prints one block per sample interval, opened by ``*** Sampled system
activity (<date>) (<ms> elapsed) ***``. The ``cpu_power`` sampler reports ``CPU
Power: N mW``, ``GPU Power: N mW``, ``ANE Power: N mW`` and ``Combined Power (CPU + GPU
+ ANE): N mW`` on Apple Silicon, ``Intel energy model derived package power
(CPUs+GT+SA): N W`` on Intel Macs; the ``thermal`` sampler reports ``Current pressure
level: Nominal`` (then Moderate, Heavy, Trapping, Sleeping).

It needs root: the agent runs it as ``sudo -n /usr/bin/powermetrics``, so the agent's
user needs a sudoers rule such as ``agentuser ALL=(root) NOPASSWD: /usr/bin/powermetrics``
(or the agent runs as root). Energy of the loop = the mean power over the samples
(weighted by their elapsed time) times the loop's wall time; the output is parsed line
by line as it streams, keeping only running sums.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

POWERMETRICS = "/usr/bin/powermetrics"
COMMAND = ("sudo", "-n", POWERMETRICS)
SAMPLERS = "cpu_power,gpu_power,ane_power,thermal"
INTERVAL_MS = 100
PRESSURE_LEVELS = ("Nominal", "Moderate", "Heavy", "Trapping", "Sleeping")

_SAMPLE = re.compile(r"^\*\*\* Sampled system activity \(.*\) \(([\d.]+)\s*ms elapsed\) \*\*\*")
_COMBINED = re.compile(r"^Combined Power \(CPU \+ GPU(?: \+ ANE)?\):\s*([\d.]+)\s*mW")
_PART = re.compile(r"^(CPU|GPU|ANE) Power:\s*([\d.]+)\s*mW")
_INTEL = re.compile(r"^Intel energy model derived package power \(CPUs\+GT\+SA\):\s*([\d.]+)\s*W")
_PRESSURE = re.compile(r"^Current pressure level:\s*(\w+)")


@dataclass
class _Sample:
    elapsed_ms: float
    combined_mw: float | None = None
    parts_mw: dict[str, float] | None = None

    def power_mw(self) -> float | None:
        if self.combined_mw is not None:
            return self.combined_mw
        return sum(self.parts_mw.values()) if self.parts_mw else None


class PowermetricsParser:
    """Feed it lines; it keeps the time-weighted power and the worst thermal pressure."""

    def __init__(self) -> None:
        self.samples = 0
        self.weighted_mw_ms = 0.0
        self.elapsed_ms = 0.0
        self.pressure = -1  # index into PRESSURE_LEVELS; -1 none reported
        self._current: _Sample | None = None

    def feed(self, line: str) -> None:
        """One line of output."""
        text = line.strip()
        sample = _SAMPLE.match(text)
        if sample:
            self._close()
            self._current = _Sample(float(sample.group(1)))
            return
        if self._current is None:
            return
        if combined := _COMBINED.match(text):
            self._current.combined_mw = float(combined.group(1))
        elif intel := _INTEL.match(text):
            self._current.combined_mw = float(intel.group(1)) * 1000.0
        elif part := _PART.match(text):
            parts = self._current.parts_mw = self._current.parts_mw or {}
            parts.setdefault(part.group(1), float(part.group(2)))  # GPU Power repeats
        elif pressure := _PRESSURE.match(text):
            level = pressure.group(1)
            rank = PRESSURE_LEVELS.index(level) if level in PRESSURE_LEVELS else 1
            self.pressure = max(self.pressure, rank)

    def feed_all(self, lines: Iterable[str]) -> PowermetricsParser:
        """Every line, then close the last sample."""
        for line in lines:
            self.feed(line)
        self._close()
        return self

    def _close(self) -> None:
        sample, self._current = self._current, None
        if sample is None or sample.elapsed_ms <= 0:
            return
        power = sample.power_mw()
        if power is None:
            return
        self.samples += 1
        self.weighted_mw_ms += power * sample.elapsed_ms
        self.elapsed_ms += sample.elapsed_ms

    def mean_power_w(self) -> float | None:
        """Mean power over the closed samples, weighted by their elapsed time."""
        return self.weighted_mw_ms / self.elapsed_ms / 1000.0 if self.elapsed_ms else None


def powermetrics_status(
    command: tuple[str, ...] = COMMAND,
) -> tuple[PowermetricsSource | None, str]:
    """A source when ``powermetrics`` runs here without a password, else why not."""
    if sys.platform != "darwin" and command == COMMAND:
        return None, ""  # not a Mac: nothing to say beyond the other sources
    if shutil.which(command[0]) is None:
        return None, f"no powermetrics: {command[0]} not found"
    try:
        probe = subprocess.run(
            [*command, "-n", "1", "-i", "1", "--samplers", "thermal"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"powermetrics did not run: {exc}"
    if probe.returncode != 0:
        return None, (
            "powermetrics needs root: allow the agent's user `sudo -n /usr/bin/powermetrics` "
            "(a NOPASSWD sudoers rule) or run the agent as root"
        )
    return PowermetricsSource(command), ""


class PowermetricsSource:
    """``powermetrics`` streaming during the block (:class:`agent.energy.EnergySource`)."""

    kind = "powermetrics"

    def __init__(self, command: tuple[str, ...] = COMMAND, interval_ms: int = INTERVAL_MS) -> None:
        self.command = command
        self.interval_ms = interval_ms
        self.name = "powermetrics: CPU + GPU + ANE"
        self.method = (
            f"powermetrics {SAMPLERS} every {interval_ms} ms: mean power over the samples "
            "x wall time"
        )
        self.parser = PowermetricsParser()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._t0 = 0.0

    def begin(self) -> None:
        """Start sampling."""
        self.parser = PowermetricsParser()
        self._process = subprocess.Popen(
            [*self.command, "-i", str(self.interval_ms), "--samplers", SAMPLERS],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        stream = self._process.stdout
        assert stream is not None
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()
        self._t0 = time.perf_counter()

    def _read(self, stream: Iterable[str]) -> None:
        for line in stream:
            self.parser.feed(line)

    def end(self) -> float | None:
        """Joules since :meth:`begin` (None without a complete sample)."""
        seconds = time.perf_counter() - self._t0
        process, reader = self._process, self._reader
        if process is None or reader is None:
            return None
        process.terminate()  # sudo relays the signal to powermetrics
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        self.parser.feed_all(())
        power = self.parser.mean_power_w()
        return power * seconds if power is not None else None

    def extra_figures(self) -> dict[str, float]:
        """``thermal_pressure_max``: the worst macOS thermal pressure level seen (0 =
        Nominal .. 4 = Sleeping), where reported."""
        if self.parser.pressure < 0:
            return {}
        return {"thermal_pressure_max": float(self.parser.pressure)}

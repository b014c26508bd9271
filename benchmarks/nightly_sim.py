"""Seeded simulation of the nightly regression gate and change-point history: one table.

It drives the real detection code (``results.regression.detect.judge_night``,
``to_confirm``/``confirm``/``regressions`` and ``detect.history`` with its change
points) with realistic measurement noise on latency series (trial medians, lower is
better):

- per trial: lognormal noise with the given trial CV (default 3%), AR(1)-correlated
  along the run's time line (rho 0.5); bimodal placement (30% of trials 4% slower);
  2% of trials are outliers, slower by 20-60%;
- per run (all trials of one run): a fast phase, lognormal with 0.5% sd; 3% of runs
  are noisy nights whose trial CV is 3x the normal; 10% of runs have a slow phase
  inside them (5% slower for 20-50% of the run's time line);
- per device and night: a whole-night offset, lognormal with 1% sd;
- per device (series share devices): a slow linear drift of at most 0.02% per night
  (at most 1.2% over 60 nights, well below the 2% gate) and machine slow phases: with
  probability 1% per night a phase starts that makes everything on the device 3%
  slower for 3 to 7 nights. A machine slowdown is not a software regression.

Series are unchanged, or take one step in their true value (+2%, +5%, +10%, the bad
direction) on a random night. The baseline of a night is the previous night's build.
A flagged series is re-measured in a fresh run (new fast phase, new noisy-night draw,
same machine state that night) and reported only when the re-measurement flags it too.
Two measurement modes, both printed:

- interleaved: the baseline and the candidate build are measured interleaved in the
  same run, nightly and for the confirmation, so run phases, machine phases and drift
  cancel. This is what the runner does when both artifacts are runnable.
- sequential: the candidate alone is measured and judged with the night (run) as the
  unit (``detect.judge_runs``): tonight's run value (median of its trials) against the
  series' stored nights of last night's build, each scaled by the device's level change
  since that night (the median tonight/that-night ratio of the device's series whose
  build is the same on both nights: the control series), with the pooled night-to-night
  spread as the yardstick (t prediction test at ``SEQUENTIAL_ALPHA`` plus the 2%
  minimum effect). A flag is confirmed by ``CONFIRM_RUNS`` fresh runs of the candidate
  (same night, same machine state), their mean judged the same way at
  ``SEQUENTIAL_CONFIRM_ALPHA``.
- sequential, no controls: the same without control series (a device whose every
  series changed, e.g. a runtime upgrade): machine slow phases and night offsets stay.

A false alarm is a reported regression on a series-night whose build did not change
(any cause, machine slow phases included). Detection rate: a reported regression on
the night a step lands. Nights to detect: 1 when the gate reports the step on its
night, else the nights until ``detect.history`` over the nights so far finds a change
point within three nights of the step in the bad direction (censored at the last night).

The history is each series' candidate night values (median of the trials), so machine
slow phases and drift stay in it: its change points are printed with how many sit at
a machine slow-phase edge, and nights to detect are also given for the series whose
device had no slow phase within 7 nights of the step.

Trial count: the farm's nightly default of 5 trials per side cannot reach the targets
with a sound test (the trial-count table shows it); the default here,
:data:`SUITE_TRIALS`, is the count the regression suite needs, with margin on both
targets at a 3% trial CV.

Run: ``python benchmarks/nightly_sim.py [--seed N] [--series N] [--nights N]
[--trials N] [--cv X]`` (about 2-3 minutes on one core with the defaults).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from results.regression import detect  # noqa: E402
from results.regression.changepoint import MIN_SEGMENT  # noqa: E402
from results.regression.metrics import METRICS  # noqa: E402
from results.regression.stats import TIMING_ALPHA, compare  # noqa: E402
from results.regression.types import Sample, SeriesKey, Status, Verdict  # noqa: E402

FARM_NIGHTLY_TRIALS = 5  # the farm's current nightly default per side
SUITE_TRIALS = 25  # trials per side per run the regression suite needs
STEPS = (0.02, 0.05, 0.10)
METRIC = "latency_p50"
TRUE_MS = 10.0
TARGET_DETECT = 0.95  # reported on the night of a +5% step
TARGET_FALSE = 0.001  # false alarms per unchanged series-night
HISTORY_TOLERANCE = 3  # nights between a found change point and the true step


@dataclass(frozen=True)
class NoiseModel:
    """The simulated measurement noise (see the module docstring)."""

    cv: float = 0.03  # per-trial lognormal sd
    outlier_rate: float = 0.02
    outlier_slowdown: tuple[float, float] = (0.20, 0.60)
    run_phase_sd: float = 0.005  # per run, shared by its trials
    noisy_run_rate: float = 0.03
    noisy_run_factor: float = 3.0  # trial CV multiplier on a noisy night
    drift_per_night: float = 0.0002  # largest |slope| of a device's linear drift
    slow_phase_rate: float = 0.01  # per device-night
    slow_phase_size: float = 0.03
    slow_phase_nights: tuple[int, int] = (3, 7)
    devices: int = 8
    night_offset_sd: float = 0.01  # per device-night, shared by every run of the night
    bimodal_rate: float = 0.3  # share of trials landing in the slow mode ...
    bimodal_gap: float = 0.04  # ... this much slower (e.g. another core or NUMA placement)
    ar_rho: float = 0.5  # AR(1) correlation of consecutive trials of a run
    run_slow_rate: float = 0.1  # runs with a slow phase inside them ...
    run_slow_size: float = 0.05  # ... this much slower ...
    run_slow_share: tuple[float, float] = (0.2, 0.5)  # ... for this share of the run


@dataclass(frozen=True)
class ModeFigures:
    """What one measurement mode achieved."""

    detected: dict[float, float]  # step -> share reported on the night it landed
    false_alarms: int  # reported regressions on unchanged series-nights
    false_alarms_at_slow_phase: int  # ... of which the machine state changed that night
    unchanged_nights: int  # unchanged series-nights judged
    confirmations: int  # re-measurements run
    nights_to_detect: dict[float, tuple[float, float]]  # step -> (median, p90); inf: censored
    censored: dict[float, int]  # step -> series not detected by the last night
    # The same over the series whose device had no machine slow phase near the step:
    nights_to_detect_clear: dict[float, tuple[float, float]]
    clear_series: dict[float, int]  # step -> how many such series

    @property
    def false_alarm_rate(self) -> float:
        """Reported regressions per unchanged series-night."""
        return self.false_alarms / self.unchanged_nights if self.unchanged_nights else math.nan


@dataclass(frozen=True)
class TrialCount:
    """Gate figures of one trial count (interleaved, one stage and with confirmation)."""

    trials: int
    stage_detect: float  # +5% flagged by one stage
    stage_false: float  # unchanged flagged by one stage
    draws: int

    @property
    def detect(self) -> float:
        """+5% reported: both independent stages flag it."""
        return self.stage_detect**2

    @property
    def false_alarm(self) -> float:
        """Unchanged reported: both independent stages flag it."""
        return self.stage_false**2


@dataclass(frozen=True)
class SimulationFigures:
    """All computed figures of one simulation."""

    seed: int
    series: int  # per scenario (unchanged and each step)
    nights: int
    trials: int
    cv: float
    interleaved: ModeFigures
    sequential: ModeFigures
    sequential_no_controls: ModeFigures  # sequential, no control series on the device
    history_points: int  # change points in unchanged series' full histories
    history_points_at_slow_phase: int  # ... near a machine slow-phase edge
    history_nights: int  # unchanged series-nights in those histories
    trial_counts: list[TrialCount] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------ noise


@dataclass
class _Machine:
    """Per device and night: the machine's multiplicative state and its phase edges."""

    level: np.ndarray  # (devices, nights)
    slow: np.ndarray  # (devices, nights) bool


def _machine(rng: np.random.Generator, noise: NoiseModel, nights: int) -> _Machine:
    slope = rng.uniform(-noise.drift_per_night, noise.drift_per_night, noise.devices)
    level = np.exp(slope[:, None] * np.arange(nights)[None, :])
    slow = np.zeros((noise.devices, nights), dtype=bool)
    lo, hi = noise.slow_phase_nights
    for d in range(noise.devices):
        night = 0
        while night < nights:
            if rng.random() < noise.slow_phase_rate:
                length = int(rng.integers(lo, hi + 1))
                slow[d, night : night + length] = True
                night += length
            night += 1
    offset = np.exp(rng.normal(0.0, noise.night_offset_sd, (noise.devices, nights)))
    return _Machine(level * offset * np.where(slow, 1.0 + noise.slow_phase_size, 1.0), slow)


def _run(rng: np.random.Generator, noise: NoiseModel, true: np.ndarray, trials: int) -> np.ndarray:
    """One run per row of ``true`` (shape (rows, artifacts)): trial values (rows, artifacts,
    trials) sharing the run's phase and noisy-night draw within a row.

    The artifacts' trials alternate in rounds (round ``t`` holds trial ``t`` of each, in
    random order), so the run's time line has ``artifacts * trials`` slots; AR(1) noise
    and a slow phase inside the run follow that time line, bimodal placement and
    outliers are per trial.
    """
    rows, artifacts = true.shape
    slots = artifacts * trials
    phase = rng.normal(0.0, noise.run_phase_sd, (rows, 1))
    noisy = rng.random((rows, 1)) < noise.noisy_run_rate
    cv = noise.cv * np.where(noisy, noise.noisy_run_factor, 1.0)
    # AR(1) innovations with unit stationary variance along the run's time line.
    e = rng.standard_normal((rows, slots))
    z = np.empty_like(e)
    z[:, 0] = e[:, 0]
    rho = noise.ar_rho
    for t in range(1, slots):
        z[:, t] = rho * z[:, t - 1] + math.sqrt(1.0 - rho * rho) * e[:, t]
    log = phase + cv * z
    # A slow phase inside the run: a contiguous stretch of its time line.
    has_slow = np.less(rng.random(rows), noise.run_slow_rate)
    share = rng.uniform(*noise.run_slow_share, rows)
    length = np.maximum(1, np.round(share * slots)).astype(int)
    start = (rng.random(rows) * (slots - length + 1)).astype(int)
    clock = np.arange(slots)[None, :]
    inside = has_slow[:, None] & (clock >= start[:, None]) & (clock < (start + length)[:, None])
    log = log + np.where(inside, math.log1p(noise.run_slow_size), 0.0)
    # Which slot each artifact's trial takes: rounds of ``artifacts`` slots, shuffled.
    order = np.argsort(rng.random((rows, trials, artifacts)), axis=2)
    slot = np.arange(trials)[None, :, None] * artifacts + order  # (rows, trials, artifacts)
    timeline = np.take_along_axis(log, slot.reshape(rows, -1), axis=1)
    per_trial = timeline.reshape(rows, trials, artifacts).transpose(0, 2, 1)
    bimodal = rng.random((rows, artifacts, trials)) < noise.bimodal_rate
    outlier = rng.random((rows, artifacts, trials)) < noise.outlier_rate
    slowdown = rng.uniform(*noise.outlier_slowdown, (rows, artifacts, trials))
    factor = np.where(bimodal, 1.0 + noise.bimodal_gap, 1.0) * np.where(
        outlier, 1.0 + slowdown, 1.0
    )
    return true[:, :, None] * np.exp(per_trial) * factor


def _sample(run_id: str, at: float, trials: np.ndarray) -> Sample:
    values = tuple(float(v) for v in trials)
    return Sample(run_id=run_id, at=at, value=float(np.median(trials)), trials=values)


# ------------------------------------------------------------------------------ gate


_Confirm = Callable[[Verdict], Verdict]


def _gate(
    baseline: dict[SeriesKey, Sample],
    candidate: dict[SeriesKey, Sample],
    confirm: _Confirm,
    levels: dict[tuple[str, str], float] | None = None,
) -> tuple[set[SeriesKey], int]:
    """Keys reported tonight and re-measurements run: judge the night (baselines scaled
    by ``levels``), re-measure each flagged series in a fresh run (``confirm``), keep
    the regressions it confirms."""
    verdicts = detect.judge_night(baseline, candidate, levels)
    flagged = detect.to_confirm(verdicts)
    confirmed = [confirm(v) for v in flagged]
    return {v.key for v in detect.regressions(confirmed)}, len(flagged)


# ------------------------------------------------------------------------------ simulation


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    median = float(np.quantile(arr, 0.5, method="inverted_cdf"))
    return median, float(np.quantile(arr, 0.9, method="inverted_cdf"))


def _first_history_detection(
    key: SeriesKey, samples: list[Sample], step_night: int, min_segment: int = MIN_SEGMENT
) -> int | None:
    """First night index at which the history finds the step (None: not by the end)."""
    for night in range(step_night + min_segment - 1, len(samples)):
        hist = detect.history(key, samples[: night + 1], samples[0].run_id)
        for point in hist.change_points:
            if abs(point.index - step_night) <= HISTORY_TOLERANCE and point.after > point.before:
                return night
    return None


def trial_count_table(
    seed: int, cv: float, counts: Sequence[int], draws: int = 2000, step: float = 0.05
) -> list[TrialCount]:
    """Per-stage gate figures by trial count (interleaved runs, real ``compare``)."""
    rng = np.random.default_rng(seed + 7919)
    noise = NoiseModel(cv=cv)
    key = SeriesKey("sim", "sim", "sim", "sim", METRIC)
    metric = METRICS[METRIC]
    out = []
    for trials in counts:
        flagged = {0.0: 0, step: 0}
        for shift in flagged:
            true = np.tile([TRUE_MS, TRUE_MS * (1.0 + shift)], (draws, 1))
            runs = _run(rng, noise, true, trials)
            for row in runs:
                verdict = compare(key, metric, _sample("b", 0, row[0]), _sample("c", 0, row[1]))
                flagged[shift] += verdict.status is Status.REGRESSION
        out.append(TrialCount(trials, flagged[step] / draws, flagged[0.0] / draws, draws))
    return out


@dataclass
class _World:
    """The simulated series: true build values per night, devices and their machines."""

    rng: np.random.Generator
    noise: NoiseModel
    trials: int
    build: np.ndarray  # (series, nights) true value of each night's build, software only
    device: np.ndarray  # (series,) device index
    machine: _Machine
    keys: list[SeriesKey]
    # The sequential modes' re-measurements draw from their own streams, so the modes'
    # figures do not move with each other's number of confirmations.
    streams: dict[str, np.random.Generator] = field(default_factory=dict)

    def measure(self, rows: np.ndarray, night: int, stream: str = "") -> np.ndarray:
        """One fresh run per row: the previous and tonight's build, interleaved.

        Returns trial values of shape (rows, 2, trials): [:, 0] the baseline build,
        [:, 1] the candidate build. ``stream`` names a separate random stream.
        """
        pair = self.build[rows][:, [max(night - 1, 0), night]]
        level = self.machine.level[self.device[rows], night]
        rng = self.rng
        if stream:
            if stream not in self.streams:
                self.streams[stream] = np.random.default_rng(
                    [int(self.rng.bit_generator.seed_seq.entropy), len(self.streams) + 1]  # type: ignore[attr-defined]
                )
            rng = self.streams[stream]
        return _run(rng, self.noise, pair * level[:, None], self.trials)


@dataclass
class _Nights:
    """What the nightly loop produced."""

    reported: dict[str, np.ndarray]  # mode -> (series, nights) reported regressions
    confirmations: dict[str, int]  # mode -> re-measurements run
    history: list[list[Sample]]  # per series, the candidate's night samples


MODES = ("interleaved", "sequential", "sequential, no controls")


@dataclass
class _Night:
    """One night of the loop: what the confirmations need."""

    world: _World
    index: dict[SeriesKey, int]
    night: int
    history: list[list[Sample]]  # per series, candidate samples of the nights so far
    _levels: dict[int, np.ndarray] | None = None

    def again(self, key: SeriesKey, stream: str = "") -> np.ndarray:
        """A fresh run of ``key`` tonight: trials of (baseline build, candidate build)."""
        return self.world.measure(np.array([self.index[key]]), self.night, stream)[0]

    def interleaved(self, first: Verdict) -> Verdict:
        """Both builds re-measured interleaved in a fresh run."""
        at = float(self.night * 86400)
        again = self.again(first.key)
        base, cand = _sample("b-again", at, again[0]), _sample("n-again", at, again[1])
        return detect.confirm(first, detect.judge_night({first.key: base}, {first.key: cand})[0])

    def sequential(self, first: Verdict, controls: bool) -> Verdict:
        """The candidate re-measured alone in :data:`detect.CONFIRM_RUNS` fresh runs, their
        mean judged against the series' stored nights (the run-level test)."""
        i, night = self.index[first.key], self.night
        at = float(night * 86400)
        runs = [
            _sample(f"n-again{r}", at, self.again(first.key, f"sequential {controls}")[1])
            for r in range(detect.CONFIRM_RUNS)
        ]
        again = detect.judge_runs(
            first.key,
            runs,
            self.stored(i, controls),
            self.build_id(i, night - 1),
            detect.SEQUENTIAL_CONFIRM_ALPHA,
        )
        return detect.confirm(first, again)

    def build_id(self, i: int, night: int) -> str:
        """The software identity of series ``i``'s build on ``night``."""
        return f"{self.world.build[i, night]:.6f}"

    def stored(self, i: int, controls: bool) -> list[detect.StoredNight]:
        """Series ``i``'s stored nights before tonight with their builds and, with
        ``controls``, tonight's device level relative to each (:meth:`levels`)."""
        level = self.levels()[int(self.world.device[i])] if controls else None
        return [
            detect.StoredNight(
                self.build_id(i, m), self.history[i][m], 1.0 if level is None else level[m]
            )
            for m in range(self.night)
        ]

    def levels(self) -> dict[int, np.ndarray]:
        """Per device, tonight's level relative to each earlier night: the median
        tonight/that-night ratio over the device's series whose build is the same on
        both nights (the control series; the series judged is one of them when its
        build did not change, one of about a hundred)."""
        if self._levels is None:
            world, night = self.world, self.night
            values = np.log([[s.value for s in h[: night + 1]] for h in self.history])
            ratio = values[:, night : night + 1] - values[:, :night]
            same = world.build[:, :night] == world.build[:, night : night + 1]
            self._levels = {}
            for d in range(world.noise.devices):
                rows = world.device == d
                masked = np.where(same[rows], ratio[rows], np.nan)
                with np.errstate(all="ignore"):
                    level = np.exp(np.nanmedian(masked, axis=0))
                self._levels[d] = np.where(np.isfinite(level), level, 1.0)
        return self._levels

    def first_sequential(self, controls: bool) -> list[Verdict]:
        """The night's sequential first check of every series: tonight's run against
        the stored nights of last night's build (run-level test)."""
        world, night = self.world, self.night
        return [
            detect.judge_runs(
                k, [self.history[i][night]], self.stored(i, controls), self.build_id(i, night - 1)
            )
            for i, k in enumerate(world.keys)
        ]

    def controls(self) -> list[int]:
        """Series whose build did not change since last night (the first check's controls)."""
        build = self.world.build
        return [int(j) for j in np.flatnonzero(build[:, self.night] == build[:, self.night - 1])]


def _run_nights(world: _World) -> _Nights:
    """Every night: one run per series, the gate in every mode, re-measure the flagged."""
    n_series, nights = world.build.shape
    index = {k: i for i, k in enumerate(world.keys)}
    reported = {m: np.zeros((n_series, nights), dtype=bool) for m in MODES}
    confirmations = dict.fromkeys(MODES, 0)
    history: list[list[Sample]] = [[] for _ in range(n_series)]
    for night in range(nights):
        at = float(night * 86400)
        runs = world.measure(np.arange(n_series), night)
        base_now = {k: _sample(f"b{night}", at, runs[i, 0]) for i, k in enumerate(world.keys)}
        cand_now = {k: _sample(f"n{night}", at, runs[i, 1]) for i, k in enumerate(world.keys)}
        for i, k in enumerate(world.keys):
            history[i].append(cand_now[k])
        if night > 0:
            tonight = _Night(world, index, night, history)
            keys, runs_done = _gate(base_now, cand_now, tonight.interleaved)
            for k in keys:
                reported["interleaved"][index[k], night] = True
            confirmations["interleaved"] += runs_done
            for mode, controls in (("sequential", True), ("sequential, no controls", False)):
                verdicts = tonight.first_sequential(controls)
                flagged = detect.to_confirm(verdicts)
                confirmed = [tonight.sequential(v, controls) for v in flagged]
                for v in detect.regressions(confirmed):
                    reported[mode][index[v.key], night] = True
                confirmations[mode] += len(flagged) * detect.CONFIRM_RUNS
    return _Nights(reported, confirmations, history)


def _mode_figures(
    world: _World,
    nights_run: _Nights,
    mode: str,
    step_of: np.ndarray,
    step_night: np.ndarray,
    history_night: dict[int, int | None],
) -> ModeFigures:
    rep = nights_run.reported[mode]
    unchanged = np.zeros_like(rep)
    unchanged[:, 1:] = world.build[:, 1:] == world.build[:, :-1]
    slow = world.machine.slow[world.device]
    edge = np.zeros_like(rep)
    edge[:, 1:] = slow[:, 1:] != slow[:, :-1]
    steps = sorted({float(s) for s in step_of if s > 0})
    reach = world.noise.slow_phase_nights[1]
    detected, nights_to, censored, clear_to, clear_n = {}, {}, {}, {}, {}
    for step in steps:
        rows = [int(i) for i in np.flatnonzero(step_of == step)]
        hits = [bool(rep[i, step_night[i]]) for i in rows]
        detected[step] = float(np.mean(hits)) if rows else math.nan
        delays: list[float] = []
        clear: list[float] = []
        for i, hit in zip(rows, hits, strict=True):
            found = None if hit else history_night.get(i)
            delay = math.inf if found is None else float(found - step_night[i] + 1)
            delay = 1.0 if hit else delay
            delays.append(delay)
            k = int(step_night[i])
            if not slow[i, max(k - reach, 0) : k + reach + 1].any():
                clear.append(delay)
        nights_to[step] = _quantiles(delays)
        censored[step] = sum(math.isinf(d) for d in delays)
        clear_to[step] = _quantiles(clear)
        clear_n[step] = len(clear)
    return ModeFigures(
        detected=detected,
        false_alarms=int(np.count_nonzero(rep & unchanged)),
        false_alarms_at_slow_phase=int(np.count_nonzero(rep & unchanged & edge)),
        unchanged_nights=int(np.count_nonzero(unchanged)),
        confirmations=nights_run.confirmations[mode],
        nights_to_detect=nights_to,
        censored=censored,
        nights_to_detect_clear=clear_to,
        clear_series=clear_n,
    )


def simulate(
    seed: int = 0,
    series: int = 250,
    nights: int = 60,
    trials: int = SUITE_TRIALS,
    cv: float = 0.03,
    steps: Sequence[float] = STEPS,
    trial_counts: Sequence[int] = (),
    noise: NoiseModel | None = None,
) -> SimulationFigures:
    """Simulate ``series`` latency series per scenario (unchanged and each step) over
    ``nights`` nights with ``trials`` trials per side and run, in both modes."""
    started = time.perf_counter()
    noise = noise or NoiseModel(cv=cv)
    rng = np.random.default_rng(seed)
    machine = _machine(rng, noise, nights)
    scenarios = [0.0, *steps]
    n_series = series * len(scenarios)
    step_of = np.repeat(np.asarray(scenarios, dtype=float), series)
    lo, hi = max(6, nights // 3), max(7, nights - nights // 3)
    step_night = rng.integers(lo, hi, n_series)
    device = np.arange(n_series) % noise.devices
    build = np.full((n_series, nights), TRUE_MS)
    build *= np.where(np.arange(nights)[None, :] >= step_night[:, None], 1 + step_of[:, None], 1)
    keys = [SeriesKey(f"m{i}", "sim", "sim", f"dev{device[i]}", METRIC) for i in range(n_series)]
    world = _World(rng, noise, trials, build, device, machine, keys)
    run = _run_nights(world)

    # Nights to detect: the gate on the step night, else the change-point history.
    history_night: dict[int, int | None] = {}
    for i in np.flatnonzero((step_of > 0) & (step_night < nights)):
        k = int(step_night[i])
        if not all(run.reported[m][i, k] for m in run.reported):
            history_night[int(i)] = _first_history_detection(keys[i], run.history[i], k)

    points = points_at_edge = 0
    unchanged_series = np.flatnonzero(step_of == 0.0)
    for i in unchanged_series:
        hist = detect.history(keys[i], run.history[i], run.history[i][0].run_id)
        slow = machine.slow[device[i]]
        for point in hist.change_points:
            points += 1
            lo_i = max(point.index - HISTORY_TOLERANCE - 1, 0)
            hi_i = min(point.index + HISTORY_TOLERANCE, nights - 1)
            points_at_edge += bool(np.any(slow[lo_i:hi_i] != slow[lo_i + 1 : hi_i + 1]))
    figures = {
        m: _mode_figures(world, run, m, step_of, step_night, history_night) for m in run.reported
    }
    return SimulationFigures(
        seed=seed,
        series=series,
        nights=nights,
        trials=trials,
        cv=cv,
        interleaved=figures["interleaved"],
        sequential=figures["sequential"],
        sequential_no_controls=figures["sequential, no controls"],
        history_points=points,
        history_points_at_slow_phase=points_at_edge,
        history_nights=len(unchanged_series) * nights,
        trial_counts=trial_count_table(seed, cv, trial_counts) if trial_counts else [],
        seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------ output


def _nights(value: float, horizon: int) -> str:
    return f"> {horizon}" if math.isinf(value) else f"{value:.0f}"


def render(fig: SimulationFigures) -> str:
    """The printed table."""
    steps = list(fig.interleaved.detected)
    metric = METRICS[METRIC]
    lines = [
        f"nightly_sim: seed {fig.seed}; {fig.series} latency series per scenario (unchanged,"
        f" {', '.join(f'+{s:.0%}' for s in steps)} step); {fig.nights} nights; trial CV"
        f" {fig.cv:.1%}",
        f"gate: {fig.trials} trials per side per run (the farm's nightly default is"
        f" {FARM_NIGHTLY_TRIALS}: too few, see the trial-count table), change beyond"
        f" {metric.min_effect:.0%} and significant; every flag re-measured, reported only if"
        " flagged again",
        f"  interleaved: one-sided rank test on trials at alpha {TIMING_ALPHA:g} per stage +"
        " Hodges-Lehmann ratio; confirmed by one fresh interleaved run",
        "  sequential: the night is the unit, run value vs the stored nights of the baseline"
        f" build (t prediction test at alpha {detect.SEQUENTIAL_ALPHA:g}); confirmed by the"
        f" mean of {detect.CONFIRM_RUNS} fresh runs at alpha {detect.SEQUENTIAL_CONFIRM_ALPHA:g}",
        f"targets: >= {TARGET_DETECT:.0%} reported on the night of a +5% step,"
        f" <= {TARGET_FALSE:.1%} false alarms per series-night",
        "",
        f"{'':50}{'interleaved':>14}{'sequential':>14}{'seq., no ctrl':>14}",
    ]
    modes = (fig.interleaved, fig.sequential, fig.sequential_no_controls)

    def row(label: str, cells: Sequence[str]) -> None:
        lines.append(f"{label:50}" + "".join(f"{c:>14}" for c in cells))

    def nights(figure: tuple[float, float]) -> str:
        return f"{_nights(figure[0], fig.nights)} / {_nights(figure[1], fig.nights)}"

    for step in steps:
        row(
            f"reported on the night a +{step:.0%} step lands",
            [f"{m.detected[step]:.1%}" for m in modes],
        )
    row("false alarms per unchanged series-night", [f"{m.false_alarm_rate:.3%}" for m in modes])
    row(
        "  reported / unchanged series-nights",
        [f"{m.false_alarms}/{m.unchanged_nights}" for m in modes],
    )
    row(
        "  of which on a machine slow-phase edge",
        [str(m.false_alarms_at_slow_phase) for m in modes],
    )
    row("  re-measurements run (all series-nights)", [str(m.confirmations) for m in modes])
    lines.append("nights to detect (gate on the step night, else change-point history):")
    for step in steps:
        row(f"  +{step:.0%}: median / p90", [nights(m.nights_to_detect[step]) for m in modes])
        row("    not found by the last night", [str(m.censored[step]) for m in modes])
        row(
            f"    no slow phase near the step ({modes[0].clear_series[step]}): med / p90",
            [nights(m.nights_to_detect_clear[step]) for m in modes],
        )
    per_night = fig.history_points / fig.history_nights if fig.history_nights else math.nan
    lines += [
        "",
        f"change points in unchanged histories: {fig.history_points} in"
        f" {fig.history_nights} series-nights ({per_night:.3%} per series-night),"
        f" {fig.history_points_at_slow_phase} of them within {HISTORY_TOLERANCE} nights of a"
        " machine slow-phase edge (a real level change of the device, not of the software)",
    ]
    if fig.trial_counts:
        lines += [
            "",
            f"trial count (interleaved gate alone, {fig.trial_counts[0].draws} draws per cell;"
            " reported = both independent stages flag):",
            f"{'trials per side':>16}{'stage +5%':>12}{'stage null':>12}"
            f"{'reported +5%':>14}{'reported null':>15}",
        ]
        for tc in fig.trial_counts:
            lines.append(
                f"{tc.trials:>16}{tc.stage_detect:>12.1%}{tc.stage_false:>12.2%}"
                f"{tc.detect:>14.1%}{tc.false_alarm:>15.3%}"
            )
        enough = [
            tc.trials
            for tc in fig.trial_counts
            if tc.detect >= TARGET_DETECT and tc.false_alarm <= TARGET_FALSE
        ]
        lines.append(
            "smallest count tried that meets both targets: "
            + (f"{min(enough)} trials per side" if enough else "none")
        )
    lines.append(f"({fig.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, simulate, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--series", type=int, default=250, help="series per scenario")
    parser.add_argument("--nights", type=int, default=60)
    parser.add_argument("--trials", type=int, default=SUITE_TRIALS, help="trials per side per run")
    parser.add_argument("--cv", type=float, default=0.03, help="per-trial coefficient of variation")
    args = parser.parse_args(argv)
    figures = simulate(
        seed=args.seed,
        series=args.series,
        nights=args.nights,
        trials=args.trials,
        cv=args.cv,
        trial_counts=sorted({FARM_NIGHTLY_TRIALS, 10, 15, 20, 25, args.trials}),
    )
    print(render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

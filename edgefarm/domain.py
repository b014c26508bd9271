"""The domain model shared by agent, coordinator and results store.

Plain dataclasses only: protobuf types stay at the gRPC boundary (see
``protos/convert.py``) and SQL rows stay inside ``results/``.
Latencies are milliseconds, sizes and memory are bytes, times are seconds.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# Qualcomm AI Hub: the backend of hosted devices, and the prefix of their device ids.
HUB_BACKEND = "qai-hub"
HUB_DEVICE_PREFIX = "qai-hub:"


class TaskStatus(StrEnum):
    """Lifecycle of one measurement task."""

    PENDING = "pending"  # waiting for a free matching agent
    ASSIGNED = "assigned"  # leased to an agent
    DONE = "done"  # an accepted successful result exists
    FAILED = "failed"  # an accepted failed result exists (or too many lost leases)
    REUSED = "reused"  # an earlier identical measurement answers it


FINISHED_TASK_STATUSES = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.REUSED})


class CampaignStatus(StrEnum):
    """Lifecycle of a campaign."""

    PREPARING = "preparing"  # converting / quantizing variants on Ray
    RUNNING = "running"  # tasks are being measured
    DONE = "done"  # every task succeeded
    FAILED = "failed"  # finished, with at least one failed task


# MeasureSettings.max_other_cpu_cores: the busy-host limit follows the host's core count.
AUTO_OTHER_CPU = -1.0


@dataclass(frozen=True)
class MeasureSettings:
    """How to measure: the farm's trial / validity scheme."""

    warmup_iterations: int = 10
    min_iterations: int = 100
    min_duration_s: float = 1.0
    max_iterations: int = 100_000
    max_duration_s: float = 60.0
    trials: int = 5  # the unit of every interval: see TrialInterval and README "Uncertainty"
    threads: int = 1
    batch_size: int = 1
    timeout_s: float = 300.0
    # Language models: prompt length for prompt-processing speed and TTFT, and the
    # context window the session is created with (generation restarts when it is full).
    prompt_tokens: int = 128
    context_tokens: int = 512
    # Whether the first trial also computes accuracy (when the task has eval data).
    evaluate: bool = True
    # Reject (and measure again) a trial during whose timed loop other processes used
    # more than this many cores on average; 0: only record the reading; AUTO_OTHER_CPU
    # (the default): a quarter of the measuring host's logical cores
    # (agent.host_activity.BUSY_SHARE).
    max_other_cpu_cores: float = AUTO_OTHER_CPU
    # Thermal guard (0: off): before a trial, wait up to cooldown_timeout_s until every
    # thermal zone is at most this many degrees C; a trial that stays hot, or whose
    # device throttled during it, is measured again and then stored invalid.
    max_start_temp_c: float = 0.0
    cooldown_timeout_s: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON and hashing); every field is a scalar, so a shallow copy
        is whole (and a fraction of asdict's cost: one per stored result)."""
        return dict(vars(self))


@dataclass(frozen=True)
class ArtifactRef:
    """A content-addressed file the agent fetches from the coordinator."""

    sha256: str
    size_bytes: int
    name: str = ""


@dataclass
class DeviceCapabilities:
    """What an agent found out about the device it runs on."""

    device_id: str  # stable identity of the physical device (several agents may share it)
    hostname: str = ""
    os: str = ""
    os_release: str = ""
    arch: str = ""
    cpu_model: str = ""
    cpu_flags: list[str] = field(default_factory=list)
    physical_cores: int = 0
    logical_cores: int = 0
    ram_bytes: int = 0
    accelerators: list[str] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)  # backend name -> version
    python_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    """One measurement handed to an agent under a lease."""

    task_id: str
    attempt: int
    lease_id: str
    campaign_id: str
    model: str
    backend: str
    scheme: str
    artifact: ArtifactRef
    eval_data: ArtifactRef | None
    settings: MeasureSettings
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LatencySummary:
    """Summary statistics of raw latency samples (milliseconds)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    stdev: float
    cv: float
    min: float
    max: float

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencySummary:
        """Summarise samples; percentiles use linear interpolation."""
        if not samples:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, nan, nan)
        ordered = sorted_samples(samples)
        if isinstance(ordered, list):
            mean = statistics.fmean(ordered)
            stdev = _stdev(ordered) if len(ordered) > 1 else 0.0
        else:  # a large array: numpy's reductions (pairwise sums) agree to ~1e-15
            mean = float(ordered.mean())
            stdev = float(ordered.std(ddof=1)) if len(ordered) > 1 else 0.0
        return cls(
            count=len(ordered),
            mean=mean,
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            stdev=stdev,
            cv=stdev / mean if mean > 0 else math.nan,
            min=float(ordered[0]),
            max=float(ordered[-1]),
        )


# Above this many samples, sorting runs in numpy, which lets go of the GIL: a result of
# millions of samples ingested on the coordinator's writer thread must not stall the
# event loop serving the fleet (Python's sorted() holds the GIL for the whole sort).
LARGE_SAMPLES = 20_000
_CHUNK = 16_384


def sorted_samples(samples: Sequence[float]) -> list[float] | NDArray[np.float64]:
    """``samples`` in ascending order: a list, or a float64 array for large inputs."""
    if len(samples) <= LARGE_SAMPLES:
        return sorted(samples)
    import numpy as np  # only for large inputs: the agent's kernel stays light

    parts = [
        np.asarray(samples[i : i + _CHUNK], dtype=np.float64)
        for i in range(0, len(samples), _CHUNK)
    ]
    ordered = np.concatenate(parts)
    ordered.sort(kind="stable")
    return ordered


def median(samples: Sequence[float]) -> float:
    """The median, as :func:`statistics.median` computes it."""
    if len(samples) <= LARGE_SAMPLES:
        return statistics.median(samples)
    ordered = sorted_samples(samples)
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (float(ordered[mid - 1]) + float(ordered[mid])) / 2


def throughput_per_s(batch_size: int, mean_ms: float) -> float:
    """Items per second at a mean latency of ``mean_ms`` per batch."""
    return batch_size * 1000.0 / mean_ms if mean_ms and mean_ms > 0 else math.nan


def percentile(ordered: Sequence[float] | NDArray[np.float64], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of an already sorted sequence."""
    if not len(ordered):
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    low, high = float(ordered[lo]), float(ordered[hi])
    return low + (high - low) * (pos - lo)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` (> 0, may be fractional) degrees of
    freedom: exact at whole ``df`` up to 30, interpolated in ``1/df`` elsewhere, never
    below the exact value: at most 0.4% above it for ``df >= 3``, 1.6% between 2 and 3
    and 19% between 1 and 2 (Welch's interval with two trials a side)."""
    if not df > 0:
        return math.nan
    if df >= len(_T975):
        return _Z975 + (_T975[-1] - _Z975) * len(_T975) / df
    if df <= 1:
        return _T975[0]
    lo = math.floor(df)
    if lo == df:
        return _T975[lo - 1]
    w = (1 / df - 1 / (lo + 1)) / (1 / lo - 1 / (lo + 1))
    return w * _T975[lo - 1] + (1 - w) * _T975[lo]


# Run-to-run noise beyond a run's own trial spread: the standard deviation (log scale) of
# one run's p50 around the configuration's typical value that its trials cannot show
# (what the host, its caches, clocks and neighbours do to a whole run). Measured on the
# 2-core development VM with benchmarks/repeat_runs.py (5 quiet fresh quickstart runs:
# 2.05%, which prints its estimate for any machine); repeat-run intervals include it.
RUN_NOISE_SD = 0.02
Z_975 = 1.959964


@dataclass(frozen=True)
class TrialInterval:
    """A 95% interval of a timing figure from its per-trial values (the trial is the unit).

    Computed on the log scale (timings are positive and their noise is multiplicative):
    with ``n`` trials whose log values have standard deviation ``s``,

    - ``mean_half`` = ``t(n-1) * s / sqrt(n)``: the confidence interval of the typical
      value (the mean log trial value) of this configuration in this run;
    - ``repeat_half``: a 95% prediction interval for the same figure of a repeat run with
      as many trials: ``sqrt((t(n-1) * s * sqrt(2/n))^2 + (1.96 * sqrt(2) * r)^2)``, the
      trial noise of both runs (the difference of two runs is ``sqrt(2)`` wider than
      one) and ``r`` (:data:`RUN_NOISE_SD`), the noise of a whole run that its own trials
      cannot show. Tables show this one (``12.3 ms ±4.1%``): it answers the question a
      reader comparing two runs asks.

    A figure ``v`` of the run lies in ``[v * exp(-half), v * exp(half)]``.
    """

    trials: int
    log_sd: float  # standard deviation of the log trial values
    mean_half: float  # log-scale half-width of the confidence interval of the mean
    repeat_half: float  # log-scale half-width of the repeat-run prediction interval

    @property
    def repeat_percent(self) -> float:
        """The repeat-run interval's upper half-width as a percentage of the figure."""
        return (math.exp(self.repeat_half) - 1.0) * 100.0

    def bounds(self, value: float, repeat: bool = True) -> tuple[float, float]:
        """``(low, high)`` around ``value`` (the repeat-run interval unless ``repeat`` is
        False, which gives the confidence interval of the mean)."""
        half = self.repeat_half if repeat else self.mean_half
        return value * math.exp(-half), value * math.exp(half)


def _logs(values: Sequence[float]) -> list[float]:
    return [math.log(v) for v in values if v is not None and math.isfinite(v) and v > 0]


def _stdev(values: Sequence[float]) -> float:
    """Sample standard deviation in plain floats, within an ulp or so of
    ``statistics.stdev`` (exact, but tens of microseconds for a handful of samples and
    milliseconds for thousands: this runs for every result stored and read)."""
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def trial_interval(
    values: Sequence[float], run_noise: float = RUN_NOISE_SD
) -> TrialInterval | None:
    """The 95% interval of a figure measured once per trial; None below 2 usable trials.
    ``run_noise``: the run-level noise the repeat-run interval adds (log-scale sd)."""
    logs = _logs(values)
    n = len(logs)
    if n < 2:
        return None
    sd = _stdev(logs)
    t = t_quantile_975(n - 1)
    within = t * sd * math.sqrt(2.0 / n)
    between = Z_975 * math.sqrt(2.0) * run_noise
    return TrialInterval(n, sd, t * sd / math.sqrt(n), math.hypot(within, between))


@dataclass(frozen=True)
class RatioInterval:
    """A 95% confidence interval of ``b / a`` from two sets of per-trial values."""

    ratio: float  # ratio of the geometric means
    low: float
    high: float

    @property
    def distinguishable(self) -> bool:
        """False when the interval contains 1 (no difference)."""
        return not self.low <= 1.0 <= self.high

    def describe(self) -> str:
        """``-3.1% .. +4.2%``: the interval as changes."""
        return f"{(self.low - 1) * 100:+.1f}% .. {(self.high - 1) * 100:+.1f}%"


def ratio_interval(a: Sequence[float], b: Sequence[float]) -> RatioInterval | None:
    """Welch's 95% interval of the ratio ``b / a`` of two configurations' per-trial
    values (on the log scale); None when either side has fewer than 2 usable trials."""
    la, lb = _logs(a), _logs(b)
    if len(la) < 2 or len(lb) < 2:
        return None
    va, vb = statistics.variance(la) / len(la), statistics.variance(lb) / len(lb)
    diff = statistics.fmean(lb) - statistics.fmean(la)
    se2 = va + vb
    if se2 <= 0:
        return RatioInterval(math.exp(diff), math.exp(diff), math.exp(diff))
    df = se2**2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
    half = t_quantile_975(df) * math.sqrt(se2)
    return RatioInterval(math.exp(diff), math.exp(diff - half), math.exp(diff + half))


@dataclass
class ServingLevel:
    """One load level of a serving trial: how requests were sent and what each did.

    A level runs at a fixed ``concurrency`` (requests in flight) or a ``rate`` (requests
    per second, ``arrival`` "constant" or "poisson"). The per-request lists hold the
    successful requests in start order (milliseconds): time to first token (any
    token-bearing delta, reasoning included), time per output token after the first,
    end-to-end latency and output tokens; ``itl_ms`` every gap between consecutive
    token-bearing deltas. ``goodput_requests``: successful requests within the SLO.
    """

    label: str  # "c=4" or "r=2/s poisson"
    concurrency: int = 0
    rate: float = 0.0
    arrival: str = ""
    requests: int = 0  # sent
    failed: int = 0
    wall_s: float = 0.0
    goodput_requests: int = 0
    slo_ttft_ms: float = 0.0
    slo_tpot_ms: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)  # requests with >= 2 tokens only
    e2e_ms: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # distinct failure reasons
    # What the server reported about the level (its /metrics around it: mean TTFT,
    # inter-token latency, queue time... in ms, token counts; names as the server's).
    server: dict[str, float] = field(default_factory=dict)

    @property
    def ok_requests(self) -> int:
        """Requests that streamed at least one token without an error."""
        return self.requests - self.failed

    def summary(self) -> dict[str, Any]:
        """The level's figures without raw samples: percentiles (linear), request and
        output-token throughput and goodput per second."""
        wall = self.wall_s if self.wall_s > 0 else math.nan
        out: dict[str, Any] = {
            "label": self.label,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "arrival": self.arrival,
            "requests": self.requests,
            "failed": self.failed,
            "wall_s": self.wall_s,
            "request_per_s": self.ok_requests / wall,
            "output_tok_per_s": sum(self.output_tokens) / wall,
            "goodput_per_s": self.goodput_requests / wall,
            "slo_ttft_ms": self.slo_ttft_ms,
            "slo_tpot_ms": self.slo_tpot_ms,
            "errors": list(self.errors),
            "server": dict(self.server),
        }
        for name in SERVING_LATENCIES:
            ordered = sorted(getattr(self, name))
            for q in (50, 90, 99):
                out[f"{name.removesuffix('_ms')}_p{q}_ms"] = percentile(ordered, q)
        return out


# The per-request latency lists of a ServingLevel, in the order tables show them.
SERVING_LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class TrialOutcome:
    """One trial: a fresh process that loaded, warmed up and measured."""

    # A list, or (results decoded on the coordinator) an array("d"): compact, and
    # freed without a walk over a million float objects.
    samples_ms: Sequence[float]
    warmup_iterations: int
    duration_s: float  # wall time of the timed loop
    load_time_s: float
    peak_rss_bytes: int
    load_rss_delta_bytes: int  # RSS increase caused by loading the model
    valid: bool
    invalid_reason: str = ""
    # Backend-specific figures of this trial, e.g. prompt_tok_per_s, ttft_ms.
    metrics: dict[str, float] = field(default_factory=dict)
    # Serving trials only: the load levels, in the order run (the samples are then the
    # time per output token of the first level's requests).
    serving: list[ServingLevel] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialOutcome:
        """A trial from its :func:`dataclasses.asdict` form (a trial child's JSON)."""
        fields = dict(data)
        fields["serving"] = [ServingLevel(**level) for level in fields.get("serving") or []]
        return cls(**fields)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the samples as packed doubles: one quick copy instead of a walk over
        a million float objects (the coordinator hands results to its ingestion
        process this way, and a long pickle would hold the GIL of its event loop)."""
        fields = {k: v for k, v in self.__dict__.items() if k != "samples_ms"}
        samples = self.samples_ms
        packed = samples if isinstance(samples, array) else array("d", samples)
        return (_unpickle_trial, (packed.tobytes(), fields))


def _unpickle_trial(packed: bytes, fields: dict[str, Any]) -> TrialOutcome:
    samples = array("d")
    samples.frombytes(packed)
    return TrialOutcome(samples_ms=samples.tolist(), **fields)


# TaskAbandoned.reason of an assignment a stopping agent hands back without starting it:
# such an attempt does not count against the task's attempts.
DRAINING_REASON = "agent draining"


@dataclass
class MeasurementResult:
    """What an agent reports for one task attempt."""

    task_id: str
    attempt: int
    lease_id: str
    agent_id: str
    device_id: str
    ok: bool
    error_kind: str = ""
    error_message: str = ""
    backend_version: str = ""
    batch_size: int = 1
    trials: list[TrialOutcome] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    model_size_bytes: int = 0
    environment: dict[str, str] = field(default_factory=dict)
    # Per-example correctness on the eval set (1 = top-1 correct), in eval-set order.
    example_outcomes: list[int] = field(default_factory=list)
    # When the agent started and ended measuring (unix seconds, agent clock; 0: unknown).
    measure_started_at: float = 0.0
    measure_ended_at: float = 0.0

    @property
    def samples_ms(self) -> list[float]:
        """All per-iteration samples of all trials, in order."""
        return [s for t in self.trials for s in t.samples_ms]

    @property
    def latency(self) -> LatencySummary:
        """Summary over every trial's samples."""
        return LatencySummary.from_samples(self.samples_ms)

    @property
    def trial_medians_ms(self) -> list[float]:
        """Median latency of each trial: the statistical unit for comparisons."""
        return [median(t.samples_ms) for t in self.trials if t.samples_ms]

    @property
    def valid(self) -> bool:
        """True when the task succeeded and every trial met its minimums."""
        return self.ok and bool(self.trials) and all(t.valid for t in self.trials)

    @property
    def invalid_reason(self) -> str:
        """Why the result is not valid ('' when it is)."""
        if not self.ok:
            return f"{self.error_kind}: {self.error_message}"
        if not self.trials:
            return "no trials"
        return "; ".join(t.invalid_reason for t in self.trials if not t.valid)

    @property
    def throughput_per_s(self) -> float:
        """Items per second at the mean latency."""
        return throughput_per_s(self.batch_size, self.latency.mean)

    @property
    def peak_rss_bytes(self) -> int:
        """Highest peak RSS over the trials."""
        return max((t.peak_rss_bytes for t in self.trials), default=0)

    @property
    def load_time_s(self) -> float:
        """Median load time over the trials."""
        times = [t.load_time_s for t in self.trials]
        return statistics.median(times) if times else math.nan

    @property
    def metrics(self) -> dict[str, float]:
        """Median of each backend-specific metric over the trials that report it."""
        keys = sorted({k for t in self.trials for k in t.metrics})
        return {
            k: statistics.median([t.metrics[k] for t in self.trials if k in t.metrics])
            for k in keys
        }

    @property
    def load_rss_delta_bytes(self) -> int:
        """Median RSS increase caused by loading the model."""
        deltas = [t.load_rss_delta_bytes for t in self.trials]
        return int(statistics.median(deltas)) if deltas else 0

"""The domain model shared by agent, coordinator and results store.

Plain dataclasses only: protobuf types stay at the gRPC boundary (see
``protos/convert.py``) and SQL rows stay inside ``results/``.
Latencies are milliseconds, sizes and memory are bytes, times are seconds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

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


@dataclass(frozen=True)
class MeasureSettings:
    """How to measure: the farm's trial / validity scheme."""

    warmup_iterations: int = 10
    min_iterations: int = 100
    min_duration_s: float = 1.0
    max_iterations: int = 100_000
    max_duration_s: float = 60.0
    trials: int = 3
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
    # more than this many cores on average; 0: only record the reading.
    max_other_cpu_cores: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON and hashing)."""
        return asdict(self)


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
    def from_samples(cls, samples: list[float]) -> LatencySummary:
        """Summarise samples; percentiles use linear interpolation."""
        if not samples:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, nan, nan)
        ordered = sorted(samples)
        mean = statistics.fmean(ordered)
        stdev = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
        return cls(
            count=len(ordered),
            mean=mean,
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            stdev=stdev,
            cv=stdev / mean if mean > 0 else math.nan,
            min=ordered[0],
            max=ordered[-1],
        )


def percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of an already sorted list."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class TrialOutcome:
    """One trial: a fresh process that loaded, warmed up and measured."""

    samples_ms: list[float]
    warmup_iterations: int
    duration_s: float  # wall time of the timed loop
    load_time_s: float
    peak_rss_bytes: int
    load_rss_delta_bytes: int  # RSS increase caused by loading the model
    valid: bool
    invalid_reason: str = ""
    # Backend-specific figures of this trial, e.g. prompt_tok_per_s, ttft_ms.
    metrics: dict[str, float] = field(default_factory=dict)


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
        return [statistics.median(t.samples_ms) for t in self.trials if t.samples_ms]

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
        mean = self.latency.mean
        return self.batch_size * 1000.0 / mean if mean and mean > 0 else math.nan

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

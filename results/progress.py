"""A running campaign's progress: an ETA from the measured durations of its attempts."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgefarm.domain import TaskStatus
from results.records import AttemptRecord, TaskRecord

# Attempts that ran to an accepted result: their durations are what a task takes.
MEASURED_OUTCOMES: frozenset[str] = frozenset({"result", "failed"})
REMAINING_STATUSES: frozenset[TaskStatus] = frozenset({TaskStatus.PENDING, TaskStatus.ASSIGNED})


@dataclass(frozen=True)
class Eta:
    """Seconds left, and what the estimate is made of."""

    seconds: float
    median_task_s: float  # median duration of the measured attempts
    measured: int  # how many attempts the median is over
    remaining: int  # tasks not finished yet
    devices: int  # distinct devices those tasks wait for


def estimate_eta(tasks: Sequence[TaskRecord], attempts: Iterable[AttemptRecord]) -> Eta | None:
    """The time left for ``tasks``: the median duration of the finished attempts
    (outcome result / failed, start and end known) times the remaining (pending or
    assigned) tasks, divided by the number of distinct devices they wait for (devices
    measure in parallel, each one task at a time). None when no attempt finished yet."""
    durations = [
        d for a in attempts if a.outcome in MEASURED_OUTCOMES and (d := a.duration_s) is not None
    ]
    if not durations:
        return None
    median = statistics.median(durations)
    remaining = [t for t in tasks if t.status in REMAINING_STATUSES]
    devices = len({t.device_id for t in remaining})
    seconds = median * len(remaining) / devices if devices else 0.0
    return Eta(seconds, median, len(durations), len(remaining), devices)


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``12.3s``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def describe_eta(eta: Eta | None) -> str:
    """One line for a running campaign's ETA (``ETA unknown`` before any measurement)."""
    if eta is None:
        return "ETA unknown (no task finished yet)"
    if not eta.remaining:
        return "ETA: no task left"
    return (
        f"ETA {format_duration(eta.seconds)} ({eta.remaining} tasks left on "
        f"{eta.devices} device{'s' if eta.devices != 1 else ''}, median task "
        f"{format_duration(eta.median_task_s)} over {eta.measured} measured)"
    )

"""Conversion between domain records and table rows (plain dicts; no SQL here).

JSON columns hold Python objects here: :class:`results.schema.JSONText` encodes them.

A results row is built from the task it answers and the agent's
:class:`~edgefarm.domain.MeasurementResult`. Its ``trials_detail`` column is a list with
one dict per trial, *without* the samples (they are all in ``samples_ms``, in trial
order); each dict has ``iterations`` (its sample count, so ``samples_ms`` can be split
back into trials), ``median_ms``, ``warmup_iterations``, ``duration_s``, ``load_time_s``,
``peak_rss_bytes``, ``load_rss_delta_bytes``, ``valid`` and ``invalid_reason``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from edgefarm.domain import (
    SERVING_LATENCIES,
    CampaignStatus,
    MeasurementResult,
    MeasureSettings,
    ServingLevel,
    TaskStatus,
    TrialInterval,
    TrialOutcome,
    median,
    throughput_per_s,
    trial_interval,
)
from edgefarm.errors import StoreError
from results.records import (
    ATTEMPT_OUTCOMES,
    ArtifactRecord,
    AttemptRecord,
    CampaignRecord,
    DeviceSeen,
    NightlyRun,
    TaskRecord,
)
from results.regression.types import Sample, SeriesKey

TASK_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(TaskRecord))
CAMPAIGN_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(CampaignRecord))

R = TypeVar("R", ArtifactRecord, AttemptRecord, DeviceSeen, NightlyRun)

# A database row as read (SQLAlchemy's RowMapping is keyed by names or columns).
RowLike = Mapping[Any, Any]


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def settings_from_dict(data: Mapping[str, Any] | None) -> MeasureSettings:
    """Rebuild settings, ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(MeasureSettings)}
    return MeasureSettings(**{k: v for k, v in (data or {}).items() if k in known})


# ---------------------------------------------------------------------------- campaigns


def campaign_to_row(c: CampaignRecord) -> dict[str, Any]:
    """Row values for a campaign."""
    row = dataclasses.asdict(c)
    row["status"] = CampaignStatus(c.status).value
    return row


def campaign_fields_to_values(fields: Mapping[str, object]) -> dict[str, Any]:
    """Column values for a partial campaign update; ValueError on an unknown field."""
    unknown = set(fields) - CAMPAIGN_FIELDS
    if unknown:
        raise ValueError(f"not CampaignRecord fields: {', '.join(sorted(unknown))}")
    values = dict(fields)
    if "status" in values:
        values["status"] = CampaignStatus(str(values["status"])).value
    return values


_S = TypeVar("_S", CampaignStatus, TaskStatus)


def _status(cls: type[_S], row: RowLike, table: str, row_id: str) -> _S:
    """The row's status as ``cls``; StoreError (one line) for one this version does not
    know (a damaged store, or one written by a newer edgefarm)."""
    try:
        return cls(row["status"])
    except ValueError:
        raise StoreError(f"{table} {row_id}: unknown status {row['status']!r}") from None


def row_to_campaign(row: RowLike) -> CampaignRecord:
    """A campaign record from its row."""
    return CampaignRecord(
        campaign_id=row["campaign_id"],
        name=row["name"],
        spec_yaml=row["spec_yaml"],
        status=_status(CampaignStatus, row, "campaigns", row["campaign_id"]),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        conversions_run=row["conversions_run"],
        conversions_cached=row["conversions_cached"],
        submission_id=row.get("submission_id"),
        plan=row.get("plan") or {},
        error=row.get("error") or "",
    )


# -------------------------------------------------------------------------------- tasks


def task_to_row(t: TaskRecord, now: float) -> dict[str, Any]:
    """Row values for a new task; zero ``created_at`` / ``updated_at`` become ``now``."""
    row = task_fields_to_values(
        {f.name: getattr(t, f.name) for f in dataclasses.fields(TaskRecord)}
    )
    row["created_at"] = t.created_at or now
    row["updated_at"] = t.updated_at or row["created_at"]
    return row


def task_fields_to_values(fields: Mapping[str, object]) -> dict[str, Any]:
    """Column values for (some) TaskRecord fields; ValueError on an unknown field."""
    unknown = set(fields) - TASK_FIELDS
    if unknown:
        raise ValueError(f"not TaskRecord fields: {', '.join(sorted(unknown))}")
    values = dict(fields)
    if "settings" in values:
        settings = values["settings"]
        values["settings"] = (
            settings.to_dict() if isinstance(settings, MeasureSettings) else settings
        )
    if "status" in values:
        values["status"] = TaskStatus(str(values["status"])).value
    for key in ("options", "selector"):
        if key in values and values[key] is None:
            values[key] = {}
    return values


def row_to_task(row: RowLike) -> TaskRecord:
    """A task record from its row."""
    return TaskRecord(
        task_id=row["task_id"],
        campaign_id=row["campaign_id"],
        model=row["model"],
        backend=row["backend"],
        scheme=row["scheme"],
        device_id=row["device_id"],
        device_name=row["device_name"],
        artifact_sha256=row["artifact_sha256"],
        artifact_size=row["artifact_size"],
        artifact_name=row["artifact_name"],
        eval_sha256=row["eval_sha256"],
        eval_size=row["eval_size"],
        settings=settings_from_dict(row["settings"]),
        options=dict(row["options"] or {}),
        selector=dict(row["selector"] or {}),
        measure_key=row["measure_key"],
        role=row["role"],
        block=row["block"],
        status=_status(TaskStatus, row, "tasks", row["task_id"]),
        attempt=row["attempt"],
        lease_id=row["lease_id"],
        agent_id=row["agent_id"],
        lease_expires_at=row["lease_expires_at"],
        result_id=row["result_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# ------------------------------------------------------------------------------ results


def trial_detail(t: TrialOutcome) -> dict[str, Any]:
    """One ``trials_detail`` entry: a trial without its samples."""
    return {
        "iterations": len(t.samples_ms),
        "median_ms": finite_or_none(median(t.samples_ms)) if t.samples_ms else None,
        "warmup_iterations": t.warmup_iterations,
        "duration_s": finite_or_none(t.duration_s),
        "load_time_s": finite_or_none(t.load_time_s),
        "peak_rss_bytes": t.peak_rss_bytes,
        "load_rss_delta_bytes": t.load_rss_delta_bytes,
        "valid": t.valid,
        "invalid_reason": t.invalid_reason,
        "metrics": dict(t.metrics),
        **({"serving": [level.summary() for level in t.serving]} if t.serving else {}),
    }


def serving_levels(trials: Sequence[TrialOutcome]) -> list[dict[str, Any]] | None:
    """A serving result's ``serving`` column: per level (matched by label over the
    trials), the figures of every trial's requests pooled (:meth:`ServingLevel.summary`,
    throughput from the summed wall time; the server's own figures: medians over the
    trials), the trial count and the raw samples; None for a result without levels."""
    by_label: dict[str, list[ServingLevel]] = {}
    for trial in trials:
        for level in trial.serving:
            by_label.setdefault(level.label, []).append(level)
    if not by_label:
        return None
    out = []
    for label, levels in by_label.items():
        first = levels[0]
        pooled = ServingLevel(
            label=label,
            concurrency=first.concurrency,
            rate=first.rate,
            arrival=first.arrival,
            requests=sum(v.requests for v in levels),
            failed=sum(v.failed for v in levels),
            wall_s=sum(v.wall_s for v in levels),
            goodput_requests=sum(v.goodput_requests for v in levels),
            slo_ttft_ms=first.slo_ttft_ms,
            slo_tpot_ms=first.slo_tpot_ms,
            errors=sorted({e for v in levels for e in v.errors}),
            server={
                key: median([v.server[key] for v in levels if key in v.server])
                for key in sorted({k for v in levels for k in v.server})
            },
            **{name: [x for v in levels for x in getattr(v, name)] for name in _LISTS},
        )
        summary = pooled.summary()
        summary["trials"] = len(levels)
        summary["samples"] = {name: getattr(pooled, name) for name in _LISTS}
        out.append(summary)
    return out


_LISTS = (*SERVING_LATENCIES, "output_tokens")


def _task_columns(task: TaskRecord) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "campaign_id": task.campaign_id,
        "model": task.model,
        "backend": task.backend,
        "scheme": task.scheme,
        "artifact_sha256": task.artifact_sha256,
        "eval_sha256": task.eval_sha256,
        "measure_key": task.measure_key,
        "role": task.role,
        "block": task.block,
        "settings": task.settings.to_dict(),
    }


def result_to_row(
    task: TaskRecord, result: MeasurementResult, device_name: str, now: float
) -> dict[str, Any]:
    """The results row for an agent's result of ``task`` (without ``result_id``)."""
    lat = result.latency
    return {
        **_task_columns(task),
        "attempt": result.attempt,
        "backend_version": result.backend_version,
        "device_id": result.device_id or task.device_id,
        "device_name": device_name,
        "agent_id": result.agent_id,
        "ok": result.ok,
        "valid": result.valid,
        "invalid_reason": result.invalid_reason,
        "error_kind": result.error_kind,
        "error_message": result.error_message,
        "trials": len(result.trials),
        "samples_ms": result.samples_ms,
        "trial_medians_ms": result.trial_medians_ms,
        "lat_mean_ms": lat.mean,
        "lat_p50_ms": lat.p50,
        "lat_p90_ms": lat.p90,
        "lat_p99_ms": lat.p99,
        "lat_stdev_ms": lat.stdev,
        "lat_cv": lat.cv,
        "lat_min_ms": lat.min,
        "lat_max_ms": lat.max,
        "throughput_per_s": throughput_per_s(result.batch_size, lat.mean),
        "batch_size": result.batch_size,
        "peak_rss_bytes": result.peak_rss_bytes,
        "load_rss_delta_bytes": result.load_rss_delta_bytes,
        "load_time_s": result.load_time_s,
        "model_size_bytes": result.model_size_bytes,
        "accuracy": dict(result.accuracy),
        "metrics": result.metrics,
        "environment": dict(result.environment),
        "trials_detail": [trial_detail(t) for t in result.trials],
        "example_outcomes": list(result.example_outcomes) or None,
        "serving": serving_levels(result.trials),
        "measure_started_at": finite_or_none(result.measure_started_at) or None,
        "measure_ended_at": finite_or_none(result.measure_ended_at) or None,
        "created_at": now,
    }


def failure_to_row(task: TaskRecord, kind: str, message: str, now: float) -> dict[str, Any]:
    """A failed results row for ``task`` at its current attempt, with no measurement."""
    failed = MeasurementResult(
        task_id=task.task_id,
        attempt=task.attempt,
        lease_id=task.lease_id or "",
        agent_id=task.agent_id or "",
        device_id=task.device_id,
        ok=False,
        error_kind=kind,
        error_message=message,
        batch_size=task.settings.batch_size,
    )
    return result_to_row(task, failed, task.device_name, now)


# Derived from the stored per-trial medians when a row is read (so old rows have them):
# the 95% confidence interval of the typical p50, and the 95% interval for a repeat
# run's p50 (what tables show); both None below two trials. See TrialInterval.
INTERVAL_KEYS = (
    "lat_p50_ci95_low_ms",
    "lat_p50_ci95_high_ms",
    "lat_p50_repeat95_low_ms",
    "lat_p50_repeat95_high_ms",
)


def p50_interval(row: Mapping[str, Any]) -> TrialInterval | None:
    """The interval of a row's p50 latency from its per-trial medians (None: < 2 trials)."""
    if row.get("lat_p50_ms") is None:
        return None
    return trial_interval([float(v) for v in row.get("trial_medians_ms") or [] if v is not None])


def interval_columns(row: Mapping[str, Any]) -> dict[str, float | None]:
    """The :data:`INTERVAL_KEYS` of a row (None where there is no interval)."""
    interval = p50_interval(row)
    p50 = finite_or_none(row.get("lat_p50_ms"))
    if interval is None or p50 is None:
        return dict.fromkeys(INTERVAL_KEYS)
    ci, repeat = interval.bounds(p50, repeat=False), interval.bounds(p50)
    return dict(zip(INTERVAL_KEYS, (*ci, *repeat), strict=True))


def decode_result_row(row: RowLike) -> dict[str, Any]:
    """A results row as a plain dict (JSON already decoded by the column types), with
    the derived :data:`INTERVAL_KEYS`."""
    out = dict(row)
    out["ok"] = bool(out["ok"])
    out["valid"] = bool(out["valid"])
    out.update(interval_columns(out))
    return out


# ---------------------------------------------------------------------------- artifacts


def artifact_to_row(a: ArtifactRecord) -> dict[str, Any]:
    """Row values for an artifact."""
    return dataclasses.asdict(a)


def row_to_artifact(row: RowLike) -> ArtifactRecord:
    """An artifact record from its row."""
    return _record_from_row(ArtifactRecord, row, "provenance")


# ------------------------------------------------------------------------------ devices


def device_to_row(d: DeviceSeen) -> dict[str, Any]:
    """Row values for a device sighting."""
    return dataclasses.asdict(d)


def row_to_device(row: RowLike) -> DeviceSeen:
    """A device sighting from its row."""
    return _record_from_row(DeviceSeen, row, "capabilities", "labels")


# ----------------------------------------------------------------------------- attempts


def check_outcome(outcome: str) -> str:
    """``outcome`` if it is one of ATTEMPT_OUTCOMES; ValueError otherwise."""
    if outcome not in ATTEMPT_OUTCOMES:
        raise ValueError(
            f"unknown attempt outcome {outcome!r} (one of {', '.join(sorted(ATTEMPT_OUTCOMES))})"
        )
    return outcome


def attempt_to_row(a: AttemptRecord) -> dict[str, Any]:
    """Row values for an attempt (ValueError for an unknown outcome)."""
    row = dataclasses.asdict(a)
    row["outcome"] = check_outcome(a.outcome)
    row["started_at"] = finite_or_none(a.started_at) or 0.0
    row["ended_at"] = finite_or_none(a.ended_at)
    return row


def row_to_attempt(row: RowLike) -> AttemptRecord:
    """An attempt from its row."""
    return _record_from_row(AttemptRecord, row)


# ------------------------------------------------------------------------------ nightly


def nightly_to_row(n: NightlyRun) -> dict[str, Any]:
    """Row values for a nightly run."""
    return dataclasses.asdict(n)


def row_to_nightly(row: RowLike) -> NightlyRun:
    """A nightly run from its row."""
    return _record_from_row(NightlyRun, row, "summary")


def _record_from_row(cls: type[R], row: RowLike, *json_fields: str) -> R:
    """A record whose fields are its row's columns of the same names; each of
    ``json_fields`` as a dict (``{}`` for NULL)."""
    values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
    for name in json_fields:
        values[name] = dict(values[name] or {})
    return cls(**values)


# ------------------------------------------------------------------------ series nights


def series_fingerprint(key: SeriesKey) -> int:
    """A stable signed 64-bit fingerprint of a series key (``series_nights.series``):
    the history query reads numbers, never the key's strings."""
    text = "\x1f".join((key.model, key.backend, key.scheme, key.device_id, key.metric))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


SERIES_NIGHT_COLUMNS = (
    "run_id",
    "model",
    "backend",
    "scheme",
    "device_id",
    "metric",
    "suite",
    "series",
    "at",
    "value",
    "trials",
    "outcomes",
    "method",
)
_OUTCOME_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_OUTCOME_BITS = bytes.maketrans(b"01", b"\x00\x01")


def series_night_rows(suite: str, samples: Mapping[SeriesKey, Sample]) -> list[tuple[Any, ...]]:
    """``series_nights`` rows (tuples in :data:`SERIES_NIGHT_COLUMNS` order) for one
    night's samples, one per series key."""
    return [
        (
            s.run_id,
            key.model,
            key.backend,
            key.scheme,
            key.device_id,
            key.metric,
            suite,
            series_fingerprint(key),
            float(s.at),
            float(s.value),
            struct.pack(f"<{len(s.trials)}d", *s.trials),
            bytes(map(bool, s.outcomes)).translate(_OUTCOME_DIGITS).decode("ascii"),
            s.method,
        )
        for key, s in samples.items()
    ]


def series_value_arrays(pairs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Fingerprint and value arrays of ``series_nights`` (series, value) pairs, and how
    many pairs were left out for not being an integer and a finite number."""
    try:
        found = np.array(pairs, dtype=[("series", "<i8"), ("value", "<f8")])
        if found.shape == (len(pairs),) and np.all(np.isfinite(found["value"])):
            return found["series"], found["value"], 0
    except (TypeError, ValueError, OverflowError):
        pass
    kept = [
        (p, float(v))
        for p, v in pairs
        if isinstance(p, int) and isinstance(v, int | float) and math.isfinite(v)
    ]
    series = np.array([p for p, _ in kept], dtype=np.int64)
    values = np.array([v for _, v in kept], dtype=np.float64)
    return series, values, len(pairs) - len(kept)


def series_night_pack(run_id: str, series: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """The ``series_night_packs`` row of a night: its fingerprints (ascending) and
    values as little-endian int64 / float64 bytes."""
    order = np.argsort(series, kind="stable")
    return {
        "run_id": run_id,
        "series_count": len(series),
        "series": series[order].astype("<i8").tobytes(),
        "night_values": values[order].astype("<f8").tobytes(),
    }


def series_night_unpack(row: RowLike) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprints and values of a ``series_night_packs`` row; ValueError (one line)
    for a pack whose sizes disagree, whose fingerprints are not ascending or whose
    values are not all finite."""
    count, series, values = row["series_count"], row["series"], row["night_values"]
    if (
        not isinstance(count, int)
        or not isinstance(series, bytes)
        or not isinstance(values, bytes)
        or len(series) != 8 * count
        or len(values) != 8 * count
    ):
        raise ValueError(f"series_night_packs {row['run_id']}: sizes do not match its count")
    prints = np.frombuffer(series, dtype="<i8").astype(np.int64)
    numbers = np.frombuffer(values, dtype="<f8").astype(np.float64)
    if np.any(prints[1:] < prints[:-1]) or not np.all(np.isfinite(numbers)):
        raise ValueError(f"series_night_packs {row['run_id']}: unordered or non-finite")
    return prints, numbers


def series_night_from_row(row: RowLike) -> tuple[SeriesKey, Sample]:
    """The series key and Sample of a ``series_nights`` row; ValueError (one line) for a
    row that cannot be one (non-finite value, trials that are not float64s, outcomes
    that are not 0/1)."""
    key = SeriesKey(row["model"], row["backend"], row["scheme"], row["device_id"], row["metric"])
    value, at, raw = row["value"], row["at"], row["trials"]
    outcomes = row["outcomes"] or ""
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"series_nights {row['run_id']} {key.label()}: value {value!r}")
    if not isinstance(at, int | float) or not isinstance(raw, bytes) or len(raw) % 8:
        raise ValueError(f"series_nights {row['run_id']} {key.label()}: bad time or trials")
    if not isinstance(outcomes, str) or outcomes.strip("01"):
        raise ValueError(f"series_nights {row['run_id']} {key.label()}: bad outcomes")
    sample = Sample(
        run_id=str(row["run_id"]),
        at=float(at),
        value=float(value),
        trials=struct.unpack(f"<{len(raw) // 8}d", raw),
        outcomes=tuple(outcomes.encode("ascii").translate(_OUTCOME_BITS)),
        method=str(row["method"] or ""),
    )
    return key, sample

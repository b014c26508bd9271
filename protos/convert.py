"""The one place where protobuf messages and domain objects meet.

Everything beyond the gRPC servicers and clients works with ``edgefarm.domain``
dataclasses; these functions translate in both directions.
"""

from __future__ import annotations

from array import array
from typing import Any

from edgefarm.domain import (
    ArtifactRef,
    Assignment,
    DeviceCapabilities,
    MeasurementResult,
    MeasureSettings,
    ServingLevel,
    TrialOutcome,
)
from protos.edgefarm.v1 import agent_pb2, common_pb2


def capabilities_to_pb(c: DeviceCapabilities) -> common_pb2.DeviceCapabilities:
    """Domain capabilities -> wire."""
    return common_pb2.DeviceCapabilities(
        device_id=c.device_id,
        hostname=c.hostname,
        os=c.os,
        os_release=c.os_release,
        arch=c.arch,
        cpu_model=c.cpu_model,
        cpu_flags=list(c.cpu_flags),
        physical_cores=c.physical_cores,
        logical_cores=c.logical_cores,
        ram_bytes=c.ram_bytes,
        accelerators=list(c.accelerators),
        backends=dict(c.backends),
        python_version=c.python_version,
        extra=dict(c.extra),
    )


def capabilities_from_pb(m: common_pb2.DeviceCapabilities) -> DeviceCapabilities:
    """Wire capabilities -> domain."""
    return DeviceCapabilities(
        device_id=m.device_id,
        hostname=m.hostname,
        os=m.os,
        os_release=m.os_release,
        arch=m.arch,
        cpu_model=m.cpu_model,
        cpu_flags=list(m.cpu_flags),
        physical_cores=m.physical_cores,
        logical_cores=m.logical_cores,
        ram_bytes=m.ram_bytes,
        accelerators=list(m.accelerators),
        backends=dict(m.backends),
        python_version=m.python_version,
        extra=dict(m.extra),
    )


def settings_to_pb(s: MeasureSettings) -> common_pb2.MeasureSettings:
    """Domain measure settings -> wire."""
    values = s.to_dict()
    evaluate = values.pop("evaluate")
    return common_pb2.MeasureSettings(**values, skip_evaluation=not evaluate)


def settings_from_pb(m: common_pb2.MeasureSettings) -> MeasureSettings:
    """Wire measure settings -> domain."""
    return MeasureSettings(
        warmup_iterations=m.warmup_iterations,
        min_iterations=m.min_iterations,
        min_duration_s=m.min_duration_s,
        max_iterations=m.max_iterations,
        max_duration_s=m.max_duration_s,
        trials=m.trials,
        threads=m.threads,
        batch_size=m.batch_size,
        timeout_s=m.timeout_s,
        prompt_tokens=m.prompt_tokens,
        context_tokens=m.context_tokens,
        evaluate=not m.skip_evaluation,
        max_other_cpu_cores=m.max_other_cpu_cores,
        max_start_temp_c=m.max_start_temp_c,
        cooldown_timeout_s=m.cooldown_timeout_s,
    )


def artifact_to_pb(a: ArtifactRef) -> common_pb2.ArtifactRef:
    """Domain artifact reference -> wire."""
    return common_pb2.ArtifactRef(sha256=a.sha256, size_bytes=a.size_bytes, name=a.name)


def artifact_from_pb(m: common_pb2.ArtifactRef) -> ArtifactRef:
    """Wire artifact reference -> domain."""
    return ArtifactRef(sha256=m.sha256, size_bytes=m.size_bytes, name=m.name)


def assignment_to_pb(a: Assignment, lease_expires_unix: float) -> agent_pb2.TaskAssignment:
    """Domain assignment -> wire."""
    msg = agent_pb2.TaskAssignment(
        task_id=a.task_id,
        attempt=a.attempt,
        lease_id=a.lease_id,
        lease_expires_unix=lease_expires_unix,
        campaign_id=a.campaign_id,
        model=a.model,
        backend=a.backend,
        scheme=a.scheme,
        artifact=artifact_to_pb(a.artifact),
        settings=settings_to_pb(a.settings),
        options=dict(a.options),
    )
    if a.eval_data is not None:
        msg.eval_data.CopyFrom(artifact_to_pb(a.eval_data))
    return msg


def assignment_from_pb(m: agent_pb2.TaskAssignment) -> Assignment:
    """Wire assignment -> domain."""
    return Assignment(
        task_id=m.task_id,
        attempt=m.attempt,
        lease_id=m.lease_id,
        campaign_id=m.campaign_id,
        model=m.model,
        backend=m.backend,
        scheme=m.scheme,
        artifact=artifact_from_pb(m.artifact),
        eval_data=artifact_from_pb(m.eval_data) if m.HasField("eval_data") else None,
        settings=settings_from_pb(m.settings),
        options=dict(m.options),
    )


_LEVEL_FIELDS = (
    "label", "concurrency", "rate", "arrival", "requests", "failed", "wall_s",
    "goodput_requests", "slo_ttft_ms", "slo_tpot_ms",
)  # fmt: skip
_LEVEL_LISTS = ("ttft_ms", "tpot_ms", "e2e_ms", "output_tokens", "itl_ms", "errors")


def serving_level_to_pb(level: ServingLevel) -> common_pb2.ServingLevel:
    """Domain serving level -> wire."""
    return common_pb2.ServingLevel(
        **{name: getattr(level, name) for name in _LEVEL_FIELDS + _LEVEL_LISTS},
        server=dict(level.server),
    )


def serving_level_from_pb(m: common_pb2.ServingLevel) -> ServingLevel:
    """Wire serving level -> domain."""
    fields: dict[str, Any] = {name: getattr(m, name) for name in _LEVEL_FIELDS}
    fields.update({name: list(getattr(m, name)) for name in _LEVEL_LISTS})
    return ServingLevel(**fields, server=dict(m.server))


def result_to_pb(r: MeasurementResult) -> common_pb2.TaskResult:
    """Domain result -> wire (agent and device ids travel with the session)."""
    return common_pb2.TaskResult(
        task_id=r.task_id,
        attempt=r.attempt,
        lease_id=r.lease_id,
        ok=r.ok,
        error_kind=r.error_kind,
        error_message=r.error_message,
        backend_version=r.backend_version,
        batch_size=r.batch_size,
        trials=[
            common_pb2.Trial(
                samples_ms=t.samples_ms,
                warmup_iterations=t.warmup_iterations,
                duration_s=t.duration_s,
                load_time_s=t.load_time_s,
                peak_rss_bytes=t.peak_rss_bytes,
                load_rss_delta_bytes=t.load_rss_delta_bytes,
                valid=t.valid,
                invalid_reason=t.invalid_reason,
                metrics=dict(t.metrics),
                serving=[serving_level_to_pb(level) for level in t.serving],
            )
            for t in r.trials
        ],
        accuracy=dict(r.accuracy),
        model_size_bytes=r.model_size_bytes,
        environment=dict(r.environment),
        example_outcomes=bytes(r.example_outcomes),
        measure_started_at=r.measure_started_at,
        measure_ended_at=r.measure_ended_at,
    )


def result_from_pb(m: common_pb2.TaskResult, agent_id: str, device_id: str) -> MeasurementResult:
    """Wire result -> domain, stamped with the session's agent and device."""
    return MeasurementResult(
        task_id=m.task_id,
        attempt=m.attempt,
        lease_id=m.lease_id,
        agent_id=agent_id,
        device_id=device_id,
        ok=m.ok,
        error_kind=m.error_kind,
        error_message=m.error_message,
        backend_version=m.backend_version,
        batch_size=m.batch_size or 1,
        trials=[
            TrialOutcome(
                samples_ms=array("d", t.samples_ms),
                warmup_iterations=t.warmup_iterations,
                duration_s=t.duration_s,
                load_time_s=t.load_time_s,
                peak_rss_bytes=t.peak_rss_bytes,
                load_rss_delta_bytes=t.load_rss_delta_bytes,
                valid=t.valid,
                invalid_reason=t.invalid_reason,
                metrics=dict(t.metrics),
                serving=[serving_level_from_pb(level) for level in t.serving],
            )
            for t in m.trials
        ],
        accuracy=dict(m.accuracy),
        model_size_bytes=m.model_size_bytes,
        environment=dict(m.environment),
        example_outcomes=list(m.example_outcomes),
        measure_started_at=m.measure_started_at,
        measure_ended_at=m.measure_ended_at,
    )

"""Test doubles shared by the scheduler's unit tests: a fake clock, agent capabilities,
tasks and results (no sockets, no Ray)."""

from __future__ import annotations

from coordinator.scheduler import AssignMessage
from edgefarm.domain import DeviceCapabilities, MeasurementResult, MeasureSettings, TrialOutcome
from results.records import TaskRecord


class Clock:
    """A clock the test moves by hand (``clock.now += seconds``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def caps(device_id: str, backends: dict[str, str] | None = None) -> DeviceCapabilities:
    """An agent's capabilities on ``device_id`` (the noop backend by default)."""
    return DeviceCapabilities(
        device_id=device_id,
        hostname=device_id,
        os="Linux",
        arch="x86_64",
        logical_cores=2,
        backends=backends if backends is not None else {"noop": "0"},
    )


def task(
    i: int,
    device_id: str = "dev-a",
    backend: str = "noop",
    selector: dict[str, str] | None = None,
    model: str = "m",
) -> TaskRecord:
    """Task ``t{i}`` of campaign ``c1``."""
    return TaskRecord(
        task_id=f"t{i}",
        campaign_id="c1",
        model=model,
        backend=backend,
        scheme="none",
        device_id=device_id,
        device_name=device_id,
        artifact_sha256="a" * 64,
        artifact_size=1,
        artifact_name="m.onnx",
        eval_sha256=None,
        eval_size=0,
        settings=MeasureSettings(),
        selector=selector or {},
        measure_key=f"k{i}",
        created_at=float(i),
    )


def valid_trial() -> TrialOutcome:
    """One valid trial of two samples."""
    return TrialOutcome(
        samples_ms=[1.0, 1.1],
        warmup_iterations=1,
        duration_s=0.1,
        load_time_s=0.01,
        peak_rss_bytes=10,
        load_rss_delta_bytes=1,
        valid=True,
    )


def result_for(
    message: AssignMessage, agent_id: str, device_id: str = "dev-a", ok: bool = True
) -> MeasurementResult:
    """The result an agent sends for an assignment (one valid trial, or a failure)."""
    x = message.assignment
    trial = valid_trial()
    return MeasurementResult(
        task_id=x.task_id,
        attempt=x.attempt,
        lease_id=x.lease_id,
        agent_id=agent_id,
        device_id=device_id,
        ok=ok,
        error_kind="" if ok else "runtime_error",
        error_message="" if ok else "it broke",
        trials=[trial] if ok else [],
    )

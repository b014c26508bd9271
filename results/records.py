"""Plain records the store reads and writes (no SQL types leak out of results/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefarm.domain import CampaignStatus, MeasureSettings, TaskStatus


@dataclass
class CampaignRecord:
    """A submitted campaign; its spec is kept verbatim so a restart can resume it."""

    campaign_id: str
    name: str
    spec_yaml: str
    status: CampaignStatus
    created_at: float  # unix seconds
    finished_at: float | None = None
    conversions_run: int = 0
    conversions_cached: int = 0
    submission_id: str | None = None  # the client's id for its submission
    plan: dict[str, Any] = field(default_factory=dict)  # what preparation needs to resume
    error: str = ""  # why the campaign failed before any task existed


@dataclass
class TaskRecord:
    """One measurement task: a variant (model x backend x scheme) on one device."""

    task_id: str
    campaign_id: str
    model: str
    backend: str
    scheme: str
    device_id: str
    device_name: str
    artifact_sha256: str
    artifact_size: int
    artifact_name: str
    eval_sha256: str | None
    eval_size: int
    settings: MeasureSettings
    options: dict[str, str] = field(default_factory=dict)
    # Selector the device was chosen by (agents must still match it).
    selector: dict[str, str] = field(default_factory=dict)
    # Identity of the measurement, independent of the campaign: equal keys measure the
    # same artifact on the same device with the same settings (used for reuse).
    measure_key: str = ""
    # Nightly runs: "candidate" or "baseline" (the baseline night's variant measured
    # again in the same run), and the randomised block the task belongs to.
    role: str = "candidate"
    block: int = 0
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 0
    lease_id: str | None = None
    agent_id: str | None = None
    lease_expires_at: float | None = None
    # The result row that answers this task (its own, or a reused earlier one).
    result_id: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class ArtifactRecord:
    """A content-addressed artifact and the step that produced it."""

    key: str  # hash of the step's inputs: source hash, tool + version, parameters
    sha256: str
    size_bytes: int
    kind: str  # "onnx", "gguf", "eval-npz", ...
    name: str
    provenance: dict[str, Any]
    created_at: float


@dataclass
class NightlyRun:
    """One night of a nightly suite: its campaigns, baseline and verdicts."""

    run_id: str
    suite: str
    night: str  # label, e.g. the date
    status: str  # running | passed | regressed | failed
    created_at: float
    campaign_id: str | None = None
    confirm_campaign_id: str | None = None
    baseline_run_id: str | None = None
    finished_at: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class AgentIdentity:
    """An enrolled agent: the hash of its credential, and whether it was revoked."""

    agent_id: str
    agent_name: str
    device_id: str
    credential_sha256: str
    cert_sha256: str | None
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        """Whether the identity may no longer register."""
        return self.revoked_at is not None


@dataclass
class DeviceSeen:
    """The last registration and heartbeat of an agent on a device."""

    agent_id: str
    agent_name: str
    device_id: str
    capabilities: dict[str, Any]
    labels: dict[str, str]
    registered_at: float
    last_heartbeat: float


# How an attempt ended: running (not yet), result (an accepted ok result), failed (an
# accepted failed result), lost (lease expired / agent revoked), abandoned (the agent
# gave it up), superseded (a restarted coordinator began a new attempt), refused (a
# result came for it and was refused; ``reason`` says why).
ATTEMPT_OUTCOMES: frozenset[str] = frozenset(
    {"running", "result", "failed", "lost", "abandoned", "superseded", "refused"}
)


@dataclass
class AttemptRecord:
    """One attempt of a task: the lease an agent held and how it ended."""

    task_id: str
    attempt: int
    lease_id: str
    agent_id: str
    started_at: float  # when the lease was granted (coordinator clock; 0: unknown)
    ended_at: float | None = None
    outcome: str = "running"  # one of ATTEMPT_OUTCOMES
    reason: str = ""  # e.g. "lease expired", "agent revoked", a refusal reason

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, when both are known."""
        if self.ended_at is None or self.started_at <= 0 or self.ended_at < self.started_at:
            return None
        return self.ended_at - self.started_at

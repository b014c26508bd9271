"""Campaign planning: a spec becomes prepared variants and one task per device.

A task is one variant (model x backend x scheme) on one device. Devices are the
online agents' devices that match one of the spec's selectors and have the
variant's backend installed. A task whose measurement already exists (same
artifact, device, backend options and settings) is answered from the store
unless the campaign asks to measure afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.conversion.olive_convert import WORKFLOW_PARAM
from coordinator.interleave import BASELINE, RunShape, shape_tasks
from coordinator.preparation import (
    PreparationStats,
    PreparedSource,
    Preparer,
    unwrap_ray_error,
)
from coordinator.scheduler import AgentSession, Scheduler
from coordinator.spec import CampaignSpec, Variant
from edgefarm.domain import (
    HUB_BACKEND,
    HUB_DEVICE_PREFIX,
    ArtifactRef,
    CampaignStatus,
    MeasureSettings,
    TaskStatus,
)
from edgefarm.errors import EdgefarmError, SpecError, UsageError
from edgefarm.selectors import matches
from results.records import CampaignRecord, TaskRecord

log = logging.getLogger(__name__)

# Which extra provides each backend, for "missing extra" warnings.
BACKEND_EXTRAS = {
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "llama-cpp": "llama-cpp",
    "mlx": "mlx",
    "onnxruntime-genai": "onnxruntime-genai",
    "foundry-local": "foundry-local (an environment of its own: --backend-env)",
    "qai-hub": "qai-hub",
    "noop": "agent",
    "llama-server": "serving",
    "openai-endpoint": "agent",
    "vllm": "vllm (an environment of its own: --backend-env vllm=PATH)",
}


@dataclass
class SubmitOutcome:
    """What submitting a campaign produced."""

    campaign_id: str
    tasks_total: int
    tasks_reused: int
    conversions_run: int
    conversions_cached: int
    warnings: list[str] = field(default_factory=list)
    tasks_baseline: int = 0  # baseline-replay tasks of a nightly run


@dataclass
class DeviceChoice:
    """A device picked for a campaign, with the selector that picked it."""

    device_id: str
    device_name: str
    backends: set[str]
    selector: dict[str, str]


def measure_key(
    artifact: ArtifactRef,
    eval_data: ArtifactRef | None,
    backend: str,
    options: dict[str, str],
    device_id: str,
    settings: MeasureSettings,
    scheme: str | None = None,
) -> str:
    """Identity of a measurement, independent of the campaign asking for it.

    ``scheme`` is given only where the device side applies it (qai-hub: every scheme
    measures the same FP32 artifact); elsewhere the artifact already stands for it.
    """
    identity = {
        "artifact": artifact.sha256,
        "eval": eval_data.sha256 if eval_data else None,
        "backend": backend,
        "options": options,
        "device": device_id,
        "settings": _settings_identity(settings),
    }
    if scheme is not None:
        identity["scheme"] = scheme
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# Settings added after keys were first stored, with their defaults: left out of a
# measure key while at the default, so that keys, and so reuse, survive upgrades.
_LATER_SETTINGS: dict[str, object] = {"evaluate": True, "max_other_cpu_cores": 0.0}


def _settings_identity(settings: MeasureSettings) -> dict[str, object]:
    """Settings as they enter a measure key (later settings at their default left out)."""
    values = settings.to_dict()
    for name, default in _LATER_SETTINGS.items():
        if values.get(name, default) == default:
            values.pop(name, None)
    return values


def choose_devices(spec: CampaignSpec, sessions: list[AgentSession]) -> list[DeviceChoice]:
    """Online devices matching a selector; the first selector to match wins."""
    chosen: dict[str, DeviceChoice] = {}
    for selector in spec.selectors():
        for session in sessions:
            if not matches(selector, session.facts):
                continue
            choice = chosen.get(session.device_id)
            if choice is None:
                choice = chosen[session.device_id] = DeviceChoice(
                    session.device_id, session.device_name, set(), selector
                )
            if choice.selector == selector:
                choice.backends |= set(session.capabilities.backends)
    return list(chosen.values())


@dataclass(frozen=True)
class CampaignPlan:
    """What preparing a campaign needs, stored with it so that a restarted coordinator
    can prepare it again (finished conversion steps are reused from the artifacts)."""

    devices: list[DeviceChoice]
    files: dict[str, Path]
    fresh: bool
    shape: RunShape
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the campaign record's ``plan``)."""
        return {
            "devices": [
                {
                    "device_id": d.device_id,
                    "device_name": d.device_name,
                    "backends": sorted(d.backends),
                    "selector": d.selector,
                }
                for d in self.devices
            ],
            "files": {ref: str(path) for ref, path in self.files.items()},
            "fresh": self.fresh,
            "shape": {
                "baseline_campaign_id": self.shape.baseline_campaign_id,
                "blocks": self.shape.blocks,
                "series": sorted(self.shape.series),
                "seed": self.shape.seed,
            },
            "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampaignPlan:
        """The plan stored by :meth:`to_dict`."""
        shape = data.get("shape") or {}
        return cls(
            devices=[
                DeviceChoice(
                    str(d["device_id"]),
                    str(d["device_name"]),
                    set(d.get("backends") or ()),
                    dict(d.get("selector") or {}),
                )
                for d in data.get("devices") or ()
            ],
            files={str(ref): Path(path) for ref, path in (data.get("files") or {}).items()},
            fresh=bool(data.get("fresh")),
            shape=RunShape(
                baseline_campaign_id=str(shape.get("baseline_campaign_id") or ""),
                blocks=int(shape.get("blocks") or 1),
                series=frozenset(shape.get("series") or ()),
                seed=int(shape.get("seed") or 0),
            ),
            warnings=[str(w) for w in data.get("warnings") or ()],
        )


class CampaignPlanner:
    """Turns submitted specs into stored campaigns and queued tasks.

    A campaign is stored (status ``preparing``) before any preparation starts, with
    the client's submission id and what preparing it needs; preparation then runs in
    its own task, which a dropped client does not cancel, and which a restarted
    coordinator starts again (:meth:`resume`)."""

    def __init__(self, scheduler: Scheduler, preparer: Preparer) -> None:
        self.scheduler = scheduler
        self.preparer = preparer
        self._preparing: dict[str, asyncio.Future[SubmitOutcome]] = {}

    async def submit(
        self,
        spec: CampaignSpec,
        spec_text: str,
        files: Mapping[str, Path],
        fresh: bool = False,
        shape: RunShape | None = None,
        submission_id: str = "",
    ) -> SubmitOutcome:
        """Store the campaign, prepare every variant (on Ray), create the tasks and
        queue them; returns when its tasks are queued.

        ``files`` maps each ``file:`` reference of the spec, as written, to its path on
        the coordinator (:func:`coordinator.uploads.resolve_spec_files`).

        ``shape`` (nightly runs) restricts the series, replays the baseline campaign's
        differing variants and interleaves blocks (see :mod:`coordinator.interleave`);
        a shaped campaign always measures afresh.

        A ``submission_id`` seen before attaches to the campaign it created.
        """
        store = self.scheduler.store
        if submission_id:
            existing = await self.scheduler.writer.run(store.campaign_for_submission, submission_id)
            if existing is not None:
                log.info("submission %s attaches to campaign %s", submission_id, existing.name)
                return await self.attach(existing)
        shape = shape or RunShape()
        fresh = fresh or shape.active
        devices = choose_devices(spec, self.scheduler.online_sessions())
        if not devices:
            raise UsageError(
                f"campaign '{spec.name}': no online device matches its device selectors "
                f"{spec.selectors()}"
            )
        plan = CampaignPlan(
            devices, dict(files), fresh, shape, _missing_backend_warnings(spec, devices)
        )
        record = CampaignRecord(
            campaign_id="c-" + uuid.uuid4().hex[:12],
            name=spec.name,
            spec_yaml=spec_text,
            status=CampaignStatus.PREPARING,
            created_at=time.time(),
            submission_id=submission_id or None,
            plan=plan.to_dict(),
        )
        await self.scheduler.writer.run(store.create_campaign, record, [])
        return await self._start(record, spec, plan)

    async def attach(self, record: CampaignRecord) -> SubmitOutcome:
        """The outcome of a stored campaign's submission: once its preparation (running,
        or started again here) is done."""
        future = self._preparing.get(record.campaign_id)
        if future is None and record.status == CampaignStatus.PREPARING:
            spec = CampaignSpec.from_text(record.spec_yaml, record.name)
            return await self._start(record, spec, CampaignPlan.from_dict(record.plan))
        if future is not None:
            return await asyncio.shield(future)
        if record.error:
            raise UsageError(record.error)
        return await self.scheduler.writer.run(self._stored_outcome, record)

    def _stored_outcome(self, record: CampaignRecord) -> SubmitOutcome:
        """The outcome of a campaign that was prepared before (read from the store)."""
        tasks = self.scheduler.store.tasks_for_campaign(record.campaign_id)
        return SubmitOutcome(
            record.campaign_id,
            len(tasks),
            sum(t.status == TaskStatus.REUSED for t in tasks),
            record.conversions_run,
            record.conversions_cached,
            list(CampaignPlan.from_dict(record.plan).warnings) if record.plan else [],
            sum(t.role == BASELINE for t in tasks),
        )

    def resume(self) -> int:
        """After a restart: prepare again every campaign stored as ``preparing``
        (finished conversion steps are reused). Returns how many were resumed."""
        resumed = 0
        for record in self.scheduler.store.unfinished_campaigns():
            if record.status != CampaignStatus.PREPARING:
                continue
            try:
                spec = CampaignSpec.from_text(record.spec_yaml, record.name)
                plan = CampaignPlan.from_dict(record.plan)
            except (SpecError, KeyError, TypeError, ValueError) as error:
                self._fail_unprepared(record.campaign_id, f"cannot resume: {error}")
                continue
            log.info(
                "campaign %s (%s): preparing again after a restart", record.campaign_id, record.name
            )
            self._launch(record, spec, plan)
            resumed += 1
        return resumed

    async def _start(
        self, record: CampaignRecord, spec: CampaignSpec, plan: CampaignPlan
    ) -> SubmitOutcome:
        """Prepare in a task of its own (a dropped client does not cancel it); wait."""
        return await asyncio.shield(self._launch(record, spec, plan))

    def _launch(
        self, record: CampaignRecord, spec: CampaignSpec, plan: CampaignPlan
    ) -> asyncio.Future[SubmitOutcome]:
        future = self._preparing.get(record.campaign_id)
        if future is None:
            future = asyncio.ensure_future(self._prepare(record, spec, plan))
            self._preparing[record.campaign_id] = future
            future.add_done_callback(lambda f: self._done_preparing(record.campaign_id, f))
        return future

    def _done_preparing(self, campaign_id: str, future: asyncio.Future[SubmitOutcome]) -> None:
        self._preparing.pop(campaign_id, None)
        if not future.cancelled():
            future.exception()  # retrieved: a failure is reported to the submitter

    async def _prepare(
        self, record: CampaignRecord, spec: CampaignSpec, plan: CampaignPlan
    ) -> SubmitOutcome:
        """Preparation proper; a failure that leaves no task fails the campaign."""
        try:
            return await self._prepare_tasks(record, spec, plan)
        except asyncio.CancelledError:
            raise  # the coordinator is stopping: a restart prepares it again
        except Exception as error:
            reason = (
                str(error)
                if isinstance(error, EdgefarmError)
                else (f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
            )
            if not isinstance(error, EdgefarmError):
                log.error("preparing campaign %s failed", record.campaign_id, exc_info=error)
            await self.scheduler.writer.run(self._fail_unprepared, record.campaign_id, reason)
            raise

    def _fail_unprepared(self, campaign_id: str, reason: str) -> None:
        """Mark a campaign that never got tasks failed, with why."""
        self.scheduler.store.update_campaign(
            campaign_id, status=CampaignStatus.FAILED, finished_at=time.time(), error=reason
        )
        log.warning("campaign %s failed before measuring: %s", campaign_id, reason)

    async def _prepare_tasks(
        self, record: CampaignRecord, spec: CampaignSpec, plan: CampaignPlan
    ) -> SubmitOutcome:
        store = self.scheduler.store
        campaign_id, devices, files, shape = (
            record.campaign_id,
            plan.devices,
            plan.files,
            plan.shape,
        )
        warnings = list(plan.warnings)
        stats = PreparationStats()
        sources: dict[str, PreparedSource | Exception] = {}
        for model in spec.models:
            try:
                prepared = await self.preparer.source(
                    model.name, model.source, files.get(model.source), stats
                )
                sources[model.name] = await self.preparer.attach_files(
                    prepared,
                    _file_path(model.eval, files),
                    _file_path(model.calibration, files),
                    stats,
                    spec.fidelity_context_tokens,
                )
            except Exception as error:  # a bad model fails its own tasks, not the campaign
                sources[model.name] = unwrap_ray_error(error)
                log.warning("model %s: %s", model.name, sources[model.name])
        wanted = [v for v in spec.variants() if any(v.backend in d.backends for d in devices)]
        ready = [
            (src, v.backend, v.scheme, _convert_params(v.convert, files))
            for v in wanted
            if isinstance(src := sources[v.model.name], PreparedSource)
        ]
        converted = iter(await self.preparer.variants(ready, stats))
        artifacts: list[ArtifactRef | Exception] = []
        evals: list[ArtifactRef | None] = []
        for variant in wanted:
            source = sources[variant.model.name]
            artifact = next(converted) if isinstance(source, PreparedSource) else source
            eval_data = source.eval_data if isinstance(source, PreparedSource) else None
            if variant.backend == HUB_BACKEND and isinstance(source, PreparedSource):
                try:
                    if isinstance(artifact, ArtifactRef):
                        eval_data = await self.preparer.hub_inputs(source, artifact, stats)
                except Exception as error:  # fails this variant's tasks only
                    artifact = unwrap_ray_error(error)
            artifacts.append(artifact)
            evals.append(eval_data)
        now = time.time()
        tasks: list[TaskRecord] = []
        failures: list[tuple[TaskRecord, Exception]] = []
        for variant, artifact, eval_data in zip(wanted, artifacts, evals, strict=True):
            for device in devices:
                if variant.backend not in device.backends:
                    continue
                task = _task_record(
                    campaign_id,
                    variant,
                    device,
                    eval_data,
                    artifact,
                    created_at=now + len(tasks) * 1e-6,
                )
                if isinstance(artifact, Exception):
                    failures.append((task, artifact))
                tasks.append(task)
        reused = 0
        if not plan.fresh:  # earlier identical measurements, looked up off the event loop
            failed = {id(task) for task, _ in failures}
            found = await asyncio.to_thread(
                store.find_reusable_results,
                [t.measure_key for t in tasks if id(t) not in failed],
            )
            for task in tasks:
                if id(task) not in failed and task.measure_key in found:
                    task.status, task.result_id = TaskStatus.REUSED, found[task.measure_key]
                    reused += 1
        if shape.active:
            baseline = await asyncio.to_thread(self._baseline_tasks, shape)
            tasks = self._shape(tasks, baseline, shape, now)
            kept = {t.task_id for t in tasks}
            failures = [(t, f) for t, f in failures if t.task_id in kept]
        if not tasks:
            raise UsageError(f"campaign '{spec.name}': no task can run; " + "; ".join(warnings))
        await self.scheduler.writer.run(
            store.start_campaign,
            campaign_id,
            tasks,
            conversions_run=stats.run,
            conversions_cached=stats.cached,
        )
        for task, failure in failures:
            kind = getattr(failure, "kind", "conversion_error")
            message = f"preparing {task.scheme} failed: {failure}"
            await self.scheduler.writer.run(store.record_failure, task, kind, message)
            task.status = TaskStatus.FAILED
        self.scheduler.add_tasks(tasks)
        self.scheduler.check_campaign(campaign_id)
        log.info("campaign %s: %d tasks (%d reused)", campaign_id, len(tasks), reused)
        replays = sum(t.role == BASELINE for t in tasks)
        return SubmitOutcome(
            campaign_id, len(tasks), reused, stats.run, stats.cached, warnings, replays
        )

    def _baseline_tasks(self, shape: RunShape) -> list[TaskRecord]:
        """The tasks of a nightly run's baseline campaign (none without one)."""
        if not shape.baseline_campaign_id:
            return []
        store = self.scheduler.store
        if store.get_campaign(shape.baseline_campaign_id) is None:
            raise UsageError(f"no baseline campaign '{shape.baseline_campaign_id}'")
        return store.tasks_for_campaign(shape.baseline_campaign_id)

    def _shape(
        self, tasks: list[TaskRecord], baseline: list[TaskRecord], shape: RunShape, now: float
    ) -> list[TaskRecord]:
        """Apply a nightly run's shape; tasks get creation times in measuring order."""
        artifacts = self.preparer.artifacts

        def runnable(t: TaskRecord) -> bool:
            return artifacts.has(t.artifact_sha256) and (
                t.eval_sha256 is None or artifacts.has(t.eval_sha256)
            )

        def key(t: TaskRecord) -> str:
            eval_data = ArtifactRef(t.eval_sha256, t.eval_size) if t.eval_sha256 else None
            return measure_key(
                ArtifactRef(t.artifact_sha256, t.artifact_size, t.artifact_name),
                eval_data,
                t.backend,
                t.options,
                t.device_id,
                t.settings,
                scheme=t.scheme if t.backend == HUB_BACKEND else None,
            )

        shaped = shape_tasks(tasks, baseline, shape, runnable, key)
        for index, task in enumerate(shaped):
            task.created_at = now + index * 1e-6
        return shaped


def _task_record(
    campaign_id: str,
    variant: Variant,
    device: DeviceChoice,
    eval_data: ArtifactRef | None,
    artifact: ArtifactRef | Exception,
    created_at: float,
) -> TaskRecord:
    """The task measuring ``variant`` on ``device``; a failed preparation leaves the
    artifact fields empty (the task is stored failed)."""
    ref = artifact if isinstance(artifact, ArtifactRef) else ArtifactRef("", 0, "")
    return TaskRecord(
        task_id="t-" + uuid.uuid4().hex[:16],
        campaign_id=campaign_id,
        model=variant.model.name,
        backend=variant.backend,
        scheme=variant.scheme,
        device_id=device.device_id,
        device_name=device.device_name,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size_bytes,
        artifact_name=ref.name,
        eval_sha256=eval_data.sha256 if eval_data else None,
        eval_size=eval_data.size_bytes if eval_data else 0,
        settings=variant.settings,
        options=dict(variant.options),
        selector=dict(device.selector),
        measure_key=measure_key(
            ref,
            eval_data,
            variant.backend,
            variant.options,
            device.device_id,
            variant.settings,
            scheme=variant.scheme if variant.backend == HUB_BACKEND else None,
        )
        if ref.sha256
        else "",
        created_at=created_at,
    )


def _convert_params(params: dict[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
    """A scheme's conversion parameters with an Olive workflow's ``file:`` reference
    pointing at its path on the coordinator."""
    ref = params.get(WORKFLOW_PARAM)
    if isinstance(ref, str) and ref in files:
        return {**params, WORKFLOW_PARAM: f"file:{files[ref]}"}
    return params


def _file_path(ref: str | None, files: Mapping[str, Path]) -> Path | None:
    """The coordinator-side path of an eval or calibration reference."""
    if not ref:
        return None
    if ref not in files:
        raise SpecError(f"{ref} has no coordinator-side path")
    return files[ref]


def _missing_backend_warnings(spec: CampaignSpec, devices: list[DeviceChoice]) -> list[str]:
    warnings = []
    for backend in sorted({v.backend for v in spec.variants()}):
        # Hosted AI Hub devices run hub jobs only: not having other backends is no news.
        lacking = [
            d.device_name
            for d in devices
            if backend not in d.backends
            and (backend == HUB_BACKEND or not d.device_id.startswith(HUB_DEVICE_PREFIX))
        ]
        if not lacking:
            continue
        extra = BACKEND_EXTRAS.get(backend, backend)
        if backend == HUB_BACKEND and len(lacking) == len(devices):
            warnings.append(
                f"backend '{backend}' is not installed on {', '.join(sorted(lacking))} and no "
                "Qualcomm AI Hub device is online (install the agent with the "
                f"'{extra}' extra and run `edgefarm agent hub` with an AI Hub token, see "
                "docs/qai-hub.md); its tasks skip those devices"
            )
        elif backend != HUB_BACKEND:
            warnings.append(
                f"backend '{backend}' is not installed on {', '.join(sorted(lacking))} "
                f"(install the agent with the '{extra}' extra); its tasks skip those devices"
            )
    return warnings

"""Measures an assignment on one Qualcomm AI Hub hosted device.

For the FP32 ONNX model and the task's scheme:

1. upload the model (once per content hash);
2. quantize it on the hub when the scheme asks for it (a quantize job calibrated with the
   model's calibration set: ``int8`` = w8a8, ``int16`` = w8a16, ``w4a8``, ``w4a16``);
3. compile it for the device and target runtime (option ``target_runtime``:
   ``qnn_context_binary``, ``qnn_dlc``, ``tflite``, ``onnx`` or ``precompiled_qnn_onnx``;
   default: QNN context binary where the device has QNN, else TFLite, else ONNX;
   ``fp16`` compiles with ``--quantize_full_type float16``);
4. profile it: an inference job with ``profile=True`` asking for
   ``settings.min_iterations`` iterations -> one trial (:mod:`agent.hub.profile`);
5. run it on the eval inputs: an inference job whose outputs are scored against the FP32
   reference with the same code on-device backends use.

Every job goes through :class:`agent.hub.jobs.HubJobs` (journalled, re-attached after a
restart, never submitted twice for a campaign). A hub job is one trial whatever
``settings.trials`` says: each is billable and already runs many iterations.

Options: ``target_runtime``, ``compute_unit`` (profile / inference option, e.g. ``npu``),
``compile_options`` and ``profile_options`` (extra raw hub flags, appended).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.accuracy import classification_accuracy, top1_outcomes
from agent.backends.base import check_options, one_line
from agent.executor import Progress
from agent.hub.api import HubApi
from agent.hub.bundle import HubInputs, InputSpec, load_hub_inputs
from agent.hub.devices import HubDevice
from agent.hub.jobs import HubJobs, StepContext, StepResult
from agent.hub.profile import placement_summary, profile_trial
from agent.runner import TrialsReport
from edgefarm.domain import HUB_BACKEND, Assignment
from edgefarm.errors import TaskError, UnsupportedScheme

log = logging.getLogger(__name__)

TARGET_RUNTIMES = ("qnn_context_binary", "qnn_dlc", "tflite", "onnx", "precompiled_qnn_onnx")
OPTIONS = frozenset({"target_runtime", "compute_unit", "compile_options", "profile_options"})


@dataclass(frozen=True)
class SchemePlan:
    """What a scheme means on the hub: quantize dtypes (``QuantizeDtype`` member names)
    and compile flags."""

    weights: str | None = None  # None: no quantize job
    activations: str | None = None
    compile_options: str = ""


SCHEMES: dict[str, SchemePlan] = {
    "fp32": SchemePlan(),
    "fp16": SchemePlan(compile_options="--quantize_full_type float16"),
    "int8": SchemePlan("INT8", "INT8"),
    "int16": SchemePlan("INT8", "INT16"),
    "w4a8": SchemePlan("INT4", "INT8"),
    "w4a16": SchemePlan("INT4", "INT16"),
}


def default_runtime(frameworks: list[str]) -> str:
    """The target runtime for a device: QNN where it has QNN, else TFLite, else ONNX."""
    for framework, runtime in (("qnn", "qnn_context_binary"), ("tflite", "tflite")):
        if framework in frameworks:
            return runtime
    return "onnx"


@dataclass
class _Run:
    """One assignment on its way through the hub."""

    a: Assignment
    plan: SchemePlan
    runtime: str
    inputs: HubInputs
    spec: InputSpec
    shape: tuple[int, ...]  # the model input's static shape (batch = settings.batch_size)
    ctx: StepContext
    device: Any  # the qai_hub.Device jobs go to
    jobs: dict[str, str] = field(default_factory=dict)  # step -> hub job id

    @property
    def title(self) -> str:
        """The start of every hub job's name."""
        return f"edgefarm {self.a.model} {self.a.scheme}"

    @property
    def inputs_sha(self) -> str:
        """The hub inputs file's hash (calibration and eval set are part of job keys)."""
        assert self.a.eval_data is not None
        return self.a.eval_data.sha256

    def option_flag(self, flag: str, option: str) -> str:
        """``--flag VALUE`` for a task option that is set, else ''."""
        value = self.a.options.get(option)
        return f"--{flag} {value}" if value else ""


class HubExecutor:
    """The :class:`~agent.executor.Executor` of one hosted device."""

    def __init__(self, hub: HubApi, device: HubDevice, jobs: HubJobs) -> None:
        self.hub = hub
        self.device = device
        self.jobs = jobs

    async def execute(
        self, assignment: Assignment, model_path: Path, eval_path: Path | None, progress: Progress
    ) -> TrialsReport:
        """Quantize, compile, profile and run ``assignment`` on the hub device."""
        try:
            return await self._execute(assignment, model_path, eval_path, progress)
        except TaskError:
            raise
        except Exception as err:  # a bug or an unexpected client error: fail the task only
            log.exception("hub task %s failed unexpectedly", assignment.task_id)
            raise TaskError(one_line(f"{type(err).__name__}: {err}")) from err

    async def _execute(
        self, a: Assignment, model_path: Path, eval_path: Path | None, progress: Progress
    ) -> TrialsReport:
        run = await self._prepare(a, eval_path)
        progress("uploading")
        upload_name = Path(a.artifact.name or "model").stem.split(".")[0] + ".onnx"
        model = await self.jobs.upload(model_path, upload_name, a.artifact.sha256, run.ctx)
        if run.plan.weights is not None:
            progress("quantizing")
            model = await self._quantize(run, model)
        progress("compiling")
        compiled = await self._compile(run, model)
        target = await self._target_model(compiled)
        size = await self._target_size(compiled)
        progress("profiling")
        profile, profile_options = await self._profile(run, compiled, target)
        accuracy: dict[str, float] = {}
        outcomes: list[int] = []
        if run.inputs.eval is not None:
            progress("inference")
            accuracy, outcomes = await self._evaluate(run, compiled, target)
        progress("measuring", 1)
        report = TrialsReport(
            trials=[profile_trial(profile, a.settings)],
            accuracy=accuracy,
            backend_version=self.hub.version,
            environment=self._environment(run, compiled, profile, profile_options),
            model_size_bytes=size,
        )
        report.example_outcomes = outcomes
        return report

    async def _prepare(self, a: Assignment, eval_path: Path | None) -> _Run:
        """Check the task and read its hub inputs file."""
        check_options(HUB_BACKEND, a.options, OPTIONS)
        plan = SCHEMES.get(a.scheme)
        if plan is None:
            raise UnsupportedScheme(
                f"qai-hub has no scheme '{a.scheme}' (known: {', '.join(SCHEMES)})"
            )
        runtime = a.options.get("target_runtime") or default_runtime(self.device.frameworks)
        if runtime not in TARGET_RUNTIMES:
            raise TaskError(
                f"unknown target_runtime '{runtime}' (known: {', '.join(TARGET_RUNTIMES)})"
            )
        if eval_path is None or a.eval_data is None:
            raise TaskError("a qai-hub task needs its hub inputs file (none was shipped)")
        inputs = await asyncio.to_thread(load_hub_inputs, eval_path)
        if len(inputs.input_spec) != 1:
            raise TaskError(
                f"qai-hub tasks support single-input models; this one has "
                f"{len(inputs.input_spec)} inputs"
            )
        spec = inputs.input_spec[0]
        return _Run(
            a=a,
            plan=plan,
            runtime=runtime,
            inputs=inputs,
            spec=spec,
            shape=spec.static_shape(a.settings.batch_size),
            ctx=StepContext(a.campaign_id, a.attempt),
            device=self.device.hub_device(self.hub),
        )

    async def _quantize(self, run: _Run, model: Any) -> Any:
        """The hub's quantized model of ``model`` (one quantize job per scheme and model,
        shared by every device)."""
        a, plan, calibration = run.a, run.plan, run.inputs.calibration
        if calibration is None or len(calibration) == 0:
            raise UnsupportedScheme(
                f"scheme {a.scheme} quantizes on the hub and needs the model's calibration "
                "set; this model has none (give it `calibration: file:...`)"
            )
        dtype = self.hub.module.QuantizeDtype
        weights = getattr(dtype, plan.weights or "")
        activations = getattr(dtype, plan.activations or "")
        samples = [
            np.ascontiguousarray(row.reshape(1, *run.shape[1:]), dtype=run.spec.dtype)
            for row in calibration
        ]
        facts = {
            "model": a.artifact.sha256,
            "weights": str(plan.weights),
            "activations": str(plan.activations),
            "calibration": run.inputs_sha,
        }
        quantized = await self._job(
            run,
            "quantize",
            facts,
            lambda name: self.hub.client.submit_quantize_job(
                model,
                calibration_data={run.spec.name: samples},
                weights_dtype=weights,
                activations_dtype=activations,
                name=name,
            ),
        )
        return await self._target_model(quantized)

    async def _job(
        self, run: _Run, step: str, facts: dict[str, str], submit: Callable[[str], Any]
    ) -> StepResult:
        """The finished hub job of ``step`` for ``run`` (see :meth:`HubJobs.run`), its id
        noted in ``run.jobs``."""
        result = await self.jobs.run(step, facts, run.ctx, f"{run.title} {step}", submit)
        run.jobs[step] = result.entry.hub_id
        return result

    async def _compile(self, run: _Run, model: Any) -> StepResult:
        """The compile job of the (quantized) model for this device and runtime."""
        a = run.a
        options = _flags(
            f"--target_runtime {run.runtime}",
            run.plan.compile_options,
            a.options.get("compile_options"),
        )
        facts = {
            "model": a.artifact.sha256,
            "scheme": a.scheme,
            "device": self.device.name,
            "device_os": self.device.os,
            "runtime": run.runtime,
            "options": options,
            "input_shape": ",".join(map(str, run.shape)),
            "calibration": run.inputs_sha if run.plan.weights is not None else "",
        }
        compiled = await self._job(
            run,
            "compile",
            facts,
            lambda name: self.hub.client.submit_compile_job(
                model,
                device=run.device,
                name=name,
                input_specs={run.spec.name: (run.shape, run.spec.dtype)},
                options=options,
                retry=False,
            ),
        )
        return compiled

    async def _profile(
        self, run: _Run, compiled: StepResult, target: Any
    ) -> tuple[dict[str, Any], str]:
        """The profile of an inference job with profiling, and the flags it ran with."""
        options = _flags(
            f"--max_profiler_iterations {run.a.settings.min_iterations}",
            run.option_flag("compute_unit", "compute_unit"),
            run.a.options.get("profile_options"),
        )
        facts = {"campaign": run.a.campaign_id, "compile": compiled.entry.key, "options": options}
        profiled = await self._job(
            run,
            "profile",
            facts,
            lambda name: self.hub.client.submit_inference_job(
                target,
                device=run.device,
                name=name,
                options=options,
                retry=False,
                profile=True,
            ),
        )
        profile = await self.jobs.call("downloading the profile", profiled.job.download_profile)
        if not isinstance(profile, dict) or not profile:
            raise TaskError(f"profile job {profiled.entry.hub_id} returned no profile")
        return profile, options

    async def _evaluate(
        self, run: _Run, compiled: StepResult, target: Any
    ) -> tuple[dict[str, float], list[int]]:
        """Accuracy of the outputs of an inference job on the eval inputs, and the
        per-example top-1 outcomes."""
        evaluation = run.inputs.eval
        assert evaluation is not None
        options = _flags(run.option_flag("compute_unit", "compute_unit"))
        batches = _batches(evaluation.inputs, run.spec, run.a.settings.batch_size)
        facts = {
            "campaign": run.a.campaign_id,
            "compile": compiled.entry.key,
            "eval": run.inputs_sha,
            "options": options,
        }
        ran = await self._job(
            run,
            "inference",
            facts,
            lambda name: self.hub.client.submit_inference_job(
                target,
                device=run.device,
                inputs={run.spec.name: batches},
                name=name,
                options=options,
                retry=False,
                profile=False,
            ),
        )
        outputs = await self.jobs.call("downloading the outputs", ran.job.download_output_data)
        logits = _first_output(outputs, len(evaluation), ran.entry.hub_id)
        try:
            accuracy = classification_accuracy(logits, evaluation.labels, evaluation.reference)
        except ValueError as err:
            raise TaskError(f"inference job {ran.entry.hub_id}: {err}") from None
        return accuracy, top1_outcomes(logits, evaluation.labels)

    async def _target_model(self, step: StepResult) -> Any:
        """The model a finished compile / quantize job produced."""
        model = await self.jobs.call(
            f"{step.entry.step} job {step.entry.hub_id}", step.job.get_target_model
        )
        if model is None:
            raise TaskError(f"{step.entry.step} job {step.entry.hub_id} produced no model")
        return model

    async def _target_size(self, compiled: StepResult) -> int:
        """Size of the compiled model (downloaded once; the size is journalled)."""
        known = compiled.entry.facts.get("target_size_bytes")
        if known:
            return int(known)
        with tempfile.TemporaryDirectory(prefix="edgefarm-hub-") as tmp:
            path = await self.jobs.call(
                "downloading the compiled model",
                compiled.job.download_target_model,
                str(Path(tmp) / "model"),
            )
            size = Path(path).stat().st_size if path else 0
        self.jobs.note(compiled.entry, target_size_bytes=str(size))
        return size

    def _environment(
        self, run: _Run, compiled: StepResult, profile: dict[str, Any], profile_options: str
    ) -> dict[str, str]:
        """What the hub ran: device, runtime, flags, job ids and placement."""
        env = {
            "qai_hub.client_version": self.hub.version,
            "qai_hub.hub_version": str(getattr(compiled.job, "hub_version", "") or ""),
            "qai_hub.device": self.device.name,
            "qai_hub.device_os": self.device.os,
            "qai_hub.chipset": ",".join(self.device.values("chipset")),
            "qai_hub.target_runtime": run.runtime,
            "qai_hub.compile_options": compiled.entry.facts.get("options", ""),
            "qai_hub.profile_options": profile_options,
            "qai_hub.jobs": ",".join(f"{step}={job}" for step, job in run.jobs.items()),
            "qai_hub.compute_units": placement_summary(profile.get("execution_detail") or []),
            "batch_size": str(run.a.settings.batch_size),
            "energy.source": f"none: {HUB_NO_ENERGY}",
        }
        if run.plan.weights is not None:
            env["qai_hub.quantize"] = (
                f"weights={run.plan.weights},activations={run.plan.activations}"
            )
        return env


# Checked in the client's profile mapping and its protobuf schema (qai-hub 0.56): no
# energy, power or thermal field exists, so hub results carry none.
HUB_NO_ENERGY = "Qualcomm AI Hub's profiles report no energy or power figures"


def _flags(*parts: str | None) -> str:
    """Hub command-line flags joined with single spaces."""
    return " ".join(" ".join(p.split()) for p in parts if p and p.strip())


def _batches(inputs: np.ndarray, spec: InputSpec, batch_size: int) -> list[np.ndarray]:
    """The eval inputs in batches of ``batch_size`` (the last padded with its last row)."""
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
        out.append(np.ascontiguousarray(batch, dtype=spec.dtype))
    return out


def _first_output(outputs: Any, examples: int, job_id: str) -> np.ndarray:
    """The first output of an inference job's dataset, one row per example."""
    if not isinstance(outputs, dict) or not outputs:
        raise TaskError(f"inference job {job_id} returned no output data")
    first = next(iter(outputs.values()))
    stacked = np.concatenate([np.asarray(x) for x in first], axis=0)
    if len(stacked) < examples:
        raise TaskError(
            f"inference job {job_id} returned {len(stacked)} output rows for {examples} inputs"
        )
    return stacked.reshape(len(stacked), -1)[:examples]

"""Model preparation: materialise sources and convert / quantize variants, each once.

Every step runs as a Ray task (:mod:`coordinator.steps`) that returns bytes plus
provenance; the coordinator puts the bytes in the content-addressed artifact store
and records the step under a key made of its inputs (source hash, tool versions,
parameters). A step whose key is recorded — and whose artifact is still on disk — is
never run again, so a campaign over N devices converts each variant once.

Two model formats: ONNX (the digit classifier, user files) and GGUF (language models:
the source is dequantized to F16 once, every llama.cpp type is made from that F16,
and the F16 model's token log-probabilities on the evaluation text are the reference).
Qualcomm AI Hub variants are the FP32 ONNX model itself (the hub quantizes and compiles
it in its own jobs) plus a hub inputs file with the calibration and eval sets.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import ray

from coordinator import steps
from coordinator.artifacts import ArtifactStore
from coordinator.models.texts import DEFAULT_EVAL_TEXT
from edgefarm.domain import HUB_BACKEND, ArtifactRef
from edgefarm.errors import SpecError, UnsupportedScheme
from results.records import ArtifactRecord
from results.store import ResultsStore

log = logging.getLogger(__name__)

# Bump when a builder's output would change for the same inputs.
BUILDER_REVISION = 1
# Backends measured from the source model as-is (no conversion step).
PASSTHROUGH_BACKENDS = frozenset({"noop"})
# (backend, scheme) pairs whose artifact is the prepared source model itself.
IDENTITY_SCHEMES = frozenset({("onnxruntime", "fp32"), ("llama-cpp", "F16")})
# Language-model fidelity: context per evaluation chunk and reference top-k kept.
LLM_EVAL_CONTEXT = 512
LLM_TOP_K = 32
BUILTIN_GGUF_MODELS = ("smollm2-135m",)


@dataclass
class PreparedSource:
    """A model source materialised into artifacts."""

    model: ArtifactRef
    eval_data: ArtifactRef | None
    calibration: ArtifactRef | None
    format: str = "onnx"
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparationStats:
    """How many conversion steps ran now and how many came from the store."""

    run: int = 0
    cached: int = 0


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


# The distributions whose version can change a step's output; their versions are part
# of that step's key, so upgrading one tool redoes only the steps that use it.
STEP_TOOLS: dict[str, tuple[str, ...]] = {
    "builtin": ("numpy", "scikit-learn", "onnx", "onnxruntime"),
    "reference": ("numpy", "onnxruntime"),
    "gguf-f16": ("numpy", "gguf"),
    "llm-reference": ("numpy", "llama-cpp-python"),
    "gguf-hf": ("gguf", "torch", "transformers"),
    "hf-onnx": ("torch", "transformers", "onnx"),
    "hub-inputs": ("numpy", "onnx"),
    "variant:llama-cpp": ("llama-cpp-python",),
    "variant:mlx": ("mlx", "mlx-lm"),
    "variant:onnxruntime": ("numpy", "onnx", "onnxruntime"),
    "variant:openvino": ("numpy", "onnx", "openvino", "nncf"),
}


@functools.cache
def _installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def tool_versions(step: str) -> dict[str, str]:
    """Versions of the tools ``step`` (a :data:`STEP_TOOLS` name) depends on."""
    return {dist: _installed(dist) for dist in STEP_TOOLS[step]}


@dataclass(frozen=True)
class StepKey:
    """A step's cache key and the tool versions that went into it."""

    value: str
    tools: dict[str, str]


def step_key(step: str, **inputs: Any) -> StepKey:
    """The cache key of ``step``: a hash of everything that determines its output
    (its inputs and the versions of the tools it uses)."""
    tools = tool_versions(step)
    blob = json.dumps({"kind": step, **inputs, "tools": tools}, sort_keys=True, default=str)
    return StepKey(hashlib.sha256(blob.encode()).hexdigest(), tools)


def source_format(source: str) -> str:
    """'onnx' or 'gguf', from the source string."""
    kind, _, ref = source.partition(":")
    if kind == "builtin":
        return "gguf" if ref in BUILTIN_GGUF_MODELS else "onnx"
    path = ref.split("@", 1)[0]
    return "gguf" if path.endswith(".gguf") or kind == "hf" else "onnx"


class Preparer:
    """Runs preparation steps once each, caching them in the artifact store."""

    def __init__(self, store: ResultsStore, artifacts: ArtifactStore, cache_dir: Path) -> None:
        self.store = store
        self.artifacts = artifacts
        self.cache_dir = cache_dir
        self._inflight: dict[str, asyncio.Future[ArtifactRef]] = {}
        self._objects: dict[str, Any] = {}

    def _cached(self, key: str) -> ArtifactRecord | None:
        record = self.store.find_artifact(key)
        if record is not None and self.artifacts.has(record.sha256):
            return record
        return None

    def _record(self, key: str, ref: ArtifactRef, kind: str, provenance: dict[str, Any]) -> None:
        self.store.record_artifact(
            ArtifactRecord(
                key=key,
                sha256=ref.sha256,
                size_bytes=ref.size_bytes,
                kind=kind,
                name=ref.name,
                provenance=provenance,
                created_at=time.time(),
            )
        )

    def _bytes(self, ref: ArtifactRef) -> bytes:
        return self.artifacts.path(ref.sha256).read_bytes()

    async def _step(
        self, key: StepKey, kind: str, name: str, stats: PreparationStats, run: Any, *args: Any
    ) -> ArtifactRef:
        """A cached step: the recorded artifact, or run the Ray task ``run`` and store it.

        Artifact arguments travel as one object-store copy each. Concurrent requests
        for the same key share one run. The task returns
        {"model" or "reference": bytes, "provenance": {...}}."""
        found = self._cached(key.value)
        if found is not None:
            stats.cached += 1
            return _ref(found)
        task = self._inflight.get(key.value)
        if task is None:
            task = asyncio.ensure_future(self._run_step(key, kind, name, stats, run, args))
            self._inflight[key.value] = task
            task.add_done_callback(lambda _: self._inflight.pop(key.value, None))
        return await asyncio.shield(task)

    async def _run_step(
        self,
        key: StepKey,
        kind: str,
        name: str,
        stats: PreparationStats,
        run: Any,
        args: tuple[Any, ...],
    ) -> ArtifactRef:
        log.info("running %s on Ray for %s", getattr(run, "__name__", "step"), name)
        resolved = [self._object(a) if isinstance(a, ArtifactRef) else a for a in args]
        out = await run.remote(*resolved)
        stats.run += 1
        payload = out.get("model", out.get("reference"))
        ref = self.artifacts.put_bytes(payload, name)
        self._record(key.value, ref, kind, {**out["provenance"], "tools": key.tools})
        return ref

    def _object(self, ref: ArtifactRef) -> Any:
        """The artifact's bytes in Ray's object store (one copy per preparation)."""
        if ref.sha256 not in self._objects:
            self._objects[ref.sha256] = ray.put(self._bytes(ref))
        return self._objects[ref.sha256]

    def release(self) -> None:
        """Drop the object-store copies made while preparing a campaign."""
        self._objects.clear()

    # ----- sources ------------------------------------------------------------

    async def source(
        self, model_name: str, source: str, spec_dir: Path, stats: PreparationStats
    ) -> PreparedSource:
        """Materialise one model source."""
        if source_format(source) == "gguf":
            return await self._gguf_source(model_name, source, spec_dir, stats)
        kind, _, rest = source.partition(":")
        if kind == "builtin":
            return await self._builtin_onnx(model_name, rest, stats)
        if kind == "file":
            path = (spec_dir / rest).expanduser()
            if not path.is_file():
                raise SpecError(f"model '{model_name}': file not found: {path}")
            ref = self.artifacts.put_file(path, path.name)
            return PreparedSource(ref, None, None, "onnx", {"source": str(path)})
        raise SpecError(f"model '{model_name}': unsupported source '{source}'")

    async def _builtin_onnx(
        self, model_name: str, name: str, stats: PreparationStats
    ) -> PreparedSource:
        builtin = step_key("builtin", name=name, revision=BUILDER_REVISION)
        key = builtin.value
        names = {
            "model": f"{model_name}.onnx",
            "eval": f"{model_name}.eval.npz",
            "calibration": f"{model_name}.calibration.npz",
        }
        found = {part: self._cached(f"{key}:{part}") for part in names}
        if all(found.values()):
            stats.cached += 1
            model = found["model"]
            return PreparedSource(
                _ref(model),
                _ref(found["eval"]),
                _ref(found["calibration"]),
                "onnx",
                model.provenance if model else {},
            )
        out = await steps.materialize_builtin.remote(name)
        stats.run += 1
        refs = {part: self.artifacts.put_bytes(out[part], names[part]) for part in names}
        for part, ref in refs.items():
            self._record(f"{key}:{part}", ref, part, {**out["provenance"], "tools": builtin.tools})
        return PreparedSource(
            refs["model"], refs["eval"], refs["calibration"], "onnx", out["provenance"]
        )

    async def _gguf_source(
        self, model_name: str, source: str, spec_dir: Path, stats: PreparationStats
    ) -> PreparedSource:
        from coordinator.models.sources import resolve_llm_source

        path = await asyncio.to_thread(resolve_llm_source, source, spec_dir, self.cache_dir)
        original = self.artifacts.put_file(path, path.name)
        key = step_key("gguf-f16", source=original.sha256)
        f16 = await self._step(
            key,
            "gguf",
            f"{model_name}.F16.gguf",
            stats,
            steps.gguf_to_f16,
            original,
            original.name,
        )
        return PreparedSource(
            f16, None, None, "gguf", {"source": source, "source_sha256": original.sha256}
        )

    async def attach_files(
        self,
        prepared: PreparedSource,
        eval_path: Path | None,
        calibration_path: Path | None,
        stats: PreparationStats,
    ) -> PreparedSource:
        """Eval / calibration data: the user's files or the defaults, with the
        full-precision reference computed once per model and evaluation set."""
        if prepared.format == "gguf":
            text_path = eval_path or DEFAULT_EVAL_TEXT
            text = text_path.read_text(encoding="utf-8")
            key = step_key(
                "llm-reference",
                model=prepared.model.sha256,
                text=hashlib.sha256(text.encode()).hexdigest(),
                n_ctx=LLM_EVAL_CONTEXT,
                top_k=LLM_TOP_K,
            )
            prepared.eval_data = await self._step(
                key,
                "llm-reference",
                f"{text_path.stem}.reference.npz",
                stats,
                steps.llm_reference,
                prepared.model,
                text,
                LLM_EVAL_CONTEXT,
                LLM_TOP_K,
            )
            return prepared
        if calibration_path is not None:
            prepared.calibration = self.artifacts.put_file(calibration_path, "calibration.npz")
        if eval_path is not None:
            raw = self.artifacts.put_file(eval_path, "eval.npz")
            reference = step_key("reference", model=prepared.model.sha256, eval=raw.sha256)
            found = self._cached(reference.value)
            if found is not None:
                prepared.eval_data = _ref(found)
            else:
                data = await steps.add_reference.remote(
                    self._bytes(prepared.model), self._bytes(raw)
                )
                prepared.eval_data = self.artifacts.put_bytes(data, "eval.npz")
                provenance = {"reference_of": prepared.model.sha256, "tools": reference.tools}
                self._record(reference.value, prepared.eval_data, "eval", provenance)
        return prepared

    async def hf_folder(self, prepared: PreparedSource, stats: PreparationStats) -> ArtifactRef:
        """The model as a Hugging Face folder (a tar artifact), made once from its GGUF."""
        if prepared.format != "gguf":
            raise UnsupportedScheme(
                f"{prepared.model.name}: a Hugging Face folder is made from GGUF sources only"
            )
        key = step_key("gguf-hf", model=prepared.model.sha256)
        stem = prepared.model.name.removesuffix(".gguf").removesuffix(".F16")
        return await self._step(
            key, "hf-folder", f"{stem}.hf.tar", stats, steps.gguf_to_hf, prepared.model
        )

    # ----- variants -----------------------------------------------------------

    async def variants(
        self, jobs: list[tuple[PreparedSource, str, str, dict[str, Any]]], stats: PreparationStats
    ) -> list[ArtifactRef | Exception]:
        """Convert (source, backend, scheme) jobs concurrently; each distinct step once.

        A failed step gives its exception in place of the artifact, so one bad
        variant fails its own tasks and the rest of the campaign runs."""
        outcomes = await asyncio.gather(
            *(
                self._variant(src, backend, scheme, params, stats)
                for src, backend, scheme, params in jobs
            ),
            return_exceptions=True,
        )
        out: list[ArtifactRef | Exception] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            out.append(unwrap_ray_error(outcome) if isinstance(outcome, Exception) else outcome)
        return out

    async def _variant(
        self,
        src: PreparedSource,
        backend: str,
        scheme: str,
        params: dict[str, Any],
        stats: PreparationStats,
    ) -> ArtifactRef:
        """The artifact ``backend`` measures for ``scheme``, through whatever intermediate
        steps the source format needs (GGUF -> HF folder -> ONNX -> ...)."""
        if backend in PASSTHROUGH_BACKENDS:
            return src.model
        stem = src.model.name.split(".")[0]
        if backend == "llama-cpp":
            self._require(src, "gguf", backend)
            if (backend, scheme) in IDENTITY_SCHEMES:
                return src.model
            return await self._step(
                self._key(src.model, backend, scheme, params=params),
                "gguf",
                f"{stem}.{scheme}.gguf",
                stats,
                steps.quantize_gguf,
                src.model,
                scheme,
            )
        if backend == "mlx":
            self._require(src, "gguf", backend)
            hf = await self.hf_folder(src, stats)
            return await self._step(
                self._key(hf, backend, scheme, params=params),
                "mlx",
                f"{stem}.mlx-{scheme}.tar",
                stats,
                steps.convert_mlx,
                hf,
                scheme,
                params,
            )
        if backend not in ("onnxruntime", "openvino", HUB_BACKEND):
            raise UnsupportedScheme(f"no conversion for backend '{backend}' yet")
        onnx = src.model if src.format == "onnx" else await self.onnx_export(src, stats)
        if backend == HUB_BACKEND:
            return onnx  # quantized and compiled by hub jobs, not here (agent.hub.executor)
        if (backend, scheme) in IDENTITY_SCHEMES:
            return onnx
        key = self._key(onnx, backend, scheme, src.calibration, params)
        if backend == "onnxruntime":
            return await self._step(
                key,
                "onnx",
                f"{stem}.{scheme}.onnx",
                stats,
                steps.convert_onnx,
                onnx,
                scheme,
                src.calibration,
                params,
            )
        return await self._step(
            key,
            "openvino-ir",
            f"{stem}.ov-{scheme}.tar",
            stats,
            steps.convert_openvino,
            onnx,
            scheme,
            src.calibration,
            params,
        )

    async def onnx_export(self, src: PreparedSource, stats: PreparationStats) -> ArtifactRef:
        """The causal LM exported to ONNX from its Hugging Face folder, once."""
        hf = await self.hf_folder(src, stats)
        stem = src.model.name.split(".")[0]
        return await self._step(
            step_key("hf-onnx", hf=hf.sha256),
            "onnx",
            f"{stem}.onnx",
            stats,
            steps.export_onnx,
            hf,
        )

    async def hub_inputs(
        self, src: PreparedSource, model: ArtifactRef, stats: PreparationStats
    ) -> ArtifactRef:
        """What a Qualcomm AI Hub task ships besides ``model``: its input shapes, the
        calibration set (for hub quantize jobs) and the eval set, once per model
        (the file format: :mod:`agent.hub.bundle`)."""
        key = step_key(
            "hub-inputs",
            model=model.sha256,
            eval=src.eval_data.sha256 if src.eval_data else None,
            calibration=src.calibration.sha256 if src.calibration else None,
            revision=BUILDER_REVISION,
        )
        stem = model.name.split(".")[0]
        return await self._step(
            key,
            "hub-inputs",
            f"{stem}.hub-inputs.npz",
            stats,
            steps.hub_inputs,
            model,
            src.eval_data,
            src.calibration,
        )

    def _key(
        self,
        model: ArtifactRef,
        backend: str,
        scheme: str,
        calibration: ArtifactRef | None = None,
        params: dict[str, Any] | None = None,
    ) -> StepKey:
        extra = {"params": params} if params else {}  # without params: the keys of before
        return step_key(
            f"variant:{backend}",
            model=model.sha256,
            calibration=calibration.sha256 if calibration else None,
            scheme=scheme,
            **extra,
        )

    @staticmethod
    def _require(src: PreparedSource, fmt: str, backend: str) -> None:
        if src.format != fmt:
            raise UnsupportedScheme(
                f"{backend} measures {fmt.upper()} models; {src.model.name} is "
                f"{src.format.upper()} (no conversion between them)"
            )


def unwrap_ray_error(error: Exception) -> Exception:
    """The error raised inside a Ray task, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def _ref(record: ArtifactRecord | None) -> ArtifactRef:
    assert record is not None
    return ArtifactRef(record.sha256, record.size_bytes, record.name)

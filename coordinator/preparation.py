"""Model preparation: materialise sources and convert / quantize variants, each once.

Every step runs as a Ray task (:mod:`coordinator.steps`) that reads its inputs from the
content-addressed artifact store by path and writes its output there (models never pass
through the coordinator's memory or Ray's object store); the coordinator records the
step under a key made of its inputs (source hash, tool versions, parameters). A step
whose key is recorded — and whose artifact is still on disk — is never run again, so a
campaign over N devices converts each variant once.

Two model formats: ONNX (the digit classifier, user files) and language models. A
language model's root is a Hugging Face checkpoint (a folder, or a hub snapshot) or a
GGUF file. From a checkpoint: llama.cpp's own converter makes the F16 GGUF, and the ONNX
export, MLX and ONNX Runtime GenAI read the checkpoint directly; from a GGUF: it is
dequantized to F16 and a Hugging Face folder is made from it for the others. Every
llama.cpp type is made from the F16 GGUF, and the F16 GGUF's token log-probabilities on
the evaluation text are the fidelity reference (llama.cpp scores the whole text in
seconds, with one tokenization every backend is fed; the F16 GGUF is itself checked
against the checkpoint). Each full-precision conversion (GGUF F16, ONNX fp32, OpenVINO IR
fp32/fp16, MLX fp16, ONNX GenAI fp32) is checked against the checkpoint's own logits
(transformers, float32) before it is stored
(:mod:`coordinator.conversion.logit_check`).
Qualcomm AI Hub variants are the FP32 ONNX model itself (the hub quantizes and compiles
it in its own jobs) plus a hub inputs file with the calibration and eval sets.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import ray

from agent.llm_eval import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K, TAIL_SEED
from coordinator import steps
from coordinator.artifacts import ArtifactStore
from coordinator.conversion.olive_convert import SCHEME_PREFIX as OLIVE_PREFIX
from coordinator.conversion.olive_convert import olive_request, read_workflow, workflow_sha256
from coordinator.models.texts import DEFAULT_EVAL_TEXT
from coordinator.spec import DEFAULT_FIDELITY_CONTEXT, ENDPOINT_BACKEND
from edgefarm.domain import HUB_BACKEND, ArtifactRef
from edgefarm.errors import ArtifactError, ConversionError, SpecError, UnsupportedScheme
from results.records import ArtifactRecord
from results.store import ResultsStore

log = logging.getLogger(__name__)

# Bump when a builder's output would change for the same inputs.
BUILDER_REVISION = 1
# Backends measured from the source model as-is (no conversion step).
PASSTHROUGH_BACKENDS = frozenset({"noop"})
# (backend, scheme) pairs whose artifact is the prepared source model itself.
IDENTITY_SCHEMES = frozenset({("onnxruntime", "fp32"), ("llama-cpp", "F16")})
# Backends that measure ONNX Runtime GenAI folders (the same artifact for both).
GENAI_BACKENDS = ("onnxruntime-genai", "foundry-local")
# Backends that measure llama.cpp's GGUF: in-process, and through llama.cpp's server.
GGUF_BACKENDS = ("llama-cpp", "llama-server")
# Language-model fidelity: default context per evaluation chunk (a campaign sets its own
# with measurement.fidelity_context_tokens), reference top-k and tail samples kept.
LLM_EVAL_CONTEXT = DEFAULT_FIDELITY_CONTEXT
LLM_TOP_K = DEFAULT_TOP_K
LLM_TAIL_SAMPLES = DEFAULT_TAIL_SAMPLES
MAX_EVAL_TEXT_BYTES = 16 << 20
BUILTIN_GGUF_MODELS = ("smollm2-135m",)


@dataclass
class PreparedSource:
    """A model source materialised into artifacts. For language models ``model`` is the
    F16 GGUF and ``checkpoint`` the Hugging Face folder (the user's checkpoint, or one
    made from the GGUF on first use); ``logits`` are the checkpoint's own logits that
    full-precision conversions are checked against."""

    model: ArtifactRef
    eval_data: ArtifactRef | None
    calibration: ArtifactRef | None
    format: str = "onnx"
    provenance: dict[str, Any] = field(default_factory=dict)
    checkpoint: ArtifactRef | None = None
    logits: ArtifactRef | None = None


@dataclass
class PreparationStats:
    """How many conversion steps ran now and how many came from the store."""

    run: int = 0
    cached: int = 0


# The distributions whose version can change a step's output; their versions are part
# of that step's key, so upgrading one tool redoes only the steps that use it.
STEP_TOOLS: dict[str, tuple[str, ...]] = {
    "builtin": ("numpy", "scikit-learn", "onnx", "onnxruntime"),
    "source-files": (),
    "reference": ("numpy", "onnxruntime"),
    "gguf-f16": ("numpy", "gguf"),
    "llm-reference": ("numpy", "llama-cpp-python"),
    "gguf-hf": ("gguf", "torch", "transformers"),
    "checkpoint-logits": ("torch", "transformers"),
    "checkpoint-gguf": ("torch", "transformers", "llama-cpp-python"),
    "hf-onnx": ("torch", "transformers", "onnx", "onnxruntime"),
    "hub-inputs": ("numpy", "onnx"),
    "variant:llama-cpp": ("llama-cpp-python",),
    "variant:mlx": ("mlx", "mlx-lm", "transformers"),
    "variant:olive": ("olive-ai", "onnxruntime", "onnx"),
    "variant:onnxruntime-genai": ("onnxruntime-genai", "onnxruntime", "torch", "transformers"),
    "variant:onnxruntime": ("numpy", "onnx", "onnxruntime"),
    "variant:openvino": ("numpy", "onnx", "openvino", "nncf", "transformers"),
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


def is_llm_source(source: str, path: Path | None = None) -> bool:
    """True when ``source`` names a language model (a GGUF file, a checkpoint folder,
    a hub repository or a builtin LLM); False for an ONNX model. ``path``: where a
    ``file:`` source is on the coordinator (see :mod:`coordinator.uploads`)."""
    kind, _, ref = source.partition(":")
    if kind == "builtin":
        return ref in BUILTIN_GGUF_MODELS
    if kind == "hf":
        return True
    return path is not None and (path.suffix == ".gguf" or path.is_dir())


class Preparer:
    """Runs preparation steps once each, caching them in the artifact store."""

    def __init__(self, store: ResultsStore, artifacts: ArtifactStore, cache_dir: Path) -> None:
        self.store = store
        self.artifacts = artifacts
        self.cache_dir = cache_dir
        self._inflight: dict[str, asyncio.Future[ArtifactRef]] = {}

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

    async def _step(
        self, key: StepKey, kind: str, name: str, stats: PreparationStats, run: Any, *args: Any
    ) -> ArtifactRef:
        """A cached step: the recorded artifact, or run the Ray task ``run`` (which gets
        the artifact store's root first, then ``args``) and record what it stored.

        Artifact arguments travel as references; the step reads them by path.
        Concurrent requests for the same key share one run."""
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
        step = str(getattr(run, "_function_name", "step")).rsplit(".", 1)[-1]
        log.info("running %s on Ray for %s", step, name)
        try:
            out = await run.remote(str(self.artifacts.root), *args)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
            raise ConversionError(
                f"{name}: the {step} step's process died "
                f"(a native crash or out of memory): {str(err).splitlines()[0]}"
            ) from err
        stats.run += 1
        if not self.artifacts.has(out["sha256"]):
            raise ArtifactError(f"step for {name} reported an artifact that is not in the store")
        stored = out.get("name") or ""
        if name.endswith(".onnx") and stored.endswith(".onnx.tar"):
            name += ".tar"  # the export came with external data: a folder artifact
        ref = ArtifactRef(out["sha256"], int(out["size_bytes"]), name)
        self._record(key.value, ref, kind, {**out["provenance"], "tools": key.tools})
        return ref

    # ----- sources ------------------------------------------------------------

    async def source(
        self, model_name: str, source: str, path: Path | None, stats: PreparationStats
    ) -> PreparedSource:
        """Materialise one model source; ``path``: where a ``file:`` source is on the
        coordinator (its upload, or a file under the model root), never read from the
        spec itself."""
        kind, _, rest = source.partition(":")
        if kind == "file" and path is None:
            raise SpecError(f"model '{model_name}': {source} has no coordinator-side path")
        if is_llm_source(source, path):
            return await self._llm_source(model_name, source, path, stats)
        if kind == "builtin":
            return await self._builtin_onnx(model_name, rest, stats)
        if kind == "file" and path is not None:
            if not path.is_file():
                raise SpecError(f"model '{model_name}': file not found: {path}")
            ref = await asyncio.to_thread(self.artifacts.put_file, path, path.name)
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

    async def _llm_source(
        self, model_name: str, source: str, local: Path | None, stats: PreparationStats
    ) -> PreparedSource:
        from coordinator.models.sources import resolve_llm_source

        # A file: source is resolved from its coordinator-side path, never the spec's.
        named = f"file:{local}" if local is not None else source
        path = await asyncio.to_thread(resolve_llm_source, named, self.cache_dir, self.cache_dir)
        if path.is_dir():
            return await self._checkpoint_source(model_name, source, path, stats)
        st = path.stat()
        original = await self._ingest(
            source,
            [(path.name, st)],
            lambda: self.artifacts.put_file(path, path.name),
            path,
        )
        f16 = await self._step(
            step_key("gguf-f16", source=original.sha256),
            "gguf",
            f"{model_name}.F16.gguf",
            stats,
            steps.gguf_to_f16,
            original,
        )
        return PreparedSource(
            f16,
            None,
            None,
            "gguf",
            {"source": source, "source_path": str(path), "source_sha256": original.sha256},
        )

    async def _checkpoint_source(
        self, model_name: str, source: str, folder: Path, stats: PreparationStats
    ) -> PreparedSource:
        """A Hugging Face checkpoint: stored once as a folder artifact (re-packed only
        when its files change), its own logits, and its F16 GGUF."""
        from coordinator.models.sources import checkpoint_files

        files = await asyncio.to_thread(checkpoint_files, folder)
        names = {name for name, _ in files}
        stored = await self._ingest(
            source,
            files,
            lambda: self.artifacts.put_folder(folder, "checkpoint.tar", lambda rel: rel in names),
            folder,
        )
        checkpoint = replace(stored, name=f"{model_name}.checkpoint.tar")
        prepared = PreparedSource(
            checkpoint,  # replaced by the F16 GGUF below
            None,
            None,
            "gguf",
            {"source": source, "source_path": str(folder), "checkpoint_sha256": checkpoint.sha256},
            checkpoint=checkpoint,
        )
        logits = await self.logits(prepared, stats)
        prepared.model = await self._step(
            step_key(
                "checkpoint-gguf",
                checkpoint=checkpoint.sha256,
                converter=_converter_version(),
                logits=logits.sha256,
            ),
            "gguf",
            f"{model_name}.F16.gguf",
            stats,
            steps.checkpoint_to_gguf,
            checkpoint,
            logits,
        )
        return prepared

    async def _ingest(
        self,
        source: str,
        files: list[tuple[str, os.stat_result]],
        put: Callable[[], ArtifactRef],
        path: Path,
    ) -> ArtifactRef:
        """A source's files in the artifact store, copied (and hashed) only when one of
        them changed size or modification time since they were last stored: a model of
        several GB is not re-read for every campaign."""
        fingerprint = step_key(
            "source-files",
            path=str(path.resolve()),
            files=[(name, st.st_size, st.st_mtime_ns) for name, st in files],
        )
        found = self._cached(fingerprint.value)
        if found is not None:
            return _ref(found)
        ref = await asyncio.to_thread(put)
        self._record(fingerprint.value, ref, "source", {"source": source, "path": str(path)})
        return ref

    async def attach_files(
        self,
        prepared: PreparedSource,
        eval_path: Path | None,
        calibration_path: Path | None,
        stats: PreparationStats,
        fidelity_context: int = LLM_EVAL_CONTEXT,
    ) -> PreparedSource:
        """Eval / calibration data: the user's files or the defaults, with the
        full-precision reference computed once per model, evaluation set and (for a
        language model) fidelity context: the chunk length perplexity, KLD and top-1
        are scored in."""
        if prepared.format == "gguf":
            if fidelity_context < 2:
                raise SpecError(
                    f"fidelity_context_tokens must be at least 2, got {fidelity_context}"
                )
            text = _eval_text(eval_path)
            key = step_key(
                "llm-reference",
                model=prepared.model.sha256,
                text=hashlib.sha256(text.encode()).hexdigest(),
                n_ctx=fidelity_context,
                top_k=LLM_TOP_K,
                tail_samples=LLM_TAIL_SAMPLES,
                tail_seed=TAIL_SEED,
                vocabulary=True,  # the reference carries the vocabulary's text pieces
            )
            prepared.eval_data = await self._step(
                key,
                "llm-reference",
                f"{(eval_path or DEFAULT_EVAL_TEXT).stem}.reference.npz",
                stats,
                steps.llm_reference,
                prepared.model,
                text,
                fidelity_context,
                LLM_TOP_K,
                LLM_TAIL_SAMPLES,
            )
            prepared.provenance["eval_text"] = str(eval_path) if eval_path else "default"
            prepared.provenance["fidelity_context_tokens"] = fidelity_context
            return prepared
        if calibration_path is not None:
            prepared.calibration = await asyncio.to_thread(
                self.artifacts.put_file, calibration_path, "calibration.npz"
            )
        if eval_path is not None:
            raw = await asyncio.to_thread(self.artifacts.put_file, eval_path, "eval.npz")
            prepared.eval_data = await self._step(
                step_key("reference", model=prepared.model.sha256, eval=raw.sha256),
                "eval",
                "eval.npz",
                stats,
                steps.add_reference,
                prepared.model,
                raw,
            )
        return prepared

    async def hf_folder(self, prepared: PreparedSource, stats: PreparationStats) -> ArtifactRef:
        """The model as a Hugging Face folder (a folder artifact): the user's checkpoint,
        or one made once from the GGUF."""
        if prepared.checkpoint is not None:
            return prepared.checkpoint
        if prepared.format != "gguf":
            raise UnsupportedScheme(
                f"{prepared.model.name}: a Hugging Face folder is made from language models only"
            )
        key = step_key("gguf-hf", model=prepared.model.sha256)
        stem = prepared.model.name.removesuffix(".gguf").removesuffix(".F16")
        prepared.checkpoint = await self._step(
            key, "hf-folder", f"{stem}.hf.tar", stats, steps.gguf_to_hf, prepared.model
        )
        return prepared.checkpoint

    async def logits(self, prepared: PreparedSource, stats: PreparationStats) -> ArtifactRef:
        """The checkpoint's own logits on the first tokens of the default evaluation
        text: what every full-precision conversion is checked against."""
        if prepared.logits is None:
            hf = await self.hf_folder(prepared, stats)
            text = DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")
            prepared.logits = await self._step(
                step_key(
                    "checkpoint-logits",
                    checkpoint=hf.sha256,
                    text=hashlib.sha256(text.encode()).hexdigest(),
                    tokens=steps.LOGIT_CHECK_TOKENS,
                ),
                "checkpoint-logits",
                f"{hf.name.split('.')[0]}.logits.npz",
                stats,
                steps.checkpoint_logits,
                hf,
                text,
            )
        return prepared.logits

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
        steps the source format needs (checkpoint or GGUF -> HF folder -> ONNX -> ...)."""
        if backend in PASSTHROUGH_BACKENDS:
            return src.model
        stem = src.model.name.split(".")[0]
        if backend == ENDPOINT_BACKEND:  # the artifact says which endpoint to measure
            self._require(src, "gguf", backend)
            descriptor = json.dumps(params, sort_keys=True).encode()
            return await asyncio.to_thread(
                self.artifacts.put_bytes, descriptor, f"{stem}.endpoint.json"
            )
        if backend == "vllm":  # served from the checkpoint folder, in the scheme's dtype
            self._require(src, "gguf", backend)
            return await self.hf_folder(src, stats)
        if backend in GGUF_BACKENDS:  # one GGUF per type serves both
            self._require(src, "gguf", backend)
            if ("llama-cpp", scheme) in IDENTITY_SCHEMES:
                return src.model
            return await self._step(
                self._key(src.model, "llama-cpp", scheme, params=params),
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
            logits = await self.logits(src, stats) if scheme == "fp16" else None
            return await self._step(
                self._key(hf, backend, scheme, params=params, logits=logits),
                "mlx",
                f"{stem}.mlx-{scheme}.tar",
                stats,
                steps.convert_mlx,
                hf,
                scheme,
                params,
                logits,
            )
        if backend in GENAI_BACKENDS:  # one ONNX GenAI artifact serves both
            self._require(src, "gguf", backend)
            hf = await self.hf_folder(src, stats)
            logits = await self.logits(src, stats) if scheme == "fp32" else None
            return await self._step(
                self._key(hf, "onnxruntime-genai", scheme, params=params, logits=logits),
                "onnx-genai",
                f"{stem}.genai-{scheme}.tar",
                stats,
                steps.convert_genai,
                hf,
                scheme,
                params,
                logits,
            )
        if backend not in ("onnxruntime", "openvino", HUB_BACKEND):
            raise UnsupportedScheme(f"no conversion for backend '{backend}' yet")
        onnx = src.model if src.format == "onnx" else await self.onnx_export(src, stats)
        if backend == HUB_BACKEND:
            return onnx  # quantized and compiled by hub jobs, not here (agent.hub.executor)
        if (backend, scheme) in IDENTITY_SCHEMES:
            return onnx
        if backend == "onnxruntime" and scheme.startswith(OLIVE_PREFIX):
            return await self._olive(onnx, scheme, params, stats)
        if backend == "onnxruntime":
            return await self._step(
                self._key(onnx, backend, scheme, src.calibration, params),
                "onnx",
                f"{stem}.{scheme}.onnx",
                stats,
                steps.convert_onnx,
                onnx,
                scheme,
                src.calibration,
                params,
            )
        checked = src.format == "gguf" and scheme in ("fp32", "fp16")
        logits = await self.logits(src, stats) if checked else None
        return await self._step(
            self._key(onnx, backend, scheme, src.calibration, params, logits),
            "openvino-ir",
            f"{stem}.ov-{scheme}.tar",
            stats,
            steps.convert_openvino,
            onnx,
            scheme,
            src.calibration,
            params,
            logits,
        )

    async def _olive(
        self, onnx: ArtifactRef, scheme: str, params: dict[str, Any], stats: PreparationStats
    ) -> ArtifactRef:
        """An ``olive-*`` scheme: the Olive command or workflow applied to ``onnx``, keyed
        by Olive's version, the command or the workflow's contents, and the input."""
        try:
            request = olive_request(params)
        except ValueError as err:
            raise SpecError(f"{scheme}: {err}") from None
        command = request.get("command")
        workflow = None
        if "workflow_path" in request:
            workflow = await asyncio.to_thread(read_workflow, Path(request["workflow_path"]))
        run = {"command": command} if workflow is None else {"workflow": workflow_sha256(workflow)}
        return await self._step(
            step_key("variant:olive", model=onnx.sha256, scheme=scheme, **run),
            "onnx",
            f"{onnx.name.split('.')[0]}.{scheme}.onnx",
            stats,
            steps.convert_olive,
            onnx,
            command,
            workflow,
        )

    async def onnx_export(self, src: PreparedSource, stats: PreparationStats) -> ArtifactRef:
        """The causal LM exported to ONNX from its Hugging Face folder, once, checked
        against the checkpoint's logits."""
        hf = await self.hf_folder(src, stats)
        logits = await self.logits(src, stats)
        stem = src.model.name.split(".")[0]
        return await self._step(
            step_key("hf-onnx", hf=hf.sha256, logits=logits.sha256),
            "onnx",
            f"{stem}.onnx",
            stats,
            steps.export_onnx,
            hf,
            logits,
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
        logits: ArtifactRef | None = None,
    ) -> StepKey:
        extra: dict[str, Any] = {"params": params} if params else {}
        if logits is not None:
            extra["logits"] = logits.sha256
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
                f"{backend} measures language models; {src.model.name} is "
                f"{src.format.upper()} (no conversion between them)"
            )


def _eval_text(path: Path | None) -> str:
    """The evaluation text (the user's file or the default), read with a size cap."""
    text_path = path or DEFAULT_EVAL_TEXT
    if text_path.stat().st_size > MAX_EVAL_TEXT_BYTES:
        raise SpecError(
            f"evaluation text {text_path} is larger than {MAX_EVAL_TEXT_BYTES >> 20} MiB"
        )
    try:
        return text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"evaluation text {text_path} is not UTF-8: {err}") from None


def _converter_version() -> str:
    from coordinator.conversion.hf_to_gguf import converter_version

    return converter_version()


def unwrap_ray_error(error: Exception) -> Exception:
    """The error raised inside a Ray task, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def _ref(record: ArtifactRecord | None) -> ArtifactRef:
    assert record is not None
    return ArtifactRef(record.sha256, record.size_bytes, record.name)

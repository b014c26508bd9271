"""Model preparation on Ray: materialise model sources and convert/quantize variants.

Every step is a Ray task that returns bytes plus provenance; the coordinator puts
the bytes in the content-addressed artifact store and records the step under a key
made of its inputs (source hash, tool and version, parameters). A step whose key is
already recorded — and whose artifact is still on disk — is never run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from coordinator.artifacts import ArtifactStore
from edgefarm.domain import ArtifactRef
from edgefarm.errors import SpecError, UnsupportedScheme, UsageError
from results.records import ArtifactRecord
from results.store import ResultsStore

log = logging.getLogger(__name__)

# Bump when a builder's output would change for the same inputs.
BUILDER_REVISION = 1
# Backends measured from the source model as-is (no conversion step).
PASSTHROUGH_BACKENDS = frozenset({"noop"})
# (backend, scheme) pairs whose artifact is the source model itself.
IDENTITY_SCHEMES = frozenset({("onnxruntime", "fp32")})


@dataclass
class PreparedSource:
    """A model source materialised into artifacts."""

    model: ArtifactRef
    eval_data: ArtifactRef | None
    calibration: ArtifactRef | None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparationStats:
    """How many conversion steps ran now and how many came from the store."""

    run: int = 0
    cached: int = 0


# ----- Ray tasks (run in worker processes; import heavy tools inside) ---------


@ray.remote(num_cpus=1, max_retries=0)
def materialize_builtin(name: str) -> dict[str, Any]:
    """Build a model the project ships the recipe for."""
    if name != "digits-mlp":
        raise UsageError(f"unknown builtin model '{name}' (known: digits-mlp)")
    from coordinator.models.digits import build_digits_model

    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_digits_model(Path(tmp))
        return {
            "model": bundle.model_path.read_bytes(),
            "eval": bundle.eval_path.read_bytes(),
            "calibration": bundle.calibration_path.read_bytes(),
            "provenance": {"builder": "coordinator.models.digits", **_jsonable(bundle.metadata)},
        }


@ray.remote(num_cpus=1, max_retries=0)
def add_reference(model: bytes, eval_npz: bytes) -> bytes:
    """Compute the FP32 reference outputs for an eval set that lacks them."""
    import numpy as np
    import onnxruntime as ort

    data = dict(np.load(io.BytesIO(eval_npz)))
    if "reference" in data:
        return eval_npz
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    data["reference"] = session.run(None, {name: data["inputs"].astype(np.float32)})[0]
    out = io.BytesIO()
    np.savez(out, **data)
    return out.getvalue()


@ray.remote(num_cpus=1, max_retries=0)
def convert_onnx(model: bytes, scheme: str, calibration: bytes | None) -> dict[str, Any]:
    """Quantize / convert an ONNX model to one scheme."""
    import numpy as np

    from coordinator.conversion.onnx_schemes import quantize_onnx

    calib = np.load(io.BytesIO(calibration))["inputs"] if calibration else None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src.onnx", Path(tmp) / "dst.onnx"
        src.write_bytes(model)
        provenance = quantize_onnx(src, dst, scheme, calib)
        return {"model": dst.read_bytes(), "provenance": _jsonable(provenance)}


# ----- coordinator side -------------------------------------------------------


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


def tool_versions() -> dict[str, str]:
    """Versions of the conversion tools, part of every step key."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("onnx", "onnxruntime", "scikit-learn"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def step_key(kind: str, **inputs: Any) -> str:
    """The cache key of a step: a hash of everything that determines its output."""
    blob = json.dumps({"kind": kind, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Preparer:
    """Runs preparation steps once each, caching them in the artifact store."""

    def __init__(self, store: ResultsStore, artifacts: ArtifactStore) -> None:
        self.store = store
        self.artifacts = artifacts
        self.tools = tool_versions()

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

    async def source(
        self, model_name: str, source: str, spec_dir: Path, stats: PreparationStats
    ) -> PreparedSource:
        """Materialise one model source (builtin recipe or local file)."""
        scheme, _, rest = source.partition(":")
        if scheme == "builtin":
            key = step_key("builtin", name=rest, revision=BUILDER_REVISION, tools=self.tools)
            names = {
                "model": f"{model_name}.onnx",
                "eval": f"{model_name}.eval.npz",
                "calibration": f"{model_name}.calibration.npz",
            }
            found = {part: self._cached(f"{key}:{part}") for part in names}
            if all(found.values()):
                stats.cached += 1
                return PreparedSource(
                    model=_ref(found["model"]),
                    eval_data=_ref(found["eval"]),
                    calibration=_ref(found["calibration"]),
                    provenance=found["model"].provenance if found["model"] else {},
                )
            out = await materialize_builtin.remote(rest)
            stats.run += 1
            refs = {part: self.artifacts.put_bytes(out[part], names[part]) for part in names}
            for part, ref in refs.items():
                self._record(f"{key}:{part}", ref, part, out["provenance"])
            return PreparedSource(
                refs["model"], refs["eval"], refs["calibration"], out["provenance"]
            )
        if scheme == "file":
            path = (spec_dir / rest).expanduser()
            if not path.is_file():
                raise SpecError(f"model '{model_name}': file not found: {path}")
            ref = self.artifacts.put_file(path, path.name)
            return PreparedSource(
                model=ref, eval_data=None, calibration=None, provenance={"source": str(path)}
            )
        if scheme == "hf":
            raise UsageError(
                f"model '{model_name}': Hugging Face sources are not supported by the "
                "onnxruntime path yet; export to ONNX and use file:PATH"
            )
        raise SpecError(f"model '{model_name}': unknown source '{source}'")

    async def attach_files(
        self, prepared: PreparedSource, eval_path: Path | None, calibration_path: Path | None
    ) -> PreparedSource:
        """Use a user's eval / calibration files, computing the FP32 reference once."""
        if calibration_path is not None:
            prepared.calibration = self.artifacts.put_file(calibration_path, "calibration.npz")
        if eval_path is not None:
            raw = self.artifacts.put_file(eval_path, "eval.npz")
            key = step_key(
                "reference", model=prepared.model.sha256, eval=raw.sha256, tools=self.tools
            )
            found = self._cached(key)
            if found is not None:
                prepared.eval_data = _ref(found)
            else:
                model = self.artifacts.path(prepared.model.sha256).read_bytes()
                data = await add_reference.remote(
                    model, self.artifacts.path(raw.sha256).read_bytes()
                )
                prepared.eval_data = self.artifacts.put_bytes(data, "eval.npz")
                self._record(
                    key, prepared.eval_data, "eval", {"reference_of": prepared.model.sha256}
                )
        return prepared

    async def variants(
        self, jobs: list[tuple[PreparedSource, str, str]], stats: PreparationStats
    ) -> list[ArtifactRef | Exception]:
        """Convert (source, backend, scheme) jobs concurrently; each distinct step once.

        A failed step gives its exception in place of the artifact, so one bad
        variant fails its own tasks and the rest of the campaign runs."""
        keys = [self._variant_key(src, backend, scheme) for src, backend, scheme in jobs]
        unique: dict[str, tuple[PreparedSource, str, str]] = {}
        for key, job in zip(keys, jobs, strict=True):
            unique.setdefault(key, job)
        done: dict[str, ArtifactRef | Exception] = {}
        missing: list[str] = []
        for key, (src, backend, scheme) in unique.items():
            if backend in PASSTHROUGH_BACKENDS or (backend, scheme) in IDENTITY_SCHEMES:
                done[key] = src.model
            elif (found := self._cached(key)) is not None:
                done[key] = _ref(found)
                stats.cached += 1
            else:
                missing.append(key)
        results = await asyncio.gather(
            *(self._convert(key, *unique[key]) for key in missing), return_exceptions=True
        )
        for key, outcome in zip(missing, results, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            done[key] = _unwrap(outcome) if isinstance(outcome, Exception) else outcome
            stats.run += 1
        return [done[key] for key in keys]

    def _variant_key(self, src: PreparedSource, backend: str, scheme: str) -> str:
        return step_key(
            "variant",
            model=src.model.sha256,
            calibration=src.calibration.sha256 if src.calibration else None,
            backend=backend,
            scheme=scheme,
            tools=self.tools,
        )

    async def _convert(
        self, key: str, src: PreparedSource, backend: str, scheme: str
    ) -> ArtifactRef:
        if backend != "onnxruntime":
            raise UnsupportedScheme(f"no conversion for backend '{backend}' yet")
        model = self.artifacts.path(src.model.sha256).read_bytes()
        calibration = (
            self.artifacts.path(src.calibration.sha256).read_bytes() if src.calibration else None
        )
        log.info("converting %s to %s on Ray", src.model.name, scheme)
        out = await convert_onnx.remote(model, scheme, calibration)
        stem = src.model.name.removesuffix(".onnx")
        ref = self.artifacts.put_bytes(out["model"], f"{stem}.{scheme}.onnx")
        provenance = {"source_sha256": src.model.sha256, **out["provenance"]}
        self._record(key, ref, "onnx", provenance)
        return ref


def _unwrap(error: Exception) -> Exception:
    """The error raised inside a Ray task, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def _ref(record: ArtifactRecord | None) -> ArtifactRef:
    assert record is not None
    return ArtifactRef(record.sha256, record.size_bytes, record.name)


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))

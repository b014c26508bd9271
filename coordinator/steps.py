"""Preparation steps as Ray tasks. The caching around them lives in
:mod:`coordinator.preparation`.

Every step opens the artifact store by its root (a folder every Ray node can reach),
reads its inputs there by path, writes its output into the store's staging area and
moves it into place under its hash: models never travel through Ray's object store or
through memory whole. A step returns ``{"sha256", "size_bytes", "provenance"}``; the
provenance carries the step's own peak RSS (language-model steps run in a fresh worker,
``max_calls=1``, so that figure is theirs alone) and its children's. Heavy tools are
imported inside the task, in the Ray worker.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from coordinator.artifacts import ArtifactStore
from coordinator.conversion.files import maxrss_bytes
from edgefarm.domain import ArtifactRef
from edgefarm.errors import UsageError

BUILTIN_ONNX_MODELS = ("digits-mlp",)
# Logit-check reference: this many tokens of the evaluation text.
LOGIT_CHECK_TOKENS = 32


def jsonable(data: Any) -> Any:
    """Provenance as plain JSON values."""
    return json.loads(json.dumps(data, default=str))


def _rss_bytes(who: int) -> int:
    return maxrss_bytes(resource.getrusage(who).ru_maxrss)


@contextlib.contextmanager
def _step(root: str) -> Iterator[tuple[ArtifactStore, Path]]:
    """The store and a staging folder on its filesystem (removed afterwards)."""
    store = ArtifactStore(Path(root))
    staging = store.staging()
    try:
        yield store, staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _done(ref: ArtifactRef, provenance: dict[str, Any], started: float) -> dict[str, Any]:
    figures = {
        "step_wall_s": round(time.perf_counter() - started, 3),
        "step_peak_rss_bytes": _rss_bytes(resource.RUSAGE_SELF),
        "step_children_peak_rss_bytes": _rss_bytes(resource.RUSAGE_CHILDREN),
    }
    return {
        "sha256": ref.sha256,
        "size_bytes": ref.size_bytes,
        "name": ref.name,
        "provenance": jsonable({**provenance, **figures}),
    }


def _linked(store: ArtifactStore, ref: ArtifactRef, folder: Path, name: str) -> Path:
    """The artifact under ``name`` in ``folder`` (a symbolic link: tools that care
    about file names or extensions see one, nothing is copied)."""
    link = folder / name
    link.symlink_to(store.existing(ref))
    return link


def onnx_model_path(store: ArtifactStore, ref: ArtifactRef, folder: Path) -> Path:
    """The ``.onnx`` file of an ONNX artifact: a single file, or a folder artifact
    (``*.onnx.tar``: the graph with its external weight files)."""
    if ref.name.endswith(".onnx.tar"):
        graphs = sorted(store.folder(ref.sha256).glob("*.onnx"))
        if len(graphs) != 1:
            raise UsageError(f"{ref.name} must hold exactly one .onnx file")
        return graphs[0]
    return _linked(store, ref, folder, "model.onnx")


def store_onnx(store: ArtifactStore, out: Path, name: str) -> ArtifactRef:
    """An ONNX model written at ``out``: one file, or (with external data files beside
    it) the folder as one artifact named ``*.onnx.tar``."""
    if len([p for p in out.parent.iterdir() if p.is_file()]) > 1:
        return store.put_folder(out.parent, name.removesuffix(".onnx") + ".onnx.tar")
    return store.adopt(out, name)


# ----- classifier steps --------------------------------------------------------------


@ray.remote(num_cpus=1, max_retries=0)
def materialize_builtin(name: str) -> dict[str, Any]:
    """Build an ONNX model the project ships the recipe for (small: returned as bytes)."""
    import tempfile

    if name not in BUILTIN_ONNX_MODELS:
        raise UsageError(f"unknown builtin ONNX model '{name}' (known: digits-mlp)")
    from coordinator.models.digits import build_digits_model

    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_digits_model(Path(tmp))
        return {
            "model": bundle.model_path.read_bytes(),
            "eval": bundle.eval_path.read_bytes(),
            "calibration": bundle.calibration_path.read_bytes(),
            "provenance": {"builder": "coordinator.models.digits", **jsonable(bundle.metadata)},
        }


@ray.remote(num_cpus=1, max_retries=0)
def add_reference(root: str, model: ArtifactRef, eval_set: ArtifactRef) -> dict[str, Any]:
    """Compute the FP32 reference outputs for an eval set that lacks them."""
    import numpy as np
    import onnxruntime as ort

    started = time.perf_counter()
    with _step(root) as (store, staging):
        with np.load(store.existing(eval_set), allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
        if "reference" in data:
            return _done(eval_set, {"reference_of": model.sha256}, started)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            str(onnx_model_path(store, model, staging)), options, ["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        data["reference"] = session.run(None, {name: data["inputs"].astype(np.float32)})[0]
        out = staging / "eval.npz"
        np.savez(out, **data)
        return _done(store.adopt(out, "eval.npz"), {"reference_of": model.sha256}, started)


def _calibration(store: ArtifactStore, ref: ArtifactRef | None) -> Any:
    import numpy as np

    if ref is None:
        return None
    with np.load(store.existing(ref), allow_pickle=False) as npz:
        return npz["inputs"]


@ray.remote(num_cpus=1, max_retries=0)
def convert_onnx(
    root: str,
    model: ArtifactRef,
    scheme: str,
    calibration: ArtifactRef | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize / convert an ONNX model to one scheme."""
    from coordinator.conversion.onnx_schemes import quantize_onnx

    started = time.perf_counter()
    with _step(root) as (store, staging):
        src = onnx_model_path(store, model, staging)
        out_dir = staging / "out"
        out_dir.mkdir()
        dst = out_dir / "model.onnx"
        provenance = quantize_onnx(src, dst, scheme, _calibration(store, calibration), params)
        return _done(store_onnx(store, dst, f"{scheme}.onnx"), provenance, started)


# ----- language-model steps ----------------------------------------------------------


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def gguf_to_f16(root: str, model: ArtifactRef) -> dict[str, Any]:
    """Dequantize any GGUF to the F16 GGUF every other type is made from."""
    from agent.backends.gguf_check import check_gguf
    from coordinator.conversion.gguf_convert import dequantize_to_f16

    started = time.perf_counter()
    with _step(root) as (store, staging):
        src = _linked(store, model, staging, model.name or "source.gguf")
        check_gguf(src)  # a clear error for a broken file, before any parser sees it
        dst = staging / "f16.gguf"
        provenance = dequantize_to_f16(src, dst)
        return _done(store.adopt(dst, "F16.gguf"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def quantize_gguf(root: str, f16: ArtifactRef, qtype: str) -> dict[str, Any]:
    """Quantize the F16 GGUF to one llama.cpp type."""
    from coordinator.conversion.gguf_convert import quantize_gguf as quantize

    started = time.perf_counter()
    with _step(root) as (store, staging):
        dst = staging / f"{qtype}.gguf"
        provenance = quantize(store.existing(f16), dst, qtype, threads=1)
        return _done(store.adopt(dst, f"{qtype}.gguf"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def llm_reference(
    root: str, f16: ArtifactRef, text: str, n_ctx: int, top_k: int, tail_samples: int = 0
) -> dict[str, Any]:
    """Token log-probabilities of the full-precision model on the evaluation text
    (top-k and ``tail_samples`` sampled tail tokens per position, scored in chunks of
    ``n_ctx``), computed once per model, text and settings."""
    from agent.llm_eval import (
        build_reference,
        fidelity_environment,
        open_llama,
        save_llm_reference,
        vocabulary_arrays,
    )
    from coordinator.conversion.gguf_convert import tokenize_text

    started = time.perf_counter()
    with _step(root) as (store, staging):
        model = store.existing(f16)
        tokens = tokenize_text(model, text)
        llm = open_llama(model, n_ctx=n_ctx, threads=1, logits_all=True)
        arrays = build_reference(llm, tokens, n_ctx, top_k, tail_samples)
        arrays.update(vocabulary_arrays(llm))  # prompts and names for serving endpoints
        del llm
        out = staging / "reference.npz"
        save_llm_reference(out, arrays)
        provenance: dict[str, Any] = {"tokens": len(tokens), "n_ctx": n_ctx, "top_k": top_k}
        provenance.update(fidelity_environment(arrays))
        return _done(store.adopt(out, "reference.npz"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def gguf_to_hf(root: str, model: ArtifactRef) -> dict[str, Any]:
    """A Hugging Face model folder (a folder artifact) made from a GGUF: the source the
    ONNX exporter and MLX convert from when the model came as a GGUF."""
    from coordinator.conversion.gguf_to_hf import gguf_to_hf_folder

    started = time.perf_counter()
    with _step(root) as (store, staging):
        src = _linked(store, model, staging, "src.gguf")
        folder = staging / "hf"
        provenance = gguf_to_hf_folder(src, folder)
        return _done(store.put_folder(folder, "hf.tar"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def checkpoint_logits(root: str, checkpoint: ArtifactRef, text: str) -> dict[str, Any]:
    """The checkpoint's own logits (transformers, float32) on the first tokens of
    ``text``: what every full-precision conversion is checked against."""
    from coordinator.conversion import logit_check

    started = time.perf_counter()
    with _step(root) as (store, staging):
        arrays = logit_check.checkpoint_logits(
            store.folder(checkpoint.sha256), text, LOGIT_CHECK_TOKENS
        )
        out = staging / "logits.npz"
        logit_check.save_checkpoint_logits(out, arrays)
        provenance = {"tokens": len(arrays["tokens"]), "reference": "transformers float32"}
        return _done(store.adopt(out, "checkpoint-logits.npz"), provenance, started)


def _logit_check(
    store: ArtifactStore, logits_ref: ArtifactRef | None, fmt: str, source: ArtifactRef, run: Any
) -> dict[str, Any]:
    """Compare a conversion of ``source`` with the checkpoint's logits (ConversionError
    when outside the format's tolerance); ``run(tokens)`` gives the conversion's logits."""
    if logits_ref is None:
        return {}
    from coordinator.conversion import logit_check

    reference = logit_check.load_checkpoint_logits(store.existing(logits_ref))
    model = source.name.split(".")[0] or "the model"
    return logit_check.check_conversion(fmt, reference, run(reference["tokens"]), model=model)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def checkpoint_to_gguf(
    root: str, checkpoint: ArtifactRef, logits: ArtifactRef | None
) -> dict[str, Any]:
    """Checkpoint -> F16 GGUF with llama.cpp's own converter, checked against the
    checkpoint's logits."""
    from coordinator.conversion import logit_check
    from coordinator.conversion.hf_to_gguf import convert_checkpoint

    started = time.perf_counter()
    with _step(root) as (store, staging):
        dst = staging / "F16.gguf"
        name = checkpoint.name.split(".")[0] or None  # the campaign's model name
        provenance = convert_checkpoint(
            store.folder(checkpoint.sha256), dst, "f16", model_name=name
        )
        provenance |= _logit_check(
            store,
            logits,
            "gguf-f16",
            checkpoint,
            lambda tokens: logit_check.gguf_logits(dst, tokens),
        )
        return _done(store.adopt(dst, "F16.gguf"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def export_onnx(root: str, hf: ArtifactRef, logits: ArtifactRef | None) -> dict[str, Any]:
    """Export a Hugging Face causal LM folder to ONNX (KV-cache graph; weights as
    external data beside it when large), checked against the checkpoint's logits."""
    from coordinator.conversion import logit_check
    from coordinator.conversion.hf_to_onnx import export_causal_lm

    started = time.perf_counter()
    with _step(root) as (store, staging):
        out_dir = staging / "onnx"
        out_dir.mkdir()
        out = out_dir / "model.onnx"
        provenance = export_causal_lm(store.folder(hf.sha256), out)
        provenance |= _logit_check(
            store, logits, "onnx-fp32", hf, lambda tokens: logit_check.onnx_logits(out, tokens)
        )
        return _done(store_onnx(store, out, "model.onnx"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def convert_openvino(
    root: str,
    model: ArtifactRef,
    scheme: str,
    calibration: ArtifactRef | None,
    params: dict[str, Any] | None = None,
    logits: ArtifactRef | None = None,
) -> dict[str, Any]:
    """ONNX -> OpenVINO IR in one scheme (NNCF for the compressed ones), as a folder
    artifact; full-precision IRs of a language model are checked against its logits."""
    from coordinator.conversion import logit_check
    from coordinator.conversion.openvino_schemes import convert_openvino as convert

    started = time.perf_counter()
    with _step(root) as (store, staging):
        src = onnx_model_path(store, model, staging)
        xml = staging / "ir" / "model.xml"
        xml.parent.mkdir()
        provenance = convert(src, xml, scheme, _calibration(store, calibration), params)
        if scheme in ("fp32", "fp16"):
            provenance |= _logit_check(
                store,
                logits,
                f"openvino-{scheme}",
                model,
                lambda tokens: logit_check.openvino_logits(xml, tokens),
            )
        return _done(store.put_folder(xml.parent, "ir.tar"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)  # MLX keeps its memory pool
def convert_mlx(
    root: str,
    hf: ArtifactRef,
    scheme: str,
    params: dict[str, Any] | None = None,
    logits: ArtifactRef | None = None,
) -> dict[str, Any]:
    """Hugging Face folder -> MLX folder (full precision, 8-bit or 4-bit), as a folder
    artifact; the full-precision one is checked against the checkpoint's logits."""
    from coordinator.conversion import logit_check
    from coordinator.conversion.mlx_convert import convert_mlx as convert

    started = time.perf_counter()
    with _step(root) as (store, staging):
        out = staging / "mlx"
        provenance = convert(store.folder(hf.sha256), out, scheme, params or None)
        if scheme == "fp16":
            provenance |= _logit_check(
                store, logits, "mlx-fp16", hf, lambda tokens: logit_check.mlx_logits(out, tokens)
            )
        return _done(store.put_folder(out, "mlx.tar"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def convert_genai(
    root: str,
    hf: ArtifactRef,
    scheme: str,
    params: dict[str, Any] | None = None,
    logits: ArtifactRef | None = None,
) -> dict[str, Any]:
    """Hugging Face folder -> ONNX Runtime GenAI folder (int4 / int8 / fp32 / fp16, the
    builder in a child process), as a folder artifact; fp32 is checked against the
    checkpoint's logits."""
    from coordinator.conversion import logit_check
    from coordinator.conversion.hf_to_genai import convert_genai as convert

    started = time.perf_counter()
    with _step(root) as (store, staging):
        out = staging / "genai"
        provenance = convert(store.folder(hf.sha256), out, scheme, params or None)
        if scheme == "fp32":
            provenance |= _logit_check(
                store,
                logits,
                "genai-fp32",
                hf,
                lambda tokens: logit_check.genai_logits(out, tokens),
            )
        return _done(store.put_folder(out, "genai.tar"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)
def convert_olive(
    root: str,
    model: ArtifactRef,
    command: list[str] | None,
    workflow: dict[str, Any] | None,
) -> dict[str, Any]:
    """An Olive command or workflow applied to an ONNX model, offline (its telemetry off
    and every network attempt refused), as an ONNX artifact."""
    from coordinator.conversion.olive_convert import run_olive

    started = time.perf_counter()
    with _step(root) as (store, staging):
        out = staging / "olive"
        provenance = run_olive(
            onnx_model_path(store, model, staging), out, command=command, workflow=workflow
        )
        return _done(store_onnx(store, out / "model.onnx", "model.onnx"), provenance, started)


@ray.remote(num_cpus=1, max_retries=0)
def hub_inputs(
    root: str, model: ArtifactRef, eval_set: ArtifactRef | None, calibration: ArtifactRef | None
) -> dict[str, Any]:
    """The hub inputs file of a model: input shapes, calibration set and eval set."""
    from coordinator.conversion.hub_inputs import build_hub_inputs

    started = time.perf_counter()
    with _step(root) as (store, staging):
        data, provenance = build_hub_inputs(
            onnx_model_path(store, model, staging),
            store.existing(eval_set).read_bytes() if eval_set else None,
            store.existing(calibration).read_bytes() if calibration else None,
        )
        out = staging / "hub-inputs.npz"
        out.write_bytes(data)
        return _done(store.adopt(out, "hub-inputs.npz"), provenance, started)

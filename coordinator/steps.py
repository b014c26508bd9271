"""Preparation steps as Ray tasks. Each returns bytes plus provenance; heavy tools are
imported inside the task, in the Ray worker. The caching around them lives in
:mod:`coordinator.preparation`."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import ray

from edgefarm.errors import UsageError

BUILTIN_ONNX_MODELS = ("digits-mlp",)


def jsonable(data: Any) -> Any:
    """Provenance as plain JSON values."""
    return json.loads(json.dumps(data, default=str))


@ray.remote(num_cpus=1, max_retries=0)
def materialize_builtin(name: str) -> dict[str, Any]:
    """Build an ONNX model the project ships the recipe for."""
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
def convert_onnx(
    model: bytes, scheme: str, calibration: bytes | None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Quantize / convert an ONNX model to one scheme."""
    import numpy as np

    from coordinator.conversion.onnx_schemes import quantize_onnx

    calib = np.load(io.BytesIO(calibration))["inputs"] if calibration else None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src.onnx", Path(tmp) / "dst.onnx"
        src.write_bytes(model)
        provenance = quantize_onnx(src, dst, scheme, calib, params or None)
        return {"model": dst.read_bytes(), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0)
def gguf_to_f16(model: bytes, name: str) -> dict[str, Any]:
    """Dequantize any GGUF to the F16 GGUF every other type is made from."""
    from agent.backends.gguf_check import check_gguf
    from coordinator.conversion.gguf_convert import dequantize_to_f16

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / name, Path(tmp) / "f16.gguf"
        src.write_bytes(model)
        check_gguf(src)  # a clear error for a broken file, before any parser sees it
        provenance = dequantize_to_f16(src, dst)
        return {"model": dst.read_bytes(), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0)
def quantize_gguf(f16: bytes, qtype: str) -> dict[str, Any]:
    """Quantize the F16 GGUF to one llama.cpp type."""
    from coordinator.conversion.gguf_convert import quantize_gguf as quantize

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f16.gguf", Path(tmp) / f"{qtype}.gguf"
        src.write_bytes(f16)
        provenance = quantize(src, dst, qtype, threads=1)
        return {"model": dst.read_bytes(), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0)
def llm_reference(f16: bytes, text: str, n_ctx: int, top_k: int) -> dict[str, Any]:
    """Token log-probabilities of the full-precision model on the evaluation text
    (top-k per position), computed once per model and text."""
    from agent.llm_eval import build_reference, open_llama, save_llm_reference
    from coordinator.conversion.gguf_convert import tokenize_text

    with tempfile.TemporaryDirectory() as tmp:
        model, out = Path(tmp) / "f16.gguf", Path(tmp) / "reference.npz"
        model.write_bytes(f16)
        tokens = tokenize_text(model, text)
        llm = open_llama(model, n_ctx=n_ctx, threads=1, logits_all=True)
        arrays = build_reference(llm, tokens, n_ctx, top_k)
        del llm
        save_llm_reference(out, arrays)
        return {
            "reference": out.read_bytes(),
            "provenance": {"tokens": len(tokens), "n_ctx": n_ctx, "top_k": top_k},
        }


@ray.remote(num_cpus=1, max_retries=0)
def gguf_to_hf(model: bytes) -> dict[str, Any]:
    """A Hugging Face model folder (as an uncompressed tar) made from a GGUF: the
    source the ONNX exporter and MLX convert from."""
    import tarfile

    from coordinator.conversion.gguf_to_hf import gguf_to_hf_folder

    with tempfile.TemporaryDirectory() as tmp:
        src, folder = Path(tmp) / "src.gguf", Path(tmp) / "hf"
        src.write_bytes(model)
        provenance = gguf_to_hf_folder(src, folder)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(folder.iterdir()):
                info = tar.gettarinfo(str(path), arcname=path.name)
                info.mtime = 0  # same folder, same bytes, same artifact hash
                with path.open("rb") as f:
                    tar.addfile(info, f)
        return {"model": buffer.getvalue(), "provenance": jsonable(provenance)}


def untar(data: bytes, out_dir: Path) -> Path:
    """Unpack a folder artifact (an uncompressed tar of plain files) into ``out_dir``."""
    import tarfile

    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(out_dir, filter="data")
    return out_dir


@ray.remote(num_cpus=1, max_retries=0)
def export_onnx(hf_tar: bytes) -> dict[str, Any]:
    """Export a Hugging Face causal LM folder to one ONNX file."""
    from coordinator.conversion.hf_to_onnx import export_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        folder = untar(hf_tar, Path(tmp) / "hf")
        out = Path(tmp) / "model.onnx"
        provenance = export_causal_lm(folder, out)
        return {"model": out.read_bytes(), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0)
def convert_openvino(
    model: bytes, scheme: str, calibration: bytes | None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ONNX -> OpenVINO IR in one scheme (NNCF for the compressed ones), as a tar."""
    import numpy as np

    from agent.backends.openvino import pack_ir
    from coordinator.conversion.openvino_schemes import convert_openvino as convert

    calib = np.load(io.BytesIO(calibration))["inputs"] if calibration else None
    with tempfile.TemporaryDirectory() as tmp:
        src, xml = Path(tmp) / "model.onnx", Path(tmp) / "ir" / "model.xml"
        src.write_bytes(model)
        xml.parent.mkdir()
        provenance = convert(src, xml, scheme, calib, params or None)
        return {"model": pack_ir(xml), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0, max_calls=1)  # MLX keeps its memory pool
def convert_mlx(hf_tar: bytes, scheme: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hugging Face folder -> MLX folder (full precision, 8-bit or 4-bit), as a tar."""
    from agent.backends.mlx import pack_folder
    from coordinator.conversion.mlx_convert import convert_mlx as convert

    with tempfile.TemporaryDirectory() as tmp:
        folder = untar(hf_tar, Path(tmp) / "hf")
        out = Path(tmp) / "mlx"
        provenance = convert(folder, out, scheme, params or None)
        return {"model": pack_folder(out), "provenance": jsonable(provenance)}


@ray.remote(num_cpus=1, max_retries=0)
def hub_inputs(model: bytes, eval_npz: bytes | None, calibration: bytes | None) -> dict[str, Any]:
    """The hub inputs file of a model: input shapes, calibration set and eval set."""
    from coordinator.conversion.hub_inputs import build_hub_inputs

    data, provenance = build_hub_inputs(model, eval_npz, calibration)
    return {"model": data, "provenance": jsonable(provenance)}

"""TEST DOUBLE internals: the double's on-disk state and its deterministic behaviour.

State lives in the directory named by ``$QAI_HUB_DOUBLE_STATE`` (a fresh temporary
directory per process when unset), so that agent processes started by integration
tests share it with the test and a restarted agent finds its jobs again:

- ``config.json`` (written by tests, read on every call): ``devices`` (list of
  ``{"name", "os", "attributes"}``), ``job_seconds`` (how long every job runs),
  ``fail`` (job type -> failure message: jobs of that type fail with it),
  ``rate_limit_first`` (the first N submissions are rate-limited), ``hub_version``;
- ``models/<id>.json`` (+ ``<id>.onnx`` for uploads), ``jobs/<id>.json``,
  ``datasets/<id>.npz``, ``counters.json``.

Figures are made up but deterministic; outputs are real: the uploaded ONNX model runs
in onnxruntime, with a deterministic perturbation standing for quantization.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

STATE_ENV = "QAI_HUB_DOUBLE_STATE"
DEFAULT_DEVICES: list[dict[str, Any]] = [
    {
        "name": "Samsung Galaxy S24 (Family)",
        "os": "14",
        "attributes": [
            "abi:arm64-v8a",
            "chipset:qualcomm-snapdragon-8gen3",
            "format:phone",
            "framework:onnx",
            "framework:qnn",
            "framework:tflite",
            "hexagon:v75",
            "htp:v75",
            "os:android",
            "vendor:samsung",
        ],
    },
    {
        "name": "Samsung Galaxy S23 (Family)",
        "os": "13",
        "attributes": [
            "abi:arm64-v8a",
            "chipset:qualcomm-snapdragon-8gen2",
            "format:phone",
            "framework:onnx",
            "framework:qnn",
            "framework:tflite",
            "hexagon:v73",
            "htp:v73",
            "os:android",
            "vendor:samsung",
        ],
    },
    {
        "name": "Snapdragon X Elite CRD",
        "os": "11",
        "attributes": [
            "abi:arm64",
            "chipset:qualcomm-snapdragon-x-elite",
            "format:compute",
            "framework:onnx",
            "framework:qnn",
            "hexagon:v73",
            "htp:v73",
            "os:windows",
            "vendor:qualcomm",
        ],
    },
]
_PROCESS_STATE: Path | None = None


def state_dir() -> Path:
    """The shared state directory (created on first use)."""
    global _PROCESS_STATE
    configured = os.environ.get(STATE_ENV)
    if configured:
        path = Path(configured)
    else:
        if _PROCESS_STATE is None:
            _PROCESS_STATE = Path(tempfile.mkdtemp(prefix="qai-hub-double-"))
        path = _PROCESS_STATE
    for sub in ("models", "jobs", "datasets"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def config() -> dict[str, Any]:
    """The behaviour the test asked for."""
    path = state_dir() / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_config(state: Path, **settings: Any) -> None:
    """Set the double's behaviour (merged into ``config.json``)."""
    path = state / "config.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(settings)
    state.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current))


def new_id(prefix: str) -> str:
    """An id shaped like the hub's (``j`` + 9 characters for jobs, ``m`` for models)."""
    return prefix + uuid.uuid4().hex[:9]


def save(kind: str, record: dict[str, Any]) -> None:
    """Write a model / job record atomically."""
    path = state_dir() / kind / f"{record['id']}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def load(kind: str, record_id: str) -> dict[str, Any] | None:
    """A model / job record, or None."""
    path = state_dir() / kind / f"{record_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def jobs(state: Path) -> list[dict[str, Any]]:
    """Every job ever submitted to the double in ``state``, oldest first."""
    records = [json.loads(p.read_text()) for p in (state / "jobs").glob("*.json")]
    return sorted(records, key=lambda r: r["created_at"])


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    path = state_dir() / "counters.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield state_dir() / "counters.json"
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def count_submission() -> bool:
    """Count one submission attempt; True when it is to be rate-limited."""
    with _locked() as path:
        counters = json.loads(path.read_text()) if path.exists() else {}
        counters["attempts"] = counters.get("attempts", 0) + 1
        limited = counters.get("rate_limited", 0) < int(config().get("rate_limit_first", 0))
        if limited:
            counters["rate_limited"] = counters.get("rate_limited", 0) + 1
        path.write_text(json.dumps(counters))
    return limited


def counters(state: Path) -> dict[str, int]:
    """Submission attempts and how many of them were rate-limited."""
    path = state / "counters.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ----- behaviour --------------------------------------------------------------------


def option(options: str, flag: str) -> str | None:
    """The value of ``--flag VALUE`` in a hub options string."""
    found = re.search(rf"--{flag}[ =](\S+)", options or "")
    return found.group(1) if found else None


def onnx_path(model: dict[str, Any]) -> Path:
    """The ONNX file at the root of a model's chain (uploads keep theirs)."""
    while model.get("source"):
        parent = load("models", model["source"])
        assert parent is not None
        model = parent
    return state_dir() / "models" / f"{model['id']}.onnx"


def lineage(model: dict[str, Any]) -> dict[str, Any]:
    """What happened to a model on its way: quantize dtypes, fp16, runtime."""
    out: dict[str, Any] = {}
    while True:
        for key in ("weights", "activations", "float16", "runtime"):
            if key in model and key not in out:
                out[key] = model[key]
        if not model.get("source"):
            return out
        parent = load("models", model["source"])
        assert parent is not None
        model = parent


def target_bytes(model: dict[str, Any]) -> bytes:
    """A stand-in for a compiled model: the ONNX bytes cut to the size its precision
    would give (fp16 half, 8-bit weights a quarter, 4-bit an eighth)."""
    data = onnx_path(model).read_bytes()
    facts = lineage(model)
    bits = {"INT8": 8, "INT16": 16, "INT4": 4}.get(facts.get("weights", ""), 32)
    if bits == 32 and facts.get("float16"):
        bits = 16
    return data[: max(1, len(data) * bits // 32)]


def onnx_inputs(path: Path) -> list[tuple[str, list[Any]]]:
    """Graph inputs (name, dims with None for symbolic) of an ONNX file."""
    import onnx

    proto = onnx.load(str(path))
    init = {i.name for i in proto.graph.initializer}
    return [
        (
            v.name,
            [
                d.dim_value if d.HasField("dim_value") else None
                for d in v.type.tensor_type.shape.dim
            ],
        )
        for v in proto.graph.input
        if v.name not in init
    ]


def onnx_layers(path: Path) -> list[tuple[str, str]]:
    """(name, op type) of every node."""
    import onnx

    proto = onnx.load(str(path))
    return [(n.name or f"{n.op_type}_{i}", n.op_type) for i, n in enumerate(proto.graph.node)]


def compute_unit(runtime: str, quantized: bool) -> str:
    """Where the double says layers run: QNN on the NPU, TFLite on the NPU when
    quantized (else GPU), ONNX Runtime on the CPU."""
    if runtime.startswith("qnn") or runtime == "precompiled_qnn_onnx":
        return "NPU"
    if runtime == "tflite":
        return "NPU" if quantized else "GPU"
    return "CPU"


def profile(job: dict[str, Any]) -> dict[str, Any]:
    """A profile dict shaped exactly like ``InferenceJob.download_profile()`` of the real
    client for a v1.2+ profile (times µs, memory bytes, ranges as (lower, upper) tuples)."""
    model = load("models", job["model_id"])
    assert model is not None
    facts = lineage(model)
    path = onnx_path(model)
    size = path.stat().st_size
    quantized = bool(facts.get("weights"))
    runtime = facts.get("runtime", "tflite")
    speed = 0.35 if quantized else (0.6 if facts.get("float16") else 1.0)
    speed *= {"onnx": 2.0, "tflite": 1.3}.get(runtime, 1.0)
    base = (40 + size / 400) * speed  # µs
    iterations = int(option(job["options"], "max_profiler_iterations") or 100)
    times = [int(base * (1 + 0.04 * math.sin(i * 1.7)) + (i % 3)) for i in range(iterations)]
    peak = 2_000_000 + size * (1 if quantized else 3)
    layers = onnx_layers(path)
    unit = compute_unit(runtime, quantized)
    return {
        "execution_summary": {
            "estimated_inference_time": int(np.median(times)),
            "estimated_inference_peak_memory": peak,
            "first_load_time": int(base * 900),
            "first_load_peak_memory": peak + 4_096,
            "warm_load_time": int(base * 150),
            "warm_load_peak_memory": peak - 4_096,
            "compile_time": 0,
            "compile_peak_memory": 0,
            "compile_memory_increase_range": (0, 0),
            "compile_memory_peak_range": (0, 0),
            "first_load_memory_increase_range": (size, size * 2),
            "first_load_memory_peak_range": (peak // 2, peak),
            "warm_load_memory_increase_range": (0, 0),
            "warm_load_memory_peak_range": (4_096, peak // 2),
            "inference_memory_increase_range": (0, size // 4),
            "inference_memory_peak_range": (peak // 3, peak),
            "all_compile_times": [0],
            "all_first_load_times": [int(base * 900)],
            "all_inference_times": times,
            "all_warm_load_times": [int(base * 150)],
        },
        "execution_detail": [
            {
                "compute_unit": unit,
                "execution_time": max(1, int(base / max(1, len(layers)))),
                "name": name,
                "type": op.upper(),
            }
            for name, op in layers
        ],
    }


def run_model(
    model: dict[str, Any], entries: dict[str, list[np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """The model's real outputs for every entry of a dataset (onnxruntime on CPU), with
    quantization / fp16 simulated by a deterministic rounding of the outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(onnx_path(model)), sess_options=options, providers=["CPUExecutionProvider"]
    )
    facts = lineage(model)
    names = list(entries)
    count = len(entries[names[0]])
    outputs: dict[str, list[np.ndarray]] = {o.name: [] for o in session.get_outputs()}
    for index in range(count):
        feed = {name: np.asarray(entries[name][index]) for name in names}
        for meta, value in zip(session.get_outputs(), session.run(None, feed), strict=True):
            outputs[meta.name].append(_perturb(np.asarray(value, np.float32), facts))
    return outputs


def _perturb(values: np.ndarray, facts: dict[str, Any]) -> np.ndarray:
    if facts.get("weights"):
        levels = 65535 if facts.get("activations") == "INT16" else 255
        if facts["weights"] == "INT4":
            levels = min(levels, 63)
        low, high = float(values.min()), float(values.max())
        scale = (high - low) / levels or 1.0
        return (np.round((values - low) / scale) * scale + low).astype(np.float32)
    if facts.get("float16"):
        return values.astype(np.float16).astype(np.float32)
    return values


def job_state(job: dict[str, Any]) -> tuple[str, str | None]:
    """(State name, failure message) of a job now."""
    elapsed = time.time() - job["created_at"]
    if elapsed < job["duration_s"]:
        running = {
            "compile": "OPTIMIZING_MODEL",
            "quantize": "QUANTIZING_MODEL",
            "inference": "MEASURING_PERFORMANCE" if job.get("profile") else "RUNNING_INFERENCE",
        }[job["type"]]
        return (running if elapsed > job["duration_s"] / 3 else "CREATED"), None
    if job.get("fail_message"):
        return "FAILED", job["fail_message"]
    return "SUCCESS", None

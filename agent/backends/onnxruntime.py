"""The onnxruntime backend: one InferenceSession, CPU by default.

Options (``Assignment.options``):

- ``execution_provider``: the provider to run on (default ``CPUExecutionProvider``);
  one this onnxruntime build lacks fails the task with :class:`BackendUnavailable`.
- ``graph_optimization_level``: ``disable``, ``basic``, ``extended`` or ``all`` (default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.backends.base import (
    SYNTHETIC_INPUT_SEED,
    Backend,
    check_model_file,
    check_options,
    one_line,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import BackendUnavailable, ModelLoadError, TaskError

DEFAULT_PROVIDER = "CPUExecutionProvider"

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# onnxruntime's tensor type names -> numpy dtypes (the ones synthetic inputs support).
_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OnnxRuntimeBackend(Backend):
    """Measures ONNX models with onnxruntime."""

    NAME: ClassVar[str] = "onnxruntime"
    MODULE: ClassVar[str] = "onnxruntime"
    EXTRA: ClassVar[str] = "onnxruntime"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
        "onnxruntime-qnn",
    )
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"execution_provider", "graph_optimization_level"}
    )

    def __init__(self) -> None:
        self._ort: Any = None
        self._session: Any = None
        self._environment: dict[str, str] = {}

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Create the session: explicit threads, sequential execution, one provider."""
        check_options(self.NAME, options, self.OPTIONS)
        ort = self._ort = self.require()
        check_model_file(model_path)

        provider = options.get("execution_provider", DEFAULT_PROVIDER)
        available = list(ort.get_available_providers())
        if provider not in available:
            raise BackendUnavailable(
                f"execution provider '{provider}' is not available in onnxruntime "
                f"{ort.__version__} (available: {', '.join(available)})"
            )
        level_key = options.get("graph_optimization_level", "all")
        if level_key not in _OPT_LEVELS:
            raise TaskError(
                f"unknown graph_optimization_level '{level_key}' (known: {', '.join(_OPT_LEVELS)})"
            )

        so = ort.SessionOptions()
        so.intra_op_num_threads = settings.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level_key])
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=so, providers=[provider]
            )
        except Exception as err:  # onnxruntime raises several unrelated types here
            raise ModelLoadError(
                one_line(f"onnxruntime could not load {model_path.name}: {err}")
            ) from err

        self._environment = {
            "onnxruntime.version": ort.__version__,
            "onnxruntime.providers": ",".join(self._session.get_providers()),
            "onnxruntime.intra_op_num_threads": str(so.intra_op_num_threads),
            "onnxruntime.inter_op_num_threads": str(so.inter_op_num_threads),
            "onnxruntime.execution_mode": "sequential",
            "onnxruntime.graph_optimization_level": _OPT_LEVELS[level_key],
        }

    def _input_dtype(self, type_name: str) -> type[np.generic]:
        dtype = _ORT_DTYPES.get(type_name)
        if dtype is None:
            raise TaskError(f"unsupported model input type {type_name}")
        return dtype

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> dict[str, np.ndarray]:
        """The feed dict of every timed iteration.

        The first input takes the first ``batch_size`` eval examples when given (repeated
        when there are fewer). Anything else is drawn from a seeded generator with the
        declared shape: the batch dimension is ``batch_size``, other symbolic dimensions 1.
        """
        rng = np.random.default_rng(SYNTHETIC_INPUT_SEED)
        feed: dict[str, np.ndarray] = {}
        for index, meta in enumerate(self._session.get_inputs()):
            dtype = self._input_dtype(meta.type)
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
            if shape:
                first = meta.shape[0]
                if isinstance(first, int) and first > 0 and first != batch_size:
                    raise TaskError(
                        f"model input '{meta.name}' has a fixed batch of {first}, "
                        f"but batch_size is {batch_size}"
                    )
                shape[0] = batch_size
            if index == 0 and eval_inputs is not None and len(eval_inputs) > 0:
                reps = -(-batch_size // len(eval_inputs))
                batch = np.concatenate([eval_inputs] * reps)[:batch_size]
                feed[meta.name] = np.ascontiguousarray(batch, dtype=dtype)
            elif np.issubdtype(dtype, np.floating):
                feed[meta.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[meta.name] = rng.integers(0, 2, size=shape).astype(dtype)
        return feed

    def run_once(self, inputs: Any) -> None:
        """One ``session.run`` of all outputs."""
        self._session.run(None, inputs)

    def timed_call(self, inputs: Any) -> Callable[[], object]:
        """``session.run`` itself, bound to the feed: no extra Python frame per iteration."""
        return functools.partial(self._session.run, None, inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The first output for ``batch`` fed to the (single) model input."""
        metas = self._session.get_inputs()
        if len(metas) != 1:
            raise TaskError(
                f"accuracy needs a single-input model; this one has {len(metas)} inputs"
            )
        feed = {metas[0].name: np.ascontiguousarray(batch, dtype=self._input_dtype(metas[0].type))}
        return np.asarray(self._session.run(None, feed)[0])

    def version(self) -> str:
        """onnxruntime's version."""
        ort = self._ort or self.require()
        return str(ort.__version__)

    def environment(self) -> dict[str, str]:
        """Version, providers in use, thread settings and graph optimization level."""
        return dict(self._environment)

"""The onnxruntime backend: one InferenceSession, CPU by default.

Options (``Assignment.options``):

- ``execution_provider``: the provider to run on (default ``CPUExecutionProvider``);
  one this onnxruntime build lacks fails the task with :class:`BackendUnavailable`.
  ``QNNExecutionProvider`` runs on a Snapdragon's NPU (HTP) through Qualcomm's QNN
  backend library, ``backend_path`` defaulting to the HTP one (``QnnHtp.dll`` on
  Windows, ``libQnnHtp.so`` elsewhere);
- ``provider.KEY``: provider option ``KEY`` for that provider, e.g.
  ``provider.backend_path``, ``provider.htp_performance_mode: burst``,
  ``provider.htp_graph_finalization_optimization_mode: 3``;
- ``disable_cpu_fallback``: ``true`` makes nodes the provider cannot take an error instead
  of running them on the CPU (so an NPU measurement is all NPU);
- ``graph_optimization_level``: ``disable``, ``basic``, ``extended`` or ``all`` (default).
- ``task``: ``auto`` (default), ``llm`` or ``classify``. A causal LM (an ``input_ids``
  input and a 3-D ``logits`` output) is measured in the LLM mode of
  :mod:`agent.backends.onnxruntime_llm` (decode steps, prompt speed, TTFT, fidelity to
  an LLM reference), which this class delegates to; ``auto`` picks it from the graph,
  ``llm``/``classify`` force a mode. Anything else feeds the declared inputs
  and scores classification accuracy.

The model is one ``.onnx`` file, or an ONNX model whose weights are external data
(``model.onnx`` + ``model.onnx.data``, as models over 2 GB must be): a folder holding
exactly one ``.onnx`` file and its data, or that folder as one uncompressed tar (the
artifact store's form, named ``*.onnx.tar``), which :func:`onnx_model_file` unpacks
into the backend's own temporary folder (it lives as long as the backend).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.backends.archive import extract_tar, is_tar_file
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
QNN_PROVIDER = "QNNExecutionProvider"
PROVIDER_OPTION_PREFIX = "provider."

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


def provider_options(provider: str, options: dict[str, str]) -> dict[str, str]:
    """The provider options in ``options`` (``provider.KEY``), with QNN's HTP default."""
    found = {
        key.removeprefix(PROVIDER_OPTION_PREFIX): value
        for key, value in options.items()
        if key.startswith(PROVIDER_OPTION_PREFIX)
    }
    if provider == QNN_PROVIDER:
        found.setdefault(
            "backend_path", "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"
        )
    return found


def session_options_to_check(options: dict[str, str]) -> dict[str, str]:
    """``options`` without the free-form ``provider.KEY`` entries (for check_options)."""
    return {k: v for k, v in options.items() if not k.startswith(PROVIDER_OPTION_PREFIX)}


def onnx_model_file(model_path: Path, workdir: Path | None) -> tuple[Path, str]:
    """The ``.onnx`` file to open for ``model_path`` and the model's layout.

    A file that is a tar (a folder artifact) is unpacked safely into ``workdir``
    (:func:`agent.backends.archive.extract_tar`); a folder (unpacked or given) must hold
    exactly one ``.onnx`` file, whose external data onnxruntime finds beside it. Any
    other file is the model itself. Raises :class:`ModelLoadError`.
    """
    model_path = Path(model_path)
    if model_path.is_dir():
        return _single_onnx(model_path, model_path.name), "folder"
    check_model_file(model_path)
    if not is_tar_file(model_path):
        return model_path, "file"
    if workdir is None:
        raise ModelLoadError(f"{model_path.name} is a folder archive: no folder to unpack it into")
    folder = extract_tar(model_path, workdir / "model", model_path.name)
    return _single_onnx(folder, model_path.name), "folder archive"


def _single_onnx(folder: Path, label: str) -> Path:
    found = sorted(p for p in folder.rglob("*.onnx") if p.is_file())
    if len(found) != 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in found) or "none"
        raise ModelLoadError(
            f"an ONNX model folder must hold exactly one .onnx file; {label} holds {names}"
        )
    return found[0]


def open_session(
    ort: Any,
    model_path: Path,
    settings: MeasureSettings,
    options: dict[str, str],
    workdir: Path | None = None,
) -> tuple[Any, dict[str, str]]:
    """An InferenceSession with explicit threads, sequential execution and one provider,
    and the environment it ran with. ``model_path`` may be a folder or a folder
    archive (:func:`onnx_model_file`, which unpacks into ``workdir``)."""
    started = time.perf_counter()
    onnx_file, layout = onnx_model_file(model_path, workdir)
    unpack_s = time.perf_counter() - started

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
    no_fallback = options.get("disable_cpu_fallback", "false").lower() in ("true", "1", "yes")
    if no_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    chosen = provider_options(provider, options)
    extra = {"provider_options": [chosen]} if chosen else {}
    try:
        session = ort.InferenceSession(
            str(onnx_file), sess_options=so, providers=[provider], **extra
        )
    except Exception as err:  # onnxruntime raises several unrelated types here
        raise ModelLoadError(
            one_line(f"onnxruntime could not load {model_path.name}: {err}")
        ) from err

    environment = {
        "onnxruntime.version": ort.__version__,
        "onnxruntime.providers": ",".join(session.get_providers()),
        "onnxruntime.intra_op_num_threads": str(so.intra_op_num_threads),
        "onnxruntime.inter_op_num_threads": str(so.inter_op_num_threads),
        "onnxruntime.execution_mode": "sequential",
        "onnxruntime.graph_optimization_level": _OPT_LEVELS[level_key],
        "onnxruntime.model_layout": layout,
    }
    if layout == "folder archive":
        environment["onnxruntime.unpack_ms"] = f"{unpack_s * 1e3:.1f}"
    if chosen:
        environment["onnxruntime.provider_options"] = ",".join(
            f"{key}={value}" for key, value in sorted(chosen.items())
        )
    if no_fallback:
        environment["onnxruntime.cpu_fallback"] = "disabled"
    return session, environment


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
        {"execution_provider", "graph_optimization_level", "task", "disable_cpu_fallback"}
    )

    def __init__(self) -> None:
        self._ort: Any = None
        self._session: Any = None
        self._environment: dict[str, str] = {}
        self._llm: Backend | None = None  # the LLM mode, when the model is a causal LM
        self._eval_is_llm = False
        self._workdir: tempfile.TemporaryDirectory[str] | None = None  # an unpacked model

    def read_eval_inputs(self, eval_path: Path, settings: MeasureSettings) -> np.ndarray:
        """An LLM reference's tokens, else the first inputs of a classification eval file."""
        from agent.backends.onnxruntime_llm import llm_reference_tokens

        tokens = llm_reference_tokens(eval_path)
        self._eval_is_llm = tokens is not None
        return tokens if tokens is not None else super().read_eval_inputs(eval_path, settings)

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Create the session; hand a causal LM to the LLM mode (see the module docstring)."""
        check_options(self.NAME, session_options_to_check(options), self.OPTIONS)
        ort = self._ort = self.require()
        self._workdir = tempfile.TemporaryDirectory(prefix="edgefarm-onnxruntime-")
        self._session, self._environment = open_session(
            ort, model_path, settings, options, Path(self._workdir.name)
        )
        from agent.backends.onnxruntime_llm import llm_mode

        self._llm = llm_mode(self._session, self._environment, settings, options, self._eval_is_llm)

    def _input_dtype(self, type_name: str) -> type[np.generic]:
        dtype = _ORT_DTYPES.get(type_name)
        if dtype is None:
            raise TaskError(f"unsupported model input type {type_name}")
        return dtype

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> Any:
        """The feed dict of every timed iteration (the LLM mode: its token stream).

        The first input takes the first ``batch_size`` eval examples when given (repeated
        when there are fewer). Anything else is drawn from a seeded generator with the
        declared shape: the batch dimension is ``batch_size``, other symbolic dimensions 1.
        """
        if self._llm is not None:
            return self._llm.make_inputs(eval_inputs, batch_size)
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
        if self._llm is not None:
            self._llm.run_once(inputs)
        else:
            self._session.run(None, inputs)

    def timed_call(self, inputs: Any) -> Callable[[], object]:
        """``session.run`` itself, bound to the feed: no extra Python frame per iteration."""
        if self._llm is not None:
            return self._llm.timed_call(inputs)
        return functools.partial(self._session.run, None, inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The first output for ``batch`` fed to the (single) model input."""
        if self._llm is not None:
            return self._llm.predict(batch)
        metas = self._session.get_inputs()
        if len(metas) != 1:
            raise TaskError(
                f"accuracy needs a single-input model; this one has {len(metas)} inputs"
            )
        feed = {metas[0].name: np.ascontiguousarray(batch, dtype=self._input_dtype(metas[0].type))}
        return np.asarray(self._session.run(None, feed)[0])

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """The LLM mode's prompt speed and TTFT; none otherwise."""
        return self._llm.extra_metrics(settings) if self._llm is not None else {}

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """LLM fidelity in the LLM mode, else classification accuracy."""
        if self._llm is not None:
            return self._llm.evaluate(eval_path, settings)
        return super().evaluate(eval_path, settings)

    def version(self) -> str:
        """onnxruntime's version."""
        ort = self._ort or self.require()
        return str(ort.__version__)

    def environment(self) -> dict[str, str]:
        """Version, providers in use, thread settings and graph optimization level."""
        if self._llm is not None:
            return self._llm.environment()
        return dict(self._environment)

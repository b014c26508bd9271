"""The OpenVINO backend: an OpenVINO IR (``.xml`` + ``.bin``) compiled on one device.

The artifact store holds single files, so an IR travels as an uncompressed tar of
exactly two members, ``model.xml`` and ``model.bin`` (:func:`pack_ir` /
:func:`unpack_ir`). The backend unpacks it into a temporary directory that lives as
long as the backend (OpenVINO may map the ``.bin`` instead of copying it).

Options (``Assignment.options``):

- ``device``: ``CPU`` (default), or ``GPU`` / ``NPU`` (or ``GPU.1`` ...) where
  OpenVINO lists them; one it does not list fails with :class:`BackendUnavailable`.
- ``performance_hint``: ``LATENCY`` (default) or ``THROUGHPUT``.
- ``inference_precision``: ``f32`` (default, so runs compare across CPUs), ``bf16``,
  ``f16``, or ``auto`` (OpenVINO's own choice: bf16 on CPUs with AMX / AVX512-BF16).
- ``task``: ``auto`` (default), ``llm`` or ``classify``. A causal LM (an ``input_ids``
  input and a 3-D ``logits`` output) is measured in the LLM mode of
  :mod:`agent.backends.openvino_llm` (decode steps with the KV cache, prompt speed,
  TTFT, fidelity to an LLM reference), which this class delegates to; ``auto`` picks
  it from the IR, ``llm``/``classify`` force a mode.

What the compiled model actually runs with (precision, hint, threads, streams) is read
back from OpenVINO and stored in the environment, not the options asked for.
"""

from __future__ import annotations

import functools
import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from agent.backends.base import (
    SYNTHETIC_INPUT_SEED,
    Backend,
    check_model_file,
    check_options,
    one_line,
)
from edgefarm.domain import MeasureSettings
from edgefarm.errors import BackendUnavailable, ModelLoadError, TaskError, UsageError

DEFAULT_DEVICE = "CPU"
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "bf16", "f16", "auto")
DEFAULT_PRECISION = "f32"

# Member names inside an IR tar: fixed, so the same IR always packs to the same bytes.
IR_XML_NAME = "model.xml"
IR_BIN_NAME = "model.bin"

# Compiled-model properties read back into the environment (key suffix -> property).
_READ_BACK = {
    "inference_precision": "INFERENCE_PRECISION_HINT",
    "performance_hint": "PERFORMANCE_HINT",
    "inference_num_threads": "INFERENCE_NUM_THREADS",
    "num_streams": "NUM_STREAMS",
    "execution_devices": "EXECUTION_DEVICES",
    "dynamic_quantization_group_size": "DYNAMIC_QUANTIZATION_GROUP_SIZE",
}


class OpenVinoBackend(Backend):
    """Measures OpenVINO IR models with the OpenVINO runtime."""

    NAME: ClassVar[str] = "openvino"
    MODULE: ClassVar[str] = "openvino"
    EXTRA: ClassVar[str] = "openvino"
    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("openvino", "openvino-nightly")
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"device", "performance_hint", "inference_precision", "task"}
    )

    def __init__(self) -> None:
        self._ov: Any = None
        self._compiled: Any = None
        self._request: Any = None  # the infer request of the timing loop
        self._spare: Any = None  # the infer request of run_once and predict
        self._bound: list[np.ndarray] = []  # arrays the timing request's tensors share
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._environment: dict[str, str] = {}
        self._llm: Backend | None = None  # the LLM mode, when the model is a causal LM
        self._eval_is_llm = False

    def read_eval_inputs(self, eval_path: Path, settings: MeasureSettings) -> np.ndarray:
        """An LLM reference's tokens, else the first inputs of a classification eval file."""
        from agent.backends.openvino_llm import llm_reference_tokens

        tokens = llm_reference_tokens(eval_path)
        self._eval_is_llm = tokens is not None
        return tokens if tokens is not None else super().read_eval_inputs(eval_path, settings)

    def load(self, model_path: Path, settings: MeasureSettings, options: dict[str, str]) -> None:
        """Unpack the IR tar, compile it with explicit hint, threads and precision; hand a
        causal LM to the LLM mode (see the module docstring)."""
        check_options(self.NAME, options, self.OPTIONS)
        ov = self._ov = self.require()
        check_model_file(model_path)
        hint = options.get("performance_hint", "LATENCY").upper()
        if hint not in PERFORMANCE_HINTS:
            raise TaskError(
                f"unknown performance_hint '{hint}' (known: {', '.join(PERFORMANCE_HINTS)})"
            )
        precision = options.get("inference_precision", DEFAULT_PRECISION).lower()
        if precision not in INFERENCE_PRECISIONS:
            raise TaskError(
                f"unknown inference_precision '{precision}' "
                f"(known: {', '.join(INFERENCE_PRECISIONS)})"
            )

        core = ov.Core()
        device = _pick_device(options.get("device", DEFAULT_DEVICE), list(core.available_devices))
        supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if "INFERENCE_NUM_THREADS" in supported:  # CPU only; GPU / NPU reject it
            config["INFERENCE_NUM_THREADS"] = settings.threads
        if precision != "auto":
            if "INFERENCE_PRECISION_HINT" not in supported:
                raise TaskError(f"device {device} does not take an inference_precision")
            config["INFERENCE_PRECISION_HINT"] = precision

        self._workdir = tempfile.TemporaryDirectory(prefix="edgefarm-openvino-")
        xml = unpack_ir_file(model_path, Path(self._workdir.name))
        try:
            self._compiled = core.compile_model(core.read_model(str(xml)), device, config)
        except Exception as err:  # OpenVINO raises RuntimeError and friends
            raise ModelLoadError(
                one_line(f"openvino could not load {model_path.name} on {device}: {err}")
            ) from err

        self._environment = {
            "openvino.version": str(ov.get_version()),
            "openvino.device": device,
            "openvino.full_device_name": str(core.get_property(device, "FULL_DEVICE_NAME")),
            "openvino.inference_precision_requested": precision,
            **{f"openvino.{k}": self._read_back(p) for k, p in _READ_BACK.items()},
        }
        from agent.backends.openvino_llm import llm_mode

        self._llm = llm_mode(
            ov, self._compiled, self._environment, settings, options, self._eval_is_llm
        )

    def _read_back(self, prop: str) -> str:
        """A compiled-model property as text ("n/a" where the device lacks it)."""
        try:
            value = self._compiled.get_property(prop)
        except Exception:
            return "n/a"
        if hasattr(value, "get_type_name"):  # openvino.Type, e.g. f32 / bf16
            return str(value.get_type_name())
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value)
        return str(value)

    def make_inputs(self, eval_inputs: np.ndarray | None, batch_size: int) -> dict[int, np.ndarray]:
        """The inputs of every timed iteration, by input index.

        The first input takes the first ``batch_size`` eval examples when given (repeated
        when there are fewer). Anything else is drawn from a seeded generator with the
        declared shape: the batch dimension is ``batch_size``, other dynamic dimensions 1.
        The LLM mode: its token stream.
        """
        if self._llm is not None:
            return self._llm.make_inputs(eval_inputs, batch_size)
        rng = np.random.default_rng(SYNTHETIC_INPUT_SEED)
        feed: dict[int, np.ndarray] = {}
        for index, port in enumerate(self._compiled.inputs):
            dtype = _numpy_dtype(port)
            if port.get_partial_shape().rank.is_dynamic:
                raise TaskError(f"model input {index} has a dynamic rank: no input can be made")
            dims = list(port.get_partial_shape())
            shape = [d.get_length() if d.is_static else 1 for d in dims]
            if shape:
                if dims[0].is_static and shape[0] != batch_size:
                    raise TaskError(
                        f"model input {index} has a fixed batch of {shape[0]}, "
                        f"but batch_size is {batch_size}"
                    )
                shape[0] = batch_size
            if index == 0 and eval_inputs is not None and len(eval_inputs) > 0:
                reps = -(-batch_size // len(eval_inputs))
                batch = np.concatenate([eval_inputs] * reps)[:batch_size]
                feed[index] = np.ascontiguousarray(batch, dtype=dtype)
            elif np.issubdtype(dtype, np.floating):
                feed[index] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[index] = rng.integers(0, 2, size=shape).astype(dtype)
        return feed

    def _spare_request(self) -> Any:
        if self._spare is None:
            self._spare = self._compiled.create_infer_request()
        return self._spare

    def run_once(self, inputs: Any) -> None:
        """One synchronous inference on ``inputs`` (the LLM mode: one decode step)."""
        if self._llm is not None:
            self._llm.run_once(inputs)
        else:
            self._spare_request().infer(inputs)

    def timed_call(self, inputs: Any) -> Callable[[], object]:
        """The infer request's own ``infer``, its input tensors bound once beforehand.

        The tensors share the arrays' memory, and the call goes to OpenVINO's native
        ``infer`` (outputs as views, no copy) rather than its Python wrapper, which
        would re-dispatch the (absent) inputs and copy the outputs every iteration.
        The LLM mode hands out its decode step.
        """
        if self._llm is not None:
            return self._llm.timed_call(inputs)
        ov = self._ov
        request = self._request = self._compiled.create_infer_request()
        self._bound = [np.ascontiguousarray(a) for a in inputs.values()]
        for index, array in zip(inputs, self._bound, strict=True):
            request.set_input_tensor(index, ov.Tensor(array, shared_memory=True))
        native = _native_infer(ov)
        if native is None:
            return functools.partial(request.infer, None, True, True)
        return functools.partial(native, request, {}, True, True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The first output for ``batch`` fed to the (single) model input."""
        if self._llm is not None:
            return self._llm.predict(batch)
        ports = self._compiled.inputs
        if len(ports) != 1:
            raise TaskError(
                f"accuracy needs a single-input model; this one has {len(ports)} inputs"
            )
        array = np.ascontiguousarray(batch, dtype=_numpy_dtype(ports[0]))
        result = self._spare_request().infer({0: array})
        return np.array(result[0])

    def extra_metrics(self, settings: MeasureSettings) -> dict[str, float]:
        """The LLM mode's prompt speed and TTFT; none otherwise."""
        return self._llm.extra_metrics(settings) if self._llm is not None else {}

    def evaluate(self, eval_path: Path, settings: MeasureSettings) -> dict[str, float]:
        """LLM fidelity in the LLM mode, else classification accuracy."""
        if self._llm is not None:
            return self._llm.evaluate(eval_path, settings)
        return super().evaluate(eval_path, settings)

    def version(self) -> str:
        """OpenVINO's full version (with its build number)."""
        ov = self._ov or self.require()
        return str(ov.get_version())

    def environment(self) -> dict[str, str]:
        """Version, device and the compiled model's actual precision, hint, threads, streams
        (the LLM mode adds its own)."""
        if self._llm is not None:
            return self._llm.environment()
        return dict(self._environment)


def _pick_device(wanted: str, available: list[str]) -> str:
    """``wanted`` when OpenVINO lists it (``GPU`` matches ``GPU.0`` too)."""
    wanted = wanted.upper()
    if wanted in available or any(d.startswith(wanted + ".") for d in available):
        return wanted
    raise BackendUnavailable(
        f"OpenVINO device '{wanted}' is not available here (available: {', '.join(available)})"
    )


def _numpy_dtype(port: Any) -> np.dtype[Any]:
    """The numpy dtype of a model input port."""
    try:
        return np.dtype(port.get_element_type().to_dtype())
    except Exception as err:
        raise TaskError(f"unsupported model input type {port.get_element_type()}") from err


def _native_infer(ov: Any) -> Callable[..., object] | None:
    """OpenVINO's native ``InferRequest.infer(inputs, share_outputs, decode_strings)``.

    The Python ``InferRequest`` subclasses it; None when this OpenVINO is laid out
    differently (the caller then uses the Python wrapper).
    """
    for cls in ov.InferRequest.__mro__[1:]:
        if cls.__module__.endswith("_pyopenvino") and "infer" in vars(cls):
            method: Callable[..., object] = cls.infer
            return method
    return None


# --- IR packing ----------------------------------------------------------------------


def pack_ir(xml: Path) -> bytes:
    """An IR (``xml`` and the ``.bin`` beside it) as one deterministic, uncompressed tar.

    Members are ``model.bin`` and ``model.xml`` in that (sorted) order, mtime 0, owner
    0/0, mode 0644: the same IR always gives the same bytes (and artifact hash). The
    archive ends after its two end blocks (no padding to a 10 KiB record), so it is at
    most 2.5 KiB larger than the two files. Raises :class:`UsageError` when either file is missing.
    """
    bin_path = xml.with_suffix(".bin")
    for path in (xml, bin_path):
        if not path.is_file():
            raise UsageError(f"OpenVINO IR file not found: {path}")
    buffer = io.BytesIO()
    end = 2 * tarfile.BLOCKSIZE  # the two zero blocks that end every tar
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, path in sorted({IR_XML_NAME: xml, IR_BIN_NAME: bin_path}.items()):
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
            end += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    # tarfile pads the archive with zeros to a 10 KiB record; readers need only the
    # end blocks, and the padding would inflate a small model's recorded size.
    return buffer.getvalue()[:end]


def unpack_ir(data: bytes, out_dir: Path) -> Path:
    """Write an IR tar's ``.xml`` and ``.bin`` into ``out_dir``; the ``.xml`` path.

    Raises :class:`ModelLoadError` unless ``data`` is a tar of exactly one ``.xml``
    and one ``.bin`` regular file with plain names.
    """
    return _unpack(io.BytesIO(data), out_dir, "IR data")


def unpack_ir_file(path: Path, out_dir: Path) -> Path:
    """:func:`unpack_ir` reading the tar from ``path`` (streamed, not held in memory)."""
    with path.open("rb") as f:
        return _unpack(f, out_dir, path.name)


def _unpack(source: IO[bytes], out_dir: Path, label: str) -> Path:
    try:
        with tarfile.open(fileobj=source, mode="r:") as tar:
            members = tar.getmembers()
            _check_members(members, label)
            out_dir.mkdir(parents=True, exist_ok=True)
            for member in members:
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise ModelLoadError(f"{label}: cannot read tar member {member.name!r}")
                # Fixed names: OpenVINO finds the weights as the .xml's stem + ".bin".
                is_xml = Path(member.name).suffix.lower() == ".xml"
                target = out_dir / (IR_XML_NAME if is_xml else IR_BIN_NAME)
                with extracted, target.open("wb") as out:
                    shutil.copyfileobj(extracted, out)
    except (tarfile.TarError, EOFError) as err:
        raise ModelLoadError(one_line(f"{label} is not a valid OpenVINO IR tar: {err}")) from err
    return out_dir / IR_XML_NAME


def _check_members(members: list[tarfile.TarInfo], label: str) -> None:
    names = sorted(m.name for m in members)
    suffixes = sorted(Path(n).suffix.lower() for n in names)
    plain = all(m.isfile() and m.name == Path(m.name).name for m in members)
    if suffixes != [".bin", ".xml"] or not plain:
        raise ModelLoadError(
            f"{label} is not an OpenVINO IR tar: expected exactly one .xml and one .bin "
            f"file (plain names, no folders or links), found {names}"
        )

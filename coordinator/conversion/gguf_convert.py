"""GGUF conversion for llama.cpp: dequantize to F16, re-quantize, inspect, tokenize.

A packaged GGUF is often already quantized (SmolLM2 ships as Q4_1). llama.cpp refuses
to re-quantize a quantized file, so the pipeline is: :func:`dequantize_to_f16` once
(with the ``gguf`` package), then :func:`quantize_gguf` from that F16 file to each type.

K-quants need rows whose length is a multiple of 256; where a model's width is not
(SmolLM2's 576), llama.cpp silently falls back to other types on those tensors, so the
effective :func:`tensor_type_mix` of every artifact is part of its provenance.

``gguf`` and ``llama_cpp`` (the ``llama-cpp`` extra) are imported only when needed, so
:data:`LLAMA_QUANT_TYPES` can be read without them.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.conversion.files import file_sha256
from edgefarm.errors import ArtifactError, MissingExtra, TaskError, UnsupportedScheme, UsageError

EXTRA = "llama-cpp"

# llama.cpp quantization types offered, as named by llama-quantize.
LLAMA_QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# Each type's ``llama_ftype`` constant in the llama_cpp module.
LLAMA_FTYPE_CONSTANTS: dict[str, str] = {q: f"LLAMA_FTYPE_MOSTLY_{q}" for q in LLAMA_QUANT_TYPES}
# Tensor types a quantization source may hold (llama.cpp will not re-quantize others).
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file as its header describes it."""

    name: str
    shape: tuple[int, ...]  # ggml order: the row length first
    type_name: str  # ggml type, e.g. "Q4_K", "F16"
    n_bytes: int


def llama_ftype(qtype: str) -> int:
    """The ``llama_ftype`` value of a quantization type; unknown -> UnsupportedScheme."""
    if qtype not in LLAMA_FTYPE_CONSTANTS:
        raise UnsupportedScheme(
            f"unknown llama.cpp quantization type '{qtype}' (known: {', '.join(LLAMA_QUANT_TYPES)})"
        )
    return int(getattr(_llama_cpp(), LLAMA_FTYPE_CONSTANTS[qtype]))


# ----- dequantize -------------------------------------------------------------


def dequantize_to_f16(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` with every weight matrix as F16 (1-D tensors as F32) at ``dst``.

    All metadata (architecture, hyper-parameters, tokenizer, chat template) is copied;
    ``general.file_type`` becomes MOSTLY_F16. This mirrors llama.cpp's own converter,
    which keeps norms and other 1-D tensors in F32. Returns the provenance: tool,
    version, source sha256 and the tensor type counts before and after.
    """
    gguf = _gguf()
    if not src.is_file():
        raise UsageError(f"source model not found: {src}")
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError) as err:
        raise ArtifactError(f"cannot read GGUF file {src}: {err}") from err
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ArtifactError(f"{src} has no {gguf.Keys.General.ARCHITECTURE}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(dst, str(arch_field.contents()))
    try:
        _write_f16(gguf, reader, writer)
    except BaseException:
        writer.close()
        dst.unlink(missing_ok=True)
        raise
    return {
        "tool": "gguf",
        "tool_version": _dist_version("gguf"),
        "step": "dequantize-f16",
        "source_sha256": file_sha256(src),
        "file_type": "MOSTLY_F16",
        "tensor_types_before": dict(
            sorted(Counter(t.tensor_type.name for t in reader.tensors).items())
        ),
        "tensor_types_after": tensor_type_mix(dst),
        "size_bytes": dst.stat().st_size,
    }


def _write_f16(gguf: Any, reader: Any, writer: Any) -> None:
    """Copy the metadata and write every tensor dequantized (F16 matrices, F32 vectors)."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.MOSTLY_F16)
        elif field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
    plan = []
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # numpy order
        out_dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        nbytes = int(tensor.n_elements) * out_dtype.itemsize
        writer.add_tensor_info(tensor.name, shape, out_dtype, nbytes)
        plan.append((tensor, shape, out_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, shape, out_dtype in plan:
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise UnsupportedScheme(
                f"gguf cannot dequantize tensor {tensor.name} of type {tensor.tensor_type.name}"
            ) from err
        writer.write_tensor_data(np.ascontiguousarray(values.reshape(shape), dtype=out_dtype))
    writer.close()


# ----- quantize ---------------------------------------------------------------


def quantize_gguf(src_f16: Path, dst: Path, qtype: str, threads: int = 0) -> dict[str, Any]:
    """Quantize an unquantized GGUF to ``qtype`` with llama.cpp; return the provenance.

    ``threads`` 0 lets llama.cpp use every core; the output does not depend on it.
    Raises :class:`UnsupportedScheme` for an unknown type, :class:`UsageError` for a
    missing or already quantized source, :class:`TaskError` when llama.cpp fails.
    Provenance includes the tensor type mix and bytes by type actually written.
    """
    ftype = llama_ftype(qtype)
    llama_cpp = _llama_cpp()
    if not src_f16.is_file():
        raise UsageError(f"source model not found: {src_f16}")
    quantized = sorted(
        {t.type_name for t in gguf_tensor_infos(src_f16) if t.type_name not in UNQUANTIZED_TYPES}
    )
    if quantized:
        raise UsageError(
            f"{src_f16} is already quantized ({', '.join(quantized)}): llama.cpp re-quantizes "
            "only F32/F16/BF16 files; dequantize it to F16 first"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with _captured_llama_log() as log_lines:
        status = llama_cpp.llama_model_quantize(
            str(src_f16).encode(), str(dst).encode(), ctypes.byref(params)
        )
    log = "".join(log_lines)
    if status != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        tail = "\n".join(log.strip().splitlines()[-5:])
        raise TaskError(
            f"llama.cpp failed to quantize {src_f16.name} to {qtype} "
            f"(llama_model_quantize returned {status}); its log ends:\n{tail}"
        )
    fallbacks = _fallbacks(log)
    return {
        "tool": "llama.cpp",
        "tool_version": _dist_version("llama-cpp-python"),
        "step": "quantize",
        "scheme": qtype,
        "parameters": {
            "ftype": LLAMA_FTYPE_CONSTANTS[qtype],
            "allow_requantize": bool(params.allow_requantize),
            "quantize_output_tensor": bool(params.quantize_output_tensor),
            "pure": bool(params.pure),
            "imatrix": False,
        },
        "tensor_types": tensor_type_mix(dst),
        "tensor_type_bytes": tensor_type_bytes(dst),
        "fallback_tensors": sum(fallbacks.values()),
        "fallbacks": fallbacks,
        "size_bytes": dst.stat().st_size,
    }


# ----- inspect ----------------------------------------------------------------


def tensor_type_mix(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds, e.g. ``{"F32": 61, ...}``."""
    return dict(sorted(Counter(t.type_name for t in gguf_tensor_infos(path)).items()))


def tensor_type_bytes(path: Path) -> dict[str, int]:
    """How many bytes of tensor data each ggml type takes in a GGUF file."""
    out: Counter[str] = Counter()
    for tensor in gguf_tensor_infos(path):
        out[tensor.type_name] += tensor.n_bytes
    return dict(sorted(out.items()))


def gguf_tensor_infos(path: Path) -> list[GGUFTensorInfo]:
    """The tensor table of a little-endian GGUF v2/v3 file, read from its header only.

    ``gguf.GGUFReader`` takes seconds on a file with a large vocabulary because it
    parses every metadata value into numpy views; this skips them. Raises
    :class:`ArtifactError` for a file that is not a readable GGUF.
    """
    gguf = _gguf()
    sizes = gguf.GGML_QUANT_SIZES
    try:
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            table = _HeaderParser(buf).tensor_table()
        infos = []
        for name, shape, kind in table:
            qtype = gguf.GGMLQuantizationType(kind)
            infos.append(GGUFTensorInfo(name, shape, qtype.name, _n_bytes(shape, *sizes[qtype])))
        return infos
    except (OSError, ValueError, struct.error, KeyError) as err:
        raise ArtifactError(f"cannot read the GGUF tensor table of {path}: {err}") from err


def _n_bytes(shape: tuple[int, ...], block: int, type_size: int) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n // block * type_size


class _HeaderParser:
    """Walks a GGUF header: metadata values are skipped, tensor infos collected."""

    # fixed-size metadata value types -> their size in bytes
    _SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def _u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return int(value)

    def _u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(value)

    def _string(self) -> str:
        n = self._u64()
        text = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def _skip_value(self, kind: int) -> None:
        if kind == self._STRING:
            length = self._u64()  # read before adding: `pos += _u64()` would add to the old pos
            self.pos += length
        elif kind == self._ARRAY:
            item_kind, count = self._u32(), self._u64()
            if item_kind in self._SCALAR_SIZES:
                self.pos += self._SCALAR_SIZES[item_kind] * count
            else:
                for _ in range(count):
                    self._skip_value(item_kind)
        else:
            self.pos += self._SCALAR_SIZES[kind]

    def tensor_table(self) -> list[tuple[str, tuple[int, ...], int]]:
        if self.buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self.pos = 4
        version_ = self._u32()
        if version_ not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version_} (or a big-endian file)")
        n_tensors, n_kv = self._u64(), self._u64()
        for _ in range(n_kv):
            self._string()
            self._skip_value(self._u32())
        table = []
        for _ in range(n_tensors):
            name = self._string()
            shape = tuple(self._u64() for _ in range(self._u32()))
            kind = self._u32()
            self._u64()  # data offset
            table.append((name, shape, kind))
        return table


# ----- tokenize ---------------------------------------------------------------


def tokenize_text(gguf_path: Path, text: str) -> np.ndarray:
    """Token ids (int32) of ``text`` with the model's own tokenizer (vocabulary only).

    A BOS token is prepended exactly when the model's metadata asks for one.
    """
    llama_cpp = _llama_cpp()
    if not gguf_path.is_file():
        raise UsageError(f"model not found: {gguf_path}")
    with _captured_llama_log():
        llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        # add_bos=True lets llama.cpp add the special tokens the vocabulary is
        # configured for (tokenizer.ggml.add_bos_token), and nothing else.
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()
    return np.asarray(ids, dtype=np.int32)


# ----- helpers ----------------------------------------------------------------


def _dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise MissingExtra(EXTRA, "gguf") from err
    return gguf


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise MissingExtra(EXTRA, "llama_cpp") from err
    return llama_cpp


@contextlib.contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log text instead of printing it; yields the growing list.

    A quantization otherwise prints one line per tensor (thousands). Afterwards the
    log goes back to llama_cpp's own callback (or llama.cpp's default, stderr).
    """
    llama_cpp = _llama_cpp()
    lines: list[str] = []

    def collect(_level: int, text: bytes | None, _user_data: Any) -> None:
        if text:
            lines.append(text.decode("utf-8", errors="replace"))

    callback = llama_cpp.llama_log_callback(collect)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except (ImportError, AttributeError):
            llama_cpp.llama_log_set(None, ctypes.c_void_p(0))


_FALLBACK_LINE = re.compile(r"required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)")


def _fallbacks(log: str) -> dict[str, int]:
    """``{"q6_K->q8_0": 180}``: the per-tensor type fallbacks llama.cpp reported."""
    found = Counter(f"{want}->{got}" for want, got in _FALLBACK_LINE.findall(log))
    return dict(sorted(found.items()))

"""A small, pure-Python validator of GGUF files, run before llama.cpp's loader sees them.

A corrupt or hostile GGUF can crash or exhaust the native loader; :func:`check_gguf`
walks the header (magic, version, metadata key/values, tensor infos) over a read-only
memory map and checks every length against named limits and against the file's size
before using it, so nothing is ever allocated from an unchecked length. Each problem
is one :class:`ModelLoadError` line naming the file and what is wrong.

Supports GGUF versions 2 and 3 (little-endian). Tensor data sizes come from a built-in
copy of ggml's type table; the ``gguf`` package, when installed, is asked about type ids
the copy lacks.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from edgefarm.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

MAX_TENSORS = 100_000  # llama-family models have a few hundred to a few thousand
MAX_KV = 100_000  # metadata key/values
MAX_STRING_BYTES = 16 * 1024 * 1024  # one metadata string (chat templates are a few KiB)
MAX_ARRAY_LEN = 64 * 1024 * 1024  # one metadata array (vocabularies, merges, charsmaps)
MAX_ARRAY_NESTING = 4  # arrays of arrays
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
MAX_DIM_SIZE = 1 << 31  # one dimension
MAX_TENSOR_ELEMENTS = 1 << 50  # all dimensions together
MAX_TENSOR_NAME_BYTES = 64  # GGML_MAX_NAME (including the terminating NUL in C)

# GGUF metadata value types -> struct format of a scalar (STRING=8 and ARRAY=9 are special).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_STRING = 8
_ARRAY = 9

# ggml tensor type id -> (name, elements per block, bytes per block); as in gguf 0.19.
_BUILTIN_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


@dataclass(frozen=True)
class GgufSummary:
    """What the header of a valid GGUF file says."""

    version: int
    tensor_count: int
    kv_count: int
    architecture: str  # ``general.architecture`` ('' when absent)
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensors
    file_size: int = 0
    n_parameters: int = 0  # elements over all tensors
    tensor_bytes: int = 0  # tensor data over all tensors (no metadata, no padding)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per element: the effective width of a quantized model."""
        return 8.0 * self.tensor_bytes / self.n_parameters if self.n_parameters else 0.0


def ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, block elements, block bytes) of a ggml type id, or None when unknown.

    The built-in table answers first; the ``gguf`` package (slow to import) is asked
    only about ids it lacks, so newer ggml types are known whenever gguf knows them.
    """
    known = _BUILTIN_TYPES.get(type_id)
    if known is not None:
        return known
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return None
    try:
        qtype = GGMLQuantizationType(type_id)
        block, size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        return None
    return qtype.name, int(block), int(size)


class _Reader:
    """Bounded little-endian reads over a buffer; every failure is a ModelLoadError."""

    def __init__(self, buf: mmap.mmap | bytes, name: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"invalid GGUF file {self.name}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> int | float | bool:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value  # type: ignore[no-any-return]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string_length(self, what: str, limit: int = MAX_STRING_BYTES) -> int:
        length = self.u64(f"length of {what}")
        if length > limit:
            raise self.fail(f"{what} claims {length} bytes (limit {limit})")
        self.need(length, what)
        return length

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        length = self.string_length(what, limit)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        length = self.string_length(what)  # moves past the length field first
        self.pos += length


def check_gguf(path: Path) -> GgufSummary:
    """Validate the GGUF header of ``path``; its summary, or one-line :class:`ModelLoadError`.

    Checks: the file exists and is not empty; magic ``GGUF``; version 2 or 3; tensor and
    metadata counts, string and array lengths within the module's limits and the file;
    known metadata value types; at most 4 tensor dimensions, each positive and bounded;
    known ggml tensor types whose element count fits their block size; unique tensor
    names; aligned tensor offsets; and every tensor's data inside the file.
    """
    name = path.name
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    file_size = path.stat().st_size
    if file_size == 0:
        raise ModelLoadError(f"invalid GGUF file {name}: the file is empty")
    try:
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            return _parse(_Reader(buf, name), file_size)
    except OSError as err:
        raise ModelLoadError(f"cannot read GGUF file {name}: {err}") from err


def _parse(r: _Reader, file_size: int) -> GgufSummary:
    r.need(4, "magic")
    magic = bytes(r.buf[0:4])
    if magic != GGUF_MAGIC:
        raise r.fail(f"bad magic {magic!r} (expected {GGUF_MAGIC!r})")
    r.pos = 4
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise r.fail(f"big-endian GGUF (version {swapped}) is not supported")
        raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = r.u64("tensor count")
    if tensor_count > MAX_TENSORS:
        raise r.fail(f"header claims {tensor_count} tensors (limit {MAX_TENSORS})")
    kv_count = r.u64("metadata count")
    if kv_count > MAX_KV:
        raise r.fail(f"header claims {kv_count} metadata key/values (limit {MAX_KV})")

    architecture = ""
    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for index in range(kv_count):
        key = r.string(f"metadata key #{index}")
        if key in keys:
            raise r.fail(f"duplicate metadata key '{key}'")
        keys.add(key)
        value_type = r.u32(f"type of metadata '{key}'")
        if key == "general.architecture" and value_type == _STRING:
            architecture = r.string(f"metadata '{key}'")
        elif key == "general.alignment" and value_type == 4:
            alignment = r.u32(f"metadata '{key}'")
            if alignment == 0 or alignment & (alignment - 1):
                raise r.fail(f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(r, value_type, f"metadata '{key}'", depth=0)

    names: set[str] = set()
    tensor_types: dict[str, int] = {}
    extents: list[tuple[str, int, int]] = []  # name, offset, bytes
    n_parameters = 0
    tensor_bytes = 0
    for index in range(tensor_count):
        tname = r.string(f"name of tensor #{index}", limit=MAX_TENSOR_NAME_BYTES)
        if tname in names:
            raise r.fail(f"duplicate tensor name '{tname}'")
        names.add(tname)
        n_dims = r.u32(f"dimension count of tensor '{tname}'")
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise r.fail(f"tensor '{tname}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        elements = 1
        dims = []
        for d in range(n_dims):
            dim = r.u64(f"dimension {d} of tensor '{tname}'")
            if dim == 0 or dim > MAX_DIM_SIZE:
                raise r.fail(
                    f"tensor '{tname}' has dimension {d} of size {dim} "
                    f"(1 to {MAX_DIM_SIZE} allowed)"
                )
            dims.append(dim)
            elements *= dim
        if elements > MAX_TENSOR_ELEMENTS:
            raise r.fail(f"tensor '{tname}' has {elements} elements (limit {MAX_TENSOR_ELEMENTS})")
        type_id = r.u32(f"type of tensor '{tname}'")
        known = ggml_type(type_id)
        if known is None:
            raise r.fail(f"tensor '{tname}' has unknown ggml type id {type_id}")
        type_name, block, block_bytes = known
        if dims[0] % block:
            raise r.fail(
                f"tensor '{tname}' of type {type_name}: first dimension {dims[0]} "
                f"is not a multiple of its block size {block}"
            )
        offset = r.u64(f"data offset of tensor '{tname}'")
        nbytes = elements // block * block_bytes
        extents.append((tname, offset, nbytes))
        tensor_types[type_name] = tensor_types.get(type_name, 0) + 1
        n_parameters += elements
        tensor_bytes += nbytes

    data_start = -(-r.pos // alignment) * alignment
    for tname, offset, nbytes in extents:
        if offset % alignment:
            raise r.fail(f"tensor '{tname}' data offset {offset} is not aligned to {alignment}")
        end = data_start + offset + nbytes
        if end > file_size:
            raise r.fail(
                f"tensor '{tname}' data ends at byte {end}, past the end of the file "
                f"({file_size} bytes): truncated or corrupt"
            )
    return GgufSummary(
        version=version,
        tensor_count=tensor_count,
        kv_count=kv_count,
        architecture=architecture,
        tensor_types=dict(sorted(tensor_types.items())),
        file_size=file_size,
        n_parameters=n_parameters,
        tensor_bytes=tensor_bytes,
    )


def _skip_value(r: _Reader, value_type: int, what: str, depth: int) -> None:
    """Step over one metadata value, checking its lengths."""
    if value_type in _SCALAR_FORMATS:
        n = struct.calcsize(_SCALAR_FORMATS[value_type])
        r.need(n, what)
        r.pos += n
    elif value_type == _STRING:
        r.skip_string(what)
    elif value_type == _ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise r.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        elem_type = r.u32(f"element type of {what}")
        count = r.u64(f"length of {what}")
        if count > MAX_ARRAY_LEN:
            raise r.fail(f"{what} claims {count} elements (limit {MAX_ARRAY_LEN})")
        if elem_type in _SCALAR_FORMATS:
            n = count * struct.calcsize(_SCALAR_FORMATS[elem_type])
            r.need(n, what)
            r.pos += n
        elif elem_type == _STRING:
            _skip_strings(r, count, what)
        elif elem_type == _ARRAY:
            r.need(count * 12, what)  # each element is at least a type and a length
            for i in range(count):
                _skip_value(r, elem_type, f"{what}[{i}]", depth + 1)
        else:
            raise r.fail(f"{what} has unknown element type {elem_type}")
    else:
        raise r.fail(f"{what} has unknown value type {value_type}")


_U64 = struct.Struct("<Q")


def _skip_strings(r: _Reader, count: int, what: str) -> None:
    """Step over an array of ``count`` strings (a tight loop: vocabularies are large)."""
    r.need(count * 8, what)  # each string takes at least its 8-byte length
    buf, pos, size = r.buf, r.pos, r.size
    unpack = _U64.unpack_from
    for i in range(count):
        if pos + 8 > size:
            r.pos = pos
            r.need(8, f"length of {what}[{i}]")
        (length,) = unpack(buf, pos)
        if length > MAX_STRING_BYTES:
            raise r.fail(f"{what}[{i}] claims {length} bytes (limit {MAX_STRING_BYTES})")
        pos += 8 + length
    if pos > size:
        raise r.fail(f"truncated: {what} runs past the end of the file ({size} bytes)")
    r.pos = pos

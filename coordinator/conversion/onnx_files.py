"""ONNX models on disk: one ``.onnx`` file, or the graph plus ONE external-data file.

A protobuf cannot exceed 2 GB, so a larger model keeps its weights as external data.
The farm's convention: the weights go into one file beside the graph, named after it
(``model.onnx`` -> ``model.onnx.data``), and such a model is stored and shipped as one
folder artifact (an uncompressed tar of the two files, named ``*.onnx.tar``; see
:mod:`agent.backends.archive`). A model without external data stays a single ``.onnx``.

Everything here works tensor by tensor: no model is loaded into memory whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from edgefarm.errors import UsageError

DATA_SUFFIX = ".data"
PROTOBUF_LIMIT = 2**31 - 1  # bytes: a serialized ModelProto must stay under this
# Above this many bytes of weights, a model is written with external data (room for
# the graph itself under the protobuf limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_ALIGN = 4096  # tensors start at page boundaries in the data file (onnxruntime may mmap)
_COPY_CHUNK = 1 << 24
_FILE_MODE = 0o644


def data_file_name(onnx_path: Path) -> str:
    """The name of a model's one external-data file: ``<name>.onnx.data``."""
    return Path(onnx_path).name + DATA_SUFFIX


def model_files(onnx_path: Path) -> list[Path]:
    """The ``.onnx`` file and every external-data file it refers to (sorted, unique)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _external_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_path, *(onnx_path.parent / name for name in sorted(locations))]


def files_size(onnx_path: Path) -> int:
    """Bytes on disk of a model: the graph and its external data."""
    return sum(path.stat().st_size for path in model_files(onnx_path))


def has_external_data(onnx_path: Path) -> bool:
    """Whether any tensor of the model lives in an external file."""
    return len(model_files(onnx_path)) > 1


def uses_external_data(model: Any) -> bool:
    """Whether any tensor of an in-memory ``onnx.ModelProto`` refers to an external file."""
    return any(True for _ in _external_tensors(model))


def set_metadata(model: Any, values: dict[str, str]) -> None:
    """Set (or replace) ``metadata_props`` entries of an in-memory model."""
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(onnx_path: Path) -> dict[str, str]:
    """The ``metadata_props`` of a model file (its external weights are not read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def consolidate_external_data(src: Path, dst: Path, model: Any = None) -> list[Path]:
    """Write the model ``src`` (any external-data layout) as ``dst`` + ONE data file
    ``dst.name + ".data"``, tensor by tensor (page-aligned); the files written.

    ``model``: ``src`` already loaded without its external data (e.g. with metadata
    added), else it is loaded here. ``src``'s external files are left alone (``src``
    may equal ``dst`` only when the data file names differ from the new one). A model
    without external data is copied.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if model is None:
        model = onnx.load(str(src), load_external_data=False)
    tensors = list(_external_tensors(model))
    if not tensors:
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return [dst]
    data_path = dst.parent / data_file_name(dst)
    if any(_entries(t).get("location") == data_path.name for t in tensors) and (
        src.parent.resolve() == dst.parent.resolve()
    ):
        raise UsageError(f"{data_path} is both the source and the target of external data")
    tmp = data_path.with_name(data_path.name + ".part")
    with tmp.open("wb") as out:
        for tensor in tensors:
            entries = _entries(tensor)
            offset = _pad(out)
            length = _copy_range(
                src.parent / entries["location"],
                int(entries.get("offset", 0)),
                int(entries["length"]) if "length" in entries else None,
                out,
            )
            _set_entries(tensor, {"location": data_path.name, "offset": offset, "length": length})
    tmp.chmod(_FILE_MODE)
    os.replace(tmp, data_path)
    _write_proto(model, dst)
    return [dst, data_path]


def save_model(model: Any, dst: Path, external: bool | None = None) -> list[Path]:
    """Save an in-memory ``onnx.ModelProto`` as ``dst`` (+ ``dst.name + ".data"`` when
    ``external``; ``None``: when its weights exceed :data:`EXTERNAL_DATA_THRESHOLD`).
    Returns the files written; a stale data file from an earlier save is removed."""
    import onnx

    dst = Path(dst)
    data_path = dst.parent / data_file_name(dst)
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path.unlink(missing_ok=True)
    if not external:
        onnx.save_model(model, str(dst))
        return [dst]
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path.name,
        size_threshold=1024,
    )
    data_path.chmod(_FILE_MODE)  # onnx creates it owner-only
    return [dst, data_path]


def copy_model(src: Path, dst: Path) -> list[Path]:
    """``src`` copied to ``dst`` with its external data renamed after ``dst``."""
    if has_external_data(src):
        return consolidate_external_data(src, dst)
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copyfile(src, dst)
    return [Path(dst)]


def tensor_bytes(model: Any) -> int:
    """Bytes of the weights held in an in-memory model's initializers (raw data)."""
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.raw_data else tensor.ByteSize()
    return total


def _external_tensors(model: Any) -> Any:
    """Every tensor of the model stored externally (onnx walks subgraphs and attributes)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return (t for t in _get_all_tensors(model) if uses_external_data(t))


def _entries(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_entries(tensor: Any, values: dict[str, Any]) -> None:
    del tensor.external_data[:]
    for key, value in values.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _pad(out: Any) -> int:
    """Pad ``out`` to the next page boundary; the new offset."""
    offset = out.tell()
    aligned = -(-offset // _ALIGN) * _ALIGN
    if aligned > offset:
        out.write(b"\0" * (aligned - offset))
    return aligned


def _copy_range(path: Path, offset: int, length: int | None, out: Any) -> int:
    """Copy ``length`` bytes (None: to the end) of ``path`` from ``offset``; the count."""
    if not path.is_file():
        raise UsageError(f"external data file not found: {path}")
    copied = 0
    with path.open("rb") as src:
        src.seek(offset)
        while length is None or copied < length:
            want = _COPY_CHUNK if length is None else min(_COPY_CHUNK, length - copied)
            block = src.read(want)
            if not block:
                break
            out.write(block)
            copied += len(block)
    if length is not None and copied != length:
        raise UsageError(f"external data file {path.name} ends before its tensor does")
    return copied


def _write_proto(model: Any, dst: Path) -> None:
    """The graph (weights already external) as ``dst``; atomically."""
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, dst)

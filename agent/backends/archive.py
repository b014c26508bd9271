"""Model folders as single-file artifacts: one deterministic, uncompressed tar.

An MLX model folder and an ONNX model with external data (``model.onnx`` +
``model.onnx.data``) are each stored as one tar (:func:`write_folder_tar`, streamed to
a file, or :func:`pack_folder`, in memory: the same bytes) and unpacked by the backend
that loads them (:func:`extract_tar`), which refuses anything but plain files and
folders with safe relative names.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from edgefarm.errors import ModelLoadError

FILE_MODE = 0o644
TAR_MAGIC_OFFSET, TAR_MAGIC = 257, b"ustar"


def write_folder_tar(
    folder: Path, out: IO[bytes], include: Callable[[str], bool] | None = None
) -> None:
    """Stream every file under ``folder`` (those whose relative POSIX path ``include``
    accepts) into ``out`` as one uncompressed tar.

    Members are the files' relative POSIX paths in sorted order, with mtime 0, mode
    0644 and no owner, so the same files always give the same bytes (and artifact
    hash); symbolic links are followed (a hub-cache snapshot packs its blobs). Each
    file is copied in blocks: no file is held in memory whole.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if include is not None:
        files = [p for p in files if include(p.relative_to(folder).as_posix())]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = FILE_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)


def pack_folder(folder: Path) -> bytes:
    """:func:`write_folder_tar` into memory (for small folders and tests)."""
    buffer = io.BytesIO()
    write_folder_tar(folder, buffer)
    return buffer.getvalue()


def is_tar_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a POSIX (ustar / pax / GNU) tar."""
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(TAR_MAGIC_OFFSET + len(TAR_MAGIC))
    except OSError:
        return False
    return head[TAR_MAGIC_OFFSET:] == TAR_MAGIC


def extract_tar(archive: Path | bytes, out_dir: Path, label: str) -> Path:
    """Extract an uncompressed tar (a file, or its bytes) into ``out_dir`` (absent or
    empty); return ``out_dir``.

    Raises :class:`ModelLoadError` (naming ``label``) for anything but a readable tar
    of plain files and folders with safe relative names, each at most once.
    """
    try:
        if isinstance(archive, bytes):
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
                return _extract(tar, Path(out_dir), label)
        with tarfile.open(archive, mode="r:") as tar:
            return _extract(tar, Path(out_dir), label)
    except (tarfile.TarError, EOFError) as err:
        raise ModelLoadError(f"{label} is not a readable model folder archive: {err}") from err


def _extract(tar: tarfile.TarFile, out_dir: Path, label: str) -> Path:
    members = tar.getmembers()
    seen: set[str] = set()
    for member in members:
        name = member.name
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or ".." in parts or "\\" in name:
            raise ModelLoadError(f"unsafe name in model folder archive {label}: {name!r}")
        if not (member.isfile() or member.isdir()):
            raise ModelLoadError(
                f"model folder archive {label}: member is not a plain file: {name!r}"
            )
        if name in seen:
            raise ModelLoadError(f"model folder archive {label} holds {name!r} twice")
        seen.add(name)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelLoadError(f"output folder is not empty: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tar.extractall(out_dir, members=members, filter="data")
    return out_dir

"""Model folders as single-file artifacts: one deterministic, uncompressed tar.

An MLX model folder and an ONNX model with external data (``model.onnx`` +
``model.onnx.data``) are each stored as one tar (:func:`write_folder_tar`, streamed to
a file, or :func:`pack_folder`, in memory: the same bytes) and unpacked by the backend
that loads them (:func:`extract_tar`), which refuses anything but plain files and
folders with safe relative names, and archives that would unpack to more members,
longer names or more bytes than the limits below (or than the archive itself holds).
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
# What extract_tar accepts: model folders hold a few to a few thousand files.
MAX_MEMBERS = 100_000
MAX_MEMBER_NAME = 1024  # characters of one member's path
MAX_NAME_PARTS = 32  # folders deep
MAX_UNPACKED_BYTES = 1 << 40  # 1 TiB: no model folder is larger


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
    of plain files and folders with safe relative names, each at most once (also
    when compared case-insensitively), no file inside a path another member uses as
    a file, at most :data:`MAX_MEMBERS` members and no more bytes than the archive
    holds (no sparse members) nor :data:`MAX_UNPACKED_BYTES`. Every member is checked
    before anything is written.
    """
    try:
        if isinstance(archive, bytes):
            size = len(archive)
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
                return _extract(tar, Path(out_dir), label, size)
        size = Path(archive).stat().st_size
        with tarfile.open(archive, mode="r:") as tar:
            return _extract(tar, Path(out_dir), label, size)
    except (tarfile.TarError, EOFError) as err:
        raise ModelLoadError(f"{label} is not a readable model folder archive: {err}") from err
    except OSError as err:
        raise ModelLoadError(f"cannot unpack model folder archive {label}: {err}") from err


def _extract(tar: tarfile.TarFile, out_dir: Path, label: str, archive_size: int) -> Path:
    members = _checked_members(tar, label, archive_size)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelLoadError(f"output folder is not empty: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tar.extractall(out_dir, members=members, filter="data")
    return out_dir


def _checked_members(tar: tarfile.TarFile, label: str, archive_size: int) -> list[tarfile.TarInfo]:
    """Every member of ``tar``, read one header at a time (stopping at the first that
    breaks a rule), after checking names, kinds, counts and sizes."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    files: set[str] = set()  # casefolded names of file members
    folders: set[str] = set()  # casefolded folders that hold a member
    total = 0
    while True:
        member = tar.next()
        if member is None:
            break
        if len(members) >= MAX_MEMBERS:
            raise ModelLoadError(
                f"model folder archive {label} has more than {MAX_MEMBERS} members"
            )
        name = member.name
        shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
        if len(name) > MAX_MEMBER_NAME:
            raise ModelLoadError(f"model folder archive {label}: member name too long: {shown}")
        parts = PurePosixPath(name).parts
        if (
            not name
            or name.startswith("/")
            or ".." in parts
            or "\\" in name
            or any(ord(c) < 32 for c in name)
        ):
            raise ModelLoadError(f"unsafe name in model folder archive {label}: {shown}")
        if len(parts) > MAX_NAME_PARTS:
            raise ModelLoadError(
                f"model folder archive {label}: {shown} is more than {MAX_NAME_PARTS} folders deep"
            )
        if not (member.isfile() or member.isdir()) or member.issparse():
            raise ModelLoadError(
                f"model folder archive {label}: member is not a plain file: {shown}"
            )
        key = PurePosixPath(name).as_posix().casefold()
        if key in seen:
            raise ModelLoadError(f"model folder archive {label} holds {shown} twice")
        seen.add(key)
        above = {PurePosixPath(*parts[:i]).as_posix().casefold() for i in range(1, len(parts))}
        if not above.isdisjoint(files) or (member.isfile() and key in folders):
            raise ModelLoadError(
                f"model folder archive {label}: {shown} is both a file and a folder"
            )
        folders |= above
        if member.isfile():
            files.add(key)
            total += member.size
            if total > min(archive_size, MAX_UNPACKED_BYTES):
                raise ModelLoadError(
                    f"model folder archive {label} claims {total} bytes of files, more than "
                    f"{'the archive holds' if total > archive_size else 'the limit'}"
                )
        members.append(member)
    return members

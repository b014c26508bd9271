"""The content-addressed artifact store: files named by their sha256.

Layout: ``<root>/<sha[:2]>/<sha>``. Nothing passes through memory whole: files are
copied and hashed in 1 MiB chunks, folders are written as a deterministic uncompressed
tar straight into a staging file while it is hashed, and a step's output is moved into
place by rename. Writes go to ``<root>/.staging`` first (same filesystem), so a crash
never leaves a truncated artifact under its hash. ``root`` may be any folder every Ray
node can reach (a shared filesystem for a multi-node cluster): steps open the store by
its root and read their inputs by path.

Folder artifacts (a Hugging Face checkpoint, an MLX folder, an OpenVINO IR, an ONNX
model with external data) are tars of plain files; :meth:`ArtifactStore.folder` unpacks
one once into ``<root>/unpacked/<sha>`` for the steps that read it as a folder.

Uploads arrive in pieces through :meth:`ArtifactStore.writer`: each piece is hashed as it
is written to a staging file, and the file enters the store only when its sha256 and
size are those declared; anything else (a mismatch, a cancelled stream) removes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from agent.backends.archive import extract_tar, write_folder_tar
from edgefarm.domain import ArtifactRef
from edgefarm.errors import ArtifactError

CHUNK_BYTES = 1 << 20
STAGING = ".staging"
UNPACKED = "unpacked"
NAMED = "named"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")
MAX_NAME_CHARS = 128


class _HashingWriter:
    """A binary file wrapper that hashes and counts what is written through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


class ArtifactWriter:
    """An artifact written in pieces (an upload) into a staging file, hashed as it goes.

    :meth:`commit` checks the declared sha256 and size and moves the file into the
    store; :meth:`discard` (safe to call at any time, and again) removes the staging
    file. Every failure raises :class:`ArtifactError` with one line and discards.
    """

    def __init__(self, store: ArtifactStore, sha256: str, size_bytes: int) -> None:
        store.path(sha256)  # refuses a malformed hash
        self.store = store
        self.sha256 = sha256
        self.size_bytes = size_bytes
        fd, tmp = store._temp_file()
        self.tmp = Path(tmp)
        self._writer = _HashingWriter(os.fdopen(fd, "wb"))
        self._done = False

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._writer.size

    def write(self, data: bytes) -> None:
        """Append a piece; refused (and discarded) past the declared size."""
        if self._done:
            raise ArtifactError("upload already finished")
        if self._writer.size + len(data) > self.size_bytes:
            self.discard()
            raise ArtifactError(f"upload is longer than the declared {self.size_bytes} bytes")
        self._writer.write(data)

    def commit(self, name: str) -> ArtifactRef:
        """Check what was written against the declared sha256 and size; store it."""
        if self._done:
            raise ArtifactError("upload already finished")
        try:
            self._writer.raw.close()
            size, sha = self._writer.size, self._writer.digest.hexdigest()
            if size != self.size_bytes:
                raise ArtifactError(
                    f"upload ended at {size} of the declared {self.size_bytes} bytes"
                )
            if sha != self.sha256:
                raise ArtifactError(f"upload's sha256 is {sha}, not the declared {self.sha256}")
            return self.store._finish(self.tmp, self._writer, name)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the staging file (a no-op once committed or discarded)."""
        self._done = True
        self._writer.raw.close()
        self.tmp.unlink(missing_ok=True)


class ArtifactStore:
    """Files addressed by content."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where an artifact lives (it may not exist)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """True when the artifact is present."""
        return self.path(sha256).is_file()

    def existing(self, ref: ArtifactRef) -> Path:
        """The path of an artifact that must be present (ArtifactError otherwise)."""
        path = self.path(ref.sha256)
        if not path.is_file():
            raise ArtifactError(f"artifact {ref.name or ref.sha256[:12]} is not in the store")
        return path

    def staging(self) -> Path:
        """A new empty folder on the store's filesystem for a step's outputs; the caller
        removes it (what :meth:`adopt` took is already gone from it)."""
        base = self.root / STAGING
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base, prefix="step-"))

    def put_bytes(self, data: bytes, name: str) -> ArtifactRef:
        """Store small bytes (eval sets, references); returns their reference."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.is_file():
            fd, tmp = self._temp_file()
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            self._place(Path(tmp), sha)
        return ArtifactRef(sha256=sha, size_bytes=len(data), name=name)

    def put_file(self, source: Path, name: str) -> ArtifactRef:
        """Store a file's contents, copied and hashed in chunks (a file already in the
        store, e.g. an upload, is not copied again)."""
        stored = self._in_store(source)
        if stored is not None:
            return ArtifactRef(stored.sha256, stored.size_bytes, name)
        fd, tmp = self._temp_file()
        writer = _HashingWriter(os.fdopen(fd, "wb"))
        try:
            with writer.raw, Path(source).open("rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    writer.write(chunk)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._finish(Path(tmp), writer, name)

    def put_folder(
        self, folder: Path, name: str, include: Callable[[str], bool] | None = None
    ) -> ArtifactRef:
        """Store a folder (the files ``include`` accepts) as one deterministic tar,
        hashed while it is written."""
        fd, tmp = self._temp_file()
        writer = _HashingWriter(os.fdopen(fd, "wb"))
        try:
            with writer.raw:
                write_folder_tar(folder, writer, include)  # type: ignore[arg-type]
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._finish(Path(tmp), writer, name)

    def adopt(self, path: Path, name: str) -> ArtifactRef:
        """Move a finished file (on the store's filesystem, e.g. in :meth:`staging`)
        into the store under its hash; no copy is made."""
        digest = hashlib.sha256()
        with Path(path).open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        size = Path(path).stat().st_size
        sha = digest.hexdigest()
        if self.path(sha).is_file():
            Path(path).unlink()
        else:
            self._place(Path(path), sha)
        return ArtifactRef(sha256=sha, size_bytes=size, name=name)

    def folder(self, sha256: str) -> Path:
        """A folder artifact unpacked (once) into ``<root>/unpacked/<sha>``; read-only
        by convention: steps copy or link what they change."""
        target = self.root / UNPACKED / sha256
        if target.is_dir():
            return target
        archive = self.path(sha256)
        if not archive.is_file():
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store")
        staging = self.staging()
        try:
            unpacked = extract_tar(archive, staging / "folder", archive.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(unpacked, target)
            except OSError:  # unpacked meanwhile by another step
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def writer(self, sha256: str, size_bytes: int) -> ArtifactWriter:
        """A staging file for an upload of ``size_bytes`` declared to hash to ``sha256``."""
        return ArtifactWriter(self, sha256, size_bytes)

    def free_bytes(self) -> int:
        """Free space on the store's filesystem."""
        return shutil.disk_usage(self.root).free

    def named(self, sha256: str, name: str) -> Path:
        """A path ending in ``name`` (made safe: one plain file name) that leads to the
        artifact: ``<root>/named/<sha>/<name>``, a symbolic link, for readers that go by
        a file's name or suffix (e.g. ``.gguf``)."""
        target = self.path(sha256)
        if not target.is_file():
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store")
        safe = safe_name(name)
        link = self.root / NAMED / sha256 / safe
        if link.is_symlink() and link.resolve() == target.resolve():
            return link
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / f".{safe}.{uuid.uuid4().hex}.tmp"
        os.symlink(target.resolve(), tmp)
        os.replace(tmp, link)
        return link

    def read_chunks(self, sha256: str, offset: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """Yield (offset, data, total_size) chunks from ``offset``."""
        path = self.path(sha256)
        if not path.is_file():
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store")
        total = path.stat().st_size
        with path.open("rb") as f:
            f.seek(offset)
            pos = offset
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                yield pos, data, total
                pos += len(data)

    # ----- internals ----------------------------------------------------------

    def _temp_file(self) -> tuple[int, str]:
        base = self.root / STAGING
        base.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=base, prefix=".part-")

    def _in_store(self, source: Path) -> ArtifactRef | None:
        """The reference of ``source`` when it already is (or links to) a stored file."""
        real = Path(source).resolve()
        sha = real.name
        try:
            if real == self.path(sha).resolve() and real.is_file():
                return ArtifactRef(sha256=sha, size_bytes=real.stat().st_size, name="")
        except ArtifactError:
            pass
        return None

    def _finish(self, tmp: Path, writer: _HashingWriter, name: str) -> ArtifactRef:
        sha = writer.digest.hexdigest()
        if self.path(sha).is_file():
            tmp.unlink()
        else:
            self._place(tmp, sha)
        return ArtifactRef(sha256=sha, size_bytes=writer.size, name=name)

    def _place(self, tmp: Path, sha: str) -> None:
        target = self.path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)


def safe_name(name: str) -> str:
    """``name`` as one harmless file name: its last path part, characters other than
    letters, digits and ``._+-`` replaced, no leading dot, at most 128 characters."""
    base = _SAFE_NAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    if len(base) > MAX_NAME_CHARS:
        _, dot, suffix = base.rpartition(".")
        keep = f".{suffix}" if dot and len(suffix) < 16 else ""
        base = base[: MAX_NAME_CHARS - len(keep)] + keep
    return base or "artifact"

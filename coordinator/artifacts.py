"""The content-addressed artifact store: files named by their sha256.

Layout: ``<root>/<sha[:2]>/<sha>``. Writes go to a temporary file first and are
renamed into place, so a crash never leaves a truncated artifact under its hash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefarm.domain import ArtifactRef
from edgefarm.errors import ArtifactError

CHUNK_BYTES = 1 << 20


class ArtifactStore:
    """Files addressed by content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where an artifact lives (it may not exist)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """True when the artifact is present."""
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes, name: str) -> ArtifactRef:
        """Store bytes; returns their reference (idempotent)."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        return ArtifactRef(sha256=sha, size_bytes=len(data), name=name)

    def put_file(self, source: Path, name: str) -> ArtifactRef:
        """Store a file's contents."""
        return self.put_bytes(source.read_bytes(), name)

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

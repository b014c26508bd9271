"""The agent's local artifact cache, filled by chunked, resumable, verified downloads.

The cache is bounded: before a download, the least recently used artifacts are removed
until the new one fits (a use is a download or a cache hit; the file's mtime records
it). The artifacts of the task being prepared are never removed for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection
from pathlib import Path
from stat import S_ISREG

import grpc

from edgefarm.domain import ArtifactRef
from edgefarm.errors import ArtifactError
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)


class ArtifactCache:
    """Artifacts by sha256 under ``root``; partial downloads resume from their size.

    ``max_bytes``: the most the cache holds (None: unbounded). One artifact larger
    than that is still downloaded, alone.
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.hits = 0  # fetches served from the cache (for the agent's metrics)
        self.misses = 0  # fetches that needed a download
        root.mkdir(parents=True, exist_ok=True)

    def path(self, ref: ArtifactRef) -> Path:
        """Where a verified artifact lives."""
        return self.root / ref.sha256

    async def fetch(
        self,
        stub: agent_pb2_grpc.AgentGatewayStub,
        agent_id: str,
        session_token: str,
        ref: ArtifactRef,
        keep: Collection[str] = (),
    ) -> Path:
        """Return the local path of an artifact, downloading it if needed.

        ``keep``: sha256s of other artifacts the caller still needs (never evicted)."""
        final = self.path(ref)
        if final.is_file() and final.stat().st_size == ref.size_bytes:
            os.utime(final)  # a use: the least recently used go first
            self.hits += 1
            return final
        self.misses += 1
        part = final.with_suffix(".part")
        offset = part.stat().st_size if part.exists() else 0
        if offset > ref.size_bytes:
            part.unlink()
            offset = 0
        self.make_room(ref.size_bytes - offset, keep={ref.sha256, *keep})
        request = agent_pb2.FetchArtifactRequest(
            agent_id=agent_id, session_token=session_token, sha256=ref.sha256, offset=offset
        )
        try:
            with part.open("ab") as out:
                async for chunk in stub.FetchArtifact(request):
                    if chunk.offset != out.tell():
                        raise ArtifactError(
                            f"artifact {ref.name or ref.sha256[:12]}: chunk at {chunk.offset}, "
                            f"expected {out.tell()}"
                        )
                    out.write(chunk.data)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise ArtifactError(f"artifact {ref.name}: {error.details()}") from None
            raise
        digest = hashlib.sha256()
        with part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != ref.sha256:
            part.unlink()
            raise ArtifactError(
                f"artifact {ref.name or ref.sha256[:12]}: sha256 mismatch after download "
                f"(got {digest.hexdigest()[:12]})"
            )
        os.replace(part, final)
        return final

    def size_bytes(self) -> int:
        """Bytes held in the cache now (artifacts and partial downloads)."""
        total = 0
        try:
            paths = list(self.root.iterdir())
        except OSError:
            return 0
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            if S_ISREG(stat.st_mode):
                total += stat.st_size
        return total

    def make_room(self, needed: int, keep: Collection[str] = ()) -> None:
        """Remove least recently used artifacts (and stale partial downloads) not in
        ``keep`` until ``needed`` more bytes fit under ``max_bytes``."""
        if self.max_bytes is None:
            return
        entries = []
        for path in self.root.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if S_ISREG(stat.st_mode):  # artifacts are files; anything else is not ours
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + needed <= self.max_bytes:
                break
            if path.name.split(".")[0] in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("artifact cache: removed %s (%d bytes, least recently used)", path.name, size)

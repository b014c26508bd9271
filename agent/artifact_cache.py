"""The agent's local artifact cache, filled by chunked, resumable, verified downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc

from edgefarm.domain import ArtifactRef
from edgefarm.errors import ArtifactError
from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc


class ArtifactCache:
    """Artifacts by sha256 under ``root``; partial downloads resume from their size."""

    def __init__(self, root: Path) -> None:
        self.root = root
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
    ) -> Path:
        """Return the local path of an artifact, downloading it if needed."""
        final = self.path(ref)
        if final.is_file() and final.stat().st_size == ref.size_bytes:
            return final
        part = final.with_suffix(".part")
        offset = part.stat().st_size if part.exists() else 0
        if offset > ref.size_bytes:
            part.unlink()
            offset = 0
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

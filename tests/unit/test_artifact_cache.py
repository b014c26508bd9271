"""The agent's artifact cache: verified downloads, resumption, least-recently-used bound."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.artifact_cache import ArtifactCache
from edgefarm.domain import ArtifactRef
from edgefarm.errors import ArtifactError
from protos.edgefarm.v1 import agent_pb2


class FakeGateway:
    """Test double of the coordinator's FetchArtifact stream (chunks of 4 bytes)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.served: list[tuple[str, int]] = []

    def FetchArtifact(self, request: Any) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        self.served.append((request.sha256, request.offset))
        data = self.blobs[request.sha256]

        async def chunks() -> AsyncIterator[agent_pb2.ArtifactChunk]:
            for start in range(request.offset, len(data), 4):
                yield agent_pb2.ArtifactChunk(offset=start, data=data[start : start + 4])

        return chunks()


def _blob(text: str) -> tuple[ArtifactRef, bytes]:
    data = text.encode()
    return ArtifactRef(hashlib.sha256(data).hexdigest(), len(data), text[:8]), data


def _fetch(cache: ArtifactCache, gw: FakeGateway, ref: ArtifactRef, **kw: Any) -> Path:
    return asyncio.run(cache.fetch(gw, "agent", "session", ref, **kw))  # type: ignore[arg-type]


def test_download_verifies_and_resumes(tmp_path: Path) -> None:
    ref, data = _blob("model bytes " * 10)
    gw = FakeGateway({ref.sha256: data})
    cache = ArtifactCache(tmp_path)
    part = cache.path(ref).with_suffix(".part")
    part.write_bytes(data[:40])  # an interrupted download
    assert _fetch(cache, gw, ref).read_bytes() == data
    assert gw.served == [(ref.sha256, 40)] and not part.exists()
    _fetch(cache, gw, ref)
    assert len(gw.served) == 1  # a hit downloads nothing

    bad, _ = _blob("other")
    gw.blobs[bad.sha256] = b"tampered"
    bad = ArtifactRef(bad.sha256, len(b"tampered"), "other")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        _fetch(cache, gw, bad)
    assert not cache.path(bad).exists()


def test_least_recently_used_artifacts_make_room(tmp_path: Path) -> None:
    refs = [_blob(f"{name} " * 25) for name in ("alpha", "bravo", "charlie", "delta")]
    gw = FakeGateway({ref.sha256: data for ref, data in refs})
    sizes = [ref.size_bytes for ref, _ in refs]
    cache = ArtifactCache(tmp_path, max_bytes=sizes[0] + sizes[1] + sizes[2])
    (a, _), (b, _), (c, _), (d, _) = refs
    for i, ref in enumerate((a, b, c)):
        path = _fetch(cache, gw, ref)
        os.utime(path, (1000 + i, 1000 + i))  # a used first, c last
    _fetch(cache, gw, a)  # a hit: a is now the most recently used
    _fetch(cache, gw, d)  # needs room: b is the least recently used
    assert {p.name for p in tmp_path.iterdir()} == {a.sha256, c.sha256, d.sha256}

    # what the task still needs is kept even when it is the oldest
    os.utime(cache.path(a), (1, 1))
    _fetch(cache, gw, b, keep={a.sha256})
    assert {p.name for p in tmp_path.iterdir()} == {a.sha256, b.sha256, d.sha256}
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= cache.max_bytes  # type: ignore[operator]


def test_only_files_are_evicted(tmp_path: Path) -> None:
    (ref, data), (other, other_data) = _blob("one " * 30), _blob("two " * 30)
    gw = FakeGateway({ref.sha256: data, other.sha256: other_data})
    cache = ArtifactCache(tmp_path, max_bytes=ref.size_bytes)
    (tmp_path / "unpacked").mkdir()  # a folder is not an artifact: left alone
    os.utime(tmp_path / "unpacked", (1, 1))
    _fetch(cache, gw, ref)
    _fetch(cache, gw, other)
    assert {p.name for p in tmp_path.iterdir()} == {"unpacked", other.sha256}

"""Helpers every conversion step shares: file hashes, folder manifests, scheme parameters."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from edgefarm.errors import UsageError

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def maxrss_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes (the kernel reports KiB on Linux, bytes on macOS)."""
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def folder_manifest(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` (sorted): relative name, size and sha256."""
    return [
        {
            "name": p.relative_to(folder).as_posix(),
            "size_bytes": p.stat().st_size,
            "sha256": file_sha256(p),
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def merge_scheme_params(
    scheme: str, defaults: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """A scheme's defaults overridden by ``params``; UsageError names unknown ones."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise UsageError(
            f"unknown parameter(s) for scheme {scheme}: {', '.join(unknown)} (allowed: {allowed})"
        )
    return {**defaults, **params}

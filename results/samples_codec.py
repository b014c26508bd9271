"""Raw latency samples packed small and lossless, one trial per blob.

A quickstart result holds 100,000+ samples; as JSON text they are 2-3 MB per row. Here
they become bytes in one of two encodings, chosen per trial, both exact:

- ``ns-delta-zz-shuffle-zlib``: when every sample is a whole number of nanoseconds
  expressed in milliseconds (``ns / 1e6``, how agents time an iteration), the integers'
  successive differences, zig-zag mapped to unsigned, their bytes shuffled (all first
  bytes, then all second bytes, ...) and deflated. Neighbouring iterations differ by
  microseconds, so about 2 bytes per sample remain.
- ``f64-shuffle-zlib``: any other finite or non-finite float64 values, byte-shuffled
  and deflated.

Decoding gives back the very same floats (``decode(*encode(x)) == x``). A blob that
does not decode to the count it claims raises :class:`ValueError`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

NS_DELTA = "ns-delta-zz-shuffle-zlib"
F64 = "f64-shuffle-zlib"
ENCODINGS = (NS_DELTA, F64)
_LEVEL = 6
_NS_LIMIT = 2**52  # integers exactly representable as float64


def _shuffle(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, 8).T).tobytes()


def _unshuffle(raw: bytes, count: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8)
    if planes.size != count * 8:
        raise ValueError(f"samples blob holds {planes.size // 8} values, not {count}")
    return np.ascontiguousarray(planes.reshape(8, count).T).view("<u8").reshape(count)


def _as_ns(values: np.ndarray) -> np.ndarray | None:
    """The samples as int64 nanoseconds, or None when that would not be exact."""
    if not np.all(np.isfinite(values)):
        return None
    scaled = np.rint(values * 1e6)
    if scaled.size and np.max(np.abs(scaled)) >= _NS_LIMIT:
        return None
    ns = scaled.astype(np.int64)
    return ns if np.array_equal(ns / 1e6, values) else None


def encode(samples: Sequence[float] | np.ndarray) -> tuple[str, bytes]:
    """``(encoding, data)`` for one trial's samples (milliseconds)."""
    values = np.asarray(samples, dtype=np.float64).reshape(-1)
    ns = _as_ns(values)
    if ns is None:
        return F64, zlib.compress(_shuffle(values.astype("<f8")), _LEVEL)
    delta = np.diff(ns, prepend=np.int64(0))
    zigzag = ((delta << 1) ^ (delta >> 63)).astype("<u8")
    return NS_DELTA, zlib.compress(_shuffle(zigzag), _LEVEL)


def decode(encoding: str, data: bytes, count: int) -> list[float]:
    """The samples ``encode`` packed (``count`` of them), as floats in milliseconds."""
    try:
        raw = zlib.decompress(data)
    except zlib.error as e:
        raise ValueError(f"samples blob is not deflated data: {e}") from e
    packed = _unshuffle(raw, count)
    if encoding == F64:
        return packed.view("<f8").tolist()  # type: ignore[no-any-return]
    if encoding == NS_DELTA:
        delta = (packed >> np.uint64(1)).astype(np.int64) ^ -(packed & np.uint64(1)).astype(
            np.int64
        )
        return (np.cumsum(delta) / 1e6).tolist()  # type: ignore[no-any-return]
    raise ValueError(f"unknown samples encoding {encoding!r} (known: {', '.join(ENCODINGS)})")

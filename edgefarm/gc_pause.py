"""Bulk work that builds many long-lived objects, with the cyclic garbage collector paused.

Each automatic collection of the oldest generation walks every tracked object in the
process. Building tens of thousands of rows, samples and histories that all live on
triggers such collections again and again, each over everything built so far: a third
of a 10,000-row nightly comparison went to them (``benchmarks/nightly_scale.py``).
Reference counting still frees what is dropped while paused; only reference cycles wait
until the last pause ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # pauses in progress, all threads together
_we_disabled = False  # whether the first of them turned collection off


@contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic garbage collection off for the duration (nested and concurrent uses
    keep it off until the last one ends; a collector already off stays off). Also a
    decorator: ``@gc_paused()``."""
    global _depth, _we_disabled
    with _lock:
        if _depth == 0:
            _we_disabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _we_disabled:
                gc.enable()

"""The coordinator's garbage collection: full collections short enough not to stop the fleet.

Every connected agent keeps about 200 objects that the cyclic garbage collector tracks
(grpc.aio's and asyncio's machinery of its stream). At 5,000 agents an automatic full
collection walks about a million of them and stops the event loop for 700-830 ms,
which every agent message and ``devices list`` waiting meanwhile pays.

So every :data:`FREEZE_EVERY_S` the coordinator collects its young generations (cheap)
and freezes what survives (:func:`gc.freeze`): automatic full collections then walk only
what was promoted since the last freeze. Frozen objects that later become garbage in a
reference cycle are kept until every :data:`THAW_EVERY_S` the coordinator thaws them and
collects everything once: what that holds is bounded by what one period leaves. Objects
without cycles are freed by reference counting as always, frozen or not.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FREEZE_EVERY_S = 5.0
THAW_EVERY_S = 1800.0


async def keep_collections_short(
    freeze_every_s: float = FREEZE_EVERY_S,
    thaw_every_s: float = THAW_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Freeze the survivors of a young collection every ``freeze_every_s``, thaw and
    collect everything every ``thaw_every_s``; runs until cancelled (then thaws)."""
    thawed_at = clock()
    try:
        while True:
            await asyncio.sleep(freeze_every_s)
            if clock() - thawed_at >= thaw_every_s:
                started = time.perf_counter()
                gc.unfreeze()
                found = gc.collect()
                thawed_at = clock()
                log.debug(
                    "full collection of the thawed heap: %d unreachable, %.0f ms",
                    found,
                    1000 * (time.perf_counter() - started),
                )
            else:
                gc.collect(1)
            gc.freeze()
    finally:
        gc.unfreeze()


class CollectionPauses:
    """How often and how long the garbage collector stopped this process, per generation.

    A :data:`gc.callbacks` entry (:meth:`install`) keeps plain numbers, no locks: it runs
    in whichever thread a collection happens, and collections never overlap.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = min(max(int(info.get("generation", 0)), 0), 2)
        self.count[generation] += 1
        self.seconds[generation] += took
        self.longest[generation] = max(self.longest[generation], took)

    def install(self) -> None:
        """Start counting."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        """Stop counting."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)

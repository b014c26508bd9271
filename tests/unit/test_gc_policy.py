"""The coordinator's garbage-collection policy: survivors frozen, cycles frozen meanwhile
reclaimed at the thaw, the collector's stops counted and exported."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Iterator

import pytest

from coordinator.gc_policy import CollectionPauses, keep_collections_short
from coordinator.metrics import CoordinatorMetrics


class _Node:
    """An object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.me: _Node | None = self


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_survivors_are_frozen_and_cycles_freed_at_the_thaw() -> None:
    now = [0.0]

    async def scenario() -> None:
        node = _Node()
        ref = weakref.ref(node)
        policy = asyncio.create_task(keep_collections_short(0.01, 100.0, clock=lambda: now[0]))
        await _until(lambda: gc.get_freeze_count() > 0)
        await asyncio.sleep(0.03)  # frozen by now, whatever the first tick caught
        del node  # garbage now, but in a cycle among frozen objects
        gc.collect()
        assert ref() is not None  # a full collection does not see it
        now[0] = 200.0  # past the thaw period: the next tick collects everything
        await _until(lambda: ref() is None)
        assert gc.get_freeze_count() > 0  # and freezes the survivors again
        policy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await policy
        assert gc.get_freeze_count() == 0  # cancelled: nothing left frozen

    asyncio.run(scenario())


def test_pauses_are_counted_per_generation() -> None:
    pauses = CollectionPauses()
    pauses.install()
    pauses.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert pauses.count[0] >= 1 and pauses.count[2] >= 1
    assert pauses.longest[2] > 0.0 and pauses.seconds[2] >= pauses.longest[2]
    counted = list(pauses.count)
    gc.collect()
    assert pauses.count == counted  # uninstalled: no longer counting


def test_pauses_are_exported_as_metrics() -> None:
    pauses = CollectionPauses()
    pauses.count[2], pauses.seconds[2], pauses.longest[2] = 3, 0.5, 0.25
    metrics = CoordinatorMetrics()
    metrics.watch_collections(pauses)
    value = metrics.registry.get_sample_value
    assert value("edgefarm_gc_collections_total", {"generation": "2"}) == 3
    assert value("edgefarm_gc_pause_seconds_total", {"generation": "2"}) == 0.5
    assert value("edgefarm_gc_longest_pause_seconds", {"generation": "2"}) == 0.25
    assert value("edgefarm_gc_collections_total", {"generation": "0"}) == 0

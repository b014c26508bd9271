"""Store writes in order, off the event loop that serves the fleet.

The scheduler's state lives in memory on the event loop; what it writes to the store
goes through one writer thread, in the order it was asked for, so a large result
(or a slow database) never delays another agent's heartbeat or registration. With
``background=False`` (unit tests, one-shot tools) every write runs inline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class StoreWriter:
    """Runs store calls one at a time, in submission order."""

    def __init__(self, background: bool = False) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
            if background
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def background(self) -> bool:
        """Whether writes run on the writer thread."""
        return self._executor is not None

    def post(self, fn: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``fn`` after every earlier write; failures are logged, not raised."""
        if self._executor is None:
            try:
                fn(*args, **kwargs)
            except Exception:
                log.exception("store write %s failed", getattr(fn, "__name__", fn))
            return
        self._remember_loop()
        future = self._executor.submit(functools.partial(fn, *args, **kwargs))
        future.add_done_callback(_log_failure)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` after every earlier write and return its result (or raise)."""
        if self._executor is None:
            return fn(*args, **kwargs)
        self._remember_loop()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def call_on_loop(self, fn: Callable[[], None]) -> None:
        """From a write: call ``fn`` on the event loop (inline without a writer thread)."""
        if self._executor is None or self._loop is None:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        """Finish the queued writes, then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _remember_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()


def _log_failure(future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.error("store write failed: %s", error, exc_info=error)

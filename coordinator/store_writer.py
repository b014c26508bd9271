"""Store writes in order, off the event loop that serves the fleet.

The scheduler's state lives in memory on the event loop; what it writes to the store
goes through one writer thread, in the order it was asked for, so a slow database never
delays another agent's heartbeat or registration. Results go one step further: a result
may carry millions of samples, and turning them into a row (sorting, JSON text, the
database driver's copies) holds Python's GIL for tens of milliseconds at a time, which
would stall the event loop even from another thread. With ``ingest_url`` set they are
stored by a worker process with its own store connection (the writer thread waits for
it, so the order of writes holds). With ``background=False`` (unit tests, one-shot
tools) every write runs inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from edgefarm.errors import StoreError

if TYPE_CHECKING:
    from edgefarm.domain import MeasurementResult
    from results.records import TaskRecord
    from results.store import ResultsStore

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class StoreWriter:
    """Runs store calls one at a time, in submission order."""

    def __init__(self, background: bool = False, ingest_url: str | None = None) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
            if background
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ingest_url = ingest_url if background else None
        self._ingester: ProcessPoolExecutor | None = None

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

    async def ingest(
        self, store: ResultsStore, task: TaskRecord, result: MeasurementResult, device_name: str
    ) -> tuple[int, bool]:
        """:meth:`ResultsStore.ingest_result`, after every earlier write: in the worker
        process when there is one."""
        if self._ingest_url is None:
            return await self.run(store.ingest_result, task, result, device_name)
        return await self.run(self._ingest_in_worker, task, result, device_name)

    def _ingest_in_worker(
        self, task: TaskRecord, result: MeasurementResult, device_name: str
    ) -> tuple[int, bool]:
        """On the writer thread: hand the result to the worker and wait (GIL released)."""
        if self._ingester is None:
            assert self._ingest_url is not None
            self._ingester = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),  # no fork under gRPC threads
                initializer=_open_worker_store,
                initargs=(self._ingest_url,),  # type: ignore[arg-type]
            )
        try:
            return self._ingester.submit(_ingest_in_worker, task, result, device_name).result()
        except BrokenProcessPool:
            self._ingester = None  # started afresh for the next result
            raise StoreError(
                "the result ingestion process died; the result was not stored"
            ) from None

    def call_on_loop(self, fn: Callable[[], None]) -> None:
        """From a write: call ``fn`` on the event loop (inline without a writer thread)."""
        if self._executor is None or self._loop is None:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        """Finish the queued writes, then stop the thread and the worker process."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._ingester is not None:
            self._ingester.shutdown(wait=True)

    def _remember_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()


def _log_failure(future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.error("store write failed: %s", error, exc_info=error)


_WORKER_STORE: ResultsStore | None = None


def _open_worker_store(url: str) -> None:
    """In the ingestion worker: open its own connection to the store."""
    global _WORKER_STORE
    from results.store import ResultsStore

    with contextlib.suppress(OSError, AttributeError):  # background work: yield the CPU
        os.nice(10)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop

    _WORKER_STORE = ResultsStore.open(url)


def _ingest_in_worker(
    task: TaskRecord, result: MeasurementResult, device_name: str
) -> tuple[int, bool]:
    assert _WORKER_STORE is not None
    return _WORKER_STORE.ingest_result(task, result, device_name)

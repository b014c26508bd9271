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
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from edgefarm.errors import StoreError

if TYPE_CHECKING:
    from edgefarm.domain import MeasurementResult
    from results.records import TaskRecord
    from results.store import ResultsStore

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class _Job:
    """One queued write: a call (or an ingestion) and where its outcome goes."""

    fn: Callable[[], Any] | None  # None: an ingestion of ``ingest``
    ingest: tuple[TaskRecord, MeasurementResult, str] | None = None
    many: tuple[Callable[[list[Any]], Any], Any] | None = None  # post_many's (fn, item)
    future: asyncio.Future[Any] | None = None  # run() and ingest(); post() logs failures
    outcome: tuple[bool, Any] = (True, None)  # (ok, value or exception)


class _RollBack(Exception):
    """Raised out of a batch to roll it back (a call in it failed)."""


class StoreWriter:
    """Runs store calls in submission order; in the background, many at a time.

    Background writes are group-committed: the writer thread takes every write queued
    so far and runs the calls in one transaction of ``store`` (:meth:`ResultsStore.batch`;
    each call in a savepoint only when the group runs again because a call failed), then
    stores the queued results in one transaction of the ingestion worker. A result's
    dependants (its attempt's end, the campaign's check) are queued only once its
    ingestion is answered, and what it depends on (its lease's records) was queued before
    it, so running the calls of a group before its results keeps every dependency in
    order. Outcomes are given out after the commit."""

    def __init__(
        self,
        background: bool = False,
        ingest_url: str | None = None,
        store: ResultsStore | None = None,
    ) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
            if background
            else None
        )
        self.store = store  # the store the calls write to (batched when set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ingest_url = ingest_url if background else None
        self._ingester: ProcessPoolExecutor | None = None
        self._queue: list[_Job] = []
        self._lock = threading.Lock()
        self._group = threading.local()  # .after_commit: callbacks of the running group
        self.groups = 0  # group commits so far (for tests and metrics)

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
        self._enqueue(_Job(functools.partial(fn, *args, **kwargs)))

    def post_many(self, fn: Callable[[list[T]], Any], item: T) -> None:
        """:meth:`post` of ``fn([item])``; in the background, the items of consecutive
        ``post_many`` calls of the same ``fn`` in one group go to one call of ``fn``
        (one executemany), and each alone when the group runs again after a failure."""
        if self._executor is None:
            self.post(fn, [item])
            return
        self._enqueue(_Job(functools.partial(fn, [item]), many=(fn, item)))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` after every earlier write and return its result (or raise)."""
        if self._executor is None:
            return fn(*args, **kwargs)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(functools.partial(fn, *args, **kwargs), future=future))
        return await future

    async def ingest(
        self, store: ResultsStore, task: TaskRecord, result: MeasurementResult, device_name: str
    ) -> tuple[int, bool]:
        """:meth:`ResultsStore.ingest_result`, after every earlier write: in the worker
        process when there is one, together with the other results queued meanwhile."""
        if self._executor is None:
            return store.ingest_result(task, result, device_name)
        if self.store is None:
            self.store = store
        future: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(None, ingest=(task, result, device_name), future=future))
        return await future

    def _enqueue(self, job: _Job) -> None:
        self._remember_loop()
        assert self._executor is not None
        with self._lock:
            self._queue.append(job)
            first = len(self._queue) == 1
        if first:  # a group is not yet scheduled: the next one takes this and what follows
            self._executor.submit(self._run_group)

    def _run_group(self) -> None:
        """On the writer thread: the writes queued so far, as one group."""
        with self._lock:
            jobs, self._queue = self._queue, []
        if not jobs:
            return
        self.groups += 1
        calls = [j for j in jobs if j.fn is not None]
        results = [j for j in jobs if j.ingest is not None]
        callbacks: list[Callable[[], None]] = []
        self._group.after_commit = callbacks
        try:
            self._commit_calls(calls)
        finally:
            self._group.after_commit = None
        if results:
            self._ingest_group(results)
        for job in jobs:
            if job.future is None:
                _log_failure(job)
        self._hand_over([job for job in jobs if job.future is not None], callbacks)

    def _hand_over(self, waiting: list[_Job], callbacks: list[Callable[[], None]]) -> None:
        """Give the waiting callers their outcomes, then run the group's callbacks, on
        their event loop: one hop there for the whole group (a thread-safe call wakes
        the loop through a pipe, a write each)."""
        loops = {job.future.get_loop() for job in waiting if job.future is not None}
        if callbacks and self._loop is not None:
            loops.add(self._loop)
        for loop in loops:
            mine = [j for j in waiting if j.future is not None and j.future.get_loop() is loop]
            then = callbacks if loop is self._loop else []
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_settle_all, mine, then)
        if callbacks and self._loop is None:
            for callback in callbacks:
                callback()

    def _commit_calls(self, calls: list[_Job]) -> None:
        """Run the calls in one transaction; a failed commit fails them all.

        First without a savepoint per call (each costs two more statements); when any
        call or the commit fails, that transaction is rolled back and the calls run
        again, each in its own savepoint, so that only the failing ones fail. (The calls
        are store writes: running one again after a rollback is safe.)"""
        if not calls:
            return
        if self.store is not None:
            with contextlib.suppress(Exception):
                with self.store.batch(savepoints=False):
                    if not self._run_calls(calls, merge=True):
                        raise _RollBack
                return
            after_commit = getattr(self._group, "after_commit", None)
            if after_commit is not None:
                after_commit.clear()  # the rolled-back run's callbacks
        batch = self.store.batch() if self.store is not None else contextlib.nullcontext()
        try:
            with batch:
                self._run_calls(calls)
        except Exception as error:  # the commit itself
            for job in calls:
                job.outcome = (False, error)

    @staticmethod
    def _run_calls(calls: list[_Job], merge: bool = False) -> bool:
        """Run the calls, keeping each one's outcome; whether all of them succeeded.
        ``merge``: consecutive :meth:`post_many` jobs of one function as one call."""
        start = 0
        while start < len(calls):
            job = calls[start]
            stop = start + 1
            fn = job.many[0] if merge and job.many is not None else None
            while fn is not None and stop < len(calls) and _many_fn(calls[stop]) == fn:
                stop += 1
            run = calls[start:stop]
            try:
                if len(run) == 1:
                    assert job.fn is not None
                    outcome: tuple[bool, Any] = (True, job.fn())
                else:
                    assert fn is not None
                    outcome = (True, fn([j.many[1] for j in run if j.many is not None]))
            except Exception as error:
                outcome = (False, error)
            for done in run:
                done.outcome = outcome
            start = stop
        return all(job.outcome[0] for job in calls)

    def _ingest_group(self, jobs: list[_Job]) -> None:
        """Store the queued results: in the worker process when there is one."""
        items = [j.ingest for j in jobs if j.ingest is not None]
        try:
            if self._ingest_url is None:
                assert self.store is not None
                outcomes = _ingest_many(self.store, items)
            else:
                outcomes = self._ingest_in_worker(items)
        except Exception as error:
            outcomes = [(False, error)] * len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.outcome = outcome

    def start_ingestion(self) -> None:
        """Start the ingestion worker now rather than at the first result (a new
        interpreter takes a good part of a second to start and import the store)."""
        if self._ingest_url is not None:
            self._ingestion_pool().submit(_worker_ready)

    def _ingestion_pool(self) -> ProcessPoolExecutor:
        if self._ingester is None:
            assert self._ingest_url is not None
            self._ingester = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),  # no fork under gRPC threads
                initializer=_open_worker_store,
                initargs=(self._ingest_url,),  # type: ignore[arg-type]
            )
        return self._ingester

    def _ingest_in_worker(
        self, items: list[tuple[TaskRecord, MeasurementResult, str]]
    ) -> list[tuple[bool, Any]]:
        """On the writer thread: hand the results to the worker and wait (GIL released)."""
        try:
            return self._ingestion_pool().submit(_ingest_in_worker, items).result()
        except BrokenProcessPool:
            self._ingester = None  # started afresh for the next result
            raise StoreError(
                "the result ingestion process died; the result was not stored"
            ) from None

    def call_on_loop(self, fn: Callable[[], None]) -> None:
        """From a write: call ``fn`` on the event loop (inline without a writer thread;
        after the commit when called during a group)."""
        after_commit = getattr(self._group, "after_commit", None)
        if after_commit is not None:
            after_commit.append(fn)
        elif self._executor is None or self._loop is None:
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
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()


def _many_fn(job: _Job) -> Callable[[list[Any]], Any] | None:
    """The function of a :meth:`StoreWriter.post_many` job (None for another job)."""
    return job.many[0] if job.many is not None else None


def _settle_all(jobs: list[_Job], callbacks: list[Callable[[], None]]) -> None:
    """On the event loop: each job's outcome to its caller (one that gave up waiting
    has a cancelled future), then the callbacks, each on its own."""
    for job in jobs:
        future = job.future
        if future is None or future.done():
            continue
        ok, value = job.outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("a callback after a store write failed")


def _log_failure(job: _Job) -> None:
    """Log a failed post() (nobody waits for its outcome)."""
    ok, value = job.outcome
    if not ok:
        name = getattr(getattr(job.fn, "func", job.fn), "__name__", job.fn)
        log.error("store write %s failed: %s", name, value, exc_info=value)


def _ingest_many(
    store: ResultsStore, items: list[tuple[TaskRecord, MeasurementResult, str]]
) -> list[tuple[bool, Any]]:
    """Store results in one transaction; each one's outcome. First all together
    (:meth:`ResultsStore.ingest_results`: one statement per table); when that fails, or
    the commit, nothing of it is kept and each is stored again in its own savepoint, so
    that only the failing ones fail."""
    with contextlib.suppress(Exception), store.batch(savepoints=False):
        return [(True, outcome) for outcome in store.ingest_results(items)]
    outcomes: list[tuple[bool, Any]] = []
    with store.batch():
        for task, result, device_name in items:
            try:
                outcomes.append((True, store.ingest_result(task, result, device_name)))
            except Exception as error:
                outcomes.append((False, error))
    return outcomes


_WORKER_STORE: ResultsStore | None = None


def _open_worker_store(url: str) -> None:
    """In the ingestion worker: open its own connection to the store."""
    global _WORKER_STORE
    from results.store import ResultsStore

    with contextlib.suppress(OSError, AttributeError):  # background work: yield the CPU
        os.nice(10)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop

    _WORKER_STORE = ResultsStore.open(url)


def _worker_ready() -> None:
    """In the ingestion worker: nothing (submitted to start the worker)."""


def _ingest_in_worker(
    items: list[tuple[TaskRecord, MeasurementResult, str]],
) -> list[tuple[bool, Any]]:
    assert _WORKER_STORE is not None
    return _ingest_many(_WORKER_STORE, items)

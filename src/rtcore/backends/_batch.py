"""Run work queued by concurrent tasks in batches, one batch at a time.

Both durable engines pay a fixed price per round of work that dwarfs the
work itself: SQLite an fsync (and a hop to the worker thread), Redis a round
trip (and the client's per-request work). :class:`Batcher` lets every task
that arrives while one batch is in flight join the next one, so the price is
paid once per batch. There is no timer: a batch is whatever queued up while
the previous one ran, so a lone caller is served at once and a busy server
gets large batches.

The first task of a batch (its head) runs it when the previous batch has
finished; the others wait for the batch to be done. No background task is
needed, so a backend keeps working whichever task group (or none) it was
opened in. A head runs shielded from cancellation: once it owns a batch,
the batch is answered as a whole and the next head is woken.

When a batch fails in a way that says the engine itself is stuck (a Redis
that answers nothing: the batch waited out its timeout), the batches that
queued behind it fail with the same error instead of each waiting out the
same timeout in turn. They were never sent, so failing them is always safe;
batches queued after the failure are tried as usual.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["UNSET", "Batcher", "Job"]

#: The result of a job that has not run (or did not finish).
UNSET: Any = object()


class Job:
    """One queued piece of work; the batch runner fills ``result`` or ``error``."""

    __slots__ = ("error", "result")

    def __init__(self) -> None:
        self.result: Any = UNSET
        self.error: BaseException | None = None


J = TypeVar("J", bound=Job)


class _Gate:
    """A one-shot event that any number of tasks may wait for.

    On asyncio each waiter parks on a bare future of its own: an
    ``anyio.Event`` there builds an ``asyncio.Event`` (loop binding, a
    deque), and two of them per batch plus their waits cost more than
    everything else the batcher does for a small batch. Each waiter has its
    own future because cancelling a task cancels the future it awaits (a
    shared one would cancel every waiter). Elsewhere (trio) an
    ``anyio.Event``, which is cheap there.
    """

    __slots__ = ("_event", "_loop", "_set", "_waiters")

    def __init__(self) -> None:
        self._loop = asyncio._get_running_loop()  # None on trio
        self._event = None if self._loop is not None else anyio.Event()
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        """Wake every waiter, now and later."""
        if self._set:
            return
        self._set = True
        if self._event is not None:
            self._event.set()
            return
        for fut in self._waiters:
            if not fut.done():  # a cancelled waiter's future is done already
                fut.set_result(None)
        self._waiters.clear()

    async def wait(self) -> None:
        """Return once :meth:`set` has been called."""
        if self._event is not None:
            await self._event.wait()
        elif not self._set:
            assert self._loop is not None
            fut = self._loop.create_future()
            self._waiters.append(fut)
            await fut


class _Batch(Generic[J]):
    __slots__ = ("done", "failed", "jobs", "taken", "turn")

    def __init__(self, job: J) -> None:
        self.jobs = [job]
        self.turn = _Gate()  # set for the head when the previous batch finished
        self.done = _Gate()  # set when this batch finished
        self.taken = False  # its head started running it
        self.failed: BaseException | None = None  # fail without running (queued behind a stall)


class Batcher(Generic[J]):
    """Runs :class:`Job` objects in batches of at most ``limit``, one batch at a time.

    Args:
        run: Runs one batch; sets each job's ``result`` or ``error``. If it
            raises, every job it left unanswered gets that error.
        limit: Most jobs in one batch.
        stalled: Says whether an error raised by ``run`` means the engine is
            stuck; if it does, the batches queued at that moment get the
            error without running. None: every batch runs.
    """

    def __init__(
        self,
        run: Callable[[list[J]], Awaitable[None]],
        limit: int,
        *,
        stalled: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self._run = run
        self._limit = limit
        self._stalled = stalled
        self._waiting: deque[_Batch[J]] = deque()
        self._busy = False
        #: Batches run and jobs in them (for tests and metrics).
        self.batches = 0
        self.jobs = 0

    async def submit(self, job: J) -> J:
        """Queue ``job``, return it once the batch holding it has run."""
        if self._waiting and len(self._waiting[-1].jobs) < self._limit and self._waiting[-1].failed is None:
            batch = self._waiting[-1]
            batch.jobs.append(job)
            done = batch.done
            try:
                if done._loop is not None and not done._set:
                    # _Gate.wait inlined (asyncio): one coroutine less per job
                    # of a batch, and most jobs join a batch rather than head it.
                    fut = done._loop.create_future()
                    done._waiters.append(fut)
                    await fut
                else:
                    await done.wait()
            except BaseException:
                if not batch.taken:  # never ran: it never will
                    batch.jobs.remove(job)
                raise
            return job
        batch = _Batch(job)
        self._waiting.append(batch)
        with anyio.CancelScope(shield=True):
            if self._busy:
                await batch.turn.wait()
            self._busy = True
            assert self._waiting[0] is batch
            self._waiting.popleft()
            batch.taken = True
            try:
                if batch.failed is not None:
                    raise batch.failed
                self.batches += 1
                self.jobs += len(batch.jobs)
                await self._run(batch.jobs)
            except BaseException as exc:
                for j in batch.jobs:
                    if j.error is None and j.result is UNSET:
                        j.error = exc
                if batch.failed is None and self._stalled is not None and self._stalled(exc):
                    for queued in self._waiting:
                        queued.failed = exc
            finally:
                batch.done.set()
                if self._waiting:
                    self._waiting[0].turn.set()
                else:
                    self._busy = False
        return job

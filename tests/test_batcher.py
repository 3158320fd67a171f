"""The batch runner under both durable engines (``rtcore.backends._batch.Batcher``).

What it must keep: one batch at a time, every job answered, and — when a
batch fails because the engine is stuck — the batches queued behind it fail
at once with the same error instead of each waiting out the same timeout
(found by ``tests/hardening/test_redis_pause.py``: a command queued behind a
stalled batch took two Redis timeouts to get its answer, longer than the
client waited).
"""

from __future__ import annotations

import anyio
import pytest

from rtcore.backends._batch import Batcher, Job

pytestmark = pytest.mark.anyio

#: A guard against hanging, not a timing assertion.
GUARD = 10.0


class Stuck(Exception):
    pass


class Broken(Exception):
    pass


class Recorder:
    """A batch runner whose first batch blocks until ``release`` is set, then raises ``first_error``."""

    def __init__(self, first_error: Exception) -> None:
        self.first_error = first_error
        self.release = anyio.Event()
        self.started = anyio.Event()
        self.ran: list[list[str]] = []

    async def run(self, jobs: list[Job]) -> None:
        self.ran.append([getattr(j, "name", "?") for j in jobs])
        if len(self.ran) == 1:
            self.started.set()
            await self.release.wait()
            raise self.first_error
        for j in jobs:
            j.result = "done"


class Named(Job):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


async def _race(rec: Recorder, stall: type[Exception] | None) -> dict[str, Named]:
    """Job a runs (and blocks); b and c queue behind it; d is submitted the moment a's batch fails.

    d is started from inside the failure (the ``stalled`` predicate), before the
    batcher wakes the batch queued behind it, so on asyncio d reaches ``submit``
    while [b, c] is still waiting: the case where d must not join a doomed batch.
    """
    out: dict[str, Named] = {}

    async def submit(name: str) -> None:
        out[name] = await batcher.submit(Named(name))

    def stalled(exc: BaseException) -> bool:
        tg.start_soon(submit, "d")
        return stall is not None and isinstance(exc, stall)

    batcher: Batcher[Named] = Batcher(rec.run, 10, stalled=stalled)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "a")
            await rec.started.wait()
            tg.start_soon(submit, "b")
            tg.start_soon(submit, "c")
            await anyio.wait_all_tasks_blocked()
            rec.release.set()
    return out


async def test_batches_queued_behind_a_stall_fail_with_it_without_running() -> None:
    """Mutations seen caught: dropping the ``queued.failed = exc`` loop in ``Batcher.submit``
    → the queued batch [b, c] runs (``ran`` has it, b and c get "done"); letting a new job
    join a batch already marked failed → d fails without being tried. Both fail here."""
    rec = Recorder(Stuck("no reply"))
    out = await _race(rec, Stuck)
    assert rec.ran == [["a"], ["d"]]  # b and c were never sent
    for name in "abc":
        assert isinstance(out[name].error, Stuck), name
    assert out["d"].error is None and out["d"].result == "done"  # arrived after the failure: tried as usual


async def test_other_failures_leave_queued_batches_to_run() -> None:
    """A failure the predicate does not call a stall fails its own batch only."""
    rec = Recorder(Broken("one bad batch"))
    out = await _race(rec, None)
    assert rec.ran[0] == ["a"] and sorted(n for batch in rec.ran[1:] for n in batch) == ["b", "c", "d"]  # d may join [b, c]
    assert isinstance(out["a"].error, Broken)
    assert [out[n].result for n in "bcd"] == ["done"] * 3


@pytest.mark.timeout(30)  # the mutation hangs past fail_after: fail in 30 s, not the suite's 300
async def test_a_cancelled_waiter_leaves_the_others_of_its_batch_waiting() -> None:
    """Cancelling one job's wait (its task was cancelled) neither cancels nor drops the others of its batch.

    a runs and blocks; b, c and d queue as one batch (b its head, c and d
    waiting for it to finish). c is cancelled while it waits: c leaves the
    batch (it never ran), b and d still run and get their results.
    Mutation seen caught: one future shared by all waiters of a ``_Gate``
    (asyncio cancels the future a cancelled task awaits, so d's wait is
    cancelled with c's) → d never gets its result; the test hangs with no
    timer left for ``fail_after``, so its own pytest-timeout (30 s) fails it.
    """
    rec = Recorder(Broken("first batch"))
    out: dict[str, Named] = {}
    batcher: Batcher[Named] = Batcher(rec.run, 10)

    async def submit(name: str) -> None:
        out[name] = await batcher.submit(Named(name))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "a")
            await rec.started.wait()
            tg.start_soon(submit, "b")
            await anyio.wait_all_tasks_blocked()
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(submit, "c")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(submit, "d")
                await anyio.wait_all_tasks_blocked()
                doomed.cancel_scope.cancel()
            rec.release.set()
    assert rec.ran == [["a"], ["b", "d"]]
    assert "c" not in out
    assert out["b"].result == "done" and out["d"].result == "done"

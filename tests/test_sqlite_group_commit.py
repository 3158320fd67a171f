"""Group commit on ``sqlite://``: many writes, one COMMIT (one fsync), acks only after it.

The guarantees: an acknowledged keyed append survives ``kill -9`` of the
process in the middle of concurrent load, exactly once; the same key sent
concurrently (one group) or again after a restart is applied once; a group
whose COMMIT fails fails every write in it with a retryable error and keeps
none of them.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtcore
from rtcore.backends import Event
from rtcore.backends import sqlite as sqlite_backend
from rtcore.backends.sqlite import SqliteBackend, open_sqlite
from rtcore.errors import BackendError

from .test_backend_sqlite import _child_env, _url

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0

# Concurrent keyed appenders: prints "key offset" after each append returned.
_LOAD = textwrap.dedent(
    """
    import sys, anyio
    from rtcore.backends.sqlite import open_sqlite

    async def main(url, workers):
        b = await open_sqlite(url)
        async def worker(w):
            for i in range(100_000):
                key = f"w{w}-{i}"
                res = await b.events.append(f"load:{w % 4}", "n", {"k": key}, now=1.0, key=key)
                sys.stdout.write(f"{key} {res.event.stream} {res.event.offset}\\n")
                sys.stdout.flush()
        async with anyio.create_task_group() as tg:
            for w in range(workers):
                tg.start_soon(worker, w)

    anyio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


async def test_kill_9_mid_load_keeps_every_acknowledged_keyed_append_once(tmp_path: Path) -> None:
    """Proves: with 32 concurrent keyed appenders (so groups hold many writes)
    and a ``kill -9`` mid-load, every append the child saw return is in its
    stream exactly once at the offset it was told, the streams are dense, and
    retrying every acknowledged key after the restart appends nothing.

    Mutation: answer a group before its COMMIT (in ``_run_group`` skip
    ``_commit`` and commit at the start of the next group instead) -> the
    acknowledged writes of the group in flight at the kill are missing and
    this test fails on the "every acked key is there" assertion.
    """
    url = _url(tmp_path / "rt.db")
    acked: list[tuple[str, str, int]] = []
    async with await anyio.open_process([sys.executable, "-c", _LOAD, url, "32"], env=_child_env()) as proc:
        assert proc.stdout is not None
        buf = b""
        with anyio.fail_after(120):
            async for chunk in proc.stdout:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                acked.extend((k, s, int(o)) for k, s, o in (ln.decode().split() for ln in lines))
                if len(acked) >= 2000:
                    proc.send_signal(signal.SIGKILL)
                    break
            async for chunk in proc.stdout:  # printed before it died: acknowledged too
                buf += chunk
            acked.extend((k, s, int(o)) for k, s, o in (ln.decode().split() for ln in buf.split(b"\n") if ln))
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL

    b = await open_sqlite(url)
    try:
        found: dict[str, tuple[str, int]] = {}
        for n in range(4):
            page = await b.events.read(f"load:{n}", after=0, limit=100_000)
            assert [e.offset for e in page.events] == list(range(1, page.head + 1))  # dense
            for e in page.events:
                assert e.key is not None and e.key not in found  # exactly once
                found[e.key] = (e.stream, e.offset)
        missing = [(k, s, o) for k, s, o in acked if found.get(k) != (s, o)]
        assert missing == []
        for k, s, o in acked[-200:]:  # retries after the restart are duplicates
            res = await b.events.append(s, "n", {"k": k}, now=2.0, key=k)
            assert res.duplicate and res.event.offset == o
    finally:
        await b.aclose()


def _queued(b: SqliteBackend) -> int:
    """Writes waiting for the next group (the worker is held, so the first group cannot finish)."""
    return sum(len(batch.jobs) for batch in b._db.groups._waiting)


async def _hold_worker(db: Any, tg: anyio.abc.TaskGroup) -> threading.Event:
    """Occupy the connection's worker with a call that blocks until the returned event is set.

    Writes submitted meanwhile queue up in the group committer behind it.
    """
    entered, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        entered.set()
        gate.wait(30)  # a guard against hanging, not a timing assertion

    tg.start_soon(db.run, block)
    while not entered.is_set():
        await anyio.sleep(0.01)
    return gate


def _fed(b: SqliteBackend) -> tuple[list[Event], Any]:
    """A live feed of every stream of ``b`` (not running yet) and the list it fills."""
    got: list[Event] = []
    feed = b.events.live(got.append)
    feed.watch("*")
    return got, feed


async def _open(tmp_path: Path) -> SqliteBackend:
    b = await open_sqlite(_url(tmp_path / "rt.db"))
    assert isinstance(b, SqliteBackend)
    return b


async def test_failed_group_commit_fails_every_write_in_the_group(tmp_path: Path, monkeypatch: Any) -> None:
    """Proves: when a group's COMMIT fails, every write of that group gets a
    retryable ``BackendError``, none is kept or fed to live subscribers, and
    the next group works. Here the worker is held so that one write forms the
    first group and the nine queued behind it form the second, whose COMMIT
    fails.

    Mutation: in ``_Db._commit_group`` drop the ``except`` branch's assignment
    of the error (callers then get the result their rolled-back write computed) ->
    ten appends report success and this test fails.
    """
    b = await _open(tmp_path)
    db = b._db
    got, feed = _fed(b)
    commits = 0
    real_commit = sqlite_backend._commit

    def flaky_commit(conn: sqlite3.Connection) -> None:
        nonlocal commits
        commits += 1
        if commits == 2:
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(conn)

    monkeypatch.setattr(sqlite_backend, "_commit", flaky_commit)
    outcomes: list[object] = []

    async def append(i: int) -> None:
        try:
            outcomes.append(await b.events.append("g:1", "n", {"i": i}, now=T0, key=f"k{i}"))
        except BackendError as exc:
            outcomes.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            await anyio.sleep(0.1)
            gate = await _hold_worker(db, tg)  # hold the worker: the writes queue up
            try:
                for i in range(10):
                    tg.start_soon(append, i)
                while _queued(b) < 9:
                    await anyio.sleep(0.01)
            finally:
                gate.set()
            while len(outcomes) < 10:
                await anyio.sleep(0.01)
            errors = [o for o in outcomes if isinstance(o, BackendError)]
            assert len(errors) == 9
            assert all(e.retryable and e.code == "backend_unavailable" for e in errors)
            page = await b.events.read("g:1", after=0, limit=100)
            assert len(page.events) == 1 and page.head == 1
            res = await b.events.append("g:1", "n", {}, now=T0)
            assert res.event.offset == 2
            await anyio.sleep(0.2)
            assert [e.offset for e in got] == [1, 2]  # nothing of the failed group was fed
            tg.cancel_scope.cancel()
    finally:
        await b.aclose()


async def test_a_write_that_raises_fails_alone_and_its_group_commits(tmp_path: Path) -> None:
    """Proves: a write that raises half-way through (after changing a row)
    gets its own error and none of its changes are kept, while the writes
    queued with it in the same group (before and after it) commit once, with
    the offsets and epochs they reported, and reach the live feed exactly so.
    Groups run without per-write savepoints and are run again with them only
    when a write raises (``_run_group``).

    Mutations seen caught: in ``_run_group`` replace the rerun through
    ``_run_isolated`` by catching each write's error in the same loop (no
    rollback, no savepoints) -> the failing write's head of 999 is committed
    and this test fails; drop ``self.out.clear()`` in ``_Append.run``
    -> the feed gets the rolled-back first run's event of the new stream,
    whose epoch was never committed, and this test fails.
    """
    b = await _open(tmp_path)
    db = b._db
    got, feed = _fed(b)
    results: dict[int, Any] = {}

    async def append(i: int) -> None:
        results[i] = await b.events.append(f"iso:{i % 2}", "n", {"i": i}, now=T0, key=f"k{i}")

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE streams SET head = 999 WHERE name = 'iso:0'")
        raise RuntimeError("the write failed half-way")

    async def fail() -> None:
        with pytest.raises(RuntimeError, match="half-way"):
            await db.write(broken)
        results[-1] = "failed"

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            await anyio.sleep(0.1)
            gate = await _hold_worker(db, tg)  # hold the worker: everything below joins one group
            try:
                tg.start_soon(b.events.info, "warm")  # the first group, alone
                while _queued(b) < 0 or not db.groups._busy:
                    await anyio.sleep(0.01)
                for i in range(4):
                    tg.start_soon(append, i)
                    while _queued(b) < i + 1:
                        await anyio.sleep(0.01)
                tg.start_soon(fail)
                while _queued(b) < 5:
                    await anyio.sleep(0.01)
                for i in range(4, 8):
                    tg.start_soon(append, i)
                    while _queued(b) < i + 2:
                        await anyio.sleep(0.01)
            finally:
                gate.set()
            with anyio.fail_after(10):
                while len(results) < 9 or len(got) < 8:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert db.groups.batches == 2 and db.groups.jobs == 10
        for name in ("iso:0", "iso:1"):
            page = await b.events.read(name, after=0, limit=100)
            assert page.head == 4 and [e.offset for e in page.events] == [1, 2, 3, 4]
            stored = {e.key: (e.epoch, e.offset) for e in page.events}
            reported = {
                r.event.key: (r.event.epoch, r.event.offset)
                for i, r in results.items()
                if i >= 0 and i % 2 == int(name[-1])
            }
            assert stored == reported
            fed = {e.key: (e.epoch, e.offset) for e in got if e.stream == name}
            assert fed == stored
        assert len(got) == 8
    finally:
        await b.aclose()


async def test_a_keyed_claim_and_append_rerun_in_its_group_reaches_the_feed_once(tmp_path: Path) -> None:
    """Proves: a keyed command's claim and first event (``begin_append``) in
    a group that is run again because a write behind it raised reaches the
    live feed exactly once, as committed (the epoch of a stream the
    rolled-back first run created is never seen), and its outcome is stored.

    Mutation seen caught: drop ``self.out.clear()`` in ``_BeginAppend.run``
    -> the feed also gets the first run's event of the new stream, under an
    epoch that was rolled back, and this test fails.
    """
    b = await _open(tmp_path)
    db = b._db
    got, feed = _fed(b)
    results: dict[str, Any] = {}

    async def begin() -> None:
        results["begin"] = await b.begin_append(
            "cmd", "k1", b"fp", now=T0, lease=5.0, ttl=60.0, stream="fresh:1", type="n", data={"i": 1},
            event_key="cmd:k1", outcome_ttl=60.0,
        )

    def broken(conn: sqlite3.Connection) -> None:
        raise RuntimeError("the write failed")

    async def fail() -> None:
        with pytest.raises(RuntimeError, match="failed"):
            await db.write(broken)
        results["fail"] = "failed"

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            await anyio.sleep(0.1)
            gate = await _hold_worker(db, tg)
            try:
                tg.start_soon(b.events.info, "warm")  # the first group, alone
                while _queued(b) < 0 or not db.groups._busy:
                    await anyio.sleep(0.01)
                tg.start_soon(begin)
                while _queued(b) < 1:
                    await anyio.sleep(0.01)
                tg.start_soon(fail)  # behind the keyed write, in the same group
                while _queued(b) < 2:
                    await anyio.sleep(0.01)
            finally:
                gate.set()
            with anyio.fail_after(10):
                while len(results) < 2 or not got:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.2)  # a second (phantom) event would be fed by now
            tg.cancel_scope.cancel()
        existing, res = results["begin"]
        assert existing is None and res is not None and not res.duplicate
        page = await b.events.read("fresh:1", after=0, limit=10)
        assert [(e.epoch, e.offset) for e in page.events] == [(res.event.epoch, 1)]
        assert [(e.stream, e.epoch, e.offset) for e in got] == [("fresh:1", res.event.epoch, 1)]
        rec = await b.idempotency.begin("cmd", "k1", b"fp", now=T0, lease=5.0, ttl=60.0)  # kept: not claimable again
        assert rec is not None and rec.state == "done"
    finally:
        await b.aclose()


async def test_same_key_in_one_group_is_appended_once(tmp_path: Path) -> None:
    """Proves: 20 appends with one key queued into the same group append one
    event; the others are duplicates of it (the key lookup sees the earlier
    savepoints of its own group).

    Mutation: skip the ``key`` lookup in ``SqliteEventLog.append`` -> the
    unique index refuses the second insert, 19 appends fail and this test
    fails.
    """
    b = await _open(tmp_path)
    db = b._db
    results: list[Any] = []

    async def append() -> None:
        results.append(await b.events.append("same:1", "n", {}, now=T0, key="once"))

    try:
        async with anyio.create_task_group() as tg:
            gate = await _hold_worker(db, tg)
            try:
                for _ in range(20):
                    tg.start_soon(append)
                while _queued(b) < 19:
                    await anyio.sleep(0.01)
            finally:
                gate.set()
        assert sorted(r.duplicate for r in results) == [False] + [True] * 19
        assert {r.event.offset for r in results} == {1}
        assert db.groups.batches == 2 and db.groups.jobs == 20  # 1 alone, then 19 in one group
        assert (await b.events.info("same:1")).head == 1
    finally:
        await b.aclose()


app = rtcore.App("group-commit")
runs: list[str] = []


@app.command("pub")
async def pub(ctx: rtcore.Context, args: dict[str, Any]) -> int:
    runs.append(args["tag"])
    return (await ctx.publish("orders:1", "placed", args)).offset


async def test_keyed_command_retried_concurrently_and_after_restart_runs_once(tmp_path: Path) -> None:
    """Proves: 20 concurrent dispatches of one keyed command (their claims land
    in the same group) run the handler once and append one event; the others
    are told ``idempotency_in_progress`` or get the stored outcome; after a
    restart on the same file the same key replays the stored outcome.

    Mutation: skip the idempotency lookup in ``SqliteIdempotencyStore.begin``
    (always claim) -> the handler runs 20 times and this test fails.
    """
    runs.clear()
    url = _url(tmp_path / "rt.db")
    replies: list[Any] = []
    async with rtcore.Node(app, url) as node:

        async def send() -> None:
            replies.append(await node.dispatch(None, "pub", {"tag": "a"}, key="k1"))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(send)
    assert runs == ["a"]
    ok = [r for r in replies if r.ok]
    assert ok and {r.result for r in ok} == {1}
    assert all(r.code == "idempotency_in_progress" for r in replies if not r.ok)
    async with rtcore.Node(app, url) as node:
        again = await node.dispatch(None, "pub", {"tag": "a"}, key="k1")
        assert again.ok and again.replayed and again.result == 1
        assert (await node.backend.events.info("orders:1")).head == 1
    assert runs == ["a"]


_hypo_runs = 0


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=40))
def test_concurrent_keyed_appends_land_once_per_key(tmp_path: Path, loop: str, plan: list[str]) -> None:
    """Proves: any mix of concurrent keyed appends (repeated keys landing in
    the same group or in later ones) appends each key once, at one offset
    that every append of the key returned, densely from offset 1.

    Mutation: skip the ``key`` lookup in ``SqliteEventLog.append`` -> the
    unique index refuses a repeated key, an append fails and Hypothesis
    reports the plan.
    """
    global _hypo_runs
    _hypo_runs += 1
    url = _url(tmp_path / f"h{_hypo_runs}.db")

    async def main() -> None:
        b = await open_sqlite(url)
        try:
            got: dict[str, set[int]] = {}

            async def append(key: str) -> None:
                res = await b.events.append("h:1", "n", {"k": key}, now=T0, key=key)
                got.setdefault(key, set()).add(res.event.offset)

            async with anyio.create_task_group() as tg:
                for key in plan:
                    tg.start_soon(append, key)
            page = await b.events.read("h:1", after=0, limit=100)
            assert [e.offset for e in page.events] == list(range(1, len(set(plan)) + 1))
            assert {e.key: {e.offset} for e in page.events} == got
        finally:
            await b.aclose()

    anyio.run(main, backend=loop)


async def test_a_cancelled_call_still_keeps_the_connection_to_itself(tmp_path: Path) -> None:
    """A caller cancelled while its call runs on the worker stops waiting, but the next
    call starts only after that one ended: the connection is never used by two threads
    at once. On asyncio the calls run on the connection's own thread, which ends with
    ``aclose``.

    Mutations seen caught: running each call on a new thread (``_Thread.run`` starting a
    ``threading.Thread`` per call) → the second call overlaps the first; dropping
    ``self._thread.stop()`` from ``_Db.close`` → the thread is still alive after ``aclose``.
    """
    b = await _open(tmp_path)
    db = b._db
    running = 0
    overlaps: list[int] = []
    entered, gate = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        nonlocal running
        running += 1
        overlaps.append(running)
        entered.set()
        gate.wait(30)  # a guard against hanging, not a timing assertion
        running -= 1

    def quick(conn: sqlite3.Connection) -> int:
        overlaps.append(running + 1)
        return int(conn.execute("SELECT 1").fetchone()[0])

    try:
        slow_caller = anyio.CancelScope()

        async def call_slow() -> None:
            with slow_caller:
                await db.run(slow)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call_slow)
            while not entered.is_set():
                await anyio.sleep(0.01)
            # On asyncio its caller stops waiting and slow() goes on; on trio
            # (anyio's threads) the caller waits for slow() regardless.
            slow_caller.cancel()
            tg.start_soon(db.run, quick)
            await anyio.sleep(0.05)  # quick() is queued by now (if not, it cannot overlap)
            gate.set()
        assert overlaps == [1, 1]
        thread = db._thread._thread
    finally:
        gate.set()
        await b.aclose()
    if thread is not None:  # asyncio: the connection's own thread
        thread.join(5)
        assert not thread.is_alive()

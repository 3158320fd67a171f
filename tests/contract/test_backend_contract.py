"""The contract every backend keeps (run unchanged on memory, sqlite, redis).

Each test opens a fresh backend from ``backend_factory`` and drives it only
through the Protocols of :mod:`rtcore.backends.base`.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from rtcore.backends import Backend, Event, IdempotencyRecord, Outcome, Retention, Snapshot
from rtcore.backends.memory import MemoryIdempotencyStore
from rtcore.backends.sqlite import SqliteIdempotencyStore
from rtcore.errors import ConflictError

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0


async def _append_n(b: Backend, stream: str, n: int, *, now: float = T0) -> list[Event]:
    out = []
    for i in range(n):
        res = await b.events.append(stream, "e", {"i": i}, now=now)
        out.append(res.event)
    return out


async def test_offsets_are_dense_from_one_and_epoch_is_stable(backend_factory) -> None:
    async with backend_factory() as b:
        info0 = await b.events.info("room:1")
        assert info0.head == 0 and info0.first == 1
        events = await _append_n(b, "room:1", 5)
        assert [e.offset for e in events] == [1, 2, 3, 4, 5]
        assert {e.epoch for e in events} == {info0.epoch}
        assert [e.data for e in events] == [{"i": i} for i in range(5)]
        info = await b.events.info("room:1")
        assert (info.epoch, info.head, info.first) == (info0.epoch, 5, 1)


async def test_streams_are_independent(backend_factory) -> None:
    async with backend_factory() as b:
        await _append_n(b, "a:1", 3)
        await _append_n(b, "b:1", 2)
        assert (await b.events.info("a:1")).head == 3
        assert (await b.events.info("b:1")).head == 2
        assert (await b.events.info("a:1")).epoch != (await b.events.info("b:1")).epoch
        assert await b.events.streams("a:*") == ["a:1"]
        assert set(await b.events.streams()) >= {"a:1", "b:1"}


async def test_read_pages_after_offset(backend_factory) -> None:
    async with backend_factory() as b:
        await _append_n(b, "s:1", 10)
        page = await b.events.read("s:1", after=3, limit=4)
        assert [e.offset for e in page.events] == [4, 5, 6, 7]
        assert page.head == 10 and page.first == 1
        tail = await b.events.read("s:1", after=8, limit=100)
        assert [e.offset for e in tail.events] == [9, 10]
        assert (await b.events.read("s:1", after=10, limit=5)).events == []
        assert (await b.events.read("s:1", after=0, limit=0)).events == []


async def test_event_fields_round_trip(backend_factory) -> None:
    async with backend_factory() as b:
        data = {"s": "x", "n": 1, "f": 1.5, "l": [1, "a", None], "d": {"k": True}}
        ev = (await b.events.append("s:1", "moved", data, now=T0 + 1.25, key="k1")).event
        (stored,) = (await b.events.read("s:1", after=0, limit=1)).events
        assert stored == ev
        assert (stored.type, stored.data, stored.ts, stored.key) == ("moved", data, T0 + 1.25, "k1")


async def test_idempotent_append_by_key(backend_factory) -> None:
    async with backend_factory() as b:
        first = await b.events.append("s:1", "e", {"v": 1}, now=T0, key="k")
        again = await b.events.append("s:1", "e", {"v": 1}, now=T0 + 5, key="k")
        assert not first.duplicate and again.duplicate
        assert again.event == first.event
        assert (await b.events.info("s:1")).head == 1
        other = await b.events.append("s:1", "e", {"v": 2}, now=T0, key="k2")
        assert other.event.offset == 2 and not other.duplicate


async def test_expect_is_optimistic_concurrency(backend_factory) -> None:
    async with backend_factory() as b:
        await b.events.append("s:1", "e", {}, now=T0, expect=0)
        await b.events.append("s:1", "e", {}, now=T0, expect=1)
        with pytest.raises(ConflictError) as exc:
            await b.events.append("s:1", "e", {}, now=T0, expect=1)
        assert exc.value.code == "conflict"
        assert (await b.events.info("s:1")).head == 2
        # a retried keyed append that already succeeded is a duplicate, not a conflict
        await b.events.append("s:1", "e", {}, now=T0, key="kk", expect=2)
        dup = await b.events.append("s:1", "e", {}, now=T0, key="kk", expect=2)
        assert dup.duplicate and dup.event.offset == 3


async def test_concurrent_appends_get_distinct_dense_offsets(backend_factory) -> None:
    async with backend_factory() as b:
        offsets: list[int] = []

        async def writer(w: int) -> None:
            for i in range(20):
                offsets.append((await b.events.append("s:1", "e", {"w": w, "i": i}, now=T0)).event.offset)

        async with anyio.create_task_group() as tg:
            for w in range(5):
                tg.start_soon(writer, w)
        assert sorted(offsets) == list(range(1, 101))


async def test_retention_by_count(backend_factory) -> None:
    """After every append the stream keeps exactly its last ``max_events`` events.

    Mutation seen caught: SQLite's append skipping the trim while the head is within
    ``max_events + 1`` (instead of ``max_events``) → 4 events kept after the 4th append → fails.
    """
    async with backend_factory() as b:
        r = Retention(max_events=3)
        for i in range(7):
            await b.events.append("s:1", "e", {"i": i}, now=T0, retention=r)
            kept = await b.events.read("s:1", after=0, limit=100)
            assert [e.offset for e in kept.events] == list(range(max(1, i - 1), i + 2))
        info = await b.events.info("s:1")
        assert (info.head, info.first) == (7, 5)
        page = await b.events.read("s:1", after=0, limit=100)
        assert [e.offset for e in page.events] == [5, 6, 7]
        assert page.first == 5


async def test_retention_by_age(backend_factory) -> None:
    async with backend_factory() as b:
        for i in range(4):
            await b.events.append("s:1", "e", {}, now=T0 + i * 10)
        dropped = await b.events.trim("s:1", Retention(max_age=15), now=T0 + 35)
        assert dropped == 2
        info = await b.events.info("s:1")
        assert (info.head, info.first) == (4, 3)
        # trimming everything keeps head and epoch; first becomes head + 1
        await b.events.trim("s:1", Retention(max_age=1), now=T0 + 1000)
        info2 = await b.events.info("s:1")
        assert (info2.head, info2.first, info2.epoch) == (4, 5, info.epoch)
        nxt = await b.events.append("s:1", "e", {}, now=T0 + 1000)
        assert nxt.event.offset == 5


async def test_live_feed_delivers_watched_streams_in_order(backend_factory) -> None:
    async with backend_factory() as b:
        got: list[Event] = []
        feed = b.events.live(got.append)
        feed.watch("s:1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            await anyio.sleep(0.05)  # let engines that poll start their reader
            await _append_n(b, "s:1", 5)
            await _append_n(b, "other:1", 2)
            with anyio.fail_after(10):
                while len(got) < 5:
                    await anyio.sleep(0.01)
            feed.unwatch("s:1")
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert [(e.stream, e.offset) for e in got] == [("s:1", i) for i in range(1, 6)]


async def test_live_feed_watch_all(backend_factory) -> None:
    async with backend_factory() as b:
        got: list[Event] = []
        feed = b.events.live(got.append)
        feed.watch("*")
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            await anyio.sleep(0.05)
            await _append_n(b, "a:1", 2)
            await _append_n(b, "b:1", 2)
            with anyio.fail_after(10):
                while len(got) < 4:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert sorted((e.stream, e.offset) for e in got) == [("a:1", 1), ("a:1", 2), ("b:1", 1), ("b:1", 2)]


async def test_idempotency_begin_is_exclusive(backend_factory) -> None:
    async with backend_factory() as b:
        st = b.idempotency
        assert await st.begin("p:u", "k", b"fp", now=T0, lease=60) is None
        rec = await st.begin("p:u", "k", b"fp", now=T0 + 1, lease=60)
        assert isinstance(rec, IdempotencyRecord) and rec.state == "pending" and rec.fingerprint == b"fp"
        # scopes are separate
        assert await st.begin("p:v", "k", b"fp", now=T0, lease=60) is None
        await st.finish("p:u", "k", Outcome(True, {"x": 1}), now=T0 + 2, ttl=100)
        done = await st.begin("p:u", "k", b"fp", now=T0 + 3, lease=60)
        assert done is not None and done.state == "done"
        assert done.outcome == Outcome(True, {"x": 1}) and done.fingerprint == b"fp"
        # after the TTL the key is free again
        assert await st.begin("p:u", "k", b"fp2", now=T0 + 200, lease=60) is None


async def test_idempotency_concurrent_begin_one_winner(backend_factory) -> None:
    async with backend_factory() as b:
        winners: list[int] = []

        async def claim(i: int) -> None:
            if await b.idempotency.begin("p:u", "race", b"fp", now=T0, lease=60) is None:
                winners.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(claim, i)
        assert len(winners) == 1


async def test_idempotency_lease_expiry_and_release(backend_factory) -> None:
    async with backend_factory() as b:
        st = b.idempotency
        assert await st.begin("s", "k", b"fp", now=T0, lease=5) is None
        assert await st.begin("s", "k", b"fp", now=T0 + 6, lease=5) is None  # lease ran out
        await st.release("s", "k")
        assert await st.begin("s", "k", b"fp", now=T0 + 7, lease=5) is None
        await st.finish("s", "k", Outcome(False, None, "nope", "no"), now=T0 + 8, ttl=50)
        await st.release("s", "k")  # release never drops a finished outcome
        rec = await st.begin("s", "k", b"fp", now=T0 + 9, lease=5)
        assert rec is not None and rec.outcome == Outcome(False, None, "nope", "no")


async def test_idempotency_key_stays_bound_to_its_fingerprint(backend_factory) -> None:
    """Released keys and lapsed claims can be claimed again by the same fingerprint only, until the TTL.

    Mutations seen caught: the stores' ``release`` deleting the record (as it
    did before), or ``begin`` claiming any expired lease (the old rule) → the
    other fingerprint claims the key → fails.
    """
    async with backend_factory() as b:
        st = b.idempotency
        assert await st.begin("s", "k", b"fp", now=T0, lease=5, ttl=100) is None
        await st.release("s", "k")
        bound = await st.begin("s", "k", b"other", now=T0 + 1, lease=5, ttl=100)
        assert bound is not None and bound.fingerprint == b"fp"
        assert await st.begin("s", "k", b"fp", now=T0 + 2, lease=5, ttl=100) is None  # the retry
        lapsed = await st.begin("s", "k", b"other", now=T0 + 8, lease=5, ttl=100)  # lease ran out at T0 + 7
        assert lapsed is not None and lapsed.fingerprint == b"fp"
        assert await st.begin("s", "k", b"fp", now=T0 + 9, lease=5, ttl=100) is None  # same command takes over
        # after the TTL the binding is gone
        assert await st.begin("s", "k", b"other", now=T0 + 200, lease=5, ttl=100) is None


async def test_cursors_only_move_forward_within_an_epoch(backend_factory) -> None:
    async with backend_factory() as b:
        c = b.cursors
        assert await c.get("alice", "s:1", now=T0) is None
        await c.advance("alice", "s:1", "e1", 5, now=T0, ttl=60)
        await c.advance("alice", "s:1", "e1", 3, now=T0, ttl=60)
        assert await c.get("alice", "s:1", now=T0) == ("e1", 5)
        await c.advance("alice", "s:1", "e2", 1, now=T0, ttl=60)
        assert await c.get("alice", "s:1", now=T0) == ("e2", 1)
        assert await c.get("bob", "s:1", now=T0) is None


async def test_cursors_expire_unless_advanced(backend_factory) -> None:
    """A cursor not advanced for its TTL is gone; every advance refreshes the TTL.

    Mutations seen caught (each on memory, sqlite and redis alike):

    * drop the expiry check from ``get`` → fails (the cursor is still there at ``T0 + 10``);
    * ``advance`` keeps the old expiry when the offset does not move → fails
      (the cursor refreshed at ``T0 + 18`` is gone at ``T0 + 25``);
    * ``advance`` treats an expired cursor as live → fails (the lower
      offset 2 is ignored at ``T0 + 11``, the stale 5 comes back; on memory:
      drop ``self._expire(now)`` and the expiry check from ``advance``);
    * memory: ``_expire`` drops a cursor whose heap entry came up although it
      was advanced since, instead of requeueing it → fails (alice is gone at
      ``T0 + 25``).
    """
    async with backend_factory() as b:
        c = b.cursors
        await c.advance("alice", "s:1", "e1", 5, now=T0, ttl=10)
        await c.advance("bob", "s:1", "e1", 7, now=T0 + 5, ttl=10)
        assert await c.get("alice", "s:1", now=T0 + 9.5) == ("e1", 5)
        assert await c.get("alice", "s:1", now=T0 + 10) is None  # expired at now + ttl exactly
        assert await c.get("bob", "s:1", now=T0 + 10) == ("e1", 7)  # each cursor has its own expiry
        # Expired means absent: the next advance is a newcomer's, even with a lower offset.
        await c.advance("alice", "s:1", "e1", 2, now=T0 + 11, ttl=10)
        assert await c.get("alice", "s:1", now=T0 + 11) == ("e1", 2)
        # An ack that does not move the position still refreshes the expiry,
        # and the store's own expiry work (another cursor's advance) keeps it.
        await c.advance("alice", "s:1", "e1", 1, now=T0 + 18, ttl=10)
        await c.advance("carol", "s:1", "e1", 1, now=T0 + 25, ttl=10)
        assert await c.get("alice", "s:1", now=T0 + 25) == ("e1", 2)
        await c.advance("alice", "s:1", "e1", 3, now=T0 + 26, ttl=10)
        assert await c.get("alice", "s:1", now=T0 + 35.5) == ("e1", 3)
        assert await c.get("alice", "s:1", now=T0 + 36) is None
        assert await c.get("bob", "s:1", now=T0 + 15) is None


async def test_snapshots_keep_the_newest(backend_factory) -> None:
    async with backend_factory() as b:
        s = b.snapshots
        assert await s.get("s:1") is None
        await s.put(Snapshot("s:1", "e1", 10, b"\x80", "c10"))
        await s.put(Snapshot("s:1", "e1", 5, b"\x80", "c5"))
        got = await s.get("s:1")
        assert got is not None and (got.offset, got.checksum) == (10, "c10")
        await s.put(Snapshot("s:1", "e2", 1, b"\x81", "n1"))
        got = await s.get("s:1")
        assert got is not None and (got.epoch, got.offset, got.state) == ("e2", 1, b"\x81")


async def test_leases_have_one_holder(backend_factory) -> None:
    async with backend_factory() as b:
        ls = b.leases
        assert await ls.acquire("tick:room:1", "n1", now=T0, ttl=10)
        assert not await ls.acquire("tick:room:1", "n2", now=T0 + 1, ttl=10)
        assert await ls.acquire("tick:room:1", "n1", now=T0 + 5, ttl=10)  # renew
        assert not await ls.acquire("tick:room:1", "n2", now=T0 + 14, ttl=10)
        assert await ls.acquire("tick:room:1", "n2", now=T0 + 16, ttl=10)  # expired
        await ls.release("tick:room:1", "n1")  # not the holder: no effect
        assert not await ls.acquire("tick:room:1", "n1", now=T0 + 17, ttl=10)
        await ls.release("tick:room:1", "n2")
        assert await ls.acquire("tick:room:1", "n1", now=T0 + 18, ttl=10)


async def _pending_record_exists(b: Backend, scope: str, key: str) -> bool:
    """Whether the engine still stores a record for ``(scope, key)`` (peeks at its storage)."""
    st: Any = b.idempotency
    if isinstance(st, MemoryIdempotencyStore):
        return (scope, key) in st._records
    if isinstance(st, SqliteIdempotencyStore):
        sql = "SELECT 1 FROM idempotency WHERE scope = ? AND key = ?"
        return await st._db.run(lambda conn: conn.execute(sql, (scope, key)).fetchone()) is not None
    if type(st).__name__ == "RedisIdempotencyStore":
        from rtcore.backends.redis import _pair_key

        return bool(await st._client.exists([_pair_key("idem", scope, key)]))
    pytest.fail(f"teach _pending_record_exists how {type(st).__name__} stores records")


async def _collect_garbage(b: Backend, scope: str, key: str, *, now: float) -> None:
    """Let the engine's OWN garbage collection drop the expired record of ``(scope, key)``.

    Nothing is deleted by the test: memory and SQLite sweep expired records
    from inside ``finish`` every so many calls, so unrelated commands are
    finished until the sweep has run; Redis drops the key when its
    ``PEXPIRE`` fires, so the test waits for that.
    """
    if type(b.idempotency).__name__ == "RedisIdempotencyStore":
        with anyio.fail_after(10):
            while await _pending_record_exists(b, scope, key):
                await anyio.sleep(0.05)
        return
    for i in range(10_000):
        if not await _pending_record_exists(b, scope, key):
            return
        await b.idempotency.finish(scope, f"other-{i}", Outcome(True, i), now=now, ttl=0.001, fingerprint=b"o")
    pytest.fail("the engine never garbage-collected the expired pending record")


async def test_idempotency_finish_keeps_the_fingerprint_after_the_lease_ran_out(backend_factory) -> None:
    """A command that outlives its pending record (lease and TTL both ran out,
    and the engine garbage-collected it) still stores its own fingerprint: a retry with the same
    command replays the outcome instead of getting ``key_reused``.

    The pending record is really collected by each engine (memory and SQLite:
    the sweep inside ``finish``; Redis: the key's ``PEXPIRE``), never by the test.

    Mutation: ``finish`` ignores its ``fingerprint`` argument and keeps the
    pending record's (``b""`` once that is gone) in memory.py, sqlite.py or
    redis.py → fails on that engine (fingerprint ``b""``).
    """
    async with backend_factory() as b:
        st = b.idempotency
        # lease=ttl=0.001: Redis's garbage-collecting PEXPIRE fires after about a second.
        assert await st.begin("s", "k", b"fp", now=T0, lease=0.001, ttl=0.001) is None
        await _collect_garbage(b, "s", "k", now=T0 + 5)
        assert not await _pending_record_exists(b, "s", "k")
        await st.finish("s", "k", Outcome(True, 1), now=T0 + 5, ttl=100, fingerprint=b"fp")
        rec = await st.begin("s", "k", b"fp", now=T0 + 6, lease=1)
        assert rec is not None and rec.state == "done"
        assert rec.fingerprint == b"fp" and rec.outcome == Outcome(True, 1)

"""Redis-specific guarantees: crash durability, epoch change on data loss, two nodes.

Each test starts its own redis-server (see :mod:`tests.redis_server`) so it
can ``kill -9`` it without disturbing the rest of the suite.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import coredis
import msgspec
import msgspec.structs
import pytest

import rtcore
from rtcore.backends import Backend, Event, LiveFeed, Outcome, Retention, Snapshot, open_backend
from rtcore.errors import BackendError
from tests.redis_server import RedisServer, redis_server_binary, require_services

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    # coredis 6.9 leaks anyio memory streams when a connection attempt is
    # refused (as it is while Redis is down); they warn when collected. Only
    # that warning is ignored, and the autouse fixture below collects them
    # inside the test that caused them so they never surface in another test.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
    ),
]

T0 = 1_700_000_000.0
T = TypeVar("T")


def _start(persistent: bool) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        if require_services():
            pytest.fail("redis-server is not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    with RedisServer(persistent=persistent) as server:
        yield server


@pytest.fixture(autouse=True)
def _collect_coredis_leaks() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """appendonly yes + appendfsync always: acknowledged writes survive kill -9."""
    yield from _start(persistent=True)


@pytest.fixture
def volatile_server() -> Iterator[RedisServer]:
    """No persistence: a restart loses everything."""
    yield from _start(persistent=False)


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Backend]:
    b = await open_backend(url)
    try:
        yield b
    finally:
        await b.aclose()


async def retrying(op: Callable[[], Awaitable[T]]) -> T:
    """Run ``op`` until Redis answers: the first calls after a restart may hit dead connections."""
    with anyio.fail_after(30):
        while True:
            try:
                return await op()
            except BackendError:
                await anyio.sleep(0.05)


class Collector(list[Event]):
    """A deliver callback that can be awaited until it holds ``n`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._want = 0
        self._reached = anyio.Event()

    def append(self, event: Event) -> None:
        super().append(event)
        if self._want and len(self) >= self._want:
            self._reached.set()

    async def wait_for(self, n: int) -> None:
        self._want, self._reached = n, anyio.Event()
        if len(self) < n:
            await self._reached.wait()


async def _run_feed(feed: LiveFeed, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await feed.run()


async def test_open_backend_dispatches_redis_urls(volatile_server: RedisServer) -> None:
    async with opened(volatile_server.url) as b:
        assert (await b.events.append("s:1", "e", {"x": 1}, now=T0)).event.offset == 1
        assert await b.events.streams("s:*") == ["s:1"]
    with pytest.raises(BackendError):
        await open_backend("redis://127.0.0.1:1/0")


async def test_kill_9_with_aof_keeps_every_acknowledged_append(aof_server: RedisServer) -> None:
    acked: list[Event] = []
    async with opened(aof_server.url) as b:
        epoch = (await b.events.info("bet:1")).epoch

        async def writer() -> None:
            i = 0
            while True:
                try:
                    res = await b.events.append("bet:1", "placed", {"i": i}, now=T0 + i, key=f"k{i}")
                except BackendError:
                    return  # the server is gone: this append was not acknowledged
                acked.append(res.event)
                i += 1
                if i == 150:
                    aof_server.kill()  # kill -9 while the writer is mid-stream

        await writer()
        assert len(acked) >= 150
        aof_server.start()

        info = await retrying(lambda: b.events.info("bet:1"))
        assert info.epoch == epoch
        assert info.head >= len(acked)
        page = await b.events.read("bet:1", after=0, limit=10_000)
        assert [e.offset for e in page.events] == list(range(1, info.head + 1))
        assert page.events[: len(acked)] == acked
        # the key index survived too: retrying an acknowledged append is a duplicate
        dup = await b.events.append("bet:1", "placed", {"i": 3}, now=T0, key="k3")
        assert dup.duplicate and dup.event == acked[3]
        nxt = await b.events.append("bet:1", "placed", {}, now=T0)
        assert (nxt.event.offset, nxt.event.epoch) == (info.head + 1, epoch)


async def test_restart_without_persistence_starts_a_new_epoch(volatile_server: RedisServer) -> None:
    async with opened(volatile_server.url) as b:
        for i in range(5):
            await b.events.append("room:1", "e", {"i": i}, now=T0)
        old = await b.events.info("room:1")
        assert old.head == 5
        got = Collector()
        feed = b.events.live(got.append)
        feed.watch("room:1")
        async with anyio.create_task_group() as tg:
            await tg.start(_run_feed, feed)
            await b.events.append("room:1", "e", {"i": 5}, now=T0)
            with anyio.fail_after(10):
                await got.wait_for(1)

            volatile_server.restart()  # kill -9, then an empty server on the same port

            new = await retrying(lambda: b.events.info("room:1"))
            assert new.epoch != old.epoch
            assert (new.head, new.first) == (0, 1)
            res = await b.events.append("room:1", "e", {"i": "new"}, now=T0)
            assert (res.event.offset, res.event.epoch) == (1, new.epoch)
            await b.events.append("room:1", "e", {"i": "new2"}, now=T0)
            # the running feed notices the new life and delivers it from offset 1
            with anyio.fail_after(10):
                await got.wait_for(3)
            tg.cancel_scope.cancel()
        assert [(e.epoch, e.offset) for e in got] == [(old.epoch, 6), (new.epoch, 1), (new.epoch, 2)]


async def test_two_nodes_one_feed_sees_everything_in_order(volatile_server: RedisServer) -> None:
    async with opened(volatile_server.url) as node_a, opened(volatile_server.url) as node_b:
        one = Collector()
        every = Collector()
        feed_one = node_a.events.live(one.append)
        feed_one.watch("s:1")
        feed_all = node_b.events.live(every.append)
        feed_all.watch("*")
        async with anyio.create_task_group() as tg:
            await tg.start(_run_feed, feed_one)
            await tg.start(_run_feed, feed_all)
            await anyio.sleep(0.3)  # let both readers take their starting positions

            async def writer(node: Backend, name: str, n: int) -> None:
                for i in range(n):
                    await node.events.append("s:1", "e", {"node": name, "i": i}, now=T0)
                    if i % 10 == 0:
                        await node.events.append(f"side:{name}", "e", {"i": i}, now=T0)

            async with anyio.create_task_group() as writers:
                writers.start_soon(writer, node_a, "a", 100)
                writers.start_soon(writer, node_b, "b", 100)
            with anyio.fail_after(20):
                await one.wait_for(200)
                await every.wait_for(220)
            await anyio.sleep(0.3)  # a few more rounds: nothing may arrive twice
            tg.cancel_scope.cancel()

        history = (await node_b.events.read("s:1", after=0, limit=1000)).events
        assert [e.offset for e in one] == list(range(1, 201))
        assert list(one) == history
        assert {e.data["node"] for e in one} == {"a", "b"}
        assert [e for e in every if e.stream == "s:1"] == history
        for side in ("side:a", "side:b"):
            assert [e.offset for e in every if e.stream == side] == list(range(1, 11))
        assert len(every) == 220


async def test_feed_unwatch_stops_delivery(volatile_server: RedisServer) -> None:
    """After ``unwatch``, no event of that stream is delivered; the others go on.

    Order is promised per stream only: two streams appended between two
    ``XREAD`` rounds come back in the order of the read's keys (a set's order),
    so the check is per stream (comparing one interleaving made this test flaky).

    Mutation seen caught: deliver without the ``_wants`` check in
    ``_RedisFeed.run`` and keep unwatched positions in ``_sync`` → a:1's
    second event is delivered and the test fails.
    """
    async with opened(volatile_server.url) as b:
        got = Collector()
        feed = b.events.live(got.append)
        feed.watch("a:1")
        feed.watch("b:1")
        async with anyio.create_task_group() as tg:
            await tg.start(_run_feed, feed)
            await anyio.sleep(0.3)
            await b.events.append("a:1", "e", {}, now=T0)
            await b.events.append("b:1", "e", {}, now=T0)
            with anyio.fail_after(10):
                await got.wait_for(2)
            feed.unwatch("a:1")
            await anyio.sleep(0.3)  # let the reader drop a:1
            await b.events.append("a:1", "e", {}, now=T0)
            await b.events.append("b:1", "e", {}, now=T0)
            with anyio.fail_after(10):
                await got.wait_for(3)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert [e.offset for e in got if e.stream == "a:1"] == [1]
        assert [e.offset for e in got if e.stream == "b:1"] == [1, 2]
        assert len(got) == 3


async def test_trimmed_keys_are_forgotten(volatile_server: RedisServer) -> None:
    from rtcore.backends import Retention

    async with opened(volatile_server.url) as b:
        r = Retention(max_events=2)
        for i in range(5):
            await b.events.append("s:1", "e", {"i": i}, now=T0, key=f"k{i}", retention=r)
        # k0 was trimmed away: the same key appends a new event
        again = await b.events.append("s:1", "e", {"i": 0}, now=T0, key="k0", retention=r)
        assert not again.duplicate and again.event.offset == 6
        # the key index holds only retained events
        idx = await b.client.hkeys("rt:{s:1}:k")  # type: ignore[attr-defined]
        assert sorted(idx) == [b"k0", b"k4"]


async def test_cursor_keys_are_deleted_by_redis_after_their_ttl(volatile_server: RedisServer) -> None:
    """Every cursor advance sets the key's ``PEXPIRE`` (TTL plus the 1 s grace)
    and pushes it back, so Redis itself deletes cursors nobody advances; a
    cursor written before cursors expired (no ``exp`` field, no TTL) reads as
    live and gets both at its next advance.

    Mutations seen caught: drop the ``PEXPIRE`` from ``_CURSOR_ADVANCE`` →
    fails (PTTL -1); ``get`` reads a hash without ``exp`` as expired → fails
    (bob's cursor from before the upgrade is lost).
    """
    from rtcore.backends.redis import _pair_key

    async with opened(volatile_server.url) as b:
        client: Any = b.client  # type: ignore[attr-defined]
        c = b.cursors
        key = _pair_key("cur", "alice", "s:1")
        await c.advance("alice", "s:1", "e1", 5, now=T0, ttl=30)
        assert 0 < await client.pttl(key) <= 31_000
        await c.advance("alice", "s:1", "e1", 3, now=T0 + 1, ttl=3600)  # position kept, TTL refreshed
        assert 31_000 < await client.pttl(key) <= 3_601_000
        assert await c.get("alice", "s:1", now=T0 + 3000) == ("e1", 5)

        legacy = _pair_key("cur", "bob", "s:1")
        await client.hset(legacy, {"epoch": "e1", "off": "7"})
        assert await client.pttl(legacy) == -1
        assert await c.get("bob", "s:1", now=T0) == ("e1", 7)
        await c.advance("bob", "s:1", "e1", 8, now=T0, ttl=0.001)
        assert await c.get("bob", "s:1", now=T0 + 1) is None
        # ttl=0.001: the garbage-collecting PEXPIRE fires after about a second of real time.
        with anyio.fail_after(10):
            while await client.exists([legacy]):
                await anyio.sleep(0.05)


async def test_watch_then_read_history_leaves_no_gap(volatile_server: RedisServer) -> None:
    """The Hub's catch-up: watch, read history, then live must continue right after it."""
    async with opened(volatile_server.url) as node_a, opened(volatile_server.url) as node_b:
        for i in range(3):
            await node_b.events.append("room:9", "e", {"i": i}, now=T0)
        got = Collector()
        feed = node_a.events.live(got.append)
        async with anyio.create_task_group() as tg:
            await tg.start(_run_feed, feed)
            feed.watch("room:9")
            history = await node_a.events.read("room:9", after=0, limit=100)
            # appended by another node before this feed's reader took its position
            await node_b.events.append("room:9", "e", {"i": 3}, now=T0)
            with anyio.fail_after(10):
                await got.wait_for(1)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert history.head == 3
        assert [e.offset for e in got] == [4]


class _Tally(msgspec.Struct):
    n: int = 0

    def apply(self, event: Event) -> None:
        self.n += 1


async def test_redis_killed_while_snapshots_are_written_fails_requests_not_the_node(
    volatile_server: RedisServer,
) -> None:
    """Proves "a backend outage fails requests, not the node" against a real Redis
    killed while snapshot writes are in flight (no waiting for them first).

    A stateful stream stores a snapshot after EVERY event (``snapshot_every=1``).
    The first snapshot writes are held back until Redis has been killed (a gate
    in front of the real ``put``), so they certainly meet the dead server, as a
    write on the wire at the moment of ``kill -9`` does. Publishes fail
    meanwhile (retryable ``BackendError``); once Redis is back the same node
    publishes again, folds the new epoch from 1 and stores a snapshot of it.

    Mutation: engine/node.py ``_store_snapshot`` without its ``try/except`` (the
    bug fixed in "A backend outage fails requests, not the node") → the node's
    task group dies with the snapshot write's error: fails.
    """
    app = rtcore.App()
    app.state("tally:*", _Tally, snapshot_every=1)
    async with rtcore.Node(app, volatile_server.url, node_id="n1", roles=frozenset({"api"})) as node:
        old = await node.state_of("tally:1")
        killed = anyio.Event()
        real_put = node.backend.snapshots.put
        in_flight: list[int] = []
        finished: list[int] = []

        async def put_once_redis_is_dead(snapshot: Snapshot) -> None:
            in_flight.append(snapshot.offset)
            try:
                await killed.wait()
                await real_put(snapshot)
            finally:
                finished.append(snapshot.offset)

        node.backend.snapshots.put = put_once_redis_is_dead  # type: ignore[method-assign]
        for i in range(5):
            await node.publish("tally:1", "add", i)
        with anyio.fail_after(10):
            while len(in_flight) < 5:
                await anyio.sleep(0.01)
        volatile_server.kill()
        killed.set()
        with anyio.fail_after(30):
            while len(finished) < len(in_flight):  # every held write met the dead server
                await anyio.sleep(0.01)
        node.backend.snapshots.put = real_put  # type: ignore[method-assign]
        with pytest.raises(BackendError) as exc:
            await node.publish("tally:1", "add", "lost")
        assert exc.value.retryable

        await anyio.to_thread.run_sync(volatile_server.start)
        first = await retrying(lambda: node.publish("tally:1", "add", "back"))
        assert first.epoch != old.epoch and first.offset == 1
        await node.publish("tally:1", "add", "again")
        with anyio.fail_after(10):
            while True:  # the follower moves to the new epoch and its snapshot lands
                st = await node.state_of("tally:1")
                snap = await retrying(lambda: node.backend.snapshots.get("tally:1"))
                if st.epoch == first.epoch and snap is not None and snap.epoch == first.epoch and snap.offset >= 2:
                    break
                await anyio.sleep(0.02)
        assert st.offset == 2 and msgspec.structs.asdict(st.state) == {"n": 2}
        assert sorted(finished) == [1, 2, 3, 4, 5]


async def test_scripts_run_on_the_first_try_after_a_redis_restart(volatile_server: RedisServer) -> None:
    """Proves: after Redis restarts (and forgets every loaded Lua script), each
    script-backed store call works again without the caller ever seeing
    ``NOSCRIPT``. Dead pooled connections may fail a call (a connection error the
    caller retries); a ``NoScriptError`` must never reach it.

    The restart is real; what a pooled connection that died with the old server
    does to the first ``SCRIPT LOAD`` (coredis's own NOSCRIPT retry loads on it,
    fails, and swallows that) is injected: the first load after each restart
    fails with a connection error.

    Mutations:
      * redis.py ``_Pipeliner._send`` re-raises ``NoScriptError`` at once
        instead of loading the batch script and resending → ``BackendError``
        from ``NoScriptError``: fails.
      * redis.py ``RedisGroupLog.claim`` without its ``StreamConsumerGroupError``
        branch (found by this test: coredis rewords NOGROUP, so a group Redis lost
        made every claim fail instead of returning ``[]``) → fails.
    """
    async with opened(volatile_server.url) as b:
        client: Any = b.client  # type: ignore[attr-defined]
        await b.events.append("s:1", "e", {}, now=T0)
        assert b.groups is not None
        await b.groups.create("g")

        for round_ in range(3):  # several restarts: every script is lost each time
            await anyio.to_thread.run_sync(volatile_server.restart)
            _fail_next_script_load(client)
            for call in _script_calls(b, round_):
                await _without_noscript(call)


def _fail_next_script_load(client: Any) -> None:
    real = client.script_load

    async def dead_connection_once(script: Any) -> Any:
        client.script_load = real
        raise coredis.exceptions.ConnectionError("a pooled connection that died with the old server")

    client.script_load = dead_connection_once


def _script_calls(b: Backend, r: int) -> list[Callable[[], Awaitable[object]]]:
    """One call of every Lua script the Redis stores run."""
    return [
        lambda: b.events.append("s:1", "e", {"r": r}, now=T0),
        lambda: b.events.read("s:1", after=0, limit=10),
        lambda: b.events.trim("s:1", Retention(max_events=100), now=T0),
        lambda: b.idempotency.begin("p", f"k{r}", b"fp", now=T0, lease=60),
        lambda: b.idempotency.finish("p", f"k{r}", Outcome(True, 1), now=T0, ttl=60),
        lambda: b.idempotency.release("p", "gone"),
        lambda: b.cursors.advance("alice", "s:1", "e1", r + 1, now=T0, ttl=60),
        lambda: b.snapshots.put(Snapshot("s:1", "e1", r + 2, b"\x80", "c")),
        lambda: b.leases.acquire("l", "n1", now=T0, ttl=10),
        lambda: b.leases.release("l", "n1"),
        lambda: b.groups.claim("g", "c", min_idle=0, now=T0, count=1) if b.groups else anyio.lowlevel.checkpoint(),
    ]


async def _without_noscript(op: Callable[[], Awaitable[T]]) -> T:
    """Run ``op``, retrying only connection failures (dead pooled connections after a restart)."""
    with anyio.fail_after(30):
        while True:
            try:
                return await op()
            except BackendError as exc:
                if not isinstance(exc.__cause__, (coredis.exceptions.ConnectionError, TimeoutError, OSError)):
                    raise  # NOSCRIPT or anything else that is not a dead connection reached the caller
                await anyio.sleep(0.05)

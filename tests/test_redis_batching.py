"""Batched script calls on ``redis://``: one round trip for many, each call still atomic.

Concurrent store calls of one node go to Redis as one ``EVALSHA`` of the batch
script (see ``_Pipeliner`` in :mod:`rtcore.backends.redis`). These tests pin
what must not change with that: the idempotency check and the append (and the
claim of a command key) are one atomic step even across nodes, stored
outcomes keep their TTL, one call's error stays its own, and a Redis that
forgot its scripts is reloaded transparently.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtcore
from rtcore.backends import Backend, Outcome, Snapshot, open_backend
from rtcore.backends import redis as redis_backend
from rtcore.errors import BackendError
from tests.redis_server import RedisServer, redis_server_binary, require_services

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
    ),
]

T0 = 1_700_000_000.0


def _fresh(prefix: str) -> str:
    """A name no other test (or loop parametrisation) on the shared server uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        if require_services():
            pytest.fail("redis-server is not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    with RedisServer(persistent=False) as s:
        yield s


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Backend]:
    b = await open_backend(url)
    try:
        yield b
    finally:
        await b.aclose()


def _client(b: Backend) -> Any:
    return b.client  # type: ignore[attr-defined]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.sampled_from("abcde"), st.booleans()), min_size=2, max_size=40))
def test_same_key_from_two_nodes_is_appended_once(server: RedisServer, loop: str, plan: list[tuple[str, bool]]) -> None:
    """Proves: appends with repeated keys, sent concurrently from two nodes
    (two clients, so two independent batch streams), append each key once:
    the stream holds one event per distinct key and every append of a key
    returned that event's offset.

    Mutation: split the check and the append into two calls (``append`` asks
    ``HGET`` of the key index first and the script no longer checks it) ->
    Hypothesis finds a plan where both nodes append the same key.
    """
    stream = _fresh("dup:")

    async def main() -> None:
        async with opened(server.url) as one, opened(server.url) as two:
            got: dict[str, set[int]] = {}

            async def append(b: Backend, key: str) -> None:
                res = await b.events.append(stream, "n", {"k": key}, now=T0, key=key)
                got.setdefault(key, set()).add(res.event.offset)

            async with anyio.create_task_group() as tg:
                for key, on_two in plan:
                    tg.start_soon(append, two if on_two else one, key)
            page = await one.events.read(stream, after=0, limit=100)
            assert sorted(e.key for e in page.events if e.key) == sorted(got)
            assert all(len(offsets) == 1 for offsets in got.values())
            assert {e.key: e.offset for e in page.events} == {k: next(iter(v)) for k, v in got.items()}

    anyio.run(main, backend=loop)


@pytest.mark.anyio
async def test_same_command_key_is_claimed_once_across_two_nodes(server: RedisServer) -> None:
    """Proves: 20 concurrent claims of one idempotency key from two nodes give
    the key to exactly one of them; the others get the pending record.

    Mutation: split ``begin`` into a read of the record (``HGET``) and the
    claiming script without its own check -> several claims succeed.
    """
    key = _fresh("claim-")
    async with opened(server.url) as one, opened(server.url) as two:
        claims: list[Any] = []

        async def begin(b: Backend) -> None:
            claims.append(await b.idempotency.begin("p:x", key, b"fp", now=T0, lease=60))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(begin, one if i % 2 else two)
        assert claims.count(None) == 1
        assert all(c.state == "pending" for c in claims if c is not None)


app = rtcore.App("redis-batching")
runs: list[int] = []


@app.command("pub")
async def pub(ctx: rtcore.Context, args: dict[str, Any]) -> int:
    runs.append(args["n"])
    return (await ctx.publish("orders:7", "placed", args)).offset


@pytest.mark.anyio
async def test_keyed_command_sent_to_two_nodes_at_once_runs_once(server: RedisServer) -> None:
    """Proves: one keyed command dispatched 10 times on each of two nodes
    sharing Redis, all at once, runs its handler once and appends one event;
    every other reply is ``idempotency_in_progress`` or the stored outcome.

    Mutation: make ``_IDEM_BEGIN`` claim without looking at the existing
    record -> the handler runs on both nodes and this test fails.
    """
    runs.clear()
    url = server.url
    key = _fresh("two-nodes-")
    async with rtcore.Node(app, url) as a, rtcore.Node(app, url) as b:
        await a.backend.client.delete(["rt:{orders:7}:m", "rt:{orders:7}:l", "rt:{orders:7}:k"])  # type: ignore[attr-defined]
        replies: list[Any] = []

        async def send(node: rtcore.Node) -> None:
            replies.append(await node.dispatch(None, "pub", {"n": 1}, key=key))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(send, a if i % 2 else b)
        assert runs == [1]
        assert all(r.ok or r.code == "idempotency_in_progress" for r in replies)
        assert (await a.backend.events.info("orders:7")).head == 1
        again = await b.dispatch(None, "pub", {"n": 1}, key=key)
        assert again.ok and again.replayed and again.result == 1


@pytest.mark.anyio
async def test_outcome_keeps_its_ttl_when_batched(server: RedisServer) -> None:
    """Proves: outcomes stored by concurrent ``finish`` calls (one batch) keep
    the TTL rules: the record expires at ``now + ttl`` on the caller's clock
    (a claim after that succeeds, one before it gets the record) and Redis
    collects it after ``ttl`` plus the grace period.

    Mutation: drop the ``PEXPIRE`` from ``_IDEM_FINISH`` -> the key never
    expires (PTTL -1) and this test fails.
    """
    async with opened(server.url) as b:
        keys = [_fresh(f"ttl-{i}-") for i in range(20)]
        async with anyio.create_task_group() as tg:
            for k in keys:
                tg.start_soon(
                    lambda k=k: b.idempotency.finish("p:t", k, Outcome(True, k), now=T0, ttl=100, fingerprint=b"f")
                )
        for k in keys:
            pttl = await _client(b).pttl(redis_backend._pair_key("idem", "p:t", k))
            assert 99_000 < pttl <= 100_000 + redis_backend._GRACE_MS
        rec = await b.idempotency.begin("p:t", keys[0], b"f", now=T0 + 99.9, lease=5)
        assert rec is not None and rec.state == "done" and rec.outcome == Outcome(True, keys[0])
        assert await b.idempotency.begin("p:t", keys[1], b"f", now=T0 + 100.1, lease=5) is None


@pytest.mark.anyio
async def test_script_flush_under_load_reloads_transparently(server: RedisServer) -> None:
    """Proves: ``SCRIPT FLUSH`` (what a Redis restart does to scripts) while
    calls are queued makes no caller see ``NOSCRIPT``: the batch did not run,
    so it is loaded again and resent, and every append lands once.

    Mutation: in ``_Pipeliner._send`` re-raise ``NoScriptError`` at once
    instead of loading the script -> the appends fail with BackendError.
    """
    stream = _fresh("flush:")
    async with opened(server.url) as b, opened(server.url) as admin:
        offsets: list[int] = []

        async def append(i: int) -> None:
            offsets.append((await b.events.append(stream, "n", {}, now=T0, key=f"f{i}")).event.offset)

        for wave in range(3):
            await _client(admin).script_flush()
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(append, wave * 50 + i)
        assert sorted(offsets) == list(range(1, 151))
        assert (await b.events.info(stream)).head == 150


@pytest.mark.anyio
async def test_one_failing_call_fails_alone_and_batches_share_round_trips(server: RedisServer) -> None:
    """Proves: a call that errors inside a batch (its key holds the wrong
    type) fails with ``BackendError`` while the 48 calls batched behind it
    succeed, and 50 concurrent calls take far fewer than 50 round trips.

    Mutation: in ``_Pipeliner._send`` raise the call's error (failing the
    batch) instead of storing it on the call -> the 48 good calls fail too
    and this test fails.
    """
    async with opened(server.url) as b:
        run = _fresh("ok-")
        bad = redis_backend._pair_key("idem", "p:w", "wrong")
        await _client(b).set(bad, "a string, not a hash")
        pipeliner = redis_backend._pipeliner_for(_client(b))
        before = pipeliner.batches.batches
        results: list[object] = []

        # Queue in a fixed order: a lone first call goes out at once and is held
        # in flight (its EVALSHA waits for ``gate``), so the bad call heads the
        # next batch with 48 good ones behind it. Each task queues its call
        # before its first checkpoint, then lets the next one start.
        keys = [f"{run}-first", "wrong", *(f"{run}-{i}" for i in range(48))]
        turns = [anyio.Event() for _ in keys]
        turns[0].set()
        gate = anyio.Event()
        assert pipeliner.link is not None  # a plain redis:// URL: batches go on the raw link
        link: redis_backend._RawLink = pipeliner.link

        class HeldLink:
            async def run_batch(self, blob: bytes) -> Any:
                pipeliner.link = link
                await gate.wait()
                return await link.run_batch(blob)

        pipeliner.link = HeldLink()  # type: ignore[assignment]

        async def begin(i: int) -> None:
            await turns[i].wait()
            if i + 1 < len(turns):
                turns[i + 1].set()
            try:
                results.append(await b.idempotency.begin("p:w", keys[i], b"f", now=T0, lease=5))
            except BackendError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(len(keys)):
                tg.start_soon(begin, i)
            while sum(len(batch.jobs) for batch in pipeliner.batches._waiting) < len(keys) - 1:
                await anyio.sleep(0.01)
            gate.set()
        errors = [r for r in results if isinstance(r, BackendError)]
        assert len(errors) == 1 and "WRONGTYPE" in str(errors[0])
        assert results.count(None) == 49
        assert pipeliner.batches.batches - before == 2
        assert isinstance(errors[0].__cause__, coredis.exceptions.ResponseError)


@pytest.mark.anyio
async def test_arguments_of_every_length_reach_the_scripts_byte_for_byte(server: RedisServer) -> None:
    """Proves: the batch's one MessagePack argument carries every byte string
    (event payloads, snapshot states, fingerprints) and text to the scripts
    unchanged, at each length where the str header changes (0, 31/32, 255/256,
    65535/65536 bytes) and for bytes that are not UTF-8, batched together.

    Mutations seen caught: in ``_lua_arg`` give lengths 32-255 the fixstr
    header (``n < 0x100`` for ``n < 32``) -> Redis refuses the batch's
    argument and this test fails; send bytes as MessagePack bin (return
    ``data`` unwrapped) -> cmsgpack refuses it and this test fails.
    """
    sizes = [0, 1, 31, 32, 255, 256, 65535, 65536, 100_000]
    states = {n: bytes((i * 7 + n) % 256 for i in range(n)) for n in sizes}
    texts = {n: "é" * (n // 2) + "x" * (n % 2) for n in sizes}
    run = _fresh("len-")
    async with opened(server.url) as b:
        async with anyio.create_task_group() as tg:
            for n in sizes:
                snap = Snapshot(f"{run}:{n}", "e1", n + 1, states[n], "c")
                tg.start_soon(b.snapshots.put, snap)
                tg.start_soon(functools.partial(b.events.append, f"{run}:{n}", "t", texts[n], now=T0))
        for n in sizes:
            got = await b.snapshots.get(f"{run}:{n}")
            assert got is not None and got.state == states[n] and got.offset == n + 1
            page = await b.events.read(f"{run}:{n}", after=0, limit=5)
            assert [e.data for e in page.events] == [texts[n]]


def test_pexpire_text_is_the_px_of_its_ttl_and_its_cache_stays_bounded() -> None:
    """Proves: the cached PEXPIRE argument of the idempotency writes equals
    ``str(_px(ttl))`` for every ttl, and the cache keeps at most 64 of them
    (a node whose clock or TTLs vary must not grow it without bound).

    Mutations caught: drop the 64-entry bound (the cache grows to 500
    entries) -> fails; cache ``_px`` of a rounded ttl -> a text differs.
    """
    redis_backend._PX_TEXT.clear()
    ttls = [0.0, 0.0004, 0.001, 1.5, 60.0, 86400.0] + [i / 7 for i in range(500)]
    for ttl in ttls:
        assert redis_backend._px_text(ttl) == str(redis_backend._px(ttl))
        assert redis_backend._px_text(ttl) == str(redis_backend._px(ttl))  # cached or not, the same
    assert len(redis_backend._PX_TEXT) == 64


@pytest.mark.anyio
async def test_a_batch_that_timed_out_never_answers_the_next_one(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: when a batch gets no reply in time (Redis paused), its
    connection is dropped, so the late reply is never read as the reply of
    the next batch: the next append gets its own offset and epoch.

    Mutation seen caught: in ``_RawLink._request`` skip ``self._drop()`` when
    the request was interrupted -> the second append returns the first
    append's late reply (offset 1 of the other stream) and this test fails.
    """
    monkeypatch.setattr(redis_backend, "_CALL_TIMEOUT", 0.3)
    a, b_stream = _fresh("late-a:"), _fresh("late-b:")
    async with opened(server.url) as b, opened(server.url) as admin:
        for i in range(4):
            await b.events.append(b_stream, "n", i, now=T0)
        # Every client but the one pausing waits ~1 s before its next command runs.
        await _client(admin).client_pause(1000)
        with pytest.raises(BackendError):
            await b.events.append(a, "n", "late", now=T0)
        await anyio.sleep(1.2)  # the paused append runs now; its reply goes to a closed connection
        got = await b.events.append(b_stream, "n", 4, now=T0)
        info_b = await b.events.info(b_stream)
        assert got.event.offset == 5 and got.event.stream == b_stream and got.event.epoch == info_b.epoch


def test_replies_split_anywhere_parse_like_whole_ones() -> None:
    """Proves: the raw link's reply parser gives the same value whether a
    reply arrives whole or one byte at a time (a reply may span many reads).

    Mutation seen caught: in ``_RawLink._parse`` drop ``self._pos = pos``
    after opening an array -> a reply split inside an array is parsed with
    the array opened twice and this test fails.
    """
    reply = (
        b"*3\r\n*2\r\n:1\r\n*3\r\n$2\r\nok\r\n$1\r\n7\r\n$12\r\nabcdef012345\r\n"
        b"*2\r\n:1\r\n$-1\r\n*2\r\n:0\r\n$9\r\nWRONGTYPE\r\n"
    )
    want = [[1, [b"ok", b"7", b"abcdef012345"]], [1, None], [0, b"WRONGTYPE"]]

    class Chunks:
        def __init__(self, data: bytes, size: int) -> None:
            self.parts = [data[i : i + size] for i in range(0, len(data), size)]

        async def receive(self) -> bytes:
            return self.parts.pop(0)

    async def parse(size: int) -> Any:
        link = redis_backend._RawLink("127.0.0.1", 1, 0, None, None)
        chunks = Chunks(reply, size)
        got = await link._read(chunks)  # type: ignore[arg-type]
        assert not chunks.parts and not link._buf
        return got

    for size in (1, 2, 3, 5, 7, len(reply)):
        assert anyio.run(parse, size) == want, size


def test_only_plain_urls_take_the_raw_link() -> None:
    """Proves: the raw link reads host, port, database and credentials from a
    plain ``redis://`` URL and declines every URL it cannot honour (TLS, unix
    sockets, options), which stay on coredis.

    Mutation seen caught: in ``_RawLink.from_url`` drop the ``parts.query``
    check -> a URL with options gets the raw link and this test fails.
    """
    link = redis_backend._RawLink.from_url("redis://us%3Aer:p%40ss@example.org:7000/3")
    assert link is not None
    assert (link._host, link._port, link._db, link._username, link._password) == ("example.org", 7000, 3, "us:er", "p@ss")
    plain = redis_backend._RawLink.from_url("redis://localhost")
    assert plain is not None and (plain._port, plain._db, plain._password) == (6379, 0, None)
    for url in ("rediss://h:1/0", "unix:///tmp/r.sock", "redis://h:1/0?protocol_version=2", "redis://h:1/db"):
        assert redis_backend._RawLink.from_url(url) is None, url


@pytest.mark.anyio
async def test_both_request_paths_run_batches_alike(server: RedisServer) -> None:
    """Proves: batches give the same results on the raw link (database
    selected from the URL) and on coredis (URLs the link declines): a fresh
    append, a duplicate key, a claim and a failing call, each its own reply.

    Mutations seen caught: in ``_RawLink._connect`` skip ``SELECT`` -> the
    events land in database 0 and this test fails; in ``_Pipeliner._send``
    read the status byte of a good call as an error (``status == 48``) ->
    every call fails on both paths.
    """
    url = server.url.rsplit("/", 1)[0] + "/5"
    for raw in (True, False):
        stream = _fresh("paths:")
        async with opened(url) as b:
            pipeliner = redis_backend._pipeliner_for(_client(b))
            assert pipeliner.link is not None
            if not raw:
                pipeliner.link = None  # what a URL the link declines runs
            bad = redis_backend._pair_key("idem", "p:x", "wrong")
            await _client(b).set(bad, "a string, not a hash")
            results: dict[str, Any] = {}

            async def run(name: str, call: Any, results: dict[str, Any] = results) -> None:
                try:
                    results[name] = await call()
                except BackendError as exc:
                    results[name] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "first", functools.partial(b.events.append, stream, "n", 1, now=T0, key="k"))
                tg.start_soon(run, "claim", functools.partial(b.idempotency.begin, "p:x", f"{stream}-c", b"f", now=T0, lease=5))
                tg.start_soon(run, "bad", functools.partial(b.idempotency.begin, "p:x", "wrong", b"f", now=T0, lease=5))
                tg.start_soon(run, "second", functools.partial(b.events.append, stream, "n", 2, now=T0, key="k2"))
            again = await b.events.append(stream, "n", 1, now=T0, key="k")
            first, second = results["first"].event, results["second"].event
            assert {first.offset, second.offset} == {1, 2}  # trio starts tasks in its own order
            assert again.duplicate and again.event.offset == first.offset and again.event.data == 1
            assert results["claim"] is None
            assert isinstance(results["bad"], BackendError) and "WRONGTYPE" in str(results["bad"])
            assert await _client(b).exists([f"rt:{{{stream}}}:m"]) == 1
        async with opened(server.url.rsplit("/", 1)[0] + "/0") as b0:
            assert await _client(b0).exists([f"rt:{{{stream}}}:m"]) == 0, raw


@pytest.mark.anyio
async def test_the_first_batch_after_a_redis_restart_goes_on_a_fresh_connection() -> None:
    """Proves: when Redis restarts while the raw link sits idle, the next batch
    is not sent on the dead connection (where it would fail although Redis is
    back) but on a new one: the append right after the restart succeeds.
    Without it a node's first request after a Redis restart failed, and a
    stateful stream's resync to the new epoch that made it was never retried
    (``tests/multinode/test_redis_crash.py``'s no-persistence test hung).

    Mutation seen caught: ``_idle_link_alive`` always returns True → the
    append raises ``BackendError`` (connection lost) → fails.
    """
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(persistent=False) as server:
        stream = _fresh("restart:")
        async with opened(server.url) as b:
            first = await b.events.append(stream, "n", 1, now=T0)
            await anyio.to_thread.run_sync(server.restart)  # kill -9, start empty on the same port
            await anyio.sleep(0.05)  # the FIN of the killed server reaches the idle link
            again = await b.events.append(stream, "n", 2, now=T0)
        assert again.event.offset == 1 and again.event.epoch != first.event.epoch  # a new life, as it must be

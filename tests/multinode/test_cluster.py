"""Three server processes on one Redis behave as one server, and survive losing one.

Real processes (two ``rtcore serve``, one ``python -c`` + :func:`rtcore.run`),
one private redis-server with AOF + ``appendfsync always``, real sockets.
Subscribers are raw protocol clients (``websockets``) and :mod:`rtcore.client`
instances behind a failover TCP proxy (what a load balancer does).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import rtcore
import rtcore.client
from rtcore.protocol.frames import Evt

from .procs import (
    TIMEOUT,
    Commander,
    FailoverProxy,
    RawSubscriber,
    ServerProcess,
    assert_alive,
    private_redis,
    processes,
    wait_until,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the nodes are subprocesses running asyncio; a trio run would repeat the same servers"),
]

PHASE = 90  # commands per phase


def rotated(items: list[Any], start: int) -> list[Any]:
    return items[start:] + items[:start]


class ClientSubscriber:
    """An :mod:`rtcore.client` subscriber; ``items`` is what its application pulled."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.items: list[Any] = []
        self.client: rtcore.client.Client | None = None
        self.subscribed = anyio.Event()

    @property
    def offset(self) -> int:
        evts = [i for i in self.items if isinstance(i, Evt)]
        return evts[-1].offset if evts else 0

    async def run(self) -> None:
        async with rtcore.client.connect(self.url, backoff_base=0.05, backoff_max=0.3, connect_timeout=5.0) as client:
            self.client = client
            sub = await client.subscribe(self.stream, since=rtcore.Position("", 0))
            self.subscribed.set()
            async for item in sub:
                self.items.append(item)


async def _send_phase(commanders: list[Commander], stream: str, start: int, count: int) -> None:
    """Command ``i`` goes to process ``i % 3``, alternating WebSocket and HTTP; each commander runs its share in order."""
    shares: list[list[int]] = [[] for _ in commanders]
    for i in range(start, start + count):
        shares[(i % 3) * 2 + (i // 3) % 2].append(i)

    async def work(c: Commander, items: list[int]) -> None:
        for i in items:
            await c.put(stream, i)

    async with anyio.create_task_group() as tg:
        for c, items in zip(commanders, shares, strict=True):
            tg.start_soon(work, c, items)


async def test_three_processes_same_order_then_kill_9_one(tmp_path: Path) -> None:
    """Proves: with three processes on one Redis, commands accepted by any process
    (WebSocket or HTTP, several in flight) reach every subscriber of every process
    as one sequence: offsets 1..N dense, same event at each offset, each command's
    ``ok`` offset holding that command's event. After ``kill -9`` of one process,
    its clients (raw ``websockets`` and :mod:`rtcore.client`) resume on another
    process with ``since`` and their application sees every offset exactly once;
    commands that were in flight on the dead process are retried elsewhere with
    their keys and take effect once."""
    stream = "room:cluster"
    with private_redis(persistent=True) as redis:
        servers = [
            # The victim: its idempotency lease is short so a command it died
            # executing can be retried within the test (the default is 60 s).
            ServerProcess(redis.url, tmp_path, "p0", cli=False, run_options={"idempotency_lease": 2.0}),
            ServerProcess(redis.url, tmp_path, "p1"),
            ServerProcess(redis.url, tmp_path, "p2"),
        ]
        async with processes(*servers), httpx.AsyncClient(timeout=TIMEOUT) as http:
            ports = [s.port for s in servers]
            raws = [RawSubscriber(rotated(servers, i), stream, name=f"raw{i}") for i in range(3)]
            commanders = [
                Commander(rotated(servers, p), transport, http, prefix=f"p{p}{transport}")
                for p in range(3)
                for transport in ("ws", "http")
            ]
            async with anyio.create_task_group() as tg, FailoverProxy.running(rotated(ports, 0)) as proxy0:
                async with FailoverProxy.running(rotated(ports, 1)) as proxy1, FailoverProxy.running(rotated(ports, 2)) as proxy2:
                    clients = [ClientSubscriber(f"ws://127.0.0.1:{p.port}/v1/ws", stream) for p in (proxy0, proxy1, proxy2)]
                    for r in raws:
                        tg.start_soon(r.run)
                    for c in clients:
                        tg.start_soon(c.run)
                    with anyio.fail_after(TIMEOUT):
                        for waiter in [*raws, *clients]:
                            await waiter.subscribed.wait()

                    # Phase 1: all three processes accept commands.
                    await _send_phase(commanders, stream, 0, PHASE)
                    await wait_until(
                        lambda: all(r.offset >= PHASE for r in raws) and all(c.offset >= PHASE for c in clients),
                        what="phase 1 events at every subscriber",
                    )

                    # Phase 2: kill -9 p0 while commands are flowing.
                    async def kill_p0() -> None:
                        await wait_until(lambda: sum(len(c.acked) for c in commanders) >= PHASE + PHASE // 4, what="phase 2 traffic")
                        servers[0].kill()

                    async with anyio.create_task_group() as phase2:
                        phase2.start_soon(kill_p0)
                        await _send_phase(commanders, stream, PHASE, PHASE)
                    total = 2 * PHASE
                    await wait_until(
                        lambda: all(r.offset >= total for r in raws) and all(c.offset >= total for c in clients),
                        what="every event at every subscriber after the kill",
                    )
                    tg.cancel_scope.cancel()
            for c in commanders:
                await c.aclose()
            assert_alive(servers[1:])

    # Every command acknowledged, once, at the offset its ok reported.
    acked: dict[int, int] = {}
    for c in commanders:
        acked.update(c.acked)
    assert sorted(acked) == list(range(total))
    assert sorted(acked.values()) == list(range(1, total + 1)), "two commands share an offset, or one is missing"
    by_offset = {offset: i for i, offset in acked.items()}

    # Raw subscribers: exactly offsets 1..total, no duplicate or gap on the wire, one epoch.
    for r in raws:
        assert r.gaps == 0 and r.dups == 0, (r.name, r.gaps, r.dups)
        assert r.offsets() == list(range(1, total + 1)), r.name
        assert [e["data"]["i"] for e in r.events] == [by_offset[o] for o in r.offsets()], r.name
        assert len({e["epoch"] for e in r.events}) == 1
        subbeds = [f for f in r.frames if f["t"] == "subbed"]
        assert all(f["recovered"] for f in subbeds), subbeds
    assert raws[0].servers_used[0] == ports[0] and len(raws[0].servers_used) >= 2, "raw0 did not fail over"
    assert ports[0] not in raws[0].servers_used[1:]
    assert len(raws[1].servers_used) == 1 and len(raws[2].servers_used) == 1

    # rtcore.client subscribers: the application saw each offset exactly once, in order, nothing missed.
    for c in clients:
        assert all(isinstance(item, Evt) for item in c.items), [i for i in c.items if not isinstance(i, Evt)]
        assert [e.offset for e in c.items] == list(range(1, total + 1))
        assert [e.data["i"] for e in c.items] == [by_offset[o] for o in range(1, total + 1)]
    assert clients[0].client is not None and clients[0].client.reconnects >= 1, "client 0 never reconnected"
    assert proxy0.routes[0] == ports[0] and ports[0] not in proxy0.routes[1:]
    retried = Counter(f for c in commanders for f in c.failures)
    print(f"\ncluster: {total} commands, retried failures: {dict(retried)}")

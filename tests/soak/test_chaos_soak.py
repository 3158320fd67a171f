"""Chaos soak: 200 clients through a faulty network while nodes and Redis are killed.

Three ``rtcore`` processes share one Redis with AOF (``appendfsync always``).
Every client connects through one :class:`~tests.soak.chaos.ChaosProxy`,
which spreads connections over the live nodes and resets, closes, stalls,
delays and splits them at random. Meanwhile a driver kills -9 a random node
every ~20 s (and restarts it) and kills Redis once. The clients:

* 50 commanders (25 over WebSocket, 25 over HTTP) send ``put`` commands with
  idempotency keys, retrying each with its key until it is acknowledged;
* 100 subscribers written on the ``websockets`` library alone, resuming with
  ``since`` after every cut (tests/multinode/procs.py ``RawSubscriber``);
* 50 subscribers on :mod:`rtcore.client`.

At the end (faults off, every node up) it checks, for each of the 10 streams:
offsets are dense from 1; every acknowledged command is at the offset its
``ok`` named, and every command is there exactly once; every subscriber saw
every event exactly once in offset order, under one epoch, and was never told
it missed anything (with AOF nothing may be missed). It prints the fault
counts and the totals checked.

``RTCORE_SOAK_SECONDS`` sets the length (120 in CI; the long form in
docs/security.md runs 1800).

Mutation seen caught (it is how the defect was found): drop the
retryable-resubscription branch in ``ClientSession._on_reply`` → an
:mod:`rtcore.client` subscriber ends with ``backend_unavailable`` while Redis
restarts, and the soak fails.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

import rtcore
import rtcore.client
from rtcore.client import Missed
from rtcore.errors import ConnectionClosed
from rtcore.protocol.frames import Evt
from tests.multinode.procs import (
    TIMEOUT,
    Commander,
    RawSubscriber,
    ServerProcess,
    assert_alive,
    history,
    private_redis,
    processes,
    wait_until,
)

from .chaos import ChaosProxy

SECONDS = float(os.environ.get("RTCORE_SOAK_SECONDS", "120"))

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.slow,
    # The suite's 300 s per-test limit would cut the long form short.
    pytest.mark.timeout(SECONDS + 600),
    pytest.mark.asyncio_only(reason="the nodes are subprocesses running asyncio; a trio run would repeat the same servers"),
]

STREAMS = [f"soak:{k}" for k in range(10)]
COMMANDERS, RAW_SUBS, CLIENT_SUBS = 50, 100, 50
KILL_EVERY = (15.0, 25.0)


@dataclass
class Via:
    """What Commander/RawSubscriber need of a server, pointing at the proxy."""

    proxy: ChaosProxy
    name: str = "proxy"
    alive: bool = True

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.proxy.port}/v1/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


class ClientSub:
    """An rtcore.client subscriber from the start of ``stream``."""

    def __init__(self, url: str, stream: str) -> None:
        self.url, self.stream = url, stream
        self.events: list[Evt] = []
        self.missed: list[Missed] = []
        self.reopened = 0
        self.subscribed = anyio.Event()

    @property
    def offset(self) -> int:
        return self.events[-1].offset if self.events else 0

    async def run(self) -> None:
        while True:
            # rtcore.client reconnects by itself once connected; a first
            # connection cut before ``welcome`` raises, and the application
            # opens a new client from where it got to (as an app would).
            since = rtcore.Position(self.events[-1].epoch, self.events[-1].offset) if self.events else rtcore.Position("", 0)
            try:
                async with rtcore.client.connect(self.url, backoff_base=0.05, backoff_max=0.5) as client:
                    sub = await client.subscribe(self.stream, since=since)
                    self.subscribed.set()
                    async for item in sub:
                        if isinstance(item, Missed):
                            self.missed.append(item)
                        elif isinstance(item, Evt):
                            self.events.append(item)
            except (ConnectionClosed, OSError):
                self.reopened += 1
                await anyio.sleep(0.05)


async def test_chaos_soak(tmp_path: Path) -> None:
    rnd = random.Random(20261130)
    faults: dict[str, int] = {"node kill -9": 0, "redis kill -9": 0}
    with private_redis(persistent=True) as redis:
        servers = [
            ServerProcess(redis.url, tmp_path, f"n{i}", cli=False, run_options={"idempotency_lease": 2.0}) for i in range(3)
        ]
        async with processes(*servers), httpx.AsyncClient(timeout=TIMEOUT) as http:
            async with ChaosProxy.running(lambda: [s.port for s in servers if s.alive], seed=rnd.randrange(1 << 30)) as proxy:
                via = Via(proxy)
                raw = [RawSubscriber([via], STREAMS[k % len(STREAMS)], name=f"raw{k}") for k in range(RAW_SUBS)]  # type: ignore[list-item]
                subs = [ClientSub(via.ws, STREAMS[k % len(STREAMS)]) for k in range(CLIENT_SUBS)]
                commanders = [
                    Commander([via], "ws" if c % 2 == 0 else "http", http, prefix=f"c{c}")  # type: ignore[list-item]
                    for c in range(COMMANDERS)
                ]
                stop = anyio.Event()
                sent: dict[int, str] = {}  # command number -> stream

                async def command_loop(c: int, cmd: Commander) -> None:
                    n = 0
                    while not stop.is_set():
                        i = c * 1_000_000 + n
                        stream = STREAMS[(c + n) % len(STREAMS)]
                        sent[i] = stream
                        await cmd.put(stream, i, deadline=120.0)
                        n += 1
                        await anyio.sleep(rnd.uniform(0.1, 0.5))

                async def chaos_driver() -> None:
                    started = time.monotonic()
                    redis_at = started + SECONDS / 2
                    while time.monotonic() - started < SECONDS:
                        await anyio.sleep(min(rnd.uniform(*KILL_EVERY), max(0.1, SECONDS - (time.monotonic() - started))))
                        if time.monotonic() - started >= SECONDS:
                            break
                        if redis_at and time.monotonic() >= redis_at:
                            redis_at = 0
                            redis.kill()
                            faults["redis kill -9"] += 1
                            await anyio.sleep(0.5)
                            await anyio.to_thread.run_sync(redis.start)
                            continue
                        victim = rnd.choice([s for s in servers if s.alive])
                        victim.kill()
                        faults["node kill -9"] += 1
                        await anyio.sleep(rnd.uniform(0.5, 2.0))
                        await victim.start()
                    stop.set()

                async with anyio.create_task_group() as tg:
                    for r in raw:
                        tg.start_soon(r.run)
                    for s in subs:
                        tg.start_soon(s.run)
                    with anyio.fail_after(60):
                        for r in raw:
                            await r.subscribed.wait()
                        for s in subs:
                            await s.subscribed.wait()
                    async with anyio.create_task_group() as traffic:
                        traffic.start_soon(chaos_driver)
                        for c, cmd in enumerate(commanders):
                            traffic.start_soon(command_loop, c, cmd)
                    # Faults off; every node up; everyone must catch up.
                    proxy.enabled = False
                    for s in servers:
                        if not s.alive:
                            await s.start()
                    heads: dict[str, int] = {}
                    for stream in STREAMS:
                        _, heads[stream], _ = await history(http, servers[0], stream)
                    await wait_until(
                        lambda: all(r.offset >= heads[r.stream] for r in raw) and all(s.offset >= heads[s.stream] for s in subs),
                        timeout=120,
                        what="every subscriber caught up",
                    )
                    tg.cancel_scope.cancel()
                for cmd in commanders:
                    await cmd.aclose()
                counts = dict(proxy.counts)
            assert_alive(servers)
            histories = {stream: await history(http, servers[0], stream) for stream in STREAMS}

    acked: dict[int, int] = {}
    for cmd in commanders:
        acked.update(cmd.acked)
    assert set(acked) == set(sent), f"{len(set(sent) - set(acked))} commands never acknowledged"
    delivered = 0
    for stream, (epoch, head, events) in histories.items():
        assert [e["offset"] for e in events] == list(range(1, head + 1)), f"{stream}: offsets not dense"
        items = [e["data"]["i"] for e in events]
        assert len(items) == len(set(items)), f"{stream}: a command was applied twice"
        assert sorted(items) == sorted(i for i, s in sent.items() if s == stream), f"{stream}: commands missing"
        by_offset = dict(zip((e["offset"] for e in events), items, strict=True))
        assert all(by_offset[acked[i]] == i for i, s in sent.items() if s == stream), f"{stream}: an ok named the wrong offset"
        for r in (r for r in raw if r.stream == stream):
            assert r.gaps == 0 and r.dups == 0, (r.name, r.gaps, r.dups)
            assert r.offsets() == list(range(1, head + 1)), r.name
            assert {e["epoch"] for e in r.events} == {epoch}, f"{r.name}: epoch changed"
            assert [e["data"]["i"] for e in r.events] == items
            delivered += len(r.events)
        for s in (s for s in subs if s.stream == stream):
            assert not s.missed, f"rtcore.client was told it missed events: {s.missed}"
            assert [e.offset for e in s.events] == list(range(1, head + 1))
            assert [e.data["i"] for e in s.events] == items
            assert {e.epoch for e in s.events} == {epoch}
            delivered += len(s.events)
    retries = sum(len(c.failures) for c in commanders)
    print(
        f"\nchaos soak {SECONDS:.0f} s: faults {faults | counts}; commands acknowledged {len(acked)} "
        f"(retried {retries} times), each applied once; events checked at subscribers {delivered} "
        f"over {len(STREAMS)} streams, none missed, none twice"
    )

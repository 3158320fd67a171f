"""Redis paused (SIGSTOP) during traffic through two rtcore processes.

A paused Redis keeps its TCP connections open and answers nothing, which is
harder than a crash: nothing tells the client the server is gone. rtcore must
not hang on it. Proves, with Redis stopped for ``RTCORE_REDIS_PAUSE`` seconds
(10 by default) while four clients send keyed commands (WebSocket and HTTP)
and a subscriber listens on each process:

* commands sent during the pause are answered with a **retryable** error
  (``backend_unavailable`` / ``timeout``), not left hanging: the clients see
  such answers, not only their own timeouts;
* nothing acknowledged is lost and nothing is applied twice: every ``ok``
  offset holds its command, offsets are dense, each command appears once;
* everything recovers by itself after SIGCONT: the same processes (never
  restarted) finish the work, subscribers see 1..N with no gap or duplicate.

Mutation: remove the command timeout of the Redis backend
(``command_timeout`` in ``rtcore.backends.redis``) → the commands hang until
SIGCONT and the "retryable answers during the pause" assertion fails.

A command's answer may wait for at most one Redis timeout (5 s), not two: the
client here waits 10 s. Two mechanisms keep it so, each with its own test:
the calls queued behind a stalled batch fail with it
(``tests/test_batcher.py``), and the release of a failed command's claim does
not hold its answer back (``tests/test_idempotency.py``). Without them a CI
run saw only the clients' own timeouts during the pause.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest

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

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the nodes are subprocesses running asyncio; a trio run would repeat the same servers"),
]

N = 200
PAUSE = float(os.environ.get("RTCORE_REDIS_PAUSE", "10"))


async def test_redis_paused_answers_retryable_errors_and_loses_nothing(tmp_path: Path) -> None:
    stream = "room:paused"
    with private_redis(persistent=True) as redis:
        servers = [
            ServerProcess(redis.url, tmp_path, f"s{i}", cli=False, run_options={"idempotency_lease": 2.0}) for i in range(2)
        ]
        async with processes(*servers), httpx.AsyncClient(timeout=TIMEOUT) as http:
            epoch_before, _, _ = await history(http, servers[0], stream)
            subs = [RawSubscriber([s], stream, name=s.name) for s in servers]
            commanders = [Commander([servers[i % 2]], "ws" if i < 2 else "http", http, prefix=f"p{i}") for i in range(4)]
            paused = anyio.Event()
            resumed = anyio.Event()
            during: list[str] = []

            async def pause_redis() -> None:
                await wait_until(lambda: sum(len(c.acked) for c in commanders) >= N // 4, what="traffic")
                marks = [len(c.failures) for c in commanders]
                assert redis.proc is not None
                redis.proc.send_signal(signal.SIGSTOP)
                paused.set()
                try:
                    await anyio.sleep(PAUSE)
                finally:
                    redis.proc.send_signal(signal.SIGCONT)
                    resumed.set()
                for c, mark in zip(commanders, marks, strict=True):
                    during.extend(c.failures[mark:])

            async def work(c: Commander, items: list[int]) -> None:
                for i in items:
                    await c.put(stream, i, deadline=PAUSE + 60.0)

            async with anyio.create_task_group() as tg:
                for s in subs:
                    tg.start_soon(s.run)
                with anyio.fail_after(TIMEOUT):
                    for s in subs:
                        await s.subscribed.wait()
                async with anyio.create_task_group() as traffic:
                    traffic.start_soon(pause_redis)
                    for k, c in enumerate(commanders):
                        traffic.start_soon(work, c, list(range(k, N, len(commanders))))
                await wait_until(lambda: all(s.offset >= N for s in subs), timeout=60, what="all events at the subscribers")
                tg.cancel_scope.cancel()
            for c in commanders:
                await c.aclose()
            assert_alive(servers)
            epoch_after, head, events = await history(http, servers[1], stream)

    assert paused.is_set() and resumed.is_set()
    codes = [f.split(": ", 1)[1] for f in during]
    retryable = [c for c in codes if c in ("backend_unavailable", "timeout", "in_progress", "unavailable")]
    assert retryable, f"no retryable answer while Redis was paused (only {sorted(set(codes))}): the server hung"
    acked: dict[int, int] = {}
    for c in commanders:
        acked.update(c.acked)
    assert sorted(acked) == list(range(N))
    assert epoch_after == epoch_before
    assert head == N and [e["offset"] for e in events] == list(range(1, N + 1))
    by_offset = {e["offset"]: e["data"]["i"] for e in events}
    assert all(by_offset[off] == i for i, off in acked.items())
    assert sorted(by_offset.values()) == list(range(N))
    for s in subs:
        assert s.gaps == 0 and s.dups == 0, (s.name, s.gaps, s.dups)
        assert s.offsets() == list(range(1, N + 1))
    print(f"\nredis paused {PAUSE:.0f} s: answers during the pause: {sorted(set(codes))} ({len(codes)} in all)")

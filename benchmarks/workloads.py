"""The load client: the three workloads, written once on the ``websockets`` library.

The same code drives rtcore and the peer, so any difference comes from the
servers. Frames are rtcore wire protocol v1 in JSON, encoded and decoded with
msgspec (both servers use msgspec too). Subscribers of the fan-out workload
run in worker processes (:func:`fanout_worker`) so the receiving side has a
core of its own and the publisher's clock is not slowed by 200 readers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

PAYLOAD = "x" * 64  # ~100-byte frames


async def open_conn(url: str, token: str = "bench") -> ClientConnection:
    """Open a connection and complete hello → welcome."""
    ws = await connect(url, subprotocols=["rtcore.v1.json"], compression=None, ping_interval=None, max_queue=4096)
    await ws.send(_encode({"t": "hello", "v": 1, "token": token}).decode())
    welcome = _decode(await ws.recv())
    assert welcome["t"] == "welcome", welcome
    return ws


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- (a) command round trips ----------------------------------------------------------


async def commands(url: str, connections: int, per_connection: int) -> dict[str, float]:
    """``connections`` clients each send ``per_connection`` echo commands, one in flight."""
    conns = [await open_conn(url, f"c{i}") for i in range(connections)]
    latencies: list[float] = []

    async def worker(ws: ClientConnection, count: int, record: bool) -> None:
        for rid in range(1, count + 1):
            frame = _encode({"t": "cmd", "id": rid, "name": "echo", "args": {"p": PAYLOAD}}).decode()
            t0 = time.perf_counter()
            await ws.send(frame)
            while True:
                reply = _decode(await ws.recv())
                if reply.get("id") == rid:
                    break
            if record:
                latencies.append(time.perf_counter() - t0)
            assert reply["t"] == "ok", reply

    await asyncio.gather(*(worker(ws, 20, False) for ws in conns))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(ws, per_connection, True) for ws in conns))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(ws.close() for ws in conns))
    return {
        "cmd_msgs_per_s": len(latencies) / elapsed,
        "cmd_p50_ms": percentile(latencies, 0.5) * 1e3,
        "cmd_p99_ms": percentile(latencies, 0.99) * 1e3,
    }


# --- (b) fan-out ------------------------------------------------------------------------


async def publish(url: str, stream: str, count: int, window: int = 32, stamp: bool = True) -> None:
    """Publish ``count`` events with up to ``window`` commands in flight; wait for every ok."""
    ws = await open_conn(url, "publisher")
    sem = asyncio.Semaphore(window)
    done = asyncio.Event()
    answered = 0

    async def read() -> None:
        nonlocal answered
        while answered < count:
            reply = _decode(await ws.recv())
            if reply.get("t") in ("ok", "err"):
                assert reply["t"] == "ok", reply
                answered += 1
                sem.release()
        done.set()

    reader = asyncio.create_task(read())
    for rid in range(1, count + 1):
        await sem.acquire()
        data = {"t0": time.time() if stamp else 0.0, "p": PAYLOAD[:40]}
        await ws.send(
            _encode({"t": "cmd", "id": rid, "name": "pub", "args": {"stream": stream, "data": data}}).decode()
        )
    await done.wait()
    await reader
    await ws.close()


async def _fanout_subscribers(url: str, stream: str, count: int, events: int, ready: Any) -> dict[str, Any]:
    conns = [await open_conn(url, f"s{i}") for i in range(count)]
    for rid, ws in enumerate(conns, 1):
        await ws.send(_encode({"t": "sub", "id": rid, "stream": stream}).decode())
        reply = _decode(await ws.recv())
        assert reply["t"] == "subbed", reply
    ready.set()
    latencies: list[float] = []
    last = 0.0

    async def receive(ws: ClientConnection) -> None:
        nonlocal last
        got = 0
        while got < events:
            frame = _decode(await ws.recv())
            if frame.get("t") == "evt":
                now = time.time()
                latencies.append(now - frame["data"]["t0"])
                got += 1
                last = max(last, now)

    await asyncio.gather(*(receive(ws) for ws in conns))
    await asyncio.gather(*(ws.close() for ws in conns))
    return {"latencies": latencies, "last": last}


def fanout_worker(url: str, stream: str, count: int, events: int, ready: Any, out: Any) -> None:
    """Process entry point: ``count`` subscribers; puts their latencies on ``out``."""
    out.put(asyncio.run(_fanout_subscribers(url, stream, count, events, ready)))


# --- (c) reconnect and replay ---------------------------------------------------------------


_runs = itertools.count()


async def replay(url: str, missed: int) -> float:
    """Subscribe, disconnect, let ``missed`` events happen, come back with ``since``.

    Returns the seconds from opening the new connection to holding the last
    missed event.
    """
    stream = f"bench:replay-{next(_runs)}-{time.monotonic_ns()}"
    ws = await open_conn(url, "replayer")
    await ws.send(_encode({"t": "sub", "id": 1, "stream": stream}).decode())
    subbed = _decode(await ws.recv())
    since = {"epoch": subbed["epoch"], "offset": subbed["offset"]}
    await ws.close()
    await publish(url, stream, missed, stamp=False)
    t0 = time.perf_counter()
    ws = await open_conn(url, "replayer")
    await ws.send(_encode({"t": "sub", "id": 1, "stream": stream, "since": since}).decode())
    got = 0
    while got < missed:
        frame = _decode(await ws.recv())
        if frame.get("t") == "evt":
            got += 1
            assert frame["offset"] == since["offset"] + got
        elif frame.get("t") == "subbed":
            assert frame["recovered"], frame
    elapsed = time.perf_counter() - t0
    await ws.close()
    return elapsed

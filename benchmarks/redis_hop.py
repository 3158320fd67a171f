"""Publish → receive latency across a Redis hop: two rtcore processes vs one.

Three runs of the same workload, each with fresh server processes:

* ``memory``: one rtcore process on ``memory://``; publisher and subscribers
  connect to it (the baseline: no hop).
* ``redis-1p``: one rtcore process on a private redis-server (the cost of
  Redis itself: the append script and the ``XREAD BLOCK`` live feed).
* ``redis-2p``: publisher on process A, subscribers on process B, both on one
  private redis-server: A appends to Redis, B's live feed reads it and fans
  it out (the distributed path).

The workload: one publisher WebSocket sends ``pub`` commands at a fixed
rate (open loop, several in flight, each carrying its sequence number);
``--subscribers`` WebSocket clients subscribe to the stream. Latency is
client send time → subscriber receive time of the ``evt``, on one clock (all
clients live in this process). The first ``--warmup`` messages are left out.
Clients are the ``websockets`` library, servers are ``rtcore.run`` child
processes; redis-server runs without persistence (see ``--aof``).

Usage::

    python benchmarks/redis_hop.py                      # 2,000 messages at 200/s, 5 subscribers
    python benchmarks/redis_hop.py --messages 5000 --rate 1000 --subscribers 50 --aof
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

import rtcore

ROOT = Path(__file__).resolve().parents[1]
STREAM = "hop:1"

app = rtcore.App("redis-hop")


class Pub(msgspec.Struct):
    seq: int


@app.command("pub")
async def pub(ctx: rtcore.Context, args: Pub) -> int:
    return (await ctx.publish(STREAM, "hop", {"seq": args.seq})).offset


def serve(port: int, backend: str, roles: str) -> None:
    """Child process: serve ``app`` (no command rate limit: we measure the path, not the limiter)."""
    limits = rtcore.Limits(command_rate=1e9, command_burst=1_000_000_000, max_inflight=100_000, max_subscriptions=1000)
    rtcore.run(app, port=port, backend=backend, roles=frozenset(roles.split(",")), grace=0.5, session_limits=limits)


# --- processes ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(aof: bool) -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port, tmp = _free_port(), tempfile.mkdtemp(prefix="rtcore-hop-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "", "--loglevel", "warning"]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _spawn(port: int, backend: str, roles: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), backend, roles],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


@contextlib.asynccontextmanager
async def rtcore_process(backend: str, roles: str = "gateway,api,processor") -> AsyncIterator[int]:
    port = _free_port()
    proc = _spawn(port, backend, roles)
    try:
        async with httpx.AsyncClient(timeout=1.0) as http:
            with anyio.fail_after(30):
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"rtcore server exited with {proc.returncode}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"http://127.0.0.1:{port}/v1/health")).status_code == 200:
                            break
                    await anyio.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the workload ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def session(port: int) -> AsyncIterator[ClientConnection]:
    url = f"ws://127.0.0.1:{port}/v1/ws"
    async with connect(url, subprotocols=[Subprotocol("rtcore.v1.json")], max_queue=None, open_timeout=10) as ws:
        await ws.send('{"t":"hello","v":1}')
        assert json.loads(await ws.recv())["t"] == "welcome"
        yield ws


async def workload(pub_port: int, sub_port: int, args: argparse.Namespace) -> list[float]:
    """Run the workload; return the latencies (seconds) of every (message, subscriber) after warm-up."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    done = anyio.Event()
    remaining = [args.subscribers]

    async def subscriber(ws: ClientConnection, ready: anyio.Event) -> None:
        await ws.send(json.dumps({"t": "sub", "id": 1, "stream": STREAM}))
        got = 0
        while got < args.messages:
            raw = await ws.recv()
            now = time.perf_counter()
            frame = json.loads(raw)
            if frame["t"] == "subbed":
                ready.set()
            elif frame["t"] == "evt":
                seq = frame["data"]["seq"]
                if seq >= args.warmup:
                    latencies.append(now - sent[seq])
                got += 1
        remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(session(sub_port)) for _ in range(args.subscribers)]
        publisher = await stack.enter_async_context(session(pub_port))
        async with anyio.create_task_group() as tg:
            readies = []
            for ws in subs:
                ready = anyio.Event()
                readies.append(ready)
                tg.start_soon(subscriber, ws, ready)
            for ready in readies:
                await ready.wait()

            async def drain_replies() -> None:
                for _ in range(args.messages):
                    frame = json.loads(await publisher.recv())
                    if frame["t"] != "ok":
                        raise RuntimeError(f"pub failed: {frame}")

            tg.start_soon(drain_replies)
            interval = 1.0 / args.rate
            start = time.perf_counter()
            for seq in range(args.messages):
                # Open loop: send on schedule, whatever the replies are doing.
                delay = start + seq * interval - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                sent[seq] = time.perf_counter()
                await publisher.send(json.dumps({"t": "cmd", "id": seq + 1, "name": "pub", "args": {"seq": seq}}))
            with anyio.fail_after(60):
                await done.wait()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[float]] = {}
    async with rtcore_process("memory://") as port:
        results["memory"] = await workload(port, port, args)
    with redis_server(args.aof) as url:
        async with rtcore_process(url) as port:
            results["redis-1p"] = await workload(port, port, args)
    with redis_server(args.aof) as url:
        async with rtcore_process(url, "api,gateway") as a, rtcore_process(url, "gateway") as b:
            results["redis-2p"] = await workload(a, b, args)

    labels = {
        "memory": "one process, memory://",
        "redis-1p": "one process, redis://",
        "redis-2p": "two processes, redis:// (pub on A, subs on B)",
    }
    print(
        f"\n{args.messages} messages at {args.rate:g}/s, {args.subscribers} subscribers, "
        f"{args.warmup} warm-up messages dropped, redis {'AOF always' if args.aof else 'no persistence'}\n"
    )
    print("| path | samples | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")
    for key, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"| {labels[key]} | {len(ms)} | {percentile(ms, 0.5):.2f} | {percentile(ms, 0.99):.2f} | {max(ms):.2f} |")
    base, hop = results["memory"], results["redis-2p"]
    one = results["redis-1p"]
    print(
        f"\nextra latency per hop (two processes on redis vs one process on memory): "
        f"p50 +{(percentile(hop, 0.5) - percentile(base, 0.5)) * 1000:.2f} ms, "
        f"p99 +{(percentile(hop, 0.99) - percentile(base, 0.99)) * 1000:.2f} ms"
        f"\n  of which Redis itself (one process on redis vs memory): "
        f"p50 +{(percentile(one, 0.5) - percentile(base, 0.5)) * 1000:.2f} ms, "
        f"p99 +{(percentile(one, 0.99) - percentile(base, 0.99)) * 1000:.2f} ms"
    )


def cli() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages published (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second (default: %(default)s)")
    parser.add_argument("--subscribers", type=int, default=5, help="subscriber connections (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=200, help="first messages not measured (default: %(default)s)")
    parser.add_argument("--aof", action="store_true", help="redis-server with appendonly yes + appendfsync always")
    args = parser.parse_args()
    if args.warmup >= args.messages:
        parser.error("--warmup must be smaller than --messages")
    anyio.run(main, args)


if __name__ == "__main__":
    cli()

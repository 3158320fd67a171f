"""Where the memory of an idle connection goes: RSS and a tracemalloc breakdown per connection.

Runs :class:`rtcore.Server` (the benchmark app of ``rtcore_server.py``) in this
process and a client subprocess (``wsclient.py``, asyncio) that opens one
warm-up connection, then ``N`` more, each ``hello`` + ``sub`` to one stream,
and holds them. Prints the server's RSS growth per connection (tracemalloc
off) or, with ``--trace``, the bytes still allocated per connection grouped
by the innermost rtcore line that allocated them (``--leaf``: and by the
allocating line itself).

    python benchmarks/conn_memory.py 2000 [--loop asyncio|uvloop|trio] [--trace [--leaf]]

For an A/B against another tree run it twice with ``PYTHONPATH=OTHER/src``
(it prints which rtcore it imported). ``--trace`` slows the server down and
inflates its RSS; read RSS from runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STREAM = "bench:idle"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _client(port: int, n: int) -> None:
    import msgspec
    from wsclient import WSProtocol, open_ws

    conns: list[WSProtocol] = []

    async def one(name: str) -> None:
        ws = await open_ws("127.0.0.1", port)
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        ws.on_message = lambda _ws, m: inbox.put_nowait(m)
        ws.on_close = lambda _ws: None
        for frame, want in (({"t": "hello", "v": 1, "token": name}, "welcome"), ({"t": "sub", "id": 1, "stream": STREAM}, "subbed")):
            ws.send(msgspec.json.encode(frame))
            reply = msgspec.json.decode(await inbox.get())
            if reply["t"] != want:
                raise RuntimeError(f"{frame['t']} refused: {reply}")
        conns.append(ws)

    loop = asyncio.get_running_loop()
    await one("warm")
    print("WARM", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    gate = asyncio.Semaphore(32)

    async def gated(i: int) -> None:
        async with gate:
            await one(f"c{i}")

    await asyncio.gather(*(gated(i) for i in range(n)))
    print("OPEN", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)


def _report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, leaf: bool, top: int) -> None:
    diff = after.compare_to(before, "traceback")
    print(f"traced per connection: {sum(d.size_diff for d in diff) / n:.0f} B")
    groups: dict[tuple[str, str], list[int]] = {}
    for d in diff:
        frames = list(d.traceback)  # oldest first
        own = next((f for f in reversed(frames) if "rtcore" in f.filename), None)
        where = f"{own.filename.split('src/')[-1]}:{own.lineno}" if own else "(no rtcore frame)"
        alloc = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if leaf else ""
        g = groups.setdefault((where, alloc), [0, 0])
        g[0] += d.size_diff
        g[1] += d.count_diff
    for (where, alloc), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{size / n:8.0f} B {count / n:6.2f} blocks  {where:48s} {alloc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=2000, help="connections (default 2,000)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    parser.add_argument("--trace", action="store_true", help="tracemalloc breakdown (slow)")
    parser.add_argument("--leaf", action="store_true", help="with --trace: group by the allocating line too")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.client:
        asyncio.run(_client(opts.client, opts.n))
        return

    import anyio
    from rtcore_server import app

    import rtcore

    print("rtcore from", Path(rtcore.__file__).parent, "on", opts.loop)
    n = opts.n

    async def run() -> None:
        limits = rtcore.Limits(command_rate=1e9, command_burst=10**9, max_inflight=10_000, max_subscriptions=1000)
        server = rtcore.Server(app, port=0, session_limits=limits)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            cmd = [sys.executable, __file__, str(n), "--client", str(port)]
            proc = await anyio.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
            assert proc.stdin is not None and proc.stdout is not None
            buf = b""

            async def expect(word: bytes) -> None:
                nonlocal buf
                while b"\n" not in buf:
                    buf += await proc.stdout.receive()  # type: ignore[union-attr]
                line, buf = buf.split(b"\n", 1)
                if line != word:
                    raise RuntimeError(f"client said {line!r}")

            await expect(b"WARM")
            await anyio.sleep(0.5)
            gc.collect()
            rss0 = rss()
            before: Any = None
            if opts.trace:
                tracemalloc.start(16)
                before = tracemalloc.take_snapshot()
            await proc.stdin.send(b"\n")
            await expect(b"OPEN")
            await anyio.sleep(1.0)
            gc.collect()
            print(f"RSS per connection: {(rss() - rss0) / n / 1024:.2f} kB ({n:,} open)")
            if opts.trace:
                _report(before, tracemalloc.take_snapshot(), n, opts.leaf, opts.top)
                tracemalloc.stop()
            await proc.stdin.send(b"\n")
            await proc.wait()
            await server.stop(0.1)
            tg.cancel_scope.cancel()

    if opts.loop == "uvloop":
        anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(run, backend=opts.loop)


if __name__ == "__main__":
    main()

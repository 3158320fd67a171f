"""Direct messages (``node.send_to``) against the persisted stream they replaced.

Two nodes share a backend: the sender (roles api + processor, like a room
owner on another process) and the recipient's node (gateway), where one
in-process client (``rtcore.testing``) is connected as ``bob``. Each message
is sent, then awaited at the client (closed loop, one at a time), and the
time from the send to the client taking the frame is recorded:

* ``ephemeral``: ``sender.send_to("bob", ...)`` → a ``msg`` frame (the bus:
  in-process on ``memory://``, Redis PUB/SUB on ``redis://``);
* ``stream``: ``sender.publish("roomdm:bob", ...)`` with the retention rooms
  used (100 events, 60 s), the client subscribed → an ``evt`` frame (what
  rooms did before).

``redis://`` uses a private ``redis-server`` without persistence (needs the
binary). Writes ``benchmarks/results/direct-<date>.json``.

Usage::

    python benchmarks/direct.py                 # 2,000 messages per path and backend
    python benchmarks/direct.py --messages 200  # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.redis_server starts the private redis-server

import rtcore  # noqa: E402
from rtcore.backends import open_backend  # noqa: E402
from rtcore.protocol.frames import Msg, Position  # noqa: E402
from rtcore.testing import connect, serve  # noqa: E402

HERE = Path(__file__).resolve().parent
PAYLOAD = {"room": "r1", "type": "note", "data": {"from": "alice", "n": 0, "text": "x" * 40}}


def make_app() -> rtcore.App:
    app = rtcore.App("direct-bench")

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    app.retention("roomdm:*", max_events=100, max_age=60.0)
    return app


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "messages": len(ordered),
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 1),
        "per_second": round(len(ordered) / sum(ordered), 1),
    }


async def run_backend(url: str, messages: int, shared: bool) -> dict[str, Any]:
    app = make_app()
    backend: Any = await open_backend(url) if shared else None
    out: dict[str, Any] = {}
    try:
        async with (
            serve(app, backend if shared else url, node_id="sender", roles=frozenset({"api", "processor"})) as sender,
            serve(app, backend if shared else url, node_id="gateway", roles=frozenset({"gateway"})) as gateway,
            connect(gateway, "bob") as bob,
        ):
            lat: list[float] = []
            for i in range(messages):
                t0 = time.perf_counter()
                await sender.send_to("bob", "note", {**PAYLOAD["data"], "n": i}, room="r1")
                await bob.next_frame(types=(Msg,))
                lat.append(time.perf_counter() - t0)
            out["ephemeral"] = summary(lat)
            await bob.subscribe("roomdm:bob", Position("", 0))
            lat = []
            for i in range(messages):
                t0 = time.perf_counter()
                await sender.publish("roomdm:bob", "msg", {**PAYLOAD, "data": {**PAYLOAD["data"], "n": i}})
                await bob.next_event("roomdm:bob")
                lat.append(time.perf_counter() - t0)
            out["stream"] = summary(lat)
    finally:
        if backend is not None:
            await backend.aclose()
    return out


async def main(opts: argparse.Namespace) -> None:
    report: dict[str, Any] = {
        "benchmark": "direct",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "messages": opts.messages,
        "method": "closed loop, one message at a time; send -> the in-process client took the frame",
        "results": {},
    }
    report["results"]["memory"] = await run_backend("memory://", opts.messages, shared=True)
    from tests.redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        report["results"]["redis"] = "skipped: no redis-server"
    else:
        server = RedisServer(persistent=False)
        server.start()
        try:
            report["results"]["redis"] = await run_backend(f"redis://127.0.0.1:{server.port}/0", opts.messages, shared=False)
        finally:
            server.stop()
    path = HERE / "results" / f"direct-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    anyio.run(main, parser.parse_args())

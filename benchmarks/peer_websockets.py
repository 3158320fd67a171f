"""The peer: the same job as rtcore, written plainly on the ``websockets`` library.

It speaks the subset of rtcore's wire protocol v1 (JSON) the benchmark uses,
so one load client drives both servers unchanged:

* ``hello`` → ``welcome``; ``ping`` → ``pong``; ``ack`` is ignored;
* ``cmd`` ``echo`` → ``ok`` with the args; ``cmd`` ``pub`` appends the event
  to an in-memory list for the stream (offsets 1, 2, ...), broadcasts the
  encoded ``evt`` to the stream's subscribers with ``websockets.broadcast``
  (encode once, write to every socket without awaiting) and answers ``ok``
  with the offset;
* ``sub`` with ``since`` → ``subbed`` then the missed events, then live.

What it leaves out (and rtcore does not): authentication hooks, idempotency
keys, epochs that survive restarts, retention, limits, slow-consumer cuts,
per-connection send queues, msgpack. That is the point of the comparison:
how much those cost.

Run as ``python benchmarks/peer_websockets.py PORT [--uvloop]``; prints
``READY <port> <loop>``. The benchmark runs it on the default asyncio loop
(``--uvloop`` exists for a manual comparison).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
from typing import Any

import msgspec
import websockets
from websockets.asyncio.server import ServerConnection, serve

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

EPOCH = secrets.token_hex(4)
streams: dict[str, list[str]] = {}  # stream -> encoded evt frames, offset n at index n-1
subscribers: dict[str, set[ServerConnection]] = {}


def _reply(frame: dict[str, Any]) -> str:
    return _encode(frame).decode()


def _publish(stream: str, data: Any) -> int:
    log = streams.setdefault(stream, [])
    offset = len(log) + 1
    frame = _reply(
        {
            "t": "evt",
            "stream": stream,
            "epoch": EPOCH,
            "offset": offset,
            "type": "bench",
            "data": data,
            "ts": time.time(),
        }
    )
    log.append(frame)
    # Encoded once; broadcast() writes to every transport synchronously.
    websockets.broadcast(subscribers.get(stream, ()), frame)
    return offset


def _subscribe(ws: ServerConnection, rid: int, stream: str, since: dict[str, Any] | None) -> None:
    log = streams.setdefault(stream, [])
    after = len(log)
    recovered = False
    if since is not None and since.get("epoch") in (EPOCH, "") and 0 <= since.get("offset", -1) <= len(log):
        after, recovered = since["offset"], True
    subbed = {"t": "subbed", "id": rid, "stream": stream, "epoch": EPOCH, "offset": len(log), "recovered": recovered}
    # No await between the replay and joining the live set: nothing is missed
    # or reordered (broadcast() writes synchronously).
    websockets.broadcast([ws], _reply(subbed))
    for frame in log[after:]:
        websockets.broadcast([ws], frame)
    subscribers.setdefault(stream, set()).add(ws)


async def handler(ws: ServerConnection) -> None:
    joined: list[str] = []
    try:
        hello = _decode(await ws.recv())
        if hello.get("t") != "hello":
            await ws.close(1002)
            return
        await ws.send(_reply({"t": "welcome", "session": secrets.token_hex(8), "heartbeat": 15.0, "limits": {}}))
        async for message in ws:
            frame = _decode(message)
            t = frame.get("t")
            if t == "cmd":
                name, args = frame.get("name"), frame.get("args")
                if name == "echo":
                    result = args
                elif name == "pub":
                    result = _publish(args["stream"], args.get("data"))
                else:
                    await ws.send(_reply({"t": "err", "id": frame["id"], "code": "unknown_command", "message": name}))
                    continue
                await ws.send(_reply({"t": "ok", "id": frame["id"], "result": result, "replayed": False}))
            elif t == "sub":
                _subscribe(ws, frame["id"], frame["stream"], frame.get("since"))
                joined.append(frame["stream"])
            elif t == "ping":
                await ws.send(_reply({"t": "pong", "id": frame["id"]}))
    except websockets.ConnectionClosed:
        pass
    finally:
        for stream in joined:
            subscribers.get(stream, set()).discard(ws)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler, "127.0.0.1", port, subprotocols=["rtcore.v1.json"], compression=None, backlog=65535
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print("READY", bound, loop, flush=True)
        await stop


if __name__ == "__main__":
    if "--uvloop" in sys.argv[1:]:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(int(args[0]) if args else 0))

"""The rtcore side of the benchmark: a tiny app served by :class:`rtcore.server.runner.Server`.

Run as ``python benchmarks/rtcore_server.py PORT``; prints ``READY <port>``
once listening. Commands: ``echo`` (returns its args) and ``pub`` (appends
``args.data`` to ``args.stream`` and returns the offset), the same two the
peer server in ``peer_websockets.py`` answers.

The per-connection command rate limit (100/s by default, a production
safety net) is raised: the benchmark measures the transport and the
fan-out, not the limiter.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import anyio
import msgspec

import rtcore
from rtcore.server.runner import Server

app = rtcore.App("bench")


class Pub(msgspec.Struct):
    """Arguments of ``pub``."""

    stream: str
    data: Any = None


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal:
    return rtcore.Principal(token or "anon")


@app.command("echo")
async def echo(ctx: rtcore.Context, args: Any) -> Any:
    return args


@app.command("pub")
async def pub(ctx: rtcore.Context, args: Pub) -> int:
    event = await ctx.publish(args.stream, "bench", args.data)
    return event.offset


async def main(port: int) -> None:
    server = Server(app, port=port, backend="memory://", grace=0.5)
    server.node_options["limits"] = rtcore.Limits(
        command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000
    )
    async with anyio.create_task_group() as tg:
        bound = await tg.start(server.serve)
        print("READY", bound, flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                await server.stop(grace=0.2)
                break


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)

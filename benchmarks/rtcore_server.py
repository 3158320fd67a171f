"""The rtcore side of the benchmark: a tiny app served with :func:`rtcore.run` (public API).

Run as ``python benchmarks/rtcore_server.py [--port P] [--backend URL] [--loop asyncio|uvloop|trio]``;
prints ``READY <port> <loop>`` once listening and serves until SIGTERM/SIGINT
(graceful: ``bye`` + close 1001, exit 0). Commands, the same the peer server in
``peer_websockets.py`` answers (``append`` only here):

* ``echo``: returns its args;
* ``pub``: appends ``args.data`` to ``args.stream`` and returns the offset;
* ``append``: the same as ``pub``; the load client sends it with an
  idempotency key (``cmd.key``), so it measures the idempotency record plus
  the append (the publish of a keyed command is itself idempotent).

``--loop asyncio`` runs asyncio's own event loop (``use_uvloop=False``:
:func:`rtcore.run` would otherwise pick uvloop whenever it is installed, as
it is with the ``bench`` extra, and the "asyncio" column measured uvloop);
``--loop uvloop`` runs uvloop; ``--loop trio`` runs rtcore on trio
(``rtcore.run(anyio_backend="trio")``). The READY line names the loop that
really runs.

The per-connection command rate limit (100/s by default, a production safety
net) is raised: the benchmark measures the server, not the limiter. The idle
timeout is left at its default; the load client sends heartbeats.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import msgspec

import rtcore

app = rtcore.App("bench")


class Pub(msgspec.Struct):
    """Arguments of ``pub`` and ``append``."""

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


@app.command("append")
async def append(ctx: rtcore.Context, args: Pub) -> int:
    event = await ctx.publish(args.stream, "bench", args.data)
    return event.offset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--port", dest="port_opt", type=int, default=None)
    parser.add_argument("--backend", default="memory://")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    opts = parser.parse_args()
    port = opts.port_opt if opts.port_opt is not None else opts.port
    anyio_backend = "trio" if opts.loop == "trio" else "asyncio"

    def ready(bound: int) -> None:
        loop = opts.loop
        if anyio_backend == "asyncio":
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # proves uvloop is in use
        print("READY", bound, loop, flush=True)

    rtcore.run(
        app,
        port=port,
        backend=opts.backend,
        grace=0.5,
        on_ready=ready,
        anyio_backend=anyio_backend,
        use_uvloop=opts.loop == "uvloop",
        session_limits=rtcore.Limits(
            command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000
        ),
    )


if __name__ == "__main__":
    main()

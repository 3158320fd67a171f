"""The application the multi-process tests serve (``rtcore serve`` or ``python -c``).

* ``put`` publishes one event ``{"i": i}`` to ``stream`` and returns its offset:
  the unit every test counts.
* ``tally:*`` streams are stateful (:class:`Tally`), for the "snap after a
  lost history" case.
* A consumer-group processor on ``jobs:*`` writes a side effect to
  ``effects:{stream id}`` carrying the pid of the process that ran it, so a
  test can prove which process runs processors.
"""

from __future__ import annotations

import os

import msgspec

import rtcore

app = rtcore.App("multinode")


class Put(msgspec.Struct):
    stream: str
    i: int


@app.command("put")
async def put(ctx: rtcore.Context, args: Put) -> int:
    event = await ctx.publish(args.stream, "put", {"i": args.i})
    return event.offset


class Tally(msgspec.Struct):
    """Sum of the ``i`` of every event (stateful streams ``tally:*``)."""

    total: int = 0
    count: int = 0

    def apply(self, event: rtcore.Event) -> None:
        self.total += int(event.data["i"])
        self.count += 1


app.state("tally:*", Tally, snapshot_every=10, sync_every=5)


@app.on("jobs:*", group="effects", idle_timeout=5.0)
async def effect(ctx: rtcore.Context, event: rtcore.Event) -> None:
    # Idempotent side effect: one keyed event per source position.
    _, _, ident = event.stream.partition(":")
    await ctx.publish(
        f"effects:{ident}",
        "done",
        {"offset": event.offset, "i": event.data["i"], "pid": os.getpid()},
        key=f"fx:{event.stream}:{event.epoch}:{event.offset}",
    )

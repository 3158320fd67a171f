"""The application of the memory-trend run: bounded history, so memory must level off."""

from __future__ import annotations

import msgspec

import rtcore

app = rtcore.App("rss-trend")
# Every stream keeps its last 200 events: a server whose memory still grows
# under a steady load holds something it should not.
app.retention("*", max_events=200)


class Put(msgspec.Struct):
    stream: str
    i: int


@app.command("put")
async def put(ctx: rtcore.Context, args: Put) -> int:
    return (await ctx.publish(args.stream, "put", {"i": args.i})).offset

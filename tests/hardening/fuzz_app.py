"""The application the HTTP command fuzz target runs (two commands, one of them keyed-sensitive)."""

from __future__ import annotations

import msgspec

import rtcore

app = rtcore.App("fuzz")


class Add(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: int


@app.command("echo")
async def echo(ctx: rtcore.Context, value: object) -> object:
    return value


@app.command("add")
async def add(ctx: rtcore.Context, args: Add) -> int:
    await ctx.publish("sums", "added", {"sum": args.a + args.b})
    return args.a + args.b

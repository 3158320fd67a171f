"""The application the real-socket tests serve (in-process and via ``rtcore serve``).

Tokens: none → anonymous principal ``anon``; ``bad`` → refused;
``exp:SECONDS:NAME`` → principal ``NAME`` whose token expires SECONDS from
now; anything else → a principal of that name.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec

import rtcore

app = rtcore.App("nettest")
app.page("/", "<!doctype html><title>nettest</title>")

#: Set by tests to release ``slow`` commands waiting on the gate.
GATE: dict[str, anyio.Event] = {}
#: How many times ``count`` really ran (idempotent retries do not run it).
RUNS: dict[str, int] = {}


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    if token is None:
        return rtcore.Principal("anon")
    if token == "bad":
        return None
    if token.startswith("exp:"):
        _, seconds, name = token.split(":", 2)
        return rtcore.Principal(name, expires_at=time.time() + float(seconds))
    return rtcore.Principal(token)


class Add(msgspec.Struct):
    a: int
    b: int


class Publish(msgspec.Struct):
    stream: str
    n: int = 1


class Slow(msgspec.Struct):
    seconds: float = 0.0
    gate: str | None = None


class Count(msgspec.Struct):
    name: str


@app.command("echo")
async def echo(ctx: rtcore.Context, args: Any) -> Any:
    return args


@app.command("add")
async def add(ctx: rtcore.Context, args: Add) -> int:
    return args.a + args.b


@app.command("publish")
async def publish(ctx: rtcore.Context, args: Publish) -> int:
    offset = 0
    for i in range(args.n):
        offset = (await ctx.publish(args.stream, "tick", {"i": i})).offset
    return offset


@app.command("count")
async def count(ctx: rtcore.Context, args: Count) -> int:
    RUNS[args.name] = RUNS.get(args.name, 0) + 1
    return RUNS[args.name]


@app.command("slow")
async def slow(ctx: rtcore.Context, args: Slow) -> str:
    if args.gate is not None:
        with anyio.fail_after(30):
            await GATE.setdefault(args.gate, anyio.Event()).wait()
    else:
        await anyio.sleep(args.seconds)
    return "done"


@app.command("fail")
async def fail(ctx: rtcore.Context, args: Any) -> None:
    raise rtcore.Rejected("nope", "this command always refuses")

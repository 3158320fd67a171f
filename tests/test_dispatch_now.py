"""``dispatch_now``: commands that need no await are answered without one, exactly as ``dispatch`` answers them."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore.engine.dispatch import _never_suspends, dispatch, dispatch_now

pytestmark = pytest.mark.anyio


class Add(msgspec.Struct):
    a: int
    b: int


def make_app() -> rtcore.App:
    app = rtcore.App()

    @app.command("echo")
    async def echo(ctx: rtcore.Context, args: Any) -> Any:
        return args

    @app.command("add")
    async def add(ctx: rtcore.Context, args: Add) -> int:
        return args.a + args.b

    @app.command("refuse")
    async def refuse(ctx: rtcore.Context, args: Any) -> None:
        raise rtcore.Rejected("nope", "always refuses")

    @app.command("crash")
    async def crash(ctx: rtcore.Context, args: Any) -> None:
        raise RuntimeError("bug")

    @app.command("unencodable")
    async def unencodable(ctx: rtcore.Context, args: Any) -> object:
        return object()

    @app.command("sleepy")
    async def sleepy(ctx: rtcore.Context, args: Any) -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    return app


async def _plain() -> int:
    async def inner() -> int:  # a nested coroutine's awaits are its own
        await anyio.lowlevel.checkpoint()
        return 1

    return 2


async def _awaits() -> None:
    await anyio.lowlevel.checkpoint()


async def _async_with() -> None:
    async with anyio.Lock():
        pass


async def _async_for(items: Any) -> None:
    async for _ in items:
        pass


def _sync() -> None:
    pass


def test_never_suspends_reads_the_handler_body() -> None:
    """Mutation checked: an empty ``_SUSPENDING`` set (every coroutine "never
    suspends") fails here, and so does ignoring ``iscoroutinefunction``."""
    assert _never_suspends(_plain)
    assert not _never_suspends(_awaits)
    assert not _never_suspends(_async_with)
    assert not _never_suspends(_async_for)
    assert not _never_suspends(_sync)


CASES = [
    ("echo", b'{"x":[1,2]}', "json"),
    ("echo", msgspec.msgpack.encode({"x": 1}), "msgpack"),
    ("add", b'{"a":2,"b":3}', "json"),
    ("add", b'{"a":"two","b":3}', "json"),  # bad_args
    ("add", b"{not json", "json"),  # bad_args
    ("refuse", b"null", "json"),
    ("crash", b"null", "json"),
    ("unencodable", b"null", "json"),
]


@pytest.mark.parametrize(("name", "args", "encoding"), CASES)
async def test_the_reply_is_the_one_dispatch_gives(name: str, args: bytes, encoding: str) -> None:
    """Mutations checked: ``dispatch_now`` answering a handler's ``Rejected`` as
    ``internal``, or not converting the result with ``to_builtins``: fails here."""
    async with rtcore.Node(make_app(), "memory://") as node:
        now = dispatch_now(node, None, name, msgspec.Raw(args), encoding=encoding)  # type: ignore[arg-type]
        assert now is not None
        assert now == await dispatch(node, None, name, msgspec.Raw(args), encoding=encoding)  # type: ignore[arg-type]


async def test_commands_that_may_await_are_left_to_dispatch() -> None:
    """An unknown command, a handler with an await, and any command of an app
    with an ``authorize`` hook (which may await) are not answered here.

    Mutation checked: dropping the ``authorize`` test → a forbidden command
    would run → fails."""
    app = make_app()
    async with rtcore.Node(app, "memory://") as node:
        assert dispatch_now(node, None, "nope", b"null") is None
        assert dispatch_now(node, None, "sleepy", b"null") is None

    @app.authorize
    async def deny(principal: Any, action: str, resource: str) -> bool:
        return False

    async with rtcore.Node(app, "memory://") as node:
        assert dispatch_now(node, None, "echo", b"null") is None
        assert (await dispatch(node, None, "echo", b"null")).code == "forbidden"

"""Helpers for the real-socket tests: a server on a free port, and a tiny
protocol client built only on the ``websockets`` library (no rtcore code on
the client side, so these tests check the documented wire protocol)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

import rtcore
from tests.ws_client import WebSocket, connect

TIMEOUT = 10.0

pytestmark = pytest.mark.anyio


#: Which server ``serving`` runs: ``"rtcore"`` (``rtcore serve``'s :class:`rtcore.Server`),
#: ``"uvicorn"`` or ``"hypercorn"`` (:func:`rtcore.asgi.asgi_app` under that ASGI server).
#: Set by the ``server_kind`` fixture of tests/net/test_asgi.py.
SERVER_KIND = "rtcore"


@asynccontextmanager
async def serving(app: rtcore.App, **options: Any) -> AsyncIterator[rtcore.Server]:
    """Run a :class:`rtcore.Server` on a free port for the block; stop it after.

    Under ``SERVER_KIND`` ``"uvicorn"``/``"hypercorn"`` it runs the ASGI adapter
    in that server instead and yields an object with the same ``port``,
    ``node``, ``sessions`` and ``limits``.
    """
    if SERVER_KIND != "rtcore":
        from tests.net.asgi_servers import asgi_serving

        async with asgi_serving(SERVER_KIND, app, **options) as asgi_server:
            yield asgi_server  # type: ignore[misc]
        return
    server = rtcore.Server(app, port=0, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            with anyio.fail_after(30):
                await server.stop(grace=2.0)


def ws_url(server: rtcore.Server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ws" + (f"?{query}" if query else "")


def http_url(server: rtcore.Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


class Peer:
    """One WebSocket client speaking rtcore v1 by hand."""

    def __init__(self, ws: WebSocket, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.pending: list[dict[str, Any]] = []
        self._ids = 0
        self.welcome: dict[str, Any] = {}

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def send(self, frame: dict[str, Any]) -> None:
        if self.encoding == "json":
            await self.ws.send(json.dumps(frame))
        else:
            await self.ws.send(msgspec.msgpack.encode(frame))

    async def _read(self) -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            raw = await self.ws.recv()
        if self.encoding == "json":
            assert isinstance(raw, str), "rtcore.v1.json frames are text"
            frame: dict[str, Any] = json.loads(raw)
        else:
            assert isinstance(raw, bytes), "rtcore.v1.msgpack frames are binary"
            frame = msgspec.msgpack.decode(raw)
        return frame

    async def next(self, pred: Callable[[dict[str, Any]], bool] = lambda f: True) -> dict[str, Any]:
        """The next frame matching ``pred`` (others stay queued, in order)."""
        for i, frame in enumerate(self.pending):
            if pred(frame):
                return self.pending.pop(i)
        while True:
            frame = await self._read()
            if pred(frame):
                return frame
            self.pending.append(frame)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request frame (an id is added) and return its reply."""
        rid = frame.setdefault("id", self.next_id())
        await self.send(frame)
        return await self.next(lambda f: f.get("id") == rid and f["t"] != "evt")

    async def cmd(self, name: str, args: Any = None, key: str | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "cmd", "name": name, "args": args}
        if key is not None:
            frame["key"] = key
        return await self.request(frame)

    async def sub(self, stream: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "sub", "stream": stream}
        if since is not None:
            frame["since"] = since
        return await self.request(frame)

    async def events(self, stream: str, n: int) -> list[dict[str, Any]]:
        return [await self.next(lambda f: f["t"] == "evt" and f["stream"] == stream) for _ in range(n)]

    async def closed(self) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; return its close code and the frames seen."""
        frames = list(self.pending)
        self.pending.clear()
        try:
            while True:
                frames.append(await self._read())
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), frames


@asynccontextmanager
async def peer(
    server: rtcore.Server,
    *,
    token: str | None = None,
    encoding: str | None = "json",
    hello: bool = True,
    origin: str | None = None,
    query: str = "",
    **kwargs: Any,
) -> AsyncIterator[Peer]:
    """Connect with the ``websockets`` library; send ``hello`` and await ``welcome``."""
    subprotocols = [Subprotocol(f"rtcore.v1.{encoding}")] if encoding else None
    async with connect(
        ws_url(server, query),
        subprotocols=subprotocols,
        origin=Origin(origin) if origin else None,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        **kwargs,
    ) as ws:
        p = Peer(ws, encoding or "json")
        if hello:
            frame: dict[str, Any] = {"t": "hello", "v": 1}
            if token is not None:
                frame["token"] = token
            await p.send(frame)
            p.welcome = await p.next()
            assert p.welcome["t"] == "welcome", p.welcome
        yield p

"""Direct messages on the wire: the raw ``msg`` frame, read with the ``websockets`` library.

A real :class:`rtcore.Server` on a free port; clients are the ``websockets``
library (no rtcore code), so this checks the documented frame
(docs/protocol.md §4 ``msg``) in both encodings, asyncio and trio.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgspec
import pytest
from websockets.typing import Subprotocol

import rtcore
from tests.ws_client import WebSocket, connect

from .conftest import TIMEOUT, serving, ws_url

pytestmark = pytest.mark.anyio

app = rtcore.App("direct-ws")


@app.authenticate
async def _auth(token: str | None) -> str | None:
    return token


class Dm(msgspec.Struct):
    to: str
    type: str
    data: Any = None
    room: str | None = None


@app.command("dm")
async def _dm(ctx: rtcore.Context, args: Dm) -> None:
    await ctx.node.send_to(args.to, args.type, args.data, room=args.room)


class Peer:
    """One raw connection in one encoding: sends and reads plain dicts."""

    def __init__(self, ws: WebSocket, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.ids = 0

    def _decode(self, raw: Any) -> dict[str, Any]:
        if self.encoding == "msgpack":
            assert isinstance(raw, bytes), "msgpack frames are binary"
            return dict(msgspec.msgpack.decode(raw))
        assert isinstance(raw, str), "json frames are text"
        return dict(json.loads(raw))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(msgspec.msgpack.encode(frame) if self.encoding == "msgpack" else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            return self._decode(await self.ws.recv())

    async def hello(self, token: str) -> None:
        await self.send({"t": "hello", "v": 1, "token": token})
        assert (await self.recv())["t"] == "welcome"

    async def command(self, name: str, args: Any) -> None:
        self.ids += 1
        await self.send({"t": "cmd", "id": self.ids, "name": name, "args": args})
        while True:
            frame = await self.recv()
            if frame["t"] in ("ok", "err") and frame.get("id") == self.ids:
                assert frame["t"] == "ok", frame
                return

    async def next_msg(self) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if frame["t"] == "msg":
                return frame


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_the_raw_msg_frame_reaches_each_connection_of_the_principal(encoding: str) -> None:
    """Two sockets of ``bob`` read ``{"t":"msg","type","data","room"}`` exactly as
    documented (text JSON / binary MessagePack); ``carol``'s socket gets only the
    marker sent to her afterwards.

    Mutation seen caught: the gateway's ``_direct`` pushes nothing → bob's sockets
    time out → fails. Mutation seen caught: ``DirectMessage.encoded`` renders JSON
    for every connection → the MessagePack socket gets a text frame → fails.
    """
    sub = [Subprotocol(f"rtcore.v1.{encoding}")]
    async with serving(app) as server:
        url = ws_url(server)
        async with (
            connect(url, subprotocols=sub, open_timeout=TIMEOUT) as a,
            connect(url, subprotocols=sub, open_timeout=TIMEOUT) as b1,
            connect(url, subprotocols=sub, open_timeout=TIMEOUT) as b2,
            connect(url, subprotocols=sub, open_timeout=TIMEOUT) as c,
        ):
            alice, bob1, bob2, carol = (Peer(ws, encoding) for ws in (a, b1, b2, c))
            for peer, name in ((alice, "alice"), (bob1, "bob"), (bob2, "bob"), (carol, "carol")):
                await peer.hello(name)
            await alice.command("dm", {"to": "bob", "type": "note", "data": {"n": [1, 2]}, "room": "r1"})
            for bob in (bob1, bob2):
                assert await bob.next_msg() == {"t": "msg", "type": "note", "data": {"n": [1, 2]}, "room": "r1"}
            await alice.command("dm", {"to": "carol", "type": "marker"})
            assert await carol.next_msg() == {"t": "msg", "type": "marker", "data": None, "room": None}

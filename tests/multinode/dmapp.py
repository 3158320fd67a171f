"""The application of the direct-message tests on several processes (tests/multinode/test_direct.py).

The token is the principal. ``dm`` sends a direct message with ``ctx.send_to``;
the room type ``chat`` sends one to a named player (``tell``) from the room's
owner, wherever the player's connections are.
"""

from __future__ import annotations

from typing import Any

import msgspec

import rtcore
from rtcore import rooms

app = rtcore.App("direct-multinode")
registry = rooms.install(app)


@app.authenticate
async def authenticate(token: str | None) -> str | None:
    return token


class Dm(msgspec.Struct):
    to: str
    type: str
    data: Any = None


@app.command("dm")
async def dm(ctx: rtcore.Context, args: Dm) -> None:
    await ctx.send_to(args.to, args.type, args.data)


class Chat(msgspec.Struct):
    said: int = 0


@registry.define("chat")
class ChatRoom(rooms.Room[Chat]):
    max_clients = 4

    @rooms.message("tell")
    def tell(self, player: rooms.Player, data: Any) -> None:
        self.state.said += 1
        self.send(data["to"], "note", {"from": player.id, "n": self.state.said})

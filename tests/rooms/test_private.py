"""Private fields: a player's hand reaches that player only, and survives a change of owner."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.backends import open_backend
from rtcore.protocol.frames import Err, Position
from rtcore.testing import connect, serve

from .roomapp import caught_up

pytestmark = pytest.mark.anyio


class Cards(msgspec.Struct):
    hands: dict[str, list[str]] = {}
    table: list[str] = []


def card_app() -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("cards")
    registry = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @registry.define("cards")
    class CardRoom(rooms.Room[Cards]):
        private_fields = ("hands",)

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.hands[player.id] = [f"{player.id}-secret-{i}" for i in range(3)]

        async def on_drop(self, player: rooms.Player) -> None:
            self.allow_reconnection(player, 30)

        @rooms.message("play")
        async def play(self, player: rooms.Player, data: None) -> str:
            card = self.state.hands[player.id].pop(0)
            self.state.table.append(card)
            return card

    return app, registry


async def test_hands_reach_their_owner_only() -> None:
    """Nothing bob receives (room stream, his view) names alice's cards until she plays
    one; bob may not subscribe to alice's view; alice's view holds her hand.

    Mutation: leave private fields in the public document (skip the filter in
    ``_Actor.doc``) → bob's frames contain ``alice-secret`` → fails; drop the
    default ``authorize`` → bob subscribes to alice's view → fails.
    """
    app, reg = card_app()
    async with serve(app) as node, connect(node, "alice") as alice, connect(node, "bob") as bob:
        room = await alice.command("room.create", {"type": "cards"})
        joined = await bob.command("room.join", {"room_id": room["room_id"]})
        for c, r in ((alice, room), (bob, joined)):
            await c.subscribe(r["stream"], Position("", 0))
            await c.subscribe(r["view"], Position("", 0))
        denied = await bob.command_reply("room.send", {"room_id": room["room_id"], "type": "nothing"})
        assert denied.code == "unknown_message"
        with pytest.raises(rtcore.RtcoreError) as exc:
            await bob.subscribe(room["view"], Position("", 0))
        assert exc.value.code == "forbidden"
        assert await alice.command("room.send", {"room_id": room["room_id"], "type": "play"}) == "alice-secret-0"
        actor = reg.runtime(node).actors[room["room_id"]]
        public = await caught_up(bob, room["stream"], actor.head)
        mine = await caught_up(alice, room["view"], actor.view_heads["alice"])
        await caught_up(bob, joined["view"], actor.view_heads["bob"])
        assert "hands" not in public["state"] and public["state"]["table"] == ["alice-secret-0"]
        assert mine["state"] == {"hands": ["alice-secret-1", "alice-secret-2"]}
        seen_by_bob = msgspec.json.encode([f for f in bob.frames if not isinstance(f, Err)]).decode()
        assert "alice-secret-1" not in seen_by_bob and "alice-secret-2" not in seen_by_bob
        assert "bob-secret-0" in seen_by_bob


async def test_hands_survive_a_new_owner() -> None:
    """A node that adopts the room folds each player's view back into the state.

    Mutation: skip folding the views in ``_Actor.restore`` → alice's hand is empty
    on the new owner and ``play`` fails → fails.
    """
    app, reg = card_app()
    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="B") as nb, connect(nb, "alice") as alice_b:
        async with serve(app, backend, node_id="A") as na, connect(na, "alice") as alice:
            room = await alice.command("room.create", {"type": "cards"})
            await alice.command("room.send", {"room_id": room["room_id"], "type": "play"})
        assert await alice_b.command("room.send", {"room_id": room["room_id"], "type": "play"}) == "alice-secret-1"
        actor = reg.runtime(nb).actors[room["room_id"]]
        assert "hands" not in actor.prev["state"]
        assert actor.full_prev["hands"] == {"alice": ["alice-secret-2"]}

"""Rooms on one node: seats, idempotency, hooks, messages, presence, restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.engine.dispatch import CommandContext
from rtcore.protocol.frames import Msg, Ok, Position
from rtcore.protocol.state import checksum
from rtcore.testing import FakeClock, connect, serve

from .roomapp import caught_up, make_app

pytestmark = pytest.mark.anyio
ZERO = Position("", 0)


async def test_seat_race_50_joiners_for_2_seats() -> None:
    """50 players race for the last 2 seats: exactly 2 join, 48 get ``room_full``.

    Mutation: drop the ``room_full`` check in ``_Actor._op_join`` → 50 join → fails.
    """
    app, reg = make_app(tick_rate=None, max_clients=3)
    async with serve(app) as node, connect(node, "owner") as owner:
        room = await owner.command("room.create", {"type": "game"})
        results: dict[str, str] = {}

        async def joiner(i: int) -> None:
            async with connect(node, f"p{i}") as c:
                reply = await c.command_reply("room.join", {"room_id": room["room_id"]}, key=f"j{i}")
                results[f"p{i}"] = "ok" if isinstance(reply, Ok) else reply.code

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(joiner, i)
        assert sorted(results.values()).count("ok") == 2
        assert list(results.values()).count("room_full") == 48
        state = await reg.state(node, room["room_id"])
        assert len(state["members"]) <= 3  # joiners that left since free their seat


async def test_retried_send_applies_once() -> None:
    """A retried ``room.send`` with the same key changes the state once and gets the first answer.

    Mutation: append the inbox entry with ``node.publish`` (bypassing the command
    key) → the handler run twice under one key appends two entries, the counter
    grows twice → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        args = {"room_id": room["room_id"], "type": "add", "data": {"by": 5}}
        first = await a.command("room.send", args, key="move-1")
        again = await a.command("room.send", args, key="move-1")
        assert first == again == 5
        # The command run twice under one key (its pending record expired after a
        # crash, so dispatch ran it again): one inbox entry, applied once.
        spec = app.commands["room.send"]
        value = msgspec.convert({**args, "data": {"by": 5}}, spec.args_type)
        for _ in range(2):
            ctx = CommandContext(node, rtcore.Principal("a"), "room.send", "p:a:move-2")
            assert await spec.handler(ctx, value) == 10
        await reg.settle(node, room["room_id"])
        assert (await reg.state(node, room["room_id"]))["state"]["counter"] == 10


async def test_handler_that_refuses_changes_nothing() -> None:
    """A handler that raises ``Rejected`` after changing the state publishes no patch and no message.

    Mutation: remove the revert in ``apply_entry`` → the counter shows 1000 → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        await a.subscribe(room["stream"], ZERO)
        reply = await a.command_reply("room.send", {"room_id": room["room_id"], "type": "fail"})
        assert reply.code == "nope"
        assert await a.command("room.send", {"room_id": room["room_id"], "type": "add", "data": {"by": 1}}) == 1
        actor = reg.runtime(node).actors[room["room_id"]]
        doc = await caught_up(a, room["stream"], actor.head)
        assert doc["state"]["counter"] == 1
        assert not [e for e in a.seen[room["stream"]] if e.type == "msg"]


async def test_bad_message_data_names_the_field() -> None:
    """A message whose data does not match the handler's type is ``bad_args`` naming the field."""
    app, _reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        reply = await a.command_reply("room.send", {"room_id": room["room_id"], "type": "add", "data": {"by": "x"}})
        assert reply.code == "bad_args" and "by" in reply.message
        reply = await a.command_reply("room.send", {"room_id": room["room_id"], "type": "nothing"})
        assert reply.code == "unknown_message"
        reply = await a.command_reply("room.join", {"room_id": "nosuchroom"})
        assert reply.code == "room_not_found"


async def test_private_room_by_code_lock_and_listing() -> None:
    """Private rooms are not listed nor matched, joinable by code; a locked room refuses joins."""
    app, _reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a, connect(node, "b") as b, connect(node, "c") as c:
        secret = await a.command("room.create", {"type": "game", "private": True})
        public = await a.command("room.create", {"type": "game", "metadata": {"mode": "duel"}})
        listed = await b.command("room.list", {"type": "game"})
        assert [r["room_id"] for r in listed] == [public["room_id"]]
        assert await b.command("room.list", {"type": "game", "metadata": {"mode": "other"}}) == []
        got = await b.command("room.join_or_create", {"type": "game", "metadata": {"mode": "duel"}})
        assert got["room_id"] == public["room_id"]
        joined = await b.command("room.join", {"code": secret["code"].lower()})
        assert joined["room_id"] == secret["room_id"]
        await a.command("room.send", {"room_id": public["room_id"], "type": "lock", "data": True})
        assert (await c.command_reply("room.join", {"room_id": public["room_id"]})).code == "room_locked"
        other = await c.command("room.join_or_create", {"type": "game", "metadata": {"mode": "duel"}})
        assert other["room_id"] not in (public["room_id"], secret["room_id"])


async def test_direct_message_and_broadcast_except_sender() -> None:
    """``send`` reaches every connection of one user as an ephemeral ``msg`` frame and
    nobody else; ``broadcast(exclude=)`` names who must skip it; ``registry.send``
    works from outside any room (``room`` null). Nothing of it is stored.

    Each other client gets a later message (``marker``) through the same path: it
    arrives after anything sent to it before, so "no ``note`` before the marker"
    proves the note never came, without waiting for time to pass.

    Mutation seen caught: ``Rooms.send``/``commit`` back on ``node.publish`` to
    ``roomdm:{user}`` → no ``msg`` frame reaches b's tabs → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a, connect(node, "b") as b1, connect(node, "b") as b2, connect(node, "c") as c:
        room = await a.command("room.create", {"type": "game"})
        await b1.command("room.join", {"room_id": room["room_id"]})
        assert room["user"] == "a" and "dm" not in room
        await a.subscribe(room["stream"], ZERO)
        await a.command("room.send", {"room_id": room["room_id"], "type": "tell", "data": {"to": "b"}})
        for tab in (b1, b2):
            msg = await tab.next_frame(types=(Msg,))
            assert msg == Msg("note", {"from": "a"}, room["room_id"])
        ctx = rtcore.Context(node, None)
        for other in ("a", "c"):
            await ctx.send_to(other, "marker")
        for other_client in (a, c):
            assert await other_client.next_frame(types=(Msg,)) == Msg("marker", None, None), "the note reached someone else"
        with anyio.fail_after(5):
            while not [e for e in a.seen[room["stream"]] if e.type == "msg"]:
                await a.next_event(room["stream"])
        (said,) = [e for e in a.seen[room["stream"]] if e.type == "msg"]
        assert said.data == {"room": room["room_id"], "type": "said", "data": {"by": "a"}, "except": "a"}
        # From outside any room (a command or processor):
        await reg.send(ctx, "b", "promo", {"x": 1})
        for tab in (b1, b2):
            assert await tab.next_frame(types=(Msg,)) == Msg("promo", {"x": 1}, None)
            assert tab.messages[-1] == Msg("promo", {"x": 1}, None), "a message for no room reaches the application"
        assert not [s for s in await node.backend.events.streams() if s.startswith("roomdm:")], "nothing was stored"


async def test_three_tabs_count_once_and_drop_needs_the_last_tab() -> None:
    """Presence is keyed by user: three tabs hold one seat; closing two is no drop, the third is.

    Mutation: drop on every closed connection (skip the other-tab check) → ``drop:a``
    appears after the first tab closes → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None)
    async with serve(app, clock=clock) as node, connect(node, "a") as t1, connect(node, "a") as t2:
        room = await t1.command("room.create", {"type": "game"})
        await t2.command("room.join", {"room_id": room["room_id"]})
        async with connect(node, "a") as t3:
            again = await t3.command("room.join", {"room_id": room["room_id"]})
            assert again["reconnected"] is False
        await t2.disconnect()
        await reg.settle(node, room["room_id"])
        doc = await reg.state(node, room["room_id"])
        assert doc["members"] == {"a": {"connected": True, "grace_until": None}}
        assert "drop:a" not in doc["state"]["log"]
        await t1.disconnect()
        actor = reg.runtime(node).actors[room["room_id"]]
        with anyio.fail_after(5):
            while actor.members["a"].connected:
                await anyio.sleep(0.01)
        await reg.settle(node, room["room_id"])
        doc = await reg.state(node, room["room_id"])
        assert doc["members"]["a"]["connected"] is False
        assert doc["state"]["log"][-1] == "drop:a"


async def test_restart_on_sqlite_continues_the_room(tmp_path: Path) -> None:
    """A node that stops and a new one on the same database: the room comes back with its
    state and members, the inbox continues, and a retried key is not applied again.

    Mutation: restore ``applied`` as 0 instead of the document's ``inbox`` → the new
    owner re-applies old entries and the counter doubles → fails.
    """
    url = f"sqlite://{tmp_path / 'rooms.db'}"
    app, reg = make_app(tick_rate=None)
    async with serve(app, url) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        for i in range(3):
            await a.command("room.send", {"room_id": room["room_id"], "type": "add", "data": {"by": 1}}, key=f"k{i}")
        before = await reg.state(node, room["room_id"])
    app2, reg2 = make_app(tick_rate=None)
    async with serve(app2, url) as node2, connect(node2, "a") as a2:
        # The same key again (a client retrying across the restart): replayed, not re-run.
        assert await a2.command("room.send", {"room_id": room["room_id"], "type": "add", "data": {"by": 1}}, key="k2") == 3
        assert await a2.command("room.send", {"room_id": room["room_id"], "type": "add", "data": {"by": 1}}, key="k3") == 4
        after = await reg2.state(node2, room["room_id"])
        assert after["state"]["log"] == [*before["state"]["log"], "drop:a", "reconnect:a"]
        assert after["state"]["counter"] == 4
        await a2.subscribe(room["stream"], ZERO)
        actor = reg2.runtime(node2).actors[room["room_id"]]
        doc = await caught_up(a2, room["stream"], actor.head)
        assert doc == after
        st = await node2.state_of(room["stream"])
        with anyio.fail_after(5):
            while st.offset < actor.head:
                await anyio.sleep(0.01)
        assert st.checksum() == checksum(doc)


async def test_anonymous_players_are_refused() -> None:
    """Rooms key seats by principal: an anonymous caller gets ``unauthenticated``."""
    app, _reg = make_app(tick_rate=None)
    app.hooks.authenticate = None
    async with serve(app) as node, connect(node) as anon:
        assert (await anon.command_reply("room.create", {"type": "game"})).code == "unauthenticated"



async def test_join_attempt_refusal_players_and_dispose() -> None:
    """``on_join_attempt`` can refuse with a code (no seat taken); ``players`` and
    ``connected`` report seats; ``dispose()`` ends the room for everyone.

    Mutation: seat the player before ``on_join_attempt`` → the refused player holds a
    seat → fails; keep the seat when ``on_join`` raises → "oops" is listed → fails.
    """
    class Lobby(msgspec.Struct):
        seen: list[str] = []

    app = rtcore.App("lobby")
    reg = rooms.install(app)
    app.authenticate(_token_auth)

    @reg.define("lobby")
    class LobbyRoom(rooms.Room[Lobby]):
        async def on_join_attempt(self, player: rooms.Player, options: dict[str, Any]) -> None:
            if player.id == "mallory":
                raise rtcore.Rejected("banned", "not you")

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            if player.id == "oops":
                raise RuntimeError("a bug in on_join")

        @rooms.message("who")
        def who(self, player: rooms.Player, data: Any) -> list[Any]:
            return [[p.id, self.connected(p)] for p in self.players]

        @rooms.message("close")
        def close(self, player: rooms.Player, data: Any) -> None:
            self.dispose()

    async with serve(app) as node, connect(node, "a") as a, connect(node, "mallory") as m:
        room = await a.command("room.create", {"type": "lobby"})
        refused = await m.command_reply("room.join", {"room_id": room["room_id"]})
        assert refused.code == "banned"
        async with connect(node, "oops") as o:
            assert (await o.command_reply("room.join", {"room_id": room["room_id"]})).code == "internal"
            assert await a.command("room.send", {"room_id": room["room_id"], "type": "who"}) == [["a", True]]
        await a.command("room.send", {"room_id": room["room_id"], "type": "close"})
        gone = await a.command_reply("room.send", {"room_id": room["room_id"], "type": "who"})
        assert gone.code == "room_not_found"
        assert await a.command("room.list", {}) == []


async def _token_auth(token: str | None) -> str | None:
    return token


async def test_listing_entry_follows_seats_lock_and_metadata_across_moves() -> None:
    """The ``roomindex:{type}`` entry the owner appends follows every seat, lock and
    metadata change, also when moves in between skip rebuilding it (``_Actor._list``).

    Mutations: leave ``locked`` out of ``_list``'s key → the lock is never listed
    → fails; take the key also when the room has metadata → the metadata set by
    a move is never listed → fails; drop the seat count from the key → the second
    player's seat is never listed → fails.
    """
    app, reg = make_app(tick_rate=None)

    @app.command("test.meta")
    async def set_meta(ctx: CommandContext, args: dict[str, Any]) -> None:
        actor = reg.runtime(ctx.node).actors[args["room_id"]]
        actor.room.metadata = dict(args["metadata"])

    async with serve(app) as node, connect(node, "a") as a, connect(node, "b") as b:

        async def listed(room_id: str) -> tuple[int, bool, Any]:
            await reg.settle(node, room_id)
            st = await node.state_of("roomindex:game")
            assert isinstance(st.state, rooms.runtime.RoomIndex)
            e = st.state.rooms[room_id]
            return e["clients"], e["locked"], e["metadata"]

        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        move = {"room_id": rid, "type": "add", "data": {"by": 1}}
        assert await listed(rid) == (1, False, {})
        await b.command("room.join", {"room_id": rid})
        await a.command("room.send", move)
        assert await listed(rid) == (2, False, {})
        await a.command("room.send", {"room_id": rid, "type": "lock", "data": True})
        await a.command("room.send", move)
        assert await listed(rid) == (2, True, {})
        await a.command("room.send", {"room_id": rid, "type": "lock", "data": False})
        assert await listed(rid) == (2, False, {})
        await a.command("test.meta", {"room_id": rid, "metadata": {"mode": "x"}})
        await a.command("room.send", move)
        assert await listed(rid) == (2, False, {"mode": "x"})
        await a.command("test.meta", {"room_id": rid, "metadata": {}})
        await a.command("room.send", move)
        assert await listed(rid) == (2, False, {})
        await b.command("room.leave", {"room_id": rid})
        assert await listed(rid) == (1, False, {})

"""Rooms on two nodes sharing one backend: forwarding, seats, failover.

The nodes share a ``memory://`` backend object, the in-process stand-in for
several processes on one Redis (the same stores and live feed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.backends import open_backend
from rtcore.engine.node import Node
from rtcore.protocol.frames import Ok, Position
from rtcore.rooms import Rooms
from rtcore.testing import FakeClock, connect, serve

from .roomapp import caught_up, make_app

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_nodes(max_clients: int = 3, clock: FakeClock | None = None) -> AsyncIterator[tuple[Node, Node, Rooms]]:
    app, reg = make_app(tick_rate=None, max_clients=max_clients)
    backend = await open_backend("memory://")
    opts = {"clock": clock} if clock else {}
    async with serve(app, backend, node_id="A", **opts) as a, serve(app, backend, node_id="B", **opts) as b:
        yield a, b, reg


async def test_commands_on_another_node_run_on_the_owner() -> None:
    """A player on node B joins and plays in a room owned by node A; a retried key,
    on either node, applies once; B's subscriber folds the same document.

    Mutation: skip the reply on ``roomreply:{id}`` in ``_Actor.apply_entry`` →
    B waits until the entry shows in the folded document and answers
    ``recovered`` instead of the handler's result → fails.
    """
    async with two_nodes() as (na, nb, reg), connect(na, "alice") as alice, connect(nb, "bob") as bob:
        room = await alice.command("room.create", {"type": "game"})
        rid = room["room_id"]
        joined = await bob.command("room.join", {"room_id": rid})
        assert joined["room_id"] == rid and rid not in reg.runtime(nb).actors
        args = {"room_id": rid, "type": "add", "data": {"by": 2}}
        assert await bob.command("room.send", args, key="b1") == 2
        assert await bob.command("room.send", args, key="b1") == 2
        async with connect(na, "bob") as bob_on_a:
            assert await bob_on_a.command("room.send", args, key="b1") == 2
        assert await bob.command("room.send", args, key="b2") == 4
        await bob.subscribe(room["stream"], Position("", 0))
        actor = reg.runtime(na).actors[rid]
        doc = await caught_up(bob, room["stream"], actor.head)
        assert doc == actor.prev and doc["state"]["counter"] == 4


async def test_seat_race_across_two_nodes() -> None:
    """50 joiners on two nodes for the last 2 seats: exactly 2 join, 48 get ``room_full``.

    Mutation: let the joiner's node seat players itself (adopt even when the lease is
    held: ``_adopt`` ignores ``acquire``'s answer) → two writers; the fence turns one
    away and seats are lost or doubled → fails.
    """
    async with two_nodes(max_clients=3) as (na, nb, _reg), connect(na, "owner") as owner:
        room = await owner.command("room.create", {"type": "game"})
        codes: list[str] = []

        async def joiner(i: int) -> None:
            async with connect(na if i % 2 else nb, f"p{i}") as c:
                reply = await c.command_reply("room.join", {"room_id": room["room_id"]}, key="j")
                codes.append("ok" if isinstance(reply, Ok) else reply.code)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(joiner, i)
        assert codes.count("ok") == 2 and codes.count("room_full") == 48, codes


async def test_owner_gone_another_node_takes_the_room_over() -> None:
    """Node A (the owner) stops; node B's next command adopts the room with its state
    and members and applies the entry once; B's supervisor would adopt it anyway.

    Mutation: restore the members as empty in ``_Actor.restore`` → bob is
    ``not_in_room`` on the new owner → fails.
    """
    app, reg = make_app(tick_rate=None)
    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="B") as nb, connect(nb, "bob") as bob:
        async with serve(app, backend, node_id="A") as na, connect(na, "alice") as alice:
            room = await alice.command("room.create", {"type": "game"})
            rid = room["room_id"]
            await bob.command("room.join", {"room_id": rid})
            await bob.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key="m1")
        # A stopped (cleanly: its lease is released; after a crash B waits for the lease to run out).
        assert await bob.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key="m2") == 2
        assert await bob.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key="m1") == 1
        actor = reg.runtime(nb).actors[rid]
        assert set(actor.members) == {"alice", "bob"}
        assert actor.prev["state"]["log"][-1] == "drop:alice"  # A's last act: alice's connection ended


async def test_supervisor_adopts_orphaned_rooms() -> None:
    """With no command at all, a surviving node adopts a room whose owner is gone, so its
    timers and graces run again.

    Mutation: make ``_Runtime.supervise`` a no-op → the room is never adopted → fails;
    skip re-arming the document's timers in ``_Actor.restore`` → the interval does
    not fire on the new owner → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None)
    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="B", clock=clock) as nb:
        async with serve(app, backend, node_id="A", clock=clock) as na, connect(na, "alice") as alice:
            room = await alice.command("room.create", {"type": "game", "options": {"interval": 5}})
            rid = room["room_id"]
            await alice.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 7}})
            assert rid in reg.runtime(na).actors
        with anyio.fail_after(10):
            while rid not in reg.runtime(nb).actors:
                await anyio.sleep(0.05)
        actor = reg.runtime(nb).actors[rid]
        assert actor.prev["state"]["counter"] == 7
        assert actor.prev["members"]["alice"]["connected"] is False
        assert actor.prev["members"]["alice"]["grace_until"] is not None
        assert [t[1:] for t in actor.prev["room"]["timers"]] == [[5, "bump", []]]
        clock.advance(6)  # the interval set on A fires on B
        await reg.settle(nb, rid)
        assert actor.prev["state"]["fired"] == 1
        clock.advance(5)  # past alice's reconnection grace, re-armed from the document
        await reg.settle(nb, rid)
        assert "alice" not in actor.members
        assert actor.prev["state"]["log"][-1] == "leave:alice:False"
        assert actor.prev["state"]["fired"] == 2


async def test_matchmaking_listing_and_codes_across_nodes() -> None:
    """A player on node B is matched into a room owned by node A, sees it in
    ``room.list``, and joins A's private room by its code.

    Mutation: match only this node's rooms (skip the ``roomindex:{type}`` fold in
    ``_Runtime.pick``) → bob gets a new room on B → fails; look codes up only
    locally → ``room_not_found`` → fails.
    """
    clock = FakeClock()
    async with two_nodes(clock=clock) as (na, nb, reg), connect(na, "alice") as alice, connect(nb, "bob") as bob:
        public = await alice.command("room.join_or_create", {"type": "game", "metadata": {"mode": "duel"}})
        secret = await alice.command("room.create", {"type": "game", "private": True})
        matched = await bob.command("room.join_or_create", {"type": "game", "metadata": {"mode": "duel"}})
        assert matched["room_id"] == public["room_id"]
        assert public["room_id"] not in reg.runtime(nb).actors  # still owned by A
        listed = await bob.command("room.list", {"type": "game"})
        assert [(r["room_id"], r["clients"]) for r in listed] == [(public["room_id"], 2)]
        joined = await bob.command("room.join", {"code": secret["code"]})
        assert joined["room_id"] == secret["room_id"]
        assert (await bob.command_reply("room.join", {"code": "NOPE99"})).code == "room_not_found"
        for c in (alice, bob):
            await c.command("room.leave", {"room_id": public["room_id"]})
        clock.advance(6)  # empty for longer than auto_dispose: disposed, and unlisted everywhere
        await reg.settle(na, public["room_id"])
        assert await bob.command("room.list", {"type": "game"}) == []


class Clocked(msgspec.Struct):
    log: list[str] = []
    fired: int = 0


async def test_closure_and_lambda_timers_survive_takeover() -> None:
    """Timers whose callback is a closure or lambda defined in a room method (capturing
    the room, a player and builtins) are re-armed by the node that adopts the room.

    Mutation: leave closures out of ``_Actor._durable_timers`` (methods only, as
    before) → nothing fires on B → fails; rebuild the captured player as the raw
    id → ``late:`` names a str's ``.id`` → the callback raises and is reverted → fails.
    """
    clock = FakeClock()
    app = rtcore.App("closure-timers")
    reg = rooms.install(app)
    app.authenticate(_token)

    @reg.define("clocked")
    class ClockedRoom(rooms.Room[Clocked]):
        auto_dispose = 60.0

        async def on_drop(self, player: rooms.Player) -> None:
            self.allow_reconnection(player, 60)

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            step = int(options.get("step", 1))
            self.clock.set_timeout(5, lambda: self.state.log.append(f"late:{player.id}"))

            def bump(extra: int = 10) -> None:
                self.state.fired += step + extra

            self.clock.set_interval(4, bump)

    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="B", clock=clock) as nb:
        async with serve(app, backend, node_id="A", clock=clock) as na, connect(na, "alice") as alice:
            room = await alice.command("room.create", {"type": "clocked", "options": {"step": 3}})
            rid = room["room_id"]
            timers = reg.runtime(na).actors[rid].prev["room"]["timers"]
            assert [t[2]["closure"].rpartition(".")[2] for t in timers] == ["bump", "<lambda>"]
        with anyio.fail_after(10):
            while rid not in reg.runtime(nb).actors:
                await anyio.sleep(0.05)
        actor = reg.runtime(nb).actors[rid]
        clock.advance(4.5)  # the interval set on A fires on B
        await reg.settle(nb, rid)
        assert actor.prev["state"] == {"log": [], "fired": 13}
        clock.advance(1)  # and the one-shot lambda
        await reg.settle(nb, rid)
        assert actor.prev["state"] == {"log": ["late:alice"], "fired": 13}
        assert [t[2]["closure"].rpartition(".")[2] for t in actor.prev["room"]["timers"]] == ["bump"]


async def _token(token: str | None) -> str | None:
    return token

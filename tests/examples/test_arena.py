"""The arena example: movement rules on a FakeClock, and bots playing over real sockets."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from rtcore.rooms import Rooms
from rtcore.testing import FakeClock, connect, serve

from .helpers import load_example, serving, ws_url

pytestmark = pytest.mark.anyio

arena = load_example("arena")
arena_bot = load_example("arena", "bot")


async def _room(node: Any, client: Any, **options: Any) -> str:
    joined = await client.command("room.join_or_create", {"type": "arena", "options": options})
    return str(joined["room_id"])


async def _state(reg: Rooms, node: Any, rid: str) -> Any:
    await reg.settle(node, rid)
    return (await reg.state(node, rid))["state"]


async def _ticks(reg: Rooms, node: Any, rid: str, clock: FakeClock, n: int) -> Any:
    for _ in range(n):
        clock.advance(1 / arena.TICK_RATE)
        await reg.settle(node, rid)
    return await _state(reg, node, rid)


def test_bot_moves_exactly_like_the_server() -> None:
    """Prediction is exact only if the bot's ``step`` is the server's, walls included.

    Mutation: make the bot's diagonal 8 instead of 7 → fails.
    """
    for x, y in [(15, 15), (500, 350), (985, 685), (20, 680), (990, 20)]:
        for dx, dy in itertools.product((-1, 0, 1), repeat=2):
            assert arena_bot.step(x, y, dx, dy) == arena.step(x, y, dx, dy)


async def test_steps_apply_one_per_tick_and_old_seq_is_ignored() -> None:
    """Server reconciliation rule: the tick applies queued steps and records the last seq;
    a step whose seq is not above the last one seen is ignored, so a replayed or late
    batch never moves anyone twice.

    Mutation: drop ``seq <= seen`` from ``ArenaRoom.input`` → the replayed batch is
    applied again → position and ``ignored`` assertions fail.
    """
    reg: Rooms = arena.registry
    clock = FakeClock()
    async with serve(arena.app, clock=clock) as node, connect(node, "alice") as a:
        rid = await _room(node, a)
        s = await _state(reg, node, rid)
        x0, y0 = s["players"]["alice"]["x"], s["players"]["alice"]["y"]
        send = {"room_id": rid, "type": "input"}
        r = await a.command("room.send", {**send, "data": {"steps": [[1, 1, 0], [2, 1, 0], [3, 0, 1]]}})
        assert r == {"accepted": 3, "ignored": 0}
        s = await _ticks(reg, node, rid, clock, 1)
        assert s["players"]["alice"]["seq"] == 1  # one step per tick
        s = await _ticks(reg, node, rid, clock, 2)
        me = s["players"]["alice"]
        expected = arena.step(*arena.step(*arena.step(x0, y0, 1, 0), 1, 0), 0, 1)
        assert (me["x"], me["y"], me["seq"]) == (*expected, 3)
        # The same batch again (a retry under a new key), and an older step: ignored.
        r = await a.command("room.send", {**send, "data": {"steps": [[2, 1, 0], [3, 0, 1], [1, -1, 0]]}})
        assert r == {"accepted": 0, "ignored": 3}
        s = await _ticks(reg, node, rid, clock, 3)
        assert (s["players"]["alice"]["x"], s["players"]["alice"]["y"], s["players"]["alice"]["seq"]) == (*expected, 3)
        # A newer step after them is applied.
        await a.command("room.send", {**send, "data": {"steps": [[7, -1, 0]]}})
        s = await _ticks(reg, node, rid, clock, 1)
        assert (s["players"]["alice"]["x"], s["players"]["alice"]["seq"]) == (arena.step(*expected, -1, 0)[0], 7)


async def test_a_player_cannot_move_faster_than_the_step_budget() -> None:
    """20 steps a second plus a 1 s burst: a client that sends more gains nothing.

    Mutation: skip the ``tokens < 1`` check → 40 steps accepted at once → fails.
    """
    reg: Rooms = arena.registry
    clock = FakeClock()
    async with serve(arena.app, clock=clock) as node, connect(node, "mallory") as m:
        rid = await _room(node, m)
        send = {"room_id": rid, "type": "input"}
        r1 = await m.command("room.send", {**send, "data": {"steps": [[i, 1, 0] for i in range(1, 21)]}})
        r2 = await m.command("room.send", {**send, "data": {"steps": [[i, 1, 0] for i in range(21, 41)]}})
        assert (r1["accepted"], r2["accepted"]) == (20, 0)
        clock.advance(0.5)  # half a second later: 10 more steps are allowed
        r3 = await m.command("room.send", {**send, "data": {"steps": [[i, 0, 1] for i in range(41, 61)]}})
        assert r3["accepted"] == 10
        with pytest.raises(Exception) as too_many:
            await m.command("room.send", {**send, "data": {"steps": [[i, 0, 1] for i in range(100, 125)]}})
        assert getattr(too_many.value, "code", None) == "too_many_steps"
        s = await _state(reg, node, rid)
        assert s["players"]["mallory"]["seq"] <= 60


async def test_round_ends_at_target_and_next_round_starts() -> None:
    """Reaching ``target`` gems ends the round with a winner; 5 s later a new round starts.

    Mutation: never call ``_finish`` from ``_pickup`` → status stays ``playing`` → fails.
    """
    reg: Rooms = arena.registry
    clock = FakeClock()
    async with serve(arena.app, clock=clock) as node, connect(node, "alice") as a:
        rid = await _room(node, a, target=1)
        actor = reg.runtime(node).actors[rid]
        room = actor.room
        me = room.state.players["alice"]
        gx, gy = room.state.gems[0]
        # Stand right next to a gem (a test shortcut: set the position directly).
        me.x, me.y = arena.step(gx, gy, -1, 0) if gx > 30 else arena.step(gx, gy, 1, 0)
        await a.command("room.send", {"room_id": rid, "type": "input", "data": {"steps": [[1, 1 if gx > 30 else -1, 0]]}})
        s = await _ticks(reg, node, rid, clock, 1)
        assert (s["status"], s["winner"], s["players"]["alice"]["score"]) == ("over", "alice", 1)
        assert s["wins"] == {"alice": 1}
        clock.advance(arena.BREAK_SECONDS)
        s = await _state(reg, node, rid)
        assert (s["status"], s["round"], s["players"]["alice"]["score"]) == ("playing", 2, 0)


@pytest.mark.slow
async def test_bots_play_a_round_to_the_end_over_real_sockets() -> None:
    """Four bots (the example's ``bot.py``) play a round to the end on a real server.

    Every bot sees the round end, its prediction never had to be corrected
    (each step the server applied is the one the bot predicted) and, once its
    last step was applied, its predicted position equals the server's.

    Mutation: make the tick apply a step twice (``step`` called twice) → the
    bots' corrections count and the final check fail.
    """
    async with serving(arena.app) as server:
        results = await arena_bot.run_bots(ws_url(server), 4, rounds=1, input_hz=5.0, options={"target": 3}, seed=7)
    assert len(results) == 4
    for r in results:
        assert r.rounds == 1 and r.steps > 0 and r.batches > 0, r
        assert r.corrections == 0, r
    assert sum(r.wins for r in results) == 1  # one of them won the round

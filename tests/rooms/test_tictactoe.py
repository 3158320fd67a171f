"""The tic-tac-toe example's clocks on a FakeClock: turn timeout, drop grace, forfeit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from rtcore.rooms import Rooms
from rtcore.testing import FakeClock, connect, serve

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tictactoe" / "app.py"


async def test_turn_clock_drop_grace_and_forfeit() -> None:
    """The 30 s turn clock ends a game; a drop keeps the seat for 20 s and a
    reconnection within it continues; past it the game is forfeited.

    Mutation: never fire ``set_timeout`` timers (skip them in ``_fire_due``) →
    no timeout → fails; restore the seat on drop without a grace timer → no
    forfeit → fails.
    """
    spec = importlib.util.spec_from_file_location("tictactoe_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # so the room's annotations resolve
    spec.loader.exec_module(example)
    app, reg = example.app, example.registry
    assert isinstance(reg, Rooms)
    clock = FakeClock()
    async with serve(app, clock=clock) as node, connect(node, "alice") as a, connect(node, "bob") as b:
        room = await a.command("room.join_or_create", {"type": "tictactoe"})
        await b.command("room.join_or_create", {"type": "tictactoe"})
        rid = room["room_id"]

        async def state() -> Any:
            await reg.settle(node, rid)
            return (await reg.state(node, rid))["state"]

        assert (await state())["turn"] == "alice"
        clock.advance(29)
        assert (await state())["status"] == "playing"
        clock.advance(2)
        s = await state()
        assert (s["status"], s["winner"], s["reason"]) == ("over", "bob", "timeout")

        for c in (a, b):
            await c.command("room.send", {"room_id": rid, "type": "rematch"})
        assert (await state())["turn"] == "alice"  # the loser starts
        await a.disconnect()
        actor = reg.runtime(node).actors[rid]
        with anyio.fail_after(5):
            while actor.members["alice"].connected:
                await anyio.sleep(0.01)
        clock.advance(10)
        doc = await reg.state(node, rid)
        assert doc["members"]["alice"]["connected"] is False and doc["state"]["status"] == "playing"
        async with connect(node, "alice") as a2:
            back = await a2.command("room.join", {"room_id": rid})
            assert back["reconnected"] is True
            await a2.command("room.send", {"room_id": rid, "type": "move", "data": {"cell": 4}})
        with anyio.fail_after(5):
            while actor.members["alice"].connected:
                await anyio.sleep(0.01)
        clock.advance(21)
        s = await state()
        assert (s["status"], s["winner"], s["reason"], s["players"]) == ("over", "bob", "forfeit", ["bob"])


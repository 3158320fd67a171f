"""How an owner wakes and writes: in-process hand-over of inputs, coalesced patches, matchmaking.

These are the performance paths of rooms (see benchmarks/rooms.py); each test
pins the behaviour the speed-up relies on, so it cannot silently regress into
polling, a patch per input, or one room per concurrent joiner.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from rtcore.protocol.frames import Ok
from rtcore.rooms.runtime import LEASE
from rtcore.testing import FakeClock, connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


def count_reads(node: Any, prefix: str) -> list[str]:
    """Record every backend read of a stream starting with ``prefix``."""
    seen: list[str] = []
    read = node.backend.events.read

    async def counting(stream: str, *, after: int, limit: int) -> Any:
        if stream.startswith(prefix):
            seen.append(stream)
        return await read(stream, after=after, limit=limit)

    node.backend.events.read = counting
    return seen


async def test_local_inputs_and_idle_time_cost_no_inbox_read() -> None:
    """Inputs appended on the owner's node are handed over in-process, and an idle room
    sleeps: neither reads ``roominbox:{id}`` from the backend (the fallback read is 30 s).

    Mutation: make ``_Actor.push`` set ``need_read`` (or make ``_wait`` time out every
    second and read, as before) → inbox reads are counted → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None)
    async with serve(app, clock=clock) as node, connect(node, "a") as a, connect(node, "b") as b:
        room = await a.command("room.create", {"type": "game"})
        await b.command("room.join", {"room_id": room["room_id"]})
        rid = room["room_id"]
        await reg.settle(node, rid)  # settle itself asks for a read: count after it
        reads = count_reads(node, "roominbox:")
        for i in range(5):
            assert await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == i + 1
        for _ in range(10):  # 20 s of idle time (twice the lease), in steps the keeper sees
            clock.advance(LEASE / 5)
            await anyio.sleep(0.02)
        assert await b.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == 6
        assert reads == []
        # The keeper renewed the lease while the room slept: another holder is refused.
        assert not await node.backend.leases.acquire(f"room:{rid}", "someone-else", now=clock(), ttl=LEASE)


async def test_local_inputs_are_not_fed_to_the_inbox_processor() -> None:
    """An input appended on the owner's node reaches the owner in-process only: the
    ``roominbox:*`` processor is not fed it (no queue and task hop, no second wake-up of
    the owner per move). An entry appended without this node's id still is.

    Mutation seen caught: register ``room_input`` without ``accept`` → ``_Runtime.wake`` is
    called for each of the five inputs → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        rt = reg.runtime(node)
        woken: list[str] = []
        wake = rt.wake

        def counting(room_id: str, event: Any = None) -> None:
            woken.append(room_id)
            wake(room_id, event)

        rt.wake = counting  # type: ignore[method-assign]
        for i in range(5):
            assert await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == i + 1
        # Processors take the feed in order: once this marker arrives, the inputs before it were handled or filtered.
        await node.publish("roominbox:marker", "noop", {})
        with anyio.fail_after(5):
            while "marker" not in woken:
                await anyio.sleep(0.01)
        assert woken == ["marker"]


async def test_patch_rate_coalesces_messages_into_one_patch() -> None:
    """With ``patch_rate``, the changes of messages between two flushes go out as ONE patch,
    and each sender's ``room.send`` returns only after that patch is written.

    Mutation: ignore ``patch_rate`` (``patch_every = 0``) → five patches → fails; return
    the result before the flush (skip ``in_flight`` in ``result``) → a send returns while
    the head has not moved → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None, patch_rate=20)
    async with serve(app, clock=clock) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        head = (await node.backend.events.info(f"room:{rid}")).head
        results: list[int] = []

        async def add(i: int) -> None:
            async with connect(node, "a") as tab:
                results.append(await tab.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key=f"k{i}"))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(add, i)
            actor = reg.runtime(node).actors[rid]
            with anyio.fail_after(5):
                while len(actor.in_flight) < 5:
                    await anyio.sleep(0.01)
            assert results == []  # applied, but their patch is not written: nobody is answered
            assert (await node.backend.events.info(f"room:{rid}")).head == head
            # Asked after it was applied (a caller that came late): still waits for the patch.
            late: list[Any] = []
            first = min(actor.in_flight)

            async def ask() -> None:
                late.append(await actor.result(first))

            tg.start_soon(ask)
            await anyio.sleep(0.05)
            assert late == []
            clock.advance(0.05)
        assert sorted(results) == [1, 2, 3, 4, 5]
        assert late[0].ok and late[0].result in results  # its own answer, not "recovered"
        page = await node.backend.events.read(f"room:{rid}", after=head, limit=10)
        assert [e.type for e in page.events] == ["patch"]
        assert ["set", ["state", "counter"], 5] in page.events[0].data["ops"]


async def test_coalesced_refusal_keeps_the_earlier_inputs() -> None:
    """A handler that refuses while earlier inputs wait for their patch reverts only its own change.

    Mutation: revert to the last published state (``full_prev``) as without
    ``patch_rate`` → the first ``add`` is lost, the patch says counter 0 → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None, patch_rate=20)
    async with serve(app, clock=clock) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        got: dict[str, Any] = {}

        async def send(name: str, type_: str, data: Any) -> None:
            async with connect(node, "a") as tab:
                got[name] = await tab.command_reply("room.send", {"room_id": rid, "type": type_, "data": data}, key=name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "add", "add", {"by": 7})
            actor = reg.runtime(node).actors[rid]
            with anyio.fail_after(5):
                while len(actor.in_flight) < 1:
                    await anyio.sleep(0.01)
            tg.start_soon(send, "fail", "fail", None)
            with anyio.fail_after(5):
                while len(actor.in_flight) < 2:
                    await anyio.sleep(0.01)
            clock.advance(0.05)
        assert isinstance(got["add"], Ok) and got["add"].result == 7
        assert not isinstance(got["fail"], Ok) and got["fail"].code == "nope"
        assert (await reg.state(node, rid))["state"]["counter"] == 7


async def test_concurrent_join_or_create_fills_rooms_pairwise() -> None:
    """40 players matchmaking at once for 2-seat rooms end in exactly 20 full rooms,
    even while every room's ``on_create`` is still running.

    The matchmaker promises seats under its lock and lets the joins run
    concurrently; a room whose ``create`` is not applied yet is already a
    candidate.

    Mutation: do not list a room at ``start_create`` (only after its create is
    applied) → each joiner creates a room while the others' ``on_create`` waits →
    40 rooms → fails.
    """
    app, reg = make_app(tick_rate=None, max_clients=2)
    release = anyio.Event()
    cls = reg.types["game"]
    plain = cls.on_create

    async def slow_create(self: Any, options: dict[str, Any]) -> None:
        await release.wait()  # every create in flight at once
        await plain(self, options)

    cls.on_create = slow_create  # type: ignore[method-assign]
    async with serve(app) as node:
        joined: dict[str, str] = {}

        async def player(i: int) -> None:
            async with connect(node, f"p{i}") as c:
                joined[f"p{i}"] = (await c.command("room.join_or_create", {"type": "game"}, key=f"m{i}"))["room_id"]
                # Stay seated until everybody is placed (a leaving player frees a seat).
                with anyio.fail_after(10):
                    while len(joined) < 40:
                        await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(player, i)
            rt = reg.runtime(node)
            with anyio.fail_after(10):
                while sum(rt.reserved.values()) < 40:  # all placed (promised), none created yet
                    await anyio.sleep(0.01)
            release.set()
        rooms = sorted(set(joined.values()))
        assert len(rooms) == 20
        assert sorted(list(joined.values()).count(r) for r in rooms) == [2] * 20

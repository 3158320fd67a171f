"""What a room keeps between inputs: no executor task while idle, no per-room leftovers.

A server holds thousands of rooms, so each structure a room keeps costs a few
MB per thousand; these tests pin the guarantees of the lighter structures.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.backends import open_backend
from rtcore.rooms import runtime
from rtcore.rooms.room import RoomClock
from rtcore.testing import FakeClock, connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


class Later(msgspec.Struct):
    fired: int = 0
    said: int = 0


def later_app() -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("rooms-memory")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("later")
    class LaterRoom(rooms.Room[Later]):
        max_clients = 4

        @rooms.message("later")
        async def later(self, player: rooms.Player, data: Any) -> int:
            self.clock.set_timeout(5.0, self.fire)
            self.state.said += 1
            return self.state.said

        def fire(self) -> None:
            self.state.fired += 1

    return app, reg


async def test_an_idle_room_holds_no_task_and_a_timer_set_inline_still_fires() -> None:
    """Between inputs an idle room runs no executor task and keeps no wake Event; a timer
    set by an input applied inline (on the command's task) starts the task, which fires it.

    Mutation seen caught: make ``_Actor._schedule`` not ``poke()`` → no task runs for the
    timer → ``fired`` stays 0 → fails; make ``_wait`` end the task even with a timer due
    (``if due is None`` → ``if True``) → fails the same way; never end the task (``return
    True`` for ``due is None``, waiting on the Event) → the idle room keeps its task → fails.
    """
    clock = FakeClock()
    app, reg = later_app()
    async with serve(app, clock=clock) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "later"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        actor = reg.runtime(node).actors[rid]
        assert not actor.running and actor.wake is None  # idle: no task, no Event
        assert await a.command("room.send", {"room_id": rid, "type": "later"}) == 1
        # No settle here: it pokes the room itself, which would hide a timer that did not.
        assert actor.running  # a timer is due: the executor waits for it
        clock.advance(6.0)
        with anyio.fail_after(10):
            while (await reg.state(node, rid))["state"]["fired"] != 1:
                await anyio.sleep(0.01)
        await reg.settle(node, rid)
        assert not actor.running and actor.wake is None  # nothing due any more: the task ended
        assert await a.command("room.send", {"room_id": rid, "type": "later"}) == 2  # and it still answers


async def test_a_clean_stop_releases_the_lease_of_an_idle_room() -> None:
    """An idle room (no executor task) still has its lease released when its node stops
    cleanly, so another node takes it over at once instead of after the lease runs out.

    Mutation seen caught: drop the loop over task-less rooms in ``_Runtime._keep``'s
    ``finally`` → node C cannot take the lease → fails.
    """
    clock = FakeClock()
    app, reg = make_app(tick_rate=None)
    backend = await open_backend("memory://")
    try:
        async with serve(app, backend, node_id="A", clock=clock) as na:
            created = await na.dispatch(rtcore.Principal("alice"), "room.create", {"type": "game"})
            rid = created.result["room_id"]
            await reg.settle(na, rid)
            assert not reg.runtime(na).actors[rid].running
        assert await backend.leases.acquire(f"room:{rid}", "C", now=clock(), ttl=runtime.LEASE)
    finally:
        await backend.aclose()


async def test_results_keep_the_newest_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The results an owner keeps (a plain dict now) drop the oldest entries first.

    Mutation seen caught: drop the newest instead (``next(reversed(...))``) → the kept
    offsets are not the last ones → fails.
    """
    monkeypatch.setattr(runtime, "RESULTS_KEPT", 3)
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        rid = (await a.command("room.create", {"type": "game"}))["room_id"]
        for i in range(5):
            assert await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == i + 1
        actor = reg.runtime(node).actors[rid]
        assert list(actor.results) == [actor.applied - 2, actor.applied - 1, actor.applied]


async def test_rooms_joined_here_are_listed_once_and_forgotten_on_leave() -> None:
    """``via_here`` (the rooms each user joined through this node, for their drops) holds
    a room once however many tabs joined it, and forgets a user who left every room.

    Mutation seen caught: drop the ``room_id not in joined`` check → ``[rid, rid]`` →
    fails; drop ``del self.via_here[uid]`` → an empty list stays → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a, connect(node, "b") as b1, connect(node, "b") as b2:
        rid = (await a.command("room.create", {"type": "game"}))["room_id"]
        await b1.command("room.join", {"room_id": rid})
        await b2.command("room.join", {"room_id": rid})
        rt = reg.runtime(node)
        assert rt.via_here["b"] == [rid]
        await b1.command("room.leave", {"room_id": rid})
        assert "b" not in rt.via_here
        assert rt.via_here["a"] == [rid]


async def test_a_loaded_follower_keeps_no_ready_event() -> None:
    """A follower loaded from the backend wakes every reader that waited for it, then drops
    its ``ready`` Event; one that follows a new history never makes one.

    Mutation seen caught: drop ``ready.set()`` in ``Followers._load`` → the waiting
    readers never wake → ``fail_after`` → fails.
    """
    app, _reg = make_app(tick_rate=None)
    backend = await open_backend("memory://")
    try:
        async with serve(app, backend, node_id="A") as na:
            rid = (await na.dispatch(rtcore.Principal("alice"), "room.create", {"type": "game"})).result["room_id"]
            stream = f"room:{rid}"
            assert na.followers._by_stream[stream].ready is None  # a new history: folded from offset 1
            async with serve(app, backend, node_id="B") as nb:
                got: list[Any] = []

                async def read() -> None:
                    got.append((await nb.state_of(stream)).state.room["id"])

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for _ in range(3):
                            tg.start_soon(read)
                assert got == [rid, rid, rid]
                assert nb.followers._by_stream[stream].ready is None
    finally:
        await backend.aclose()


def test_per_room_objects_have_no_instance_dict() -> None:
    """An owner, its clock and a follower are slotted (a ``__dict__`` each was a third of
    an owner's own memory).

    Mutation seen caught: remove ``_Actor.__slots__`` → fails.
    """
    from rtcore.engine.followers import Follower

    for cls in (runtime._Actor, RoomClock, Follower):
        assert cls.__dictoffset__ == 0, cls  # type: ignore[attr-defined]


async def test_a_memory_stream_is_a_list_until_trimmed() -> None:
    """``memory://`` keeps a stream's events in a list (a room's streams are mostly never
    trimmed; an empty deque is ~760 bytes) and turns it into a deque at the first trim,
    which drops the oldest event and forgets its idempotency key.

    Mutation seen caught: drop the oldest with ``events.pop(0)`` and skip the key
    bookkeeping on the list path → the trimmed key still answers as a duplicate → fails.
    """
    from collections import deque

    from rtcore.backends.base import Retention
    from rtcore.backends.memory import MemoryEventLog

    log = MemoryEventLog()
    await log.append("s", "t", 1, now=0.0, key="k1")
    assert type(log._streams["s"].events) is list
    keep = Retention(max_events=2)
    await log.append("s", "t", 2, now=0.0, key="k2", retention=keep)
    await log.append("s", "t", 3, now=0.0, key="k3", retention=keep)
    assert type(log._streams["s"].events) is deque
    page = await log.read("s", after=0, limit=10)
    assert [e.data for e in page.events] == [2, 3] and page.first == 2
    again = await log.append("s", "t", 4, now=0.0, key="k1", retention=keep)
    assert not again.duplicate and again.event.offset == 4

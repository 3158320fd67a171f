"""Snapshot/sync points are settled off the fold, on the state at their own offset.

The follower does not encode the state inside the fold (a room's tick step):
it queues a loop callback when a point's event is dispatched, and settles a
pending point synchronously before the next event is folded or reaches a
subscriber. These tests dispatch events back to back (``memory://`` appends
never yield, so no loop callback runs in between) and check what a
subscriber gets against its own fold.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore.protocol.frames import Evt, Snap, Sync
from rtcore.protocol.state import checksum
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio
EVENTS = 25


class Tally(msgspec.Struct):
    seen: list[int] = []

    def apply(self, event: rtcore.Event) -> None:
        self.seen.append(event.data["i"])


def _app() -> rtcore.App:
    app = rtcore.App("syncpoints")
    app.state("tally:*", Tally, snapshot_every=6, sync_every=3)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    return app


async def _frames_until(c: Any, stream: str, offset: int) -> list[Any]:
    with anyio.fail_after(10):
        while not any(isinstance(f, Evt) and f.stream == stream and f.offset == offset for f in c.frames):
            await c.next_event(stream)
        # The last point's sync comes from the loop callback queued by its dispatch.
        await anyio.wait_all_tasks_blocked()
    return [f for f in c.frames if isinstance(f, Evt | Sync) and f.stream == stream]


async def test_back_to_back_events_get_every_sync_on_its_own_state() -> None:
    """Each sync point k has one ``sync`` between evt k and evt k+1, with the checksum of the fold at k.

    Mutations seen caught: not settling the pending point in ``on_event``
    before the next event (the next fold settles it without a ``sync``) →
    syncs missing → fails; the loop callback encoding whatever state the
    follower holds (no offset check, no settling before the next fold) →
    checksums of a later state → fails.
    """
    async with serve(_app()) as node, connect(node, token="a") as c:
        await c.subscribe("tally:1")
        await c.next_frame(types=(Snap,))
        for i in range(EVENTS):
            await node.publish("tally:1", "add", {"i": i})  # no await point in between on memory://
        frames = await _frames_until(c, "tally:1", EVENTS)
        mine = Tally()
        syncs: dict[int, str] = {}
        last = 0
        for f in frames:
            if isinstance(f, Evt):
                assert f.offset == last + 1
                last = f.offset
                mine.apply(rtcore.Event(f.stream, f.epoch, f.offset, f.type, f.data, f.ts))
            else:
                assert f.offset == last, f"sync {f.offset} after evt {last}"
                assert f.checksum == checksum(mine), f"sync {f.offset}"
                syncs[f.offset] = f.checksum
        assert sorted(syncs) == list(range(3, EVENTS + 1, 3))


async def test_back_to_back_snapshots_hold_their_offsets_state() -> None:
    """The snapshot stored at a point holds the state at that point, even with events right behind it.

    Mutation seen caught: the loop callback encoding whatever state the
    follower holds (no offset check, no settling before the next fold) →
    the snapshot due at 24 is taken at 25 → fails.
    """
    async with serve(_app()) as node:
        for i in range(EVENTS):
            await node.publish("tally:2", "add", {"i": i})
        with anyio.fail_after(5):
            while (snap := await node.backend.snapshots.get("tally:2")) is None or snap.offset < 24:
                await anyio.sleep(0.01)
        assert snap.offset == 24
        state = msgspec.msgpack.decode(snap.state, type=Tally)
        assert state.seen == list(range(24))
        assert snap.checksum == checksum(state)


class Fragile(msgspec.Struct):
    n: int = 0
    odd: Any = None

    def apply(self, event: rtcore.Event) -> None:
        self.n += 1
        # A value msgspec cannot encode, held only while n is 3 (a sync point).
        self.odd = object() if self.n == 3 else None


async def test_a_point_that_fails_to_encode_stops_nothing_else() -> None:
    """A state that cannot be encoded at a point is logged; the fold, the processors and later points go on.

    Mutation seen caught: no ``try`` around the point's encoding in
    ``_settle`` → the error escapes ``on_event`` of the next event, whose
    processors never see it → fails.
    """
    app = rtcore.App("fragile")
    app.state("fragile:*", Fragile, snapshot_every=100, sync_every=3)
    seen: list[int] = []

    @app.on("fragile:*")
    async def count(ctx: rtcore.Context, event: rtcore.Event) -> None:
        seen.append(event.offset)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    async with serve(app) as node, connect(node, token="a") as c:
        await c.subscribe("fragile:1")
        await c.next_frame(types=(Snap,))
        for i in range(7):
            await node.publish("fragile:1", "add", {"i": i})
        frames = await _frames_until(c, "fragile:1", 7)
        await anyio.wait_all_tasks_blocked()  # the processor's queue drained
        assert seen == list(range(1, 8))
        assert [f.offset for f in frames if isinstance(f, Sync)] == [6]  # 3 could not be encoded
        assert (await node.state_of("fragile:1")).state.n == 7

"""Backend read failures never leave a stream's follower or a subscriber stuck.

A read that fails with a backend error (``backend_unavailable``) while a
stateful stream's follower loads or resyncs to a new epoch, while a
subscriber's backlog is filled, or while the server resubscribes a live
subscriber to a new epoch, is logged and retried with backoff: the follower
or subscriber recovers when the backend answers again, with every event
delivered exactly once and in order. A resubscription refused for good ends
the connection with a ``bye`` naming the error instead of leaving a
subscription that never gets another event (docs/architecture.md, "Backend
read failures").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore.backends import MemoryBackend
from rtcore.backends.base import ReadResult, StreamInfo
from rtcore.errors import BackendError, RtcoreError
from rtcore.protocol.client import Missed
from rtcore.protocol.frames import Evt, Snap, Subbed
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio


class Tally(msgspec.Struct):
    n: int = 0

    def apply(self, event: rtcore.Event) -> None:
        self.n += 1


def make_app(authorize: Callable[[Any, str, str], Awaitable[bool]] | None = None) -> rtcore.App:
    app = rtcore.App()
    app.state("tally:*", Tally, snapshot_every=1000)
    if authorize is not None:
        app.authorize(authorize)
    return app


class Faults:
    """Makes the next ``n`` calls of a backend method fail with ``backend_unavailable``."""

    def __init__(self, backend: MemoryBackend, *, only: str = "") -> None:
        self.read = 0
        self.info = 0
        self.failed = {"read": 0, "info": 0}
        self.reads: list[tuple[str, int]] = []
        #: Set: a read waits for ``release`` before it runs (the test changes the backend meanwhile).
        self.hold: anyio.Event | None = None
        self.release = anyio.Event()
        real_read, real_info = backend.events.read, backend.events.info

        async def read(stream: str, *, after: int, limit: int) -> ReadResult:
            self.reads.append((stream, after))
            if self.hold is not None:
                hold, self.hold = self.hold, None
                hold.set()
                await self.release.wait()
            if self.read and stream.startswith(only):
                self.read -= 1
                self.failed["read"] += 1
                raise BackendError("redis went away")
            return await real_read(stream, after=after, limit=limit)

        async def info(stream: str) -> StreamInfo:
            if self.info:
                self.info -= 1
                self.failed["info"] += 1
                raise BackendError("redis went away")
            return await real_info(stream)

        backend.events.read = read  # type: ignore[method-assign]
        backend.events.info = info  # type: ignore[method-assign]


async def test_follower_load_recovers_from_failed_history_reads() -> None:
    """Proves: the reads that fill a stateful stream's follower (after its
    snapshot and info) failing N times are retried: ``state_of`` returns the
    full state once the backend answers, bounded here by ``fail_after``.

    Mutation: engine/hub.py ``Tail.fill`` re-raises the failed read instead of
    retrying (fill not retried) -> ``_load`` dies with it, the node's task
    group fails and ``state_of`` never returns the state -> fails.
    """
    backend = MemoryBackend()
    for _ in range(1203):  # three pages of history
        await backend.events.append("tally:1", "add", 1, now=0.0)
    faults = Faults(backend)
    faults.read = 3
    async with rtcore.Node(make_app(), backend) as node:
        with anyio.fail_after(20):
            st = await node.state_of("tally:1")
        assert (st.offset, st.state.n) == (1203, 1203)
        assert faults.failed["read"] == 3
        # Every page read once after the retries: after 0 (failed 3 times), 500, 1000.
        assert [after for _, after in faults.reads] == [0, 0, 0, 0, 500, 1000]


async def test_follower_whose_stream_changed_epoch_while_it_loaded_is_not_returned() -> None:
    """Proves: when the stream's history changes (Redis restarted empty) while
    a follower loads, and its read then fails, ``state_of`` returns the new
    epoch's state, not the half-loaded old one.

    Mutation: engine/followers.py ``Followers.get`` returns the follower it
    waited for without checking it is still the stream's follower -> the old
    epoch at offset 0 is returned -> fails.
    """
    backend = MemoryBackend()
    for _ in range(4):
        await backend.events.append("tally:1", "add", 1, now=0.0)
    old_epoch = (await backend.events.info("tally:1")).epoch
    faults = Faults(backend)
    faults.hold = held = anyio.Event()
    faults.read = 2
    async with rtcore.Node(make_app(), backend) as node, anyio.create_task_group() as tg:
        got: list[Any] = []

        async def wait_state() -> None:
            got.append(await node.state_of("tally:1"))

        tg.start_soon(wait_state)
        with anyio.fail_after(10):
            await held.wait()  # the follower read the old epoch's info and is reading its history
            backend.events.reset()  # the backend restarted empty: a new epoch
            for _ in range(3):
                await node.publish("tally:1", "add", 1)
            faults.release.set()
            while not got:
                await anyio.sleep(0.01)
        st = got[0]
        assert st.epoch != old_epoch
        assert (st.epoch, st.offset, st.state.n) == ((await backend.events.info("tally:1")).epoch, 3, 3)


async def test_subscriber_backlog_fill_recovers_and_delivers_every_event_once_in_order() -> None:
    """Proves: a subscriber catching up over several pages whose history reads
    fail N times (with live events appended during the outage) receives, on the
    wire, every event exactly once and in offset order once the backend answers.

    Mutation: the retry restarts the catch-up from where the fill began
    (``delivery.last`` reset to it after a failure) -> the first page is
    re-delivered, duplicate offsets on the wire -> fails.
    Mutation: the retry skips the page that failed (``delivery.last += PAGE``)
    -> a gap -> fails.
    """
    backend = MemoryBackend()
    for i in range(1100):
        await backend.events.append("log:1", "e", i, now=0.0)
    epoch = (await backend.events.info("log:1")).epoch
    faults = Faults(backend)
    async with serve(make_app(), backend) as node, connect(node) as c:
        # The subscribe's first read (the plan's) succeeds; the next pages fail.
        first = backend.events.read

        async def arm(stream: str, *, after: int, limit: int) -> ReadResult:
            page = await first(stream, after=after, limit=limit)
            faults.read = 4
            backend.events.read = first  # type: ignore[method-assign]
            for i in range(1100, 1105):  # live while the backlog cannot be read
                await node.publish("log:1", "e", i)
            return page

        backend.events.read = arm  # type: ignore[method-assign]
        await c.subscribe("log:1", since=rtcore.Position(epoch, 0))
        with anyio.fail_after(20):
            while len(c.seen["log:1"]) < 1105:
                await anyio.sleep(0.01)
        await node.publish("log:1", "e", 1105)
        with anyio.fail_after(5):
            while len(c.seen["log:1"]) < 1106:
                await anyio.sleep(0.01)
        await c.ping()
    assert faults.failed["read"] == 4
    wire = [f.offset for f in c.frames if isinstance(f, Evt)]
    assert wire == list(range(1, 1107))
    assert [e.data for e in c.seen["log:1"]] == list(range(1106))


@pytest.mark.parametrize("stream", ["tally:1", "log:1"])
async def test_live_subscriber_resyncs_to_a_new_epoch_when_the_first_read_fails(stream: str) -> None:
    """Proves: when the backend restarts empty (a new epoch) and the reads of the
    server's resubscription fail N times (the first batch after a Redis restart
    did), the live subscriber still gets the new epoch: ``subbed`` with
    ``recovered: false`` (and a ``snap`` of the new epoch's state on a stateful
    stream) followed by every new event, once each.

    Mutation: engine/node.py ``subscribe(new_epoch=True)`` reads ``info`` once
    (``_info_retrying`` replaced by ``events.info``) -> the resubscription fails,
    the subscriber never hears of the new epoch (the likely place of
    tests/multinode/test_redis_crash.py's no-persistence hang) -> fails.
    """
    backend = MemoryBackend()
    faults = Faults(backend)
    async with serve(make_app(), backend) as node, connect(node) as c:
        await c.subscribe(stream)
        for i in range(3):
            await node.publish(stream, "add", i)
        with anyio.fail_after(5):
            while len(c.seen[stream]) < 3:
                await anyio.sleep(0.01)
        old_epoch = c.seen[stream][0].epoch
        backend.events.reset()
        faults.info = 3
        new_epoch = (await node.publish(stream, "add", 3)).epoch
        for i in range(4, 6):
            await node.publish(stream, "add", i)
        with anyio.fail_after(20):
            while not any(isinstance(f, Evt | Snap) and f.epoch == new_epoch and f.offset == 3 for f in c.frames):
                await anyio.sleep(0.01)
        assert faults.failed["info"] == 3
        resub = [f for f in c.frames if isinstance(f, Subbed) and f.epoch == new_epoch]
        assert len(resub) == 1 and resub[0].recovered is False
        assert c.notices and isinstance(c.notices[-1], Missed) and c.notices[-1].epoch == new_epoch
        evts = [(f.epoch, f.offset) for f in c.frames if isinstance(f, Evt)]
        assert evts[:3] == [(old_epoch, 1), (old_epoch, 2), (old_epoch, 3)]
        after = 0
        if stream.startswith("tally"):
            snap = next(f for f in c.frames if isinstance(f, Snap) and f.epoch == new_epoch)
            assert snap.state == {"n": snap.offset}
            after = snap.offset
        assert evts[3:] == [(new_epoch, o) for o in range(after + 1, 4)]
        await c.ping()  # the connection stayed up


@pytest.mark.parametrize("refusal", ["authorize", "read"])
async def test_resubscription_refused_for_good_closes_with_a_bye_naming_the_error(refusal: str) -> None:
    """Proves: a resubscription to a new epoch refused with a final error (the
    authorize hook now says no; or the stream's read fails with a
    non-retryable error) ends the connection with ``bye`` naming that error
    (``reconnect`` from its ``retryable``) and close 1011, rather than leaving
    a subscription that gets nothing, silently, or retrying it for ever.

    Mutation: server/gateway.py ``_subscribe`` returns silently when its own
    resubscription fails (as before) -> the connection stays open, no ``bye``
    -> ``wait_closed`` times out -> fails.
    Mutation: engine/node.py ``_info_retrying`` retries a non-retryable error
    too (its ``if not exc.retryable: raise`` removed) -> no ``bye`` ("read") -> fails.
    """
    allow = {"yes": True}

    async def authorize(principal: Any, action: str, resource: str) -> bool:
        return allow["yes"]

    backend = MemoryBackend()
    real_info = backend.events.info
    async with serve(make_app(authorize), backend) as node, connect(node) as c:
        await c.subscribe("log:1")
        await node.publish("log:1", "e", 0)
        await c.next_event("log:1")
        if refusal == "authorize":
            allow["yes"] = False
        else:

            async def broken_info(stream: str) -> StreamInfo:
                if stream == "log:1":
                    raise RtcoreError("the store refuses this stream", code="internal", retryable=False)
                return await real_info(stream)

            backend.events.info = broken_info  # type: ignore[method-assign]
        backend.events.reset()
        await node.publish("log:1", "e", 1)
        closed = await c.wait_closed(timeout=10)
        assert c.bye is not None
        assert (c.bye.code, c.bye.reconnect) == (("forbidden", False) if refusal == "authorize" else ("internal", False))
        assert closed.close_code == 1011


async def test_room_taken_over_while_history_reads_fail_keeps_its_state() -> None:
    """Proves: a room's new owner (node B adopting it after node A stopped)
    whose follower of the room's stream loads while that stream's history
    reads fail N times recovers: B folds the room's document once the backend
    answers and continues it (the entry counter goes on from A's).

    Mutation: engine/hub.py ``Tail.fill`` re-raises the failed read instead of
    retrying -> B's follower load dies with it and node B's task group fails
    -> fails.
    """
    from rtcore.backends import open_backend

    from .rooms.roomapp import make_app as room_app

    app, reg = room_app(tick_rate=None)
    backend = await open_backend("memory://")
    assert isinstance(backend, MemoryBackend)
    faults = Faults(backend, only="room:")
    made = anyio.Event()
    stop_a = anyio.Event()
    a_done = anyio.Event()
    rid = ""

    async def node_a() -> None:
        nonlocal rid
        async with serve(app, backend, node_id="A") as na, connect(na, "alice") as alice:
            rid = (await alice.command("room.create", {"type": "game"}))["room_id"]
            await alice.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key="m1")
            made.set()
            await stop_a.wait()  # then A stops cleanly (its lease is released)
        a_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(node_a)
        await made.wait()
        # B starts after the room's first events: it follows the room's stream
        # from a load (snapshot, info, history), not from offset 1.
        async with serve(app, backend, node_id="B") as nb, connect(nb, "bob") as bob:
            faults.read = 3
            await bob.command("room.join", {"room_id": rid})
            with anyio.fail_after(20):
                while faults.failed["read"] < 3:
                    await anyio.sleep(0.01)
                stop_a.set()
                await a_done.wait()
            with anyio.fail_after(20):
                assert await bob.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}, key="m2") == 2
            actor = reg.runtime(nb).actors[rid]
            assert set(actor.members) == {"alice", "bob"}
            assert actor.prev["state"]["counter"] == 2
            assert faults.read == 0

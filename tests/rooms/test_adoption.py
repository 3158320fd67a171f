"""Adopting a room: the new owner restores from a fold that reached the heads, or not at all.

A node that takes a room over (``_Runtime._adopt``) folds ``room:{id}`` and
each player's ``roomview:{id}:{user}`` with its own followers, which trail the
backend by the live feed's delay. These tests hold one node's fold of a stream
back (:class:`Held`: the node's ``Followers.fold`` keeps that stream's events
instead of folding them, the smallest seam that makes a fold trail on purpose;
nothing else of the node changes) and check that the room is restored from
the heads it must cover, or not adopted at all (``room_unavailable``), and
that a room whose history cannot be run on a node is contained there. Two
tests check the engine seams this relies on directly: ``Node.state_at_least``
across a new history, and a stream that cannot be folded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.backends import open_backend
from rtcore.backends.base import Backend
from rtcore.engine.followers import Follower
from rtcore.engine.node import Node
from rtcore.protocol.frames import Err
from rtcore.protocol.types import Event, Snapshot
from rtcore.rooms import runtime
from rtcore.testing import FakeClock, connect, serve

pytestmark = pytest.mark.anyio


class Held:
    """Hold ``node``'s fold of ``stream``: the events its follower gets are kept until :meth:`release`."""

    def __init__(self, node: Node, stream: str) -> None:
        self.stream = stream
        self.kept: list[tuple[Follower, Event]] = []
        self.holding = True
        self._fold = node.followers.fold
        node.followers.fold = self._fold_or_keep  # type: ignore[method-assign]

    def _fold_or_keep(self, f: Follower, event: Event) -> None:
        if self.holding and event.stream == self.stream:
            self.kept.append((f, event))
        else:
            self._fold(f, event)

    def release(self) -> None:
        """Fold what was kept, in order, and fold on as usual."""
        self.holding = False
        kept, self.kept = self.kept, []
        for f, event in kept:
            self._fold(f, event)


async def _token(token: str | None) -> str | None:
    return token


class Cards(msgspec.Struct):
    hands: dict[str, list[str]] = {}
    table: list[str] = []


def card_app() -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("adoption-cards")
    reg = rooms.install(app)
    app.authenticate(_token)

    @reg.define("cards")
    class CardRoom(rooms.Room[Cards]):
        private_fields = ("hands",)

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.hands[player.id] = [f"{player.id}-{i}" for i in range(3)]

        async def on_drop(self, player: rooms.Player) -> None:
            self.allow_reconnection(player, 600)

        @rooms.message("play")
        async def play(self, player: rooms.Player, data: None) -> str:
            card = self.state.hands[player.id].pop(0)
            self.state.table.append(card)
            return card

    return app, reg


class Tally(msgspec.Struct):
    count: int = 0


class TallyV2(msgspec.Struct):
    """A later release of :class:`Tally`: a count may no longer be negative."""

    count: Annotated[int, msgspec.Meta(ge=0)] = 0


def tally_app(state_type: Any = Tally) -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("adoption-tally")
    reg = rooms.install(app)
    app.authenticate(_token)

    class TallyRoom(rooms.Room[state_type]):  # type: ignore[valid-type]
        async def on_drop(self, player: rooms.Player) -> None:
            self.allow_reconnection(player, 600)

        @rooms.message("add")
        async def add(self, player: rooms.Player, data: int) -> int:
            self.state.count += data
            return int(self.state.count)

        @rooms.message("peek")
        async def peek(self, player: rooms.Player, data: Any) -> int:
            return int(self.state.count)  # no change, so no patch: nothing fences a stale owner off

    reg.define("tally")(TallyRoom)
    return app, reg


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """One backend shared by the test's nodes (as several processes share one database)."""
    url = "memory://" if request.param == "memory" else f"sqlite://{tmp_path / 'rooms.db'}"
    b = await open_backend(url)
    try:
        yield b
    finally:
        await b.aclose()


async def _lease_is_free(backend: Backend, stream: str, now: float) -> bool:
    if not await backend.leases.acquire(stream, "probe", now=now, ttl=1.0):
        return False
    await backend.leases.release(stream, "probe")
    return True


async def test_a_view_fold_behind_its_head_is_waited_for() -> None:
    """The adopting node's fold of a player's view trails the view's head: restore waits
    until it caught up and the new owner holds the latest hand, instead of an old one.

    The fold is released by the first wait for it (a task spawned when restore asks
    ``Node.state_at_least`` for the view, which runs once that wait is registered).

    Mutation: read the view in ``_Actor.restore`` with ``node.state_of`` (no wait,
    what the old 100 x 10 ms loop amounted to once it gave up) → B restores alice's
    hand as it was before her second play, she plays ``alice-1`` twice → fails.
    """
    app, reg = card_app()
    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="B") as nb, connect(nb, "alice") as alice_b:
        async with serve(app, backend, node_id="A") as na, connect(na, "alice") as alice:
            room = await alice.command("room.create", {"type": "cards"})
            rid, view = room["room_id"], room["view"]
            assert await alice.command("room.send", {"room_id": rid, "type": "play"}) == "alice-0"
            head = reg.runtime(na).actors[rid].view_heads["alice"]
            await nb.state_at_least(view, head)  # B follows the view, caught up
            held = Held(nb, view)
            assert await alice.command("room.send", {"room_id": rid, "type": "play"}) == "alice-1"
            assert held.kept  # B's fold of the view is one patch behind
        waits: list[tuple[str, int]] = []
        wait = nb.state_at_least

        async def release() -> None:
            held.release()

        async def state_at_least(stream: str, offset: int, *, epoch: str | None = None) -> Any:
            if stream == view:
                waits.append((stream, offset))
                nb.spawn(release)  # runs once this task waits
            return await wait(stream, offset, epoch=epoch)

        nb.state_at_least = state_at_least  # type: ignore[method-assign]
        with anyio.fail_after(10):
            assert await alice_b.command("room.send", {"room_id": rid, "type": "play"}) == "alice-2"
        actor = reg.runtime(nb).actors[rid]
        assert actor.full_prev["table"] == ["alice-0", "alice-1", "alice-2"]
        assert actor.full_prev["hands"] == {"alice": []}
        assert waits and waits[0][1] > head


class Count(msgspec.Struct):
    n: int = 0

    def apply(self, event: Event) -> None:
        self.n += 1


async def test_state_at_least_follows_the_stream_into_a_new_history() -> None:
    """``Node.state_at_least`` waits for the stream, not for one follower: when the
    history starts over (a new epoch) while it waits, the new follower's fold answers.

    Mutation: in ``Followers.at_least`` keep waiting on the follower found first (no
    look-up after a wake-up) → its state stays at offset 2 forever → times out → fails.
    """
    app = rtcore.App("at-least")
    app.state("count:*", Count)
    async with serve(app) as node:
        for _ in range(2):
            await node.publish("count:a", "x")
        assert (await node.state_at_least("count:a", 2)).state.n == 2
        got: list[Any] = []

        async def waiter() -> None:
            got.append(await node.state_at_least("count:a", 3))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()  # the waiter waits on the first history's follower
                node.backend.events.reset()  # type: ignore[attr-defined]  # the history is gone: a new epoch starts
                for _ in range(3):
                    await node.publish("count:a", "x")
        st = got[0]
        assert st.offset == 3 and st.state.n == 3
        assert st.epoch == (await node.backend.events.info("count:a")).epoch


class Strict(msgspec.Struct):
    n: int = 0

    def apply(self, event: Event) -> None:
        if event.type != "x":
            raise ValueError(f"no fold for {event.type!r}")
        self.n += 1


@pytest.mark.parametrize("cause", ["snapshot", "event"])
async def test_a_stream_that_cannot_be_folded_does_not_stop_the_node(backend: Backend, cause: str) -> None:
    """A node that loads a stream whose snapshot cannot be decoded, or whose history
    holds an event its ``apply`` refuses, keeps running: that stream's
    ``state_at_least`` raises (what rooms turn into ``room_unavailable``), its
    ``state_of`` answers the last state folded, and other streams fold on.

    Mutations: ``Followers._load`` without the ``try`` around ``from_snapshot``, or
    ``Followers.fold`` letting ``apply`` raise → the loading task's exception ends
    node B's task group → fails.
    """
    app = rtcore.App("unfoldable")
    app.state("strict:*", Strict)
    async with serve(app, backend, node_id="A") as na:
        for _ in range(3):
            await na.publish("strict:a", "x")
        info = await backend.events.info("strict:a")
        if cause == "snapshot":
            await backend.snapshots.put(Snapshot("strict:a", info.epoch, 2, b"\xc1 not msgpack", "0"))
        else:
            await backend.events.append("strict:a", "y", None, now=0.0)
    async with serve(app, backend, node_id="B") as nb:
        with anyio.fail_after(10), pytest.raises(rtcore.RtcoreError) as exc:
            await nb.state_at_least("strict:a", info.head)
        assert "cannot be folded" in exc.value.message
        st = await nb.state_of("strict:a")
        assert (st.offset, st.state.n) == ((2, 0) if cause == "snapshot" else (3, 3))
        await nb.publish("strict:b", "x")
        with anyio.fail_after(10):
            assert (await nb.state_at_least("strict:b", 1)).state.n == 1


async def test_a_fold_behind_beyond_the_wait_is_not_adopted(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adopting node's fold of ``room:{id}`` stays behind past ``FOLD_WAIT``: no
    owner is made from it (its state misses an acknowledged move); the command gets
    ``room_unavailable`` (retryable), the lease is released, the next command before
    the next try is refused without a new adoption, and once the fold caught up the
    next try restores the room with every move.

    Mutation: in ``_Runtime.folded`` go on with ``node.state_of`` after the timeout,
    as the old loop did → B adopts the room with count 1 and ``peek`` answers 1 → fails.
    """
    monkeypatch.setattr(runtime, "FOLD_WAIT", 0.2)
    clock = FakeClock()
    app, reg = tally_app()
    async with serve(app, backend, node_id="B", clock=clock) as nb, connect(nb, "alice") as alice_b:
        async with serve(app, backend, node_id="A", clock=clock) as na, connect(na, "alice") as alice:
            rid = (await alice.command("room.create", {"type": "tally"}))["room_id"]
            assert await alice.command("room.send", {"room_id": rid, "type": "add", "data": 1}) == 1
            await nb.state_at_least(f"room:{rid}", reg.runtime(na).actors[rid].head)
            held = Held(nb, f"room:{rid}")
            assert await alice.command("room.send", {"room_id": rid, "type": "add", "data": 1}) == 2
        # A stopped (its lease released); B's fold of the room still says 1.
        rt = reg.runtime(nb)
        peek = {"room_id": rid, "type": "peek"}
        with anyio.fail_after(10):
            reply = await alice_b.command_reply("room.send", peek, key="p1")
        assert isinstance(reply, Err) and (reply.code, reply.retryable) == ("room_unavailable", True)
        assert rid not in rt.actors and rt.down[rid].attempts == 1
        assert await _lease_is_free(backend, f"room:{rid}", clock())
        again = await alice_b.command_reply("room.send", peek, key="p2")
        assert isinstance(again, Err) and again.code == "room_unavailable"
        assert rt.down[rid].attempts == 1  # refused before the next try: not adopted again
        held.release()
        clock.advance(runtime.RETRY_FIRST)
        with anyio.fail_after(10):
            assert await alice_b.command("room.send", peek, key="p1") == 2
        assert rid not in rt.down and rt.actors[rid].prev["state"] == {"count": 2}


@pytest.mark.parametrize("cause", ["state_type", "history"])
async def test_a_room_that_cannot_be_restored_is_contained(
    backend: Backend, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A room whose history this node cannot run (its state type changed so the
    document no longer converts; or an event of ``room:{id}`` that ``apply`` cannot
    fold) does not stop the node nor the supervisor: every other room is adopted, the
    broken one's commands get ``room_unavailable``, it is logged once with its id and
    the reason, and it is tried again only after its pause (then logged no more).

    Mutations: let ``_Runtime._adopt`` raise the restore's own exception (no
    ``room_unavailable``) → the supervisor's pass stops at the broken room, which
    sorts first, and no other room is adopted (the command gets ``internal``) → fails;
    let ``Followers.fold`` raise (no ``_failed``) → the ``history`` case stops node B
    → fails; drop the ``retry_at`` check in ``_Runtime.supervise`` → the supervisor
    adopts it again without waiting → attempts grow → fails.
    """
    caplog.set_level(logging.DEBUG, logger="rtcore")
    clock = FakeClock()
    app, _ = tally_app()
    async with serve(app, backend, node_id="A", clock=clock) as na, connect(na, "alice") as alice:
        ids = sorted([(await alice.command("room.create", {"type": "tally"}))["room_id"] for _ in range(4)])
        broken, healthy = ids[0], ids[1:]
        for rid in healthy:
            await alice.command("room.send", {"room_id": rid, "type": "add", "data": 1})
        if cause == "state_type":
            await alice.command("room.send", {"room_id": broken, "type": "add", "data": -5})
    if cause == "history":
        # Not a patch the rooms can apply (a bad write by a tool, a newer release's op).
        await backend.events.append(f"room:{broken}", "patch", {"ops": [["bogus", ["state"], 1]]}, now=clock())
    app2, reg2 = tally_app(TallyV2 if cause == "state_type" else Tally)
    async with serve(app2, backend, node_id="B", clock=clock) as nb, connect(nb, "alice") as alice_b:
        rt = reg2.runtime(nb)
        with anyio.fail_after(15):  # the supervisor's first passes (every 2 s)
            while not (set(healthy) <= set(rt.actors) and broken in rt.down):
                await anyio.sleep(0.05)
        assert broken not in rt.actors and rt.down[broken].attempts == 1
        assert await _lease_is_free(backend, f"room:{broken}", clock())
        reply = await alice_b.command_reply("room.send", {"room_id": broken, "type": "peek"})
        assert isinstance(reply, Err) and (reply.code, reply.retryable) == ("room_unavailable", True)
        assert await alice_b.command("room.send", {"room_id": healthy[-1], "type": "add", "data": 1}) == 2
        await rt.supervise()  # before its next try: skipped
        assert rt.down[broken].attempts == 1
        clock.advance(runtime.RETRY_FIRST)
        await rt.supervise()  # tried again, fails again: a longer pause, and not logged again
        assert rt.down[broken].attempts == 2
        assert rt.down[broken].retry_at == clock() + 2 * runtime.RETRY_FIRST
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "rtcore.rooms"]
        assert len(errors) == 1 and broken in errors[0].getMessage()
        reason = "ValidationError" if cause == "state_type" else "bogus"
        assert reason in errors[0].getMessage()


async def test_a_room_another_node_can_run_is_forwarded_to_it(backend: Backend) -> None:
    """During a rolling upgrade node B (the new state type) cannot restore a room
    that node C (the old one) can: once C owns it, B forwards the room's commands to
    C as to any owner instead of refusing them while its own next try is pending.

    Mutation: make ``_Runtime._while_down`` refuse without looking at the lease →
    alice's command on B gets ``room_unavailable`` → fails.
    """
    clock = FakeClock()
    app, _ = tally_app()
    async with serve(app, backend, node_id="A", clock=clock) as na, connect(na, "alice") as alice:
        rid = (await alice.command("room.create", {"type": "tally"}))["room_id"]
        await alice.command("room.send", {"room_id": rid, "type": "add", "data": -5})
    app_b, reg_b = tally_app(TallyV2)
    async with serve(app_b, backend, node_id="B", clock=clock) as nb, connect(nb, "alice") as alice_b:
        reply = await alice_b.command_reply("room.send", {"room_id": rid, "type": "peek"})
        assert isinstance(reply, Err) and reply.code == "room_unavailable"
        app_c, reg_c = tally_app(Tally)
        async with serve(app_c, backend, node_id="C", clock=clock) as nc, connect(nc, "alice") as alice_c:
            assert await alice_c.command("room.send", {"room_id": rid, "type": "add", "data": 1}) == -4
            assert rid in reg_c.runtime(nc).actors
            with anyio.fail_after(10):
                assert await alice_b.command("room.send", {"room_id": rid, "type": "add", "data": 1}) == -3
            assert rid not in reg_b.runtime(nb).actors

"""The owner's fast path: a command on the owner's node applies its input on its own task.

``_Actor.run_inline`` (see rtcore/rooms/runtime.py) lets the command that
appended an input run the executor's step itself when the executor is parked
with nothing else to do, instead of handing the input over and waiting for
the executor's task. These tests pin that the path is taken, and that it
keeps what the executor guarantees: one step at a time in inbox order, each
input applied once, and a step finished (patch written) even when the command
that runs it is cancelled halfway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.rooms.runtime import RoomDoc
from rtcore.testing import FakeClock, connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


async def test_a_local_input_is_applied_on_the_commands_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an idle room, a move from a client of the owner's node is applied by the command
    itself: nothing is handed to the executor's task.

    Mutation seen caught: make ``run_inline`` return ``False`` at once → each input goes
    through ``_Actor.push`` → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        actor = reg.runtime(node).actors[rid]
        pushed: list[int] = []
        push = type(actor).push

        def counting(self: Any, ev: Any) -> None:
            if self is actor:
                pushed.append(ev.offset)
            push(self, ev)

        monkeypatch.setattr(type(actor), "push", counting)  # an actor has slots: patched on its class
        for i in range(5):
            await reg.settle(node, rid)  # the executor is parked again before each move
            assert await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == i + 1
        assert pushed == []


class Count(msgspec.Struct):
    counter: int = 0


def counting_app() -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("inline-count")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("count")
    class CountRoom(rooms.Room[Count]):
        max_clients = 8

        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Any) -> int:
            # Yields halfway: two steps running at once would lose an update.
            before = self.state.counter
            await anyio.lowlevel.checkpoint()
            self.state.counter = before + 1
            return self.state.counter

    return app, reg


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_concurrent_inputs_are_applied_once_each_in_inbox_order(backend: str, tmp_path: Path) -> None:
    """Many clients joining and sending at once (some inputs run inline, the others wait
    for the executor), with a handler that yields halfway and a backend whose appends
    yield (sqlite): every input is applied exactly once and the patches of ``room:{id}``
    cover the inbox in order. This is the end-to-end check under load; each interleaving
    it may or may not hit is pinned deterministically, with its mutation, by the tests
    below (no single mutation of those was seen to fail this one on its own).
    """
    app, reg = counting_app()
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'rooms.db'}"
    async with serve(app, url) as node:
        async with connect(node, "p0") as c0:
            room = await c0.command("room.create", {"type": "count"})
            rid = room["room_id"]
            results: list[int] = []

            async def player(i: int) -> None:
                async with connect(node, f"p{i}") as c:
                    if i:
                        await c.command("room.join", {"room_id": rid})
                    for _ in range(10):
                        results.append(await c.command("room.send", {"room_id": rid, "type": "add"}))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(6):
                        tg.start_soon(player, i)
            assert sorted(results) == list(range(1, 61))
            await reg.settle(node, rid)
            actor = reg.runtime(node).actors[rid]
            assert not actor.closed  # no step was fenced off
            page = await node.backend.events.read(f"room:{rid}", after=0, limit=1000)
            covered = [e.data["inbox"] for e in page.events if e.type == "patch"]
            assert covered == sorted(set(covered))
            inbox = (await node.backend.events.info(f"roominbox:{rid}")).head
            assert actor.applied == inbox == covered[-1]
            st = (await node.state_of(f"room:{rid}")).state
            assert isinstance(st, RoomDoc) and st.state["counter"] == 60


class Slow(msgspec.Struct):
    counter: int = 0


async def test_a_cancelled_command_still_finishes_its_step() -> None:
    """A command cancelled while its input runs inline (its client left mid-move) still
    finishes the step: the input is applied once and its patch written, and the room goes on.

    Mutation seen caught: drop the ``CancelScope(shield=True)`` around ``apply_entry`` in
    ``run_inline`` → the handler's change stays without its patch and the executor
    applies the input again from the log → the counter ends at 3, not 2 → fails.
    """
    app = rtcore.App("inline-cancel")
    reg = rooms.install(app)
    inside = anyio.Event()
    gate = anyio.Event()

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("slow")
    class SlowRoom(rooms.Room[Slow]):
        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Any) -> int:
            self.state.counter += 1
            if data == "wait":
                inside.set()
                await gate.wait()
            return self.state.counter

    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "slow"})
        assert created.ok
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(node.dispatch, who, "room.send", {"room_id": rid, "type": "add", "data": "wait"})
                await inside.wait()
                tg.cancel_scope.cancel()  # the command is cancelled inside the handler
                gate.set()  # (no checkpoint in between) the handler may go on
            second = await node.dispatch(who, "room.send", {"room_id": rid, "type": "add", "data": "go"})
        assert second.ok and second.result == 2
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state["counter"] == 2
        assert st.inbox == (await node.backend.events.info(f"roominbox:{rid}")).head


def gated_app() -> tuple[rtcore.App, rooms.Rooms, anyio.Event, anyio.Event]:
    """A room whose ``add`` with data ``"wait"`` counts, then waits for ``gate``."""
    app = rtcore.App("inline-gated")
    reg = rooms.install(app)
    inside = anyio.Event()
    gate = anyio.Event()

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("gated")
    class GatedRoom(rooms.Room[Slow]):
        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Any) -> int:
            self.state.counter += 1
            if data == "wait":
                inside.set()
                await gate.wait()
            return self.state.counter

    return app, reg, inside, gate


async def test_an_input_arriving_during_an_inline_step_waits_for_it() -> None:
    """While a command runs a step inline (its handler is awaiting), a second input wakes
    the executor; the executor waits for the inline step before applying anything.

    Mutation seen caught: drop the ``while self.inline`` wait in ``_Actor._wait`` → the
    woken executor reads the inbox and applies the first input a second time → the
    counter ends at 3, not 2 → fails.
    """
    app, reg, inside, gate = gated_app()
    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "gated"})
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        actor = reg.runtime(node).actors[rid]
        replies: dict[str, Any] = {}

        async def send(name: str, data: str) -> None:
            replies[name] = await node.dispatch(who, "room.send", {"room_id": rid, "type": "add", "data": data})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, "first", "wait")
                await inside.wait()  # the first input's step is running on its command's task
                tg.start_soon(send, "second", "go")
                while actor.parked:  # the second input woke the executor
                    await anyio.sleep(0.01)
                for _ in range(10):
                    await anyio.lowlevel.checkpoint()  # room for a wrong executor to step now
                gate.set()
        assert replies["first"].result == 1 and replies["second"].result == 2
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state["counter"] == 2


async def test_a_second_command_does_not_step_while_an_inline_step_finishes() -> None:
    """An inline step that is still publishing the room's listing (after its patch) keeps
    the room: the next command's input waits for it instead of stepping alongside.

    Mutation seen caught: drop ``not self.inline`` from ``run_inline``'s condition → the
    second command steps the room while the first is still in its step and answers first
    → fails.
    """
    app, reg, _inside, _gate = gated_app()
    async with serve(app) as node:
        a, b = rtcore.Principal("a"), rtcore.Principal("b")
        created = await node.dispatch(a, "room.create", {"type": "gated"})
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        listing = anyio.Event()
        held = anyio.Event()
        publish = node.publish

        async def holding(stream: str, *args: Any, **kwargs: Any) -> Any:
            if stream.startswith("roomindex:") and not held.is_set():
                held.set()  # the join's step is in its listing publish, after its patch
                await listing.wait()
            return await publish(stream, *args, **kwargs)

        node.publish = holding  # type: ignore[method-assign]
        done: list[str] = []

        async def run(name: str, who: rtcore.Principal, command: str, args: dict[str, Any]) -> None:
            reply = await node.dispatch(who, command, args)
            assert reply.ok, reply
            done.append(name)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "join", b, "room.join", {"room_id": rid})
                await held.wait()
                tg.start_soon(run, "send", a, "room.send", {"room_id": rid, "type": "add", "data": "go"})
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()  # room for a wrong second command to finish first
                listing.set()
        assert done == ["join", "send"]


async def test_an_input_behind_a_gap_goes_to_the_executor() -> None:
    """An input appended on another node that this node's feed has not handed over yet
    leaves a gap in front of the next local input: that input is not run inline but
    handed to the executor, which reads the gap from the log and applies both in order.

    Mutation seen caught: drop ``ev.offset == self.applied + 1`` from ``run_inline``'s
    condition → the local input is applied ahead of the other node's, which is then
    skipped → the counter ends at 1, not 2 → fails.
    """
    app, reg, _inside, _gate = gated_app()
    async with serve(app) as node:
        a = rtcore.Principal("a")
        created = await node.dispatch(a, "room.create", {"type": "gated"})
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        rt = reg.runtime(node)
        rt.wake = lambda room_id, event=None: None  # type: ignore[method-assign]  # a lagging feed
        await node.backend.events.append(
            f"roominbox:{rid}", "send", {"user": "a", "node": "elsewhere", "type": "add", "data": "go"}, now=node.clock()
        )
        reply = await node.dispatch(a, "room.send", {"room_id": rid, "type": "add", "data": "go"})
        assert reply.ok and reply.result == 2
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state["counter"] == 2


class Meta(msgspec.Struct):
    n: int = 0


async def test_room_section_changes_reach_the_document() -> None:
    """The ``room`` section is reused (and not diffed) while nothing in it changed; a change
    of metadata, even ``1`` to ``1.0`` (equal in Python, not on the wire), or of the lock
    is still patched into every follower's document.

    Mutation seen caught: leave metadata and timers out of ``_Actor._room_doc``'s key
    (compare only lock, private, disposed) → the metadata changes are never published →
    fails; compare them with ``==`` instead of as MessagePack → ``1`` → ``1.0`` is lost → fails.
    """
    app = rtcore.App("room-section")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("meta")
    class MetaRoom(rooms.Room[Meta]):
        @rooms.message("set")
        async def set(self, player: rooms.Player, data: Any) -> None:
            if data == "lock":
                self.lock()
            else:
                self.metadata["level"] = data
            self.state.n += 1

    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "meta"})
        rid = created.result["room_id"]
        for value, want in ((1, 1), (1.0, 1.0), ("lock", None)):
            assert (await node.dispatch(who, "room.send", {"room_id": rid, "type": "set", "data": value})).ok
            await reg.settle(node, rid)
            st = (await node.state_of(f"room:{rid}")).state
            assert isinstance(st, RoomDoc)
            if want is not None:
                got = st.room["metadata"]["level"]
                assert got == want and type(got) is type(want)
        assert st.room["locked"] is True and st.state["n"] == 3


async def test_a_fenced_off_inline_step_stops_the_owner_and_the_input_lands_once() -> None:
    """Another writer appended to ``room:{id}`` behind the owner's back: the next inline step's
    patch is fenced off (``expect``), this owner stops without applying the input, and the
    command is answered by the room's next owner (adopted here), which applies it once.

    Mutation seen caught: let the failure propagate out of ``run_inline`` → the command
    answers an error instead of its result → fails. (Dropping only ``self.lost = True``
    is not caught, and need not be: the woken executor retries the input, meets the same
    fence and stops in ``run``, with the same outcome one step later.)
    """
    app, reg, _inside, _gate = gated_app()
    async with serve(app) as node:
        a = rtcore.Principal("a")
        created = await node.dispatch(a, "room.create", {"type": "gated"})
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        first = reg.runtime(node).actors[rid]
        await node.backend.events.append(f"room:{rid}", "msg", {"room": rid, "type": "x", "data": None}, now=node.clock())
        with anyio.fail_after(10):
            reply = await node.dispatch(a, "room.send", {"room_id": rid, "type": "add", "data": "go"})
        assert reply.ok and reply.result == 1, reply
        assert first.closed
        second = reg.runtime(node).actors[rid]
        assert second is not first
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state["counter"] == 1


async def test_room_section_follows_metadata_cleared_and_timers_set_or_fired() -> None:
    """A room without metadata or pending timers takes ``_room_doc``'s short path (no
    copies, no encoding); leaving it (a timer set, metadata added) and coming back to it
    (the timer fired, the metadata cleared) each reach every follower's document.

    Mutation seen caught: drop ``and not self.timers`` from the short path's test → the
    timer set by a move is never published → fails; on the short path return the cached
    section without comparing the key once one is cached → the fired timer and the
    cleared metadata stay in the document → fails.
    """
    app = rtcore.App("room-section-short")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("meta")
    class MetaRoom(rooms.Room[Meta]):
        def bump(self) -> None:
            self.state.n += 100

        @rooms.message("do")
        async def do(self, player: rooms.Player, data: str) -> None:
            if data == "timer":
                self.clock.set_timeout(60, self.bump)
            elif data == "meta":
                self.metadata["level"] = 1
            else:
                self.metadata.clear()
            self.state.n += 1

    clock = FakeClock()
    async with serve(app, clock=clock) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "meta", "private": True})
        rid = created.result["room_id"]

        async def doc() -> RoomDoc:
            await reg.settle(node, rid)
            st = (await node.state_of(f"room:{rid}")).state
            assert isinstance(st, RoomDoc)
            actor = reg.runtime(node).actors[rid]
            assert msgspec.msgpack.encode(st.builtins()) == msgspec.msgpack.encode(actor.prev)
            return st

        steps: list[tuple[str, int, dict[str, Any], int]] = [
            ("timer", 1, {}, 1),
            ("fire", 0, {}, 101),
            ("meta", 0, {"level": 1}, 102),
            ("clear", 0, {}, 103),
        ]
        for step, timers, metadata, n in steps:
            if step == "fire":
                clock.advance(61)
                for _ in range(100):
                    if (await doc()).state["n"] == n:
                        break
                    await anyio.sleep(0.01)
            else:
                assert (await node.dispatch(who, "room.send", {"room_id": rid, "type": "do", "data": step})).ok
            st = await doc()
            assert st.state["n"] == n, (step, st.state)
            assert len(st.room["timers"]) == timers, (step, st.room)
            assert st.room["metadata"] == metadata, (step, st.room)


class Plain(msgspec.Struct):
    seated: list[str] = []


class _Later:
    def __await__(self) -> Any:
        if False:
            yield
        return "awaited"


async def test_plain_hooks_and_handlers_run_and_answer() -> None:
    """Hooks and handlers may be plain ``def``s: their changes are published and a
    handler's return value is the sender's result; a plain ``def`` handler that returns
    an awaitable is awaited like an ``async def`` one.

    Mutation seen caught: in ``rooms.room.call``, return a non-coroutine result
    without the ``inspect.isawaitable`` check (``return result``) → the ``later``
    handler's awaitable is handed back unawaited (not a result) → fails.
    """
    app = rtcore.App("plain-hooks")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("plain")
    class PlainRoom(rooms.Room[Plain]):
        def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.seated.append(player.id)

        @rooms.message("count")
        def count(self, player: rooms.Player, data: Any) -> int:
            return len(self.state.seated)

        @rooms.message("later")
        def later(self, player: rooms.Player, data: Any) -> Any:
            return _Later()  # an awaitable that is not a coroutine

    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "plain"})
        assert created.ok
        rid = created.result["room_id"]
        got = await node.dispatch(who, "room.send", {"room_id": rid, "type": "count"})
        assert got.ok and got.result == 1
        got = await node.dispatch(who, "room.send", {"room_id": rid, "type": "later"})
        assert got.ok and got.result == "awaited"
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state == {"seated": ["a"]}


async def test_an_unknown_inbox_entry_is_answered_internal_and_the_room_goes_on() -> None:
    """An inbox entry of a type the owner does not know (a newer node's, or a bad
    write) is applied as an ``internal`` error: it is covered by the room's next patch
    and the inputs after it are applied as usual.

    Mutation seen caught: look the step up with ``_OPS[ev.type]`` (no default) → the
    ``KeyError`` stops the owner with the entry unapplied → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app) as node:
        a, b = rtcore.Principal("alice"), rtcore.Principal("bob")
        made = await node.dispatch(a, "room.create", {"type": "game"})
        assert made.ok, made
        rid = made.result["room_id"]
        await reg.settle(node, rid)
        bogus = await node.publish(f"roominbox:{rid}", "bogus", {"user": "alice", "node": node.id})
        with anyio.fail_after(10):
            await reg.settle(node, rid)
            got = await node.dispatch(b, "room.join", {"room_id": rid})
        assert got.ok, got
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc)
        assert st.inbox == bogus.offset + 1 and "bob" in st.members


@pytest.mark.timeout(60)
async def test_a_command_cancelled_before_its_inline_step_still_finishes_it() -> None:
    """A command whose cancel scope is already cancelled when its input runs inline
    (its client left between the inbox append and the step) still applies the input
    and writes its patch, also when the handler's first await checks for cancellation
    without suspending (``anyio.Lock.acquire``).

    Mutation seen caught: run ``apply_entry`` in ``run_inline`` without the shielded
    scope → the step is cancelled inside the handler (asyncio and trio) → fails.
    """
    app = rtcore.App("inline-precancelled")
    reg = rooms.install(app)
    lock = anyio.Lock()

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("locked")
    class LockedRoom(rooms.Room[Slow]):
        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Any) -> int:
            async with lock:
                self.state.counter += 1
            return self.state.counter

    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "locked"})
        assert created.ok
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        actor = reg.runtime(node).actors[rid]
        with anyio.CancelScope() as scope:
            scope.cancel()
            await node.dispatch(who, "room.send", {"room_id": rid, "type": "add", "data": None})
        assert actor.applied == (await node.backend.events.info(f"roominbox:{rid}")).head
        with anyio.fail_after(10):
            second = await node.dispatch(who, "room.send", {"room_id": rid, "type": "add", "data": None})
        assert second.ok and second.result == 2
        await reg.settle(node, rid)
        st = (await node.state_of(f"room:{rid}")).state
        assert isinstance(st, RoomDoc) and st.state["counter"] == 2


async def test_a_cancel_scope_the_step_enters_before_suspending_exits() -> None:
    """A handler that enters a cancel scope before its first suspension and leaves it
    after (``move_on_after`` around an await, or ``anyio.Lock``'s shielded checkpoint)
    runs inline without error: the owner's shield is entered before the step starts.

    Mutation seen caught: enter ``run_inline``'s shield only at the step's first
    suspension (a generator driving ``apply_entry``; it saved ~8 % of an in-process
    move's instructions) → the shield nests inside the handler's scope, whose exit
    raises "Attempted to exit a cancel scope that isn't the current task's current
    cancel scope" → the move is answered ``internal`` → fails.
    """
    app = rtcore.App("inline-inner-scope")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("scoped")
    class ScopedRoom(rooms.Room[Slow]):
        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Any) -> int:
            with anyio.move_on_after(5):
                await anyio.lowlevel.checkpoint()
                self.state.counter += 1
            return self.state.counter

    async with serve(app) as node:
        who = rtcore.Principal("a")
        created = await node.dispatch(who, "room.create", {"type": "scoped"})
        assert created.ok
        rid = created.result["room_id"]
        await reg.settle(node, rid)
        for n in (1, 2):
            got = await node.dispatch(who, "room.send", {"room_id": rid, "type": "add", "data": None})
            assert got.ok and got.result == n, got

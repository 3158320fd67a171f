"""One write per move: an input applied on the owner's node is stored with its patch.

On an engine with atomic pairs (``Backend.pairs``: SQLite), ``_Actor.run_paired``
(rtcore/rooms/runtime.py) applies a command's input before it is stored and
then stores the input (in ``roominbox:{id}``) and the patch it made (in
``room:{id}``) with one ``Backend.append_pair``: both or neither. These tests
pin that the path is taken, that a pair that misses stores nothing, and that
the input is then applied exactly once, in inbox order, whatever came between.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import rtcore
from rtcore.backends import Backend, PairAppend
from rtcore.backends.sqlite import open_sqlite
from rtcore.rooms.runtime import RoomDoc
from rtcore.testing import connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


async def _inbox(node: Any, rid: str) -> list[Any]:
    page = await node.backend.events.read(f"roominbox:{rid}", after=0, limit=1000)
    return list(page.events)


async def _settled_doc(node: Any, reg: Any, rid: str) -> RoomDoc:
    await reg.settle(node, rid)
    st = (await node.state_of(f"room:{rid}")).state
    assert isinstance(st, RoomDoc)
    return st


def _wrap_pair(monkeypatch: pytest.MonkeyPatch, backend: Backend, before: Callable[[], Any]) -> list[int]:
    """Run ``before()`` (once) right before the node's next ``append_pair``; count the calls."""
    calls: list[int] = []
    real = backend.append_pair

    async def pair(first: PairAppend, second: PairAppend | None, *, now: float) -> Any:
        calls.append(1)
        if len(calls) == 1:
            await before()
        return await real(first, second, now=now)

    monkeypatch.setattr(backend, "append_pair", pair)
    return calls


async def test_a_local_move_is_one_write_of_input_and_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On ``sqlite://`` each move of a client of the owner's node is stored by one
    ``append_pair`` (its input and its patch) and by no other append to the room's streams;
    the inbox holds each move once and the room document covers it.

    Mutation seen caught: ``pairs = False`` on ``SqliteBackend`` (the two-write path) → the
    inputs go through ``events.append`` → fails.
    """
    app, reg = make_app(tick_rate=None)
    async with serve(app, f"sqlite:///{tmp_path / 'rooms.db'}") as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        single: list[str] = []
        append = node.backend.events.append

        async def counting(stream: str, *args: Any, **kwargs: Any) -> Any:
            if stream.endswith(rid):
                single.append(stream)
            return await append(stream, *args, **kwargs)

        monkeypatch.setattr(node.backend.events, "append", counting)
        calls = _wrap_pair(monkeypatch, node.backend, lambda: _noop())
        for i in range(5):
            await reg.settle(node, rid)
            assert await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}}) == i + 1
        assert len(calls) == 5 and single == []
        inbox = await _inbox(node, rid)
        assert [e.type for e in inbox] == ["create"] + ["send"] * 5
        doc = await _settled_doc(node, reg, rid)
        assert doc.inbox == inbox[-1].offset and doc.state["counter"] == 5


async def _noop() -> None:
    return None


async def test_an_input_from_another_node_in_between_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node appends an input to the room's inbox while the owner applies a local move
    (right before its pair is written): the pair stores nothing (the inbox moved on), the
    owner stops, and both inputs are applied exactly once, in inbox order, by the owner that
    takes the room over; the room then goes back to one write per input.

    Mutation seen caught: drop ``first``'s ``expect`` in ``_Actor._commit_pair`` (pass
    ``None``) → the move is stored after the other input while its patch says it was the
    entry before, and the other input is never applied → the counter is 1, not 11 → fails.
    """
    app, reg = make_app(tick_rate=None)
    url = f"sqlite:///{tmp_path / 'rooms.db'}"
    async with serve(app, url) as node, connect(node, "a") as a, connect(node, "b") as b:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await b.command("room.join", {"room_id": rid})
        await reg.settle(node, rid)
        other = await open_sqlite(url)  # a second node's connection to the same file
        try:

            async def elsewhere() -> None:
                body = {"user": "b", "node": "elsewhere", "type": "add", "data": {"by": 10}}
                await other.events.append(f"roominbox:{rid}", "send", body, now=node.clock())

            calls = _wrap_pair(monkeypatch, node.backend, elsewhere)
            result = await a.command("room.send", {"room_id": rid, "type": "add", "data": {"by": 1}})
        finally:
            await other.aclose()
        assert calls  # the paired path was tried
        assert result == 11  # applied after the other node's input, which came first in the inbox
        inbox = await _inbox(node, rid)
        sends = [(e.data["user"], e.data["data"]["by"]) for e in inbox if e.type == "send"]
        assert sends == [("b", 10), ("a", 1)]  # each input stored once, in that order
        doc = await _settled_doc(node, reg, rid)
        assert doc.state["counter"] == 11 and doc.inbox == inbox[-1].offset
        assert rid in reg.runtime(node).unpaired


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_pair_whose_patch_misses_keeps_no_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """The room stream moves on (another writer fenced the owner off) right before a pair is
    written: the pair stores neither part, so the input, appended again by the usual path,
    is in the inbox once and applied once. Unkeyed (no idempotency key could hide a second
    copy) and keyed (the usual path reuses the key the pair reserved).

    Mutation seen caught: in ``SqliteBackend.append_pair`` return ``None`` on the second
    part's miss instead of raising ``_PairMissed`` (the first part's rows commit) → the
    unkeyed inbox holds the move twice and the counter is 2 → fails.
    """
    app, reg = make_app(tick_rate=None)
    url = f"sqlite:///{tmp_path / 'rooms.db'}"
    async with serve(app, url) as node, connect(node, "a") as a:
        room = await a.command("room.create", {"type": "game"})
        rid = room["room_id"]
        await reg.settle(node, rid)
        other = await open_sqlite(url)
        try:

            async def fence() -> None:
                body = {"room": rid, "type": "note", "data": None, "except": None}
                await other.events.append(f"room:{rid}", "msg", body, now=node.clock())

            calls = _wrap_pair(monkeypatch, node.backend, fence)
            args = {"room_id": rid, "type": "add", "data": {"by": 1}}
            if keyed:
                result = await a.command("room.send", args)
            else:
                reply = await node.dispatch(rtcore.Principal("a"), "room.send", args)  # no idempotency key
                assert reply.ok, reply
                result = reply.result
        finally:
            await other.aclose()
        assert calls and result == 1
        inbox = await _inbox(node, rid)
        assert [e.type for e in inbox] == ["create", "send"]
        doc = await _settled_doc(node, reg, rid)
        assert doc.state["counter"] == 1 and doc.inbox == 2


async def test_append_pair_is_all_or_nothing(tmp_path: Path) -> None:
    """``SqliteBackend.append_pair`` stores both parts, or neither when either's ``expect`` misses
    or the first part's key is already in its stream; other writes of the same group commit
    are not affected.

    Mutation seen caught: skip the first part's duplicate check (``got.duplicate``) → the
    second part is stored with a duplicate first → fails.
    """
    backend = await open_sqlite(f"sqlite:///{tmp_path / 'pair.db'}")
    try:
        ev = backend.events
        await ev.append("in:1", "x", 1, now=0.0, key="k1")
        await ev.append("out:1", "y", 1, now=0.0)
        got = await backend.append_pair(
            PairAppend("in:1", "x", 2, "k2", 1), PairAppend("out:1", "y", 2, None, 1), now=1.0
        )
        assert got is not None and got[0].event.offset == 2 and got[1] is not None and got[1].event.offset == 2
        # first's expect misses: nothing
        assert await backend.append_pair(PairAppend("in:1", "x", 3, None, 1), PairAppend("out:1", "y", 3), now=1.0) is None
        # second's expect misses: nothing, not even the first
        assert await backend.append_pair(PairAppend("in:1", "x", 3, None, 2), PairAppend("out:1", "y", 3, None, 7), now=1.0) is None
        # first's key is retained: nothing
        assert await backend.append_pair(PairAppend("in:1", "x", 3, "k1", 2), PairAppend("out:1", "y", 3, None, 2), now=1.0) is None
        # only a first part
        only = await backend.append_pair(PairAppend("in:1", "x", 3, None, 2), None, now=1.0)
        assert only is not None and only[1] is None and only[0].event.offset == 3
        assert (await ev.info("in:1")).head == 3 and (await ev.info("out:1")).head == 2
        page = await ev.read("in:1", after=0, limit=10)
        assert [e.data for e in page.events] == [1, 2, 3]
    finally:
        await backend.aclose()


async def test_engines_without_atomic_pairs_refuse(tmp_path: Path) -> None:
    """``memory://`` offers no ``append_pair`` (``pairs`` false), so the rooms runtime never
    takes the paired path there, and calling it says so instead of writing half a pair.
    """
    async with serve(rtcore.App("no-pairs")) as node:
        assert node.backend.pairs is False
        with pytest.raises(NotImplementedError):
            await node.backend.append_pair(PairAppend("a:1", "x", 1), None, now=0.0)

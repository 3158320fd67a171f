"""Rooms in both Python clients: the same scenario through ``rtcore.testing.connect``
(in-process) and ``rtcore.client.connect`` (a real :class:`rtcore.Server` on a
free port) gives the same ``room.state`` after every move, equal to the server's
document; a fresh auto-acking client on a new device gets the current document;
private fields merge into the owner's state only; a corrupted fold is repaired by
the ``sync`` checksum."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

import rtcore
import rtcore.client
import rtcore.testing
from rtcore import rooms
from rtcore.client.rooms import Room, RoomClient
from rtcore.engine.node import Node
from tests.net.conftest import serving, ws_url

from .roomapp import make_app
from .test_private import card_app

pytestmark = pytest.mark.anyio

DRIVERS = ["testing", "network"]
Connect = Callable[[str], AbstractAsyncContextManager[RoomClient]]


@asynccontextmanager
async def deployment(kind: str, app: rtcore.App) -> AsyncIterator[tuple[Node, Connect]]:
    """A node running ``app`` and a way to connect a client of kind ``kind`` to it."""
    if kind == "testing":
        async with rtcore.testing.serve(app) as node:

            def connect_testing(token: str) -> AbstractAsyncContextManager[RoomClient]:
                return rtcore.testing.connect(node, token)

            yield node, connect_testing
    else:
        async with serving(app) as server:

            def connect_network(token: str) -> AbstractAsyncContextManager[RoomClient]:
                return rtcore.client.connect(ws_url(server), token=token)

            yield server.node, connect_network


async def settled(registry: rooms.Rooms, node: Node, room: Room, inbox: int) -> dict[str, Any]:
    """Wait until ``room`` folded the patch covering inbox entry ``inbox``; return the server's document."""
    await room.wait_for(lambda _: room.document is not None and room.document["inbox"] >= inbox)
    return await registry.state(node, room.id)


async def play(kind: str) -> list[Any]:
    """Two players, five moves and a broadcast; after each step both rooms hold the server's document.

    Returns the transcript of game states (the same for both drivers).
    """
    app, registry = make_app(tick_rate=None)
    transcript: list[Any] = []
    async with deployment(kind, app) as (node, connect), connect("alice") as alice, connect("bob") as bob:
        ra = await alice.join_or_create("game")
        rb = await bob.join(ra.id)
        assert rb.id == ra.id and ra.user == "alice" and rb.user == "bob"
        heard: list[Any] = []
        rb.on_message("said", heard.append)
        ra.on_message("said", heard.append)
        notes: list[Any] = []
        rb.on_message("note", lambda data: notes.append(("bob", data)))
        ra.on_message("note", lambda data: notes.append(("alice", data)))
        changes: list[str] = []
        rb.on_change(lambda ch: changes.append(ch.kind))
        for i, (who, by) in enumerate([(ra, 1), (rb, 2), (ra, 3), (rb, 4), (ra, 5)]):
            total = await who.send("add", {"by": by})
            assert total == sum([1, 2, 3, 4, 5][: i + 1])
            server_doc = await registry.state(node, ra.id)
            for r in (ra, rb):
                assert await settled(registry, node, r, server_doc["inbox"]) == r.document, f"step {i}: {r.user} differs from the server"
                assert r.state["counter"] == total
            assert ra.state == rb.state
            transcript.append(copy.deepcopy(ra.state))
        await ra.send("tell", {"to": "bob"})
        with anyio.fail_after(10):
            while not (heard and notes):
                await anyio.sleep(0.01)
        assert heard == [{"by": "alice"}], "the broadcast reaches bob only (alice is excluded)"
        assert notes == [("bob", {"from": "alice"})], "the direct message reaches bob's room only"
        assert changes.count("patch") >= 5
        assert set(ra.members) == {"alice", "bob"}
        await rb.leave()
        assert rb.left and ra.id not in bob.rooms
        server_doc = await registry.state(node, ra.id)
        assert await settled(registry, node, ra, server_doc["inbox"]) == ra.document
        assert set(ra.members) == {"alice"}
        transcript.append(copy.deepcopy(ra.state))
    return transcript


async def test_both_clients_hold_the_servers_document_after_every_move() -> None:
    """The same game through the in-process and the network client: after each move
    both players' ``room.state`` equals the server's document, and the two drivers
    give the same transcript.

    Mutation: make ``RoomView._event`` skip one patch (``if evt.offset == 4: return []``)
    → the document differs from the server's at that step → fails; drop the
    ``except`` filter of broadcasts → alice hears her own → fails; do not
    subscribe to the player's ``dm`` stream in ``ClientSession.track_room`` → bob
    gets no note → fails.
    """
    by_driver = {kind: await play(kind) for kind in DRIVERS}
    assert by_driver["testing"] == by_driver["network"]
    assert [s["counter"] for s in by_driver["testing"]] == [1, 3, 6, 10, 15, 15]
    assert by_driver["testing"][-1]["log"][-1] == "leave:bob:True"


@pytest.mark.parametrize("kind", DRIVERS)
async def test_a_newcomer_on_another_device_gets_the_current_document(kind: str) -> None:
    """alice plays on device 1 (auto-acking: her server-side cursor reaches the head),
    closes it, then a fresh client of hers joins the room by id: it holds the
    current document at once, and follows later moves.

    Mutation: make ``ClientSession.track_room`` subscribe with ``cursor=True`` →
    the newcomer resumes after the acked head, gets no document → times out.
    """
    app, registry = make_app(tick_rate=None)
    async with deployment(kind, app) as (node, connect):
        async with connect("bob") as bob:
            async with connect("alice") as device1:
                room = await device1.join_or_create("game")
                rb = await bob.join(room.id)
                for by in (1, 2, 3):
                    await room.send("add", {"by": by})
                await room.wait_for(lambda s: s["counter"] == 6)
                head = room.view.offsets[room.view.stream]
            # Closing flushed the acks of everything folded: the cursor is at the head.
            with anyio.fail_after(10):
                while (await node.backend.cursors.get("alice", room.view.stream, now=node.clock()) or ("", 0))[1] < head:
                    await anyio.sleep(0.01)
            async with connect("alice") as device2:
                again = await device2.join(room.id)
                assert again.state["counter"] == 6, "the newcomer holds the current board at once"
                assert again.document == await registry.state(node, room.id)
                await rb.send("add", {"by": 10})
                await again.wait_for(lambda s: s["counter"] == 16)
                server_doc = await registry.state(node, room.id)
                assert await settled(registry, node, again, server_doc["inbox"]) == again.document


@pytest.mark.parametrize("kind", DRIVERS)
async def test_private_fields_merge_into_their_owners_state_only(kind: str) -> None:
    """Each player's ``room.state["hands"]`` is ``{their id: their hand}``: the server's
    map limited to them; the public document never carries hands.

    Mutation: make ``merge_private`` return the public state (no merge) → alice's
    state has no hand → fails.
    """
    app, registry = card_app()
    async with deployment(kind, app) as (node, connect), connect("alice") as alice, connect("bob") as bob:
        ra = await alice.create("cards")
        rb = await bob.join(ra.id)
        card = await ra.send("play")
        assert card == "alice-secret-0"
        await ra.wait_for(lambda s: s["table"] == [card] and len(s["hands"]["alice"]) == 2)
        await rb.wait_for(lambda s: s["table"] == [card])
        assert ra.state["hands"] == {"alice": ["alice-secret-1", "alice-secret-2"]}
        assert rb.state["hands"] == {"bob": ["bob-secret-0", "bob-secret-1", "bob-secret-2"]}
        for r in (ra, rb):
            assert r.document is not None and "hands" not in r.document["state"]
            assert r.document == await registry.state(node, ra.id)


@pytest.mark.parametrize("kind", DRIVERS)
async def test_a_corrupted_fold_is_repaired_by_the_sync_checksum(kind: str) -> None:
    """A client whose document went wrong (changed by hand) notices at the next
    ``sync`` (every 10 patches), resubscribes and holds the server's document again.

    Mutation: skip the checksum comparison in ``RoomView.feed`` → the wrong
    counter stays → fails.
    """
    app, registry = make_app(tick_rate=None)
    async with deployment(kind, app) as (node, connect), connect("alice") as alice:
        room = await alice.join_or_create("game")
        assert room.document is not None
        room.document["state"]["log"].append("forged")
        for _ in range(12):  # at least one sync point (offset % 10 == 0) after this
            await room.send("add", {"by": 1})
        await room.wait_for(lambda s: s["counter"] == 12 and "forged" not in s["log"])
        assert room.view.resyncs >= 1
        server_doc = await registry.state(node, room.id)
        assert await settled(registry, node, room, server_doc["inbox"]) == room.document


async def test_lost_frames_do_not_leave_a_room_behind() -> None:
    """alice's connection loses a run of server frames while bob plays: the session
    sees the gap, the client reconnects and resumes from its position (no
    snapshot, no resync), and her document ends equal to the server's.

    Mutation: make the in-process client ignore ``Broken`` (no reconnect after a
    gap) → alice's room stops at the gap → times out → fails.
    """
    app, registry = make_app(tick_rate=None)
    async with rtcore.testing.serve(app) as node:
        # Only the first connection loses frames: indexes count per connection,
        # so a repeated drop could swallow the tail of the resumed replay with
        # no later frame to reveal it (a stall that depends on scheduling).
        faults = rtcore.testing.Faults(drop=frozenset(range(8, 11)), connections=1)
        async with rtcore.testing.connect(node, "alice", faults=faults) as alice, rtcore.testing.connect(node, "bob") as bob:
            ra = await alice.join_or_create("game")
            rb = await bob.join(ra.id)
            for _ in range(12):
                await rb.send("add", {"by": 1})
            await ra.wait_for(lambda s: s["counter"] == 12)
            assert len(alice.wire) >= 2, "the gap made alice reconnect"
            server_doc = await registry.state(node, ra.id)
            assert await settled(registry, node, ra, server_doc["inbox"]) == ra.document
            assert ra.document == rb.document
            assert ra.view.resyncs == 0

"""The ``sync`` checksums and snapshots of a room's stream agree with the state a client folds.

The follower encodes the room's document once per sync/snapshot point and
encodes it as it is (``RoomDoc.builtins_only``, no builtins copy): these tests
compute the reference by hand from what a client received over the wire
(blake2b-128 of sorted-keys MessagePack of the folded JSON document), so a
checksum or a snapshot that disagrees with the state makes them fail.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.protocol.codec import canonical
from rtcore.protocol.frames import Evt, Position, Snap, Sync
from rtcore.protocol.patch import apply
from rtcore.protocol.state import encode_state, state_builtins
from rtcore.rooms.runtime import RoomDoc, _plain
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio
ZERO = Position("", 0)
SENDS = 125  # past the first snapshot point (offset 100) and a dozen sync points


def _reference(doc: Any) -> tuple[bytes, str]:
    """Canonical bytes and checksum of a folded document, computed without rtcore's state code."""
    data = msgspec.msgpack.Encoder(order="sorted").encode(doc)
    return data, hashlib.blake2b(data, digest_size=16).hexdigest()


class Board(msgspec.Struct):
    scores: dict[str, Any] = {}
    order: list[str] = []
    n: Any = 0


class Put(msgspec.Struct):
    key: str
    value: Any


def _app() -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("rooms-checksum")
    registry = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @registry.define("board")
    class BoardRoom(rooms.Room[Board]):
        @rooms.message("put")
        async def put(self, player: rooms.Player, data: Put) -> None:
            # Keys arrive in descending order: insertion order is never the sorted order.
            self.state.scores[data.key] = data.value
            self.state.order.insert(0, data.key)
            # An int that becomes a float of the same value: equal in Python, not in bytes.
            self.state.n = float(self.state.n) if isinstance(self.state.n, int) else int(self.state.n)

    return app, registry


async def test_every_sync_and_snapshot_matches_the_clients_fold() -> None:
    """Every ``sync`` checksum and the stored snapshot equal the hand-computed encoding of the client's fold.

    Mutations: encode the state in the follower before folding the event (a
    stale encoding) → the syncs' checksums lag one event → fails; encode
    ``builtins_only`` states without sorting keys (``msgspec.msgpack.encode``)
    → the checksums differ → fails.
    """
    app, reg = _app()
    async with serve(app) as node, connect(node, "p") as client:
        room = await client.command("room.create", {"type": "board"})
        stream = room["stream"]
        await client.subscribe(stream, ZERO)
        for i in range(SENDS):
            key = f"k{SENDS - i:04d}"
            value: Any = {"z": i, "a": [i, float(i)], "m": {"y": True, "b": None}} if i % 3 else i / 2
            await client.command("room.send", {"room_id": room["room_id"], "type": "put", "data": {"key": key, "value": value}})
        actor = reg.runtime(node).actors[room["room_id"]]
        head = actor.head
        assert head > 100
        # Fold what the client received; keep the reference at every offset.
        refs: dict[int, tuple[bytes, str]] = {}
        syncs: dict[int, str] = {}
        with anyio.fail_after(10):
            while max(syncs, default=0) < head - head % 10:
                await client.next_event(stream)
                doc: Any = None
                last = 0
                for f in client.frames:
                    if isinstance(f, Snap) and f.stream == stream:
                        doc, last = copy.deepcopy(f.state), f.offset
                        refs[last] = _reference(doc)
                    elif isinstance(f, Evt) and f.stream == stream and f.offset == last + 1:
                        if f.type == "patch":
                            doc = apply(doc, copy.deepcopy(f.data["ops"]))
                        last = f.offset
                        refs[last] = _reference(doc)
                    elif isinstance(f, Sync) and f.stream == stream:
                        syncs[f.offset] = f.checksum
        assert sorted(syncs) == list(range(10, head - head % 10 + 1, 10))
        for offset, sent in syncs.items():
            assert sent == refs[offset][1], f"sync at {offset}"
        # The snapshot stored at offset 100 holds the same bytes and checksum.
        with anyio.fail_after(5):
            while (snap := await node.backend.snapshots.get(stream)) is None:
                await anyio.sleep(0.01)
        assert snap.offset == 100
        assert (snap.state, snap.checksum) == refs[100]
        # And the node's own fold, asked directly.
        st = await node.state_of(stream)
        with anyio.fail_after(5):
            while st.offset < head:
                await anyio.sleep(0.01)
        assert st.checksum() == refs[head][1]


def test_room_documents_encode_as_their_builtins() -> None:
    """``encode_state`` of a ``RoomDoc`` (encoded as it is) equals the generic encoding of its builtins copy.

    Mutation: drop ``order="sorted"`` from the canonical encoder used for
    ``builtins_only`` states → the members' and state's keys keep insertion order → fails.
    """
    doc = RoomDoc(
        state={"zeta": [1, 2.0, {"b": None, "a": True}], "alpha": {"y": "x", "b": [[]]}, "mid": 1.5},
        members={"u9": {"grace_until": None, "connected": True}, "u1": {"grace_until": 12.5, "connected": False}},
        room={"type": "t", "id": "r", "metadata": {"z": 1, "a": 2}, "timers": [[1.0, None, "tick", [{"k": 1}]]]},
        inbox=7,
    )
    assert encode_state(doc) == canonical(state_builtins(doc)) == _reference(state_builtins(doc))[0]


def test_durable_timer_arguments_have_string_keys() -> None:
    """A timer argument with a non-string map key is not durable (a JSON round trip would change the key).

    The room document holding durable timers is encoded as it is for its
    checksums, which needs ``str`` keys everywhere. Mutation: drop
    ``str_keys=True`` from ``_plain`` → ``{1: "a"}`` counts as plain → fails.
    """
    assert _plain([{"a": 1}, [1, 2.5], "x"]) == [{"a": 1}, [1, 2.5], "x"]
    assert _plain([{1: "a"}]) is None

"""The sans-IO client fold of a room (``RoomView``) and its driving by ``ClientSession``.

No server: documents are made up, patched with the server's ``diff``, and fed
as frames. The same fold runs in every Python client (tests/rooms/test_clients.py).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from rtcore.protocol.client import ClientSession, Connected, Missed, Replied, RoomChanged
from rtcore.protocol.frames import Evt, Limits, Msg, Snap, Sub, Subbed, Sync, Unsub, Welcome
from rtcore.protocol.patch import diff
from rtcore.protocol.rooms import RoomView
from rtcore.protocol.state import checksum

JOINED = {"room_id": "r1", "type": "game", "code": "ABC", "stream": "room:r1", "user": "alice", "view": None}

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=4)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4), max_leaves=20)
documents = st.fixed_dictionaries({"state": values, "members": st.dictionaries(st.text(max_size=3), st.booleans(), max_size=3), "inbox": st.integers(0, 100)})


def patch(offset: int, ops: list[Any], stream: str = "room:r1") -> Evt:
    return Evt(stream, "e1", offset, "patch", {"ops": copy.deepcopy(ops)}, 0.0)


@given(st.lists(documents, min_size=1, max_size=8), st.integers(1, 3))
def test_folding_the_patches_gives_every_document_and_matches_each_sync(docs: list[Any], sync_every: int) -> None:
    """Fed the patches of any sequence of documents (the first one sets the whole
    document), the view holds each document in turn and every ``sync`` checksum matches.

    Mutation: drop the patch at offset 3 in ``RoomView._event`` → the document
    differs from the server's → fails.
    """
    view = RoomView(JOINED)
    prev: Any = None
    for i, doc in enumerate(docs, start=1):
        ops = [["set", [], doc]] if prev is None else diff(prev, doc)
        changes = view.feed(patch(i, ops))
        assert [c.kind for c in changes] == ["patch"]
        assert view.document == doc
        if i % sync_every == 0:
            assert view.feed(Sync("room:r1", i, checksum(doc), "e1")) == []
        prev = copy.deepcopy(doc)
    assert view.resyncs == 0
    assert view.verified == len(docs) // sync_every
    assert view.state == docs[-1]["state"]


def test_lost_track_asks_for_a_resync_and_a_snapshot_repairs() -> None:
    """A patch whose path is gone, a sync that does not match, a notice without a
    state: each drops the document and asks for a resync; patches before the
    next snapshot are skipped; the snapshot (its checksum checked) restores it.

    Mutation: ignore ``PatchError`` in ``RoomView._event`` → the document stays
    half-patched and no resync is asked → fails.
    """
    view = RoomView(JOINED)
    doc = {"state": {"cells": [1, 2]}, "members": {}, "room": {}, "inbox": 1}
    assert [c.kind for c in view.feed(Missed("room:r1", "e1", 4, doc, checksum(doc)))] == ["snapshot"]
    assert view.document == doc and view.offsets == {"room:r1": 4}
    [change] = view.feed(patch(5, [["set", ["state", "nope", 0], 1]]))
    assert change.kind == "resync" and view.document is None and view.state is None
    assert view.feed(patch(6, [["set", ["state", "cells", 0], 9]])) == [], "waits for the snapshot"
    assert view.feed(Sync("room:r1", 6, "x", "e1")) == []
    wrong = view.feed(Missed("room:r1", "e1", 6, doc, "not-its-checksum"))
    assert [c.kind for c in wrong] == ["resync"], "a snapshot that does not match its checksum is refused"
    view.feed(Missed("room:r1", "e1", 6, doc, checksum(doc)))
    assert view.feed(Sync("room:r1", 6, "bad", "e1"))[0].kind == "resync"
    view.feed(Missed("room:r1", "e1", 7, doc, checksum(doc)))
    assert view.feed(Missed("room:r1", "e2", 9))[0].kind == "resync", "history lost: the fold cannot continue"
    assert view.resyncs == 4


def test_broadcasts_skip_their_excluded_player_and_private_fields_merge() -> None:
    """``msg`` events are messages unless ``except`` names us; the private view's
    fields come back as ``{me: value}``."""
    view = RoomView({**JOINED, "view": "roomview:r1:alice"})
    assert view.user == "alice" and view.streams == ["room:r1", "roomview:r1:alice"]
    msg = Evt("room:r1", "e1", 2, "msg", {"type": "said", "data": 1, "except": "alice"}, 0.0)
    assert view.feed(msg) == []
    other = Evt("room:r1", "e1", 3, "msg", {"type": "said", "data": 1, "except": "bob"}, 0.0)
    assert view.feed(other)[0].message == {"type": "said", "data": 1, "except": "bob"}
    public = {"state": {"table": []}, "members": {}, "room": {}, "inbox": 1}
    mine = {"state": {"hands": ["c1"]}, "members": {}, "room": {}, "inbox": 0}
    view.feed(patch(1, [["set", [], public]]))
    assert not view.ready
    view.feed(patch(1, [["set", [], mine]], stream="roomview:r1:alice"))
    assert view.ready
    assert view.state == {"table": [], "hands": {"alice": ["c1"]}}
    assert view.document == public


def test_session_routes_a_tracked_room_and_resyncs_it() -> None:
    """``ClientSession.track_room`` subscribes without a position (the current
    document), folds the room's items into the view (only ``RoomChanged`` reaches
    the driver), acks what it folded, and on a sync mismatch sends ``unsub`` then
    ``sub`` without a position.

    Direct messages are ``msg`` frames (no stream, nothing subscribed for them):
    one naming a tracked room reaches that room only, as a ``direct`` change;
    one naming no tracked room reaches the application as the frame itself.

    Mutation: skip the resubscription in ``ClientSession._route_rooms`` → no
    ``unsub``/``sub`` frames → fails; skip the ``room`` check in
    ``RoomView.direct`` → room r2 gets r1's note too → fails; drop the
    fallthrough of unrouted ``msg`` frames in ``_route_rooms`` → the
    application never sees the lobby invite → fails.
    """
    s = ClientSession(ack_interval=0.05)
    s.start("alice")
    s.frames_to_send()
    assert s.receive_frame(Welcome("s-1", 15.0, Limits(), "alice"), 0.0)[0] == Connected(Welcome("s-1", 15.0, Limits(), "alice"))
    view = RoomView(JOINED)
    assert view.user == "alice"
    other = RoomView({**JOINED, "room_id": "r2", "stream": "room:r2"})
    [req] = s.track_room(view)
    [sub] = s.frames_to_send()
    assert isinstance(sub, Sub) and sub.since is None and not sub.cursor
    s.receive_frame(Subbed(sub.id, "room:r1", "e1", 3, recovered=False, snap=True), 0.0)
    assert req.done
    assert len(s.track_room(other)) == 1, "only the room's own stream"
    s.frames_to_send()
    events = s.receive_frame(Msg("note", 1, "r1"), 0.0)
    assert [(e.view.room_id, e.change.kind, e.change.message) for e in events if isinstance(e, RoomChanged)] == [
        ("r1", "direct", {"room": "r1", "type": "note", "data": 1})
    ]
    assert [e for e in events if isinstance(e, Msg)] == []
    events = s.receive_frame(Msg("invite", {"from": "bob"}, None), 0.0)
    assert events == [Msg("invite", {"from": "bob"}, None)], "not for a room: the application's"
    s.untrack_room(other)
    doc = {"state": {"n": 1}, "members": {}, "room": {}, "inbox": 3}
    events = s.receive_frame(Snap("room:r1", "e1", 3, doc, checksum(doc)), 0.0)
    assert [type(e) for e in events if not isinstance(e, Replied)] == [RoomChanged] and view.document == doc
    events = s.receive_frame(patch(4, [["set", ["state", "n"], 2]]), 0.0)
    assert [e.change.kind for e in events if isinstance(e, RoomChanged)] == ["patch"]
    s.tick(1.0)
    assert [f for f in s.frames_to_send() if type(f).__name__ == "Ack"], "folded items are acked"
    events = s.receive_frame(Sync("room:r1", 4, "wrong", "e1"), 0.0)
    assert [e.change.kind for e in events if isinstance(e, RoomChanged)] == ["resync"]
    out = s.frames_to_send()
    assert [type(f) for f in out] == [Unsub, Sub] and out[0].stream == "room:r1"
    assert isinstance(out[1], Sub) and out[1].since is None
    s.untrack_room(view)
    assert s.rooms == [] and s.streams == [], "the last room gone: its streams are unsubscribed"

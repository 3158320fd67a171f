"""The client side of a room (sans-IO): fold its streams into the room's document.

A room (see docs/rooms.md) syncs its state as generic ``patch`` events on the
stateful stream ``room:{id}``; a room type with private fields adds the
player's own view on ``roomview:{id}:{user}``. :class:`RoomView` holds the
exact document of both with no game code: it applies each patch with
:func:`rtcore.protocol.patch.apply`, starts from a ``snap``
(:class:`~rtcore.protocol.client.Missed` with a state) or from the first
patch (which sets the whole document), verifies the checksum of every
``sync`` frame and of every snapshot, and asks for a resync when anything does
not fit (a patch whose path is missing, a checksum mismatch, a notice without
a state).

:class:`~rtcore.protocol.client.ClientSession` routes the items of a tracked
room's streams here (:meth:`~rtcore.protocol.client.ClientSession.track_room`),
so every client driver (``rtcore.client``, ``rtcore.testing``, yours) gets the
same behaviour from this one fold.

Rules, in the order :meth:`RoomView.feed` applies them:

1. A notice with a state (a snapshot) replaces the stream's document (after
   its checksum matched); a notice without one means the fold missed
   patches: the document is dropped and a resync is asked for.
2. A ``patch`` event applies its ops to the stream's document. With no
   document (before the snapshot of a resubscription), only a patch that
   sets the whole document is applied; others are skipped (they precede the
   snapshot that is on its way). A patch that does not fit drops the document
   and asks for a resync.
3. A ``msg`` event on the public stream is a broadcast; one whose
   ``except`` is this player is not for it.
4. A ``sync`` frame at the offset the document is at is checked against the
   document's checksum (:func:`rtcore.protocol.state.checksum`, section 9 of
   docs/protocol.md); a mismatch drops the document and asks for a resync.

This module is sans-IO: no sockets, no event loop, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .frames import Evt, Msg, Sync
from .patch import Op, PatchError, apply
from .state import checksum

__all__ = ["RoomChange", "RoomView", "merge_private"]

ChangeKind = Literal["snapshot", "patch", "message", "direct", "resync"]


@dataclass(frozen=True)
class RoomChange:
    """What one item did to a room (handed to ``on_change`` callbacks).

    Attributes:
        room_id: The room.
        stream: The stream the item came from (``room:{id}`` or the private
            ``roomview:{id}:{user}``).
        kind: ``snapshot`` (the document was replaced), ``patch`` (``ops``
            were applied), ``message`` (a broadcast: ``message`` is
            ``{"type", "data", ...}``), ``direct`` (a message to this player
            alone, from the room's ``send``: same shape; an ephemeral ``msg``
            frame, so ``stream`` is ``""`` and ``offset`` 0), ``resync`` (the fold lost track; the
            client resubscribes and a ``snapshot`` follows).
        offset: The stream offset of the item.
        ops: The applied ops of a ``patch``.
        message: The broadcast of a ``message``.
    """

    room_id: str
    stream: str
    kind: ChangeKind
    offset: int
    ops: list[Op] | None = None
    message: Any = None


def merge_private(public: Any, private: Any, user: str) -> Any:
    """The game state as ``user`` may see it: public fields plus its own private entries.

    A private field is a map by player id on the server; the player's view
    carries only its own entry, which comes back as ``{user: value}`` so the
    merged state has the server state's shape (and converts to the room's
    state type).

    Args:
        public: ``document["state"]`` of ``room:{id}``.
        private: ``document["state"]`` of ``roomview:{id}:{user}`` (or ``None``).
        user: The player.
    """
    if not isinstance(private, dict) or not private or not isinstance(public, dict):
        return public
    merged = dict(public)
    for field, value in private.items():
        merged[field] = {user: value}
    return merged


class RoomView:
    """One room as a client sees it: its document, kept by folding patches.

    Args:
        joined: The result of ``room.create`` / ``room.join`` /
            ``room.join_or_create`` (``room_id``, ``type``, ``code``,
            ``stream``, ``user``, ``view``).
        user: The player; read from ``joined["user"]`` when not given (or,
            from servers before direct messages were ephemeral, from
            ``joined["dm"]``, ``roomdm:{user}``).

    Attributes:
        room_id: The room id.
        type: The room type.
        code: The room's short code (for ``room.join {"code"}``).
        stream: The public stream ``room:{id}``.
        view_stream: The private stream ``roomview:{id}:{user}``, or ``None``.
        user: The player this view belongs to.
        document: The public document (``state``, ``members``, ``room``,
            ``inbox``) as the server last published it, or ``None`` while
            none is known (before the snapshot, during a resync).
        private: The private view's document, or ``None``.
        offsets: Per stream, the offset the document is at.
        verified: ``sync`` checksums that matched.
        resyncs: How many times the fold lost track and asked for a resync.
    """

    def __init__(self, joined: Mapping[str, Any], user: str | None = None) -> None:
        try:
            self.room_id = str(joined["room_id"])
            self.stream = str(joined["stream"])
        except (KeyError, TypeError):
            raise ValueError(f"not a room join result (needs room_id and stream): {joined!r}") from None
        self.type = str(joined.get("type") or "")
        self.code = str(joined.get("code") or "")
        view = joined.get("view")
        self.view_stream: str | None = str(view) if view else None
        if user is None:
            user = str(joined.get("user") or str(joined.get("dm") or "").partition(":")[2])
        self.user = user
        self.document: dict[str, Any] | None = None
        self.private: dict[str, Any] | None = None
        self.offsets: dict[str, int] = {}
        self.verified = 0
        self.resyncs = 0

    @property
    def streams(self) -> list[str]:
        """The streams to subscribe to (public first)."""
        return [self.stream] if self.view_stream is None else [self.stream, self.view_stream]

    @property
    def ready(self) -> bool:
        """Whether a document is known for every stream of the room."""
        return self.document is not None and (self.view_stream is None or self.private is not None)

    @property
    def state(self) -> Any:
        """The game state this player sees (public fields + its private entries).

        ``None`` while no document is known. The public part is the live
        document (it changes in place with each patch): copy it to keep it.
        """
        if self.document is None:
            return None
        public = self.document.get("state")
        if self.private is None:
            return public
        return merge_private(public, self.private.get("state"), self.user)

    @property
    def members(self) -> dict[str, Any]:
        """``{user: {"connected", "grace_until"}}``: who holds a seat (presence)."""
        return dict(self.document.get("members") or {}) if self.document else {}

    @property
    def info(self) -> dict[str, Any]:
        """The ``room`` part of the document (``max_clients``, ``locked``, ``metadata``...)."""
        return dict(self.document.get("room") or {}) if self.document else {}

    def _get(self, stream: str) -> dict[str, Any] | None:
        return self.document if stream == self.stream else self.private

    def _set(self, stream: str, doc: Any) -> None:
        if stream == self.stream:
            self.document = doc
        else:
            self.private = doc

    def _lost(self, stream: str, offset: int) -> list[RoomChange]:
        self._set(stream, None)
        self.offsets.pop(stream, None)
        self.resyncs += 1
        return [RoomChange(self.room_id, stream, "resync", offset)]

    def feed(self, item: Any) -> list[RoomChange]:
        """Fold one item of a room stream: an :class:`~rtcore.protocol.frames.Evt`,
        a :class:`~rtcore.protocol.client.Missed` notice or a ``sync`` frame.

        Items of other streams are ignored. A ``resync`` change means the
        caller must resubscribe ``change.stream`` without a position (a fresh
        snapshot); :class:`~rtcore.protocol.client.ClientSession` does it.

        Returns:
            The changes, in order (empty: nothing visible changed).
        """
        stream = getattr(item, "stream", None)
        if stream not in (self.stream, self.view_stream) or stream is None:
            return []
        if isinstance(item, Sync):
            doc = self._get(stream)
            if doc is None or self.offsets.get(stream) != item.offset:
                return []
            if checksum(doc) != item.checksum:
                return self._lost(stream, item.offset)
            self.verified += 1
            return []
        if isinstance(item, Evt):
            return self._event(item)
        # A Missed notice (duck-typed: the session's class lives above this module).
        state = getattr(item, "state", None)
        offset = int(getattr(item, "offset", 0))
        if state is None:
            if self._get(stream) is None:
                return []  # already waiting for a snapshot
            return self._lost(stream, offset)
        sum_ = getattr(item, "checksum", None)
        if sum_ is not None and checksum(state) != sum_:
            return self._lost(stream, offset)
        # A copy: later patches change the document in place, and the notice's
        # state may be kept elsewhere (a test client records every frame).
        self._set(stream, apply(None, [["set", [], state]]))
        self.offsets[stream] = offset
        return [RoomChange(self.room_id, stream, "snapshot", offset)]

    def direct(self, msg: Msg) -> list[RoomChange]:
        """A ``msg`` frame (a direct message): a ``direct`` change when it comes from this room, else nothing."""
        if msg.room != self.room_id:
            return []
        return [RoomChange(self.room_id, "", "direct", 0, message={"room": msg.room, "type": msg.type, "data": msg.data})]

    def _event(self, evt: Evt) -> list[RoomChange]:
        stream = evt.stream
        data = evt.data
        if evt.type == "msg":
            if stream != self.stream or not isinstance(data, dict) or (data.get("except") is not None and data.get("except") == self.user):
                return []
            return [RoomChange(self.room_id, stream, "message", evt.offset, message=data)]
        if evt.type != "patch":
            return []
        ops = data.get("ops") if isinstance(data, dict) else None
        if not isinstance(ops, list):
            return self._lost(stream, evt.offset)
        doc = self._get(stream)
        if doc is None:
            whole = bool(ops) and isinstance(ops[0], list) and len(ops[0]) >= 2 and ops[0][0] == "set" and ops[0][1] == []
            if not whole:
                return []  # before the snapshot of a (re)subscription: it replaces everything
        try:
            new = apply(doc, ops)
        except PatchError:
            return self._lost(stream, evt.offset)
        self._set(stream, new)
        self.offsets[stream] = evt.offset
        return [RoomChange(self.room_id, stream, "patch", evt.offset, ops=ops)]

"""How rooms run: one owner per room, an inbox, a serial executor, patches.

Streams of a room ``{id}``:

* ``roominbox:{id}`` — every input (create, join, leave, send, drop) is
  appended here by the command handler that received it, under the
  command's idempotency key, so a retried key lands once;
* ``room:{id}`` — a stateful stream (fold: :class:`RoomDoc`) of ``patch``
  events (ops from :mod:`rtcore.protocol.patch`, each covering the inbox up to
  the document's ``inbox`` field) and ``msg`` broadcasts.

Direct messages to one player (:meth:`Room.send`, :meth:`Rooms.send`) are in
no stream: they go out with ``node.send_to`` (ephemeral ``msg`` frames to the
player's live connections on every node, never stored).

The owner holds the lease ``room:{id}``, reads the inbox in order and runs
each entry, timer and tick one at a time on one task (the serial executor).
After each one it diffs the document and appends ONE patch with
``expect=`` the head it last wrote, so a second writer is fenced off by the
log itself. A new owner folds ``room:{id}`` (snapshot + patches), rebuilds
the state and continues the inbox after the document's ``inbox``: nothing is
applied twice, nothing is skipped.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import heapq
import inspect
import itertools
import logging
import secrets
import types
import typing
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import anyio
import msgspec

from ..engine.app import App, Context
from ..errors import AuthError, BackendError, BadRequest, ConflictError, Rejected, RtcoreError, error_from_wire
from ..protocol import patch
from ..protocol.state import state_builtins
from ..protocol.types import AppendResult, Event
from .room import Player, Room, RoomClock, Timer, call

if typing.TYPE_CHECKING:
    from ..backends.base import StreamInfo
    from ..engine.node import Node
    from ..protocol.state import StreamState

__all__ = ["RoomDoc", "RoomIndex", "Rooms", "allowed", "install"]

log = logging.getLogger("rtcore.rooms")

#: Lease of a room's owner (seconds); renewed every third of it.
LEASE = 10.0
#: Inbox entries read per batch.
BATCH = 64
#: Results kept for callers that ask after the entry was applied.
RESULTS_KEPT = 1024
#: How long a caller waits for a remote owner's reply before it looks at the room again.
IDLE_WAIT = 1.0
#: How often each node's keeper looks at its rooms' leases (seconds, real time).
KEEP_EVERY = 1.0
#: Longest an owner goes without reading its inbox from the backend. Inputs
#: appended on this node are handed to the owner in-process and inputs appended
#: on other nodes arrive through the node's live feed (the ``roominbox:*``
#: processor), so this read only catches what a feed dropped. A node without
#: the ``processor`` role has no such feed and reads every :data:`IDLE_WAIT`.
FALLBACK_READ = 30.0
#: How often one node looks for rooms whose owner died (seconds).
SUPERVISE_EVERY = 2.0
#: Longest a node adopting a room waits for its own fold of the room's streams
#: (``room:{id}``, the players' ``roomview:{id}:{user}``) to reach the heads it
#: read from the backend (seconds, real time). A fold still behind then is not
#: restored from (its state may miss acknowledged moves): the adoption fails
#: with ``room_unavailable`` and is tried again later.
FOLD_WAIT = 5.0
#: After a failed adoption, the node tries the room again this many seconds
#: later (node clock), twice as late after each further failure, up to
#: :data:`RETRY_MAX`; meanwhile its commands get ``room_unavailable`` at once.
RETRY_FIRST = SUPERVISE_EVERY
RETRY_MAX = 120.0
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_pack = msgspec.msgpack.Encoder().encode
#: The timers' tie-breaker (a timer heap needs unique, increasing numbers):
#: one counter for every room of the process, not one object per room.
_TIMER_SEQ = itertools.count()
#: ``view_prev`` and ``view_heads`` of a room type without private fields,
#: which never writes them: two empty dicts per room less (a read-only map,
#: so a write to it would raise instead of sharing views between rooms).
_NO_VIEWS: Any = types.MappingProxyType({})


class RoomDoc(msgspec.Struct):
    """The fold of ``room:{id}``: what every client holds as the room's document.

    Attributes:
        state: The room type's state, as builtins.
        members: ``{user id: {"connected": bool, "grace_until": float | None}}``.
        room: ``id``, ``type``, ``code``, ``max_clients``, ``locked``,
            ``private``, ``metadata``, ``disposed``.
        inbox: The last inbox offset this document covers.
    """

    state: Any = None
    members: dict[str, Any] = {}
    room: dict[str, Any] = {}
    inbox: int = 0
    #: Its fields hold builtins with str keys only (they come from patches):
    #: checksums and snapshots encode it as it is (see ``encode_state``).
    builtins_only: ClassVar[bool] = True

    def apply(self, event: Event) -> None:
        """Fold one event: ``patch`` events change the document, others (``msg``) do not."""
        if event.type != "patch":
            return
        doc = patch.apply(self.builtins(), event.data["ops"])
        self.state = doc.get("state")
        self.members = doc.get("members", {})
        self.room = doc.get("room", {})
        self.inbox = doc.get("inbox", 0)

    def builtins(self) -> dict[str, Any]:
        """The document as a builtins map (shares the containers)."""
        return {"state": self.state, "members": self.members, "room": self.room, "inbox": self.inbox}


class RoomIndex(msgspec.Struct):
    """The fold of ``roomindex:{type}``: the listed rooms of one type, across nodes.

    Owners append an entry whenever what a lobby shows changes (players,
    lock, metadata) and a ``gone`` entry when the room is disposed; private
    rooms are never listed. A client may subscribe to it as a live lobby.

    Attributes:
        rooms: ``{room id: {"room_id", "type", "clients", "max_clients", "locked", "metadata"}}``.
    """

    rooms: dict[str, Any] = {}

    def apply(self, event: Event) -> None:
        """Fold one listing entry."""
        data = event.data
        if event.type != "room" or not isinstance(data, dict):
            return
        if data.get("gone"):
            self.rooms.pop(str(data.get("room_id")), None)
        else:
            self.rooms[str(data["room_id"])] = data


class _NotFolded(Exception):
    """This node's fold of a room's stream did not reach the head within :data:`FOLD_WAIT`."""


class _Down:
    """A room this node could not adopt: why, how many times in a row, and when it tries again."""

    __slots__ = ("attempts", "reason", "retry_at")

    def __init__(self, reason: str, attempts: int, retry_at: float) -> None:
        self.reason = reason
        self.attempts = attempts
        self.retry_at = retry_at


class _Member(msgspec.Struct):
    connected: bool = True
    grace_until: float | None = None


class _Entry(msgspec.Struct, frozen=True):
    """What a caller gets back for an inbox entry."""

    ok: bool
    result: Any = None
    error: RtcoreError | None = None


class _Args(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: str = ""
    room_id: str = ""
    code: str = ""
    options: dict[str, Any] = {}
    private: bool = False
    metadata: dict[str, Any] = {}


class _SendArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    room_id: str
    type: str
    data: Any = None


class _LeaveArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    room_id: str


class _ListArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: str = ""
    metadata: dict[str, Any] = {}


class _Actor:
    """One room on its owner node: the serial executor and the patch writer."""

    # A server holds one per room (thousands): slots instead of a __dict__ of
    # some fifty keys (a third of the actor's own memory, tracemalloc).
    __slots__ = (
        "_full",
        "_list_key",
        "_members_cache",
        "_members_sig",
        "_room_cache",
        "_room_key",
        "applied",
        "closed",
        "cls",
        "code",
        "dispose_requested",
        "dispose_timer",
        "disposed",
        "done",
        "flush_at",
        "full_prev",
        "graces",
        "head",
        "id",
        "idle",
        "inbox",
        "inline",
        "inline_done",
        "last_read",
        "last_tick",
        "listed",
        "locked",
        "lost",
        "members",
        "need_read",
        "next_tick",
        "node",
        "outgoing",
        "parked",
        "patch_every",
        "pending",
        "prev",
        "private",
        "renewed",
        "results",
        "room",
        "rt",
        "running",
        "stream",
        "timers",
        "uncommitted",
        "view_heads",
        "view_prev",
        "waiters",
        "wake",
        "woken",
    )

    def __init__(self, rt: _Runtime, cls: type[Room[Any]], room_id: str, code: str, private: bool) -> None:
        self.rt = rt
        self.node = rt.node
        self.cls = cls
        self.id = room_id
        self.stream = f"room:{room_id}"
        self.inbox = f"roominbox:{room_id}"
        self.code = code
        self.private = private
        self.members: dict[str, _Member] = {}
        self._members_sig: bytes | None = None
        self._members_cache: dict[str, Any] = {}
        self._room_key: tuple[Any, ...] | None = None
        self._room_cache: dict[str, Any] = {}
        self.locked = False
        self.disposed = False
        self.dispose_requested = False
        self.outgoing: list[tuple[str, str | None, str, Any]] = []
        self.applied = 0  # last inbox offset applied (its patch may not be written yet: in_flight)
        # Seconds inputs may wait to be coalesced into one patch (Room.patch_rate); 0: a patch per input.
        self.patch_every = 1 / cls.patch_rate if cls.patch_rate else 0.0
        self.flush_at: float | None = None  # when the coalesced inputs' patch is due
        self.head = 0  # last offset of room:{id} written (the fence)
        self.prev: Any = None  # the public document as last published
        self.full_prev: Any = None  # the whole state (private fields too) as last published
        self._full: Any = None
        views = bool(cls.private_fields)
        self.view_prev: dict[str, Any] = {} if views else _NO_VIEWS  # each player's view as last published
        self.view_heads: dict[str, int] = {} if views else _NO_VIEWS
        self.timers: list[tuple[float, int, Timer]] = []
        self.graces: dict[str, Timer] = {}
        self.dispose_timer: Timer | None = None
        self.next_tick: float | None = None
        self.listed: dict[str, Any] | None = None  # last entry appended to roomindex:{type}
        self._list_key: tuple[int, bool] | None = None  # what `listed` was made from, when it has no metadata (_list)
        self.last_tick = 0.0
        self.renewed = -1e18
        self.lost = False  # the keeper could not renew the lease
        # The executor's task runs only while the room has something to do or
        # a timer, tick or patch due: an idle room (a turn-based game between
        # moves, applied inline) holds no task and no Event (a few kB each,
        # tracemalloc); poke() starts the task again.
        self.running = False  # a task runs run()
        self.done = True  # not run here: not started yet (_Runtime.start), or stopped (the lease released)
        self.woken = False  # poked since the executor last looked (the task runs another pass)
        self.wake: anyio.Event | None = None  # what the parked executor waits on (only while parked)
        # Inbox entries handed over in-process (appended here, or seen on the
        # node's live feed), by offset; the backend is read only for gaps.
        self.pending: dict[int, Event] = {}
        self.need_read = True
        self.last_read = -1e18
        self.uncommitted: list[tuple[int, _Entry, Any]] = []  # applied inputs whose patch is not written yet
        self.waiters: dict[int, anyio.Event] = {}
        self.results: dict[int, _Entry] = {}  # oldest first (insertion order); a dict is lighter than an OrderedDict
        self.closed = False
        self.idle: anyio.Event | None = None  # made by Rooms.settle (tests), set when the executor waits
        self.parked = False  # the executor's task waits in _wait for a timer, tick or patch due
        self.inline = False  # a command applies an input on its own task (run_inline)
        self.inline_done: anyio.Event | None = None  # made by an executor that waits for that step; set when done
        room = cls()
        room.id = room_id
        room.code = code
        room.metadata = {}
        room.clock = RoomClock(self.node.clock, self._schedule)
        room._actor = self
        room.state = cls.state_type()
        self.room = room

    # --- document ---------------------------------------------------------------

    def doc(self) -> dict[str, Any]:
        full = self._full = state_builtins(self.room.state)
        private = self.cls.private_fields
        return {
            "state": {k: v for k, v in full.items() if k not in private} if private else full,
            "members": self._members_doc(),
            "room": self._room_doc(),
            "inbox": self.applied,
        }

    def _room_doc(self) -> dict[str, Any]:
        """``room`` as builtins; the same object as last time when nothing in it changed (so it is not diffed).

        Diffing this section field by field on every move was a third of the
        diff's work (cProfile). The comparison key holds the variable parts,
        metadata and timers as MessagePack bytes, which tell ``1`` from
        ``1.0`` and ``True`` (``==`` does not, and a patch must).
        """
        md = self.room.metadata
        # The common room (no metadata, no timer) skips the copies and the
        # encoding: they were a good part of a small room's document (py-spy).
        if type(md) is dict and not md and not self.timers:
            metadata: Any = {}
            timers: list[list[Any]] = []
            blob = b""  # never the encoding of a (metadata, timers) pair
        else:
            metadata = state_builtins(md)
            timers = self._durable_timers()
            blob = _pack((metadata, timers))
        key = (self.locked, self.private, self.disposed, blob)
        if key != self._room_key:
            self._room_key = key
            self._room_cache = {
                "id": self.id,
                "type": self.rt.types_by_cls[self.cls],
                "code": self.code,
                "max_clients": self.cls.max_clients,
                "locked": self.locked,
                "private": self.private,
                "metadata": metadata,
                "disposed": self.disposed,
                "timers": timers,
            }
        return self._room_cache

    def _members_doc(self) -> dict[str, Any]:
        """``members`` as builtins; the same object as last time when no seat changed (so it is not diffed)."""
        # The seats' MessagePack bytes: built and compared in C (a list of tuples
        # built in Python was a fifth of a 100-player room's tick doc, cProfile).
        sig = _pack(self.members)
        if sig != self._members_sig:
            self._members_sig = sig
            self._members_cache = {uid: {"connected": m.connected, "grace_until": m.grace_until} for uid, m in self.members.items()}
        return self._members_cache

    def _diff(self, new: dict[str, Any]) -> list[patch.Op]:
        """``patch.diff(self.prev, new)``, skipping ``members`` and ``room`` when they are the objects published last time."""
        ops: list[patch.Op] = []
        prev = self.prev
        for key, value in new.items():
            old = prev.get(key)
            # The same object: ``members`` and ``room`` when no seat and no room
            # field changed (rebuilt, never changed in place, when one does);
            # ``state`` is a fresh copy on every step and ``inbox`` an int.
            if value is old:
                continue
            patch.diff_into(old, value, [key], ops)
        return ops

    def _durable_timers(self) -> list[list[Any]]:
        """Pending timers that a new owner can re-arm: ``[due, every, callback, args]``.

        A timer is durable when its arguments are plain builtins and its
        callback is a method of the room (``callback`` is its name) or a
        function defined inside a method of the room type — a closure or
        lambda — whose captured variables are the room, a :class:`Player` or
        plain builtins (``callback`` is :func:`_closure_spec`'s description).
        Anything else cannot be rebuilt on another node and is left out.
        """
        out: list[list[Any]] = []
        for due, _, t in sorted(self.timers, key=lambda item: (item[0], item[1])):
            if t.cancelled:
                continue
            args = _plain(list(t.args))
            if args is None:
                continue
            fn = t.fn
            callback: Any
            if getattr(fn, "__self__", None) is self.room and isinstance(getattr(fn, "__name__", None), str):
                callback = fn.__name__
            else:
                callback = _closure_spec(self.cls, self.room, fn)
                if callback is None:
                    continue
            out.append([due, t.every, callback, args])
        return out

    def view(self, uid: str, full: dict[str, Any]) -> dict[str, Any]:
        """What ``uid`` alone sees of the private fields: ``{"state": {field: full[field][uid]}}``."""
        mine = {}
        for f in self.cls.private_fields:
            values = full.get(f)
            if uid in self.members and isinstance(values, dict) and uid in values:
                mine[f] = values[uid]
        return {"state": mine, "members": {}, "room": {}, "inbox": 0}

    async def commit_views(self, full: dict[str, Any]) -> None:
        """Append a patch to ``roomview:{id}:{user}`` for each player whose private part changed."""
        for uid in sorted(set(self.members) | set(self.view_prev)):
            new = self.view(uid, full)
            prev = self.view_prev.get(uid)
            ops = [["set", [], new]] if prev is None else patch.diff(prev, new)
            if ops:
                stream = f"roomview:{self.id}:{uid}"
                res = await self.rt.write(stream, "patch", {"ops": ops, "inbox": self.applied}, expect=self.view_heads.get(uid, 0))
                self.view_heads[uid] = res.event.offset
                self.view_prev[uid] = new

    async def restore(self, doc: RoomDoc, head: int, deadline: float) -> None:
        """Continue from a folded document (a new owner).

        Args:
            doc: The fold of ``room:{id}`` at ``head``.
            head: The offset of ``room:{id}`` this owner continues after (its fence).
            deadline: When (``anyio.current_time()``) the players' views must
                be folded up to their heads (:meth:`_Runtime.folded`).
        """
        st = self.cls.state_type
        full = dict(doc.state or {})
        for uid in doc.members if self.cls.private_fields else ():
            # Private fields live only in the players' views: fold them back in,
            # from a fold that reached the view's head (not one the feed is
            # still bringing up to date: its hand would be an old one).
            stream = f"roomview:{self.id}:{uid}"
            info = await self.node.backend.events.info(stream)
            view = await self.rt.folded(stream, info, deadline)
            vdoc = view.state
            assert isinstance(vdoc, RoomDoc)
            for f, v in (vdoc.state or {}).items():
                full.setdefault(f, {})[uid] = v
            self.view_prev[uid] = msgspec.to_builtins(vdoc.builtins())
            self.view_heads[uid] = view.offset
        self.room.state = msgspec.convert(full, st, strict=False)
        self.full_prev = state_builtins(self.room.state)
        self.members = {uid: msgspec.convert(m, _Member) for uid, m in doc.members.items()}
        self.locked = bool(doc.room.get("locked", False))
        self.room.metadata = dict(doc.room.get("metadata", {}))
        self.applied = doc.inbox
        self.head = head
        self.prev = msgspec.to_builtins(doc.builtins())
        now = self.node.clock()
        for uid, m in self.members.items():
            if not m.connected and m.grace_until is not None:
                self.graces[uid] = self._at(max(0.0, m.grace_until - now), self._grace_over, uid)
        for due, every, callback, args in doc.room.get("timers", []):
            fn = getattr(self.room, callback, None) if isinstance(callback, str) else _closure_from(self.cls, self.room, callback)
            if callable(fn):
                self._schedule(Timer(float(due), every, fn, tuple(args)))
            else:
                log.warning("room %s: cannot re-arm timer %r (the code changed?)", self.id, callback)
        if not self.members:
            self.dispose_timer = self._at(self.cls.auto_dispose, self._auto_dispose)
        self._start_ticks()

    async def commit(self) -> None:
        """Append one patch with what changed (if anything), then the queued messages."""
        new = self.doc()
        ops = [["set", [], new]] if self.head == 0 else self._diff(new)
        if ops:
            res = await self.rt.write(self.stream, "patch", {"ops": ops, "inbox": self.applied}, expect=self.head)
            self.head = res.event.offset
            self.prev = new
        if self.cls.private_fields:
            await self.commit_views(self._full)
        self.full_prev = self._full
        if not self.outgoing:
            return  # most steps queue no message: no new list per step
        out, self.outgoing = self.outgoing, []
        for kind, who, type_, data in out:
            body = {"room": self.id, "type": type_, "data": msgspec.to_builtins(data)}
            if kind == "dm":
                assert who is not None
                try:
                    await self.node.send_to(who, type_, body["data"], room=self.id)
                except BackendError as exc:
                    # At most once by design: a lost direct message must not stop the room.
                    log.warning("room %s: direct message to %r dropped: %s", self.id, who, exc)
            else:
                body["except"] = who
                ev = await self.node.publish(self.stream, "msg", body, expect=self.head)
                self.head = ev.offset

    # --- timers -------------------------------------------------------------------

    def _schedule(self, timer: Timer) -> None:
        heapq.heappush(self.timers, (timer.due, next(_TIMER_SEQ), timer))
        self.poke()

    def _at(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Timer:
        return self.room.clock.set_timeout(seconds, fn, *args)

    def _start_ticks(self) -> None:
        if self.cls.tick_rate:
            self.last_tick = self.node.clock()
            self.next_tick = self.last_tick + 1 / self.cls.tick_rate
            self.poke()  # a tick is due: the executor's task must run to fire it

    def _next_due(self) -> float | None:
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
        due = [t for t in (self.timers[0][0] if self.timers else None, self.next_tick, self.flush_at) if t is not None]
        return min(due) if due else None

    # --- membership ---------------------------------------------------------------

    def allow_reconnection(self, uid: str, seconds: float) -> None:
        m = self.members.get(uid)
        if m is None or m.connected:
            raise ValueError(f"allow_reconnection: {uid!r} is not a dropped member of room {self.id}")
        if seconds <= 0:
            raise ValueError(f"allow_reconnection: seconds must be > 0, got {seconds}")
        m.grace_until = float(self.node.clock() + seconds)  # a float always: the members cache compares values
        old = self.graces.pop(uid, None)
        if old is not None:
            old.cancel()
        self.graces[uid] = self._at(seconds, self._grace_over, uid)

    async def _grace_over(self, uid: str) -> None:
        m = self.members.get(uid)
        self.graces.pop(uid, None)
        if m is not None and not m.connected:
            await self._remove(uid, consented=False)

    async def _remove(self, uid: str, *, consented: bool) -> None:
        del self.members[uid]
        grace = self.graces.pop(uid, None)
        if grace is not None:
            grace.cancel()
        await call(self.room.on_leave, Player(uid), consented)
        if not self.members and self.dispose_timer is None:
            self.dispose_timer = self._at(self.cls.auto_dispose, self._auto_dispose)

    async def _auto_dispose(self) -> None:
        self.dispose_timer = None
        if not self.members:
            self.dispose_requested = True

    def _join_result(self, uid: str, reconnected: bool) -> dict[str, Any]:
        return {
            "room_id": self.id,
            "type": self.rt.types_by_cls[self.cls],
            "code": self.code,
            "stream": self.stream,
            "user": uid,
            "view": f"roomview:{self.id}:{uid}" if self.cls.private_fields else None,
            "reconnected": reconnected,
        }

    # --- inbox entries --------------------------------------------------------------

    async def _op_create(self, uid: str, data: dict[str, Any]) -> Any:
        self.room.metadata = dict(data.get("metadata") or {})
        try:
            await call(self.room.on_create, data.get("options") or {})
            self._start_ticks()
            return await self._op_join(uid, data)
        except BaseException:
            self.dispose_requested = True  # a room nobody could enter is not left behind
            raise

    async def _op_join(self, uid: str, data: dict[str, Any]) -> Any:
        options = data.get("options") or {}
        m = self.members.get(uid)
        if m is not None:
            if m.connected:
                return self._join_result(uid, False)  # another tab of a seated player
            m.connected, m.grace_until = True, None
            grace = self.graces.pop(uid, None)
            if grace is not None:
                grace.cancel()
            await call(self.room.on_reconnect, Player(uid))
            return self._join_result(uid, True)
        if self.locked:
            raise Rejected("room_locked", f"room {self.id} is locked")
        if self.cls.max_clients and len(self.members) >= self.cls.max_clients:
            raise Rejected("room_full", f"room {self.id} has no free seat ({self.cls.max_clients} max)")
        player = Player(uid)
        await call(self.room.on_join_attempt, player, options)
        self.members[uid] = _Member()
        if self.dispose_timer is not None:
            self.dispose_timer.cancel()
            self.dispose_timer = None
        try:
            await call(self.room.on_join, player, options)
        except BaseException:
            del self.members[uid]  # a join that failed takes no seat
            if not self.members and self.dispose_timer is None:
                self.dispose_timer = self._at(self.cls.auto_dispose, self._auto_dispose)
            raise
        return self._join_result(uid, False)

    async def _op_leave(self, uid: str, data: dict[str, Any]) -> Any:
        if uid not in self.members:
            raise Rejected("not_in_room", f"{uid!r} is not a member of room {self.id}")
        await self._remove(uid, consented=True)
        return {"room_id": self.id}

    async def _op_drop(self, uid: str, data: dict[str, Any]) -> Any:
        m = self.members.get(uid)
        if m is None or not m.connected:
            return None
        m.connected = False
        await call(self.room.on_drop, Player(uid))
        if uid not in self.graces and uid in self.members:
            await self._remove(uid, consented=False)
        return None

    async def _op_send(self, uid: str, data: dict[str, Any]) -> Any:
        m = self.members.get(uid)
        if m is None:
            raise Rejected("not_in_room", f"{uid!r} is not a member of room {self.id}")
        if not m.connected:
            await self._op_join(uid, {})  # a dropped player who speaks is back
        type_ = data["type"]
        handler = self.rt.rooms.handlers[self.cls].get(type_)
        player = Player(uid)
        if handler is None:
            return await call(self.room.on_message, player, type_, data.get("data"))
        name, target = handler
        fn = getattr(self.room, name)
        value = data.get("data")
        if target is not None:
            try:
                value = msgspec.convert(value, target, strict=False)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"message {type_!r}: invalid data: {exc}", code="bad_args") from None
        return await call(fn, player, value)

    def _checkpoint(self) -> tuple[Any, bool, int]:
        """What a refusing handler is reverted to: the state, the lock, the queued messages."""
        # full_prev is the state as last published; with inputs applied but not
        # yet published (patch_rate), the state has moved on since: copy it, as
        # MessagePack (a fraction of state_builtins' cost, which also sorts; this
        # runs before every coalesced input and every tick).
        state = _pack(self.room.state) if self.uncommitted else self.full_prev
        return state, self.locked, len(self.outgoing)

    def _revert(self, cp: tuple[Any, bool, int]) -> None:
        state = cp[0]
        if state is not None:
            if type(state) is bytes:
                self.room.state = msgspec.msgpack.decode(state, type=self.cls.state_type, strict=False)
            else:
                self.room.state = msgspec.convert(state, self.cls.state_type, strict=False)
            self.locked = cp[1]
            del self.outgoing[cp[2] :]

    async def apply_entry(self, ev: Event) -> None:
        data = ev.data if isinstance(ev.data, dict) else {}
        uid = str(data.get("user", ""))
        op = _OPS.get(ev.type)  # not getattr(self, f"_op_{type}"): a string built and looked up per move
        cp = self._checkpoint() if self.head else None
        entry: _Entry
        if self.disposed:
            entry = _Entry(False, error=Rejected("room_not_found", f"room {self.id} was disposed"))
        elif op is None:
            entry = _Entry(False, error=RtcoreError(f"unknown room inbox entry {ev.type!r}", code="internal"))
        else:
            try:
                entry = _Entry(True, msgspec.to_builtins(await op(self, uid, data)))
            except RtcoreError as exc:
                entry = _Entry(False, error=exc)
            except Exception:
                log.exception("room %s: %s by %r raised", self.id, ev.type, uid)
                entry = _Entry(False, error=RtcoreError(f"room {ev.type} failed unexpectedly", code="internal", retryable=False))
            if not entry.ok and cp is not None:
                # A handler that refuses changes nothing: back to where it started.
                self._revert(cp)
        self.applied = ev.offset
        self.uncommitted.append((ev.offset, entry, data.get("node")))
        if self.patch_every and ev.type == "send" and not self.dispose_requested:
            # Coalesced: this input's change goes out with the next patch (at
            # most patch_rate a second); its sender waits for that patch.
            if self.flush_at is None:
                self.flush_at = self.node.clock() + self.patch_every
            return
        await self.after_step()

    def _in_flight(self, offset: int) -> bool:
        """Whether inbox entry ``offset`` is applied but its patch is not written yet.

        The applied entries are consecutive offsets, so those without their
        patch are ``uncommitted[0]`` up to :attr:`applied` (no set of them is
        kept: one per room was a few hundred bytes, tracemalloc).
        """
        return bool(self.uncommitted) and self.uncommitted[0][0] <= offset <= self.applied

    @property
    def in_flight(self) -> set[int]:
        """The applied inbox offsets whose patch is not written yet (tests and tools)."""
        return {offset for offset, _, _ in self.uncommitted}

    async def _settle_uncommitted(self) -> None:
        """The patch covering the applied inputs is written: hand out their results."""
        done, self.uncommitted = self.uncommitted, []
        for offset, entry, origin in done:
            if isinstance(origin, str) and origin != self.node.id:
                await self._reply(origin, offset, entry)
            self.results[offset] = entry
            waiter = self.waiters.pop(offset, None)
            if waiter is not None:
                waiter.set()
        while len(self.results) > RESULTS_KEPT:
            del self.results[next(iter(self.results))]

    def _unapply(self) -> None:
        """Inputs whose patch was not written are not applied (the next owner applies them)."""
        if self.uncommitted:
            self.applied = self.uncommitted[0][0] - 1
            self.uncommitted.clear()

    async def _reply(self, origin: str, offset: int, entry: _Entry) -> None:
        """Answer an entry appended on another node through ``roomreply:{id}``."""
        err = entry.error
        body = {
            "node": origin,
            "inbox": offset,
            "ok": entry.ok,
            "result": entry.result,
            "code": err.code if err else "",
            "message": err.message if err else "",
            "retryable": err.retryable if err else False,
        }
        await self.node.publish(f"roomreply:{self.id}", "reply", body, key=f"reply:{offset}")

    async def after_step(self) -> None:
        self.flush_at = None
        if self.dispose_requested and not self.disposed:
            await call(self.room.on_dispose)
            self.disposed = True
            self.members.clear()
            for t in self.graces.values():
                t.cancel()
            self.graces.clear()
        try:
            await self.commit()
        except BaseException:
            # The patch covering these entries was not written: they are not
            # applied (the next owner applies them), and result() must not say they were.
            self._unapply()
            raise
        await self._settle_uncommitted()
        await self._list()
        if self.disposed:
            self.closed = True

    async def _list(self) -> None:
        """Append the room's listing entry to ``roomindex:{type}`` when it changed."""
        if self.private:
            return
        # A listed room without metadata (the common case) changes its entry
        # only with its seat count or lock: compared as a tuple, the entry
        # (a dict and a metadata copy) is not rebuilt after every move.
        md = self.room.metadata
        key = (len(self.members), self.locked) if type(md) is dict and not md and not self.disposed else None
        if key is not None and key == self._list_key:
            return
        entry = {"room_id": self.id, "gone": True} if self.disposed else _entry(self)
        if entry != self.listed:
            self.rt.relist(self, entry)
            ev = await self.node.publish(f"roomindex:{self.rt.types_by_cls[self.cls]}", "room", entry)
            # The stored event's copy (equal to ``entry``), not one more dict per room.
            self.listed = ev.data if type(ev.data) is dict else entry
        self._list_key = key

    # --- the loop -------------------------------------------------------------------

    async def run_inline(self, ev: Event) -> bool:
        """Apply inbox entry ``ev`` on the caller's task if the executor is parked with nothing else to do.

        The command that appended ``ev`` on the owner's node would otherwise
        hand it to the executor's task and wait for that task to wake, apply
        it, write the patch and wake the command again: two task switches and
        a loop round per move (py-spy). Here the caller runs the same step
        (:meth:`apply_entry`) while the executor's task stays parked; the
        executor waits for it (``inline``) if it wakes meanwhile, so entries
        are still applied one at a time, in inbox order, each patch fenced by
        ``expect``. The step is shielded: a command cancelled halfway (its
        client left) must not leave the state changed without its patch.

        Returns:
            Whether ``ev`` was applied here (or the attempt stopped this
            owner); ``False``: hand it over with :meth:`push` instead.
        """
        if not (
            (self.parked or not self.running)
            and not self.inline
            and ev.offset == self.applied + 1
            and not (self.pending or self.uncommitted or self.need_read or self.closed or self.lost)
            and not self.patch_every  # coalesced inputs are flushed by the executor's timer
            and self.node.clock() - self.renewed < LEASE * 2 / 3  # else the executor renews first (_renew)
        ):
            return False
        self.inline = True
        try:
            # Entered before the step starts, though a step that never suspends
            # (a move on memory://) cannot be cancelled: a scope entered only at
            # the step's first suspension would nest inside the scopes the step
            # entered before it (anyio.Lock, move_on_after), which then fail to
            # exit (test_a_cancel_scope_the_step_enters_before_suspending_exits).
            with self.rt.shield():
                await self.apply_entry(ev)
        except Exception:
            # An owner whose step failed (fenced off by another writer, backend
            # down) stops, as run() does when fenced off; the entry is not
            # applied (after_step unapplied it) and the next owner applies it.
            log.warning("room %s: a step failed; stopping here", self.id, exc_info=True)
            self.lost = True
        finally:
            self.inline = False
            if self.inline_done is not None:
                self.inline_done.set()
                self.inline_done = None
            if self.closed or self.lost:
                self.poke()  # the executor ends its loop (and the room)
        return True

    def push(self, ev: Event) -> None:
        """Hand over an inbox entry in-process (appended here, or seen on the live feed)."""
        if ev.offset > self.applied:
            self.pending[ev.offset] = ev
        self.poke()

    def poke(self) -> None:
        """Have the executor look at the room: wake its task, or start one if the room has none."""
        if self.running:
            self.woken = True
            if self.wake is not None:
                self.wake.set()
            return
        if self.done:
            return
        self.running = True
        self.woken = False
        try:
            self.node.spawn(self.run)
        except RuntimeError:
            # The node is stopping (its keeper releases the lease of a room without a task).
            self.running = False

    async def result(self, offset: int) -> _Entry | None:
        """Wait until inbox entry ``offset`` was applied; return what it gave.

        ``None``: this owner stopped (lost its lease) before applying it; the
        caller waits for the next owner.
        """
        # Until its patch is written, an applied entry's result is not stored
        # yet: wait for it too (else "recovered" is answered).
        if (offset > self.applied or self._in_flight(offset)) and not self.closed:
            ev = self.waiters.setdefault(offset, anyio.Event())
            if offset not in self.pending:
                self.need_read = True
            self.poke()
            await ev.wait()
        entry = self.results.get(offset)
        if entry is not None:
            return entry
        if self.disposed:
            return _Entry(False, error=Rejected("room_not_found", f"room {self.id} is gone"))
        if offset > self.applied:
            return None
        # Applied by an earlier owner (or long ago): its answer is on roomreply.
        return await self.rt.settled(self.id, offset)

    async def run(self) -> None:
        """The executor's task: steps until the room has nothing to do and nothing due, or stops."""
        try:
            while not self.closed:
                while self.inline:
                    # A command is applying an input on its own task (run_inline): one step at a time.
                    if self.inline_done is None:
                        self.inline_done = anyio.Event()  # made only when needed: most steps find no executor
                    await self.inline_done.wait()
                if self.lost or not await self._renew():
                    log.warning("room %s: lost its lease; stopping here", self.id)
                    break
                await self._drain()
                await self._fire_due()
                if self.closed:
                    break
                if not await self._wait():
                    # Idle: the task ends (no await since _wait looked); poke() starts another.
                    self.running = False
                    return
        except ConflictError:
            log.warning("room %s: another node wrote its stream; stopping here", self.id)
        finally:
            if self.running:  # stopping (closed, lost, fenced off, or the node's task group cancelled)
                self.running = False
                await self.stop()

    async def stop(self) -> None:
        """Stop owning the room: unapply what is not written, wake the waiters, release the lease."""
        if self.done:
            return
        self.done = self.closed = True
        self._unapply()
        self.rt.forget(self)
        for waiter in self.waiters.values():
            waiter.set()
        self.waiters.clear()
        with anyio.CancelScope(shield=True):
            try:
                await self.node.backend.leases.release(self.stream, self.node.id)
            except RtcoreError:
                log.warning("room %s: could not release its lease", self.id, exc_info=True)
        if self.idle is not None:
            self.idle.set()

    async def _renew(self) -> bool:
        """Renew the lease here only when the node's keeper fell behind (it renews every LEASE / 3)."""
        now = self.node.clock()
        if now - self.renewed < LEASE * 2 / 3:
            return True
        ok = await self.node.backend.leases.acquire(self.stream, self.node.id, now=now, ttl=LEASE)
        if ok:
            self.renewed = now
        return ok

    async def _drain(self) -> None:
        while not self.closed:
            ev = self.pending.pop(self.applied + 1, None)
            if ev is not None:
                await self.apply_entry(ev)
                continue
            now = self.node.clock()
            if self.pending and min(self.pending) <= self.applied:
                self.pending = {k: v for k, v in self.pending.items() if k > self.applied}
            if not (self.need_read or self.pending):
                return
            # A gap (an entry appended elsewhere, not seen on the feed yet) or a periodic check.
            self.need_read = False
            self.last_read = now
            page = await self.node.backend.events.read(self.inbox, after=self.applied, limit=BATCH)
            if not page.events:
                self.pending.clear()  # not in the log (yet): the feed or the next read brings them
                return
            for ev in page.events:
                self.pending.pop(ev.offset, None)
                await self.apply_entry(ev)
                if self.closed:
                    return
            self.need_read = len(page.events) == BATCH

    async def _fire_due(self) -> None:
        while not self.closed:
            now = self.node.clock()
            due = self._next_due()
            if due is None or due > now:
                return
            if self.flush_at is not None and self.flush_at <= now and self.flush_at <= due:
                await self.after_step()  # the coalesced inputs' patch
                continue
            if self.next_tick is not None and self.next_tick <= now and (not self.timers or self.next_tick <= self.timers[0][0]):
                dt = now - self.last_tick
                self.last_tick = now
                self.next_tick = now + 1 / float(self.cls.tick_rate or 1)
                _hold_collector()
                try:
                    await self._step(self.room.on_tick, (dt,))
                finally:
                    _release_collector()
                continue
            _, _, timer = heapq.heappop(self.timers)
            if timer.every is not None:
                timer.due = max(timer.due + timer.every, now)
                heapq.heappush(self.timers, (timer.due, next(_TIMER_SEQ), timer))
            await self._step(timer.fn, timer.args)

    async def _step(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Run a timer or tick callback on the executor; a raise is logged and reverted."""
        cp = self._checkpoint()
        try:
            await call(fn, *args)
        except Exception:
            log.exception("room %s: timer or tick raised", self.id)
            self._revert(cp)
        await self.after_step()

    async def _wait(self) -> bool:
        """Sleep until poked or a timer, tick or patch is due; ``False``: nothing is due (the task may end).

        The node's keeper pokes the room when a fake clock moves and for the
        fallback read; real time is the timeout of timers, ticks and patches.
        """
        due = self._next_due()
        if self.idle is not None:
            self.idle.set()
            self.idle = None
        if not self.woken:
            if due is None:
                return False
            self.wake = anyio.Event()
            self.parked = True
            try:
                with anyio.move_on_after(max(0.0, due - self.node.clock())):
                    await self.wake.wait()
            finally:
                self.parked = False
                self.wake = None
        self.woken = False
        return True


#: A tick step holds the collector off only until a young collection is this many
#: thresholds overdue (gen-0 allocations counted since the last collection).
_OVERDUE = 4


class _Collector:
    """Whether the rooms hold CPython's cyclic collector off (see :func:`_hold_collector`)."""

    depth = 0  # tick steps in progress
    owned = False  # the rooms disabled it and have not enabled it again
    pending: asyncio.AbstractEventLoop | None = None  # the loop whose callback will enable it


def _hold_collector() -> None:
    """Keep the cyclic collector from starting inside a tick step.

    A young collection that lands inside a tick step (1.5-2.9 ms with the
    10,000 threshold ``rtcore serve`` sets, on a 100-player room's heap:
    ``benchmarks/rooms.py``) stops the step before its patch reaches the
    subscribers' outboxes. Held off, the collection that was due runs
    after the step, once the outboxes' writers it woke have run (a loop
    callback queued after them, :func:`_release_collector`), so the patch
    leaves first. Nothing is collected less: the allocations count on, and
    the first one after the collector is enabled again starts the
    collection. An app that disabled the collector itself keeps it so.
    """
    pending = _Collector.pending
    if pending is not None and pending is not asyncio._get_running_loop():
        # That loop stopped before running its callbacks (another loop runs
        # now, or none): the collector must not stay off for good.
        _enable_collector()
    if _Collector.owned and gc.get_count()[0] > _OVERDUE * gc.get_threshold()[0]:
        # Tick steps that overlap without end (many rooms whose steps wait on
        # sqlite:// or redis://) would keep the count from ever reaching 0:
        # once a young collection is this overdue, give the collector back
        # until the steps in progress have ended (the next allocation starts
        # the collection, inside this step: a late collection beats none).
        _Collector.owned = False
        gc.enable()
    if _Collector.depth == 0 and not _Collector.owned and gc.isenabled():
        gc.disable()
        _Collector.owned = True
    _Collector.depth += 1


def _release_collector() -> None:
    """End a :func:`_hold_collector`; the last one enables the collector after the loop's queued callbacks."""
    _Collector.depth -= 1
    if _Collector.depth or not _Collector.owned or _Collector.pending is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): at once
        _enable_collector()
        return
    _Collector.pending = loop
    loop.call_soon(_enable_collector)


def _enable_collector() -> None:
    _Collector.pending = None
    if _Collector.depth == 0 and _Collector.owned:
        _Collector.owned = False
        gc.enable()


#: Inbox entry type -> the step that applies it (an unknown type is answered ``internal``).
_OPS: dict[str, Callable[..., Awaitable[Any]]] = {
    "create": _Actor._op_create,
    "join": _Actor._op_join,
    "leave": _Actor._op_leave,
    "drop": _Actor._op_drop,
    "send": _Actor._op_send,
}


def _plain(value: Any) -> Any:
    """``value`` if it is plain builtins that survive a round trip unchanged, else ``None``.

    Map keys must be strings (``str_keys``): a JSON round trip turns ``1`` into
    ``"1"``, and the document holding the value is encoded as it is for its
    checksums (``RoomDoc.builtins_only``).
    """
    try:
        out = msgspec.to_builtins(value, str_keys=True)
    except TypeError:
        return None
    return out if out == value and type(out) is type(value) else None


def _nested_code(code: types.CodeType, qualname: str, line: int) -> types.CodeType | None:
    """The code object defined (at any depth) inside ``code`` with this qualname and first line."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_qualname == qualname and const.co_firstlineno == line:
                return const
            found = _nested_code(const, qualname, line)
            if found is not None:
                return found
    return None


def _method_code(cls: type, qualname: str) -> tuple[types.FunctionType, str] | None:
    """The method of ``cls`` (or a base) in which the function ``qualname`` was defined."""
    for base in cls.__mro__:
        prefix = base.__qualname__ + "."
        if qualname.startswith(prefix) and ".<locals>." in qualname[len(prefix) :]:
            method = vars(base).get(qualname[len(prefix) :].partition(".<locals>.")[0])
            if isinstance(method, types.FunctionType):
                return method, qualname
    return None


def _closure_spec(cls: type, room: Any, fn: Any) -> dict[str, Any] | None:
    """Describe a closure or lambda defined in a method of ``cls`` so another node can rebuild it.

    ``{"closure": qualname, "line": first line, "cells": [...], "defaults": [...]}``;
    each cell is ``{"room": true}`` (the room itself), ``{"player": id}`` or
    ``{"value": builtins}``. ``None``: not rebuildable (captures something
    else, or is not defined in the room type).
    """
    if not isinstance(fn, types.FunctionType) or fn.__kwdefaults__:
        return None
    code = fn.__code__
    found = _method_code(cls, code.co_qualname)
    if found is None or _nested_code(found[0].__code__, code.co_qualname, code.co_firstlineno) is not code:
        return None
    cells: list[dict[str, Any]] = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            return None  # not assigned yet
        if value is room:
            cells.append({"room": True})
        elif isinstance(value, Player):
            cells.append({"player": value.id})
        else:
            plain = _plain(value)
            if plain is None and value is not None:
                return None
            cells.append({"value": plain})
    defaults = _plain(list(fn.__defaults__ or ()))
    if defaults is None:
        return None
    return {"closure": code.co_qualname, "line": code.co_firstlineno, "cells": cells, "defaults": defaults}


def _closure_from(cls: type, room: Any, spec: Any) -> Callable[..., Any] | None:
    """Rebuild a closure described by :func:`_closure_spec` around ``room`` (``None``: not found)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("closure"), str):
        return None
    found = _method_code(cls, spec["closure"])
    code = _nested_code(found[0].__code__, spec["closure"], int(spec.get("line", 0))) if found else None
    if found is None or code is None or len(code.co_freevars) != len(spec.get("cells", [])):
        return None
    cells = []
    for cell in spec["cells"]:
        if cell.get("room"):
            cells.append(types.CellType(room))
        elif "player" in cell:
            cells.append(types.CellType(Player(str(cell["player"]))))
        else:
            cells.append(types.CellType(cell.get("value")))
    return types.FunctionType(code, found[0].__globals__, code.co_name, tuple(spec.get("defaults") or ()), tuple(cells))


def _data_type(fn: Callable[..., Any]) -> Any:
    """The annotation of a message handler's ``data`` parameter (``None``: pass as is).

    ``fn`` is the plain function ``(self, player, data)``; the annotations are
    resolved once, when the room type is defined, so a typo fails there.
    """
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 3:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TypeError(f"cannot resolve the annotations of message handler {fn.__qualname__}: {exc}") from exc
    target = hints.get(params[2].name)
    return None if target is Any else target


def _scope_factory() -> Callable[..., anyio.CancelScope]:
    """The running backend's cancel scope factory (``anyio.CancelScope`` if anyio hides it)."""
    try:
        from anyio._core._eventloop import get_async_backend

        return typing.cast("Callable[..., anyio.CancelScope]", get_async_backend().create_cancel_scope)
    except Exception:  # an anyio without it: the public class (slower, same scope)
        return anyio.CancelScope


class _Runtime:
    """The rooms of one node."""

    def __init__(self, rooms: Rooms, node: Node) -> None:
        self.rooms = rooms
        self.node = node
        self.types_by_cls = {cls: name for name, cls in rooms.types.items()}
        self.actors: dict[str, _Actor] = {}
        self.codes: dict[str, str] = {}
        self.matchmaking: dict[str, anyio.Lock] = {}
        self._adopting: dict[str, anyio.Lock] = {}
        # Answers from other owners to entries appended here, and who waits for them.
        self.replies: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self.reply_waiters: dict[tuple[str, int], anyio.Event] = {}
        # Rooms each user joined through this node (to record their drops).
        # A list, not a set: a player is in one or two rooms (a set is 216 bytes even then).
        self.via_here: dict[str, list[str]] = {}
        self.gone: set[str] = set()  # rooms known to be disposed (the supervisor skips them)
        # Listed rooms of this node with a free seat, by type (join_or_create looks here first).
        self.open: dict[str, dict[str, _Actor]] = {}
        # Seats promised to joins of this node that are not applied yet, by room.
        self.reserved: dict[str, int] = {}
        self.fallback_read = FALLBACK_READ if "processor" in node.roles else IDLE_WAIT
        self.keeping = False
        self._retention: dict[str, Any] = {}  # the app's rule for each room:{id} owned here
        self.down: dict[str, _Down] = {}  # rooms this node failed to adopt (_unavailable)
        self._scope: Callable[..., anyio.CancelScope] | None = None  # see shield()
        node.presence.watch(self._presence_changed)

    def shield(self) -> anyio.CancelScope:
        """``anyio.CancelScope(shield=True)``, made by the event loop's backend directly.

        ``anyio.CancelScope()`` looks up the running backend (sniffio) on
        every call: a third of the shielded scope around every inline move
        (py-spy). A node runs on one event loop for its lifetime, so the
        backend's factory is looked up once.
        """
        make = self._scope
        if make is None:
            make = self._scope = _scope_factory()
        return make(shield=True)

    def write(self, stream: str, type_: str, data: dict[str, Any], *, expect: int) -> Awaitable[AppendResult]:
        """Append a patch the owner made (builtins already, to a stream name it built); await it.

        ``node.publish`` without its per-call name check and ``to_builtins``
        copy, which cost a measurable share of each move (py-spy). A plain
        function returning the backend's coroutine, not a coroutine of its
        own: one frame less per pending write, which the cyclic collector
        walks while the write waits for a durable backend's commit.
        """
        rule = self._retention.get(stream)
        if rule is None:
            rule = self.node.app.retention_for(stream)
            if stream.startswith("room:"):
                self._retention[stream] = rule
        return self.node.backend.events.append(stream, type_, data, now=self.node.clock(), key=None, expect=expect, retention=rule)

    def start(self, actor: _Actor) -> None:
        """Run a new owner on the node (and the node's keeper, once)."""
        self.actors[actor.id] = actor
        self.codes[actor.code] = actor.id
        actor.done = False
        actor.poke()
        if not self.keeping:
            self.keeping = True
            self.node.spawn(self._keep)

    async def _keep(self) -> None:
        """One task per node: renew the leases of its rooms, wake them when a fake clock moves.

        Renewing here (every ``LEASE / 3``) instead of in each room's loop
        lets an idle room sleep until something happens. The lease store has
        no batch call, so the renewals are one call per room, once per round.
        """
        try:
            clock_moved = self.node.timer_wakeup
            while True:
                with anyio.move_on_after(KEEP_EVERY):
                    await clock_moved.wait()
                if clock_moved.is_set():
                    clock_moved = self.node.timer_wakeup
                    for actor in list(self.actors.values()):
                        if actor.running:  # a room without a task has nothing due
                            actor.poke()
                for actor in list(self.actors.values()):
                    now = self.node.clock()
                    if not actor.closed and now - actor.last_read >= self.fallback_read:
                        actor.need_read = True  # the safety-net read (see FALLBACK_READ)
                        actor.poke()
                    if actor.closed or now - actor.renewed < LEASE / 3:
                        continue
                    try:
                        ok = await self.node.backend.leases.acquire(actor.stream, self.node.id, now=now, ttl=LEASE)
                    except RtcoreError:
                        log.warning("room %s: could not renew its lease (trying again)", actor.id, exc_info=True)
                        continue
                    if ok:
                        actor.renewed = max(actor.renewed, now)
                    else:
                        actor.lost = True
                        actor.poke()
        finally:
            self.keeping = False
            # A room without a task (idle) has no executor to release its lease
            # when the node stops: this one does, so a clean stop hands rooms
            # over at once, as before.
            for actor in list(self.actors.values()):
                if not actor.running:
                    await actor.stop()

    def relist(self, actor: _Actor, entry: dict[str, Any]) -> None:
        """Keep :attr:`open` current with the listing entry the owner just computed."""
        type_ = self.types_by_cls[actor.cls]
        seats = entry.get("max_clients") or 0
        if entry.get("gone") or entry.get("locked") or actor.closed or (seats and entry["clients"] >= seats):
            self.open.get(type_, {}).pop(actor.id, None)
        else:
            self.open.setdefault(type_, {})[actor.id] = actor

    def forget(self, actor: _Actor) -> None:
        self._retention.pop(actor.stream, None)
        if self.actors.get(actor.id) is actor:
            del self.actors[actor.id]
            self.codes.pop(actor.code, None)
        opened = self.open.get(self.types_by_cls.get(actor.cls, ""), {})
        if opened.get(actor.id) is actor:
            del opened[actor.id]

    def _presence_changed(self, uid: str, online: bool) -> None:
        if online:
            return  # the user's last tab on this node closed: only then is it a drop
        rooms = set(self.via_here.pop(uid, ()))
        for actor in list(self.actors.values()):
            m = actor.members.get(uid)
            if m is not None and m.connected:
                rooms.add(actor.id)
        for room_id in sorted(rooms):
            try:
                self.node.spawn(functools.partial(self._submit_drop, room_id, uid))
            except RuntimeError:
                return  # the node is stopping: the next owner sees the members as they were

    async def _submit_drop(self, room_id: str, uid: str) -> None:
        # Shielded (and bounded): a connection that closes just before its node
        # stops must still have its drop recorded, or the next owner would keep
        # a seat "connected" that nobody holds (trio may start this task only
        # after the node's task group was cancelled).
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                ev = await self.node.publish(f"roominbox:{room_id}", "drop", {"user": uid})
            except RtcoreError:
                log.warning("room %s: could not record the drop of %r", room_id, uid, exc_info=True)
                return
        self.wake(room_id, ev)

    def wake(self, room_id: str, event: Event | None = None) -> None:
        """Tell the local owner of ``room_id`` (if any) that its inbox grew (by ``event``, if known)."""
        actor = self.actors.get(room_id)
        if actor is not None:
            if event is not None:
                actor.push(event)
            else:
                actor.need_read = True
                actor.poke()

    def on_reply(self, event: Event) -> None:
        """A ``roomreply:{id}`` event: wake the command here that waits for it."""
        data = event.data
        if not isinstance(data, dict) or data.get("node") != self.node.id:
            return
        room_id = event.stream.partition(":")[2]
        key = (room_id, int(data["inbox"]))
        if data["ok"]:
            entry = _Entry(True, data.get("result"))
        else:
            entry = _Entry(False, error=error_from_wire(data["code"], data["message"], bool(data["retryable"])))
        waiter = self.reply_waiters.pop(key, None)
        if waiter is not None:
            self.replies[key] = entry
            while len(self.replies) > RESULTS_KEPT:
                self.replies.popitem(last=False)
            waiter.set()

    def _new_code(self) -> str:
        while True:
            code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(6))
            if code not in self.codes:
                return code

    async def create(self, ctx: Context, uid: str, type_: str, options: dict[str, Any], private: bool, metadata: dict[str, Any]) -> Any:
        actor, offset = await self.start_create(ctx, uid, type_, options, private, metadata)
        return await self.finish(actor.id, "create", uid, offset, actor)

    async def start_create(
        self, ctx: Context, uid: str, type_: str, options: dict[str, Any], private: bool, metadata: dict[str, Any]
    ) -> tuple[_Actor, int]:
        """Make a room owned here and append its ``create`` entry; return the owner and the entry's offset."""
        cls = self.rooms.types.get(type_)
        if cls is None:
            raise Rejected("unknown_room_type", f"no room type named {type_!r}")
        room_id = secrets.token_hex(6)
        # Made before its lease is taken so that the lease store keeps the
        # owner's own stream name as its key (not one more string per room).
        actor = _Actor(self, cls, room_id, self._new_code(), private)
        if not await self.node.backend.leases.acquire(actor.stream, self.node.id, now=self.node.clock(), ttl=LEASE):
            raise BackendError("could not take the new room's lease", code="backend_unavailable", retryable=True)
        actor.room.metadata = dict(metadata)  # for matchmaking until on_create ran (it is set again there)
        # So any node can find the room by its code (the code is the secret of a private room).
        await self.node.publish(f"roomcode:{actor.code}", "room", {"room_id": room_id}, key=room_id)
        actor.renewed = self.node.clock()
        self.start(actor)
        if not private:
            self.open.setdefault(type_, {})[room_id] = actor
        ev = await self.append(ctx, room_id, "create", uid, {"options": options, "metadata": metadata}, actor)
        return actor, ev.offset

    def pick(
        self, type_: str, metadata: dict[str, Any], tried: set[str], index: Mapping[str, Any]
    ) -> tuple[str, _Actor | None] | None:
        """A listed room of ``type_`` with ``metadata`` and a seat not promised to a join in flight.

        This node's open rooms first (current, and no forwarding), then the
        other nodes' from ``roomindex:{type}``; ``None``: create one.
        """
        meta = msgspec.to_builtins(metadata)

        def free(room_id: str, clients: int, seats: int, locked: bool, room_meta: Any) -> bool:
            if room_id in tried or locked or (seats and clients + self.reserved.get(room_id, 0) >= seats):
                return False
            return not meta or all(isinstance(room_meta, dict) and room_meta.get(k) == v for k, v in meta.items())

        for a in self.open.get(type_, {}).values():
            if not (a.closed or a.disposed or a.dispose_requested) and free(
                a.id, len(a.members), a.cls.max_clients, a.locked, a.room.metadata
            ):
                return a.id, a
        for rid, e in index.items():
            if rid in self.actors:
                continue
            if free(rid, int(e.get("clients", 0)), int(e.get("max_clients") or 0), bool(e.get("locked")), e.get("metadata")):
                return rid, None
        return None

    async def append(self, ctx: Context, room_id: str, kind: str, uid: str, data: dict[str, Any], actor: _Actor | None) -> Event:
        """Append an input to the room's inbox (idempotent per command key); hand it to a local owner."""
        ev = await self._input_to(ctx, actor, room_id, kind, uid, data)
        if actor is not None and not actor.closed:
            actor.push(ev)
        return ev

    def _input_to(
        self, ctx: Context, actor: _Actor | None, room_id: str, kind: str, uid: str, data: dict[str, Any]
    ) -> Awaitable[Event]:
        """Append an input to ``roominbox:{room_id}`` (keyed by the command's idempotency key); await it.

        To ``actor.inbox`` when the owner is known: the name the backend keeps
        as the stream's key is then the owner's own string, not one more copy
        per room (and not a new string per move). Returns ``ctx.publish``'s
        coroutine (no coroutine of its own: see :meth:`write`).
        """
        inbox = actor.inbox if actor is not None else f"roominbox:{room_id}"
        return ctx.publish(inbox, kind, {"user": uid, "node": self.node.id, **data})

    async def finish(self, room_id: str, kind: str, uid: str, offset: int, actor: _Actor | None) -> Any:
        """Await an appended input's result (raise its error)."""
        return self._finished(room_id, kind, uid, await self._await(room_id, offset, actor))

    def _finished(self, room_id: str, kind: str, uid: str, entry: _Entry) -> Any:
        """An applied input's result (raise its error)."""
        if entry.error is not None:
            raise entry.error
        if kind in ("join", "create"):
            joined = self.via_here.setdefault(uid, [])
            if room_id not in joined:
                joined.append(room_id)
        elif kind == "leave":
            joined = self.via_here.get(uid, [])
            if room_id in joined:
                joined.remove(room_id)
                if not joined:
                    del self.via_here[uid]
        return entry.result

    async def submit(
        self, ctx: Context, room_id: str, kind: str, uid: str, data: dict[str, Any], *, actor: _Actor | None = None
    ) -> Any:
        """Append an input to the room's inbox (idempotent per command key) and await its result.

        The owner may be this node (it wakes at once), another node (it answers
        on ``roomreply:{id}``), or nobody (its lease ran out: this node adopts
        the room and applies the entry itself).
        """
        if actor is None:
            actor = self.actors.get(room_id)
            if actor is None or actor.closed:
                actor = await self.local(room_id)
        ev = await self._input_to(ctx, actor, room_id, kind, uid, data)
        if actor is not None and not actor.closed:
            # A local owner with nothing else to do applies it on this task (run_inline).
            if await actor.run_inline(ev):
                # Read here: the step may have closed the owner (dispose), after which _await looks elsewhere.
                entry = actor.results.get(ev.offset)
                if entry is not None:
                    return self._finished(room_id, kind, uid, entry)
            else:
                actor.push(ev)
        return await self.finish(room_id, kind, uid, ev.offset, actor)

    async def _await(self, room_id: str, offset: int, actor: _Actor | None) -> _Entry:
        key = (room_id, offset)
        while True:
            if actor is not None and not actor.closed:
                local = await actor.result(offset)
                if local is not None:
                    return local
            else:
                waiter = self.reply_waiters.setdefault(key, anyio.Event())
                with anyio.move_on_after(IDLE_WAIT):
                    await waiter.wait()
                got = self.replies.pop(key, None)
                if got is not None:
                    return got
                st = await self.node.state_of(f"room:{room_id}")
                if isinstance(st.state, RoomDoc) and st.state.inbox >= offset:
                    # Applied, but its answer did not reach us live (a lagging
                    # feed): read it back. Not there yet: the owner may still
                    # be writing it (answers follow the patch), so wait on, or
                    # adopt the room below if the owner is gone (settled()).
                    got = await self.reply_in_history(room_id, offset)
                    if got is not None:
                        self.reply_waiters.pop(key, None)
                        return got
            # No answer yet: if the owner is gone (its lease ran out), take the room over.
            actor = await self.local(room_id)
            if actor is not None:
                self.reply_waiters.pop(key, None)

    async def reply_in_history(self, room_id: str, offset: int) -> _Entry | None:
        """The owner's answer to this node's inbox entry ``offset`` on ``roomreply:{id}``, if written."""
        stream = f"roomreply:{room_id}"
        after = (await self.node.backend.events.info(stream)).head
        while after > 0:
            start = max(0, after - BATCH)
            page = await self.node.backend.events.read(stream, after=start, limit=after - start)
            for ev in reversed(page.events):
                data = ev.data if isinstance(ev.data, dict) else {}
                inbox = int(data.get("inbox", 0))
                if inbox == offset and data.get("node") == self.node.id:
                    if data["ok"]:
                        return _Entry(True, data.get("result"))
                    return _Entry(False, error=error_from_wire(data["code"], data["message"], bool(data["retryable"])))
                if 0 < inbox < offset:
                    return None  # answers are written in inbox order: ours is not further back
            after = start
        return None

    async def settled(self, room_id: str, offset: int) -> _Entry:
        """The answer to this node's entry ``offset``, applied by an owner that is gone.

        Called by the room's new owner. The old owner wrote every forwarded
        entry's answer on ``roomreply:{id}`` after the patch covering it; an
        answer that is not there was lost with the old owner between the
        patch and the answer, and a patch is only written for an entry that
        changed the room: that entry succeeded. A refusal writes no patch, so
        a covering patch alone is never read as success while the owner lives
        (``_await`` keeps waiting for the answer instead).
        """
        got = await self.reply_in_history(room_id, offset)
        if got is not None:
            return got
        return _Entry(True, {"room_id": room_id, "inbox": offset, "recovered": True})

    async def local(self, room_id: str) -> _Actor | None:
        """The local owner of ``room_id``, adopting the room if nobody owns it; ``None``: another node does.

        Raises:
            Rejected: ``room_not_found``.
        """
        actor = self.actors.get(room_id)
        if actor is not None and not actor.closed:
            return actor
        lock = self._adopting.setdefault(room_id, anyio.Lock())
        async with lock:
            actor = self.actors.get(room_id)
            if actor is not None and not actor.closed:
                return actor
            down = self.down.get(room_id)
            if down is not None and self.node.clock() < down.retry_at:
                return await self._while_down(room_id)
            return await self._adopt(room_id)

    async def supervise(self) -> None:
        """Adopt every live room whose owner is gone (its lease ran out), so its timers run again.

        A room that cannot be adopted (``room_unavailable``, see
        :meth:`_unavailable`) is skipped until its next try; the others are
        adopted all the same.
        """
        for stream in await self.node.backend.events.streams("roominbox:*"):
            room_id = stream.partition(":")[2]
            if room_id in self.actors or room_id in self.gone:
                continue
            down = self.down.get(room_id)
            if down is not None and self.node.clock() < down.retry_at:
                continue
            try:
                await self.local(room_id)
            except Rejected as exc:
                if exc.code != "room_unavailable":  # noted (and logged) by _adopt; tried again later
                    self.gone.add(room_id)

    async def _while_down(self, room_id: str) -> _Actor | None:
        """:meth:`local` for a room this node failed to adopt, before its next try.

        ``None`` when another node holds the room's lease (one that can run
        it: forward to it as usual), else ``room_unavailable`` at once, with
        no fold and no restore tried.
        """
        stream = f"room:{room_id}"
        if not await self.node.backend.leases.acquire(stream, self.node.id, now=self.node.clock(), ttl=LEASE):
            return None
        with anyio.CancelScope(shield=True):
            await self.node.backend.leases.release(stream, self.node.id)
        raise _unavailable_error(room_id)

    async def folded(self, stream: str, info: StreamInfo, deadline: float) -> StreamState:
        """This node's fold of ``stream`` once it covers ``info`` (its head, read from the backend).

        Waits as long as the fold needs (it wakes this task itself), until
        ``deadline`` (``anyio.current_time()``).

        Raises:
            _NotFolded: the fold did not get there by ``deadline``.
            RtcoreError: the fold failed for good (``Node.state_at_least``).
        """
        with anyio.move_on_after(deadline - anyio.current_time()):
            return await self.node.state_at_least(stream, info.head, epoch=info.epoch)
        raise _NotFolded(f"this node's fold of {stream} did not reach the stream's head within {FOLD_WAIT:g} s")

    def _unavailable(self, room_id: str, exc: Exception) -> Rejected:
        """Note that adopting ``room_id`` failed (logged once per cause); the error to raise.

        Its next try (a command, the supervisor) waits :data:`RETRY_FIRST`
        seconds, doubled after each failure in a row up to :data:`RETRY_MAX`.
        """
        reason = str(exc) if isinstance(exc, _NotFolded) else f"{type(exc).__name__}: {exc}"
        prev = self.down.get(room_id)
        attempts = 1 if prev is None else prev.attempts + 1
        pause = min(RETRY_MAX, RETRY_FIRST * 2 ** min(attempts - 1, 16))
        self.down[room_id] = _Down(reason, attempts, self.node.clock() + pause)
        if prev is None or prev.reason != reason:
            # Once per cause: the supervisor and the room's commands try
            # again, and the same traceback every time would bury the log.
            log.log(
                logging.WARNING if isinstance(exc, _NotFolded) else logging.ERROR,
                "room %s cannot be run on this node: %s; its commands get room_unavailable, next try in %g s",
                room_id, reason, pause, exc_info=None if isinstance(exc, _NotFolded) else exc,
            )
        else:
            log.debug("room %s still cannot be run (attempt %d): %s; next try in %g s", room_id, attempts, reason, pause)
        return _unavailable_error(room_id)

    async def _adopt(self, room_id: str) -> _Actor | None:
        """Take ``room_id`` over if its lease is free: fold its streams and restore it.

        Raises:
            Rejected: ``room_not_found``; ``room_unavailable`` (retryable) when
                the room cannot be restored here: this node's fold did not
                reach the head within :data:`FOLD_WAIT`, the history cannot be
                folded, or restoring it raised (a state type that changed, a
                corrupt document). The lease is released either way.
            BackendError: the backend failed (``backend_unavailable``).
        """
        stream = f"room:{room_id}"
        if not room_id or len(room_id) > 64 or not room_id.isalnum():
            raise Rejected("room_not_found", f"no room {room_id!r}")
        info = await self.node.backend.events.info(stream)
        if info.head == 0:
            raise Rejected("room_not_found", f"no room {room_id!r}")
        if not await self.node.backend.leases.acquire(stream, self.node.id, now=self.node.clock(), ttl=LEASE):
            return None  # another node owns it
        try:
            deadline = anyio.current_time() + FOLD_WAIT
            # The head once the lease is ours: everything the last owner wrote.
            info = await self.node.backend.events.info(stream)
            st = await self.folded(stream, info, deadline)
            doc = st.state
            assert isinstance(doc, RoomDoc)
            cls = self.rooms.types.get(str(doc.room.get("type", "")))
            if cls is None or doc.room.get("disposed"):
                self.gone.add(room_id)
                raise Rejected("room_not_found", f"no room {room_id!r}")
            actor = _Actor(self, cls, room_id, str(doc.room.get("code", "")) or self._new_code(), bool(doc.room.get("private")))
            await actor.restore(doc, st.offset, deadline)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.node.backend.leases.release(stream, self.node.id)
            if isinstance(exc, Exception) and not isinstance(exc, (Rejected, BackendError)):
                # Contained: the supervisor's pass goes on with the other
                # rooms, and the room's commands get a specific error.
                raise self._unavailable(room_id, exc) from exc
            raise
        if self.down.pop(room_id, None) is not None:
            log.warning("room %s: adopted after all", room_id)
        actor.renewed = self.node.clock()
        self.start(actor)
        return actor

    async def listing(self, type_: str, metadata: dict[str, Any]) -> list[dict[str, Any]]:
        """Listed rooms of ``type_`` (all types if empty) whose metadata has ``metadata``.

        The fold of ``roomindex:{type}`` (every node's rooms), overlaid with
        this node's own rooms, which are always current.
        """
        found: dict[str, dict[str, Any]] = {}
        for t in [type_] if type_ else sorted(self.rooms.types):
            st = await self.node.state_of(f"roomindex:{t}")
            if isinstance(st.state, RoomIndex):
                found.update(st.state.rooms)
        for a in self.actors.values():
            if a.closed or a.disposed or a.private or a.dispose_requested:
                found.pop(a.id, None)
            elif not type_ or self.types_by_cls[a.cls] == type_:
                found[a.id] = _entry(a)
        meta = msgspec.to_builtins(metadata)
        return [e for e in found.values() if all(e.get("metadata", {}).get(k) == v for k, v in meta.items())]

    async def find_code(self, code: str) -> str:
        """The room id of a short code (this node's rooms, then ``roomcode:{code}``)."""
        code = code.upper()
        if code in self.codes:
            return self.codes[code]
        if code.isalnum() and 0 < len(code) <= 16:
            page = await self.node.backend.events.read(f"roomcode:{code}", after=0, limit=1)
            if page.events:
                return str(page.events[0].data["room_id"])
        raise Rejected("room_not_found", f"no room with code {code!r}")


def _unavailable_error(room_id: str) -> Rejected:
    """What a command for a room this node cannot run gets (the cause is in the node's log)."""
    return Rejected(
        "room_unavailable", f"room {room_id} cannot be run right now; try again later", retryable=True, http_status=503
    )


def _entry(a: _Actor) -> dict[str, Any]:
    return {
        "room_id": a.id,
        "type": a.rt.types_by_cls[a.cls],
        "clients": len(a.members),
        "max_clients": a.cls.max_clients,
        "locked": a.locked,
        "metadata": state_builtins(a.room.metadata),
    }


class Rooms:
    """The room layer of one app (made by :func:`install`)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.types: dict[str, type[Room[Any]]] = {}
        self.data_types: dict[type[Room[Any]], dict[str, Any]] = {}
        # Per room type: message type -> (the handler's method name, its data type or None), one lookup per message.
        self.handlers: dict[type[Room[Any]], dict[str, tuple[str, Any]]] = {}
        self._runtimes: weakref.WeakKeyDictionary[Node, _Runtime] = weakref.WeakKeyDictionary()

    def define(self, name: str) -> Callable[[type[Room[Any]]], type[Room[Any]]]:
        """Class decorator: register a :class:`Room` subclass as room type ``name``.

        Raises:
            ValueError: ``name`` is taken, or the class has no state type.
            TypeError: the class is not a :class:`Room` subclass.
        """

        def register(cls: type[Room[Any]]) -> type[Room[Any]]:
            if not (isinstance(cls, type) and issubclass(cls, Room)):
                raise TypeError(f"room type {name!r} must be a subclass of rtcore.rooms.Room")
            if cls.state_type is None:
                raise ValueError(f"room type {name!r}: declare the state type as Room[MyState]")
            if cls.private_fields:
                fields = {f.name: f for f in msgspec.structs.fields(cls.state_type)}
                for f in cls.private_fields:
                    spec = fields.get(f)
                    if spec is None or spec.required:
                        raise ValueError(
                            f"room type {name!r}: private field {f!r} must be a state field with a default (a map by player id)"
                        )
            if name in self.types:
                raise ValueError(f"room type {name!r} is already defined")
            self.data_types[cls] = {kind: _data_type(getattr(cls, attr)) for kind, attr in cls._handlers.items()}
            self.handlers[cls] = {kind: (attr, self.data_types[cls][kind]) for kind, attr in cls._handlers.items()}
            self.types[name] = cls
            for rt in self._runtimes.values():
                rt.types_by_cls[cls] = name
            return cls

        return register

    def runtime(self, node: Node) -> _Runtime:
        """The rooms running on ``node`` (created on first use)."""
        rt = self._runtimes.get(node)
        if rt is None:
            rt = self._runtimes[node] = _Runtime(self, node)
        return rt

    async def send(self, ctx: Context, user: str, type: str, data: Any = None) -> None:
        """Send a direct message to every live connection of ``user`` from any command or processor.

        The same ephemeral ``msg`` frame a room's :meth:`Room.send` sends, with
        ``room`` ``None`` (``ctx.send_to``): not stored, dropped when the user
        has no live connection.
        """
        await ctx.send_to(user, type, data)

    async def state(self, node: Node, room_id: str) -> dict[str, Any]:
        """The room's document as the owner last published it (tests and tools)."""
        rt = self.runtime(node)
        actor = rt.actors.get(room_id)
        if actor is None or actor.prev is None:
            raise Rejected("room_not_found", f"no room {room_id!r} on this node")
        return typing.cast(dict[str, Any], actor.prev)

    async def settle(self, node: Node, room_id: str) -> None:
        """Wait until the room has applied its inbox and every due timer (tests with a FakeClock)."""
        actor = self.runtime(node).actors.get(room_id)
        if actor is None or actor.closed:
            return
        with anyio.fail_after(10):
            for _ in range(2):  # one more full pass after the wake-up
                if actor.closed:
                    return
                idle = actor.idle = actor.idle or anyio.Event()
                actor.need_read = True
                actor.poke()
                await idle.wait()


def allowed(principal: Any, action: str, resource: str) -> bool:
    """Whether rooms allow ``action`` on ``resource``: a player's private streams are theirs alone.

    ``roomview:{room}:{user}`` (private fields) may be subscribed to or read
    (``history``) only by that user.
    :func:`install` uses this as the app's ``authorize`` hook when the app has
    none; an app with its own hook must call it::

        @app.authorize
        async def authz(principal, action, resource):
            return rtcore.rooms.allowed(principal, action, resource) and ...
    """
    if action not in ("subscribe", "history"):
        return True
    kind, _, rest = resource.partition(":")
    if kind != "roomview":
        return True
    owner = rest.partition(":")[2]
    return getattr(principal, "id", None) == owner


async def _default_authorize(principal: Any, action: str, resource: str) -> bool:
    return allowed(principal, action, resource)


def _query_matches(metadata: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    """Whether listed ``metadata`` has every ``key=value`` of a URL query.

    A string matches as is; any other value matches its JSON text
    (``?level=2``, ``?ranked=true``).
    """
    for key, want in filters.items():
        if key not in metadata:
            return False
        value = metadata[key]
        if value != want and (isinstance(value, str) or msgspec.json.encode(value).decode() != want):
            return False
    return True


def _user(ctx: Context) -> str:
    if ctx.principal is None:
        raise AuthError("rooms need an authenticated player (add @app.authenticate)")
    return ctx.principal.id


def _appended_elsewhere(node: Node, event: Event) -> bool:
    """Whether the ``roominbox`` feed must hand ``event`` to this node's owner.

    An input appended on this node (``node`` in its data) was handed to a
    local owner in-process by :meth:`_Runtime.append` already; an owner
    adopted later reads the inbox from the log. Queuing it for the processor
    again cost a task hop and a second wake-up of the owner per move.
    """
    data = event.data
    return not (type(data) is dict and data.get("node") == node.id)


def install(app: App) -> Rooms:
    """Add rooms to ``app``: the ``room.*`` commands and the room streams' rules.

    Example::

        app = rtcore.App("games")
        rooms = rtcore.rooms.install(app)

        @rooms.define("tictactoe")
        class TicTacToe(rtcore.rooms.Room[Board]):
            max_clients = 2

    Raises:
        ValueError: the app already declares state for ``room:*`` streams.
    """
    if app.state_for("room:x") is not None:
        raise ValueError("the app already declares state for room:* streams, which rooms use")
    rooms = Rooms(app)
    app.state("room:*", RoomDoc, snapshot_every=100, sync_every=10)
    app.state("roomindex:*", RoomIndex, snapshot_every=100, sync_every=0)
    app.state("roomview:*", RoomDoc, snapshot_every=100, sync_every=10)
    app.retention("roomview:*", max_events=1000)
    # Who follows a room's stream (GET /v1/streams/room:{id}/presence); the
    # seats themselves are the document's `members`.
    app.presence("room:*")
    if app.hooks.authorize is None:
        app.hooks.authorize = _default_authorize
    app.retention("roomindex:*", max_events=1000)
    app.retention("roomcode:*", max_events=1)
    app.retention("room:*", max_events=1000)
    app.retention("roominbox:*", max_events=10_000)
    app.retention("roomreply:*", max_events=1000, max_age=300.0)

    @app.admin_section("rooms")
    async def rooms_on_this_node(node: Node) -> list[dict[str, Any]]:
        # The rooms this node runs, for the read-only admin page.
        return [
            {"id": a.id, "type": a.cls.__name__, "members": len(a.members), "head": a.head, "locked": a.locked}
            for a in list(rooms.runtime(node).actors.values())
            if not a.closed
        ]

    # Every node with the processor role: answers from owners on other nodes,
    # inputs appended elsewhere for rooms owned here, and orphaned rooms.
    @app.on("roomreply:*")
    async def room_reply(ctx: Context, event: Event) -> None:
        rooms.runtime(ctx.node).on_reply(event)

    @app.on("roominbox:*", accept=_appended_elsewhere)
    async def room_input(ctx: Context, event: Event) -> None:
        rooms.runtime(ctx.node).wake(event.stream.partition(":")[2], event)

    @app.loop("rooms.supervisor", every=SUPERVISE_EVERY, lease=LEASE)
    async def supervise(ctx: Context) -> None:
        await rooms.runtime(ctx.node).supervise()

    @app.command("room.create")
    async def create(ctx: Context, args: _Args) -> Any:
        return await rooms.runtime(ctx.node).create(ctx, _user(ctx), args.type, args.options, args.private, args.metadata)

    @app.command("room.join_or_create")
    async def join_or_create(ctx: Context, args: _Args) -> Any:
        uid = _user(ctx)
        rt = rooms.runtime(ctx.node)
        if args.type not in rooms.types:
            raise Rejected("unknown_room_type", f"no room type named {args.type!r}")
        # One matchmaker per type and node picks a room and promises one of
        # its seats (or appends a new room's create) under a lock, so two
        # players looking at once land in the same room instead of creating
        # one each; the joins themselves then run concurrently. The room's
        # executor still decides: a refused join tries the next room.
        lock = rt.matchmaking.setdefault(args.type, anyio.Lock())
        tried: set[str] = set()
        while True:
            offset = 0
            async with lock:
                st = (await ctx.node.state_of(f"roomindex:{args.type}")).state
                found = rt.pick(args.type, args.metadata, tried, st.rooms if isinstance(st, RoomIndex) else {})
                actor: _Actor | None
                if found is None:
                    actor, offset = await rt.start_create(ctx, uid, args.type, args.options, args.private, args.metadata)
                    rid = actor.id
                else:
                    rid, actor = found
                rt.reserved[rid] = rt.reserved.get(rid, 0) + 1
            try:
                if offset:
                    return await rt.finish(rid, "create", uid, offset, actor)
                return await rt.submit(ctx, rid, "join", uid, {"options": args.options}, actor=actor)
            except Rejected as exc:
                if offset or exc.code not in ("room_full", "room_locked", "room_not_found", "room_unavailable"):
                    raise
                tried.add(rid)
            finally:
                left = rt.reserved.pop(rid, 1) - 1
                if left:
                    rt.reserved[rid] = left

    @app.command("room.join")
    async def join(ctx: Context, args: _Args) -> Any:
        uid = _user(ctx)
        rt = rooms.runtime(ctx.node)
        if not args.room_id and not args.code:
            raise Rejected("room_not_found", "give room_id or code")
        room_id = args.room_id or await rt.find_code(args.code)
        return await rt.submit(ctx, room_id, "join", uid, {"options": args.options})

    @app.command("room.leave")
    async def leave(ctx: Context, args: _LeaveArgs) -> Any:
        rt = rooms.runtime(ctx.node)
        return await rt.submit(ctx, args.room_id, "leave", _user(ctx), {})

    @app.command("room.send")
    async def send(ctx: Context, args: _SendArgs) -> Any:
        rt = rooms.runtime(ctx.node)
        return await rt.submit(ctx, args.room_id, "send", _user(ctx), {"type": args.type, "data": args.data})

    @app.command("room.list")
    async def listing(ctx: Context, args: _ListArgs) -> Any:
        return await rooms.runtime(ctx.node).listing(args.type, args.metadata)

    async def http_listing(ctx: Context, query: Mapping[str, str]) -> Any:
        filters = dict(query)
        type_ = filters.pop("type", "")
        if type_ and type_ not in rooms.types:
            raise Rejected("unknown_room_type", f"no room type named {type_!r}")
        entries = await rooms.runtime(ctx.node).listing(type_, {})
        found = [e for e in entries if _query_matches(e.get("metadata") or {}, filters)]
        return {"rooms": sorted(found, key=lambda e: str(e["room_id"]))}

    # Listing over HTTP, read-only, authorized as ("list", "rooms").
    app.route("GET", "/v1/rooms", http_listing, action="list", resource="rooms")

    return rooms

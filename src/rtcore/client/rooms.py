"""Rooms in the Python clients: ``join_or_create`` / ``create`` / ``join`` and :class:`Room`.

One implementation for both drivers of
:class:`~rtcore.protocol.client.ClientSession`: :class:`rtcore.client.Client`
(WebSocket) and :class:`rtcore.testing.Client` (in-process) mix in
:class:`RoomClient`, so a room behaves the same over the network and in a
test. The fold itself (patches, snapshots, checksums, private view, resync)
is the sans-IO :class:`~rtcore.protocol.rooms.RoomView`, driven by the
session (its rule 11).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ..errors import Unavailable
from ..protocol.client import ClientSession, Request, RoomChanged
from ..protocol.rooms import RoomChange, RoomView

__all__ = ["Room", "RoomClient"]

log = logging.getLogger("rtcore.client")

ChangeCallback = Callable[[RoomChange], Any]
MessageCallback = Callable[[Any], Any]


class Room:
    """A room this client joined; made by :meth:`RoomClient.join_or_create`,
    :meth:`~RoomClient.create` or :meth:`~RoomClient.join`.

    :attr:`state` is the room's state as the server last published it (plus
    this player's private fields), kept by folding the room's generic patches:
    no game code. Changes arrive in order: register :meth:`on_change`
    callbacks, iterate :meth:`changes`, or await :meth:`wait_for`.

    Attributes:
        id: The room id.
        type: The room type.
        code: The room's short code (``join(code=...)``).
        user: This player's id.
        view: The fold (:class:`~rtcore.protocol.rooms.RoomView`).
        left: Whether :meth:`leave` ran.
    """

    def __init__(self, client: RoomClient, view: RoomView, joined: dict[str, Any]) -> None:
        self.id = view.room_id
        self.type = view.type
        self.code = view.code
        self.user = view.user
        self.view = view
        self.joined = joined
        self.left = False
        self._client = client
        self._callbacks: list[ChangeCallback] = []
        self._on_message: list[tuple[str | None, MessageCallback]] = []
        self._queues: list[MemoryObjectSendStream[RoomChange]] = []
        self._event = anyio.Event()

    def __repr__(self) -> str:
        return f"<Room {self.type} {self.id} as {self.user}>"

    # --- the document -------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The game state (builtins: maps, lists, scalars), ``None`` during a resync.

        Private fields of the room type appear as ``{your id: your value}``
        (the server's map by player, limited to you). It is the live document:
        it changes in place with each patch; copy it to keep it.
        """
        return self.view.state

    @property
    def document(self) -> dict[str, Any] | None:
        """The whole public document (``state``, ``members``, ``room``, ``inbox``):
        equal to the server's after every patch (verified by ``sync`` checksums)."""
        return self.view.document

    @property
    def members(self) -> dict[str, Any]:
        """Who holds a seat: ``{user: {"connected", "grace_until"}}`` (presence, keyed by user)."""
        return self.view.members

    @property
    def info(self) -> dict[str, Any]:
        """The ``room`` part of the document (``max_clients``, ``locked``, ``metadata``...)."""
        return self.view.info

    # --- callbacks and waiting --------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> ChangeCallback:
        """Call ``callback(change)`` after each change (usable as a decorator).

        Callbacks run synchronously in the client's reader, in order, after the
        change is applied (:attr:`state` is already the new one); an exception
        is logged and does not stop the client. Use :meth:`changes` for
        async work.
        """
        self._callbacks.append(callback)
        return callback

    def on_message(self, type: str | None, callback: MessageCallback | None = None) -> Any:
        """Call ``callback(data)`` for each message of ``type`` from the room:
        broadcasts and messages to this player alone (``None``: every message,
        called with the whole ``{"type", "data", ...}``).

        Usable as a decorator: ``@room.on_message("chat")``.
        """

        def register(fn: MessageCallback) -> MessageCallback:
            self._on_message.append((type, fn))
            return fn

        return register(callback) if callback is not None else register

    async def changes(self) -> AsyncIterator[RoomChange]:
        """Iterate the changes from now on, in order, until :meth:`leave`."""
        send, recv = anyio.create_memory_object_stream[RoomChange](math.inf)
        self._queues.append(send)
        try:
            async with recv:
                async for change in recv:
                    yield change
        finally:
            if send in self._queues:
                self._queues.remove(send)
            send.close()

    async def wait_for(self, predicate: Callable[[Any], bool], *, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        """Wait until ``predicate(room.state)`` holds; return the state.

        Raises:
            Unavailable: not within ``timeout`` seconds (code ``timeout``).
        """
        try:
            with anyio.fail_after(timeout):
                while True:
                    state = self.view.state
                    if state is not None and predicate(state):
                        return state
                    await self._event.wait()
        except TimeoutError:
            raise Unavailable(f"room {self.id}: condition not met within {timeout:g} s", code="timeout") from None

    async def _ready(self, timeout: float) -> None:  # noqa: ASYNC109
        try:
            with anyio.fail_after(timeout):
                while not self.view.ready:
                    await self._event.wait()
        except TimeoutError:
            raise Unavailable(f"room {self.id}: no document within {timeout:g} s", code="timeout") from None

    def _deliver(self, change: RoomChange) -> None:
        for fn in list(self._callbacks):
            self._run(fn, change)
        if change.kind in ("message", "direct"):
            msg = change.message if isinstance(change.message, dict) else {}
            for type_, fn in list(self._on_message):
                if type_ is None:
                    self._run(fn, msg)
                elif msg.get("type") == type_:
                    self._run(fn, msg.get("data"))
        for q in self._queues:
            q.send_nowait(change)
        event, self._event = self._event, anyio.Event()
        event.set()

    def _run(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = fn(arg)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError("room callbacks must be plain functions; iterate room.changes() for async work")
        except Exception:
            log.exception("room %s: callback %r failed", self.id, fn)

    def _end(self) -> None:
        self.left = True
        for q in self._queues:
            q.close()
        self._queues.clear()
        event, self._event = self._event, anyio.Event()
        event.set()

    # --- actions ----------------------------------------------------------------------

    async def send(self, type: str, data: Any = None, *, key: str | None = None, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        """Send message ``type`` to the room (``room.send``); return the handler's result.

        Raises:
            RtcoreError: the handler refused (``Rejected`` with its code),
                ``not_in_room``, ``unknown_message``, ``bad_args``...
        """
        return await self._client.command("room.send", {"room_id": self.id, "type": type, "data": data}, key=key, timeout=timeout)

    async def leave(self, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Give up the seat (``room.leave``, consented) and stop following the room."""
        try:
            await self._client.command("room.leave", {"room_id": self.id}, timeout=timeout)
        finally:
            await self._client._room_detach(self, timeout)


class RoomClient:
    """The room methods of a client driver (mixed into both Python clients)."""

    _rooms: dict[str, Room]

    def _proto(self) -> ClientSession:
        # Both drivers have a ``session`` (a property in one, an attribute in the other).
        session: ClientSession = self.session  # type: ignore[attr-defined]
        return session

    async def command(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        raise NotImplementedError  # provided by the driver

    async def _await_requests(self, requests: list[Request], timeout: float, *, check: bool = True) -> None:  # noqa: ASYNC109
        raise NotImplementedError  # provided by the driver

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms this client follows, by id."""
        return dict(self._rooms)

    async def join_or_create(
        self, type: str, options: dict[str, Any] | None = None, *, metadata: dict[str, Any] | None = None, key: str | None = None, timeout: float = 10.0  # noqa: ASYNC109
    ) -> Room:
        """Take a seat in a listed room of ``type`` whose metadata matches, or create one.

        Returns once the room's current document is here (:attr:`Room.state`).

        Raises:
            RtcoreError: ``unknown_room_type``, ``unauthenticated``, a refusal
                of the room's ``on_join_attempt`` (its code)...
        """
        args = {"type": type, "options": options or {}, "metadata": metadata or {}}
        return await self._open_room("room.join_or_create", args, key, timeout)

    async def create(
        self,
        type: str,
        options: dict[str, Any] | None = None,
        *,
        private: bool = False,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Room:
        """Create a room of ``type`` and take a seat in it (``private``: not listed, join by :attr:`Room.code`)."""
        args = {"type": type, "options": options or {}, "private": private, "metadata": metadata or {}}
        return await self._open_room("room.create", args, key, timeout)

    async def join(
        self, room_id: str | None = None, *, code: str | None = None, options: dict[str, Any] | None = None, key: str | None = None, timeout: float = 10.0  # noqa: ASYNC109
    ) -> Room:
        """Join the room ``room_id`` (or the private room with short ``code``).

        A player who already holds the seat (another device, a reconnect
        within the grace) gets it back, with the current document.

        Raises:
            RtcoreError: ``room_not_found``, ``room_full``, ``room_locked``...
        """
        if (room_id is None) == (code is None):
            raise ValueError("join: give room_id or code (one of them)")
        args: dict[str, Any] = {"room_id": room_id} if room_id is not None else {"code": code}
        args["options"] = options or {}
        return await self._open_room("room.join", args, key, timeout)

    async def _open_room(self, name: str, args: dict[str, Any], key: str | None, timeout: float) -> Room:  # noqa: ASYNC109
        joined = await self.command(name, args, key=key, timeout=timeout)
        view = RoomView(joined)
        room = self._rooms.get(view.room_id)
        if room is not None and not room.left:
            return room  # already followed (e.g. join_or_create twice)
        room = Room(self, view, joined)
        self._rooms[room.id] = room
        try:
            await self._await_requests(self._proto().track_room(view), timeout)
            await room._ready(timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._room_detach(room, timeout)
            raise
        return room

    async def _room_detach(self, room: Room, timeout: float) -> None:  # noqa: ASYNC109
        if self._rooms.get(room.id) is room:
            del self._rooms[room.id]
        room._end()
        reqs = self._proto().untrack_room(room.view)
        # Unsubscribing is best effort: the next connection would not subscribe anyway.
        with anyio.move_on_after(timeout):
            await self._await_requests(reqs, timeout, check=False)

    def _room_changed(self, event: RoomChanged) -> None:
        room = self._rooms.get(event.view.room_id)
        if room is not None and room.view is event.view:
            room._deliver(event.change)

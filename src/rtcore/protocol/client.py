"""The client side of an rtcore connection, as a sans-IO state machine.

:class:`ClientSession` is the only place the client half of "exactly once, in
order, or told" is written down. :mod:`rtcore.client` (WebSocket) and
:mod:`rtcore.testing` (in-process) are thin drivers: they move bytes between a
transport and the session, pass the current time in, and turn the session's
events into awaitables. The session survives reconnects; a connection is one
``start() … disconnected()`` span of it. See ``docs/clients.md`` for the same
contract as a table any client (in any language) must follow.

Rules:

1. **States.** ``IDLE`` (no connection) → :meth:`~ClientSession.start` queues
   ``hello`` → ``HELLO`` → ``welcome`` → ``OPEN``; an ``err`` or ``bye``
   answering the hello → ``IDLE`` with a :class:`Refused` event.
   :meth:`~ClientSession.disconnected` → ``IDLE`` from any state but
   ``CLOSED``. A gap → ``BROKEN``: every later frame of that connection is
   ignored until the driver drops it. :meth:`~ClientSession.close` →
   ``CLOSED`` (final). Frames arriving in any state but ``OPEN``/``HELLO``
   are ignored.
2. **Positions.** Each subscribed stream has a
   :class:`~rtcore.protocol.streams.ClientCursor`: the epoch and offset of the
   last event handed to the application (its driver's queue). Every
   resubscription sends ``since`` = that position.
3. **Duplicates.** An ``evt`` at or below the cursor in the cursor's epoch is
   dropped (the wire is at-least-once across reconnects).
4. **Gaps.** An ``evt`` beyond cursor + 1 in the cursor's epoch, or in another
   epoch with no notice before it, can only come from a broken connection: the
   session emits :class:`Broken` and the driver reconnects; the
   resubscription resumes from the cursor, so nothing is skipped.
5. **Never silent.** ``subbed`` with ``recovered: false`` for a stream that had
   a position, and every ``snap``, become a :class:`Missed` event, in order
   with the stream's events; the cursor jumps to the new position. With
   ``subbed.snap: true`` the cursor keeps its old position until the ``snap``
   frame arrives. ``recovered: true`` after ``since.offset == 0`` adopts the
   server's epoch (the client asked "from the very start").
6. **Newcomers.** A first subscribe without ``since`` gets the stream's
   *current* state (a snapshot on a stateful stream, live from the head
   otherwise), even when the principal has a server-side cursor. Resuming from
   that cursor is an explicit opt-in (``cursor=True`` → ``sub.cursor``), used
   only while the session has no position of its own for the stream.
7. **Requests.** Ids come from one counter for the session's lifetime (never
   reused, even across connections). ``sub`` and ``cmd`` are *kept*: if the
   connection drops before the answer they are sent again, in the order they
   were made, after the resubscriptions of established streams. A
   resubscription refused with a *retryable* error (``backend_unavailable``,
   ``shutdown``...) is sent again after a backoff, from the same position; a
   final refusal ends the stream (:class:`SubscriptionEnded`). ``ping``,
   ``auth`` and ``unsub`` are not kept: they fail with
   :class:`~rtcore.errors.ConnectionClosed` when the connection drops.
8. **Commands** always carry an idempotency key (``uuid4().hex`` unless the
   caller gives one); the resend reuses it, so the server runs the action once.
   ``idempotency_in_progress`` is retried on the same connection after
   :func:`~rtcore.protocol.backoff.backoff_delay`; ``shutdown`` waits for the
   next connection. Every other ``err`` is raised as the class that owns its
   code (:func:`~rtcore.errors.error_from_wire`).
9. **Acks** (the one policy): cumulative, for what the *application consumed*
   (:meth:`~ClientSession.consumed`, called by the driver when the
   application takes an item), never for what was merely received; batched —
   the first consumption after an ack arms a deadline ``ack_interval`` seconds
   later, and :meth:`~ClientSession.tick` then sends one ``ack`` per stream
   whose consumed position moved. Only positions in the stream's current epoch
   and only after ``subbed`` on the current connection. ``ack_interval=None``
   turns automatic acks off (the application calls :meth:`~ClientSession.ack`).
   :meth:`~ClientSession.flush_acks` sends what is due now (before a clean
   close). So the server cursor never runs ahead of the application.
10. **Time** is passed in (``now``, any monotonic seconds); the session never
    reads a clock. :meth:`~ClientSession.next_deadline` says when the driver
    must call :meth:`~ClientSession.tick`.
11. **Rooms.** The streams of a room tracked with
    :meth:`~ClientSession.track_room` (subscribed without a position: the
    current document, whatever the server-side cursor) are folded by its
    :class:`~rtcore.protocol.rooms.RoomView` and surface only as
    :class:`RoomChanged` events; each folded item counts as consumed (acked
    like rule 9). A view that loses track (a patch that does not fit, a
    ``sync`` checksum mismatch, a notice without a state) is resynced:
    ``unsub``, then ``sub`` without a position, and the snapshot replaces the
    document. A ``msg`` frame naming a tracked room becomes a ``direct``
    change of that room.
12. **Direct messages** (``msg`` frames, ``node.send_to`` on the server) are
    not part of any stream: no position, no ack, no dedup, no resend. Each
    one becomes a :class:`~rtcore.protocol.frames.Msg` event as it arrives
    (unless rule 11 routed it to a room); one sent while the client was
    disconnected is lost.

This module is sans-IO: no sockets, no event loop, no clock.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal

import msgspec

from ..errors import BadRequest, ConnectionClosed, RtcoreError, error_from_wire
from .backoff import backoff_delay
from .codec import Codec, codec_for
from .frames import (
    Ack,
    Auth,
    Bye,
    ClientFrame,
    Cmd,
    Err,
    Evt,
    Hello,
    Msg,
    Ok,
    Ping,
    Pong,
    Position,
    ServerFrame,
    Snap,
    Sub,
    Subbed,
    Sync,
    Unsub,
    Welcome,
)
from .rooms import RoomChange, RoomView
from .streams import ClientCursor

__all__ = [
    "DEFAULT_ACK_INTERVAL",
    "Broken",
    "ClientEvent",
    "ClientSession",
    "ClientState",
    "Connected",
    "Missed",
    "Refused",
    "Replied",
    "Request",
    "RoomChanged",
    "ServerError",
    "SubscriptionEnded",
    "TokenExpired",
]

#: Seconds acks are batched over, by default, in every client.
DEFAULT_ACK_INTERVAL: Final = 0.05

#: First delay of an ``idempotency_in_progress`` retry and its cap, seconds.
IN_PROGRESS_RETRY: Final = (0.2, 1.0)

RequestKind = Literal["sub", "unsub", "cmd", "auth", "ping", "raw"]


class ClientState(Enum):
    """Where a :class:`ClientSession` is (see rule 1)."""

    IDLE = "idle"
    HELLO = "hello"
    OPEN = "open"
    BROKEN = "broken"
    CLOSED = "closed"


class Missed(msgspec.Struct, frozen=True):
    """Notice in a subscription: events before ``offset`` were not delivered.

    The subscription continues with the events after ``offset`` of ``epoch``.

    Attributes:
        stream: The stream.
        epoch: The stream's epoch from now on (differs from the last event's
            epoch when the server lost its history).
        offset: The position the subscription jumped to.
        state: The stream's folded state at ``offset`` when the server sent a
            snapshot (stateful streams), else ``None``.
        checksum: The snapshot's checksum, else ``None``.
    """

    stream: str
    epoch: str
    offset: int
    state: Any = None
    checksum: str | None = None


@dataclass(eq=False)
class Request:
    """One request and, once answered, its outcome.

    Attributes:
        kind: ``sub``, ``unsub``, ``cmd``, ``auth`` or ``ping``.
        stream: The stream of a ``sub``/``unsub``.
        key: The idempotency key of a ``cmd``.
        id: Its id on the current connection (``None`` while not sent on it).
        done: Whether it is answered (or failed).
        result: ``ok.result`` of a command, the ``subbed`` or ``pong`` frame.
        error: Why it failed (an :class:`~rtcore.errors.RtcoreError` subclass).
        reply: The answering frame as it came (``None`` when the request
            failed without one, e.g. the connection dropped).
    """

    kind: RequestKind
    make: Callable[[int], ClientFrame]
    stream: str | None = None
    key: str | None = None
    kept: bool = False  # resent after a reconnect
    id: int | None = None
    done: bool = False
    result: Any = None
    error: RtcoreError | None = None
    reply: Ok | Err | Pong | Subbed | None = None
    retry: bool = True  # retry idempotency_in_progress / wait out shutdown
    retry_at: float | None = None
    attempts: int = 0


# --- events the session emits ---------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """``welcome`` arrived: the connection is open (resubscriptions are queued)."""

    welcome: Welcome


@dataclass(frozen=True)
class Refused:
    """The server answered ``hello`` with ``err`` or ``bye``; the connection is useless.

    ``error`` is a :class:`~rtcore.errors.ConnectionClosed` for a ``bye`` (try
    again later) and the owning class of the ``err`` code otherwise.
    """

    error: RtcoreError


@dataclass(frozen=True)
class Replied:
    """``request`` is done (answered, failed or given up); wake whoever waits for it."""

    request: Request


@dataclass(frozen=True)
class SubscriptionEnded:
    """The server refused a resubscription: the stream cannot continue."""

    stream: str
    error: RtcoreError


@dataclass(frozen=True)
class Broken:
    """A gap on the current connection: drop it and reconnect (the cursor is intact)."""

    stream: str
    reason: str


@dataclass(frozen=True)
class TokenExpired:
    """The server says the session's token expired: send :meth:`ClientSession.auth`."""


@dataclass(frozen=True)
class ServerError:
    """An ``err`` that answers no request of ours (logged by drivers)."""

    error: RtcoreError


@dataclass(frozen=True)
class RoomChanged:
    """A tracked room's document changed (or a broadcast arrived); see rule 11.

    The items of a tracked room's streams are folded by ``view`` and reach the
    driver only as these events.
    """

    view: RoomView
    change: RoomChange


#: What :meth:`ClientSession.receive_frame` and friends return: new events
#: (:class:`~rtcore.protocol.frames.Evt`, each once, in order), notices
#: (:class:`Missed`), ``sync``, ``msg`` and ``bye`` frames as they are, and the
#: dataclasses above.
ClientEvent = (
    Evt | Missed | Sync | Msg | Bye | Connected | Refused | Replied | SubscriptionEnded | Broken | TokenExpired | ServerError | RoomChanged
)


@dataclass(eq=False)
class _Stream:
    stream: str
    cursor: ClientCursor
    want_cursor: bool = False  # sub.cursor while we have no position of our own
    live: bool = False  # subbed received on the current connection
    consumed: Position | None = None  # last item the application took
    acked: Position | None = None
    request: Request | None = field(default=None, repr=False)  # the first (kept) subscribe
    retry_at: float | None = None  # a refused-but-retryable resubscription is due again
    attempts: int = 0


class ClientSession:
    """The client side of the protocol: frames in, events and frames out.

    Usage by a driver::

        s = ClientSession(encoding="json")
        s.start(token)                      # on a new connection
        send(s.data_to_send())
        for ev in s.receive_data(message, now):
            ...                             # Evt/Missed to the app, Replied wakes callers
        send(s.data_to_send())
        s.consumed(stream, epoch, offset, now)   # the app took an item
        s.tick(now)                         # at s.next_deadline()
        s.disconnected(1006)                # the connection ended

    Args:
        encoding: ``"json"`` or ``"msgpack"`` (for :meth:`receive_data`,
            :meth:`data_to_send` and command arguments).
        ack_interval: Seconds acks are batched over; ``None``: no automatic acks.
        rng: Random source for retry jitter (tests pass a seeded one).
    """

    def __init__(self, *, encoding: str = "json", ack_interval: float | None = DEFAULT_ACK_INTERVAL, rng: random.Random | None = None) -> None:
        self.codec: Codec = codec_for(encoding)
        self.ack_interval = ack_interval
        self.state = ClientState.IDLE
        self.welcome: Welcome | None = None
        #: Duplicate events dropped so far (a health signal, not an error).
        self.duplicates = 0
        self._rng = rng
        self._ids = itertools.count(1)
        self._streams: dict[str, _Stream] = {}
        self._sent: dict[int, Request] = {}  # by id, current connection only
        self._kept: dict[Request, None] = {}  # commands and first subscribes, in order
        self._out: list[ClientFrame] = []
        self._events: list[ClientEvent] = []
        self._ack_at: float | None = None
        self._rooms: dict[str, RoomView] = {}  # by stream: tracked rooms (rule 11)

    # --- introspection ------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
        """The subscribed streams, in subscription order."""
        return list(self._streams)

    def cursor(self, stream: str) -> ClientCursor | None:
        """The position of the last event of ``stream`` handed to the application."""
        st = self._streams.get(stream)
        return st.cursor if st is not None else None

    def position(self, stream: str) -> Position | None:
        """The position of the last item of ``stream`` the application consumed."""
        st = self._streams.get(stream)
        return st.consumed if st is not None else None

    def live(self, stream: str) -> bool:
        """Whether ``stream`` is subscribed on the current connection (``subbed`` came)."""
        st = self._streams.get(stream)
        return st is not None and st.live

    def acked(self, stream: str) -> Position | None:
        """The last position acked for ``stream`` (automatically or by :meth:`ack`)."""
        st = self._streams.get(stream)
        return st.acked if st is not None else None

    # --- connection lifecycle -----------------------------------------------------

    def start(self, token: str | None = None) -> None:
        """A new connection is up: queue ``hello``.

        Raises:
            RtcoreError: the session is closed or already has a connection.
        """
        if self.state is ClientState.CLOSED:
            raise ConnectionClosed(1000, "the client is closed", code="client_closed")
        if self.state is not ClientState.IDLE:
            raise RtcoreError(f"start() in state {self.state.value}: call disconnected() first", code="internal")
        self.state = ClientState.HELLO
        self._out.append(Hello(token=token))

    def disconnected(self, close_code: int = 1006, reason: str = "") -> list[ClientEvent]:
        """The connection ended. Kept requests wait for the next one; others fail."""
        if self.state is not ClientState.CLOSED:
            self.state = ClientState.IDLE
        self.welcome = None
        self._out.clear()  # frames of a dead connection are never sent on the next one
        gone = ConnectionClosed(close_code, reason or "connection lost")
        for req in self._sent.values():
            req.id = None
            if not req.kept and not req.done and req.kind != "sub":
                self._resolve(req, error=gone)
        self._sent.clear()
        for req in self._kept:
            req.id = None
            req.retry_at = None
        for st in self._streams.values():
            st.live = False
        return self.events()

    def close(self, error: RtcoreError | None = None) -> list[ClientEvent]:
        """Close for good: every waiting request fails with ``error`` (or ``client_closed``)."""
        reason = error or ConnectionClosed(1000, "the client is closed", code="client_closed")
        self.state = ClientState.CLOSED
        for req in [*self._kept, *self._sent.values()]:
            if not req.done:
                self._resolve(req, error=reason)
        self._kept.clear()
        self._sent.clear()
        self._out.clear()
        return self.events()

    # --- requests -------------------------------------------------------------------

    def subscribe(self, stream: str, since: Position | None = None, *, cursor: bool = False) -> Request:
        """Subscribe to ``stream``; the answer is a :class:`Replied` with the ``subbed``.

        Args:
            stream: The stream name.
            since: Resume after this position; ``None``: the current state
                (rule 6).
            cursor: Without ``since``, resume from the principal's server-side
                cursor instead (the server falls back to the current state
                when there is none).

        Raises:
            RtcoreError: the session is closed, or ``already_subscribed``.
        """
        self._check_open()
        if stream in self._streams:
            raise BadRequest(f"already subscribed to {stream!r}", code="already_subscribed")
        cur = ClientCursor(since.epoch, since.offset) if since is not None else ClientCursor()
        st = _Stream(stream, cur, want_cursor=cursor and since is None, consumed=since)
        self._streams[stream] = st
        req = self._sub_request(st, kept=True)
        st.request = req
        self._keep(req)
        return req

    def unsubscribe(self, stream: str) -> Request | None:
        """Stop ``stream``. Returns the ``unsub`` request, or ``None`` if nothing is sent.

        Waiting subscribes of the stream fail with ``not_subscribed``.
        """
        st = self._streams.pop(stream, None)
        if st is None:
            return None
        for req in [r for r in self._kept if r.stream == stream]:
            self._forget(req)
            self._resolve(req, error=BadRequest("unsubscribed", code="not_subscribed"))
        if self.state is not ClientState.OPEN or not st.live:
            return None  # the next connection never subscribes it
        req = Request("unsub", lambda rid: Unsub(rid, stream), stream=stream)
        self._send(req)
        return req

    def command(self, name: str, args: Any = None, *, key: str | None = None, retry: bool = True) -> Request:
        """Run command ``name``; the answer is a :class:`Replied` (``result`` or ``error``).

        Args:
            name: The command name.
            args: Its arguments (encoded now, once).
            key: Idempotency key; ``uuid4().hex`` when ``None``. Resends reuse it.
            retry: Retry ``idempotency_in_progress`` and wait out ``shutdown``
                (rule 8); ``False`` answers with those errors (protocol tests).

        Raises:
            RtcoreError: the session is closed.
        """
        self._check_open()
        raw = msgspec.Raw(self.codec.encode(args))
        key = key or uuid.uuid4().hex
        req = Request("cmd", lambda rid: Cmd(rid, name, raw, key), key=key, kept=True, retry=retry)
        self._keep(req)
        return req

    def request(self, make: Callable[[int], ClientFrame]) -> Request:
        """Send any request frame built by ``make(id)`` now (protocol tests).

        Not kept across reconnects; answered with whatever frame carries its id
        (``reply``), an ``err`` is not raised (``error`` stays ``None``).
        """
        req = Request("raw", make)
        self._send_now_or_fail(req)
        return req

    def ping(self) -> Request:
        """Send ``ping`` (only while open); answered with the ``pong`` frame."""
        req = Request("ping", Ping)
        self._send_now_or_fail(req)
        return req

    def auth(self, token: str) -> Request:
        """Send ``auth`` with a fresh token (only while open)."""
        req = Request("auth", lambda rid: Auth(rid, token))
        self._send_now_or_fail(req)
        return req

    def forget(self, request: Request) -> None:
        """Stop tracking ``request`` (its caller gave up); a late answer is ignored."""
        self._forget(request)

    # --- rooms ---------------------------------------------------------------------

    @property
    def rooms(self) -> list[RoomView]:
        """The tracked rooms, in the order they were tracked."""
        return list(dict.fromkeys(self._rooms.values()))

    def track_room(self, view: RoomView) -> list[Request]:
        """Fold the room's streams into ``view`` from now on (rule 11).

        Subscribes each stream of the room that is not subscribed yet, with no
        position: the server answers with the current document (a snapshot),
        whatever the principal's server-side cursor says.

        Returns:
            The ``sub`` requests sent (answered like :meth:`subscribe`'s).
        """
        reqs: list[Request] = []
        for stream in view.streams:
            self._rooms[stream] = view
            if stream not in self._streams:
                reqs.append(self.subscribe(stream))
        return reqs

    def untrack_room(self, view: RoomView) -> list[Request]:
        """Stop folding ``view``'s streams and unsubscribe them.

        Returns:
            The ``unsub`` requests sent.
        """
        reqs: list[Request] = []
        for stream in view.streams:
            if self._rooms.get(stream) is view:
                del self._rooms[stream]
                req = self.unsubscribe(stream)
                if req is not None:
                    reqs.append(req)
        return reqs

    def _route_rooms(self, now: float) -> None:
        """Hand the items of tracked rooms' streams to their views (rule 11)."""
        events, self._events = self._events, []
        out: list[ClientEvent] = []
        for ev in events:
            if isinstance(ev, Msg):
                views = [v for v in dict.fromkeys(self._rooms.values()) if ev.room is not None and v.room_id == ev.room]
                for v in views:
                    out.extend(RoomChanged(v, change) for change in v.direct(ev))
                if not views:
                    out.append(ev)  # not for a tracked room: the application's
                continue
            if not isinstance(ev, Evt | Missed | Sync) or ev.stream not in self._rooms:
                out.append(ev)
                continue
            view = self._rooms[ev.stream]
            if not isinstance(ev, Sync):
                # Folded into the document is consumed: acks follow (rule 9).
                self.consumed(ev.stream, ev.epoch, ev.offset, now)
            for change in view.feed(ev):
                if change.kind == "resync" and change.stream in self._streams:
                    # unsub, then sub without a position: a fresh snapshot.
                    self.unsubscribe(change.stream)
                    self.subscribe(change.stream)
                out.append(RoomChanged(view, change))
        self._events = out + self._events

    # --- acks -------------------------------------------------------------------------

    def consumed(self, stream: str, epoch: str, offset: int, now: float) -> None:
        """The application took the item at (``epoch``, ``offset``) of ``stream``."""
        st = self._streams.get(stream)
        if st is None:
            return
        st.consumed = Position(epoch, offset)
        if self.ack_interval is not None and self._ack_at is None:
            self._ack_at = now + self.ack_interval

    def ack(self, stream: str, offset: int | None = None) -> None:
        """Queue an explicit cumulative ack (default: the consumed position, else the cursor)."""
        st = self._streams.get(stream)
        if offset is None:
            if st is None:
                raise BadRequest(f"not subscribed to {stream!r}", code="not_subscribed")
            pos = st.consumed or st.cursor.position
            if pos is None:
                return
            offset = pos.offset
        self._out.append(Ack(stream, offset))
        if st is not None and st.cursor.epoch is not None:
            st.acked = Position(st.cursor.epoch, offset)

    def flush_acks(self) -> None:
        """Queue the automatic acks that are due, now (before a clean close).

        Does nothing when automatic acks are off (``ack_interval=None``).
        """
        self._ack_at = None
        if self.state is not ClientState.OPEN or self.ack_interval is None:
            return
        for st in self._streams.values():
            pos = st.consumed
            # Only the current epoch's positions, and only once the server confirmed
            # the subscription on this connection (else it answers not_subscribed).
            if pos is None or not st.live or pos.epoch != st.cursor.epoch or pos == st.acked or pos.offset == 0:
                continue
            self._out.append(Ack(st.stream, pos.offset))
            st.acked = pos

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next (``None``: nothing scheduled)."""
        times = [r.retry_at for r in self._kept if r.retry_at is not None]
        times += [st.retry_at for st in self._streams.values() if st.retry_at is not None]
        if self._ack_at is not None:
            times.append(self._ack_at)
        return min(times) if times else None

    def tick(self, now: float) -> None:
        """Send due acks and due retries."""
        if self._ack_at is not None and now >= self._ack_at:
            self.flush_acks()
        if self.state is not ClientState.OPEN:
            return
        for req in list(self._kept):
            if req.retry_at is not None and now >= req.retry_at:
                req.retry_at = None
                if req.id is None:
                    self._send(req)
        for st in list(self._streams.values()):
            if st.retry_at is not None and now >= st.retry_at:
                st.retry_at = None
                self._send(self._sub_request(st, kept=False))

    # --- bytes and frames -------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The encoded frames to send, in order (each is one message)."""
        out, self._out = self._out, []
        return [self.codec.encode(f) for f in out]

    def frames_to_send(self) -> list[ClientFrame]:
        """The frames to send, in order, not encoded (for drivers that encode themselves)."""
        out, self._out = self._out, []
        return out

    def receive_data(self, data: bytes | str, now: float) -> list[ClientEvent]:
        """Decode one message and handle it (see :meth:`receive_frame`).

        Raises:
            BadFrame: the message is not a server frame.
        """
        return self.receive_frame(self.codec.decode_server(data), now)

    def receive_frame(self, frame: ServerFrame, now: float) -> list[ClientEvent]:
        """Handle one server frame; return the events it (and earlier calls) produced."""
        if self.state is ClientState.HELLO:
            self._on_hello_answer(frame)
        elif self.state is ClientState.OPEN:
            self._on_frame(frame, now)
            if self._rooms:
                self._route_rooms(now)
        return self.events()

    def events(self) -> list[ClientEvent]:
        """Events produced by API calls since the last call (requests failed on unsubscribe...)."""
        out, self._events = self._events, []
        return out

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is ClientState.CLOSED:
            raise ConnectionClosed(1000, "the client is closed", code="client_closed")

    def _sub_request(self, st: _Stream, *, kept: bool) -> Request:
        def make(rid: int) -> Sub:
            # `since` is read at send time: a resubscription resumes from the cursor.
            pos = st.cursor.position
            return Sub(rid, st.stream, pos, cursor=st.want_cursor and pos is None)

        return Request("sub", make, stream=st.stream, kept=kept)

    def _keep(self, req: Request) -> None:
        self._kept[req] = None
        if self.state is ClientState.OPEN:
            self._send(req)

    def _send(self, req: Request) -> None:
        rid = next(self._ids)
        req.id = rid
        self._sent[rid] = req
        self._out.append(req.make(rid))

    def _send_now_or_fail(self, req: Request) -> None:
        if self.state is ClientState.OPEN:
            self._send(req)
        else:
            self._resolve(req, error=ConnectionClosed(1006, "not connected"))

    def _forget(self, req: Request) -> None:
        self._kept.pop(req, None)
        if req.id is not None and self._sent.get(req.id) is req:
            del self._sent[req.id]
        req.id = None
        req.retry_at = None

    def _resolve(self, req: Request, result: Any = None, error: RtcoreError | None = None) -> None:
        if req.done:
            return
        req.result, req.error, req.done = result, error, True
        self._events.append(Replied(req))

    def _attach(self) -> None:
        """``welcome``: resubscribe established streams, then resend kept requests in order."""
        for st in self._streams.values():
            st.retry_at = None  # resubscribed now, whatever was scheduled
            if st.request is None or st.request.done:
                self._send(self._sub_request(st, kept=False))
        for req in self._kept:
            self._send(req)

    def _on_hello_answer(self, frame: ServerFrame) -> None:
        match frame:
            case Welcome():
                self.state = ClientState.OPEN
                self.welcome = frame
                self._events.append(Connected(frame))
                self._attach()
            case Err():
                self.state = ClientState.IDLE
                self._events.append(Refused(error_from_wire(frame.code, frame.message, frame.retryable)))
            case Bye():
                self.state = ClientState.IDLE
                self._events.append(Refused(ConnectionClosed(1001 if frame.reconnect else 1008, frame.code)))
            case _:
                pass  # nothing else is meaningful before welcome

    def _on_frame(self, frame: ServerFrame, now: float) -> None:
        match frame:
            case Evt():
                self._on_evt(frame)
            case Subbed():
                self._on_subbed(frame)
            case Snap():
                st = self._streams.get(frame.stream)
                if st is not None:
                    st.cursor.reset(frame.epoch, frame.offset)
                    st.want_cursor = False
                    self._events.append(Missed(frame.stream, frame.epoch, frame.offset, frame.state, frame.checksum))
            case Sync():
                st = self._streams.get(frame.stream)
                if st is not None and frame.epoch in ("", st.cursor.epoch):
                    self._events.append(frame)
            case Ok() | Err() | Pong() if frame.id is not None and frame.id in self._sent:
                self._on_reply(self._sent.pop(frame.id), frame, now)
            case Err(code="token_expired", id=None):
                self._events.append(TokenExpired())
            case Err():
                self._events.append(ServerError(error_from_wire(frame.code, frame.message, frame.retryable)))
            case Msg():
                self._events.append(frame)  # rule 12: as it comes, nothing to track
            case Bye():
                self._events.append(frame)
            case _:
                pass  # a late reply to a forgotten request, a second welcome

    def _on_evt(self, evt: Evt) -> None:
        st = self._streams.get(evt.stream)
        if st is None:
            return  # in flight when the application unsubscribed
        cur = st.cursor
        if cur.epoch is not None and (evt.epoch != cur.epoch or evt.offset > cur.offset + 1):
            # Only a broken connection loses frames (an epoch change always comes
            # after a notice): resume from the cursor instead of skipping.
            self.state = ClientState.BROKEN
            self._events.append(Broken(evt.stream, f"gap in {evt.stream}: {evt.epoch}:{evt.offset} after {cur.epoch}:{cur.offset}"))
            return
        if cur.accept(evt.epoch, evt.offset):
            st.want_cursor = False
            self._events.append(evt)
        else:
            self.duplicates += 1

    def _on_subbed(self, frame: Subbed) -> None:
        req = self._sent.get(frame.id)
        if req is not None and (req.kind != "sub" or req.stream != frame.stream):
            req = None  # an unsolicited subbed (epoch change) whose id is reused
        if req is not None:
            del self._sent[frame.id]
        st = self._streams.get(frame.stream)
        if st is not None:
            st.live = True
            st.attempts = 0
            cur = st.cursor
            if frame.recovered:
                if cur.epoch is not None and cur.offset == 0:
                    cur.reset(frame.epoch, 0)  # "from the very start": adopt the server's epoch
            elif not frame.snap:
                had_position = cur.epoch is not None
                cur.reset(frame.epoch, frame.offset)
                st.want_cursor = False
                if had_position:
                    self._events.append(Missed(frame.stream, frame.epoch, frame.offset))
        if req is not None:
            self._kept.pop(req, None)
            req.id = None
            req.reply = frame
            if req.kept:
                self._resolve(req, frame)
            else:  # our own resubscription: nobody waits for it
                req.done, req.result = True, frame

    def _on_reply(self, req: Request, frame: Ok | Err | Pong, now: float) -> None:
        req.id = None
        req.reply = frame
        if req.kind == "raw":
            self._resolve(req, frame)
            return
        if isinstance(frame, Err):
            error = error_from_wire(frame.code, frame.message, frame.retryable)
            if req.kind == "cmd" and req.retry and frame.code == "idempotency_in_progress":
                # The first attempt is still running on the server: ask again shortly.
                req.retry_at = now + backoff_delay(req.attempts, *IN_PROGRESS_RETRY, rng=self._rng)
                req.attempts += 1
                return
            if req.kind == "cmd" and req.retry and frame.code == "shutdown":
                return  # the server is draining: kept, resent on the next connection
            if req.kind == "sub" and req.stream is not None and not req.kept:
                st = self._streams.get(req.stream)
                if st is not None and frame.retryable and (st.request is None or st.request.done):
                    # A transient refusal (the backend is down, the server is
                    # busy): nobody awaits a resubscription, so the session
                    # asks again after a backoff, from the same position.
                    st.retry_at = now + backoff_delay(st.attempts, *IN_PROGRESS_RETRY, rng=self._rng)
                    st.attempts += 1
                    return
                # A final refusal: the stream cannot continue.
                if st is not None and (st.request is None or st.request.done):
                    del self._streams[req.stream]
                    self._events.append(SubscriptionEnded(req.stream, error))
                return
            if req.kind == "sub" and req.stream is not None:
                st = self._streams.get(req.stream)
                if st is not None and st.request is req:
                    del self._streams[req.stream]
            self._kept.pop(req, None)
            self._resolve(req, error=error)
            return
        self._kept.pop(req, None)
        self._resolve(req, frame.result if isinstance(frame, Ok) else frame)

"""WebSocket connections over anyio streams: the :class:`FrameTransport`.

Design, and why:

* **wsproto parses, we frame.** Inbound bytes go through
  ``wsproto.Connection`` (frame parsing, masking, UTF-8 validation, close
  codes), except the common frame: while wsproto rests between messages
  (parked, see ``_park``), a complete, unfragmented, masked text or binary
  frame within the size limit is read by
  :func:`~rtcore.transport.wsframes.read_data_frame` (one big-integer XOR to
  unmask, ``bytes.decode`` to validate UTF-8) and everything from the first
  other frame on goes to wsproto, which cannot tell the difference. wsproto's
  parser was ~15 % of the server's CPU per echo command (py-spy).
  Outbound data frames are built by :mod:`rtcore.transport.wsframes`
  and a whole batch goes out in **one** socket write (the biggest speed win
  we measured: every await is an event-loop pass). Control frames (ping, pong, close) still go
  through wsproto so its state machine knows the connection is closing.
* **One read loop per connection** reads the socket all the time, answers
  pings, notices pongs and the peer's close. Either the handler claims it
  (:meth:`WebSocketTransport.take_reader`, before its first await) and runs
  it in its own task, getting each complete message through a synchronous
  callback (an awaitable the callback returns is awaited before reading
  on: backpressure), or it runs as a task of :func:`run_websocket` and
  queues messages in a bounded memory stream (``max_queue``) that the
  handler pulls with :meth:`WebSocketTransport.receive`; when it falls
  behind the reader stops reading and TCP backpressure reaches the client.
  The session layer claims it: no reader task and no queue per connection.
  Keepalive and close work even while the application is busy with a long
  command (commands run in tasks of their own).
* **Limits wsproto lacks**: message size counted across fragments (and after
  inflating, see :mod:`rtcore.transport.deflate`), fragments per message; both
  close with 1009. Every ``ping_interval`` the connection is pinged and
  closed with 1011 when no pong comes back within ``ping_timeout``; the
  pings of all a server's connections come from one :class:`Heartbeats`
  task (a heap of deadlines), not a task per connection.
* **asyncio fast path.** Connections served by the listener on asyncio
  (uvloop too) run on a :class:`~rtcore.transport.aiostream.ProtocolStream`,
  whose ``write_now`` hands a batch to the asyncio transport when nothing is
  buffered there: the transport writes the socket at once and keeps, in
  order, what the kernel did not take, so nothing is awaited at all. For a
  transport built on one of anyio's plain TCP streams on asyncio's selector
  loop (outside :func:`~rtcore.transport.listener.serve`), writes go straight
  to the non-blocking socket that anyio exposes as
  ``SocketAttribute.raw_socket`` (``os.write`` on its ``fileno()``, read
  just before each write: asyncio sets it to -1 when it closes the socket,
  and nothing else runs in between, so a reused descriptor is never
  written); whatever the kernel does not take goes through anyio's ``send``
  (which waits until asyncio's buffer is empty, under ``send_timeout``), so
  the socket is only written directly while nothing is buffered and bytes
  stay in order. :meth:`WebSocketTransport.send_nowait` offers either write
  to the session layer, which batches a loop tick's frames with
  ``call_soon``. Reads always go through the stream's ``receive`` (a
  direct-read variant of the ``os.write`` path was tried and dropped our
  close frame in Autobahn's fail-the-connection cases). Anything else
  (trio, TLS, other streams) uses the stream's ``send`` for every write.
* **One lock for writes.** anyio streams refuse concurrent ``send`` calls;
  the application's batches, the reader's pongs and close frames and the
  heartbeat's pings share one :class:`anyio.Lock`. A write cut short (send
  timeout, cancellation) may leave half a frame on the wire, so the
  connection is aborted rather than reused.
* **Closing** follows RFC 6455 §7: whoever closes first sends a close frame
  and waits (``close_timeout``) for the other's; the server then closes TCP.
  Every way the connection ends surfaces to the application as one exception,
  :class:`~rtcore.errors.ConnectionClosed`, whose ``close_code`` explains
  it (peer's code, ours, or 1006 when TCP was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import Extension

from ..protocol.deadlines import DeadlineHeap
from .aiostream import ProtocolStream, close_forcefully
from .config import ServerLimits
from .errors import ConnectionClosed
from .messages import UpgradeRequest
from .wsframes import OP_BINARY, OP_TEXT, encode_frames, read_data_frame

__all__ = [
    "FrameTransport", "Heartbeats", "InlineReader", "MessageCallback", "TaskSpawner", "WebSocketHandler", "WebSocketTransport", "run_websocket",
    "start_reader", "start_spawned", "websocket_ended",
]

log = logging.getLogger("rtcore.transport")

#: What a dead or closed byte stream raises (ssl.SSLError is an OSError).
STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
_NO_HALF_CLOSE = (NotImplementedError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)

def _direct_socket(stream: ByteStream) -> socket.socket | None:
    """The non-blocking socket behind ``stream`` when writing it directly is safe:
    a plain TCP :class:`~anyio.abc.SocketStream` (TLS streams are not) on asyncio's
    selector event loop on POSIX (whose transport writes the socket the same way)."""
    if os.name != "posix" or not isinstance(stream, SocketStream):
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio (or no asyncio loop): the portable path
        return None
    if not isinstance(loop, asyncio.SelectorEventLoop):
        return None  # uvloop, proactor: their sockets are not ours to write
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None or sock.gettimeout() != 0.0 or sock.type != socket.SOCK_STREAM:
        return None
    return sock


class _DirectWriter(Protocol):
    """Writes what the connection takes now without waiting."""

    def write_now(self, data: bytes) -> int:
        """Bytes taken (0 when it must wait); OSError when the connection is gone."""
        ...


def _direct_writer(stream: ByteStream) -> _DirectWriter | None:
    """What writes ``stream`` without waiting (see :class:`_DirectWriter`), or None
    when ``stream`` has no such path: a :class:`ProtocolStream` hands bytes to its
    asyncio transport (any asyncio loop), a plain TCP stream of anyio's on the
    selector loop is written directly (:func:`_direct_socket`). An object whose
    method is called, not a bound method stored per connection."""
    if isinstance(stream, ProtocolStream):
        return stream
    sock = _direct_socket(stream)
    return None if sock is None else _SocketWriter(sock)


class _SocketWriter:
    """:func:`_write_now` on one socket."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write_now(self, data: bytes) -> int:
        return _write_now(self._sock, data)


def _write_now(sock: socket.socket, data: bytes) -> int:
    """Write what the kernel takes now (0 when its buffer is full); OSError when the socket is gone."""
    fd = sock.fileno()
    if fd < 0:  # asyncio closed it: the descriptor may belong to someone else now
        raise OSError("the socket is closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


class TaskSpawner(Protocol):
    """Where a connection's short side tasks run (flushing, a keepalive close):
    ``anyio.abc.TaskGroup.start_soon``'s shape."""

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in a new task."""
        ...


class _NoEvents(list[Any]):
    """Stands in for wsproto's event deque (~0.8 kB per connection, empty for
    good): wsproto appends to it only in ``receive_data(None)``, which we never
    call; ``events()`` reads parsed frames from its frame protocol directly."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def _new_wsproto(extensions: Sequence[Extension]) -> Connection:
    ws = Connection(ConnectionType.SERVER, extensions=list(extensions))
    events = getattr(ws, "_events", None)
    if type(events) is deque and not events:  # the wsproto we know (1.2, 1.3); else leave it
        ws._events = _NoEvents()  # type: ignore[assignment]
    return ws



#: Resting wsproto connections (see WebSocketTransport._park), at most _WS_POOL_MAX.
_WS_POOL: list[Connection] = []
_WS_POOL_MAX = 256


def _at_rest(ws: Connection) -> bool:
    """Whether ``ws`` is indistinguishable from a new server connection without
    extensions: open, nothing buffered, no frame or fragmented message under way,
    its parser alive (wsproto 1.2/1.3 internals; see :data:`_POOLING`)."""
    proto = ws._proto
    decoder = proto._frame_decoder
    return (
        ws._state is ConnectionState.OPEN
        and decoder.header is None
        and not decoder.buffer.buffer
        and proto._message_decoder.opcode is None
        and proto._outbound_opcode is None
        and not proto.extensions
        and proto._parse_more.gi_frame is not None  # type: ignore[attr-defined]
    )


def _pooling_works() -> bool:
    # The internals _at_rest reads are there (any other wsproto: no pooling).
    try:
        return _at_rest(_new_wsproto(()))
    except AttributeError:  # pragma: no cover - a wsproto we do not know
        return False


#: Whether idle connections give their wsproto connection back (see _at_rest).
_POOLING = _pooling_works()



#: Close codes an endpoint may send (RFC 6455 §7.4): 1005, 1006 and 1015 are not among them.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class FrameTransport(Protocol):
    """What the session layer needs from a connection, whatever carries it.

    Attributes:
        encoding: ``"json"`` (text frames) or ``"msgpack"`` (binary frames).
    """

    encoding: str

    async def receive(self) -> bytes | str:
        """The next complete message (``str`` for text, ``bytes`` for binary).

        Raises:
            ConnectionClosed: The peer closed or the connection died.
        """
        ...

    async def send(self, frames: list[bytes]) -> None:
        """Send each item as one message, all of them in one socket write.

        Raises:
            ConnectionClosed: The connection is closing or closed.
        """
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """Close handshake with a deadline, then close the socket."""
        ...


#: The per-connection handler the server calls after a successful upgrade.
WebSocketHandler = Callable[[FrameTransport, UpgradeRequest], Awaitable[None]]

#: Takes one inbound message; an awaitable it returns is awaited before the next
#: message is read (backpressure: the socket is not read meanwhile).
MessageCallback = Callable[[bytes | str], Awaitable[None] | None]


@runtime_checkable
class InlineReader(Protocol):
    """A transport that can hand inbound messages to a callback from a read loop
    run in the caller's task (no reader task, no message queue per connection)."""

    def take_reader(self, on_message: MessageCallback, flush: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Claim reading for the caller; ``False``: already reading, use ``receive``.

        Must be called before the caller's first await. After ``True`` the caller
        runs :meth:`run_reader`. ``flush`` is awaited before a protocol error
        fails the connection (replies to earlier messages go out first).
        """
        ...

    async def run_reader(self) -> None:
        """Read until the connection ends, handing messages to the callback.

        Raises:
            ConnectionClosed: Always, once the connection has ended.
        """
        ...


class WebSocketTransport:
    """A server-side WebSocket connection on an anyio byte stream.

    Create it after the 101 response was written, then run it with
    :func:`run_websocket` (which starts the reader and heartbeat tasks).

    Args:
        stream: The connection (TCP or TLS).
        encoding: ``"json"``: :meth:`send` writes text frames; ``"msgpack"``: binary.
        limits: Sizes and timeouts.
        extensions: Negotiated wsproto extensions (permessage-deflate or none).
        trailing_data: Bytes received after the upgrade request (the client
            may send its first frames right behind the handshake).
        heartbeats: The server's shared :class:`Heartbeats` (None: :func:`run_websocket`
            runs one for this connection alone).
    """

    # Thousands of these live at once: no per-instance __dict__.
    __slots__ = (
        "__weakref__",
        "_aborted",
        "_ahead",
        "_caught_up",
        "_close_sent",
        "_closer",
        "_code",
        "_deliver_scope",
        "_delivered",
        "_direct",
        "_discard",
        "_done",
        "_fast",
        "_finished",
        "_flush",
        "_frames",
        "_hb_at",
        "_heartbeats",
        "_inbox",
        "_inbox_in",
        "_limits",
        "_lock",
        "_on_message",
        "_opcode",
        "_parts",
        "_ping_payload",
        "_reader_scope",
        "_reading",
        "_reason",
        "_size",
        "_stream",
        "_tg",
        "_trailing",
        "_unsent",
        "_waiting_at",
        "_wsc",
        "encoding",
    )

    def __init__(
        self,
        stream: ByteStream,
        *,
        encoding: Literal["json", "msgpack"],
        limits: ServerLimits,
        extensions: Sequence[Extension] = (),
        trailing_data: bytes = b"",
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.encoding: str = encoding
        self._stream = stream
        self._limits = limits
        # wsproto's connection (~0.9 kB with its decoders and parser generator). Without
        # extensions, one that rests between messages is the same for every connection:
        # a read loop about to wait gives it back to a shared pool (_park) and takes one
        # again when it next needs one (the _ws property): idle connections hold none.
        # A new one without extensions starts parked: the first messages (hello,
        # sub) go through the fast frame reader, and a connect builds no wsproto
        # connection at all unless a frame needs one.
        self._wsc: Connection | None = _new_wsproto(extensions) if extensions or not _POOLING else None
        self._trailing = trailing_data
        self._direct = _direct_writer(stream)
        # Fast path: bytes of a send_nowait the kernel did not take; they go out
        # before anything else (the flusher task, or the next write under the lock).
        self._unsent = b""
        # The task group of run_websocket: a flusher task is started in it only when
        # a send_nowait left bytes over (rare), not kept waiting per connection.
        self._tg: TaskGroup | TaskSpawner | None = None
        # Without extensions frames need no transformation: build them ourselves.
        self._fast = not extensions
        self._opcode = OP_TEXT if encoding == "json" else OP_BINARY
        # Serializes awaited writes; created by the first one (most writes on the
        # asyncio fast path never await, and a lock is a 1-kB object).
        self._lock: anyio.Lock | None = None
        # The queue receive() reads; created by the first message for it (a session
        # that reads with take_reader never needs one).
        self._inbox_in: MemoryObjectSendStream[bytes | str] | None = None
        self._inbox: MemoryObjectReceiveStream[bytes | str] | None = None
        # take_reader's callback (None: messages go to the queue for receive()).
        self._on_message: MessageCallback | None = None
        self._flush: Callable[[], Awaitable[None]] | None = None
        self._reading = False  # a read loop was started (task or take_reader's caller)
        # Keepalive, run by the shared Heartbeats: when this connection is due
        # (entries in its heap count only while equal to this), and the payload
        # of the ping awaiting its pong (None: none outstanding).
        self._heartbeats = heartbeats
        self._hb_at: float | None = None
        self._ping_payload: bytes | None = None
        self._close_sent = False
        self._discard = False  # close() was called: inbound messages are dropped
        self._aborted = False
        self._code: int | None = None
        self._reason = ""
        # The read loop ended (the connection is over); _done is created by a
        # close() that waits for it.
        self._finished = False
        self._done: anyio.Event | None = None
        # What bounds the read loop once the connection is closing: a cancel scope
        # it runs in, or on a ProtocolStream (whose close wakes a waiting receive)
        # no scope (~0.6 kB per connection) but a loop timer that closes the
        # stream at the deadline (_closer, set by _start_close).
        self._reader_scope: anyio.CancelScope | None = None if isinstance(stream, ProtocolStream) else anyio.CancelScope()
        self._closer: asyncio.TimerHandle | None = None
        self._deliver_scope: anyio.CancelScope | None = None
        self._caught_up: anyio.Event | None = None  # see _let_application_catch_up
        # Messages handed to the inbox so far, and that count when the application
        # last started waiting in receive() (-1: not waiting); see _let_application_catch_up.
        self._delivered = 0
        self._waiting_at = -1
        # The inbound message being assembled.
        self._parts: list[bytes | str] | None = None  # created by a fragmented message
        self._size = 0
        self._frames = 0
        # See reading_ahead: False only while the fast path hands over the last
        # message of what it read.
        self._ahead = True

    # -- public API ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection is closing or closed (no more sends)."""
        return self._close_sent or self._aborted or self._ws_state is not ConnectionState.OPEN

    @property
    def close_code(self) -> int | None:
        """The close code, once known (see :class:`ConnectionClosed`)."""
        return self._code

    @property
    def reading_ahead(self) -> bool:
        """Whether more of what was read may follow the message being handed to
        the :meth:`take_reader` callback now (True when not known).

        False tells the callback that an answer it writes at once will not be
        followed by the answer to another message from the same read (so there
        is no batching to wait for).
        """
        return self._ahead

    @property
    def call_soon(self) -> Callable[..., Any] | None:
        """asyncio fast path: the running loop's ``call_soon`` (lets the session layer
        batch a tick's worth of frames and write them with :meth:`send_nowait`); None
        without the fast path."""
        return asyncio.get_running_loop().call_soon if self._direct is not None else None

    @property
    def _ws(self) -> Connection:
        ws = self._wsc
        if ws is None:  # parked: take a resting one (any will do) or make one
            ws = self._wsc = _WS_POOL.pop() if _WS_POOL else _new_wsproto(())
        return ws

    @property
    def _ws_state(self) -> ConnectionState:
        ws = self._wsc
        return ConnectionState.OPEN if ws is None else ws.state  # parked only while open

    def _park(self) -> None:
        """About to wait for bytes: give a resting wsproto connection back to the pool."""
        ws = self._wsc
        if ws is not None and self._fast and _POOLING and _at_rest(ws):
            self._wsc = None
            if len(_WS_POOL) < _WS_POOL_MAX:
                _WS_POOL.append(ws)

    async def receive(self) -> bytes | str:
        """The next complete message: ``str`` for text, ``bytes`` for binary.

        Messages that arrived before the close are still returned first.

        Raises:
            ConnectionClosed: The connection is closed and nothing is queued.
        """
        if self._inbox is None:
            self._open_inbox()
        assert self._inbox is not None
        if self._caught_up is not None and self._inbox.statistics().current_buffer_used == 0:
            self._caught_up.set()  # the application handled everything queued
        try:
            # A message already queued is returned without an event-loop pass.
            return self._inbox.receive_nowait()
        except anyio.WouldBlock:
            pass
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._closed_error() from None
        # Set before the await: anyio's receive() yields once before it counts as
        # a waiting receiver, and the reader must already see us as caught up then.
        self._waiting_at = self._delivered
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._closed_error() from None
        finally:
            self._waiting_at = -1

    def take_reader(self, on_message: MessageCallback, flush: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Read in the caller's task and hand each message to ``on_message`` (see :class:`InlineReader`).

        Saves the connection its reader task and message queue. Call it before
        the first await of the handler :func:`run_websocket` runs; then run
        :meth:`run_reader`. Returns ``False`` once a read loop has started
        (the handler then reads with :meth:`receive`). ``flush``, when given,
        is awaited (at most a second) before a protocol error fails the
        connection: what the application sent in answer to the messages before
        the error goes out ahead of the close frame.
        """
        if self._reading or self._inbox is not None:
            return False
        self._reading = True
        self._on_message = on_message
        self._flush = flush
        return True

    async def send(self, frames: list[bytes]) -> None:
        """Send each item as one message, in one socket write.

        Items are text frames (already UTF-8 JSON) when ``encoding`` is
        ``"json"``, binary frames otherwise.

        Args:
            frames: Encoded messages.

        Raises:
            ConnectionClosed: The connection is closing or closed.
        """
        if not frames:
            return
        if self.send_nowait(frames):
            return
        data = encode_frames(self._opcode, frames) if self._fast else None
        async with self._get_lock():
            self._check_open()
            if data is None:
                text = self._opcode == OP_TEXT
                data = b"".join(
                    self._ws.send(TextMessage(data=f.decode("utf-8")) if text else BytesMessage(data=f)) for f in frames
                )
            await self._write(data)

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Send like :meth:`send` if that needs no wait; ``False``: nothing was
        sent, use :meth:`send`.

        Only the asyncio fast path does this (no other write in progress or
        pending, no extension transforms frames). Bytes the kernel does not
        take at once are written by the connection's flusher task before any
        later write (waiting at most ``send_timeout`` for the peer).
        """
        direct = self._direct
        if direct is None or not self._fast or self._unsent or (self._lock is not None and self._lock.locked()) or self._close_sent or self._aborted:
            return False
        if self._tg is None:
            return False  # not running under run_websocket: nobody could flush a partial write
        if self._ws_state is not ConnectionState.OPEN:
            return False
        if not frames:
            return True
        data = encode_frames(self._opcode, frames)
        try:
            sent = direct.write_now(data)
        except OSError:
            return False  # the connection is gone: the awaited send meets the error
        if not sent:
            return False
        if sent < len(data):
            self._unsent = data[sent:]
            self._tg.start_soon(self._flush_unsent)
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close: send a close frame, wait up to ``close_timeout`` for the
        peer's, then close the socket. Safe to call more than once.

        Args:
            code: Close code (1000 normal, 1001 going away, 1008 policy, ...).
            reason: Close reason (truncated to fit a control frame).
        """
        # The application reads no more messages: drop new ones, and unblock a
        # reader stuck on a full queue so it can see the peer's close frame.
        self._discard = True
        if self._deliver_scope is not None:
            self._deliver_scope.cancel()
        with anyio.move_on_after(self._limits.close_timeout):
            await self._start_close(code, reason)
            await self._wait_done()
        if not self._finished:
            await self._abort()

    def close_nowait(self, frames: list[bytes], code: int, reason: str = "") -> bool:
        """Send ``frames`` and a close frame in one write if that needs no wait
        (the asyncio fast path, as :meth:`send_nowait`); ``False``: nothing was
        sent, use :meth:`send` and :meth:`close`.

        No task and no timeout of its own: the read loop ends the connection
        when the peer's close frame (or EOF) comes, or drops it
        ``close_timeout`` later (the same bound :meth:`close` sets). Graceful
        shutdown closes every session this way: at 10,000 connections a task
        per close with its nested timeouts was most of the shutdown's CPU.

        Args:
            frames: Messages to send before the close frame (the ``bye``).
            code: Close code.
            reason: Close reason (truncated to fit a control frame).
        """
        direct = self._direct
        if direct is None or not self._fast or self._unsent or (self._lock is not None and self._lock.locked()):
            return False
        if self._close_sent or self._aborted or self._tg is None or self._ws_state is not ConnectionState.OPEN:
            return False
        if code not in _SENDABLE and not 3000 <= code <= 4999:
            code = 1000
        data = encode_frames(self._opcode, frames) if frames else b""
        # From here on the close is committed (wsproto's state moved): whatever
        # the socket does not take now is written by the flusher task.
        self._discard = True
        if self._deliver_scope is not None:
            self._deliver_scope.cancel()
        self._set_code(code, reason)
        self._close_sent = True
        data += self._ws.send(CloseConnection(code=code, reason=reason or None))
        try:
            sent = direct.write_now(data)
        except OSError:
            sent = 0  # the flusher's write meets the error and aborts
        if sent < len(data):
            self._unsent = data[sent:]
            self._tg.start_soon(self._flush_unsent)
        self._bound_close_wait()
        return True

    # -- internals -------------------------------------------------------------

    def _get_lock(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock(fast_acquire=True)
        return self._lock

    async def _wait_done(self) -> None:
        if self._finished:
            return
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()

    def _open_inbox(self) -> None:
        self._inbox_in, self._inbox = anyio.create_memory_object_stream[bytes | str](self._limits.max_queue)
        if self._finished:
            self._inbox_in.close()  # the connection already ended: receive() raises once drained

    def _close_inbox(self) -> None:
        if self._inbox_in is not None:
            self._inbox_in.close()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(1006 if self._code is None else self._code, self._reason)

    def _set_code(self, code: int, reason: str) -> None:
        # The first cause of the end is the one the application hears about.
        if self._code is None:
            self._code = code
            self._reason = reason

    def _check_open(self) -> None:
        if self._close_sent or self._aborted or self._ws_state is not ConnectionState.OPEN:
            raise self._closed_error()

    async def _write(self, data: bytes) -> None:
        """Write under the lock (held by the caller); any failure ends the connection."""
        if self._aborted:
            raise self._closed_error()
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        if not data:
            return
        direct = self._direct
        if direct is not None:
            # Fast path: nothing is buffered in asyncio's transport (every earlier
            # write completed), so the socket can take bytes directly.
            try:
                sent = direct.write_now(data)
            except OSError:
                self._set_code(1006, "connection lost")
                await self._abort()
                raise self._closed_error() from None
            if sent == len(data):
                return
            data = data[sent:]
        timeout = self._limits.send_timeout
        try:
            if timeout is None:
                await self._stream.send(data)
            else:
                with anyio.fail_after(timeout):
                    await self._stream.send(data)
        except TimeoutError:
            self._set_code(1006, "send timeout: the peer is not reading")
            await self._abort()
            raise self._closed_error() from None
        except STREAM_ERRORS:
            self._set_code(1006, "connection lost")
            await self._abort()
            raise self._closed_error() from None
        except BaseException:
            # Cancelled mid-write: part of a frame may be on the wire.
            await self._abort()
            raise

    async def _flush_unsent(self) -> None:
        """Fast path: write what :meth:`send_nowait` left over (started by it in
        :func:`run_websocket`'s task group). ``send_nowait`` refuses while bytes
        are left over, so at most one of these runs at a time."""
        async with self._get_lock():
            if not self._unsent or self._aborted:
                return
            with contextlib.suppress(ConnectionClosed):
                await self._write(b"")

    async def _abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        self._set_code(1006, "connection aborted")
        if not self._aborted:
            self._aborted = True
            await close_forcefully(self._stream)
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    async def _start_close(self, code: int, reason: str) -> None:
        """Send our close frame (once) and bound the wait for the peer's."""
        if code not in _SENDABLE and not 3000 <= code <= 4999:
            code = 1000
        self._set_code(code, reason)
        if self._close_sent or self._aborted:
            return
        # The lock may be held by a write the peer does not drain: bound the wait.
        with anyio.move_on_after(self._limits.close_timeout) as scope:
            async with self._get_lock():
                if self._close_sent or self._aborted or self._ws_state is not ConnectionState.OPEN:
                    return
                self._close_sent = True
                try:
                    await self._write(self._ws.send(CloseConnection(code=code, reason=reason or None)))
                except ConnectionClosed:
                    return
        if scope.cancelled_caught:
            await self._abort()
            return
        self._bound_close_wait()

    def _bound_close_wait(self) -> None:
        """Our close frame is out: the peer's reply (or its EOF) gets ``close_timeout``."""
        deadline = anyio.current_time() + self._limits.close_timeout
        reader_scope = self._reader_scope
        if reader_scope is not None:
            reader_scope.deadline = min(reader_scope.deadline, deadline)
        elif self._closer is None and not self._finished:
            # On asyncio anyio's clock is the loop's: at the deadline the stream is
            # closed, which ends a receive() waiting in the read loop.
            stream = self._stream
            assert isinstance(stream, ProtocolStream)
            self._closer = asyncio.get_running_loop().call_at(deadline, stream.close_now)

    async def _reader_task(self) -> None:
        """The read loop as a task of :func:`run_websocket`, unless :meth:`take_reader` claimed it."""
        if self._reading:
            return
        self._reading = True
        with contextlib.suppress(ConnectionClosed):
            await self.run_reader()

    def run_reader(self) -> Coroutine[Any, Any, None]:
        """Read the socket until the connection ends (see :meth:`take_reader`):
        ``await transport.run_reader()``.

        The read loop of every connection: :meth:`_reader_task` runs it as a
        task, a handler that called :meth:`take_reader` runs it in its own
        task (one coroutine frame, not a chain: thousands of these wait at once).
        A plain function returning the loop's coroutine: on a
        :class:`ProtocolStream` a loop that waits on the stream's future itself
        and runs in no cancel scope (its ``with`` would keep a bound ``__exit__``
        on the frame's stack per idle connection); otherwise one reading with
        ``receive`` in the cancel scope that bounds the close.

        Raises:
            ConnectionClosed: Always, once the connection has ended (its code says how).
        """
        if self._reader_scope is None:
            return self._read_protocol_stream()
        return self._read_stream(self._reader_scope)

    async def _read_protocol_stream(self) -> None:
        stream = self._stream
        assert isinstance(stream, ProtocolStream)
        try:
            done = False
            if self._trailing:
                data, self._trailing = self._trailing, b""
                self._ws.receive_data(data)
                done = await self._handle_events()
            read_size = self._limits.read_size
            # An idle connection waits here, on the stream's future: no receive()
            # frame under this one, no wsproto connection (_park).
            while not done:
                try:
                    data = stream.receive_nowait(read_size)
                    if not data:
                        self._park()
                        await stream.readable()
                        continue
                except STREAM_ERRORS:
                    self._set_code(1006, "connection lost without a close frame")
                    break
                if self._wsc is None and self._parts is None and not self._close_sent:
                    data = await self._receive_simple(data)
                    if not data:
                        continue
                self._ws.receive_data(data)
                data = b""  # not kept while waiting for the next bytes
                done = await self._handle_events()
        except ConnectionClosed:
            pass  # a reply could not be written: the connection is gone
        finally:
            self._reader_stopping()
            if not self._aborted:
                self._aborted = True
                stream.close_now()  # what close_forcefully does, without an await
            self._reader_ended()
        raise self._closed_error()

    async def _read_stream(self, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                done = False
                if self._trailing:
                    data, self._trailing = self._trailing, b""
                    self._ws.receive_data(data)
                    done = await self._handle_events()
                read_size = self._limits.read_size
                stream = self._stream
                while not done:
                    try:
                        self._park()
                        data = await stream.receive(read_size)
                    except STREAM_ERRORS:
                        self._set_code(1006, "connection lost without a close frame")
                        break
                    if self._wsc is None and self._parts is None and not self._close_sent:
                        data = await self._receive_simple(data)
                        if not data:
                            continue
                    self._ws.receive_data(data)
                    data = b""  # not kept while waiting for the next bytes
                    done = await self._handle_events()
        except ConnectionClosed:
            pass  # a reply could not be written: the connection is gone
        finally:
            self._reader_stopping()
            if not self._aborted:
                self._aborted = True
                await close_forcefully(self._stream)
            self._reader_ended()
        raise self._closed_error()

    async def _receive_simple(self, data: bytes) -> bytes:
        """Deliver the simple data frames at the front of ``data`` without wsproto
        (see :func:`~rtcore.transport.wsframes.read_data_frame`); returns the rest,
        from the first frame that is not simple, for wsproto.

        Called only while wsproto is parked (``_wsc`` None: at rest, open, no
        extension, no message or frame under way) and no close frame was sent,
        so wsproto, given the rest, parses it as if it had parsed what came
        before. A message may change that (the application closes): the frames
        after it then go to wsproto too, which discards them while closing.
        """
        limit = self._limits.max_message_bytes
        max_payload = limit if limit is not None else len(data)
        if self._limits.max_fragments is not None and self._limits.max_fragments < 1:
            return data  # pragma: no cover - every message is over the limit: wsproto's path closes
        pos = 0
        while True:
            frame = read_data_frame(data, pos, max_payload)
            if frame is None:
                break
            message, pos = frame
            on_message = self._on_message
            if on_message is not None and not self._discard:
                # _deliver's take_reader case inlined (one coroutine less per message).
                self._ahead = pos < len(data)
                try:
                    pending = on_message(message)
                finally:
                    self._ahead = True
                if pending is not None:
                    await pending
            else:
                await self._deliver(message)
            if self._wsc is not None or self._close_sent or self._aborted:
                break  # closing (or a control frame went out meanwhile): wsproto's from here
        return data[pos:] if pos else data

    def _reader_stopping(self) -> None:
        """The read loop is ending: no close deadline, no more queued messages."""
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        self._close_inbox()

    def _reader_ended(self) -> None:
        """The read loop is over (the stream is closed): wake whoever waits for it."""
        self._finished = True
        if self._done is not None:
            self._done.set()

    async def _handle_events(self) -> bool:
        """Act on what wsproto parsed; ``True`` once the connection is finished."""
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                await self._on_data(event.data, event.frame_finished, event.message_finished)
            elif isinstance(event, Ping):
                async with self._get_lock():
                    if not self._close_sent and self._ws_state is ConnectionState.OPEN:
                        await self._write(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                if self._ping_payload is not None and event.payload == self._ping_payload:
                    self._ping_payload = None
                    heartbeats = self._heartbeats
                    if heartbeats is not None and self._limits.ping_interval is not None:
                        heartbeats.schedule(self, anyio.current_time() + self._limits.ping_interval)
            elif isinstance(event, CloseConnection):
                return await self._on_close(event)
        return False

    async def _on_data(self, data: bytes | bytearray | str, frame_finished: bool, message_finished: bool) -> None:
        if self._close_sent:
            return  # closing: data frames are discarded (RFC 6455 §1.4)
        if isinstance(data, bytearray):
            data = bytes(data)
        limits = self._limits
        if isinstance(data, str) and not data.isascii():
            self._size += len(data.encode("utf-8", "surrogatepass"))
        else:
            self._size += len(data)
        if frame_finished:
            self._frames += 1
        if limits.max_message_bytes is not None and self._size > limits.max_message_bytes:
            self._parts = None
            await self._start_close(1009, f"message larger than {limits.max_message_bytes} bytes")
            return
        if limits.max_fragments is not None and self._frames > limits.max_fragments:
            self._parts = None
            await self._start_close(1009, f"message in more than {limits.max_fragments} fragments")
            return
        if not message_finished:
            if self._parts is None:
                self._parts = []
            self._parts.append(data)
            return
        message: bytes | str
        if self._parts:
            self._parts.append(data)
            if isinstance(data, str):
                message = "".join(p for p in self._parts if isinstance(p, str))
            else:
                message = b"".join(p for p in self._parts if isinstance(p, bytes))
            self._parts = None
        else:
            message = data
        self._size = 0
        self._frames = 0
        await self._deliver(message)

    async def _deliver(self, message: bytes | str) -> None:
        if self._discard:
            return
        on_message = self._on_message
        if on_message is not None:
            # take_reader: straight into the application; what it returns is
            # awaited before the next message is read (backpressure).
            pending = on_message(message)
            if pending is not None:
                await pending
            return
        if self._inbox_in is None:
            self._open_inbox()
        assert self._inbox_in is not None
        try:
            self._inbox_in.send_nowait(message)
            self._delivered += 1
            return
        except anyio.WouldBlock:
            pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # nobody will receive it any more
        # The queue is full: wait (backpressure) unless a close cancels us.
        with anyio.CancelScope() as scope:
            self._deliver_scope = scope
            try:
                await self._inbox_in.send(message)
                self._delivered += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                self._deliver_scope = None

    async def _on_close(self, event: CloseConnection) -> bool:
        state = self._ws_state
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer closes first: echo its code, then close TCP (the server
            # closes the TCP connection first, RFC 6455 §7.1.1).
            self._set_code(event.code, event.reason or "")
            async with self._get_lock():
                if self._ws_state is ConnectionState.REMOTE_CLOSING and not self._aborted:
                    await self._write(self._ws.send(event.response()))
            return True
        if state is ConnectionState.CLOSED:
            return True  # the peer answered our close frame
        # Still OPEN: wsproto could not parse the peer's bytes (bad opcode,
        # invalid UTF-8, ...). Its parser is dead now, so fail the connection:
        # send the close frame, half-close TCP and wait for the peer to hang up.
        await self._let_application_catch_up()
        await self._start_close(event.code, event.reason or "")
        try:
            await self._stream.send_eof()
        except _NO_HALF_CLOSE:
            return True
        while True:
            try:
                await self._stream.receive(self._limits.read_size)
            except STREAM_ERRORS:
                return True

    async def _let_application_catch_up(self) -> None:
        """Before failing the connection, let the application answer what came before the error.

        Messages queued ahead of a protocol error are valid (a command
        followed by garbage still deserves its reply). Wait, briefly, until the
        application has taken them all and is back in :meth:`receive`.
        """
        # Caught up: waiting in receive() since before the last message was queued
        # (so it has taken them all). Counting anyio's waiting receivers instead
        # missed an application that had just entered receive(): it then never set
        # _caught_up and the close frame went out a second late (Autobahn 7.9.3).
        if self._discard:
            return
        if self._on_message is not None:
            # take_reader: each message was handled before the next was read;
            # what the application queued in answer still has to reach the transport.
            if self._flush is not None:
                with anyio.move_on_after(min(1.0, self._limits.close_timeout)):
                    await self._flush()
            return
        if self._waiting_at == self._delivered:
            return
        self._caught_up = anyio.Event()
        with anyio.move_on_after(min(1.0, self._limits.close_timeout)):
            await self._caught_up.wait()
        self._caught_up = None

    def _heartbeat_due(self, now: float) -> None:
        """Called by :class:`Heartbeats` when this connection's keepalive deadline came.

        No ping outstanding: send one (directly when the socket takes it now,
        else from a short task) and come back at ``ping_timeout``. A ping still
        unanswered by then: close with 1011.
        """
        if self.closed or self._tg is None or self._heartbeats is None:
            return
        if self._ping_payload is not None:
            self._ping_payload = None
            self._tg.start_soon(self._start_close, 1011, "keepalive ping timeout")
            return
        payload = os.urandom(4)
        self._ping_payload = payload
        self._heartbeats.schedule(self, now + self._limits.ping_timeout)
        if not self._control_nowait(Ping(payload=payload)):
            self._tg.start_soon(self._send_ping, payload)

    def _control_nowait(self, event: Ping) -> bool:
        """Asyncio fast path: write a control frame now if nothing else is being or waits to be written."""
        direct = self._direct
        if direct is None or self._unsent or (self._lock is not None and self._lock.locked()) or self._close_sent or self._aborted:
            return False
        if self._ws_state is not ConnectionState.OPEN or self._tg is None:
            return False
        data = self._ws.send(event)
        try:
            sent = direct.write_now(data)
        except OSError:
            return True  # the connection is gone: the read loop sees it; no pong will come
        if sent < len(data):
            # Control frames are never split across writes by anything else: the
            # rest goes out first, from the flusher (send_nowait refuses meanwhile).
            self._unsent = data[sent:]
            self._tg.start_soon(self._flush_unsent)
        return True

    async def _send_ping(self, payload: bytes) -> None:
        async with self._get_lock():
            if self._close_sent or self._ws_state is not ConnectionState.OPEN or self._ping_payload != payload:
                return
            with contextlib.suppress(ConnectionClosed):
                await self._write(self._ws.send(Ping(payload=payload)))


#: How late a keepalive deadline may run, so deadlines close together share one
#: wake-up of Heartbeats (ping intervals are many seconds long).
_HEARTBEAT_SLACK = 0.05


class Heartbeats:
    """One task that pings many WebSocket connections (instead of a task each).

    Every ``ping_interval`` after its last pong (or its start) a connection
    gets a ping; when no pong came ``ping_timeout`` later it is closed with
    1011. The connections' next deadlines sit in one heap; an entry counts
    only while it equals the connection's current deadline (a pong moves it
    later, a closed connection has none; the stale entry then does nothing).
    Stale entries are not searched for and removed one by one: when they
    outnumber the live ones the heap is rebuilt without them, so it never
    holds more than about twice the open connections (and closed
    connections are not kept alive by it for a whole ``ping_interval``).

    Args:
        limits: ``ping_interval`` and ``ping_timeout``.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self._deadlines: DeadlineHeap[WebSocketTransport] = DeadlineHeap("_hb_at")
        self._next = math.inf
        self._kick: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def schedule(self, transport: WebSocketTransport, when: float) -> None:
        """(Re)schedule ``transport``'s next keepalive step at ``when`` (``anyio.current_time()`` clock)."""
        self._deadlines.schedule(transport, when)
        if when < self._next and self._kick is not None:
            self._kick.set()

    def discard(self, transport: WebSocketTransport) -> None:
        """Stop pinging ``transport`` (its connection ended)."""
        self._deadlines.discard(transport)

    def start(self, transport: WebSocketTransport) -> None:
        """Begin pinging ``transport`` (no-op when pings are disabled)."""
        interval = self._limits.ping_interval
        if interval is not None:
            self.schedule(transport, anyio.current_time() + interval)

    async def run(self) -> None:
        """Run the keepalive deadlines until cancelled."""
        deadlines = self._deadlines
        while True:
            now = anyio.current_time()
            while (transport := deadlines.pop_due(now)) is not None:
                try:
                    transport._heartbeat_due(now)
                except Exception:  # one connection's bug must not stop every keepalive
                    log.exception("keepalive failed for one connection")
            self._next = deadlines.next
            kick = self._kick = anyio.Event()
            with anyio.move_on_after(self._next - now + _HEARTBEAT_SLACK):
                await kick.wait()


class _Spawned:
    """``async with`` stand-in for a task group when a connection's side tasks
    go to a :class:`TaskSpawner` shared by the server (see :func:`run_websocket`)."""

    __slots__ = ("_spawner",)

    def __init__(self, spawner: TaskSpawner) -> None:
        self._spawner = spawner

    async def __aenter__(self) -> TaskSpawner:
        return self._spawner

    async def __aexit__(self, *exc: object) -> None:
        return None


async def run_websocket(
    transport: WebSocketTransport, request: UpgradeRequest, handler: WebSocketHandler, spawner: TaskSpawner | None = None
) -> None:
    """Run one WebSocket connection: reader, keepalive and the application handler.

    The handler runs in the calling task; the read loop runs in a task of
    the connection's task group, unless the handler claims it with
    :meth:`WebSocketTransport.take_reader` (before its first await) and runs
    it itself. Keepalive pings come from the transport's shared
    :class:`Heartbeats`, or from one run in the task group for this connection
    alone when it has none. Nothing outlives the connection, and ``request``
    lives only as long as the handler keeps a reference to it (a handler that
    needs just the token can drop it: thousands of connections wait at once). When the handler
    returns the connection is closed with 1000 (1011 if it raised); when the
    connection ends first the handler sees :class:`ConnectionClosed` from
    ``receive``/``send``/``run_reader``.

    With a ``spawner`` (the listener's on asyncio) the connection has no task
    group of its own (~0.8 kB each): the read loop's task (when the handler
    does not claim it) and the rare side tasks (the rest of a partial write,
    a keepalive ping or close) run in the spawner's tasks. Each of them ends
    by itself once the connection has (it is closed and aborted below).

    Args:
        transport: The upgraded connection.
        request: What the upgrade request said.
        handler: The application's per-connection coroutine.
        spawner: Runs the connection's side tasks (None: a task group of its own).
    """
    if spawner is not None and transport._heartbeats is None and transport._limits.ping_interval is not None:
        spawner = None  # a keepalive task for this connection alone needs a task group to end it
    try:
        async with anyio.create_task_group() if spawner is None else _Spawned(spawner) as tg:
            transport._tg = tg
            if transport._limits.ping_interval is not None:
                if transport._heartbeats is None:
                    transport._heartbeats = Heartbeats(transport._limits)
                    tg.start_soon(transport._heartbeats.run)
                transport._heartbeats.start(transport)
            code, reason = 1000, ""
            # The request (headers and all) stays alive only as long as the handler
            # keeps it: this frame holds what the log line needs, not the request.
            path, peer = request.path, request.peer
            try:
                pending = handler(transport, request)
                del request
                if not transport._reading:  # the handler did not claim the read loop (yet)
                    tg.start_soon(transport._reader_task)
                await pending
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("WebSocket handler failed (path %s, peer %s)", path, peer)
                code, reason = 1011, "internal error"
            await transport.close(code, reason)
            if spawner is None:
                assert isinstance(tg, TaskGroup)
                tg.cancel_scope.cancel()
    finally:
        await websocket_ended(transport)


def start_spawned(transport: WebSocketTransport, spawner: TaskSpawner | None) -> bool:
    """Set ``transport`` up to run its handler in the caller's own frame with
    ``spawner`` for its side tasks: what :func:`run_websocket` does before the
    handler, for a caller that inlines it (the HTTP connection on asyncio: one
    coroutine frame less per open WebSocket).

    The caller then calls the handler, :func:`start_reader` and awaits the
    handler; whatever happens, :meth:`WebSocketTransport.close` (1000, or 1011
    when the handler raised) and then :func:`websocket_ended`.

    Returns:
        ``False`` (nothing done): the connection needs :func:`run_websocket`
        (no spawner, or a keepalive task of its own).
    """
    if spawner is None or (transport._heartbeats is None and transport._limits.ping_interval is not None):
        return False
    transport._tg = spawner
    if transport._heartbeats is not None and transport._limits.ping_interval is not None:
        transport._heartbeats.start(transport)
    return True


def start_reader(transport: WebSocketTransport) -> None:
    """After calling the handler (see :func:`start_spawned`): start the read
    loop's task unless the handler claimed the loop."""
    if not transport._reading:
        assert transport._tg is not None
        transport._tg.start_soon(transport._reader_task)


async def websocket_ended(transport: WebSocketTransport) -> None:
    """The connection's handler is done: release what the connection holds."""
    if transport._heartbeats is not None:
        transport._heartbeats.discard(transport)
    if transport._inbox is not None:
        transport._inbox.close()
    transport._close_inbox()
    if not transport._finished:
        await transport._abort()

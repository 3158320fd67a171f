"""A reconnecting rtcore client over WebSocket (anyio + wsproto).

Usage::

    async with rtcore.client.connect("ws://127.0.0.1:8000/v1/ws", token="alice") as client:
        sub = await client.subscribe("room:7")
        await client.command("room.move", {"x": 1})
        async for item in sub:
            if isinstance(item, rtcore.client.Missed):
                ...  # events were lost (or a snapshot starts the stream): resync
            else:
                ...  # an Evt, each exactly once, in offset order

Why the client is the other half of the delivery guarantee: the server
delivers *at least once* across reconnects (it replays from the position the
client asks for). The client turns that into *exactly once, in order, or
told*:

1. **Positions.** Every subscription keeps a
   :class:`~rtcore.protocol.streams.ClientCursor`: the epoch and offset of the last
   event it queued for the application. After any reconnect it resubscribes
   with ``since`` = that position, so the server replays exactly what is
   missing.
2. **Duplicates** (an event at or below the cursor, same epoch) are dropped.
   A *gap* (an offset beyond cursor + 1 in the same epoch) can only come from
   a broken connection; the client drops the connection and resumes from its
   cursor instead of skipping.
3. **Missed events are never silent.** A ``subbed`` with ``recovered: false``
   for a subscription that had a position (history was trimmed, or the
   server's epoch changed: a backend reset, including the unsolicited
   ``subbed`` a server sends when an epoch changes under a live
   subscription) and every ``snap`` become a :class:`Missed` item in the
   subscription's iterator, in order with the events. The cursor jumps to
   the new position. With ``subbed.snap: true`` the cursor keeps its old
   position until the ``snap`` frame arrives, so a connection lost between
   the two frames resumes from where it was.
4. **Acks** are cumulative and sent for what the application has *pulled*
   from the iterator (not what was received), batched every
   ``ack_interval`` seconds, so the server cursor (used by a client that comes
   back without a position) never runs ahead of the application.
5. **Commands** each carry an idempotency key (``uuid4().hex`` unless given).
   A command not answered when the connection drops is resent with the same
   key after the reconnect; the server's idempotency layer makes the action
   take effect once. ``idempotency_in_progress`` (the first attempt is still
   executing) is retried after a short wait; ``shutdown`` (the server is
   draining) waits for the next connection. A command that gets no answer in
   ``timeout`` seconds raises :class:`~rtcore.errors.RtcoreError` code
   ``timeout``; an ``err`` reply raises it with the server's code.
6. **Reconnects** use exponential backoff with jitter: attempt *n* (from 0)
   waits ``min(backoff_max, backoff_base * 2**n)`` times a random factor in
   [0.5, 1], so a restarted server is not hit by every client at once.
   ``max_attempts`` consecutive failures (``None``: never give up) close the
   client with code ``disconnected``. ``bye`` with ``reconnect: true``
   (shutdown, slow consumer, idle) reconnects; ``reconnect: false`` (e.g.
   ``token_expired`` not refreshed) closes the client with the bye's code.
   A handshake refused with a 4xx status (other than 408/429) or a ``hello``
   refused with a non-retryable error is final too.
7. **Heartbeats.** A ``ping`` every ``heartbeat`` seconds (the server's
   value from ``welcome`` unless given); no ``pong`` within the same time
   means the connection is dead (a half-open TCP connection shows no error)
   and the client reconnects.
8. **Token refresh.** When the server says ``token_expired`` the client asks
   ``token_provider`` for a fresh token and sends an ``auth`` frame; the new
   token is also used for every later ``hello``.

The first connection is made inside :func:`connect`: if it fails, the error
is raised there (``OSError`` for an unreachable server, ``RtcoreError`` for a
refused handshake or hello) rather than retried forever behind the
application's back.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import random
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from ..errors import BadFrame, RtcoreError
from ..protocol.codec import Codec, Encoding, codec_for
from ..protocol.frames import (
    Ack,
    Auth,
    Bye,
    Cmd,
    Err,
    Evt,
    Hello,
    Ok,
    Pong,
    Position,
    Snap,
    Sub,
    Subbed,
    Sync,
    Unsub,
    Welcome,
)
from ..protocol.frames import Ping as PingFrame
from ..protocol.streams import ClientCursor

__all__ = ["Client", "Missed", "Subscription", "backoff_delay", "connect"]

log = logging.getLogger("rtcore.client")

_SUBPROTOCOLS: Final[dict[str, str]] = {"json": "rtcore.v1.json", "msgpack": "rtcore.v1.msgpack"}
#: Handshake statuses worth retrying: the server is busy or restarting, not refusing us.
_RETRY_STATUSES: Final = frozenset({408, 429})
_READ_SIZE: Final = 65536

TokenProvider = Callable[[], str | Awaitable[str | None] | None]


class Missed(msgspec.Struct, frozen=True):
    """Notice in a subscription's iterator: events before ``offset`` were not delivered.

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


def backoff_delay(attempt: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0-based).

    Exponential with "equal jitter": half of the capped delay is fixed, half
    random, so clients spread out but none retries in a tight loop.
    """
    cap = min(maximum, base * 2 ** min(attempt, 62))
    return float(cap * (0.5 + 0.5 * (rng or random).random()))


# --- the WebSocket connection ----------------------------------------------------


class _Closed(Exception):
    """The connection ended (any reason); carries the close code."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code} {reason})".strip())
        self.code = code
        self.reason = reason


class _HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket handshake refused with HTTP {status}")
        self.status = status
        self.body = body

    def error(self) -> RtcoreError:
        """The server's error (from its JSON body when there is one)."""
        code, message = "bad_request", f"WebSocket handshake refused with HTTP {self.status}"
        with contextlib.suppress(Exception):
            body = msgspec.json.decode(self.body)
            code, message = str(body.get("code", code)), str(body.get("message", message))
        return RtcoreError(message, code=code, http_status=self.status)


@dataclass(frozen=True)
class _Url:
    secure: bool
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str) -> _Url:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        secure = parts.scheme == "wss"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(secure, parts.hostname, parts.port or (443 if secure else 80), target)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


class _WebSocket:
    """One client WebSocket over an anyio byte stream.

    wsproto does the framing (client frames must be masked) and the close
    handshake; this class adds message reassembly with a size limit and a
    writer that merges everything queued into one socket write.
    """

    def __init__(self, stream: anyio.abc.ByteStream, text: bool, max_message_size: int) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.text = text
        self.max_message_size = max_message_size
        self.close_code: int | None = None
        self.close_reason = ""
        self._inbox: deque[bytes | str] = deque()
        self._parts: list[bytes | str] = []
        self._size = 0
        self._out_send, self._out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._refused: _HandshakeRefused | None = None
        self._refused_done = False
        self._accepted = False
        self._subprotocol: str | None = None

    @classmethod
    async def open(
        cls, url: _Url, *, encoding: str, ssl_context: ssl.SSLContext | None, max_message_size: int
    ) -> _WebSocket:
        stream: anyio.abc.ByteStream
        if url.secure:
            stream = await anyio.connect_tcp(
                url.host, url.port, tls=True, ssl_context=ssl_context, tls_standard_compatible=False
            )
        else:
            stream = await anyio.connect_tcp(url.host, url.port)
        conn = cls(stream, encoding == "json", max_message_size)
        try:
            await conn._handshake(url, _SUBPROTOCOLS[encoding])
        except BaseException:
            await conn.abort()
            raise
        return conn

    async def _handshake(self, url: _Url, subprotocol: str) -> None:
        request = self.ws.send(Request(host=url.host_header, target=url.target, subprotocols=[subprotocol]))
        try:
            await self.stream.send(request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            # A peer that resets the connection at once (refusing proxy, server
            # going down) is a lost connection, retryable like a failed read. On
            # trio the reset reaches this send; on asyncio it usually reaches the read.
            self.close_code = 1006
            raise _Closed(1006, "connection lost") from None
        while not self._accepted and not (self._refused is not None and self._refused_done):
            await self._read()
        if self._refused is not None:
            raise self._refused
        if self._subprotocol != subprotocol:
            raise _HandshakeRefused(
                400, b'{"code":"bad_request","message":"the server did not accept the subprotocol"}'
            )

    async def _read(self) -> None:
        try:
            data = await self.stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            if self._refused is not None:  # the refusal's body ended with the connection
                raise self._refused from None
            self.close_code = self.close_code or 1006
            raise _Closed(self.close_code, self.close_reason or "connection lost") from None
        self.ws.receive_data(data)
        for event in self.ws.events():
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            self._size += len(event.data)
            if self._size > self.max_message_size:
                self.close_code = 1009
                raise _Closed(1009, "message too big")
            self._parts.append(bytes(event.data) if isinstance(event.data, bytearray) else event.data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if len(parts) == 1:
                    self._inbox.append(parts[0])
                elif isinstance(parts[0], str):
                    self._inbox.append("".join(parts))  # type: ignore[arg-type]
                else:
                    self._inbox.append(b"".join(parts))  # type: ignore[arg-type]
        elif isinstance(event, Ping):
            self._queue(event.response())
        elif isinstance(event, CloseConnection):
            self.close_code, self.close_reason = event.code, event.reason or ""
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._queue(event.response())
        elif isinstance(event, AcceptConnection):
            self._accepted = True
            self._subprotocol = event.subprotocol
        elif isinstance(event, RejectConnection):
            self._refused = _HandshakeRefused(event.status_code, b"")
            self._refused_done = not event.has_body
        elif isinstance(event, RejectData) and self._refused is not None:
            self._refused.body += event.data
            self._refused_done = event.body_finished

    def _queue(self, event: Event) -> None:
        with contextlib.suppress(LocalProtocolError, anyio.ClosedResourceError):
            self._out_send.send_nowait(self.ws.send(event))

    async def flush(self) -> None:
        """Send what is queued now (before the writer task runs)."""
        data = b""
        while True:
            try:
                data += self._out_recv.receive_nowait()
            except anyio.WouldBlock:
                break
        if data:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
                raise _Closed(1006, "connection lost") from None

    async def receive(self) -> bytes | str:
        """The next message.

        Raises:
            _Closed: the connection ended (close frame, EOF or an error).
        """
        while not self._inbox:
            if self.close_code is not None:
                raise _Closed(self.close_code, self.close_reason)
            await self._read()
        return self._inbox.popleft()

    def send(self, payload: bytes) -> None:
        """Queue one message (the writer sends it)."""
        self._queue(TextMessage(payload.decode()) if self.text else BytesMessage(payload))

    async def write_loop(self) -> None:
        """Send queued frames, everything queued in one write.

        Raises:
            _Closed: the socket failed.
        """
        while True:
            chunks = [await self._out_recv.receive()]
            while True:
                try:
                    chunks.append(self._out_recv.receive_nowait())
                except anyio.WouldBlock:
                    break
            try:
                await self.stream.send(b"".join(chunks))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
                raise _Closed(1006, "connection lost") from None

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Close handshake (bounded), then drop the socket."""
        with anyio.move_on_after(timeout, shield=True):
            if self.ws.state is ConnectionState.OPEN:
                data = b""
                with contextlib.suppress(LocalProtocolError):
                    data = self.ws.send(CloseConnection(code))
                while True:  # flush anything still queued, then the close frame
                    try:
                        data = self._out_recv.receive_nowait() + data
                    except anyio.WouldBlock:
                        break
                with contextlib.suppress(Exception):
                    await self.stream.send(data)
                    while self.close_code is None:
                        await self._read()
        await self.abort()

    async def abort(self) -> None:
        """Drop the socket without a close handshake."""
        self._out_send.close()
        self._out_recv.close()
        await anyio.aclose_forcefully(self.stream)


# --- requests and subscriptions ----------------------------------------------------


@dataclass(eq=False)
class _Request:
    """A request waiting for its reply; survives reconnects (commands, subs)."""

    kind: Literal["cmd", "sub", "unsub", "auth", "ping"]
    make: Callable[[int], Any]
    sub: Subscription | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: RtcoreError | None = None
    id: int | None = None  # id on the current connection, None when not sent on it

    def resolve(self, result: Any = None, error: RtcoreError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Subscription:
    """One stream subscription; iterate it for events (each exactly once, in order).

    Items are :class:`~rtcore.protocol.frames.Evt` frames and :class:`Missed`
    notices. Iteration ends after :meth:`unsubscribe` or when the client is
    closed by the application, and raises :class:`~rtcore.errors.RtcoreError`
    when the client was closed by an error (or the server refused a
    resubscription).

    Attributes:
        stream: The stream name.
        cursor: The position of the last item queued for the application
            (what a resubscription resumes from).
        position: The position of the last item the application pulled.
    """

    def __init__(self, client: Client, stream: str, since: Position | None) -> None:
        self.stream = stream
        self.cursor = ClientCursor(since.epoch, since.offset) if since is not None else ClientCursor()
        self.position: Position | None = since
        self._client = client
        self._items: deque[Evt | Missed] = deque()
        self._changed = anyio.Event()
        self._error: RtcoreError | None = None
        self._ended = False
        self._acked: Position | None = None
        self._live = False  # subbed received on the current connection

    def __aiter__(self) -> AsyncIterator[Evt | Missed]:
        return self

    async def __anext__(self) -> Evt | Missed:
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            changed = self._changed
            await changed.wait()
        item = self._items.popleft()
        self.position = Position(item.epoch, item.offset)
        self._client._pulled(self)
        return item

    def _put(self, item: Evt | Missed) -> None:
        self._items.append(item)
        self._client._buffered += 1
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _end(self, error: RtcoreError | None = None) -> None:
        self._ended = True
        self._error = self._error or error
        self._wake()

    @property
    def pending(self) -> int:
        """Items received but not yet pulled by the application."""
        return len(self._items)

    async def unsubscribe(self, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop the subscription; iteration ends (unpulled items are dropped)."""
        await self._client._unsubscribe(self, timeout)


# --- the client -------------------------------------------------------------------


class Client:
    """A reconnecting rtcore client. Create it with :func:`connect`.

    Attributes:
        welcome: The current connection's ``welcome`` (``None`` while
            disconnected).
        reconnects: How many times the client reconnected.
        closed: Why the client closed (``None`` while open).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        token_provider: TokenProvider | None,
        encoding: Encoding,
        ssl_context: ssl.SSLContext | None,
        backoff_base: float,
        backoff_max: float,
        max_attempts: int | None,
        heartbeat: float | None,
        connect_timeout: float,
        ack_interval: float,
        max_message_size: int,
        max_buffered: int | None,
    ) -> None:
        self._url = _Url.parse(url)
        self._token = token
        self._token_provider = token_provider
        self.encoding: Encoding = encoding
        self._codec: Codec = codec_for(encoding)
        self._ssl_context = ssl_context
        self._backoff = (backoff_base, backoff_max)
        self._max_attempts = max_attempts
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._ack_interval = ack_interval
        self._max_message_size = max_message_size
        self._max_buffered = max_buffered
        self.welcome: Welcome | None = None
        self.reconnects = 0
        self.closed: RtcoreError | None = None
        self._ws: _WebSocket | None = None
        self._conn_scope: anyio.CancelScope | None = None
        self._connected = anyio.Event()
        self._ids = itertools.count(1)
        self._sent: dict[int, _Request] = {}  # by id, current connection only
        self._pending: dict[_Request, None] = {}  # commands and subs to (re)send, in order
        self._subs: dict[str, Subscription] = {}
        self._bye: Bye | None = None
        self._buffered = 0
        self._drained = anyio.Event()
        self._ack_wanted = anyio.Event()
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._reconnect_scope = anyio.CancelScope()
        self._stopped = anyio.Event()

    # --- public API -----------------------------------------------------------

    @property
    def positions(self) -> dict[str, Position]:
        """Per subscribed stream, the position of the last item the application pulled."""
        return {s: sub.position for s, sub in self._subs.items() if sub.position is not None}

    @property
    def connected(self) -> bool:
        """Whether a connection is up right now."""
        return self._ws is not None

    async def command(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        """Run a command and return its result.

        Args:
            name: The command name.
            args: Its arguments (anything the encoding can encode).
            key: Idempotency key; a fresh ``uuid4().hex`` by default. The same
                key is reused when the command is resent after a reconnect.
            timeout: Seconds to wait for the answer, across reconnects.

        Raises:
            RtcoreError: the server answered ``err`` (its code), no answer came
                in time (code ``timeout``), or the client closed.
        """
        self._check_open()
        raw = msgspec.Raw(self._codec.encode(args))
        key = key or uuid.uuid4().hex
        req = _Request("cmd", lambda rid: Cmd(rid, name, raw, key))
        return await self._call(req, timeout, f"command {name!r}")

    async def subscribe(self, stream: str, since: Position | None = None, *, timeout: float = 10.0) -> Subscription:  # noqa: ASYNC109
        """Subscribe to ``stream``.

        Args:
            stream: The stream name.
            since: Resume after this position (e.g. one saved from
                :attr:`positions`); ``None`` starts live, or from the
                principal's server-side cursor.
            timeout: Seconds to wait for ``subbed``.

        Raises:
            RtcoreError: the server refused (its code), or ``timeout``.
        """
        self._check_open()
        if stream in self._subs:
            raise RtcoreError(f"already subscribed to {stream!r}", code="already_subscribed")
        sub = Subscription(self, stream, since)
        self._subs[stream] = sub
        try:
            await self._call(self._sub_request(sub), timeout, f"subscribe {stream!r}")
        except BaseException:
            if self._subs.get(stream) is sub:
                del self._subs[stream]
            raise
        return sub

    async def aclose(self) -> None:
        """Flush acks, close the connection (1000) and end every subscription."""
        if self._closing:
            return
        self._closing = True
        if self._ws is not None:
            self._flush_acks(self._ws)
        # The connection's own task does the close handshake (it owns the socket).
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        self._reconnect_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._stopped.wait()
        self._shutdown(None)

    # --- internals: requests -----------------------------------------------------

    def _check_open(self) -> None:
        if self.closed is not None:
            raise self.closed
        if self._closing:
            raise RtcoreError("the client is closed", code="client_closed")

    def _sub_request(self, sub: Subscription) -> _Request:
        # `since` is read at send time: a resubscription resumes from the cursor.
        return _Request("sub", lambda rid: Sub(rid, sub.stream, sub.cursor.position), sub=sub)

    async def _call(self, req: _Request, timeout: float, what: str) -> Any:  # noqa: ASYNC109
        self._pending[req] = None
        if self._ws is not None:
            self._send_request(self._ws, req)
        try:
            with anyio.fail_after(timeout):
                await req.done.wait()
        except TimeoutError:
            raise RtcoreError(f"{what} got no answer within {timeout:g} s", code="timeout") from None
        finally:
            self._forget(req)
        if req.error is not None:
            raise req.error
        return req.result

    def _forget(self, req: _Request) -> None:
        self._pending.pop(req, None)
        if req.id is not None and self._sent.get(req.id) is req:
            del self._sent[req.id]
        req.id = None

    def _send_request(self, ws: _WebSocket, req: _Request) -> None:
        rid = next(self._ids)
        req.id = rid
        self._sent[rid] = req
        ws.send(self._codec.encode(req.make(rid)))

    async def _unsubscribe(self, sub: Subscription, timeout: float) -> None:  # noqa: ASYNC109
        if self._subs.get(sub.stream) is not sub:
            return
        del self._subs[sub.stream]
        for req in [r for r in self._pending if r.sub is sub]:
            self._forget(req)
            req.resolve(error=RtcoreError("unsubscribed", code="not_subscribed"))
        self._buffered -= len(sub._items)
        sub._items.clear()
        sub._end()
        self._resume_reading()
        if self._ws is not None and sub._live and self.closed is None:
            # Not resent after a reconnect: the new connection never subscribes.
            req = _Request("unsub", lambda rid: Unsub(rid, sub.stream))
            self._send_request(self._ws, req)
            try:
                with anyio.fail_after(timeout):
                    await req.done.wait()
            except TimeoutError:
                pass  # the connection is stuck; the next one will not subscribe anyway
            finally:
                self._forget(req)

    def _pulled(self, sub: Subscription) -> None:
        self._buffered -= 1
        self._resume_reading()
        self._ack_wanted.set()

    def _resume_reading(self) -> None:
        if self._max_buffered is None or self._buffered <= self._max_buffered // 2:
            self._drained.set()

    # --- internals: frames ----------------------------------------------------------

    def _on_frame(self, ws: _WebSocket, frame: Any) -> None:
        match frame:
            case Evt():
                self._on_evt(ws, frame)
            case Subbed():
                self._on_subbed(ws, frame)
            case Snap():
                sub = self._subs.get(frame.stream)
                if sub is not None:
                    sub.cursor.reset(frame.epoch, frame.offset)
                    sub._put(Missed(frame.stream, frame.epoch, frame.offset, frame.state, frame.checksum))
            case Ok() | Err() | Pong() if frame.id is not None and frame.id in self._sent:
                self._on_reply(ws, self._sent.pop(frame.id), frame)
            case Err(code="token_expired", id=None):
                if self._tg is not None:
                    self._tg.start_soon(self._refresh_token, ws)
            case Err():
                log.warning("rtcore server error %s: %s", frame.code, frame.message)
            case Bye():
                self._bye = frame
            case Sync() | Welcome() | Ok() | Pong():
                pass  # checksums are for folding clients; late replies were timed out

    def _on_evt(self, ws: _WebSocket, evt: Evt) -> None:
        sub = self._subs.get(evt.stream)
        if sub is None:
            return  # in flight when the application unsubscribed
        cur = sub.cursor
        if cur.epoch == evt.epoch and evt.offset > cur.offset + 1:
            # Only a broken connection loses frames: resume from what we have.
            log.warning("gap in %s (%d after %d): reconnecting", evt.stream, evt.offset, cur.offset)
            self._drop(ws)
            return
        if cur.accept(evt.epoch, evt.offset):
            sub._put(evt)

    def _on_subbed(self, ws: _WebSocket, frame: Subbed) -> None:
        req = self._sent.get(frame.id)
        if req is not None and req.kind == "sub" and req.sub is not None and req.sub.stream == frame.stream:
            del self._sent[frame.id]
            req.resolve(frame)
        sub = self._subs.get(frame.stream)
        if sub is None:
            return
        sub._live = True
        if not frame.recovered and not frame.snap:
            had_position = sub.cursor.epoch is not None
            sub.cursor.reset(frame.epoch, frame.offset)
            if had_position:
                sub._put(Missed(frame.stream, frame.epoch, frame.offset))

    def _on_reply(self, ws: _WebSocket, req: _Request, frame: Ok | Err | Pong) -> None:
        req.id = None
        if isinstance(frame, Err):
            error = RtcoreError(frame.message, code=frame.code, retryable=frame.retryable)
            if req.kind == "cmd" and frame.code == "idempotency_in_progress" and self._tg is not None:
                # The first attempt is still running on the server: ask again shortly.
                self._tg.start_soon(self._retry_later, ws, req)
                return
            if req.kind == "cmd" and frame.code == "shutdown":
                return  # the server is draining: stays pending, resent on the next connection
            if req.kind == "sub" and req.sub is not None and req not in self._pending:
                # A resubscription was refused (a first subscribe raises instead):
                # the subscription cannot continue.
                if self._subs.get(req.sub.stream) is req.sub:
                    del self._subs[req.sub.stream]
                req.sub._end(error)
            self._pending.pop(req, None)
            req.resolve(error=error)
            return
        self._pending.pop(req, None)
        req.resolve(frame.result if isinstance(frame, Ok) else frame)

    async def _retry_later(self, ws: _WebSocket, req: _Request) -> None:
        await anyio.sleep(backoff_delay(0, 0.2, 1.0))
        if req in self._pending and req.id is None and self._ws is ws:
            self._send_request(ws, req)

    async def _refresh_token(self, ws: _WebSocket) -> None:
        if self._token_provider is None:
            log.warning("token expired and no token_provider: the server will close the session")
            return
        token = await self._provide_token()
        if token is None or self._ws is not ws:
            return
        req = _Request("auth", lambda rid: Auth(rid, token))
        self._send_request(ws, req)
        with anyio.move_on_after(self._connect_timeout):
            await req.done.wait()
        self._forget(req)
        if req.error is not None:
            log.warning("token refresh refused: %s", req.error)

    async def _provide_token(self) -> str | None:
        assert self._token_provider is not None
        token = self._token_provider()
        if inspect.isawaitable(token):
            token = await token
        self._token = token
        return token

    # --- internals: connections -------------------------------------------------------

    async def _open(self) -> _WebSocket:
        """Connect, handshake, hello → welcome.

        Raises:
            OSError, TimeoutError, _Closed: retryable connection failures.
            _HandshakeRefused: HTTP error on upgrade.
            RtcoreError: hello refused.
        """
        with anyio.fail_after(self._connect_timeout):
            ws = await _WebSocket.open(
                self._url,
                encoding=self.encoding,
                ssl_context=self._ssl_context,
                max_message_size=self._max_message_size,
            )
            try:
                if self._token is None and self._token_provider is not None:
                    await self._provide_token()
                ws.send(self._codec.encode(Hello(token=self._token)))
                await ws.flush()
                while True:
                    frame = self._codec.decode_server(await ws.receive())
                    if isinstance(frame, Welcome):
                        self.welcome = frame
                        return ws
                    if isinstance(frame, Err):
                        raise RtcoreError(frame.message, code=frame.code, retryable=frame.retryable)
                    if isinstance(frame, Bye):
                        raise _Closed(1001 if frame.reconnect else 1008, frame.code)
            except BaseException:
                await ws.abort()
                raise

    async def _run(self, ws: _WebSocket | None) -> None:
        try:
            while ws is not None:
                await self._session(ws)
                if self._closing or self.closed is not None:
                    return
                bye, self._bye = self._bye, None
                if bye is not None and not bye.reconnect:
                    self._shutdown(RtcoreError(bye.message, code=bye.code))
                    return
                ws = None
                self._reconnect_scope = anyio.CancelScope()
                with self._reconnect_scope:
                    ws = await self._reconnect()
                if ws is not None:
                    self._attach(ws)
        finally:
            self._stopped.set()

    async def _reconnect(self) -> _WebSocket | None:
        attempt = 0
        while True:
            await anyio.sleep(backoff_delay(attempt, *self._backoff))
            try:
                ws = await self._open()
            except RtcoreError as exc:
                retry_auth = exc.code in ("unauthenticated", "token_expired") and self._token_provider is not None
                if not (exc.retryable or retry_auth):
                    self._shutdown(exc)
                    return None
                if retry_auth:
                    await self._provide_token()
                error: Exception = exc
            except _HandshakeRefused as exc:
                if exc.status < 500 and exc.status not in _RETRY_STATUSES:
                    self._shutdown(exc.error())
                    return None
                error = exc
            except (OSError, TimeoutError, _Closed, BadFrame, LocalProtocolError) as exc:
                error = exc
            else:
                self.reconnects += 1
                return ws
            attempt += 1
            log.info("reconnect attempt %d failed: %s", attempt, error)
            if self._max_attempts is not None and attempt >= self._max_attempts:
                self._shutdown(RtcoreError(f"gave up after {attempt} reconnect attempts: {error}", code="disconnected"))
                return None

    def _attach(self, ws: _WebSocket) -> None:
        """Make ``ws`` the current connection; queue the resubscriptions and resends.

        Synchronous, so nothing the application does can slip in between
        (a request made now is sent once, on this connection).
        """
        self._ws = ws
        self._conn_scope = anyio.CancelScope()  # may be cancelled before _session enters it
        self._sent.clear()
        # Resubscribe first (from the cursors), then resend unanswered
        # commands with their keys, in the order they were made.
        for req in self._pending:
            req.id = None
        for sub in self._subs.values():
            sub._live = False
            if not any(r.sub is sub for r in self._pending):
                self._send_request(ws, self._sub_request(sub))
        for req in list(self._pending):
            self._send_request(ws, req)

    async def _session(self, ws: _WebSocket) -> None:
        """Run one (attached) connection until it ends."""
        assert self._conn_scope is not None
        try:
            with self._conn_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guard, ws.write_loop)
                    tg.start_soon(self._guard, self._heartbeats, ws)
                    tg.start_soon(self._acks, ws)
                    await self._guard(self._reader, ws)
        finally:
            self._ws = None
            self._conn_scope = None
            self.welcome = None
            for req in self._pending:
                req.id = None
            self._sent.clear()
            with anyio.CancelScope(shield=True):
                if self._closing:
                    await ws.close(1000)
                else:
                    await ws.abort()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        # Any task of a connection ending ends the connection (and only it).
        try:
            await fn(*args)
        except (_Closed, BadFrame) as exc:
            log.info("connection ended: %s", exc)
        finally:
            if self._conn_scope is not None:
                self._conn_scope.cancel()

    def _drop(self, ws: _WebSocket) -> None:
        if self._ws is ws and self._conn_scope is not None:
            self._conn_scope.cancel()

    async def _reader(self, ws: _WebSocket) -> None:
        while True:
            data = await ws.receive()
            self._on_frame(ws, self._codec.decode_server(data))
            if self._max_buffered is not None and self._buffered > self._max_buffered:
                # The application is behind: stop reading so TCP pushes back.
                self._drained = anyio.Event()
                await self._drained.wait()

    async def _heartbeats(self, ws: _WebSocket) -> None:
        interval = self._heartbeat or (self.welcome.heartbeat if self.welcome else 15.0)
        while True:
            await anyio.sleep(interval)
            req = _Request("ping", PingFrame)
            self._send_request(ws, req)
            with anyio.move_on_after(interval):
                await req.done.wait()
            self._forget(req)
            if not req.done.is_set():
                raise _Closed(1006, f"no pong within {interval:g} s")

    async def _acks(self, ws: _WebSocket) -> None:
        while True:
            await self._ack_wanted.wait()
            await anyio.sleep(self._ack_interval)  # batch: one ack per stream per interval
            self._ack_wanted = anyio.Event()
            self._flush_acks(ws)

    def _flush_acks(self, ws: _WebSocket) -> None:
        for sub in self._subs.values():
            pos = sub.position
            # Only positions of the connection's current epoch, and only once
            # the server confirmed the subscription on this connection.
            if pos is None or not sub._live or pos.epoch != sub.cursor.epoch or pos == sub._acked:
                continue
            ws.send(self._codec.encode(Ack(sub.stream, pos.offset)))
            sub._acked = pos

    def _shutdown(self, error: RtcoreError | None) -> None:
        """Close for good: fail waiting requests, end subscriptions."""
        if error is not None and self.closed is None:
            self.closed = error
            log.warning("rtcore client closed: %s", error)
        reason = error or RtcoreError("the client is closed", code="client_closed")
        for req in list(self._pending):
            req.resolve(error=reason)
        self._pending.clear()
        for sub in self._subs.values():
            sub._end(error)
        self._drained.set()
        if self._conn_scope is not None:
            self._conn_scope.cancel()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    encoding: Encoding = "json",
    ssl_context: ssl.SSLContext | None = None,
    backoff_base: float = 0.1,
    backoff_max: float = 10.0,
    max_attempts: int | None = None,
    heartbeat: float | None = None,
    connect_timeout: float = 10.0,
    ack_interval: float = 0.05,
    max_message_size: int = 16 << 20,
    max_buffered: int | None = 10_000,
) -> AsyncIterator[Client]:
    """Connect to an rtcore server; the client reconnects until the block ends.

    Args:
        url: ``ws://host:port/v1/ws`` or ``wss://...``.
        token: Sent in every ``hello``.
        token_provider: Called (sync or async) for a fresh token when the
            server says ``token_expired`` or refuses a reconnect's token.
        encoding: ``"json"`` or ``"msgpack"`` (the WebSocket subprotocol).
        ssl_context: TLS settings for ``wss://`` (system defaults otherwise).
        backoff_base: First reconnect delay, seconds (doubles per attempt).
        backoff_max: Largest reconnect delay, seconds.
        max_attempts: Consecutive failed reconnects before giving up
            (``None``: never).
        heartbeat: Ping interval and pong timeout; the server's by default.
        connect_timeout: Seconds for TCP + TLS + upgrade + hello.
        ack_interval: Acks for pulled events are batched over this many seconds.
        max_message_size: Largest incoming message, bytes.
        max_buffered: Received but unpulled events (all subscriptions) above
            which the client stops reading the socket (``None``: no limit).
            While it is stopped, command replies are not read either.

    Raises:
        OSError: the first connection failed.
        RtcoreError: the server refused the first handshake or hello.
    """
    client = Client(
        url,
        token=token,
        token_provider=token_provider,
        encoding=encoding,
        ssl_context=ssl_context,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        max_attempts=max_attempts,
        heartbeat=heartbeat,
        connect_timeout=connect_timeout,
        ack_interval=ack_interval,
        max_message_size=max_message_size,
        max_buffered=max_buffered,
    )
    try:
        ws = await client._open()
    except _HandshakeRefused as exc:
        raise exc.error() from None
    async with anyio.create_task_group() as tg:
        client._tg = tg
        client._attach(ws)
        tg.start_soon(client._run, ws)
        try:
            yield client
        finally:
            await client.aclose()
            tg.cancel_scope.cancel()

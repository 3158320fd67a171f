"""The reconnecting network client: a driver of :class:`~rtcore.protocol.client.ClientSession`.

The session decides (positions, duplicates, gaps, notices, request resends,
acks); this module does the I/O around it: one WebSocket at a time, a reader
that feeds the session, a writer, heartbeats, a timer for the session's
deadlines, reconnects with backoff, token refresh, and per-subscription
queues the application iterates.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
from wsproto.utilities import LocalProtocolError

from ..errors import BadFrame, ConnectionClosed, RtcoreError, Unavailable, error_from_wire
from ..protocol.backoff import backoff_delay
from ..protocol.client import (
    DEFAULT_ACK_INTERVAL,
    Broken,
    ClientEvent,
    ClientSession,
    Connected,
    Missed,
    Refused,
    Replied,
    Request,
    RoomChanged,
    ServerError,
    SubscriptionEnded,
    TokenExpired,
)
from ..protocol.codec import Encoding
from ..protocol.frames import Bye, Evt, Msg, Position, Welcome
from ..protocol.streams import ClientCursor
from .messages import MessageClient
from .rooms import Room, RoomClient
from .websocket import HandshakeRefused, Url, WebSocket

__all__ = ["Client", "Subscription", "TokenProvider", "connect"]

log = logging.getLogger("rtcore.client")

#: Handshake statuses worth retrying: the server is busy or restarting, not refusing us.
_RETRY_STATUSES: Final = frozenset({408, 429})

#: ``token_provider`` of :func:`connect`: called (sync or async) for a token on every
#: connect and when the server says ``token_expired``; ``None`` means no token.
TokenProvider = Callable[[], str | Awaitable[str | None] | None]


class Subscription:
    """One stream subscription; iterate it for events (each exactly once, in order).

    Items are :class:`~rtcore.protocol.frames.Evt` frames and
    :class:`~rtcore.protocol.client.Missed` notices. Iteration ends after
    :meth:`unsubscribe` or when the client is closed by the application, and
    raises :class:`~rtcore.errors.RtcoreError` when the client was closed by an
    error (or the server refused a resubscription).

    Attributes:
        stream: The stream name.
        position: The position of the last item the application pulled.
    """

    def __init__(self, client: Client, stream: str, since: Position | None) -> None:
        self.stream = stream
        self.position: Position | None = since
        self._client = client
        self._items: deque[Evt | Missed] = deque()
        self._changed = anyio.Event()
        self._error: RtcoreError | None = None
        self._ended = False
        self._cursor = ClientCursor()

    @property
    def cursor(self) -> ClientCursor:
        """The position of the last item queued for the application (resumed from)."""
        return self._client._session.cursor(self.stream) or self._cursor

    @property
    def acked(self) -> Position | None:
        """The last position acked to the server for this stream."""
        return self._client._session.acked(self.stream)

    def __aiter__(self) -> AsyncIterator[Evt | Missed]:
        return self

    async def __anext__(self) -> Evt | Missed:
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            await self._changed.wait()
        item = self._items.popleft()
        self.position = Position(item.epoch, item.offset)
        self._client._pulled(self, item)
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


class Client(RoomClient, MessageClient):
    """A reconnecting rtcore client. Create it with :func:`connect`.

    Rooms: :meth:`join_or_create`, :meth:`create`, :meth:`join` return a
    :class:`~rtcore.client.rooms.Room` whose ``state`` follows the server's.

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
        ack_interval: float | None,
        max_message_size: int,
        max_buffered: int | None,
    ) -> None:
        self._url = Url.parse(url)
        self._token = token
        self._token_provider = token_provider
        self.encoding: Encoding = encoding
        self._session = ClientSession(encoding=encoding, ack_interval=ack_interval)
        self._ssl_context = ssl_context
        self._backoff = (backoff_base, backoff_max)
        self._max_attempts = max_attempts
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._max_message_size = max_message_size
        self._max_buffered = max_buffered
        self.welcome: Welcome | None = None
        self.reconnects = 0
        self.closed: RtcoreError | None = None
        self._ws: WebSocket | None = None
        self._conn_scope: anyio.CancelScope | None = None
        self._subs: dict[str, Subscription] = {}
        self._rooms: dict[str, Room] = {}
        self._message_callbacks = []
        self._waits: dict[Request, anyio.Event] = {}
        self._bye: Bye | None = None
        self._buffered = 0
        self._drained = anyio.Event()
        self._timer_wake = anyio.Event()
        self._timer_at: float | None = None
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._reconnect_scope = anyio.CancelScope()
        self._stopped = anyio.Event()

    # --- public API -----------------------------------------------------------

    @property
    def session(self) -> ClientSession:
        """The protocol state machine this client drives."""
        return self._session

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
            RtcoreError: the server answered ``err`` (as the class owning its
                code, e.g. :class:`~rtcore.errors.IdempotencyError`), no answer
                came in time (code ``timeout``), or the client closed.
        """
        self._check_open()
        req = self._session.command(name, args, key=key)
        return await self._call(req, timeout, f"command {name!r}")

    async def subscribe(
        self,
        stream: str,
        since: Position | None = None,
        *,
        cursor: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Subscription:
        """Subscribe to ``stream``.

        Args:
            stream: The stream name.
            since: Resume after this position (e.g. one saved from
                :attr:`positions`); ``None``: the stream's current state (a
                :class:`~rtcore.protocol.client.Missed` with the snapshot on a
                stateful stream, live from the head otherwise).
            cursor: Without ``since``, resume from the principal's server-side
                cursor (its acks on any device) instead of the current state.
            timeout: Seconds to wait for ``subbed``.

        Raises:
            RtcoreError: the server refused (the class owning its code), or
                ``timeout``.
        """
        self._check_open()
        req = self._session.subscribe(stream, since, cursor=cursor)
        sub = Subscription(self, stream, since)
        self._subs[stream] = sub
        try:
            await self._call(req, timeout, f"subscribe {stream!r}")
        except BaseException:
            if self._subs.get(stream) is sub:
                del self._subs[stream]
                self._session.unsubscribe(stream)
                self._dispatch(self._session.events())
            raise
        return sub

    async def aclose(self) -> None:
        """Flush acks, close the connection (1000) and end every subscription."""
        if self._closing:
            return
        self._closing = True
        if self._ws is not None:
            self._session.flush_acks()
            self._flush()
        # The connection's own task does the close handshake (it owns the socket).
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        self._reconnect_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._stopped.wait()
        self._shutdown(None)

    # --- internals: requests and events -------------------------------------------

    async def _await_requests(self, requests: list[Request], timeout: float, *, check: bool = True) -> None:  # noqa: ASYNC109
        for req in requests:
            try:
                await self._call(req, timeout, f"{req.kind} {req.stream!r}")
            except RtcoreError:
                if check:
                    raise

    def _check_open(self) -> None:
        if self.closed is not None:
            raise self.closed
        if self._closing:
            raise ConnectionClosed(1000, "the client is closed", code="client_closed")

    async def _call(self, req: Request, timeout: float, what: str) -> Any:  # noqa: ASYNC109
        done = self._waits[req] = anyio.Event()
        self._flush()
        try:
            if not req.done:
                with anyio.fail_after(timeout):
                    await done.wait()
        except TimeoutError:
            raise Unavailable(f"{what} got no answer within {timeout:g} s", code="timeout") from None
        finally:
            self._waits.pop(req, None)
            if not req.done:
                self._session.forget(req)
        if req.error is not None:
            raise req.error
        return req.result

    def _flush(self) -> None:
        ws = self._ws
        if ws is None:
            return  # the session keeps nothing for a dead connection; the next one resends
        for payload in self._session.data_to_send():
            ws.send(payload)

    def _dispatch(self, events: list[ClientEvent]) -> None:
        for ev in events:
            match ev:
                case Evt() | Missed():
                    sub = self._subs.get(ev.stream)
                    if sub is not None:
                        sub._put(ev)
                case RoomChanged():
                    self._room_changed(ev)
                case Msg():
                    self._message(ev)
                case Replied(request=req):
                    done = self._waits.get(req)
                    if done is not None:
                        done.set()
                case SubscriptionEnded(stream=stream, error=error):
                    sub = self._subs.pop(stream, None)
                    if sub is not None:
                        self._buffered -= len(sub._items)
                        sub._end(error)
                case Broken(reason=reason):
                    log.warning("%s: reconnecting", reason)
                    if self._conn_scope is not None:
                        self._conn_scope.cancel()
                case TokenExpired():
                    if self._tg is not None and self._ws is not None:
                        self._tg.start_soon(self._refresh_token, self._ws)
                case ServerError(error=error):
                    log.warning("rtcore server error %s: %s", error.code, error)
                case Bye():
                    self._bye = ev
                case _:
                    pass  # Connected/Refused are handled by _open; syncs are for folding clients

    async def _unsubscribe(self, sub: Subscription, timeout: float) -> None:  # noqa: ASYNC109
        if self._subs.get(sub.stream) is not sub:
            return
        del self._subs[sub.stream]
        self._buffered -= len(sub._items)
        sub._items.clear()
        sub._end()
        self._resume_reading()
        req = self._session.unsubscribe(sub.stream)
        self._dispatch(self._session.events())
        if req is None or self.closed is not None:
            return
        done = self._waits[req] = anyio.Event()
        self._flush()
        # An error or no answer is fine: the next connection will not subscribe anyway.
        with anyio.move_on_after(timeout):
            await done.wait()
        self._waits.pop(req, None)
        self._session.forget(req)

    def _pulled(self, sub: Subscription, item: Evt | Missed) -> None:
        self._buffered -= 1
        self._resume_reading()
        self._session.consumed(sub.stream, item.epoch, item.offset, anyio.current_time())
        self._timer_wake.set()

    def _resume_reading(self) -> None:
        if self._max_buffered is None or self._buffered <= self._max_buffered // 2:
            self._drained.set()

    async def _refresh_token(self, ws: WebSocket) -> None:
        if self._token_provider is None:
            log.warning("token expired and no token_provider: the server will close the session")
            return
        token = await self._provide_token()
        if token is None or self._ws is not ws:
            return
        req = self._session.auth(token)
        done = self._waits[req] = anyio.Event()
        self._flush()
        with anyio.move_on_after(self._connect_timeout):
            await done.wait()
        self._waits.pop(req, None)
        self._session.forget(req)
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

    async def _open(self) -> WebSocket:
        """Connect, handshake, hello → welcome (the session queues resubscriptions).

        Raises:
            OSError, TimeoutError, ConnectionClosed: retryable connection failures.
            HandshakeRefused: HTTP error on upgrade.
            RtcoreError: hello refused (the class owning the code).
        """
        with anyio.fail_after(self._connect_timeout):
            ws = await WebSocket.open(
                self._url,
                encoding=self.encoding,
                ssl_context=self._ssl_context,
                max_message_size=self._max_message_size,
            )
            try:
                if self._token is None and self._token_provider is not None:
                    await self._provide_token()
                self._session.start(self._token)
                for payload in self._session.data_to_send():
                    ws.send(payload)
                await ws.flush()
                while True:
                    events = self._session.receive_data(await ws.receive(), anyio.current_time())
                    for ev in events:
                        if isinstance(ev, Connected):
                            self.welcome = ev.welcome
                        elif isinstance(ev, Refused):
                            raise ev.error
                    self._dispatch(events)
                    if self.welcome is not None:
                        return ws
            except BaseException:
                self._dispatch(self._session.disconnected(ws.close_code or 1006, ws.close_reason))
                self.welcome = None
                await ws.abort()
                raise

    async def _run(self, ws: WebSocket | None) -> None:
        try:
            while ws is not None:
                await self._connection(ws)
                if self._closing or self.closed is not None:
                    return
                bye, self._bye = self._bye, None
                if bye is not None and not bye.reconnect:
                    self._shutdown(error_from_wire(bye.code, bye.message))
                    return
                ws = None
                self._reconnect_scope = anyio.CancelScope()
                with self._reconnect_scope:
                    ws = await self._reconnect()
                if ws is not None:
                    self._attach(ws)
        finally:
            self._stopped.set()

    async def _reconnect(self) -> WebSocket | None:
        attempt = 0
        while True:
            await anyio.sleep(backoff_delay(attempt, *self._backoff))
            try:
                ws = await self._open()
            except ConnectionClosed as exc:  # before RtcoreError: a subclass, and retryable
                error: Exception = exc
            except RtcoreError as exc:
                retry_auth = exc.code in ("unauthenticated", "token_expired") and self._token_provider is not None
                if not (exc.retryable or retry_auth):
                    self._shutdown(exc)
                    return None
                if retry_auth:
                    await self._provide_token()
                error = exc
            except HandshakeRefused as exc:
                if exc.status < 500 and exc.status not in _RETRY_STATUSES:
                    self._shutdown(exc.error())
                    return None
                error = exc
            except (OSError, TimeoutError, BadFrame, LocalProtocolError) as exc:
                error = exc
            else:
                self.reconnects += 1
                return ws
            attempt += 1
            log.info("reconnect attempt %d failed: %s", attempt, error)
            if self._max_attempts is not None and attempt >= self._max_attempts:
                self._shutdown(ConnectionClosed(1006, f"gave up after {attempt} reconnect attempts: {error}", code="disconnected"))
                return None

    def _attach(self, ws: WebSocket) -> None:
        """Make ``ws`` the current connection and send what the session queued.

        Synchronous, so nothing the application does can slip in between
        (a request made now is sent once, on this connection).
        """
        self._ws = ws
        self._conn_scope = anyio.CancelScope()  # may be cancelled before _connection enters it
        self._flush()

    async def _connection(self, ws: WebSocket) -> None:
        """Run one (attached) connection until it ends."""
        assert self._conn_scope is not None
        try:
            with self._conn_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guard, ws.write_loop)
                    tg.start_soon(self._guard, self._heartbeats, ws)
                    tg.start_soon(self._timer)
                    await self._guard(self._reader, ws)
        finally:
            self._ws = None
            self._conn_scope = None
            self.welcome = None
            self._dispatch(self._session.disconnected(ws.close_code or 1006, ws.close_reason))
            with anyio.CancelScope(shield=True):
                if self._closing:
                    await ws.close(1000)
                else:
                    await ws.abort()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        # Any task of a connection ending ends the connection (and only it).
        try:
            await fn(*args)
        except (ConnectionClosed, BadFrame) as exc:
            log.info("connection ended: %s", exc)
        finally:
            if self._conn_scope is not None:
                self._conn_scope.cancel()

    async def _reader(self, ws: WebSocket) -> None:
        while True:
            data = await ws.receive()
            self._dispatch(self._session.receive_data(data, anyio.current_time()))
            self._flush()
            deadline = self._session.next_deadline()
            if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
                self._timer_wake.set()  # e.g. a command retry was scheduled
            if self._max_buffered is not None and self._buffered > self._max_buffered:
                # The application is behind: stop reading so TCP pushes back.
                self._drained = anyio.Event()
                await self._drained.wait()

    async def _timer(self) -> None:
        """Run the session's deadlines: batched acks, ``idempotency_in_progress`` retries."""
        while True:
            deadline = self._timer_at = self._session.next_deadline()
            wake = self._timer_wake
            if deadline is None:
                await wake.wait()
            else:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await wake.wait()
            if wake.is_set():
                self._timer_wake = anyio.Event()
            self._session.tick(anyio.current_time())
            self._flush()

    async def _heartbeats(self, ws: WebSocket) -> None:
        interval = self._heartbeat or (self.welcome.heartbeat if self.welcome else 15.0)
        while True:
            await anyio.sleep(interval)
            req = self._session.ping()
            done = self._waits[req] = anyio.Event()
            self._flush()
            if not req.done:
                with anyio.move_on_after(interval):
                    await done.wait()
            self._waits.pop(req, None)
            self._session.forget(req)
            if not req.done:
                raise ConnectionClosed(1006, f"no pong within {interval:g} s")

    def _shutdown(self, error: RtcoreError | None) -> None:
        """Close for good: fail waiting requests, end subscriptions."""
        if error is not None and self.closed is None:
            self.closed = error
            log.warning("rtcore client closed: %s", error)
        self._dispatch(self._session.close(error))
        for sub in self._subs.values():
            sub._end(error)
        for room in self._rooms.values():
            room._end()
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
    ack_interval: float | None = DEFAULT_ACK_INTERVAL,
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
        ack_interval: Acks for pulled items are batched over this many
            seconds; ``None`` turns automatic acks off.
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
    except HandshakeRefused as exc:
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

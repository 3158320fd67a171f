"""Test helpers, public API: an in-process client, faults, a fake clock.

Everything here talks to a real :class:`~rtcore.engine.node.Node` through the same
:func:`~rtcore.server.gateway.serve_session` driver the WebSocket server uses, over
an in-memory message transport that still encodes and decodes every frame.
No sockets, so tests are fast and deterministic, but nothing is mocked
between the frame bytes and the application.

Example::

    async with rtcore.testing.connect(app, token="alice") as client:
        await client.subscribe("room:1")
        await client.command("room.move", {"x": 1})
        evt = await client.next_event("room:1")
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..client.messages import MessageClient
from ..client.rooms import Room, RoomClient
from ..engine.app import App
from ..engine.node import Node
from ..errors import BadRequest, RtcoreError
from ..protocol.client import (
    DEFAULT_ACK_INTERVAL,
    Broken,
    ClientEvent,
    ClientSession,
    ClientState,
    Connected,
    Missed,
    Refused,
    Request,
    RoomChanged,
)
from ..protocol.codec import codec_for
from ..protocol.frames import Bye, Err, Evt, Msg, Ok, Pong, Position, Subbed, Sync, Welcome
from ..protocol.streams import ClientCursor
from ..server.gateway import ConnectionClosed, FrameTransport, serve_session

__all__ = [
    "TestClient",
    "FakeClock",
    "Faults",
    "FaultyTransport",
    "MemoryTransport",
    "connect",
    "memory_pipe",
    "serve",
]



class FakeClock:
    """A clock that only moves when told to.

    Pass it as ``Node(clock=...)`` (or to :func:`serve`); :meth:`advance`
    wakes the node's session timers so idle and expiry deadlines fire.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.nodes: list[Node] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake timers."""
        self.now += seconds
        for node in self.nodes:
            node.wake_timers()


class MemoryTransport:
    """One end of an in-memory message pipe (implements :class:`FrameTransport`)."""

    def __init__(
        self,
        encoding: str,
        send: MemoryObjectSendStream[Any],
        recv: MemoryObjectReceiveStream[Any],
    ) -> None:
        self.encoding = encoding
        self._send = send
        self._recv = recv
        self.close_code: int | None = None
        self.close_reason = ""

    async def receive(self) -> bytes | str:
        try:
            item = await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(self.close_code or 1006, self.close_reason) from None
        if isinstance(item, tuple):  # a close frame
            self.close_code, self.close_reason = item[1], item[2]
            raise ConnectionClosed(item[1], item[2])
        return item  # type: ignore[no-any-return]

    async def send(self, frames: list[bytes]) -> None:
        text = self.encoding == "json"
        try:
            for f in frames:
                await self._send.send(f.decode() if text else f)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(1006, "peer gone") from None

    async def close(self, code: int, reason: str = "") -> None:
        self.close_code, self.close_reason = code, reason
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send(("close", code, reason))
        await self._send.aclose()

    def abort(self) -> None:
        """Drop the connection without a close frame (both directions)."""
        self._send.close()
        self._recv.close()


def memory_pipe(encoding: str = "json") -> tuple[MemoryTransport, MemoryTransport]:
    """A connected (client, server) pair of in-memory transports."""
    c2s_send, c2s_recv = anyio.create_memory_object_stream[Any](math.inf)
    s2c_send, s2c_recv = anyio.create_memory_object_stream[Any](math.inf)
    return MemoryTransport(encoding, c2s_send, s2c_recv), MemoryTransport(encoding, s2c_send, c2s_recv)


class Faults(msgspec.Struct):
    """Faults to inject on server → client frames of one connection.

    Attributes:
        cut_after: Break the connection (no close frame) after this many frames.
        drop: Indexes (0-based, counted over server frames) to drop silently.
        duplicate: Indexes to send twice.
        delay: Seconds to wait before each send.
        connections: Inject into the first this-many connections of the client
            only (``None``: every connection). Indexes count per connection, so
            without a bound a fault that is a gap repeats after each reconnect.
    """

    cut_after: int | None = None
    drop: frozenset[int] = frozenset()
    duplicate: frozenset[int] = frozenset()
    delay: float = 0.0
    connections: int | None = None


class FaultyTransport:
    """Wraps a server-side transport and injects :class:`Faults`."""

    def __init__(self, inner: MemoryTransport, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.encoding = inner.encoding
        self.sent = 0

    async def receive(self) -> bytes | str:
        return await self.inner.receive()

    async def send(self, frames: list[bytes]) -> None:
        f = self.faults
        out: list[bytes] = []
        for frame in frames:
            i = self.sent
            self.sent += 1
            if f.cut_after is not None and i >= f.cut_after:
                if out:
                    await self.inner.send(out)
                self.inner.abort()
                raise ConnectionClosed(1006, "cut by fault injection")
            if i in f.drop:
                continue
            out.append(frame)
            if i in f.duplicate:
                out.append(frame)
        if f.delay:
            await anyio.sleep(f.delay)
        if out:
            await self.inner.send(out)

    async def close(self, code: int, reason: str = "") -> None:
        await self.inner.close(code, reason)


class _Recording:
    """Records what the server sends (before any fault injection)."""

    def __init__(self, inner: FrameTransport, sent: list[bytes]) -> None:
        self.inner = inner
        self.sent = sent
        self.encoding = inner.encoding

    async def receive(self) -> bytes | str:
        return await self.inner.receive()

    async def send(self, frames: list[bytes]) -> None:
        self.sent.extend(frames)
        await self.inner.send(frames)

    async def close(self, code: int, reason: str = "") -> None:
        await self.inner.close(code, reason)


class TestClient(RoomClient, MessageClient):
    """An in-process protocol client: a thin driver of :class:`~rtcore.protocol.client.ClientSession`.

    The same session as :mod:`rtcore.client` decides everything (positions,
    duplicate drop, gap → reconnect, ``Missed`` notices, keyed command resend,
    resubscription from positions, acks), so an application behaves the same
    in-process and over the network. Acks follow the session's policy: what
    the test *consumed* with :meth:`next_event` is acked cumulatively, batched
    over ``ack_interval`` seconds (``None``: only explicit :meth:`ack`).
    Rooms (:meth:`join_or_create`, :meth:`create`, :meth:`join`) are the same
    :class:`~rtcore.client.rooms.Room` as in :mod:`rtcore.client`.

    Attributes:
        session: The protocol state machine this client drives.
        seen: Per stream, every new event handed to the application, in order.
        notices: Every :class:`~rtcore.protocol.client.Missed` notice, in order.
        timeline: Events and notices of all streams, in the order the session
            handed them out (what an application's fold would process).
        syncs: Every ``sync`` frame for a subscribed stream.
        frames: Every frame received, as it came (duplicates included).
        wire: Per connection, every message the server sent, before fault
            injection (to check the server, not the client's dedup).
    """

    __test__ = False  # not a pytest test class, though its name starts with Test

    def __init__(
        self,
        node: Node,
        *,
        token: str | None,
        encoding: str,
        faults: Faults | None,
        ack_interval: float | None = DEFAULT_ACK_INTERVAL,
    ) -> None:
        self.node = node
        self.token = token
        self.encoding = encoding
        self.codec = codec_for(encoding)
        self.faults = faults
        self.session = ClientSession(encoding=encoding, ack_interval=ack_interval)
        self.seen: dict[str, list[Evt]] = defaultdict(list)
        self.notices: list[Missed] = []
        self.timeline: list[Evt | Missed] = []
        self.syncs: list[Sync] = []
        #: Direct messages (``msg`` frames) not routed to a followed room, in arrival order.
        self.messages: list[Msg] = []
        self.frames: list[Any] = []
        self.welcome: Welcome | None = None
        self.bye: Bye | None = None
        self.closed: ConnectionClosed | None = None
        self._refused: RtcoreError | None = None
        self._events: dict[str | None, list[Evt]] = defaultdict(list)
        self._frame_queue: list[Any] = []
        self._changed = anyio.Event()
        self._transport: MemoryTransport | None = None
        self._tg: Any = None
        self._reconnect_lock = anyio.Lock()
        self._rooms: dict[str, Room] = {}
        self._message_callbacks = []
        #: Per connection, every message the server sent, before fault injection.
        self.wire: list[list[bytes]] = []

    @property
    def cursors(self) -> dict[str, ClientCursor]:
        """Per subscribed stream, the position of the last event handed out."""
        out: dict[str, ClientCursor] = {}
        for stream in self.session.streams:
            cur = self.session.cursor(stream)
            if cur is not None:
                out[stream] = cur
        return out

    # --- connection ------------------------------------------------------------

    async def _open(self, tg: Any) -> None:
        client_t, server_t = memory_pipe(self.encoding)
        f = self.faults
        faulty = f is not None and (f.connections is None or len(self.wire) < f.connections)
        inner: FrameTransport = FaultyTransport(server_t, f) if f is not None and faulty else server_t
        sent: list[bytes] = []
        self.wire.append(sent)
        srv = _Recording(inner, sent)
        self._transport = client_t
        self.closed = None
        self.bye = None
        self.welcome = None
        self._refused = None
        tg.start_soon(self._serve, srv, server_t)
        tg.start_soon(self._read, client_t)
        self.session.start(self.token)
        await self._flush()
        with anyio.fail_after(5):
            while self.welcome is None and self._refused is None:
                if self.closed is not None:
                    raise self.closed
                await self._changed.wait()
        if self._refused is not None:
            error, self._refused = self._refused, None
            raise error

    async def _serve(self, transport: Any, server_t: MemoryTransport) -> None:
        try:
            with contextlib.suppress(ConnectionClosed):
                await serve_session(self.node, transport)
        finally:
            server_t.abort()

    async def _read(self, t: MemoryTransport) -> None:
        try:
            while True:
                frame = self.codec.decode_server(await t.receive())
                if t is not self._transport:
                    return
                self._on_frame(frame)
                await self._flush()
        except ConnectionClosed as exc:
            if t is self._transport:
                self.closed = exc
                self._dispatch(self.session.disconnected(exc.close_code, exc.reason))
                self._notify()
        finally:
            t.abort()

    async def _timer(self) -> None:
        """Run the session's deadlines (batched acks, command retries)."""
        while True:
            deadline = self.session.next_deadline()
            wake = self._changed
            if deadline is None:
                await wake.wait()
            else:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await wake.wait()
            self.session.tick(anyio.current_time())
            await self._flush()

    def _notify(self) -> None:
        ev, self._changed = self._changed, anyio.Event()
        ev.set()

    def _on_frame(self, frame: Any) -> None:
        self.frames.append(frame)
        self._frame_queue.append(frame)
        self._dispatch(self.session.receive_frame(frame, anyio.current_time()))
        self._notify()

    def _dispatch(self, events: list[ClientEvent]) -> None:
        for ev in events:
            match ev:
                case Evt():
                    self.seen[ev.stream].append(ev)
                    self.timeline.append(ev)
                    self._events[ev.stream].append(ev)
                    self._events[None].append(ev)
                case Missed():
                    self.notices.append(ev)
                    self.timeline.append(ev)
                case Sync():
                    self.syncs.append(ev)
                case Bye():
                    self.bye = ev
                case Connected(welcome=welcome):
                    self.welcome = welcome
                case Refused(error=error):
                    self._refused = error
                case RoomChanged():
                    self._room_changed(ev)
                case Msg():
                    self.messages.append(ev)
                    self._message(ev)
                case Broken():
                    # A gap can only come from a broken transport: resume from the positions.
                    if self._tg is not None:
                        self._tg.start_soon(self._reconnect_after_gap)
                case _:
                    pass  # Replied / SubscriptionEnded / TokenExpired / ServerError: read via frames

    async def _flush(self) -> None:
        data = self.session.data_to_send()
        if data and self._transport is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._transport.send(data)

    async def send_raw(self, data: bytes | str) -> None:
        """Send arbitrary bytes as one message (for malformed-frame tests)."""
        assert self._transport is not None
        if isinstance(data, bytes) and self.encoding == "json":
            await self._transport._send.send(data.decode(errors="replace"))
        else:
            await self._transport._send.send(data)

    async def _wait(self, req: Request, timeout: float) -> Request:
        await self._flush()
        try:
            with anyio.fail_after(timeout):
                while not req.done:
                    await self._changed.wait()
        except TimeoutError:
            self.session.forget(req)
            raise
        return req

    async def _await_requests(self, requests: list[Request], timeout: float, *, check: bool = True) -> None:
        for req in requests:
            try:
                await self._wait(req, timeout)
            except TimeoutError:
                if check:
                    raise
                continue
            if req.error is not None and check:
                raise req.error

    async def _request(self, frame_factory: Any, timeout: float) -> Any:
        """Send a request frame built by ``frame_factory(id)``; return the raw reply frame."""
        req = await self._wait(self.session.request(frame_factory), timeout)
        if req.error is not None:
            raise req.error
        return req.reply

    # --- public API ------------------------------------------------------------

    async def subscribe(
        self, stream: str, since: Position | None = None, *, cursor: bool = False, timeout: float = 5.0
    ) -> Subbed:
        """Subscribe to ``stream``.

        Args:
            stream: The stream name.
            since: Resume after this position; ``None``: the stream's current
                state (a snapshot on a stateful stream).
            cursor: Without ``since``: resume from the principal's server-side
                cursor instead (``sub.cursor``).
            timeout: Seconds to wait for ``subbed``.

        Raises:
            RtcoreError: the server answered ``err`` (the class owning its code).
        """
        req = self.session.subscribe(stream, since, cursor=cursor)
        try:
            await self._wait(req, timeout)
        except TimeoutError:
            self.session.unsubscribe(stream)
            raise
        if req.error is not None:
            raise req.error
        assert isinstance(req.result, Subbed)
        return req.result

    async def unsubscribe(self, stream: str, *, timeout: float = 5.0) -> None:
        """Unsubscribe from ``stream``."""
        req = self.session.unsubscribe(stream)
        if req is not None:
            await self._wait(req, timeout)
            if req.error is not None:
                raise req.error

    async def command_reply(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 5.0) -> Ok | Err:
        """Send a command and return the raw ``ok``/``err`` frame (no retry of
        ``idempotency_in_progress`` or ``shutdown``: protocol tests see them)."""
        req = await self._wait(self.session.command(name, args, key=key, retry=False), timeout)
        if not isinstance(req.reply, Ok | Err):
            assert req.error is not None
            raise req.error
        return req.reply

    async def command(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 5.0) -> Any:
        """Send a command (idempotency key generated unless given) and return its result.

        Raises:
            RtcoreError: the server answered ``err``, as the class owning its
                code (e.g. :class:`~rtcore.errors.IdempotencyError`).
        """
        req = await self._wait(self.session.command(name, args, key=key), timeout)
        if req.error is not None:
            raise req.error
        return req.result

    async def ping(self, *, timeout: float = 5.0) -> Pong:
        """Round-trip a ``ping``."""
        req = await self._wait(self.session.ping(), timeout)
        if req.error is not None:
            raise req.error
        assert isinstance(req.result, Pong)
        return req.result

    async def ack(self, stream: str, offset: int | None = None) -> None:
        """Acknowledge ``stream`` up to ``offset`` now (default: everything seen)."""
        if offset is None:
            cur = self.session.cursor(stream)
            if cur is None:
                raise BadRequest(f"not subscribed to {stream!r}", code="not_subscribed")
            offset = cur.offset
        self.session.ack(stream, offset)
        await self._flush()

    async def next_event(self, stream: str | None = None, *, timeout: float = 5.0) -> Evt:
        """Wait for the next new (deduplicated) event, of ``stream`` or any.

        Taking it counts as the application consuming it: the session acks it
        (batched) like :mod:`rtcore.client` acks what its iterators yield.
        """
        q = self._events[stream]
        with anyio.fail_after(timeout):
            while not q:
                await self._changed.wait()
        ev = q.pop(0)
        if stream is not None and ev in self._events[None]:
            self._events[None].remove(ev)
        elif stream is None:
            self._events[ev.stream].remove(ev)
        self.session.consumed(ev.stream, ev.epoch, ev.offset, anyio.current_time())
        self._notify()  # the timer re-reads the deadline
        return ev

    async def next_frame(self, *, timeout: float = 5.0, types: tuple[type, ...] | None = None) -> Any:
        """Wait for the next frame from the server (optionally of ``types``)."""
        with anyio.fail_after(timeout):
            while True:
                for i, f in enumerate(self._frame_queue):
                    if types is None or isinstance(f, types):
                        del self._frame_queue[i]
                        return f
                if self.closed is not None and not self._frame_queue:
                    raise self.closed
                await self._changed.wait()

    async def wait_closed(self, *, timeout: float = 5.0) -> ConnectionClosed:
        """Wait until the server closes the connection; return the close."""
        with anyio.fail_after(timeout):
            while self.closed is None:
                await self._changed.wait()
        return self.closed

    async def disconnect(self) -> None:
        """Drop the connection abruptly (no close handshake)."""
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
            self._dispatch(self.session.disconnected(1006, "disconnected by the test"))
            self._notify()
        await anyio.lowlevel.checkpoint()

    async def reconnect(self, *, wait: bool = True) -> None:
        """Drop the connection and come back: hello, then the session resubscribes
        every stream from its position and resends unanswered commands (same keys).

        Args:
            wait: Return only once every stream is subscribed again (or the
                new connection ended); ``False``: return after ``welcome``.

        A reconnect already under way (after a gap) is waited for instead of
        starting a second one.
        """
        async with self._reconnect_lock:
            await self.disconnect()
            self._frame_queue.clear()
            assert self._tg is not None
            await self._open(self._tg)
        if wait:
            with anyio.fail_after(5):
                while not all(self.session.live(s) for s in self.session.streams):
                    if self.closed is not None:
                        return
                    await self._changed.wait()

    async def _reconnect_after_gap(self) -> None:
        async with self._reconnect_lock:
            if self.session.state is not ClientState.BROKEN or self._tg is None:
                return  # someone reconnected meanwhile, or the client is closing
            await self.disconnect()
            self._frame_queue.clear()
            await self._open(self._tg)

    async def _close(self) -> None:
        """Send due acks (what the test consumed), then drop the connection."""
        self.session.flush_acks()
        await self._flush()
        await self.disconnect()


@contextlib.asynccontextmanager
async def serve(app: App, backend: Any = "memory://", **node_options: Any) -> AsyncIterator[Node]:
    """Run ``app`` on a node for the duration of the block.

    Clients made with :func:`connect` inside it share the node.
    """
    clock = node_options.get("clock")
    async with Node(app, backend, **node_options) as node:
        if isinstance(clock, FakeClock):
            clock.nodes.append(node)
        serving = _serving.setdefault(app, [])
        serving.append(node)
        try:
            yield node
        finally:
            serving.remove(node)
            if isinstance(clock, FakeClock):
                clock.nodes.remove(node)


# The nodes :func:`serve` runs, per app, so that ``connect(app)`` inside a
# ``serve(app)`` block joins that node (an App is a declaration and does not
# know the nodes running it).
_serving: weakref.WeakKeyDictionary[App, list[Node]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def connect(
    target: App | Node,
    token: str | None = None,
    *,
    encoding: str = "json",
    faults: Faults | None = None,
    ack_interval: float | None = DEFAULT_ACK_INTERVAL,
) -> AsyncIterator[TestClient]:
    """Connect an in-process client.

    Args:
        target: A running :class:`Node`, or an :class:`App` (the node of the
            enclosing :func:`serve` block of that app is used; without one, a
            node on ``memory://`` runs for this block).
        token: Sent in ``hello``.
        encoding: ``"json"`` or ``"msgpack"``.
        faults: Faults to inject on this connection's server frames.
        ack_interval: Acks for consumed events are batched over this many
            seconds, as in :func:`rtcore.client.connect`; ``None``: only
            explicit :meth:`TestClient.ack`.

    Raises:
        RtcoreError: the server refused the hello (e.g. ``unauthenticated``).
    """
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(target, Node):
            node = target
        elif _serving.get(target):
            node = _serving[target][-1]
        else:
            node = await stack.enter_async_context(serve(target))
        client = TestClient(node, token=token, encoding=encoding, faults=faults, ack_interval=ack_interval)
        refused: RtcoreError | None = None
        async with anyio.create_task_group() as tg:
            client._tg = tg
            try:
                await client._open(tg)
            except RtcoreError as exc:
                refused = exc
                tg.cancel_scope.cancel()
            else:
                tg.start_soon(client._timer)
                try:
                    yield client
                finally:
                    client._tg = None
                    await client._close()
                    tg.cancel_scope.cancel()
        if refused is not None:
            raise refused

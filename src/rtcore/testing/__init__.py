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
import itertools
import math
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..engine.app import App
from ..engine.node import Node
from ..errors import RtcoreError
from ..protocol.codec import codec_for
from ..protocol.frames import (
    Ack,
    Bye,
    Cmd,
    Err,
    Evt,
    Hello,
    Ok,
    Ping,
    Pong,
    Position,
    Snap,
    Sub,
    Subbed,
    Sync,
    Unsub,
    Welcome,
)
from ..protocol.streams import ClientCursor
from ..server.gateway import ConnectionClosed, FrameTransport, serve_session

__all__ = [
    "Client",
    "FakeClock",
    "Faults",
    "FaultyTransport",
    "MemoryTransport",
    "connect",
    "memory_pipe",
    "serve",
]

_CLOSED = object()


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
    """

    cut_after: int | None = None
    drop: frozenset[int] = frozenset()
    duplicate: frozenset[int] = frozenset()
    delay: float = 0.0


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


class Client:
    """An in-process protocol client with the reconnect rules of a real one.

    It keeps a :class:`~rtcore.protocol.streams.ClientCursor` per stream, resubscribes
    from it on :meth:`reconnect`, and drops duplicates, so :attr:`seen` is what
    the application would see. Missed-event notices (``subbed`` with
    ``recovered`` false, ``snap``) are recorded in :attr:`notices`.
    """

    def __init__(self, node: Node, *, token: str | None, encoding: str, faults: Faults | None) -> None:
        self.node = node
        self.token = token
        self.encoding = encoding
        self.codec = codec_for(encoding)
        self.faults = faults
        self.cursors: dict[str, ClientCursor] = {}
        self.seen: dict[str, list[Evt]] = defaultdict(list)
        self.notices: list[Subbed | Snap] = []
        self.syncs: list[Sync] = []
        self.frames: list[Any] = []
        self.welcome: Welcome | None = None
        self.bye: Bye | None = None
        self.closed: ConnectionClosed | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, anyio.Event] = {}
        self._replies: dict[int, Any] = {}
        self._events: dict[str | None, list[Evt]] = defaultdict(list)
        self._frame_queue: list[Any] = []
        self._changed = anyio.Event()
        self._transport: MemoryTransport | None = None
        self._tg: Any = None
        self._subscribed: set[str] = set()
        # One reconnect at a time, and at most one scheduled by gaps: two
        # interleaved would resubscribe twice on one connection (seen on trio,
        # whose scheduling order differs from asyncio's).
        self._reconnect_lock = anyio.Lock()
        self._gap_reconnect = False

    # --- connection ------------------------------------------------------------

    async def _open(self, tg: Any) -> None:
        client_t, server_t = memory_pipe(self.encoding)
        srv: FrameTransport = FaultyTransport(server_t, self.faults) if self.faults else server_t
        self._transport = client_t
        self.closed = None
        self.bye = None
        tg.start_soon(self._serve, srv, server_t)
        tg.start_soon(self._read, client_t)
        await self._send(Hello(token=self.token))
        frame = await self.next_frame(timeout=5, types=(Welcome, Err))
        if isinstance(frame, Err):
            raise RtcoreError(frame.message, code=frame.code, retryable=frame.retryable)
        self.welcome = frame

    async def _serve(self, transport: FrameTransport, server_t: MemoryTransport) -> None:
        try:
            with contextlib.suppress(ConnectionClosed):
                await serve_session(self.node, transport)
        finally:
            server_t.abort()

    async def _read(self, t: MemoryTransport) -> None:
        try:
            while True:
                frame = self.codec.decode_server(await t.receive())
                self._on_frame(frame)
        except ConnectionClosed as exc:
            if t is self._transport:
                self.closed = exc
                self._notify()
        finally:
            t.abort()

    def _notify(self) -> None:
        ev, self._changed = self._changed, anyio.Event()
        ev.set()

    def _on_frame(self, frame: Any) -> None:
        self.frames.append(frame)
        match frame:
            case Ok(id=rid) | Err(id=rid) | Pong(id=rid) if rid is not None and rid in self._waiters:
                self._replies[rid] = frame
                self._waiters.pop(rid).set()
            case Subbed(id=rid):
                cur = self.cursors.setdefault(frame.stream, ClientCursor())
                if not frame.recovered and not frame.snap:
                    cur.reset(frame.epoch, frame.offset)
                    self.notices.append(frame)
                if rid in self._waiters:
                    self._replies[rid] = frame
                    self._waiters.pop(rid).set()
            case Snap():
                self.cursors.setdefault(frame.stream, ClientCursor()).reset(frame.epoch, frame.offset)
                self.notices.append(frame)
            case Evt():
                cur = self.cursors.setdefault(frame.stream, ClientCursor())
                if cur.epoch == frame.epoch and frame.offset > cur.offset + 1:
                    # A gap can only come from a broken transport: resume from what we have.
                    self._frame_queue.append(frame)
                    if self._tg is not None and not self._gap_reconnect:
                        self._gap_reconnect = True
                        self._tg.start_soon(self.reconnect)
                    self._notify()
                    return
                if cur.accept(frame.epoch, frame.offset):
                    self.seen[frame.stream].append(frame)
                    self._events[frame.stream].append(frame)
                    self._events[None].append(frame)
            case Sync():
                self.syncs.append(frame)
            case Bye():
                self.bye = frame
        self._frame_queue.append(frame)
        self._notify()

    async def _send(self, frame: Any) -> None:
        assert self._transport is not None
        await self._transport.send([self.codec.encode(frame)])

    async def send_raw(self, data: bytes | str) -> None:
        """Send arbitrary bytes as one message (for malformed-frame tests)."""
        assert self._transport is not None
        if isinstance(data, bytes) and self.encoding == "json":
            await self._transport._send.send(data.decode(errors="replace"))
        else:
            await self._transport._send.send(data)

    async def _request(self, frame_factory: Any, timeout: float) -> Any:
        rid = next(self._ids)
        ev = self._waiters[rid] = anyio.Event()
        await self._send(frame_factory(rid))
        with anyio.fail_after(timeout):
            await ev.wait()
        return self._replies.pop(rid)

    # --- public API ------------------------------------------------------------

    async def subscribe(self, stream: str, since: Position | None = None, *, timeout: float = 5.0) -> Subbed:
        """Subscribe; without ``since`` the client's own cursor is used if it has one.

        Raises:
            RtcoreError: the server answered ``err``.
        """
        cur = self.cursors.get(stream)
        pos = since if since is not None else (cur.position if cur is not None else None)
        reply = await self._request(lambda rid: Sub(rid, stream, pos), timeout)
        if isinstance(reply, Err):
            raise RtcoreError(reply.message, code=reply.code, retryable=reply.retryable)
        self._subscribed.add(stream)
        return reply  # type: ignore[no-any-return]

    async def unsubscribe(self, stream: str, *, timeout: float = 5.0) -> None:
        """Unsubscribe from ``stream``."""
        self._subscribed.discard(stream)
        reply = await self._request(lambda rid: Unsub(rid, stream), timeout)
        if isinstance(reply, Err):
            raise RtcoreError(reply.message, code=reply.code, retryable=reply.retryable)

    async def command_reply(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 5.0) -> Ok | Err:
        """Send a command and return the raw ``ok``/``err`` frame."""
        raw = msgspec.Raw(self.codec.encode(args))
        return await self._request(lambda rid: Cmd(rid, name, raw, key), timeout)  # type: ignore[no-any-return]

    async def command(self, name: str, args: Any = None, *, key: str | None = None, timeout: float = 5.0) -> Any:
        """Send a command and return its result.

        Raises:
            RtcoreError: the server answered ``err`` (``.code`` says why).
        """
        reply = await self.command_reply(name, args, key=key, timeout=timeout)
        if isinstance(reply, Err):
            raise RtcoreError(reply.message, code=reply.code, retryable=reply.retryable)
        return reply.result

    async def ping(self, *, timeout: float = 5.0) -> Pong:
        """Round-trip a ``ping``."""
        return await self._request(lambda rid: Ping(rid), timeout)  # type: ignore[no-any-return]

    async def ack(self, stream: str, offset: int | None = None) -> None:
        """Acknowledge ``stream`` up to ``offset`` (default: everything seen)."""
        if offset is None:
            offset = self.cursors[stream].offset
        await self._send(Ack(stream, offset))

    async def next_event(self, stream: str | None = None, *, timeout: float = 5.0) -> Evt:
        """Wait for the next new (deduplicated) event, of ``stream`` or any."""
        q = self._events[stream]
        with anyio.fail_after(timeout):
            while not q:
                await self._changed.wait()
        ev = q.pop(0)
        if stream is not None and ev in self._events[None]:
            self._events[None].remove(ev)
        elif stream is None:
            self._events[ev.stream].remove(ev)
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
        await anyio.lowlevel.checkpoint()

    async def reconnect(self) -> None:
        """Drop the connection and come back: hello, then resubscribe from the cursors."""
        async with self._reconnect_lock:
            await self.disconnect()
            self._gap_reconnect = False  # later gaps are the new connection's
            self._frame_queue.clear()
            assert self._tg is not None
            await self._open(self._tg)
            for stream in sorted(self._subscribed):
                await self.subscribe(stream)


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
) -> AsyncIterator[Client]:
    """Connect an in-process client.

    Args:
        target: A running :class:`Node`, or an :class:`App` (the node of the
            enclosing :func:`serve` block of that app is used; without one, a
            node on ``memory://`` runs for this block).
        token: Sent in ``hello``.
        encoding: ``"json"`` or ``"msgpack"``.
        faults: Faults to inject on this connection's server frames.

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
        client = Client(node, token=token, encoding=encoding, faults=faults)
        refused: RtcoreError | None = None
        async with anyio.create_task_group() as tg:
            client._tg = tg
            try:
                await client._open(tg)
            except RtcoreError as exc:
                refused = exc
                tg.cancel_scope.cancel()
            else:
                try:
                    yield client
                finally:
                    client._tg = None
                    await client.disconnect()
                    tg.cancel_scope.cancel()
        if refused is not None:
            raise refused

"""Drives one :class:`~rtcore.protocol.session.Session` over any frame transport.

Every bidirectional transport (WebSocket, the in-process test transport, the
fault-injecting wrapper) implements :class:`FrameTransport` and hands itself
to :func:`serve_session`. What happens here is the I/O the sans-IO session
asked for:

* a reader task feeds messages to the session and carries out its actions;
* a single writer task owns the transport's send side: everything queued in
  the bounded outbox goes out in one ``send`` call (one socket write), which
  is what makes fan-out fast;
* the hub pushes already-encoded event bytes into the outbox without awaiting;
  when the outbox is over its limit the subscriber is too slow: it gets
  ``bye`` ``slow_consumer`` and close 4008, and resumes from its position;
* a timer task wakes the session for idle and token-expiry deadlines.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from ..engine.hub import EncodedEvent
from ..engine.node import Node, Subscription
from ..errors import RtcoreError
from ..protocol.codec import Codec, codec_for
from ..protocol.frames import Err, Ok, Subbed
from ..protocol.session import (
    Action,
    Close,
    DoAck,
    DoAuthenticate,
    DoCommand,
    DoSubscribe,
    DoUnsubscribe,
    Send,
    Session,
)
from ..transport.errors import ConnectionClosed

__all__ = ["ConnectionClosed", "FrameTransport", "OutboxLimits", "serve_session"]

log = logging.getLogger("rtcore.server.gateway")


class FrameTransport(Protocol):
    """A message transport: one message = one frame."""

    encoding: str

    async def receive(self) -> bytes | str:
        """The next whole message. Raises :class:`ConnectionClosed` at the end."""
        ...

    async def send(self, frames: list[bytes]) -> None:
        """Send each item as one message, all in one write."""
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """Close the connection with a WebSocket close code."""
        ...


#: Idle command workers a connection keeps (more exit once idle).
_IDLE_WORKERS = 4


class OutboxLimits:
    """Bounds of a connection's send queue (a slow consumer beyond them is cut).

    Attributes:
        max_bytes: Queued bytes allowed before the connection counts as slow.
        max_frames: Queued frames allowed before the connection counts as slow.
    """

    def __init__(self, max_bytes: int = 4 << 20, max_frames: int = 10_000) -> None:
        self.max_bytes = max_bytes
        self.max_frames = max_frames


class _Connection:
    def __init__(
        self,
        node: Node,
        transport: FrameTransport,
        upgrade_token: str | None,
        outbox: OutboxLimits,
        on_close: Callable[[int, str], None] | None,
        hello_timeout: float | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.codec: Codec = codec_for(transport.encoding)
        self.encoding = transport.encoding
        self.session = Session(
            secrets.token_hex(8),
            self.codec,
            node.limits,
            node.clock(),
            heartbeat=node.heartbeat,
            token_grace=node.token_grace,
            hello_timeout=hello_timeout,
        )
        self.upgrade_token = upgrade_token
        self.limits = outbox
        self.subs: dict[str, Subscription] = {}
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        # asyncio fast path (see WebSocketTransport.send_nowait): frames queued in one
        # loop tick are written by one callback at its end, without waking the writer.
        self._send_nowait: Callable[[list[bytes]], bool] | None = getattr(transport, "send_nowait", None)
        self._call_soon: Callable[..., Any] | None = getattr(transport, "call_soon", None)
        if self._send_nowait is None or self._call_soon is None:
            self._send_nowait = self._call_soon = None
        self._flush_scheduled = False
        self._writer_busy = False  # the writer task owns the send side (an awaited send)
        self._closing: tuple[int, str] | None = None
        self._tg: TaskGroup | None = None
        self._inflight = 0
        self._idle = anyio.Event()
        # Commands run on a small pool of per-connection worker tasks: a command is
        # handed to an idle worker (or a new one when all are busy, so commands stay
        # concurrent and a slow one delays nothing), instead of one new task each.
        self._commands: deque[DoCommand] = deque()
        self._idle_workers: list[anyio.Event] = []
        self._on_close = on_close
        self._acks: list[tuple[str, str, int]] = []
        self._timer_scope = anyio.CancelScope()
        self.bytes_out = 0
        self.metrics = node.metrics
        # For metrics (read at scrape time): publish time of the oldest live
        # event not yet written, the newest (offset, ts) sent per stream, and
        # the last offset each stream was acknowledged at.
        self._unwritten_ts = 0.0
        self.last_sent: dict[str, tuple[int, float]] = {}
        self.acked: dict[str, int] = {}

    # --- outbox ----------------------------------------------------------------

    def push(self, data: bytes, *, backlog: bool = False) -> None:
        if self._closing is not None:
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        if not backlog and (self._queued_bytes > self.limits.max_bytes or len(self._queue) > self.limits.max_frames):
            self._slow()
            return
        if self._call_soon is not None and not self._writer_busy:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._call_soon(self._flush)
        else:
            self._wake.set()

    def _flush(self) -> None:
        """asyncio fast path: write what this tick queued, if the socket takes it now."""
        self._flush_scheduled = False
        if not self._queue or self._writer_busy or self._closing is not None:
            self._wake.set()  # nothing to do, or the writer task's job
            return
        assert self._send_nowait is not None
        batch = list(self._queue)
        try:
            sent = self._send_nowait(batch)
        except Exception:  # pragma: no cover - let the writer task meet the error
            sent = False
        if not sent:
            self._wake.set()  # the writer waits for the socket (send timeout, slow consumer)
            return
        self._queue.clear()
        self._sent(batch)

    def _sent(self, batch: list[bytes]) -> None:
        """Bookkeeping once ``batch`` left the queue for the socket."""
        self._queued_bytes = 0
        self._drained.set()
        size = sum(map(len, batch))
        self.bytes_out += size
        self.metrics.bytes_out += size
        ts, self._unwritten_ts = self._unwritten_ts, 0.0
        if ts:
            # Once per write, for its oldest live event (see rtcore.engine.metrics).
            self.metrics.written.observe(self.node.clock() - ts)

    async def push_backlog(self, frames: list[bytes]) -> None:
        """Queue history at the consumer's pace: wait until the queue is half empty."""
        for data in frames:
            self.push(data, backlog=True)
        while self._closing is None and (
            self._queued_bytes > self.limits.max_bytes // 2 or len(self._queue) > self.limits.max_frames // 2
        ):
            self._drained = anyio.Event()
            await self._drained.wait()

    def _slow(self) -> None:
        self.node.stats["slow_consumers"] += 1
        # Drop what is queued: the client resumes from its last position.
        self._queue.clear()
        self._queued_bytes = 0
        self._run(self.session.close("slow_consumer", "the connection could not keep up; reconnect and resume", reconnect=True, code=4008))

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._queue:
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._drained.set()
                size = sum(map(len, batch))
                self.bytes_out += size
                self.metrics.bytes_out += size
                ts, self._unwritten_ts = self._unwritten_ts, 0.0
                self._writer_busy = True
                try:
                    await self.transport.send(batch)
                finally:
                    self._writer_busy = False
                if ts:
                    # Once per write, for its oldest live event (see rtcore.engine.metrics).
                    self.metrics.written.observe(self.node.clock() - ts)
                if self._queue:
                    self._wake.set()  # queued while we were sending
            if self._closing is not None and not self._queue:
                code, reason = self._closing
                with anyio.move_on_after(5):
                    await self.transport.close(code, reason)
                raise ConnectionClosed(code, reason)

    # --- actions ---------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Send(frame=frame):
                    self.push(self.codec.encode(frame))
                case Close(code=code, reason=reason):
                    if self._closing is None:
                        self._closing = (code, reason)
                        self._wake.set()
                case DoSubscribe():
                    self._spawn(lambda a=action: self._subscribe(a))  # type: ignore[misc]
                case DoUnsubscribe(stream=stream):
                    sub = self.subs.pop(stream, None)
                    if sub is not None:
                        self.node.hub.remove(sub.tail)
                case DoCommand():
                    self._enqueue_command(action)
                case DoAck(stream=stream, offset=offset):
                    sub = self.subs.get(stream)
                    if sub is not None and self.session.principal is not None:
                        # Never store a cursor beyond what this connection was sent.
                        off = min(offset, sub.tail.delivery.last)
                        self._acks.append((stream, sub.tail.delivery.epoch, off))
                    if sub is not None:
                        self._ack_metrics(stream, offset)
                case DoAuthenticate():
                    self._spawn(lambda a=action: self._authenticate(a))  # type: ignore[misc]

    def _ack_metrics(self, stream: str, offset: int) -> None:
        self.acked[stream] = offset
        sent = self.last_sent.get(stream)
        if sent is not None and offset >= sent[0]:
            del self.last_sent[stream]  # time each delivered event's ack once
            self.metrics.acked.observe(self.node.clock() - sent[1])

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    async def _authenticate(self, action: DoAuthenticate) -> None:
        token = action.token if action.token is not None else self.upgrade_token
        try:
            principal = await self.node.authenticate(token)
        except RtcoreError as exc:
            self._run(self.session.auth_failed(exc, action.refresh_id))
            return
        if action.refresh_id is not None and self.session.principal is not None and (principal is None or principal.id != self.session.principal_id):
            self._run(self.session.auth_failed(RtcoreError("a refreshed token must name the same principal", code="unauthenticated"), action.refresh_id))
            return
        pid = principal.id if principal is not None else None
        expires = principal.expires_at if principal is not None else None
        self._run(self.session.authenticated(principal, pid, expires, self.node.clock(), action.refresh_id))
        # Only this session's deadlines changed: wake its own timer, not every
        # session's (node.wake_timers() per login made connecting O(sessions)).
        self._timer_scope.cancel()

    def _enqueue_command(self, action: DoCommand) -> None:
        self._inflight += 1
        self._commands.append(action)
        if self._idle_workers:
            self._idle_workers.pop().set()
        else:
            self._spawn(self._command_worker)

    async def _command_worker(self) -> None:
        commands = self._commands
        while True:
            while commands:
                await self._command(commands.popleft())
            if len(self._idle_workers) >= _IDLE_WORKERS:
                return
            wake = anyio.Event()
            self._idle_workers.append(wake)
            await wake.wait()

    async def _command(self, action: DoCommand) -> None:
        try:
            if self.node.draining:
                reply_frame: Any = Err(action.id, "shutdown", "the server is shutting down; retry on reconnect", True)
            else:
                started = time.perf_counter()
                reply = await self.node.dispatch(self.session.principal, action.name, action.args, key=action.key, encoding=self.encoding)  # type: ignore[arg-type]
                self.metrics.command(
                    action.name in self.node.app.commands, action.name, "ok" if reply.ok else reply.code, time.perf_counter() - started
                )
                if reply.ok:
                    reply_frame = Ok(action.id, reply.result, reply.replayed)
                else:
                    reply_frame = Err(action.id, reply.code, reply.message, reply.retryable, reply.replayed)
            self._run(self.session.reply(action.id, reply_frame))
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _subscribe(self, action: DoSubscribe, use_cursor: bool = True, resubscribe: bool = False) -> None:
        stream = action.stream
        enc = self.encoding

        def emit(batch: list[EncodedEvent]) -> None:
            for e in batch:
                self.push(e.encoded(enc))
            last = batch[-1].event
            if not self._unwritten_ts:
                self._unwritten_ts = batch[0].event.ts
            self.last_sent[stream] = (last.offset, last.ts)

        async def backlog(batch: list[EncodedEvent]) -> None:
            await self.push_backlog([e.encoded(enc) for e in batch])

        def on_stale() -> None:
            # The stream's history changed under us: start over without a position.
            old = self.subs.pop(stream, None)
            if old is not None:
                self.node.hub.remove(old.tail)
            self._spawn(lambda: self._subscribe(action, use_cursor=False, resubscribe=True))

        try:
            sub = await self.node.subscribe(
                self.session.principal,
                stream,
                None if resubscribe else action.since,
                emit=emit,
                on_stale=on_stale,
                spawn=self._spawn,
                backlog=backlog,
                use_cursor=use_cursor and action.cursor,  # a newcomer gets the current state
                new_epoch=resubscribe,
            )
        except RtcoreError as exc:
            if not resubscribe:
                self._run(self.session.reply(action.id, Err(action.id, exc.code, exc.message, exc.retryable)))
            return
        if not resubscribe and stream in self.session.subscriptions:  # pragma: no cover - session forbids it
            self.node.hub.remove(sub.tail)
            return
        if resubscribe and stream not in self.session.subscriptions:
            self.node.hub.remove(sub.tail)  # unsubscribed meanwhile
            return
        self.subs[stream] = sub
        sub.tail.on_sync = lambda _o, j, m: self.push(j if enc == "json" else m)
        subbed = Subbed(action.id, stream, sub.epoch, sub.offset, sub.recovered, sub.snap is not None)
        if resubscribe:
            self.push(self.codec.encode(subbed))
        else:
            self._run(self.session.reply(action.id, subbed))
        if sub.snap is not None:
            self.push(self.codec.encode(sub.snap))
        await sub.tail.fill()

    # --- loops -----------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            data = await self.transport.receive()
            self.metrics.messages_in += 1
            self.metrics.bytes_in += len(data)
            self._run(self.session.receive_data(data, self.node.clock()))
            if self._acks:
                # Acks are stored before the next frame is read, so a client that
                # sends ack then ping knows its cursor is stored when pong arrives.
                acks, self._acks = self._acks, []
                for stream, epoch, offset in acks:
                    await self.node.store_ack(self.session.principal, stream, epoch, offset)

    async def _timer(self) -> None:
        while True:
            now = self.node.clock()
            self._run(self.session.tick(now))
            wait = max(0.0, self.session.next_deadline() - now)
            wake = self.node.timer_wakeup
            with anyio.move_on_after(min(wait, 5.0) + 0.001) as self._timer_scope:
                await wake.wait()

    async def drain(self, deadline: float) -> None:
        """Shutdown: let in-flight commands finish (up to ``deadline`` s), then ``bye`` 1001."""
        if self._inflight:
            self._idle = anyio.Event()
            with anyio.move_on_after(deadline):
                await self._idle.wait()
        self._run(self.session.close("shutdown", "the server is shutting down; reconnect", reconnect=True, code=1001))

    async def run(self) -> None:
        self.node.sessions.add(self)
        self.metrics.connections_opened += 1
        code = 1006
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._timer)
                tg.start_soon(self._reader_guard)
                try:
                    await self._writer()
                finally:
                    tg.cancel_scope.cancel()
        except* ConnectionClosed as group:
            exc = group.exceptions[0]
            assert isinstance(exc, ConnectionClosed)
            code = exc.code
            if self._on_close is not None:
                self._on_close(exc.code, exc.reason)
        finally:
            self.metrics.closed(code)
            self.node.sessions.discard(self)
            for sub in self.subs.values():
                self.node.hub.remove(sub.tail)
            self.subs.clear()

    async def _reader_guard(self) -> None:
        try:
            await self._reader()
        except ConnectionClosed as exc:
            self._closing = self._closing or (exc.code, exc.reason)
            # The peer is gone: stop the writer without sending anything more.
            self._queue.clear()
            raise


async def serve_session(
    node: Node,
    transport: FrameTransport,
    *,
    token: str | None = None,
    outbox: OutboxLimits | None = None,
    on_close: Callable[[int, str], None] | None = None,
    hello_timeout: float | None = None,
) -> None:
    """Run one client session over ``transport`` until it closes.

    Args:
        node: The running node.
        transport: The connection.
        token: A token that came with the upgrade request (used when ``hello``
            carries none).
        outbox: Send-queue bounds.
        on_close: Called with the close code and reason at the end.
        hello_timeout: Seconds the client has to send ``hello`` (``None``:
            only the idle timeout applies).
    """
    conn = _Connection(node, transport, token, outbox or node.outbox or OutboxLimits(), on_close, hello_timeout)
    await conn.run()

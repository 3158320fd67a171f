"""Drives one :class:`~rtcore.protocol.session.Session` over any frame transport.

Every bidirectional transport (WebSocket, the in-process test transport, the
fault-injecting wrapper) implements :class:`FrameTransport` and hands itself
to :func:`serve_session`. What happens here is the I/O the sans-IO session
asked for:

* messages reach the session from the transport's read loop, which runs in
  the session's own task when the transport offers it
  (:class:`~rtcore.transport.websocket.InlineReader`; otherwise a reader task
  pulls them with ``receive``), and the actions they cause are carried out;
* a single writer owns the transport's send side: everything queued in
  the connection's :class:`~rtcore.server.outbox.Outbox` goes out in one
  ``send`` call (one socket write), which is what makes fan-out fast. With
  an inline reader the writer task starts only when the outbox needs it
  (on asyncio most batches are written by a loop callback without it);
* the hub pushes already-encoded event bytes into the outbox without awaiting;
  when a live frame does not fit the outbox the subscriber is too slow: it
  gets ``bye`` ``slow_consumer`` and close 4008, and resumes from its
  position; history replay is paced by the outbox instead;
* :class:`SessionTimers` (one task for all sessions) wakes the session for
  its hello, idle and token-expiry deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

import anyio
from anyio.abc import TaskGroup

from ..engine.direct import DirectMessage
from ..engine.dispatch import Reply, dispatch, dispatch_now
from ..engine.hub import OutboxLimits
from ..engine.node import Node, SubscriptionStart
from ..errors import AuthError, ConnectionClosed, RtcoreError
from ..logs import COMMAND, CONNECTION, emit
from ..protocol.codec import Codec, codec_for
from ..protocol.deadlines import DeadlineHeap
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
from ..transport.websocket import FrameTransport, InlineReader
from .outbox import FastWriter, Outbox
from .registry import SessionInfo, SessionRegistry, SubscriptionInfo

__all__ = ["ConnectionClosed", "FrameTransport", "OutboxLimits", "SessionTimers", "serve_session"]

log = logging.getLogger("rtcore.server.gateway")


#: Idle command workers a connection keeps (more exit once idle).
_IDLE_WORKERS = 4


#: How late a session deadline may run: deadlines this close together share one
#: wake-up of SessionTimers (connections arriving at 1,000/s would otherwise wake
#: it 1,000 times a second). Hello and idle timeouts are seconds long.
_TIMER_SLACK = 0.05

# type(transport) -> does it implement the protocol? isinstance() against a
# runtime-checkable Protocol with a property member walks the protocol's
# members on every call: py-spy put it at 8 % of the CPU of a connect (hello
# + sub included). Transports are classes whose methods do not come and go
# per instance, so the answer is the same for every instance of a class.
_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def _implements(transport: object, protocol: type) -> bool:
    key = (type(transport), protocol)
    known = _IMPLEMENTS.get(key)
    if known is None:
        known = _IMPLEMENTS[key] = isinstance(transport, protocol)
    return known


class SessionTimers:
    """One task that runs the deadlines (hello, idle, token expiry) of many sessions.

    Without it each session runs a timer task of its own that wakes at least
    every 5 s and waits on the node's shared ``timer_wakeup`` event; with
    thousands of sessions that is thousands of tasks and cancel scopes, and
    every wake-up removes a waiter from that one event's queue (a linear scan
    of all the others), so idle CPU and the cost of each new connection grew
    with the number open. Here the sessions' next deadlines sit in one heap:
    a session is woken only when its deadline comes, and one task waits.

    A session's heap entry counts only while it equals the session's
    current deadline (a later frame moves the idle deadline later; the old
    entry then just finds nothing to do and reschedules). Entries of ended
    sessions and superseded ones are dropped in one rebuild when they
    outnumber the live ones, so the heap does not keep ended sessions (and
    their transports) alive until their deadline would have come.

    Args:
        node: The node whose clock (and ``timer_wakeup``, for fake clocks) to follow.
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self._deadlines: DeadlineHeap[_Connection] = DeadlineHeap("_deadline")
        self._next = math.inf
        self._kick = anyio.Event()

    def __len__(self) -> int:
        return len(self._deadlines)

    def discard(self, conn: _Connection) -> None:
        """``conn`` ended: its entry no longer counts."""
        self._deadlines.discard(conn)

    def schedule(self, conn: _Connection, deadline: float) -> None:
        """(Re)schedule ``conn``'s next wake-up at ``deadline`` (node clock)."""
        self._deadlines.schedule(conn, deadline)
        if deadline < self._next:
            self._kick.set()

    async def run(self) -> None:
        """Run deadlines until cancelled (the server runs this for its lifetime)."""
        node = self._node
        deadlines = self._deadlines
        while True:
            now = node.clock()
            while (conn := deadlines.pop_due(now)) is not None:
                conn._on_deadline(now)
            self._next = deadlines.next
            kick = self._kick = anyio.Event()
            wake = node.timer_wakeup  # a fake clock moved (rtcore.testing)
            with anyio.move_on_after(min(self._next - now, 5.0) + _TIMER_SLACK):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_set_when, kick, tg.cancel_scope)
                    await wake.wait()
                    tg.cancel_scope.cancel()


async def _set_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# One renderer per encoding, shared by every connection (a closure per
# connection cost ~0.4 kB each with its cell).
_RENDER: dict[str, Callable[[Any], bytes]] = {}
_RENDER_SYNC: dict[str, Callable[[dict[str, bytes]], bytes]] = {}


def _render_for(encoding: str) -> Callable[[Any], bytes]:
    """``event.encoded(encoding)`` as one shared function per encoding."""
    render = _RENDER.get(encoding)
    if render is None:
        render = _RENDER[encoding] = operator.methodcaller("encoded", encoding)
    return render


def _render_sync_for(encoding: str) -> Callable[[dict[str, bytes]], bytes]:
    """``frames[encoding]`` as one shared function per encoding."""
    render = _RENDER_SYNC.get(encoding)
    if render is None:
        render = _RENDER_SYNC[encoding] = operator.itemgetter(encoding)
    return render


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None on trio (the only other loop anyio runs on)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Connection:
    # Thousands live at once: no per-instance __dict__ (its resizes cost ~1.6 kB each).
    __slots__ = (
        "__weakref__", "_acks", "_children", "_closing", "_commands", "_deadline", "_ended", "_failure", "_host", "_idle",
        "_idle_workers", "_inflight", "_inline", "_lazy_writer", "_on_close", "_present", "_registry", "_sub_actions", "_tg",
        "_timer_scope", "_timers", "acked", "codec", "encoding", "id", "metrics", "node", "opened_at", "outbox", "peer", "session",
        "subs", "transport", "upgrade_token",
    )

    def __init__(
        self,
        node: Node,
        transport: FrameTransport,
        upgrade_token: str | None,
        outbox: OutboxLimits,
        on_close: Callable[[int, str], None] | None,
        hello_timeout: float | None = None,
        registry: SessionRegistry | None = None,
        peer: str | None = None,
        timers: SessionTimers | None = None,
    ) -> None:
        self.node = node
        self.peer = peer
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
        self.id = self.session.id
        self.opened_at = node.clock()
        self.upgrade_token = upgrade_token
        self.subs: dict[str, SubscriptionStart] = {}
        self.metrics = node.metrics
        enc = self.encoding
        # asyncio fast path (see WebSocketTransport.send_nowait): frames queued in one
        # loop tick are written by one callback at its end, without waking the writer.
        fast = cast(FastWriter, transport) if _implements(transport, FastWriter) else None
        self.outbox = Outbox(
            outbox,
            render=_render_for(enc),
            render_sync=_render_sync_for(enc),
            clock=node.clock,
            metrics=node.metrics,
            fast=fast,
            # spawn, on_slow, on_stale and start_writer (started when a write cannot
            # complete at once, or at the close; see run()): no bound method each.
            owner=self,
        )
        self._registry = registry
        self._present: str | None = None  # the principal reported to node.presence
        self._closing: tuple[int, str] | None = None
        self._tg: TaskGroup | None = None
        # asyncio with an inline reader and SessionTimers: no task group (~1.1 kB per
        # connection); side tasks are native tasks of the loop, kept in _children
        # with their cancel scope while they run (None: none runs), cancelled and
        # awaited when run() ends.
        # The first one to fail cancels _host (the task in run()) with _failure.
        self._host: asyncio.Task[Any] | None = None
        self._children: dict[asyncio.Task[Any], anyio.CancelScope | None] | None = None
        self._failure: BaseException | None = None
        self._lazy_writer = False  # run(): the writer task starts on the outbox's first need
        self._inline = False  # serve_session: the transport's read loop runs in run()'s task
        self._inflight = 0
        self._idle: anyio.Event | None = None  # created by drain() (saves an event per connection)
        # Commands run on a small pool of per-connection worker tasks: a command is
        # handed to an idle worker (or a new one when all are busy, so commands stay
        # concurrent and a slow one delays nothing), instead of one new task each.
        self._commands: deque[DoCommand] | None = None  # created by the first command
        self._idle_workers: list[anyio.Event | asyncio.Future[None]] | None = None  # created with _commands
        self._on_close = on_close
        self._acks: list[tuple[str, str, int]] | None = None  # created by the first ack to store
        self._timer_scope: anyio.CancelScope | None = None  # own timer task only (no SessionTimers)
        self._timers = timers
        self._deadline: float | None = None  # scheduled in _timers (None: not scheduled)
        self._ended = False
        # The sub action of each subscribed stream (a stale epoch resubscribes with it).
        self._sub_actions: dict[str, DoSubscribe] = {}
        # For metrics (read at scrape time): the last offset each stream was acknowledged
        # at (None until the first ack: most idle connections never send one).
        self.acked: dict[str, int] | None = None

    # --- registry --------------------------------------------------------------

    def info(self) -> SessionInfo:
        """Read-only view for the session registry (metrics, health, shutdown)."""
        outbox = self.outbox
        return SessionInfo(
            id=self.id,
            kind="websocket",
            principal=self.session.principal_id,
            opened_at=self.opened_at,
            subscriptions=tuple(
                SubscriptionInfo(
                    stream=stream,
                    epoch=sub.tail.delivery.epoch,
                    delivered=sub.tail.delivery.last,
                    acked=None if self.acked is None else self.acked.get(stream),
                    last_sent=outbox.last_sent.get(stream),
                )
                for stream, sub in self.subs.items()
            ),
            queued_bytes=outbox.queued_bytes,
            queued_frames=outbox.queued_frames,
            bytes_out=outbox.bytes_out,
            commands_in_flight=self._inflight,
        )

    # --- outbox ----------------------------------------------------------------

    def push(self, data: bytes) -> None:
        self.outbox.push(data)

    def _direct(self, message: DirectMessage) -> None:
        # A direct message (node.send_to) for this connection's principal: a live frame.
        self.outbox.push(message.encoded(self.encoding))

    def _slow(self) -> None:
        self.node.stats["slow_consumers"] += 1
        if CONNECTION.isEnabledFor(logging.WARNING):
            emit(
                CONNECTION, logging.WARNING, "slow consumer cut", id=self.id, peer=self.peer,
                principal=self.session.principal_id, queued_bytes=self.outbox.queued_bytes,
            )
        self._run(self.session.close("slow_consumer", "the connection could not keep up; reconnect and resume", reconnect=True, code=4008))

    def _stale(self, stream: str) -> None:
        # The stream's history changed under us: start over without a position.
        old = self.subs.pop(stream, None)
        if old is not None:
            self.node.hub.remove(old.tail)
        action = self._sub_actions.get(stream)
        if action is not None:
            self._spawn(lambda: self._subscribe(action, use_cursor=False, resubscribe=True))

    def _start_writer(self) -> None:
        if self._lazy_writer:
            self._lazy_writer = False
            self._spawn(self._writer)

    async def _writer(self) -> None:
        await self.outbox.run(self.transport.send)
        if self._closing is not None:
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
                        self.outbox.close()
                case DoSubscribe():
                    self._spawn(lambda a=action: self._subscribe(a))  # type: ignore[misc]
                case DoUnsubscribe(stream=stream):
                    self._sub_actions.pop(stream, None)
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
                        if self._acks is None:
                            self._acks = []
                        self._acks.append((stream, sub.tail.delivery.epoch, off))
                    if sub is not None:
                        self._ack_metrics(stream, offset)
                case DoAuthenticate():
                    self._spawn(lambda a=action: self._authenticate(a))  # type: ignore[misc]

    def _ack_metrics(self, stream: str, offset: int) -> None:
        if self.acked is None:
            self.acked = {}
        self.acked[stream] = offset
        last_sent = self.outbox.last_sent
        sent = last_sent.get(stream)
        if sent is not None and offset >= sent[0]:
            del last_sent[stream]  # time each delivered event's ack once
            self.metrics.acked.observe(self.node.clock() - sent[1])

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        host = self._host
        if host is None:
            assert self._tg is not None
            self._tg.start_soon(fn)
            return
        if self._ended:
            return  # run() has reaped its tasks: nothing may outlive the connection
        children = self._children
        if children is None:
            children = self._children = {}
        task = host.get_loop().create_task(self._child(fn))
        children[task] = None
        task.add_done_callback(self._child_done)

    # The Outbox's OutboxOwner: class attributes, no bound method stored per connection.
    spawn = _spawn
    on_slow = _slow
    on_stale = _stale
    start_writer = _start_writer

    async def _child(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """A native side task: ``fn()`` in a cancel scope of its own, which
        :meth:`_reap` cancels (anyio's cancellation, so a shielded section of
        the application, say a command that must finish, still finishes, as
        it does in a task group)."""
        task = asyncio.current_task()
        children = self._children
        with anyio.CancelScope() as scope:
            if task is not None and children is not None and task in children:
                children[task] = scope
            await fn()

    def _child_done(self, task: asyncio.Task[Any]) -> None:
        """A native side task ended: forget it; if it failed, end the connection
        with its error (as a task group would: the host task is cancelled and
        :meth:`run` raises the error)."""
        children = self._children
        if children is not None:
            children.pop(task, None)
            if not children:
                self._children = None  # an idle connection keeps no empty dict
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or self._failure is not None:
            return
        self._failure = exc
        host = self._host
        if host is not None and not self._ended:
            host.cancel()

    async def _reap(self) -> None:
        """Cancel the native side tasks still running and wait until they have ended."""
        while self._children:
            children = self._children
            for task, scope in children.items():
                if scope is None:
                    task.cancel()  # not started yet: it never runs
                else:
                    scope.cancel()  # anyio re-delivers until the task leaves the scope
            with anyio.CancelScope(shield=True):
                await asyncio.wait(list(children))

    async def _authenticate(self, action: DoAuthenticate) -> None:
        token = action.token if action.token is not None else self.upgrade_token
        try:
            principal = await self.node.authenticate(token)
        except RtcoreError as exc:
            self._run(self.session.auth_failed(exc, action.refresh_id))
            return
        if action.refresh_id is not None and self.session.principal is not None and (principal is None or principal.id != self.session.principal_id):
            self._run(self.session.auth_failed(AuthError("a refreshed token must name the same principal"), action.refresh_id))
            return
        pid = principal.id if principal is not None else None
        expires = principal.expires_at if principal is not None else None
        self._run(self.session.authenticated(principal, pid, expires, self.node.clock(), action.refresh_id))
        if pid is not None and self._present is None:
            self._present = pid
            self.node.presence.connected(pid, self._direct)
        # Only this session's deadlines changed: wake its own timer, not every
        # session's (node.wake_timers() per login made connecting O(sessions)).
        self._deadlines_changed()

    def _deadlines_changed(self) -> None:
        if self._timers is None:
            if self._timer_scope is not None:
                self._timer_scope.cancel()
            return
        deadline = self.session.next_deadline()
        if not self._ended and (self._deadline is None or deadline < self._deadline):
            self._timers.schedule(self, deadline)

    def _on_deadline(self, now: float) -> None:
        """Called by :class:`SessionTimers` when this session's deadline came."""
        if self._ended:
            return
        self._run(self.session.tick(now))
        if self._timers is not None and self._closing is None:
            self._timers.schedule(self, self.session.next_deadline())

    def _enqueue_command(self, action: DoCommand) -> None:
        if self.node.draining:
            # Refused on receipt, not when a worker picks it up: a command that
            # arrived before the shutdown began still runs (on trio the worker
            # may first run after stop() has set draining).
            self._run(self.session.reply(action.id, Err(action.id, "shutdown", "the server is shutting down; retry on reconnect", True)))
            return
        if action.key is None and not self._commands:
            # A command that needs no await (see dispatch_now) is answered here,
            # in the task that read it: no hand-over to a worker. Not while
            # commands wait for a worker (they were received first).
            started = time.perf_counter()
            reply = dispatch_now(self.node, self.session.principal, action.name, action.args, encoding=self.encoding)  # type: ignore[arg-type]
            if reply is not None:
                # Written at once only when nothing more was read behind this command
                # (see WebSocketTransport.reading_ahead); otherwise queued, and the
                # replies to what came in one read go out together at the tick's end.
                self._answer(action, reply, started, batch=getattr(self.transport, "reading_ahead", True))
                return
        self._inflight += 1
        if self._commands is None:
            self._commands = deque()
            self._idle_workers = []
        self._commands.append(action)
        idle = self._idle_workers
        while idle:
            wake = idle.pop()
            if isinstance(wake, anyio.Event):
                wake.set()
                return
            if not wake.done():  # a worker cancelled while idle left a done future behind
                wake.set_result(None)
                return
        self._spawn(self._command_worker)

    async def _command_worker(self) -> None:
        commands = self._commands
        assert commands is not None  # _enqueue_command created it before spawning us
        # An idle worker waits for the next command on a bare future on asyncio:
        # an anyio.Event there is an asyncio.Event with its own deque, created
        # for every wait, which cost more than handing the command over.
        loop = _asyncio_loop()
        idle = self._idle_workers
        assert idle is not None  # created with _commands
        while True:
            while commands:
                await self._command(commands.popleft())
            if len(idle) >= _IDLE_WORKERS:
                return
            if loop is not None:
                fut = loop.create_future()
                idle.append(fut)
                await fut
            else:
                wake = anyio.Event()
                idle.append(wake)
                await wake.wait()

    async def _command(self, action: DoCommand) -> None:
        try:
            started = time.perf_counter()
            # dispatch itself, not Node.dispatch (its one-line wrapper): a coroutine less per command.
            reply = await dispatch(self.node, self.session.principal, action.name, action.args, key=action.key, encoding=self.encoding)  # type: ignore[arg-type]
            self._answer(action, reply, started)
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()

    def _answer(self, action: DoCommand, reply: Reply, started: float, *, batch: bool = False) -> None:
        """Record a finished command and queue its reply (write it at once when
        it is the last command queued and ``batch`` is false)."""
        elapsed = time.perf_counter() - started
        self.metrics.command(action.name in self.node.app.commands, action.name, "ok" if reply.ok else reply.code, elapsed)
        if COMMAND.isEnabledFor(logging.DEBUG):  # one cached check per command when disabled
            emit(
                COMMAND, logging.DEBUG, "command", name=action.name, key=action.key, via="ws",
                principal=self.session.principal_id, duration_ms=elapsed * 1000, outcome="ok" if reply.ok else reply.code,
            )
        reply_frame: Any
        if reply.ok:
            reply_frame = Ok(action.id, reply.result, reply.replayed)
        else:
            reply_frame = Err(action.id, reply.code, reply.message, reply.retryable, reply.replayed)
        actions = self.session.reply(action.id, reply_frame)
        if not batch and len(actions) == 1 and type(send := actions[0]) is Send and not self._commands:
            # The last command queued: its reply can be written now (see Outbox.push_now).
            self.outbox.push_now(self.codec.encode(send.frame))
        else:
            self._run(actions)

    async def _subscribe(self, action: DoSubscribe, use_cursor: bool = True, resubscribe: bool = False) -> None:
        stream = action.stream
        if not resubscribe:
            self._sub_actions[stream] = action
        try:
            sub = await self.node.subscribe(
                self.session.principal,
                stream,
                None if resubscribe else action.since,
                self.outbox,
                use_cursor=use_cursor and action.cursor,  # a newcomer gets the current state
                new_epoch=resubscribe,
            )
        except RtcoreError as exc:
            if not resubscribe:
                self._sub_actions.pop(stream, None)
                self._run(self.session.reply(action.id, Err(action.id, exc.code, exc.message, exc.retryable)))
            elif stream in self.session.subscriptions:
                # Our own resubscription to a new epoch was refused (failed reads
                # are retried in node.subscribe; this is final: forbidden now...):
                # say so and close rather than leave a subscription that gets nothing.
                self._run(self.session.close(exc.code, f"resubscribing to {stream!r} failed: {exc.message}", reconnect=exc.retryable, code=1011))
            return
        if not resubscribe and stream in self.session.subscriptions:  # pragma: no cover - session forbids it
            self.node.hub.remove(sub.tail)
            return
        if resubscribe and stream not in self.session.subscriptions:
            self.node.hub.remove(sub.tail)  # unsubscribed meanwhile
            return
        self.subs[stream] = sub
        subbed = Subbed(action.id, stream, sub.epoch, sub.offset, sub.recovered, sub.snap is not None)
        if resubscribe:
            self.push(self.codec.encode(subbed))
        else:
            self._run(self.session.reply(action.id, subbed))
        if sub.snap is not None:
            self.push(self.codec.encode(sub.snap))
        await sub.tail.fill()

    # --- loops -----------------------------------------------------------------

    def on_message(self, data: bytes | str) -> Coroutine[Any, Any, None] | None:
        """One inbound message (the transport's read loop calls this, see
        :class:`~rtcore.transport.websocket.InlineReader`); a coroutine returned
        must finish before the next message is read."""
        metrics = self.metrics
        metrics.messages_in += 1
        metrics.bytes_in += len(data)
        self._run(self.session.receive_data(data, self.node.clock()))
        if self._acks:
            # Acks are stored before the next frame is read, so a client that
            # sends ack then ping knows its cursor is stored when pong arrives.
            return self._store_acks()
        return None

    # The connection is its own message callback (take_reader keeps it, not a bound method).
    __call__ = on_message

    async def _store_acks(self) -> None:
        acks, self._acks = self._acks, None
        assert acks is not None  # on_message saw some
        for stream, epoch, offset in acks:
            await self.node.store_ack(self.session.principal, stream, epoch, offset)

    async def _reader(self) -> None:
        while True:
            data = await self.transport.receive()
            pending = self.on_message(data)
            if pending is not None:
                await pending

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

    def drain_now(self) -> bool:
        """Shutdown without a task: ``bye`` and close 1001 in one write now, if
        nothing is in flight or queued and the transport can (the asyncio fast
        path); ``False``: use :meth:`drain`. The read loop then ends the
        connection at the peer's close frame (or ``close_timeout`` later)."""
        close_nowait = getattr(self.transport, "close_nowait", None)
        if close_nowait is None or self._inflight or not self._lazy_writer or self._closing is not None or self.outbox.queued_frames:
            return False
        actions = self.session.close("shutdown", "the server is shutting down; reconnect", reconnect=True, code=1001)
        frames = [self.codec.encode(a.frame) for a in actions if isinstance(a, Send)]
        closes = [a for a in actions if isinstance(a, Close)]
        if not closes or not close_nowait(frames, closes[0].code, closes[0].reason):
            self._run(actions)  # already closed (nothing to do), or the awaited path
            return True
        self._closing = (closes[0].code, closes[0].reason)
        # As when the reader sees the peer's close: no writer, nothing more to send.
        self._lazy_writer = False
        self.outbox.abort()
        return True

    async def run(self) -> None:
        if self._registry is not None:
            self._registry.add(self)
        self.metrics.connections_opened += 1
        if CONNECTION.isEnabledFor(logging.INFO):
            emit(CONNECTION, logging.INFO, "connection opened", id=self.id, peer=self.peer, encoding=self.encoding)
        code = 1006
        reason = ""
        try:
            if self._inline and self._timers is not None and (loop := _asyncio_loop()) is not None:
                host = self._host = asyncio.current_task(loop)
                assert host is not None
                self._timers.schedule(self, self.session.next_deadline())
                self._lazy_writer = True
                if self.outbox.queued_frames or self.outbox.closed:
                    self._start_writer()
                try:
                    try:
                        await cast(InlineReader, self.transport).run_reader()
                    except ConnectionClosed as closed:
                        self._reader_closed(closed)
                        raise
                    finally:
                        self._ended = True  # _spawn starts nothing more, _child_done cancels nobody
                        await self._reap()
                except asyncio.CancelledError:
                    # Cancelled by _child_done, not by anyone else: fail with its error.
                    if self._failure is None or host.uncancel():
                        raise
                if self._failure is not None:
                    raise self._failure
                return
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self._timers is None:
                    tg.start_soon(self._timer)
                else:
                    self._timers.schedule(self, self.session.next_deadline())
                if self._inline:
                    # This task reads; the writer task starts only when the outbox
                    # needs it (on asyncio most writes complete without it).
                    self._lazy_writer = True
                    if self.outbox.queued_frames or self.outbox.closed:
                        self._start_writer()
                    # The transport reads in this task and calls on_message; it
                    # raises ConnectionClosed when the connection ends.
                    try:
                        await cast(InlineReader, self.transport).run_reader()
                    except ConnectionClosed as closed:
                        self._reader_closed(closed)
                        raise
                    finally:
                        tg.cancel_scope.cancel()
                else:
                    tg.start_soon(self._reader_guard)
                    try:
                        await self._writer()
                    finally:
                        tg.cancel_scope.cancel()
        except* ConnectionClosed as group:
            exc = group.exceptions[0]
            assert isinstance(exc, ConnectionClosed)
            code = exc.close_code
            reason = exc.reason
            if self._on_close is not None:
                self._on_close(exc.close_code, exc.reason)
        finally:
            self._ended = True
            if self._timers is not None:
                self._timers.discard(self)
            self._deadline = None
            self.metrics.closed(code)
            if CONNECTION.isEnabledFor(logging.INFO):
                emit(
                    CONNECTION, logging.INFO, "connection closed", id=self.id, peer=self.peer,
                    principal=self.session.principal_id, duration_s=self.node.clock() - self.opened_at, code=code, reason=reason,
                )
            if self._registry is not None:
                self._registry.discard(self)
            if self._present is not None:
                self.node.presence.disconnected(self._present, self._direct)
                self._present = None
            for sub in self.subs.values():
                self.node.hub.remove(sub.tail)
            self.subs.clear()

    async def _reader_guard(self) -> None:
        try:
            await self._reader()
        except ConnectionClosed as exc:
            self._reader_closed(exc)
            raise

    def _reader_closed(self, exc: ConnectionClosed) -> None:
        self._closing = self._closing or (exc.close_code, exc.reason)
        # The peer is gone: stop the writer without sending anything more
        # (and start none: there is nothing left for it to do).
        self._lazy_writer = False
        self.outbox.abort()


def serve_session(
    node: Node,
    transport: FrameTransport,
    *,
    token: str | None = None,
    outbox: OutboxLimits | None = None,
    on_close: Callable[[int, str], None] | None = None,
    hello_timeout: float | None = None,
    registry: SessionRegistry | None = None,
    peer: str | None = None,
    timers: SessionTimers | None = None,
) -> Coroutine[Any, Any, None]:
    """Run one client session over ``transport`` until it closes: ``await serve_session(...)``.

    A plain function returning the session's coroutine (one coroutine frame
    less per open connection, thousands wait at once); the session is set
    up when it is called.

    Args:
        node: The running node.
        transport: The connection.
        token: A token that came with the upgrade request (used when ``hello``
            carries none).
        outbox: Send-queue bounds.
        on_close: Called with the close code and reason at the end.
        hello_timeout: Seconds the client has to send ``hello`` (``None``:
            only the idle timeout applies).
        registry: Where the session is listed while it runs (the server's
            :class:`~rtcore.server.registry.SessionRegistry`; None: nowhere).
        peer: The client's address (``host:port``) for the connection log.
        timers: A running :class:`SessionTimers` that takes this session's
            deadlines (None: the session runs a timer task of its own).
    """
    conn = _Connection(
        node, transport, token, outbox or node.outbox or OutboxLimits(), on_close, hello_timeout, registry, peer, timers
    )
    # Before the first await (see InlineReader.take_reader): read in this task,
    # no reader task or message queue of the transport's.
    conn._inline = _implements(transport, InlineReader) and cast(InlineReader, transport).take_reader(
        conn, conn.outbox.flushed  # conn(message) is conn.on_message(message), no bound method kept
    )
    return conn.run()

"""A node runs an :class:`~rtcore.engine.app.App` on a backend.

One node per process (or per test). It owns the backend's live feed and the
:class:`~rtcore.engine.hub.Hub`, folds stateful streams, runs processors, dispatches
commands through the idempotency layer, and starts subscriptions with the
catch-up → live handoff. Transports (WebSocket, HTTP, SSE, in-process) are
thin drivers over the methods here, which is why a command retried over HTTP
after being sent over WebSocket sees the same idempotency record.

Use it as an async context manager; every background task lives in its task
group::

    async with Node(app, "memory://") as node:
        ...
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from ..backends import Backend, open_backend
from ..backends.base import Event, Outcome, ReadResult, Snapshot
from ..errors import AuthError, BadRequest, RtcoreError, Unavailable, error_from_wire
from ..protocol.codec import codec_for
from ..protocol.frames import Limits, Position, Snap, Sync
from ..protocol.idempotency import DEFAULT_LEASE, DEFAULT_TTL, Replay, check_key, decide, fingerprint, scope_of
from ..protocol.state import StreamState
from ..protocol.streams import Delivery, Phase, Plan, check_stream, plan_resume
from .app import App, Context, Principal
from .hub import EncodedEvent, EventSink, Hub, OutboxLimits, Tail
from .metrics import NodeMetrics
from .presence import Presence
from .processors import Processors

__all__ = ["ROLES", "Node", "Reply", "Subscription"]

#: What a node can do: serve WebSocket/SSE (``gateway``), answer commands
#: (``api``), run processors and loops (``processor``).
ROLES: frozenset[str] = frozenset({"gateway", "api", "processor"})

log = logging.getLogger("rtcore.engine.node")


class Reply(msgspec.Struct, frozen=True):
    """The answer to a command, whichever transport asked.

    Attributes:
        ok: Whether it succeeded.
        result: The handler's result as builtins (when ``ok``).
        code: Error code (when not ``ok``).
        message: Error message.
        retryable: Whether retrying may succeed.
        http_status: Status for the HTTP transport.
        replayed: The outcome came from the idempotency store.
    """

    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""
    retryable: bool = False
    http_status: int = 200
    replayed: bool = False

    @classmethod
    def error(cls, exc: RtcoreError, replayed: bool = False) -> Reply:
        """A failed reply from an error (every field of the reply comes from ``exc``)."""
        return cls(False, None, exc.code, exc.message, exc.retryable, exc.http_status, replayed)

    @classmethod
    def from_outcome(cls, outcome: Outcome, replayed: bool) -> Reply:
        """A reply from a stored outcome.

        A stored failure is rebuilt as its code's owner class (see
        :func:`~rtcore.errors.error_class`); it is final, so not retryable.
        """
        if outcome.ok:
            return cls(True, outcome.result, replayed=replayed)
        exc = error_from_wire(outcome.code or "internal", outcome.message or "", retryable=False, http_status=outcome.http_status)
        return cls.error(exc, replayed)

    def exception(self) -> RtcoreError:
        """The failed reply as an instance of its code's owner class.

        Raises:
            ValueError: The reply is a success.
        """
        if self.ok:
            raise ValueError("a successful reply is not an error")
        return error_from_wire(self.code, self.message, self.retryable, self.http_status)


class Subscription:
    """A started subscription: what to tell the client first, and the tail that feeds it.

    Attributes:
        stream: The stream.
        epoch: Epoch live delivery continues in.
        offset: Position announced in ``subbed``.
        recovered: ``subbed.recovered``.
        snap: The ``snap`` frame to send right after ``subbed`` (stateful resume), or None.
        tail: The tail (call :meth:`Tail.fill` after sending the preamble).
        outbox: Where its events go (the subscriber's outbox).
    """

    __slots__ = ("epoch", "offset", "outbox", "recovered", "snap", "stream", "tail")

    def __init__(self, stream: str, epoch: str, offset: int, recovered: bool, snap: Snap | None, tail: Tail) -> None:
        self.outbox: EventSink = tail.sink
        self.stream = stream
        self.epoch = epoch
        self.offset = offset
        self.recovered = recovered
        self.snap = snap
        self.tail = tail


class _Follower:
    """Server-side fold of one stateful stream (the :class:`EventSink` of its tail)."""

    def __init__(self, stream: str, state: StreamState) -> None:
        self.stream = stream
        self.state = state
        self.ready = anyio.Event()
        self.tail: Tail | None = None
        self.pending_sync: tuple[int, dict[str, bytes]] | None = None
        self.node: Node | None = None
        self.on_stale: Callable[[], None] = lambda: None

    def fold_batch(self, batch: list[EncodedEvent]) -> None:
        assert self.node is not None
        for enc in batch:
            self.node._fold(self, enc.event)

    # EventSink: history and live events are folded alike, at once.
    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        assert self.node is not None
        self.node.spawn(fn)

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.fold_batch(batch)

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.fold_batch(batch)

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        pass  # the follower is where sync frames come from

    def stale(self, stream: str) -> None:
        self.on_stale()


class Node:
    """Runs an app on a backend.

    Args:
        app: The application.
        backend: A :class:`~rtcore.backends.Backend` or a URL (``memory://`` default).
        clock: Returns Unix time; :class:`rtcore.testing.FakeClock` in tests.
        limits: Per-connection limits announced in ``welcome``.
        heartbeat: Ping interval announced to clients (seconds).
        idempotency_ttl: How long command outcomes are kept.
        node_id: Identifies this node (leases, consumer groups); random by default.
            Give a restarted node its old id to let it take its unacknowledged
            group events back at once.
        outbox: Default :class:`~rtcore.engine.hub.OutboxLimits` of its subscribers'
            outboxes (WebSocket sessions and SSE streams).
        roles: Subset of :data:`ROLES`; only nodes with ``"processor"`` run
            processors and loops (the server enforces the others).
    """

    def __init__(
        self,
        app: App,
        backend: Backend | str = "memory://",
        *,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
        heartbeat: float = 15.0,
        token_grace: float = 10.0,
        idempotency_ttl: float = DEFAULT_TTL,
        idempotency_lease: float = DEFAULT_LEASE,
        node_id: str | None = None,
        outbox: OutboxLimits | None = None,
        roles: frozenset[str] = ROLES,
    ) -> None:
        if not roles <= ROLES:
            raise ValueError(f"unknown node roles {sorted(roles - ROLES)}; known: {sorted(ROLES)}")
        #: What this node does (see :data:`ROLES`).
        self.roles = frozenset(roles)
        self.app = app
        #: Send-queue bounds of subscribers (None: :class:`OutboxLimits` defaults).
        self.outbox: OutboxLimits | None = outbox
        self._backend_arg = backend
        self.backend: Backend = backend if isinstance(backend, Backend) else None  # type: ignore[assignment]
        self.clock = clock
        self.limits = limits or Limits()
        self.heartbeat = heartbeat
        self.token_grace = token_grace
        self.idempotency_ttl = idempotency_ttl
        self.idempotency_lease = idempotency_lease
        self.id = node_id or secrets.token_hex(4)
        self.hub: Hub = None  # type: ignore[assignment]
        self._tg: TaskGroup | None = None
        self._followers: dict[str, _Follower] = {}
        self._processors = Processors(self)
        self.timer_wakeup = anyio.Event()
        self.draining = False
        self.stats: dict[str, int] = {"replays": 0, "recovered": 0, "not_recovered": 0, "idempotent_replays": 0, "slow_consumers": 0}
        self._owns_backend = not isinstance(backend, Backend)
        #: Recorders read by ``GET /metrics`` (plain numbers; see :mod:`rtcore.engine.metrics`).
        self.metrics = NodeMetrics()
        #: Principals with live connections on this node (the server reports them).
        self.presence = Presence()
        #: What the app's lifespans provided while the node runs (``ctx.resources``).
        self.resources: dict[str, Any] = {}
        self._lifespan = contextlib.AsyncExitStack()

    # --- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Node:
        """Start: open the backend, run the app's lifespan startups, start the tasks.

        Raises:
            Exception: whatever a lifespan startup (or opening the backend)
                raised, unwrapped, after what had started was closed again.
        """
        if self.backend is None:
            self.backend = await open_backend(str(self._backend_arg))
        self.resources = {}
        self._lifespan = contextlib.AsyncExitStack()
        try:
            # Before the task group: a lifespan may open its own cancel scopes
            # or task groups, which must nest outside the node's.
            for factory in self.app.lifespans:
                provided = await self._lifespan.enter_async_context(factory(self))
                if provided:
                    clash = sorted(provided.keys() & self.resources.keys())
                    if clash:
                        raise ValueError(f"lifespan {factory!r} provides resources already provided: {clash}")
                    self.resources.update(provided)
        except BaseException:
            await self._shut_down()
            raise
        self.hub = Hub(self.backend.events, self._on_event, self._after_event)
        if self.app.states or self._processors.needs_feed:
            self.hub.feed.watch("*")
        self._cm = anyio.create_task_group()
        self._tg = await self._cm.__aenter__()
        # The feed registers with its engine when its task first runs; tg.start
        # returns once that task has run up to its first wait (see _run_feed), so
        # the first append is seen. (A bare checkpoint relied on asyncio's FIFO
        # scheduling; trio may resume this task before the feed's first step.)
        await self._tg.start(self._run_feed)
        try:
            await self._processors.start(self._tg)
        except BaseException:
            await self.__aexit__(None, None, None)  # stop what started; raise the cause unwrapped
            raise
        return self

    async def _run_feed(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # started() does not yield: this task goes on into feed.run() and
        # registers before the waiting __aenter__ can resume.
        task_status.started()
        await self.hub.feed.run()

    async def __aexit__(self, *exc: Any) -> bool | None:
        """Stop: cancel the tasks, then run the lifespan shutdowns in reverse, then close the backend."""
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._cm.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # The task group wraps the block's own error; with no task error
            # beside it, give the caller back the error its block raised.
            if exc[1] is not None and group.exceptions == (exc[1],):
                raise exc[1] from None
            raise
        finally:
            self._tg = None
            self._processors.stop()
            await self._shut_down()

    async def _shut_down(self) -> None:
        # Shielded: a node stopped by cancellation (a timeout, Ctrl-C in a
        # test) must still close what its lifespans opened. The stack exits
        # every lifespan even if one raises, and re-raises at the end.
        # The backend closes outside the shield: an engine such as coredis
        # entered its own task group when it opened (outside this scope), and
        # a cancel scope must be exited in the scope it was entered in.
        try:
            with anyio.CancelScope(shield=True):
                await self._lifespan.aclose()
        finally:
            self.resources = {}
            if self._owns_backend:
                await self.backend.aclose()

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``fn`` in the node's task group."""
        if self._tg is None:
            raise RuntimeError("the node is not running; use 'async with node:'")
        self._tg.start_soon(fn)

    def processor_depths(self) -> list[tuple[str, int]]:
        """Events waiting in each local processor's queue (its lag), by handler name."""
        # The processors module owns the queues; this is the one place that reads them.
        return [
            (getattr(spec.handler, "__qualname__", "?"), send.statistics().current_buffer_used)
            for spec, send in self._processors._queues
        ]

    def wake_timers(self) -> None:
        """Make every session re-check its deadlines (a fake clock moved)."""
        ev, self.timer_wakeup = self.timer_wakeup, anyio.Event()
        ev.set()

    # --- auth ------------------------------------------------------------------

    async def authenticate(self, token: str | None) -> Principal | None:
        """Turn a token into a principal with the app's hook.

        Raises:
            AuthError: ``unauthenticated``.
        """
        hook = self.app.hooks.authenticate
        if hook is None:
            return None
        try:
            result = await hook(token)
        except RtcoreError:
            raise
        except Exception as exc:
            log.exception("authenticate hook failed")
            raise AuthError("authentication failed") from exc
        if result is None:
            raise AuthError("token missing or refused" if token else "a token is required")
        if isinstance(result, str):
            return Principal(result)
        if not isinstance(result, Principal):
            raise TypeError("authenticate must return a Principal, a str or None")
        return result

    async def allowed(self, principal: Principal | None, action: str, resource: str) -> bool:
        """Ask the app's authorize hook (allow everything without one)."""
        hook = self.app.hooks.authorize
        if hook is None:
            return True
        return bool(await hook(principal, action, resource))

    # --- publishing ------------------------------------------------------------

    async def publish(
        self, stream: str, type: str, data: Any = None, *, key: str | None = None, expect: int | None = None
    ) -> Event:
        """Append an event (see :meth:`rtcore.Context.publish`)."""
        check_stream(stream)
        res = await self.backend.events.append(
            stream,
            type,
            msgspec.to_builtins(data),
            now=self.clock(),
            key=key,
            expect=expect,
            retention=self.app.retention_for(stream),
        )
        return res.event

    async def history(self, principal: Principal | None, stream: str, *, after: int, limit: int) -> ReadResult:
        """A page of history for the HTTP route (authorized as ``history``)."""
        check_stream(stream)
        if not await self.allowed(principal, "history", stream):
            raise AuthError(f"reading {stream!r} is not allowed", code="forbidden")
        return await self.backend.events.read(stream, after=after, limit=limit)

    # --- commands --------------------------------------------------------------

    async def dispatch(
        self,
        principal: Principal | None,
        name: str,
        args: Any,
        *,
        key: str | None = None,
        encoding: Literal["json", "msgpack"] = "json",
    ) -> Reply:
        """Run command ``name`` exactly once per idempotency key.

        Args:
            principal: Caller.
            name: Command name.
            args: Raw encoded arguments (``msgspec.Raw``/bytes in ``encoding``)
                or already-decoded builtins.
            key: Idempotency key (scope: the principal).
            encoding: Encoding of raw ``args``.

        Returns:
            The :class:`Reply`; this method does not raise for command errors.
        """
        try:
            spec = self.app.commands.get(name)
            if spec is None:
                raise BadRequest(f"no command named {name!r}", code="unknown_command")
            if not await self.allowed(principal, "command", name):
                raise AuthError(f"command {name!r} is not allowed", code="forbidden")
            value = self._decode_args(spec.args_type, args, encoding)
            if key is not None:
                check_key(key)
        except RtcoreError as exc:
            return Reply.error(exc)
        if key is None:
            return await self._execute(spec.handler, spec.args_type, principal, name, value, None)
        scope = scope_of(principal.id if principal else None)
        fp = fingerprint(name, value)
        now = self.clock()
        try:
            existing = await self.backend.idempotency.begin(scope, key, fp, now=now, lease=self.idempotency_lease)
            decision = decide(existing, fp)
        except RtcoreError as exc:
            return Reply.error(exc)
        if isinstance(decision, Replay):
            self.stats["idempotent_replays"] += 1
            return Reply.from_outcome(decision.outcome, replayed=True)
        reply = Reply.error(Unavailable("the command was cancelled", code="shutdown"))
        try:
            reply = await self._execute(spec.handler, spec.args_type, principal, name, value, f"{scope}:{key}")
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if reply.ok or not reply.retryable:
                        outcome = Outcome(True, reply.result) if reply.ok else Outcome(False, None, reply.code, reply.message, reply.http_status)
                        await self.backend.idempotency.finish(scope, key, outcome, now=self.clock(), ttl=self.idempotency_ttl, fingerprint=fp)
                    else:
                        await self.backend.idempotency.release(scope, key)
                except RtcoreError:
                    # The command ran; only its record could not be stored. Answer it:
                    # the pending claim expires after its lease and a retry re-executes,
                    # which appends nothing twice (publishes are keyed by the command key).
                    log.exception("could not store the outcome of %r under key %r", name, key)
        return reply

    @staticmethod
    def _decode_args(args_type: Any, args: Any, encoding: str) -> Any:
        target = Any if args_type is None else args_type
        try:
            if isinstance(args, msgspec.Raw | bytes | str):
                return codec_for(encoding).decode_value(args, target)
            return msgspec.convert(args, target)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid args: {exc}", code="bad_args") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"args are not valid {encoding}: {exc}", code="bad_args") from None

    async def _execute(
        self,
        handler: Callable[..., Awaitable[Any]],
        args_type: Any,
        principal: Principal | None,
        name: str,
        value: Any,
        publish_scope: str | None,
    ) -> Reply:
        ctx = _CommandContext(self, principal, name, publish_scope)
        try:
            result = await (handler(ctx) if args_type is None else handler(ctx, value))
            return Reply(True, msgspec.to_builtins(result))
        except RtcoreError as exc:
            return Reply.error(exc)
        except Exception:
            log.exception("command %r raised", name)
            return Reply.error(RtcoreError(f"command {name!r} failed unexpectedly", code="internal"))

    # --- subscriptions ---------------------------------------------------------

    async def subscribe(
        self,
        principal: Principal | None,
        stream: str,
        since: Position | None,
        outbox: EventSink,
        *,
        use_cursor: bool = False,  # resume from the server cursor only on request (sub.cursor)
        new_epoch: bool = False,
    ) -> Subscription:
        """Start a subscription with the catch-up → live handoff.

        The returned tail is already registered with the hub (live events are
        buffered). The caller sends ``subbed`` and ``snap``, then awaits
        ``sub.tail.fill()`` which replays history (paced by
        ``outbox.backlog``) and goes live (``outbox.live``).

        Args:
            principal: The subscriber.
            stream: The stream.
            since: Position to resume after (None: the stored cursor, if any).
            outbox: The subscriber's outbox (shared by its subscriptions);
                ``outbox.stale(stream)`` is called if the stream's history
                changes under the subscription.
            use_cursor: Resume from the principal's stored cursor when
                ``since`` is None.
            new_epoch: Resubscribing after a stale epoch.

        Raises:
            RtcoreError: ``bad_stream`` or ``forbidden``.
        """
        check_stream(stream)
        if not await self.allowed(principal, "subscribe", stream):
            raise AuthError(f"subscribing to {stream!r} is not allowed", code="forbidden")
        start = since
        if start is None and use_cursor and principal is not None:
            cur = await self.backend.cursors.get(principal.id, stream)
            if cur is not None:
                start = Position(cur[0], cur[1])
        info = await self.backend.events.info(stream)
        spec = self.app.state_for(stream)
        if new_epoch and info.first == 1 and spec is None:
            # The old history is void; the new one is complete: send all of it,
            # but say recovered=false so the client drops its old position.
            plan = Plan("replay", 0, False)
        else:
            plan = plan_resume(start, info, stateful=spec is not None)
        snap: Snap | None = None
        epoch, after = info.epoch, plan.after
        if plan.mode == "snapshot":
            follower = await self._follower(stream)
            st = follower.state
            epoch, after = st.epoch, st.offset
            snap = Snap(stream, st.epoch, st.offset, st.builtins(), st.checksum())
        if plan.mode == "replay":
            self.stats["replays"] += 1
        self.stats["recovered" if plan.recovered else "not_recovered"] += int(start is not None)
        tail = Tail(self.backend.events, stream, Delivery(epoch, after), outbox)
        self.hub.add(tail)
        # subbed.offset: with recovered=true, the head the replay leads to; otherwise
        # the position the client must jump to (events after it follow).
        offset = info.head if plan.recovered else after
        return Subscription(stream, epoch, offset, plan.recovered, snap, tail)

    async def store_ack(self, principal: Principal | None, stream: str, epoch: str, offset: int) -> None:
        """Remember a principal's cumulative ack as its server cursor."""
        if principal is not None:
            await self.backend.cursors.advance(principal.id, stream, epoch, offset)

    # --- stateful streams ------------------------------------------------------

    async def state_of(self, stream: str) -> StreamState:
        """The current folded state of a stateful stream."""
        return (await self._follower(stream)).state

    async def _follower(self, stream: str) -> _Follower:
        f = self._followers.get(stream)
        if f is None:
            f = self._start_follower(stream)
        await f.ready.wait()
        return f

    def _start_follower(self, stream: str) -> _Follower:
        spec = self.app.state_for(stream)
        assert spec is not None
        f = _Follower(stream, StreamState(spec, ""))
        self._followers[stream] = f
        self.spawn(lambda: self._load_follower(f))
        return f

    async def _load_follower(self, f: _Follower) -> None:
        spec = f.state.spec
        for attempt in range(1_000_000):
            try:
                snap = await self.backend.snapshots.get(f.stream)
                info = await self.backend.events.info(f.stream)
                break
            except RtcoreError:
                # Backend outage: keep the node alive and try again.
                log.warning("loading the state of %s failed (attempt %d)", f.stream, attempt + 1, exc_info=True)
                await anyio.sleep(min(0.1 * 2**attempt, 5.0))
        if snap is not None and snap.epoch == info.epoch and info.first - 1 <= snap.offset <= info.head:
            f.state = StreamState.from_snapshot(spec, snap)
        else:
            if info.first > 1:
                log.warning("state of %s: history before %d is gone and no snapshot covers it; folding from there", f.stream, info.first)
            f.state = StreamState(spec, info.epoch, info.first - 1)

        def stale() -> None:
            # History was lost (new epoch): the next offset-1 event starts a new follower.
            if self._followers.get(f.stream) is f:
                del self._followers[f.stream]
            if f.tail is not None:
                self.hub.remove(f.tail)

        f.node = self
        f.on_stale = stale
        f.tail = Tail(self.backend.events, f.stream, Delivery(f.state.epoch, f.state.offset), f)
        self.hub.add(f.tail)
        await f.tail.fill()
        f.ready.set()

    async def _store_snapshot(self, snapshot: Snapshot) -> None:
        # A snapshot is an optimisation: losing one to a backend outage must
        # not take the node down; the next one (snapshot_every later) is tried.
        try:
            await self.backend.snapshots.put(snapshot)
        except RtcoreError:
            log.warning("could not store the snapshot of %s at %d", snapshot.stream, snapshot.offset, exc_info=True)

    def _fresh_follower(self, stream: str, state: StreamState) -> None:
        old = self._followers.get(stream)
        if old is not None and old.tail is not None:
            self.hub.remove(old.tail)
        f = _Follower(stream, state)
        self._followers[stream] = f
        f.tail = Tail(self.backend.events, stream, Delivery(state.epoch, state.offset), f)
        f.tail.delivery.phase = Phase.LIVE
        f.node = self
        self.hub.add(f.tail)
        f.ready.set()

    def _fold(self, f: _Follower, event: Event) -> None:
        st = f.state
        st.apply(event)
        if st.snapshot_due:
            snapshot = st.snapshot(f.stream)
            self.spawn(lambda: self._store_snapshot(snapshot))
        if st.sync_due:
            frame = Sync(f.stream, st.offset, st.checksum(), st.epoch)
            frames = {"json": codec_for("json").encode(frame), "msgpack": codec_for("msgpack").encode(frame)}
            # Subscribers must get evt k before sync k, and the hub calls the tails
            # after this fold: park the sync until _after_event.
            f.pending_sync = (st.offset, frames)

    def _on_event(self, event: Event) -> None:
        if self.app.states:
            spec = self.app.state_for(event.stream)
            if spec is not None and self._tg is not None:
                f = self._followers.get(event.stream)
                if event.offset == 1 and (f is None or f.state.epoch != event.epoch):
                    # A new history starts: fold it from here, synchronously, so no
                    # event can be trimmed before the follower saw it.
                    self._fresh_follower(event.stream, StreamState(spec, event.epoch, 0))
                elif f is None:
                    self._start_follower(event.stream)
        self._processors.on_event(event)

    def _after_event(self, event: Event) -> None:
        if self.hub.subscribers(event.stream):
            # Once per event (not per subscriber): append -> fanned out here.
            now = self.clock()
            self.metrics.dispatch.observe(now - event.ts)
            self.metrics.heads[event.stream] = (event.offset, event.ts)
        # Send a parked ``sync`` once the event itself went to the tails.
        f = self._followers.get(event.stream)
        if f is not None and f.pending_sync is not None and f.pending_sync[0] == event.offset:
            offset, frames = f.pending_sync
            f.pending_sync = None
            self.hub.broadcast_sync(event.stream, offset, frames)


class _CommandContext(Context):
    """Context whose publishes are idempotent per command key.

    When the command has an idempotency key and a publish has none, the
    publish gets ``{scope}:{key}:{n}`` (n = its index in this execution). A
    command re-executed after a crash therefore appends nothing twice.
    """

    __slots__ = ("_n", "_scope")

    def __init__(self, node: Node, principal: Principal | None, command: str, scope: str | None) -> None:
        super().__init__(node, principal, command, scope)
        self._scope = scope
        self._n = 0

    async def publish(
        self, stream: str, type: str, data: Any = None, *, key: str | None = None, expect: int | None = None
    ) -> Event:
        if key is None and self._scope is not None:
            self._n += 1
            key = f"cmd:{self._scope}:{self._n}"
        return await self.node.publish(stream, type, data, key=key, expect=expect)


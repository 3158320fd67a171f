"""A node runs an :class:`~rtcore.engine.app.App` on a backend.

One node per process (or per test). It owns the backend's live feed and the
:class:`~rtcore.engine.hub.Hub`, folds stateful streams, runs processors, dispatches
commands through the idempotency layer, and starts subscriptions with the
catch-up → live handoff, and delivers direct messages (:meth:`Node.send_to`,
:mod:`rtcore.engine.direct`) to its principals' live connections. Transports (WebSocket, HTTP, SSE, in-process) are
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
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from ..backends import Backend, open_backend
from ..backends.base import Event, ReadResult, StreamInfo
from ..errors import AuthError, Rejected, RtcoreError
from ..protocol.backoff import backoff_delay
from ..protocol.frames import Limits, Position, Snap
from ..protocol.idempotency import DEFAULT_LEASE, DEFAULT_TTL
from ..protocol.state import StreamState
from ..protocol.streams import DEFAULT_CURSOR_TTL, Delivery, Plan, check_stream, plan_resume
from .app import App, Principal
from .direct import decode_envelope, encode_envelope
from .dispatch import Reply, dispatch
from .followers import Followers
from .hub import EventSink, Hub, OutboxLimits, Tail
from .metrics import NodeMetrics
from .presence import Presence
from .processors import Processors

__all__ = ["ROLES", "Node", "Reply", "SubscriptionStart"]

#: What a node can do: serve WebSocket/SSE (``gateway``), answer commands
#: (``api``), run processors and loops (``processor``).
ROLES: frozenset[str] = frozenset({"gateway", "api", "processor"})

log = logging.getLogger("rtcore.engine.node")


class SubscriptionStart:
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


class Node:
    """Runs an app on a backend.

    Args:
        app: The application.
        backend: A :class:`~rtcore.backends.Backend` or a URL (``memory://`` default).
        clock: Returns Unix time; :class:`rtcore.testing.FakeClock` in tests.
        limits: Per-connection limits announced in ``welcome``.
        heartbeat: Ping interval announced to clients (seconds).
        idempotency_ttl: How long command outcomes are kept.
        cursor_ttl: Seconds a principal's server cursor on a stream (its last
            stored ack) is kept after its last advance; then it is forgotten
            and a ``sub`` with ``cursor: true`` gets what a newcomer gets.
            Default :data:`~rtcore.protocol.streams.DEFAULT_CURSOR_TTL` (7 days).
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
        cursor_ttl: float = DEFAULT_CURSOR_TTL,
        node_id: str | None = None,
        outbox: OutboxLimits | None = None,
        roles: frozenset[str] = ROLES,
    ) -> None:
        if not roles <= ROLES:
            raise ValueError(f"unknown node roles {sorted(roles - ROLES)}; known: {sorted(ROLES)}")
        if not (0 < cursor_ttl < math.inf):
            raise ValueError(f"cursor_ttl must be a positive, finite number of seconds, got {cursor_ttl!r}")
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
        self.cursor_ttl = cursor_ttl
        self.id = node_id or secrets.token_hex(4)
        self.hub: Hub = None  # type: ignore[assignment]
        self._tg: TaskGroup | None = None
        self.followers: Followers = None  # type: ignore[assignment]  # made with the hub, on start
        self._processors = Processors(self)
        self.timer_wakeup = anyio.Event()
        self.draining = False
        self.stats: dict[str, int] = {"replays": 0, "recovered": 0, "not_recovered": 0, "idempotent_replays": 0, "slow_consumers": 0, "processor_retries": 0, "dead_letters": 0}
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
        self.followers = Followers(self.app, self.backend, self.hub, self.spawn)
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
            if "gateway" in self.roles:
                # Only nodes that hold connections listen for direct messages; started
                # before __aenter__ returns, so a message sent afterwards is not missed.
                await self._tg.start(self.backend.signals.listen(self._on_signal).run)
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
            AuthError: ``unauthenticated`` (no token, refused, the hook failed),
                or the app's code when the hook raised :class:`~rtcore.errors.Rejected`
                or :class:`~rtcore.errors.AuthError` (always HTTP status 401).
        """
        hook = self.app.hooks.authenticate
        if hook is None:
            return None
        try:
            result = await hook(token)
        except (AuthError, Rejected) as exc:
            # A refusal: 401 over HTTP (close 1008 over WebSocket) with the app's
            # own code (``bad_token``), not a Rejected's default 400.
            if isinstance(exc, AuthError) and exc.http_status != 400:
                raise
            raise AuthError(exc.message, code=exc.code, retryable=exc.retryable, http_status=401) from exc
        except RtcoreError:
            raise  # backend_unavailable, timeout...: not a refusal, keep the status
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

    async def send_to(self, principal_id: str, type: str, data: Any = None, *, room: str | None = None) -> None:
        """Send an ephemeral ``msg`` frame to every live connection of ``principal_id``, on every node.

        Nothing is stored: the principal's WebSocket connections open at that
        moment (on any node of the backend) get it at most once, with no
        offset and no order relative to stream events; a principal with no
        live connection never gets it, not even later (docs/architecture.md,
        "Direct messages"). Returns once the message is handed to the
        backend's signal bus, not when it is delivered.

        Args:
            principal_id: Whom to send it to.
            type: The application's message type (non-empty).
            data: Any msgspec-encodable payload.
            room: A room id for clients to route it by (:mod:`rtcore.rooms` sets it).

        Raises:
            BadRequest: an empty principal or type, or data that cannot be encoded.
            BackendError: the backend's bus is unreachable (nothing was sent).
        """
        await self.backend.signals.publish(encode_envelope(principal_id, type, data, room))

    def _on_signal(self, message: bytes) -> None:
        # Every listening node gets every message: keep only our principals'.
        msg = decode_envelope(message)
        if msg is None:
            return
        for receiver in self.presence.receivers(msg.principal_id):
            try:
                receiver(msg)
            except Exception:
                log.exception("direct message receiver %r failed", receiver)

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
        """Run command ``name`` exactly once per idempotency key (see :func:`.dispatch.dispatch`).

        Returns:
            The :class:`Reply`; this method does not raise for command errors.
        """
        return await dispatch(self, principal, name, args, key=key, encoding=encoding)

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
    ) -> SubscriptionStart:
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
            new_epoch: Resubscribing after a stale epoch (started by the
                server, not the client: a failed read of the stream is
                retried with backoff rather than raised).

        Raises:
            RtcoreError: ``bad_stream`` or ``forbidden``; or the backend's
                error (``backend_unavailable``...) of a client's subscribe
                (the client retries a retryable one).
        """
        check_stream(stream)
        if not await self.allowed(principal, "subscribe", stream):
            raise AuthError(f"subscribing to {stream!r} is not allowed", code="forbidden")
        start = since
        if start is None and use_cursor and principal is not None:
            cur = await self.backend.cursors.get(principal.id, stream, now=self.clock())
            if cur is not None:
                start = Position(cur[0], cur[1])
        spec = self.app.state_for(stream)
        events = self.backend.events
        if start is not None and not new_epoch:
            # A resume: register first, then one read gives both the stream's
            # shape for the plan and the first page of the replay (read after
            # registration, as Tail.fill would), instead of info() then read().
            tail = Tail(events, stream, Delivery(start.epoch, start.offset), outbox, reads=self.hub.reads)
            self.hub.add(tail)
            recent = self.hub.recent(stream, start.epoch, start.offset)
            if recent is not None and (recent.result.head == start.offset or self.app.retention_for(stream) is None):
                # Up to date or a few events behind (a reconnect storm after a
                # restart is mostly these): the missing events are in the hub's
                # memory and its feed brings every later one, no read needed.
                # Behind on a stream with retention, the backend decides: the
                # events may be trimmed (a snapshot or recovered=false, as
                # documented), whatever the hub still holds.
                self.stats["replays"] += 1
                self.stats["recovered"] += 1
                head = tail.prefetched(recent).head
                return SubscriptionStart(stream, start.epoch, head, True, None, tail)
            try:
                page = await tail.prefetch()
            except BaseException:
                self.hub.remove(tail)
                raise
            self.hub.note_head(stream, page.epoch, page.head)
            info = StreamInfo(page.epoch, page.head, page.first)
            plan = plan_resume(start, info, stateful=spec is not None)
            if plan.mode == "replay" and plan.after == start.offset and info.epoch == start.epoch:
                self.stats["replays"] += 1
                self.stats["recovered" if plan.recovered else "not_recovered"] += 1
                return SubscriptionStart(stream, info.epoch, info.head, plan.recovered, None, tail)
            # Another start (new epoch, trimmed, ahead of the head): plan from
            # this shape, read before the tail below registers, as info() would be.
            self.hub.remove(tail)
        elif new_epoch:
            info = await self._info_retrying(stream)
        else:
            info = await events.info(stream)
        if new_epoch and info.first == 1 and spec is None:
            # The old history is void; the new one is complete: send all of it,
            # but say recovered=false so the client drops its old position.
            plan = Plan("replay", 0, False)
        else:
            plan = plan_resume(start, info, stateful=spec is not None)
        snap: Snap | None = None
        epoch, after = info.epoch, plan.after
        if plan.mode == "snapshot":
            follower = await self.followers.get(stream)
            st = follower.state
            epoch, after = st.epoch, st.offset
            snap = Snap(stream, st.epoch, st.offset, st.builtins(), st.checksum())
        if plan.mode == "replay":
            self.stats["replays"] += 1
        self.stats["recovered" if plan.recovered else "not_recovered"] += int(start is not None)
        tail = Tail(events, stream, Delivery(epoch, after), outbox, reads=self.hub.reads)
        self.hub.add(tail)
        # subbed.offset: with recovered=true, the head the replay leads to; otherwise
        # the position the client must jump to (events after it follow).
        offset = info.head if plan.recovered else after
        return SubscriptionStart(stream, epoch, offset, plan.recovered, snap, tail)

    async def _info_retrying(self, stream: str) -> StreamInfo:
        """``events.info(stream)`` for a resubscription the server started
        (a new epoch under a live subscriber): nobody would ask again, so a
        failed read is logged and retried with backoff until it answers or
        the connection ends (the first read after a Redis restart may fail)."""
        attempt = 0
        while True:
            try:
                return await self.backend.events.info(stream)
            except RtcoreError as exc:
                if not exc.retryable:
                    raise
                attempt += 1
                delay = backoff_delay(attempt - 1, 0.05, 5.0)
                log.warning("resubscribing to %s in its new epoch: reading it failed (attempt %d, %s); retrying in %.2f s",
                            stream, attempt, exc.code, delay, exc_info=attempt == 1)
                await anyio.sleep(delay)

    async def store_ack(self, principal: Principal | None, stream: str, epoch: str, offset: int) -> None:
        """Remember a principal's cumulative ack as its server cursor (kept for ``cursor_ttl``)."""
        if principal is not None:
            await self.backend.cursors.advance(
                principal.id, stream, epoch, offset, now=self.clock(), ttl=self.cursor_ttl
            )

    # --- stateful streams ------------------------------------------------------

    async def state_of(self, stream: str) -> StreamState:
        """The current folded state of a stateful stream."""
        return (await self.followers.get(stream)).state

    async def state_at_least(self, stream: str, offset: int, *, epoch: str | None = None) -> StreamState:
        """The folded state of a stateful stream once this node's fold covers ``offset``.

        The local fold trails the backend by the live feed's delay: a caller
        that read the stream's head (``backend.events.info``) waits here until
        the fold got that far, woken by the fold itself. The wait has no
        bound of its own: put it in ``anyio.fail_after`` or ``move_on_after``.

        Args:
            stream: A stateful stream.
            offset: The offset the state must cover (at least).
            epoch: If given, the state must also be of this history (a fold
                of an older or newer epoch is waited past).

        Raises:
            RtcoreError: ``internal``: the stream's fold failed for good (an
                event or snapshot it cannot fold; logged once by the node).
        """
        return (await self.followers.at_least(stream, offset, epoch)).state

    def _on_event(self, event: Event) -> None:
        if self.app.states and self._tg is not None:
            self.followers.on_event(event)
        self._processors.on_event(event)

    def _after_event(self, event: Event) -> None:
        if self.hub.subscribers(event.stream):
            # Once per event (not per subscriber): append -> fanned out here.
            now = self.clock()
            self.metrics.dispatch.observe(now - event.ts)
            self.metrics.heads[event.stream] = (event.offset, event.ts)

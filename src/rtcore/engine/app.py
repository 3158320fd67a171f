"""The application API: commands, hooks, stream rules.

An :class:`App` is a declaration: which commands exist, how tokens become
principals, who may do what, how long streams keep history, which streams
have server-side state, which processors react to events. It holds no
connections and no storage; a :class:`~rtcore.engine.node.Node` runs it on a
backend. A :class:`Router` is a reusable group of commands (the wallet ships
one) mounted with :meth:`App.include`.

Lifespan: resources a handler needs for the whole life of a node (a database
pool, the wallet's store) are opened by *lifespan* context managers, as in
Starlette. ``@app.lifespan`` (or ``App(lifespan=...)``, or the same on a
:class:`Router`) registers a factory ``fn(node)`` returning an async context
manager; a :class:`~rtcore.engine.node.Node` enters them in registration
order when it starts, before it serves anything, and exits them in reverse
order when it stops, whatever ended it. What one yields (a mapping, or
``None``) is merged into ``node.resources``, which handlers read as
``ctx.resources``.

Command handlers are ``async def handler(ctx, args: T) -> result``. ``T`` is
read from the annotation once, at registration, and the arguments are decoded
straight into it (msgspec validates while decoding), so a bad field is a
``bad_args`` error naming its path before the handler runs.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from ..errors import AuthError
from ..protocol.state import StateSpec
from ..protocol.streams import matches
from ..protocol.types import Event, Retention

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "App",
    "CommandSpec",
    "Context",
    "Lifespan",
    "LoopSpec",
    "PresenceSpec",
    "Principal",
    "ProcessorSpec",
    "RouteHandler",
    "RouteSpec",
    "Router",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Streams whose retention/state answer an App remembers (see App._cache).
_LOOKUPS_KEPT = 8192
_MISSING: Any = object()

#: A lifespan factory: called with the starting node, returns an async context
#: manager whose ``__aenter__`` is the startup (it may return a mapping of
#: resources for ``ctx.resources``) and whose ``__aexit__`` is the shutdown.
Lifespan = Callable[["Node"], AbstractAsyncContextManager[Mapping[str, Any] | None]]


class Principal(msgspec.Struct, frozen=True):
    """Who is connected, as returned by ``@app.authenticate``.

    Attributes:
        id: Stable id of the user or service (cursors and idempotency keys are scoped by it).
        roles: Free-form roles (the wallet's admin commands need ``"admin"``).
        expires_at: Unix time the token expires (the session asks for a fresh one).
        claims: Anything else the application wants to keep.
    """

    id: str
    roles: frozenset[str] = frozenset()
    expires_at: float | None = None
    claims: dict[str, Any] = {}


@dataclass(frozen=True)
class CommandSpec:
    """A registered command."""

    name: str
    handler: Callable[..., Awaitable[Any]]
    args_type: Any


@dataclass(frozen=True)
class ProcessorSpec:
    """A registered event processor (``@app.on``)."""

    pattern: str
    handler: Callable[[Context, Event], Awaitable[Any]]
    group: str | None = None
    max_attempts: int = 5
    idle_timeout: float = 30.0
    #: Local processors only: ``accept(node, event)``, called in the node's feed
    #: (synchronously, must not raise); an event it refuses is not queued.
    accept: Callable[[Any, Event], bool] | None = None


@dataclass(frozen=True)
class LoopSpec:
    """A registered server-side loop (``@app.loop``)."""

    name: str
    handler: Callable[[Context], Awaitable[Any]]
    every: float
    lease: float = 10.0


def _args_type(fn: Callable[..., Any]) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2:
        return None  # handler takes no args
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable forward reference
        raise TypeError(f"cannot resolve the annotations of {fn.__qualname__}: {exc}") from exc
    return hints.get(params[1].name, Any)


class Router:
    """A group of commands that can be mounted on an :class:`App`.

    Args:
        lifespan: A lifespan factory (see :meth:`lifespan`) the router brings
            with it, so a library can open what its commands need.
    """

    def __init__(self, *, lifespan: Lifespan | None = None) -> None:
        self.commands: dict[str, CommandSpec] = {}
        #: Lifespan factories, in startup order (see :meth:`lifespan`).
        self.lifespans: list[Lifespan] = []
        if lifespan is not None:
            self.lifespan(lifespan)

    def lifespan(self, fn: F) -> F:
        """Register a lifespan: what a node opens when it starts and closes when it stops.

        ``fn(node)`` must return an async context manager; an async generator
        function is accepted too and wrapped with
        :func:`contextlib.asynccontextmanager`. Example::

            @app.lifespan
            async def database(node: rtcore.Node) -> AsyncIterator[dict[str, Any]]:
                pool = await open_pool()
                yield {"db": pool}  # handlers: ctx.resources["db"]
                await pool.close()  # runs even when the node stopped on an error

        A node enters its lifespans in registration order (those of an
        included router at the point of :meth:`App.include`) before it starts
        its tasks or serves anything; a startup that raises makes the node's
        ``__aenter__`` raise that error after the lifespans already entered
        were closed. When the node stops it exits them in reverse order,
        after its processors, loops and handlers have stopped, even if the
        block or a handler raised, shielded from cancellation: keep shutdown
        bounded. The generator form resumes after its ``yield`` without the
        block's exception, so its cleanup needs no ``try``/``finally``.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"lifespan must be callable, got {fn!r}")
        factory: Lifespan = contextlib.asynccontextmanager(fn) if inspect.isasyncgenfunction(fn) else fn
        self.lifespans.append(factory)
        return fn

    def command(self, name: str) -> Callable[[F], F]:
        """Register ``async def handler(ctx, args: T) -> result`` as command ``name``.

        Raises:
            ValueError: a command with that name exists already.
            TypeError: the handler is not a coroutine function.
        """

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"command {name!r}: handler must be an async def")
            if name in self.commands:
                raise ValueError(f"command {name!r} is already registered")
            self.commands[name] = CommandSpec(name, fn, _args_type(fn))
            return fn

        return register


#: A read-only HTTP route: ``async def handler(ctx, query) -> JSON-able result``
#: (``query``: the URL's query parameters, one value each).
RouteHandler = Callable[["Context", Mapping[str, str]], Awaitable[Any]]

#: Paths an app route may not take (the server's own routes).
_RESERVED_PATHS = ("/v1/ws", "/v1/cmd/", "/v1/streams/", "/v1/health", "/v1/schema", "/metrics")


@dataclass(frozen=True)
class RouteSpec:
    """An extra read-only HTTP route (made by :meth:`App.route`).

    Attributes:
        method: ``GET`` (``HEAD`` is answered too).
        path: The exact path.
        handler: ``async def handler(ctx, query) -> result``.
        action: The ``authorize`` action asked before the handler runs.
        resource: The ``authorize`` resource.
    """

    method: str
    path: str
    handler: RouteHandler
    action: str
    resource: str


@dataclass(frozen=True)
class PresenceSpec:
    """Stream presence for streams matching ``pattern`` (made by :meth:`App.presence`).

    Attributes:
        pattern: Glob of stream names.
        events: Publish coalesced ``presence`` events (``{"joined": [...],
            "left": [...]}``) to the stream when its subscribers change.
        interval: Seconds changes are coalesced over (one event per stream
            and interval at most).
    """

    pattern: str
    events: bool = False
    interval: float = 1.0


@dataclass
class _Hooks:
    authenticate: Callable[[str | None], Awaitable[Any]] | None = None
    authorize: Callable[[Principal | None, str, str], Awaitable[bool]] | None = None


class App(Router):
    """A real-time application: commands, hooks and stream rules.

    Example::

        app = rtcore.App()

        class Move(msgspec.Struct):
            room: str
            x: int

        @app.command("room.move")
        async def move(ctx: rtcore.Context, args: Move) -> int:
            ev = await ctx.publish(f"room:{args.room}", "moved", {"x": args.x})
            return ev.offset
    """

    def __init__(self, name: str = "rtcore", *, lifespan: Lifespan | None = None) -> None:
        super().__init__(lifespan=lifespan)
        self.name = name
        self.hooks = _Hooks()
        self.retentions: list[tuple[str, Retention]] = []
        self.states: list[StateSpec] = []
        self.processors: list[ProcessorSpec] = []
        self.loops: list[LoopSpec] = []
        self.pages: dict[str, tuple[str, bytes]] = {}
        self.routes: dict[str, RouteSpec] = {}
        self.presences: list[PresenceSpec] = []
        # Answers of retention_for/state_for per stream (see _cache).
        self._lookups: dict[str, tuple[int, dict[str, Any]]] = {}
        #: Extra sections of the admin page's data: ``name -> async fn(node)``.
        self.admin_sections: dict[str, Callable[[Any], Awaitable[Any]]] = {}

    def admin_section(self, name: str) -> Callable[[Callable[[Any], Awaitable[Any]]], Callable[[Any], Awaitable[Any]]]:
        """Register ``async def section(node) -> JSON-able`` as section ``name`` of ``/admin/api``.

        Plugins use it to show their state on the read-only admin page
        (``rtcore.rooms`` adds ``rooms``: the rooms this node runs). A section
        that raises is shown as ``{"error": ...}``; the rest of the page still works.
        """

        def register(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            self.admin_sections[name] = fn
            return fn

        return register

    def presence(self, pattern: str, *, events: bool = False, interval: float = 1.0) -> None:
        """Track who is subscribed to streams matching ``pattern`` (like Centrifugo's presence).

        Enables ``GET /v1/streams/{stream}/presence`` for those streams
        (authorized as ``presence`` on the stream): the principals subscribed
        over WebSocket or SSE, several connections of one principal counting
        once. With ``events=True`` the server also appends a ``presence`` event
        to the stream when its subscribers change, coalesced over ``interval``
        seconds: ``{"joined": [ids], "left": [ids]}``. Presence is each
        server's own view (see docs/architecture.md, "Stream presence").

        Raises:
            ValueError: ``interval`` is not positive.
        """
        if not interval > 0:
            raise ValueError(f"presence interval must be > 0 seconds, got {interval!r}")
        self.presences.append(PresenceSpec(pattern, events, float(interval)))

    def presence_for(self, stream: str) -> PresenceSpec | None:
        """The presence declaration covering ``stream`` (the first one that matches)."""
        for spec in self.presences:
            if matches(spec.pattern, stream):
                return spec
        return None

    def route(
        self, method: str, path: str, handler: RouteHandler | None = None, *, action: str = "read", resource: str | None = None
    ) -> Any:
        """Serve a read-only JSON route over HTTP (the ``api`` role), e.g. a listing.

        The server authenticates the Bearer token like every route, asks
        ``authorize(principal, action, resource)`` (``forbidden`` if it says
        no), calls ``handler(ctx, query)`` and answers ``200`` with the result
        as JSON; an :class:`~rtcore.errors.RtcoreError` from the handler is
        answered with its status and code. Plugins use it at install (the
        rooms' ``GET /v1/rooms``), so the server needs no import of them.
        Usable as a decorator: ``@app.route("GET", "/v1/things")``.

        Args:
            method: ``"GET"`` (routes are read-only: nothing else is accepted).
            path: The exact path, under ``/v1/``, not one of the server's own.
            handler: ``async def handler(ctx, query) -> result``.
            action: The ``authorize`` action (default ``"read"``).
            resource: The ``authorize`` resource (default: the path).

        Raises:
            ValueError: another method, a path outside ``/v1/`` or taken.
        """
        if method.upper() != "GET":
            raise ValueError(f"app routes are read-only: method must be GET, got {method!r}")
        if not path.startswith("/v1/") or any(path == r or (r.endswith("/") and path.startswith(r)) for r in _RESERVED_PATHS):
            raise ValueError(f"route path {path!r} must be under /v1/ and not clash with rtcore's routes")
        if path in self.routes:
            raise ValueError(f"route {path!r} is already registered")

        def register(fn: RouteHandler) -> RouteHandler:
            self.routes[path] = RouteSpec("GET", path, fn, action, resource if resource is not None else path)
            return fn

        return register(handler) if handler is not None else register

    def page(self, path: str, body: bytes | str, content_type: str = "text/html; charset=utf-8") -> None:
        """Serve a static page at ``path`` (``GET``), e.g. a demo client at ``/``."""
        if not path.startswith("/") or path.startswith("/v1/") or path == "/metrics":
            raise ValueError(f"page path {path!r} must start with '/' and not clash with rtcore's routes")
        self.pages[path] = (content_type, body.encode() if isinstance(body, str) else body)

    def include(self, router: Router) -> None:
        """Mount every command and lifespan of ``router`` on this app.

        The router's lifespans (registered before this call) run after the
        app's lifespans registered so far, in their order.

        Raises:
            ValueError: a command name clashes with one already registered.
        """
        for name in router.commands:
            if name in self.commands:
                raise ValueError(f"command {name!r} is already registered")
        self.commands.update(router.commands)
        self.lifespans.extend(router.lifespans)

    def authenticate(self, fn: Callable[[str | None], Awaitable[Any]]) -> Callable[[str | None], Awaitable[Any]]:
        """Register ``async def auth(token: str | None) -> Principal | str``.

        Return a :class:`Principal` (or a plain id string); return ``None`` or
        raise :class:`~rtcore.errors.AuthError` to refuse. Without this hook
        every connection is anonymous (principal ``None``).
        """
        self.hooks.authenticate = fn
        return fn

    def authorize(
        self, fn: Callable[[Principal | None, str, str], Awaitable[bool]]
    ) -> Callable[[Principal | None, str, str], Awaitable[bool]]:
        """Register ``async def authz(principal, action, resource) -> bool``.

        rtcore asks it with action ``"subscribe"`` (resource: the stream),
        ``"history"`` (the stream, over HTTP) and ``"command"`` (the command
        name); handlers ask it with their own actions through
        :meth:`Context.authorize`. Without this hook everything is allowed.
        """
        self.hooks.authorize = fn
        return fn

    def on(
        self,
        pattern: str,
        *,
        group: str | None = None,
        max_attempts: int = 5,
        idle_timeout: float = 30.0,
        accept: Callable[[Any, Event], bool] | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def processor(ctx, event)`` for streams matching ``pattern``.

        Without ``group`` the processor runs on every node with the
        ``processor`` role, fed by that node's live feed (best effort: events
        appended while no node runs are not replayed). With ``group`` each
        event is handled by ONE member of the group across all nodes, at least
        once: a member that crashes or hangs for ``idle_timeout`` seconds
        holding events loses them to another member, so the same event can be
        handled twice. **Handlers must be idempotent**: dedup on
        ``(event.stream, event.epoch, event.offset)``, e.g. with a unique key in
        the database they write to, or with ``ctx.publish(..., key=...)``.

        A handler that raises is retried with exponential backoff; after
        ``max_attempts`` tries (or deliveries, when members died holding it)
        the event's position and the error go to ``dlq:{group or handler
        name}`` and processing moves on.

        Args:
            pattern: Stream glob (``orders:*``).
            group: Consumer group name (one per app; see above).
            max_attempts: Tries before dead-lettering.
            idle_timeout: Seconds an unacknowledged event may stay with one
                member before another claims it; keep it well above the
                slowest handler run.
            accept: Local processors only: ``accept(node, event) -> bool``,
                called synchronously in the node's feed for each matching
                event; an event it refuses is never queued for the handler
                (a cheap filter that saves the queue and the task hop). It
                must be fast and must not raise.

        Raises:
            ValueError: the group name is already used by another processor,
                or ``accept`` is given with ``group``.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if group is not None and accept is not None:
            raise ValueError("accept filters a local processor's feed; a group processor has none")
        if group is not None and any(p.group == group for p in self.processors):
            raise ValueError(f"consumer group {group!r} is already used by another processor")

        def register(fn: F) -> F:
            self.processors.append(ProcessorSpec(pattern, fn, group, max_attempts, idle_timeout, accept))
            return fn

        return register

    def loop(self, name: str, every: float, *, lease: float = 10.0) -> Callable[[F], F]:
        """Register ``async def tick(ctx)`` to run every ``every`` seconds on ONE node.

        The node that holds the renewable lease ``loop:{name}`` (from the
        backend's lease store, renewed every ``lease / 3`` seconds) runs the
        ticks; when it stops or dies another node with the ``processor`` role
        takes over within about one lease period. Leases are time based, so
        a holder that freezes for longer than ``lease`` may overlap briefly
        with its successor: keep ticks idempotent.

        Raises:
            ValueError: a loop with that name exists, or a bad period.
        """
        if every <= 0 or lease <= 0:
            raise ValueError("every and lease must be > 0")
        if any(spec.name == name for spec in self.loops):
            raise ValueError(f"loop {name!r} is already registered")

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"loop {name!r}: handler must be an async def")
            self.loops.append(LoopSpec(name, fn, every, lease))
            return fn

        return register

    def retention(self, pattern: str, *, max_events: int | None = None, max_age: float | None = None) -> None:
        """Keep at most ``max_events`` and/or ``max_age`` seconds of history in matching streams.

        The first matching rule wins, in declaration order.
        """
        if max_events is None and max_age is None:
            raise ValueError("retention needs max_events and/or max_age")
        if max_events is not None and max_events < 1:
            raise ValueError("max_events must be >= 1")
        self.retentions.append((pattern, Retention(max_events, max_age)))

    def state(self, pattern: str, type: Any, *, snapshot_every: int = 100, sync_every: int = 10) -> None:
        """Declare that streams matching ``pattern`` fold their events into ``type``.

        ``type()`` must build the initial state and ``state.apply(event)`` fold
        one event. The node keeps the state, stores a snapshot every
        ``snapshot_every`` events, sends ``sync`` checksums every
        ``sync_every`` events, and answers a resume that history cannot cover
        with a ``snap``.
        """
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.states.append(StateSpec(pattern, type, snapshot_every, sync_every))

    def retention_for(self, stream: str) -> Retention | None:
        """The retention rule of ``stream``, if any."""
        cache = self._cache("retention", self.retentions)
        got = cache.get(stream, _MISSING)
        if got is _MISSING:
            got = cache[stream] = self._retention_for(stream)
        return cast("Retention | None", got)

    def _retention_for(self, stream: str) -> Retention | None:
        for pattern, rule in self.retentions:
            if matches(pattern, stream):
                return rule
        return None

    def state_for(self, stream: str) -> StateSpec | None:
        """The state declaration of ``stream``, if any."""
        cache = self._cache("state", self.states)
        got = cache.get(stream, _MISSING)
        if got is _MISSING:
            got = cache[stream] = self._state_for(stream)
        return cast("StateSpec | None", got)

    def _state_for(self, stream: str) -> StateSpec | None:
        for spec in self.states:
            if matches(spec.pattern, stream):
                return spec
        return None

    def _cache(self, kind: str, rules: list[Any]) -> dict[str, Any]:
        """The remembered answers of ``kind`` per stream, valid while ``rules`` keeps its length.

        Every append asks for its stream's retention and every dispatched
        event for its state, each a glob match per declaration: a measurable
        share of a room move (py-spy). Declarations are only ever appended
        (at setup), so a list of the same length gives the same answers;
        bounded, cleared when full.
        """
        cache = self._lookups.get(kind)
        if cache is None or cache[0] != len(rules) or len(cache[1]) >= _LOOKUPS_KEPT:
            cache = self._lookups[kind] = (len(rules), {})
        return cache[1]


class Context:
    """What a command handler or processor gets as its first argument.

    Attributes:
        node: The node running the command.
        principal: Who sent it (``None`` for anonymous).
        command: The command name (empty in processors).
        key: The command's idempotency key, if any.
        resources: What the app's lifespans provided (see :meth:`App.lifespan`).
    """

    __slots__ = ("command", "key", "node", "principal")

    def __init__(self, node: Node, principal: Principal | None, command: str = "", key: str | None = None) -> None:
        self.node = node
        self.principal = principal
        self.command = command
        self.key = key

    @property
    def app(self) -> App:
        """The application."""
        return self.node.app

    @property
    def resources(self) -> Mapping[str, Any]:
        """What the app's lifespans yielded, merged (``node.resources``)."""
        return self.node.resources

    def now(self) -> float:
        """The node's clock (a fake one under :mod:`rtcore.testing`)."""
        return self.node.clock()

    async def publish(
        self, stream: str, type: str, data: Any = None, *, key: str | None = None, expect: int | None = None
    ) -> Event:
        """Append an event to ``stream`` and fan it out.

        Args:
            stream: Stream name (``kind:id``).
            type: Event type.
            data: Any msgspec-encodable payload.
            key: Makes the append idempotent: the same key returns the same event.
            expect: Expected current head offset (``conflict`` if it moved).

        Returns:
            The stored :class:`~rtcore.backends.Event` (``.offset``, ``.epoch``).
        """
        return await self.node.publish(stream, type, data, key=key, expect=expect)

    async def send_to(self, principal_id: str, type: str, data: Any = None, *, room: str | None = None) -> None:
        """Send an ephemeral message to every live connection of ``principal_id``, on any node.

        Not stored and not replayed: see :meth:`rtcore.engine.node.Node.send_to`.
        A command re-executed after a crash (same idempotency key, its first
        attempt unfinished) sends it again; a replayed outcome does not.
        """
        await self.node.send_to(principal_id, type, data, room=room)

    async def authorize(self, action: str, resource: str) -> None:
        """Ask the app's ``@app.authorize`` hook; raise ``forbidden`` if it says no."""
        if not await self.node.allowed(self.principal, action, resource):
            raise AuthError(f"{action} on {resource!r} is not allowed", code="forbidden")

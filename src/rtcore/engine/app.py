"""The application API: commands, hooks, stream rules.

An :class:`App` is a declaration: which commands exist, how tokens become
principals, who may do what, how long streams keep history, which streams
have server-side state, which processors react to events. It holds no
connections and no storage; a :class:`~rtcore.engine.node.Node` runs it on a
backend. A :class:`Router` is a reusable group of commands (the wallet ships
one) mounted with :meth:`App.include`.

Command handlers are ``async def handler(ctx, args: T) -> result``. ``T`` is
read from the annotation once, at registration, and the arguments are decoded
straight into it (msgspec validates while decoding), so a bad field is a
``bad_args`` error naming its path before the handler runs.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

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
    "LoopSpec",
    "Principal",
    "ProcessorSpec",
    "Router",
]

F = TypeVar("F", bound=Callable[..., Any])


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
    """A group of commands that can be mounted on an :class:`App`."""

    def __init__(self) -> None:
        self.commands: dict[str, CommandSpec] = {}

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

    def __init__(self, name: str = "rtcore") -> None:
        super().__init__()
        self.name = name
        self.hooks = _Hooks()
        self.retentions: list[tuple[str, Retention]] = []
        self.states: list[StateSpec] = []
        self.processors: list[ProcessorSpec] = []
        self.loops: list[LoopSpec] = []
        self.pages: dict[str, tuple[str, bytes]] = {}
        self._running: list[Node] = []  # nodes currently running this app (rtcore.testing uses it)

    def page(self, path: str, body: bytes | str, content_type: str = "text/html; charset=utf-8") -> None:
        """Serve a static page at ``path`` (``GET``), e.g. a demo client at ``/``."""
        if not path.startswith("/") or path.startswith("/v1/") or path == "/metrics":
            raise ValueError(f"page path {path!r} must start with '/' and not clash with rtcore's routes")
        self.pages[path] = (content_type, body.encode() if isinstance(body, str) else body)

    def include(self, router: Router) -> None:
        """Mount every command of ``router`` on this app.

        Raises:
            ValueError: a command name clashes with one already registered.
        """
        for name, spec in router.commands.items():
            if name in self.commands:
                raise ValueError(f"command {name!r} is already registered")
            self.commands[name] = spec

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
        self, pattern: str, *, group: str | None = None, max_attempts: int = 5, idle_timeout: float = 30.0
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

        Raises:
            ValueError: the group name is already used by another processor.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if group is not None and any(p.group == group for p in self.processors):
            raise ValueError(f"consumer group {group!r} is already used by another processor")

        def register(fn: F) -> F:
            self.processors.append(ProcessorSpec(pattern, fn, group, max_attempts, idle_timeout))
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
        for pattern, rule in self.retentions:
            if matches(pattern, stream):
                return rule
        return None

    def state_for(self, stream: str) -> StateSpec | None:
        """The state declaration of ``stream``, if any."""
        for spec in self.states:
            if matches(spec.pattern, stream):
                return spec
        return None


class Context:
    """What a command handler or processor gets as its first argument.

    Attributes:
        node: The node running the command.
        principal: Who sent it (``None`` for anonymous).
        command: The command name (empty in processors).
        key: The command's idempotency key, if any.
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

    async def authorize(self, action: str, resource: str) -> None:
        """Ask the app's ``@app.authorize`` hook; raise ``forbidden`` if it says no."""
        if not await self.node.allowed(self.principal, action, resource):
            raise AuthError(f"{action} on {resource!r} is not allowed", code="forbidden")

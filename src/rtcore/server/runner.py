"""Serve an :class:`~rtcore.engine.app.App` over the network: routes, sessions, shutdown.

This module joins the three pieces: a :class:`~rtcore.engine.node.Node` (the app on
its backend), the transport in :mod:`rtcore.transport` (HTTP and WebSocket on one
port) and the session driver :func:`~rtcore.server.gateway.serve_session`. Every
route is a thin adapter over a node method, so WebSocket and HTTP share one
idempotency store, one hub and one set of error codes.

Routes: ``GET /v1/ws`` is the WebSocket upgrade (``rtcore.v1.json`` /
``rtcore.v1.msgpack``), served here; every HTTP route (commands, history,
SSE, presence, health, metrics, schema, the app's read-only routes and
pages) is in :mod:`rtcore.server.routes`.

Shutdown (SIGINT/SIGTERM or :meth:`Server.stop`), in order:

1. refuse new commands with ``shutdown`` (retryable; HTTP 503 + ``Retry-After``);
2. stop accepting: the listening socket closes, new upgrades get 503, idle
   keep-alive HTTP connections and SSE streams end;
3. every session waits for its in-flight commands (at most ``grace`` seconds,
   their clients get their ``ok``/``err``), then says ``bye``
   (``reconnect: true``) and closes with 1001;
4. the clients' replies to those close frames get one deadline,
   ``ServerLimits.close_timeout`` after the drain (and at most ``grace`` +
   ``close_timeout`` + 1 s after the start); whatever is still open then is
   closed by the transport (1001) and cancelled ``close_timeout`` later.

Limits: the message-size limit announced in ``welcome``
(``Limits.max_message_size``) is the transport's
``ServerLimits.max_message_bytes`` (close 1009 beyond it), and a client must
send ``hello`` within ``ServerLimits.handshake_timeout`` (``bye`` ``timeout``,
close 1008).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import signal
import ssl
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..backends import Backend
from ..engine.app import App
from ..engine.node import ROLES, Node
from ..protocol.frames import Limits
from ..transport import FrameTransport as _WsTransport
from ..transport import (
    HttpRequest,
    HttpResponse,
    ServerControl,
    ServerLimits,
    StreamingResponse,
    UpgradeRequest,
    WebSocketPolicy,
    serve,
)
from ..transport.http import format_peer
from .gateway import SessionTimers, serve_session
from .presence import PresenceAnnouncer
from .registry import SessionRegistry
from .routes import Routes, schema

__all__ = ["GC_ENV", "ROLES", "UVLOOP_ENV", "Server", "gc_tuning_wanted", "run", "schema", "tune_gc", "uvloop_wanted"]

log = logging.getLogger("rtcore.server")


def checked_roles(roles: frozenset[str]) -> frozenset[str]:
    """``roles`` as a frozenset, or ValueError unless it is a non-empty subset of :data:`ROLES`."""
    unknown = set(roles) - ROLES
    if unknown or not roles:
        raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}, got {sorted(roles)}")
    return frozenset(roles)


def announced_limits(limits: ServerLimits, session_limits: Limits | None) -> Limits:
    """The session limits to announce in ``welcome``: ``session_limits`` with the
    message size the transport really enforces (close 1009), not a promise of its own."""
    announced = session_limits or Limits()
    if limits.max_message_bytes is not None:
        announced = msgspec.structs.replace(announced, max_message_size=limits.max_message_bytes)
    return announced


class Server:
    """One rtcore server process: a node plus the HTTP/WebSocket listener.

    Args:
        app: The application.
        backend: Backend URL or instance (``memory://`` default).
        host: Address to bind.
        port: Port to bind (0 picks a free one; see :attr:`port`).
        ssl_context: Serve TLS with this context.
        allowed_origins: Browser ``Origin`` values allowed to open WebSockets
            (``None``: no check).
        roles: Which of ``gateway`` (WebSocket/SSE), ``api`` (HTTP commands and
            history) and ``processor`` (``@app.on`` and loops) this process runs.
        grace: Seconds in-flight commands get to finish on shutdown.
        limits: Transport limits (sizes, timeouts): :class:`~rtcore.transport.ServerLimits`.
        session_limits: Per-session protocol limits announced in ``welcome``
            (:class:`~rtcore.Limits`: subscriptions, command rate, idle
            timeout...). Its ``max_message_size`` is replaced by the
            transport's ``limits.max_message_bytes``, the limit really enforced.
        admin_token: Turns on the read-only admin page at ``/admin``; its data
            (``/admin/api``) needs this token as a bearer token. ``None``
            (default): no admin page.
        node_options: Passed to :class:`~rtcore.engine.node.Node` (``heartbeat``,
            ``token_grace``, ``outbox``, ``clock``...).
    """

    def __init__(
        self,
        app: App,
        *,
        backend: Backend | str = "memory://",
        host: str = "127.0.0.1",
        port: int = 8000,
        ssl_context: ssl.SSLContext | None = None,
        allowed_origins: list[str] | None = None,
        roles: frozenset[str] = ROLES,
        grace: float = 10.0,
        limits: ServerLimits | None = None,
        session_limits: Limits | None = None,
        admin_token: str | None = None,
        **node_options: Any,
    ) -> None:
        self.app = app
        self.backend = backend
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.roles = checked_roles(roles)
        self.grace = grace
        self.admin_token = admin_token or None
        self.limits = limits or ServerLimits()
        self.policy = WebSocketPolicy(
            paths=frozenset({"/v1/ws"}) if "gateway" in self.roles else frozenset(),
            allowed_origins=frozenset(allowed_origins) if allowed_origins else None,
        )
        node_options["limits"] = announced_limits(self.limits, session_limits)
        self.node_options = node_options
        self.control = ServerControl()
        self.node: Node | None = None
        #: The open sessions (WebSocket and SSE) of this server.
        self.sessions = SessionRegistry()
        self.routes: Routes | None = None
        #: Appends the presence events of this server's sessions (after startup).
        self.presence: PresenceAnnouncer | None = None
        self._timers: SessionTimers | None = None
        self._stopping = False
        self._done = anyio.Event()

    @property
    def port(self) -> int:
        """The bound port (after startup)."""
        return self.control.port

    async def wait_stopped(self) -> None:
        """Return once :meth:`serve` has returned (listener and node closed)."""
        await self._done.wait()

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` (or cancellation); reports the bound port."""
        try:
            await self._serve(task_status)
        finally:
            self._done.set()

    async def _serve(self, task_status: TaskStatus[int]) -> None:
        async with Node(self.app, self.backend, roles=self.roles, **self.node_options) as node:
            self.node = node
            self.routes = Routes(node, self.roles, self.sessions, admin_token=self.admin_token)
            self.presence = PresenceAnnouncer(node, self.sessions)
            self._timers = SessionTimers(node)
            async with anyio.create_task_group() as side:
                # Presence events of app.presence(..., events=True) streams, until the listener ends.
                side.start_soon(self.presence.run)
                # Every session's deadlines in one task (see SessionTimers).
                side.start_soon(self._timers.run)
                async with anyio.create_task_group() as tg:
                    port = await tg.start(
                        partial(
                            serve,
                            self._on_websocket,
                            self._on_http,
                            host=self.host,
                            port=self._port,
                            ssl_context=self.ssl_context,
                            limits=self.limits,
                            policy=self.policy,
                            control=self.control,
                        )
                    )
                    # Debug only: run() (what ``rtcore serve`` calls) logs the start once, with the URLs.
                    log.debug("listening on %s:%d (roles: %s)", self.host, port, ",".join(sorted(self.roles)))
                    task_status.started(port)
                side.cancel_scope.cancel()

    async def stop(self, grace: float | None = None, reason: str = "server shutdown") -> None:
        """Graceful shutdown (see the module docstring); returns when the server stopped.

        A second call while the first is running stops at once: open
        connections are closed by the transport without waiting.

        Args:
            grace: Seconds in-flight commands get (default: the server's ``grace``).
            reason: Close reason of connections the transport closes itself.
        """
        if self._stopping:
            await self.control.stop(0, reason)
            return
        self._stopping = True
        grace = self.grace if grace is None else grace
        node = self.node
        if node is None:
            await self.control.stop(0, reason)
            return
        node.draining = True
        # Stop accepting now. The transport's deadline (when it closes what is
        # still open by force) must leave every session time to say bye and
        # finish its close handshake itself: a forced close sends 1001
        # without the bye, and with thousands of connections it doubled the
        # work (a second close task per connection, waiting for the same
        # reply). So: far enough at first for the drain...
        close_timeout = self.limits.close_timeout
        self.control.begin_stop(grace + close_timeout + 1.0, reason)
        await self.sessions.drain(grace)
        # ...then one deadline for every peer's reply to the close frames the
        # sessions are sending now (each connection also drops its own peer
        # close_timeout after its close frame). stop() returns as soon as the
        # last connection ended, usually long before.
        await self.control.stop(grace=close_timeout, reason=reason)

    # --- WebSocket -------------------------------------------------------------

    def _on_websocket(self, transport: _WsTransport, request: UpgradeRequest) -> Coroutine[Any, Any, None]:
        # A plain function returning the session's coroutine: no frame of its own
        # stays alive per connection, nor the request (its header list and query
        # dict); the session needs two of its fields. run_websocket ends the
        # connection quietly on ConnectionClosed.
        assert self.node is not None
        return serve_session(
            self.node,
            transport,
            token=request.token,
            hello_timeout=self.limits.handshake_timeout,
            registry=self.sessions,
            peer=format_peer(request.peer),
            timers=self._timers,
        )

    # --- HTTP ------------------------------------------------------------------

    async def _on_http(self, request: HttpRequest) -> HttpResponse | StreamingResponse:
        assert self.routes is not None
        return await self.routes.handle(request)


def run(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: Backend | str = "memory://",
    ssl_context: ssl.SSLContext | None = None,
    allowed_origins: list[str] | None = None,
    roles: frozenset[str] = ROLES,
    grace: float = 10.0,
    on_ready: Callable[[int], None] | None = None,
    anyio_backend: str = "asyncio",
    use_uvloop: bool | None = None,
    gc_tuning: bool | None = None,
    **node_options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully (exit 0).

    Blocks; this is what ``rtcore serve`` calls. Arguments as for :class:`Server`,
    and ``anyio_backend``: the event loop, ``"asyncio"`` (default) or ``"trio"``;
    ``use_uvloop``: on asyncio, run on uvloop (see :func:`uvloop_wanted`; the
    default ``None`` means "when installed, unless ``RTCORE_UVLOOP=0``");
    ``gc_tuning``: once listening, call :func:`tune_gc` (the default ``None``
    means "unless ``RTCORE_GC_TUNING=0``", see :func:`gc_tuning_wanted`).

    Raises:
        ValueError: ``anyio_backend`` is neither ``"asyncio"`` nor ``"trio"``.
    """
    if anyio_backend not in ("asyncio", "trio"):
        raise ValueError(f"anyio_backend must be 'asyncio' or 'trio', not {anyio_backend!r}")
    server = Server(
        app,
        backend=backend,
        host=host,
        port=port,
        ssl_context=ssl_context,
        allowed_origins=allowed_origins,
        roles=roles,
        grace=grace,
        **node_options,
    )

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                bound = await tg.start(server.serve)
                if gc_tuning_wanted(gc_tuning):
                    tune_gc()
                # One start line; it names uvloop when it runs (RTCORE_UVLOOP=0 turns it off).
                _log_started(server, bound, anyio_backend, uvloop=bool(options))
                if on_ready is not None:
                    on_ready(bound)

                async def on_signals() -> None:
                    first = True
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if first:
                            log.info("received %s: shutting down (grace %g s; repeat to stop at once)", name, server.grace)
                        else:
                            log.warning("received %s again: stopping now", name)
                        first = False
                        tg.start_soon(server.stop)  # a second stop() closes everything at once

                async with anyio.create_task_group() as watcher:
                    watcher.start_soon(on_signals)
                    await server.wait_stopped()
                    watcher.cancel_scope.cancel()

    options = {"use_uvloop": True} if anyio_backend == "asyncio" and uvloop_wanted(use_uvloop) else {}
    anyio.run(main, backend=anyio_backend, backend_options=options)
    log.info("rtcore: stopped")


def _log_started(server: Server, port: int, loop: str, *, uvloop: bool = False) -> None:
    # The one "serving" line of a start (the CLI adds none of its own).
    host = server.host if ":" not in server.host else f"[{server.host}]"
    scheme, ws = ("https", "wss") if server.ssl_context is not None else ("http", "ws")
    log.info(
        "rtcore: serving %r on %s://%s:%d (WebSocket %s://%s:%d/v1/ws; roles: %s; event loop: %s)%s",
        server.app.name, scheme, host, port, ws, host, port, ",".join(sorted(server.roles)), loop,
        " on uvloop" if uvloop else "",
    )


#: Environment variable that turns the garbage-collector tuning of :func:`run` off
#: (``0``/``false``/``no``/``off``; it is on by default).
GC_ENV = "RTCORE_GC_TUNING"
#: The generation-0 threshold :func:`tune_gc` sets (CPython's default is 700).
GC_GEN0_THRESHOLD = 10_000


def gc_tuning_wanted(gc_tuning: bool | None = None) -> bool:
    """Whether :func:`run` tunes the garbage collector once it listens (on by default).

    Args:
        gc_tuning: ``True``/``False`` decide; ``None`` (default) reads
            ``RTCORE_GC_TUNING`` (``0``, ``false``, ``no`` or ``off`` turn it off).
    """
    if gc_tuning is None:
        return os.environ.get(GC_ENV, "").strip().lower() not in ("0", "false", "no", "off")
    return gc_tuning


def tune_gc(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Make the cyclic garbage collector run less often and cost less, for a long-running server.

    What the process allocated up to now (modules, the app, the backend, the
    listener) is moved to CPython's permanent generation with
    :func:`gc.freeze`, so full collections no longer walk it; and the
    generation-0 threshold goes from 700 to ``gen0`` allocations, so a busy
    server does not stop for a young collection every few commands. Objects
    without reference cycles are still freed at once by reference counting;
    only cyclic garbage waits for the (rarer) collections. Freezing after
    start-up and before serving is :func:`gc.freeze`'s documented use: what
    is frozen is never collected, so nothing created per connection or per
    room is frozen (the rooms and connections set up later stay collectable).

    :func:`run` calls it by default (``RTCORE_GC_TUNING=0`` or
    ``gc_tuning=False`` opt out). Measured with ``benchmarks/rooms.py``
    (CPU time of each collection, 2 shared vCPU at load 3-6): the collector's
    CPU per room move fell ~3x or more (21-56 → 6-21 µs at 200 ``memory://``
    rooms), and no full collection ran in any 6 s window (up to 7 per window
    untuned, 65-580 ms each); the price is longer young collections
    (generation 1 up to 143 ms instead of 37 at 1,000 rooms). The worst pause is a full collection in both settings,
    about the size of the live heap (a forced one: 64-698 ms), only rarer
    when tuned. The 2-minute RSS trend test passes either way (see
    ``docs/architecture.md``).

    Args:
        gen0: Allocations (minus deallocations) between two young collections.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)


#: Environment variable that turns uvloop off (``0``/``false``/``no``/``off``) or on.
UVLOOP_ENV = "RTCORE_UVLOOP"


def uvloop_wanted(use_uvloop: bool | None = None) -> bool:
    """Whether :func:`run` on asyncio uses uvloop (the ``rtcore[fast]`` extra).

    Args:
        use_uvloop: ``True``/``False`` decide; ``None`` (default) reads
            ``RTCORE_UVLOOP`` (``0``, ``false``, ``no`` or ``off`` turn it off)
            and otherwise uses uvloop when it is installed.

    Returns:
        True when uvloop should run the asyncio event loop. An explicit
        ``True`` without uvloop installed is False (asyncio's own loop runs).
    """
    if use_uvloop is None:
        use_uvloop = os.environ.get(UVLOOP_ENV, "").strip().lower() not in ("0", "false", "no", "off")
    return use_uvloop and importlib.util.find_spec("uvloop") is not None

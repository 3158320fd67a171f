"""Serve an :class:`~rtcore.engine.app.App` over the network: routes, sessions, shutdown.

This module joins the three pieces: a :class:`~rtcore.engine.node.Node` (the app on
its backend), the transport in :mod:`rtcore.transport` (HTTP and WebSocket on one
port) and the session driver :func:`~rtcore.server.gateway.serve_session`. Every
route is a thin adapter over a node method, so WebSocket and HTTP share one
idempotency store, one hub and one set of error codes.

Routes (DESIGN §7):

======================================  =========================================
``GET /v1/ws``                          WebSocket upgrade (``rtcore.v1.json`` / ``rtcore.v1.msgpack``)
``POST /v1/cmd/{name}``                 run a command (Bearer token, ``Idempotency-Key``)
``GET /v1/streams/{stream}``            history page (``after``, ``limit``)
``GET /v1/streams/{stream}/sse``        Server-Sent Events live tail (``Last-Event-ID: epoch:offset``)
``GET /v1/health``                      liveness and a few counters
``GET /metrics``                        Prometheus text exposition
``GET /v1/schema``                      JSON Schema of the frames and of each command's args
======================================  =========================================

Shutdown (SIGINT/SIGTERM or :meth:`Server.stop`), in order:

1. refuse new commands with ``shutdown`` (retryable; HTTP 503 + ``Retry-After``);
2. stop accepting: the listening socket closes, new upgrades get 503, idle
   keep-alive HTTP connections and SSE streams end;
3. every session waits for its in-flight commands (at most ``grace`` seconds,
   their clients get their ``ok``/``err``), then says ``bye``
   (``reconnect: true``) and closes with 1001;
4. whatever is still open ``grace`` + ``close_timeout`` later is closed by the
   transport (1001) and then cancelled.

Limits: the message-size limit announced in ``welcome``
(``Limits.max_message_size``) is the transport's
``ServerLimits.max_message_bytes`` (close 1009 beyond it), and a client must
send ``hello`` within ``ServerLimits.handshake_timeout`` (``bye`` ``timeout``,
close 1008).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import unquote

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..backends import Backend
from ..engine.app import App, Principal
from ..engine.hub import OutboxLimits
from ..engine.metrics import NodeMetrics, SessionStats
from ..engine.node import ROLES, Node
from ..errors import BadRequest, RtcoreError
from ..protocol import frames
from ..protocol.frames import Limits, Position
from ..transport import FrameTransport as _WsTransport
from ..transport import (
    HttpRequest,
    HttpResponse,
    ServerControl,
    ServerLimits,
    StreamingResponse,
    UpgradeRequest,
    WebSocketPolicy,
    error_response,
    json_response,
    serve,
)
from .gateway import ConnectionClosed, serve_session
from .registry import SessionRegistry
from .sse import SseStream

__all__ = ["ROLES", "Server", "run"]

log = logging.getLogger("rtcore.server.runner")


_MAX_PAGE = 1000


def _err(exc: RtcoreError) -> HttpResponse:
    # RFC 9110 §11.6.1: a 401 names the scheme the client should use.
    headers = [*exc.headers]
    if exc.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="rtcore"'))
    return error_response(exc.http_status, exc.code, exc.message, headers or None)


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
        **node_options: Any,
    ) -> None:
        unknown = set(roles) - ROLES
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}, got {sorted(roles)}")
        self.app = app
        self.backend = backend
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.roles = frozenset(roles)
        self.grace = grace
        self.limits = limits or ServerLimits()
        self.policy = WebSocketPolicy(
            paths=frozenset({"/v1/ws"}) if "gateway" in self.roles else frozenset(),
            allowed_origins=frozenset(allowed_origins) if allowed_origins else None,
        )
        limits_announced = session_limits or Limits()
        if self.limits.max_message_bytes is not None:
            # Clients are told the limit the transport really enforces (close 1009).
            limits_announced = msgspec.structs.replace(limits_announced, max_message_size=self.limits.max_message_bytes)
        node_options["limits"] = limits_announced
        self.node_options = node_options
        self.control = ServerControl()
        self.node: Node | None = None
        #: The open sessions (WebSocket and SSE) of this server.
        self.sessions = SessionRegistry()
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
                log.info("rtcore serving %s on %s:%d (roles: %s)", self.app.name, self.host, port, ",".join(sorted(self.roles)))
                task_status.started(port)

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
        # Stop accepting now; the transport's own deadline is later than ours so
        # the sessions say bye themselves before it closes anything by force.
        self.control.begin_stop(grace + 1.0, reason)
        await self.sessions.drain(grace)
        await self.control.stop(grace=1.0, reason=reason)

    # --- WebSocket -------------------------------------------------------------

    async def _on_websocket(self, transport: _WsTransport, request: UpgradeRequest) -> None:
        assert self.node is not None
        with contextlib.suppress(ConnectionClosed):
            await serve_session(
                self.node, transport, token=request.token, hello_timeout=self.limits.handshake_timeout, registry=self.sessions
            )

    # --- HTTP ------------------------------------------------------------------

    async def _on_http(self, request: HttpRequest) -> HttpResponse | StreamingResponse:
        assert self.node is not None
        path = request.path
        try:
            if path in ("/v1/health", "/metrics", "/v1/schema") and request.method not in ("GET", "HEAD"):
                return error_response(405, "method_not_allowed", f"use GET for {path}", [(b"allow", b"GET, HEAD")])
            if path == "/v1/health":
                return self._health()
            if path == "/metrics":
                return self._metrics()
            if path == "/v1/schema":
                return json_response(200, schema(self.app))
            if path.startswith("/v1/cmd/"):
                if "api" not in self.roles:
                    return error_response(404, "not_found", "this process does not serve the HTTP API (role)")
                if request.method != "POST":
                    return error_response(405, "method_not_allowed", "use POST for commands", [(b"allow", b"POST")])
                return await self._command(request, unquote(path[len("/v1/cmd/"):]))
            if path.startswith("/v1/streams/"):
                if request.method not in ("GET", "HEAD"):
                    return error_response(405, "method_not_allowed", "use GET", [(b"allow", b"GET")])
                rest = path[len("/v1/streams/"):]
                if rest.endswith("/sse"):
                    if "gateway" not in self.roles:
                        return error_response(404, "not_found", "this process does not serve live streams (role)")
                    return await self._sse(request, rest[: -len("/sse")])
                if "api" not in self.roles:
                    return error_response(404, "not_found", "this process does not serve the HTTP API (role)")
                return await self._history(request, rest)
            page = self.app.pages.get(path)
            if page is not None and request.method in ("GET", "HEAD"):
                return HttpResponse(200, [(b"content-type", page[0].encode())], page[1])
            return error_response(404, "not_found", f"no route for {request.method} {path}")
        except RtcoreError as exc:
            return _err(exc)

    async def _principal(self, request: HttpRequest) -> Principal | None:
        assert self.node is not None
        return await self.node.authenticate(request.token)

    async def _command(self, request: HttpRequest, name: str) -> HttpResponse:
        assert self.node is not None
        if self.node.draining:
            return error_response(503, "shutdown", "the server is shutting down; retry", [(b"retry-after", b"1")])
        principal = await self._principal(request)
        key = request.header("idempotency-key")
        body = request.body if request.body.strip() else b"null"
        started = time.perf_counter()
        try:
            reply = await self.node.dispatch(principal, name, body, key=key, encoding="json")
        except RtcoreError as exc:
            # dispatch answers command errors itself, but a backend failure while
            # it stores or releases the key escapes it; the documented command
            # error body still carries ``retryable`` (retry with the same key).
            return json_response(exc.http_status, {"code": exc.code, "message": exc.message, "retryable": exc.retryable})
        self.node.metrics.command(name in self.app.commands, name, "ok" if reply.ok else reply.code, time.perf_counter() - started)
        headers = [(b"idempotent-replayed", b"true")] if reply.replayed else []
        if reply.ok:
            return json_response(200, {"result": reply.result, "replayed": reply.replayed}, headers)
        return json_response(
            reply.http_status,
            {"code": reply.code, "message": reply.message, "retryable": reply.retryable},
            headers,
        )

    @staticmethod
    def _int_param(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name!r} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise BadRequest(f"query parameter {name!r} must be in {low}..{high}, got {value}")
        return value

    async def _history(self, request: HttpRequest, stream: str) -> HttpResponse:
        assert self.node is not None
        after = self._int_param(request, "after", 0, 0, 2**63 - 1)
        limit = self._int_param(request, "limit", 100, 1, _MAX_PAGE)
        principal = await self._principal(request)
        page = await self.node.history(principal, stream, after=after, limit=limit)
        return json_response(
            200,
            {
                "stream": stream,
                "epoch": page.epoch,
                "head": page.head,
                "first": page.first,
                "events": [{"offset": e.offset, "type": e.type, "data": e.data, "ts": e.ts} for e in page.events],
            },
        )

    async def _sse(self, request: HttpRequest, stream: str) -> StreamingResponse:
        assert self.node is not None
        since: Position | None = None
        raw = request.header("last-event-id") or request.query.get("since")
        if raw:
            epoch, sep, off = raw.rpartition(":")
            if not sep or not off.isdigit():
                raise BadRequest(f"Last-Event-ID must be 'epoch:offset', got {raw!r}")
            since = Position(epoch, int(off))
        principal = await self._principal(request)
        feed = SseStream(self.node, request, self.node.outbox or OutboxLimits(), self.sessions)
        await feed.start(principal, stream, since)
        return StreamingResponse(
            200,
            [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
            ],
            feed,
        )

    def _health(self) -> HttpResponse:
        assert self.node is not None
        return json_response(
            200,
            {
                "status": "draining" if self.node.draining else "ok",
                "node": self.node.id,
                "roles": sorted(self.roles),
                "sessions": len(self.sessions),
                "backend": self.node.backend.url.split("@")[-1],
            },
        )

    def _metrics(self) -> HttpResponse:
        from ..engine.metrics import render  # imported lazily: prometheus-client is only needed here

        assert self.node is not None
        body, content_type = render(_MetricsView(self.node, self.sessions))
        return HttpResponse(200, [(b"content-type", content_type.encode())], body)


class _MetricsView:
    """What ``/metrics`` reads: the node's recorders and the server's sessions."""

    def __init__(self, node: Node, sessions: SessionRegistry) -> None:
        self._node = node
        self._sessions = sessions

    @property
    def metrics(self) -> NodeMetrics:
        return self._node.metrics

    @property
    def stats(self) -> Mapping[str, int]:
        return self._node.stats

    @property
    def draining(self) -> bool:
        return self._node.draining

    @property
    def deliveries(self) -> int:
        return self._node.hub.delivered if self._node.hub is not None else 0

    @property
    def clock(self) -> Callable[[], float]:
        return self._node.clock

    def session_stats(self) -> Sequence[SessionStats]:
        return self._sessions.infos()

    def processor_depths(self) -> Iterable[tuple[str, int]]:
        return self._node.processor_depths()


class _CmdDoc(msgspec.Struct, frozen=True, tag_field="t", tag="cmd"):
    """Schema twin of :class:`~rtcore.protocol.frames.Cmd` (whose ``args`` stay raw bytes)."""

    id: frames.RequestId
    name: str
    args: Any = None
    key: str | None = None


_CLIENT_DOC = frames.Hello | frames.Auth | frames.Sub | frames.Unsub | _CmdDoc | frames.Ack | frames.Ping


def schema(app: App) -> dict[str, Any]:
    """JSON Schema of the wire frames and of every command's arguments."""
    client_frames = msgspec.json.schema(_CLIENT_DOC)
    server_frames = msgspec.json.schema(frames.ServerFrame)
    commands: dict[str, Any] = {}
    for name, spec in sorted(app.commands.items()):
        commands[name] = msgspec.json.schema(spec.args_type) if spec.args_type is not None else {"type": "null"}
    return {"protocol": frames.PROTOCOL_VERSION, "client_frames": client_frames, "server_frames": server_frames, "commands": commands}


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
    **node_options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully (exit 0).

    Blocks; this is what ``rtcore serve`` calls. Arguments as for :class:`Server`,
    and ``anyio_backend``: the event loop, ``"asyncio"`` (default; it has the
    WebSocket write fast path) or ``"trio"``.

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

    anyio.run(main, backend=anyio_backend)

"""Serve an :class:`~rtcore.engine.app.App` from any ASGI 3 server (uvicorn, hypercorn, Starlette mounts).

:class:`AsgiApp` is the ASGI counterpart of :class:`~rtcore.server.runner.Server`:
the same :class:`~rtcore.server.routes.Routes` answer HTTP, the same
:func:`~rtcore.server.gateway.serve_session` drives every WebSocket session, and
the same :class:`~rtcore.server.registry.SessionRegistry` lists sessions for
metrics and shutdown. Only the I/O differs: the ASGI server parses HTTP and
WebSocket framing, and :class:`AsgiWebSocket` hands its messages to the gateway
through the gateway's :class:`~rtcore.transport.FrameTransport` interface.

Routes are those of ``rtcore serve``: ``/v1/ws`` (subprotocols
``rtcore.v1.json`` / ``rtcore.v1.msgpack``), the HTTP routes and SSE. Mounted
under a prefix (Starlette ``Mount("/rt", ...)`` or ``uvicorn --root-path``) the
routes are matched on the path below ``scope["root_path"]``.

Lifecycle: the :class:`~rtcore.engine.node.Node` starts on ASGI
``lifespan.startup`` and stops on ``lifespan.shutdown`` (in-flight commands get
``grace`` seconds, sessions get ``bye`` and close 1001). When the host never
sends lifespan events (a Starlette ``Mount`` does not forward them), the node
starts on the first request in a background task and runs until the process
ends; forward the lifespan with :meth:`AsgiApp.lifespan` to stop it cleanly.
ASGI tells an app about shutdown only after the server is done with its
connections (uvicorn closes WebSockets with 1012 at once, hypercorn cancels
them after its ``graceful_timeout``), so sessions rarely get the ``bye``
``shutdown`` that ``rtcore serve`` sends; clients reconnect and resume.

Limits: the message-size limit (close 1009), the origin allowlist (403 before
the upgrade, through the ``websocket.http.response`` extension when the server
offers it, else by closing before accept, which ASGI servers answer with 403),
the hello deadline, the request-body limit (413), the send timeout and the
slow-consumer cut (``bye`` ``slow_consumer``, close 4008) are enforced here as
in ``rtcore serve``. The ASGI server buffers a whole message before handing it
over, so also set its own cap (uvicorn ``--ws-max-size``, hypercorn
``websocket_max_message_size``) near ``max_message_bytes``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Literal

import anyio

from ..backends import Backend
from ..engine.app import App
from ..engine.node import ROLES, Node
from ..errors import AuthError, BadRequest, ConnectionClosed, LimitExceeded, RtcoreError, Unavailable
from ..protocol.frames import Limits
from ..transport import (
    SUBPROTOCOLS,
    HttpRequest,
    HttpResponse,
    ServerLimits,
    Shutdown,
    StreamingResponse,
    error_response,
)
from ..transport.messages import bearer_token, split_target
from .gateway import serve_session
from .presence import PresenceAnnouncer
from .registry import SessionRegistry
from .routes import Routes
from .runner import announced_limits, checked_roles

__all__ = ["AsgiApp", "AsgiWebSocket", "asgi_app"]

log = logging.getLogger("rtcore.server.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Response headers the ASGI server frames itself.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class AsgiWebSocket:
    """A :class:`~rtcore.transport.FrameTransport` over an accepted ASGI WebSocket.

    The gateway reads with :meth:`receive`, writes with :meth:`send` (one ASGI
    ``websocket.send`` per frame; the server's ``send`` waits while its write
    buffer is full, which is the backpressure the session's outbox needs to
    detect a slow consumer) and ends with :meth:`close`.

    Args:
        receive: The connection's ASGI ``receive``.
        send: The connection's ASGI ``send``.
        encoding: ``"json"`` (text frames) or ``"msgpack"`` (binary frames).
        limits: ``max_message_bytes`` (close 1009 beyond it) and ``send_timeout``.
    """

    def __init__(self, receive: Receive, send: Send, encoding: Literal["json", "msgpack"], limits: ServerLimits) -> None:
        self.encoding: str = encoding
        self._receive = receive
        self._send = send
        self._limits = limits
        self._text = encoding == "json"
        self._closed: ConnectionClosed | None = None
        self._close_sent = False

    async def receive(self) -> bytes | str:
        """The next message (``str`` for text, ``bytes`` for binary).

        Raises:
            ConnectionClosed: The peer closed, or the message was larger than
                ``max_message_bytes`` (then this closed the connection with 1009).
        """
        if self._closed is not None:
            raise self._closed
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            data: bytes | str = text if text is not None else (message.get("bytes") or b"")
            limit = self._limits.max_message_bytes
            # A str of n characters is n to 4n UTF-8 bytes: encode only when that is not enough to decide.
            if limit is not None and (isinstance(data, bytes) or 4 * len(data) > limit):
                size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
                if size > limit:
                    reason = f"message of {size} bytes exceeds the limit of {limit}"
                    await self.close(1009, reason)
                    raise self._gone(1009, reason)
            return data
        if kind == "websocket.disconnect":
            raise self._gone(int(message.get("code", 1005)), str(message.get("reason") or ""))
        raise self._gone(1006, f"unexpected ASGI message {kind!r}")  # pragma: no cover - server bug

    async def send(self, frames: list[bytes]) -> None:
        """Send each item as one message.

        Raises:
            ConnectionClosed: The connection is closed, or the peer did not
                take the data within ``send_timeout`` (then it is closed).
        """
        if self._closed is not None or self._close_sent:
            raise self._closed or ConnectionClosed(1006, "closing")
        timeout = self._limits.send_timeout
        try:
            with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
                for frame in frames:
                    if self._text:
                        await self._send({"type": "websocket.send", "text": frame.decode("utf-8")})
                    else:
                        await self._send({"type": "websocket.send", "bytes": frame})
        except TimeoutError:
            await self.close(1011, "send timeout")
            raise self._gone(1006, "send timeout") from None
        except Exception as exc:
            # A connection that is gone: uvicorn raises ClientDisconnected (an OSError),
            # other servers their own errors (the ASGI spec leaves the type open).
            log.debug("ASGI send failed: %r", exc)
            raise self._gone(1006, str(exc) or type(exc).__name__) from None

    async def close(self, code: int, reason: str = "") -> None:
        """Send the close frame (once); the ASGI server finishes the handshake."""
        if self._close_sent or self._closed is not None:
            return
        self._close_sent = True
        with contextlib.suppress(Exception), anyio.move_on_after(self._limits.close_timeout):
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    def _gone(self, code: int, reason: str) -> ConnectionClosed:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
        return self._closed


class AsgiApp:
    """An ASGI 3 application serving one rtcore :class:`~rtcore.engine.app.App`.

    Arguments as for :class:`~rtcore.server.runner.Server` (without the
    listener's ``host``/``port``/``ssl_context``: the ASGI server owns them).

    Args:
        app: The application.
        backend: Backend URL or instance (``memory://`` default).
        allowed_origins: Browser ``Origin`` values allowed to open WebSockets
            (``None``: no check).
        roles: Which of ``gateway``, ``api`` and ``processor`` this process runs.
        grace: Seconds in-flight commands get to finish on shutdown.
        limits: Limits enforced here: ``max_message_bytes``, ``max_body_bytes``,
            ``handshake_timeout``, ``send_timeout``, ``close_timeout``.
        session_limits: Per-session limits announced in ``welcome``.
        node_options: Passed to :class:`~rtcore.engine.node.Node`.
    """

    def __init__(
        self,
        app: App,
        *,
        backend: Backend | str = "memory://",
        allowed_origins: list[str] | None = None,
        roles: frozenset[str] = ROLES,
        grace: float = 10.0,
        limits: ServerLimits | None = None,
        session_limits: Limits | None = None,
        **node_options: Any,
    ) -> None:
        self.app = app
        self.backend = backend
        self.allowed_origins = frozenset(allowed_origins) if allowed_origins else None
        self.roles = checked_roles(roles)
        self.grace = grace
        self.limits = limits or ServerLimits()
        node_options["limits"] = announced_limits(self.limits, session_limits)
        self.node_options = node_options
        #: The running node (None before startup and after shutdown).
        self.node: Node | None = None
        #: The open sessions (WebSocket and SSE).
        self.sessions = SessionRegistry()
        self.routes: Routes | None = None
        #: Whether the node was started lazily by a request (no lifespan from the host).
        self.started_lazily = False
        self._shutdown: Shutdown | None = None
        self._ready: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._failed: BaseException | None = None
        self._lazy_done = anyio.Event()

    # --- lifecycle ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, *_: Any) -> AsyncIterator[None]:
        """Run the node for the block (enter and exit in the same task).

        For hosts that do not forward ASGI lifespan to mounted apps::

            rt = rtcore.asgi.asgi_app(app)
            web = Starlette(routes=[Mount("/rt", rt)], lifespan=rt.lifespan)
        """
        if self._ready is not None and self.node is not None:
            raise RuntimeError("this AsgiApp's node is already running (lifespan entered twice?)")
        stop = anyio.Event()
        self._stop = stop
        self._ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(self._run_node, stop)
            try:
                yield
            finally:
                await self._drain()
                stop.set()

    async def _run_node(self, stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ready = self._ready
        assert ready is not None
        try:
            async with Node(self.app, self.backend, roles=self.roles, **self.node_options) as node:
                self._shutdown = Shutdown()
                self.node = node
                self.routes = Routes(node, self.roles, self.sessions)
                presence = PresenceAnnouncer(node, self.sessions)
                async with anyio.create_task_group() as side:
                    side.start_soon(presence.run)
                    log.info("rtcore %s serving over ASGI (roles: %s)", self.app.name, ",".join(sorted(self.roles)))
                    ready.set()
                    task_status.started()
                    await stop.wait()
                    side.cancel_scope.cancel()
        except BaseException as exc:
            self._failed = exc
            ready.set()
            raise
        finally:
            self.node = None
            self.routes = None

    async def _drain(self) -> None:
        node, shutdown = self.node, self._shutdown
        if node is None or shutdown is None:
            return
        node.draining = True
        shutdown.begin(self.grace + 1.0)
        with anyio.move_on_after(self.grace + 2.0):
            await self.sessions.drain(self.grace)

    async def _ensure_started(self) -> None:
        """Start the node on the first request when the host sent no lifespan."""
        if self._ready is None:
            self._ready = anyio.Event()
            self._stop = anyio.Event()
            self.started_lazily = True
            log.info("no ASGI lifespan from the host: starting the node on the first request")
            _spawn_detached(self._run_node_logged, self._stop)
        await self._ready.wait()
        if self.node is None:
            raise RtcoreError("the rtcore node failed to start") from self._failed

    async def _run_node_logged(self, stop: anyio.Event) -> None:
        try:
            await self._run_node(stop)
        except Exception:
            log.exception("the rtcore node (started on first request) failed")
        finally:
            self._lazy_done.set()

    async def aclose(self) -> None:
        """Stop a node that was started lazily (by a request, without lifespan).

        Sessions get ``bye`` (``shutdown``) and close 1001 after in-flight
        commands finished (``grace``), then the node stops. Does nothing when
        the node runs under the ASGI lifespan (the host stops it) or never started.
        """
        if not self.started_lazily or self._stop is None or self._stop.is_set():
            return
        await self._drain()
        self._stop.set()
        await self._lazy_done.wait()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        started = False
        try:
            async with self.lifespan():
                started = True
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
                assert message["type"] == "lifespan.shutdown"
        except Exception as exc:
            # The host prints the message and exits; the traceback goes to our log.
            log.exception("rtcore node %s failed", "shutdown" if started else "startup")
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": f"rtcore: {_unwrap(exc)!r}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # --- ASGI --------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._ensure_started()
        path = _route_path(scope)
        if kind == "websocket":
            await self._websocket(scope, path, receive, send)
        elif kind == "http":
            await self._http(scope, path, receive, send)

    # --- WebSocket -----------------------------------------------------------------

    async def _websocket(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        node, shutdown = self.node, self._shutdown
        assert node is not None and shutdown is not None
        headers: list[tuple[bytes, bytes]] = [(bytes(k).lower(), bytes(v)) for k, v in scope.get("headers", ())]
        try:
            if path != "/v1/ws" or "gateway" not in self.roles:
                raise BadRequest(f"no WebSocket endpoint at {path}", code="not_found")
            if shutdown.started:
                raise Unavailable("the server is shutting down", code="shutdown")
            encoding, subprotocol = self._negotiate(scope, headers)
        except RtcoreError as exc:
            await _refuse(scope, send, exc)
            return
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        query = split_target(b"/?" + bytes(scope.get("query_string", b"")))[2]
        transport = AsgiWebSocket(receive, send, encoding, self.limits)
        with contextlib.suppress(ConnectionClosed):
            await serve_session(
                node,
                transport,
                token=bearer_token(headers, query),
                hello_timeout=self.limits.handshake_timeout,
                registry=self.sessions,
            )

    def _negotiate(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> tuple[Literal["json", "msgpack"], str | None]:
        # Same rules and errors as rtcore.transport.handshake.negotiate; the ASGI
        # server already checked the key and version.
        if self.allowed_origins is not None:
            origins = [v.decode("latin-1") for k, v in headers if k == b"origin"]
            origin = origins[0] if len(origins) == 1 else None
            if origin is None or origin not in self.allowed_origins:
                raise AuthError(f"origin {origin!r} is not allowed", code="forbidden")
        offered = [p.strip() for p in scope.get("subprotocols", ()) if p.strip()]
        if not offered:
            return "json", None
        chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
        if chosen is None:
            raise BadRequest(f"no supported subprotocol offered (supported: {', '.join(SUBPROTOCOLS)})")
        return SUBPROTOCOLS[chosen], chosen

    # --- HTTP ----------------------------------------------------------------------

    async def _http(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        routes, shutdown = self.routes, self._shutdown
        assert routes is not None and shutdown is not None
        method = str(scope["method"]).upper()
        headers: list[tuple[bytes, bytes]] = [(bytes(k).lower(), bytes(v)) for k, v in scope.get("headers", ())]
        if path == "/v1/ws" and "gateway" in self.roles:
            await _respond(send, error_response(426, "bad_request", "this path only speaks WebSocket", [(b"upgrade", b"websocket")]), head_only=method == "HEAD")
            return
        try:
            body = await self._read_body(receive, headers)
        except RtcoreError as exc:
            await _respond(send, error_response(exc.http_status, exc.code, exc.message, list(exc.headers) or None), method == "HEAD")
            return
        except _Disconnected:
            return
        client = scope.get("client")
        raw_path = bytes(scope.get("raw_path") or path.encode("utf-8"))
        request = HttpRequest(
            method=method,
            path=path,
            raw_path=raw_path,
            query=split_target(b"/?" + bytes(scope.get("query_string", b"")))[2],
            headers=headers,
            body=body,
            peer=(str(client[0]), int(client[1])) if client else None,
            http_version=str(scope.get("http_version", "1.1")),
            shutdown=shutdown,
        )
        try:
            response = await routes.handle(request)
        except Exception:
            log.exception("HTTP handler failed: %s %s", method, path)
            response = error_response(500, "internal", "internal server error")
        if isinstance(response, StreamingResponse):
            await _stream(receive, send, response, method == "HEAD", self.limits)
        else:
            await _respond(send, response, method == "HEAD")

    async def _read_body(self, receive: Receive, headers: list[tuple[bytes, bytes]]) -> bytes:
        limit = self.limits.max_body_bytes
        too_big = LimitExceeded(f"request body larger than {limit} bytes", code="message_too_big")
        for name, value in headers:
            if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
                raise too_big
        body = bytearray()
        with anyio.fail_after(self.limits.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                body += message.get("body", b"")
                if len(body) > limit:
                    raise too_big
                if not message.get("more_body", False):
                    return bytes(body)


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: the error a person should read."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Disconnected(Exception):
    """The HTTP client left before its request body arrived."""


def _route_path(scope: Scope) -> str:
    """The path below the mount point (``root_path``), as Starlette routes it."""
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    return path


async def _respond(send: Send, response: HttpResponse, head_only: bool) -> None:
    headers = [(k, v) for k, v in response.headers if k.lower() not in _FRAMING]
    headers.append((b"content-length", b"%d" % len(response.body)))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else response.body})


async def _stream(receive: Receive, send: Send, response: StreamingResponse, head_only: bool, limits: ServerLimits) -> None:
    """Write an SSE body chunk by chunk until it ends or the client leaves."""
    headers = [(k, v) for k, v in response.headers if k.lower() not in _FRAMING]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    chunks = aiter(response.body)
    try:
        if not head_only:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                async for chunk in chunks:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                tg.cancel_scope.cancel()
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(limits.close_timeout):
                await aclose()
    with contextlib.suppress(Exception):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _refuse(scope: Scope, send: Send, exc: RtcoreError) -> None:
    """Refuse an upgrade with the error's HTTP status, or a close before accept."""
    if "websocket.http.response" in scope.get("extensions", {}):
        response = error_response(exc.http_status, exc.code, exc.message, list(exc.headers) or None)
        headers = [*response.headers, (b"content-length", b"%d" % len(response.body))]
        await send({"type": "websocket.http.response.start", "status": response.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        # ASGI servers answer a close before accept with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})


def _spawn_detached(fn: Callable[[anyio.Event], Coroutine[Any, Any, None]], arg: anyio.Event) -> None:
    """Run ``fn(arg)`` in a task that outlives the request that started it.

    anyio has no task group that outlives a request, so this uses the event
    loop's own: an asyncio task, or a trio system task.
    """
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: the only other loop anyio runs on is trio
        import trio

        trio.lowlevel.spawn_system_task(fn, arg)
        return
    task = loop.create_task(fn(arg))
    _DETACHED.add(task)  # a task nobody references may be garbage-collected mid-run
    task.add_done_callback(_DETACHED.discard)


_DETACHED: set[Any] = set()


def asgi_app(app: App, **options: Any) -> AsgiApp:
    """An ASGI 3 application serving ``app`` (``/v1/ws``, HTTP routes, SSE).

    Run it with any ASGI server, or mount it::

        from rtcore.asgi import asgi_app
        rt = asgi_app(app, backend="sqlite:///rt.db")
        # uvicorn mymod:rt    |  hypercorn mymod:rt
        # Starlette(routes=[Mount("/rt", rt)], lifespan=rt.lifespan)

    Args:
        app: The application.
        options: As for :class:`AsgiApp`.
    """
    return AsgiApp(app, **options)

"""The HTTP routes of a server: thin adapters over node methods.

:class:`Routes` answers every HTTP request that is not a WebSocket upgrade
(the :class:`~rtcore.server.runner.Server` owns the lifecycle and hands
requests here). Routes:

======================================  =========================================
``POST /v1/cmd/{name}``                 run a command (Bearer token, ``Idempotency-Key``)
``GET /v1/streams/{stream}``            history page (``after``, ``limit``); authorized as ``history``
``GET /v1/streams/{stream}/sse``        Server-Sent Events live tail (``Last-Event-ID: epoch:offset``)
``GET /v1/streams/{stream}/presence``   who is subscribed (by principal); authorized as ``presence``
``GET /admin``, ``GET /admin/api``       read-only admin page and its data (only with an admin token)
``GET /v1/health``                      liveness and a few counters
``GET /metrics``                        Prometheus text exposition
``GET /v1/schema``                      JSON Schema of the frames and of each command's args and result
``GET /v1/asyncapi.json``               AsyncAPI 3.0 document of the WebSocket protocol and the commands
``GET /v1/client.js``, ``/v1/client.d.ts``  the JavaScript client (``clients/js`` in the repository)
``GET <app.route path>``                read-only routes registered with :meth:`App.route
                                        <rtcore.engine.app.App.route>` (e.g. ``GET /v1/rooms``)
``GET <app.page path>``                 static pages (:meth:`App.page <rtcore.engine.app.App.page>`)
======================================  =========================================

Roles: commands, history, presence and app routes need ``api``; SSE needs
``gateway``; a process without the role answers 404.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote

import msgspec

from ..engine.app import App, Context, Principal, RouteSpec
from ..engine.hub import OutboxLimits
from ..engine.metrics import NodeMetrics, SessionStats
from ..engine.node import Node
from ..errors import AuthError, BadRequest, RtcoreError
from ..logs import COMMAND, emit
from ..protocol.frames import Position
from ..protocol.streams import check_stream
from ..transport import HttpRequest, HttpResponse, StreamingResponse, error_response, json_response
from .asyncapi import asyncapi, schema
from .presence import stream_presence
from .registry import SessionRegistry
from .sse import SseStream

__all__ = ["Routes", "schema"]

_MAX_PAGE = 1000

#: The JavaScript client, shipped as package data (``rtcore/server/static``; ``clients/js``
#: in the repository links to it): path -> (file, content type).
_CLIENT_ASSETS = {
    "/v1/client.js": ("rtcore.js", "text/javascript; charset=utf-8"),
    "/v1/client.d.ts": ("rtcore.d.ts", "application/typescript; charset=utf-8"),
}


@functools.cache
def _client_asset(path: str) -> HttpResponse:
    name, content_type = _CLIENT_ASSETS[path]
    body = importlib.resources.files("rtcore.server").joinpath("static", name).read_bytes()
    # Five minutes: a page load reuses it, a server upgrade reaches browsers soon after.
    headers = [(b"content-type", content_type.encode()), (b"cache-control", b"public, max-age=300")]
    return HttpResponse(200, headers, body)


def _err(exc: RtcoreError) -> HttpResponse:
    # RFC 9110 §11.6.1: a 401 names the scheme the client should use.
    headers = [*exc.headers]
    if exc.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="rtcore"'))
    return error_response(exc.http_status, exc.code, exc.message, headers or None)


class Routes:
    """The HTTP routes of one server process.

    Args:
        node: The running node.
        roles: The process's roles (``api``, ``gateway``, ``processor``).
        sessions: The server's live sessions (health, metrics, SSE drain).
    """

    def __init__(self, node: Node, roles: frozenset[str], sessions: SessionRegistry, *, admin_token: str | None = None) -> None:
        self.node = node
        self.app: App = node.app
        self.roles = roles
        self.sessions = sessions
        self.admin_token = admin_token

    async def handle(self, request: HttpRequest) -> HttpResponse | StreamingResponse:
        path = request.path
        try:
            if path in ("/v1/health", "/metrics", "/v1/schema", "/v1/asyncapi.json") and request.method not in ("GET", "HEAD"):
                return error_response(405, "method_not_allowed", f"use GET for {path}", [(b"allow", b"GET, HEAD")])
            if path == "/v1/health":
                return self._health()
            if path == "/metrics":
                return self._metrics()
            if path == "/v1/schema":
                return json_response(200, schema(self.app))
            if path == "/v1/asyncapi.json":
                return json_response(200, asyncapi(self.app, host=request.header("host") or "localhost:8000"))
            if path in _CLIENT_ASSETS and request.method in ("GET", "HEAD"):
                return _client_asset(path)
            if path == "/admin" or path.startswith("/admin/"):
                from . import admin  # the page is a few kB: loaded on first use

                metrics = self._metrics().body.decode() if self.admin_token and path == "/admin/api" else ""
                return await admin.handle(request, self.admin_token, self.node, self.sessions, self.roles, metrics)
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
                if rest.endswith("/presence"):
                    if "api" not in self.roles:
                        return error_response(404, "not_found", "this process does not serve the HTTP API (role)")
                    return await self._presence(request, rest[: -len("/presence")])
                if rest.endswith("/sse"):
                    if "gateway" not in self.roles:
                        return error_response(404, "not_found", "this process does not serve live streams (role)")
                    return await self._sse(request, rest[: -len("/sse")])
                if "api" not in self.roles:
                    return error_response(404, "not_found", "this process does not serve the HTTP API (role)")
                return await self._history(request, rest)
            route = self.app.routes.get(path)
            if route is not None:
                if request.method not in ("GET", "HEAD"):
                    return error_response(405, "method_not_allowed", f"use GET for {path}", [(b"allow", b"GET, HEAD")])
                if "api" not in self.roles:
                    return error_response(404, "not_found", "this process does not serve the HTTP API (role)")
                return await self._app_route(request, route)
            page = self.app.pages.get(path)
            if page is not None and request.method in ("GET", "HEAD"):
                return HttpResponse(200, [(b"content-type", page[0].encode())], page[1])
            return error_response(404, "not_found", f"no route for {request.method} {path}")
        except RtcoreError as exc:
            return _err(exc)

    async def _principal(self, request: HttpRequest) -> Principal | None:
        return await self.node.authenticate(request.token)

    async def _command(self, request: HttpRequest, name: str) -> HttpResponse:
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
        elapsed = time.perf_counter() - started
        self.node.metrics.command(name in self.app.commands, name, "ok" if reply.ok else reply.code, elapsed)
        if COMMAND.isEnabledFor(logging.DEBUG):
            emit(
                COMMAND, logging.DEBUG, "command", name=name, key=key, via="http",
                principal=principal.id if principal is not None else None, duration_ms=elapsed * 1000,
                outcome="ok" if reply.ok else reply.code,
            )
        headers = [(b"idempotent-replayed", b"true")] if reply.replayed else []
        if reply.ok:
            return json_response(200, {"result": reply.result, "replayed": reply.replayed}, headers)
        return json_response(
            reply.http_status,
            {"code": reply.code, "message": reply.message, "retryable": reply.retryable},
            headers,
        )

    async def _app_route(self, request: HttpRequest, route: RouteSpec) -> HttpResponse:
        principal = await self._principal(request)
        if not await self.node.allowed(principal, route.action, route.resource):
            raise AuthError(f"{route.action} on {route.resource!r} is not allowed", code="forbidden")
        result = await route.handler(Context(self.node, principal), dict(request.query))
        return json_response(200, msgspec.to_builtins(result))

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

    async def _presence(self, request: HttpRequest, stream: str) -> HttpResponse:
        check_stream(stream)
        if self.app.presence_for(stream) is None:
            raise BadRequest(f"presence is not enabled for {stream!r} (declare it with app.presence)", code="not_found")
        principal = await self._principal(request)
        if not await self.node.allowed(principal, "presence", stream):
            raise AuthError(f"presence of {stream!r} is not allowed", code="forbidden")
        named, anonymous = stream_presence(self.sessions.infos(), stream)
        return json_response(
            200,
            {
                "stream": stream,
                "node": self.node.id,
                "principals": {pid: {"connections": n} for pid, n in sorted(named.items())},
                "count": len(named),
                "anonymous": anonymous,
            },
        )

    async def _sse(self, request: HttpRequest, stream: str) -> StreamingResponse:
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

"""HTTP/1.1 server connections on anyio streams, parsed by h11.

One :class:`HttpConnection` drives one TCP (or TLS) connection: it reads a
request, answers it, and repeats while keep-alive allows, or hands the
connection over to :mod:`rtcore.transport.websocket` after a 101.

Why it is built this way:

* **h11 parses, we guard.** h11 0.16 accepts heads of any size when they
  arrive in one read, bare-LF line endings, and ``Content-Length`` together
  with ``Transfer-Encoding`` (keeping the connection open, which RFC 9112
  §6.3 forbids). Every request head is therefore held back until
  :class:`~rtcore.transport.head.HeadScanner` has validated it, and the framing
  headers are checked before a body byte is read.
* **Upgrades skip h11.** A plain WebSocket upgrade (the data plane's one
  HTTP request per connection) is read by :func:`~rtcore.transport.fasthead.parse_get`
  and answered by hand; any head it does not take, and every other request,
  goes through h11 as below, so odd requests get h11's answer.
* **A fresh h11 connection per request.** The scanner must see a request's
  bytes before h11 does, but h11 buffers what follows the previous request.
  Taking ``trailing_data`` from the finished ``h11.Connection`` and starting a
  new one for the next request keeps that simple (it costs a few
  microseconds; HTTP here is the control plane, WebSocket is the data plane).
* **Deadlines, not trust.** Slow heads (408), slow bodies (408), idle
  keep-alive connections (silent close) and stuck writes all have a limit
  from :class:`~rtcore.transport.config.ServerLimits`.
* **Errors are JSON and final.** Every error the server itself produces is
  ``{"code": ..., "message": ...}`` with the matching status and closes the
  connection afterwards (we may not have read the request body, so the
  connection's framing cannot be trusted). Responses the application returns,
  including its own errors, keep the connection alive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute

from ..errors import BadRequest, ConnectionClosed, LimitExceeded, RtcoreError, Unavailable
from ..logs import HTTP as ACCESS_LOG
from ..logs import emit
from .aiostream import ProtocolStream, close_forcefully
from .config import ServerLimits, WebSocketPolicy
from .fasthead import parse_get
from .handshake import Handshake, is_websocket_upgrade, negotiate
from .head import HeadScanner
from .messages import (
    Headers,
    HttpRequest,
    HttpResponse,
    Peer,
    StreamingResponse,
    UpgradeRequest,
    bearer_token,
    error_body,
    error_response,
    split_target,
)
from .shutdown import Shutdown
from .websocket import (
    STREAM_ERRORS,
    Heartbeats,
    TaskSpawner,
    WebSocketHandler,
    WebSocketTransport,
    run_websocket,
    start_reader,
    start_spawned,
    websocket_ended,
)

__all__ = ["HttpConnection", "HttpHandler", "ServerState", "format_peer", "render_error"]

log = logging.getLogger("rtcore.transport")

#: The application's HTTP entry point.
HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse | StreamingResponse]]

# Framing is ours: the application may not set these.
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
_CONTENT_LENGTHS = re.compile(rb"\r\ncontent-length[ \t]*:([^\r]*)", re.IGNORECASE)
#: Whether WebSocket upgrades skip h11 when fasthead can read their head
#: (tests turn it off to compare the two paths).
_FAST_UPGRADE = True
_ENDED = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError, TimeoutError)


@dataclass(slots=True, eq=False)
class ServerState:
    """What every connection of one server shares.

    Attributes:
        on_http: HTTP handler.
        on_websocket: WebSocket handler.
        limits: Limits.
        policy: WebSocket policy.
        shutdown: The server's shutdown signal.
        interruptible: Waits that end when the shutdown starts (cancel
            scopes of idle keep-alive waits and SSE streams, a
            :class:`ProtocolStream`'s request wait).
        websockets: Open WebSocket transports (closed with 1001 at the
            shutdown deadline).
        heartbeats: The keepalive pings of all WebSockets (None: each
            connection runs its own).
        spawner: Where WebSockets run their side tasks (the listener's, on
            asyncio; None: a task group per connection).
    """

    on_http: HttpHandler
    on_websocket: WebSocketHandler
    limits: ServerLimits
    policy: WebSocketPolicy
    shutdown: Shutdown
    interruptible: set[Interruptible] = field(default_factory=set)
    websockets: set[WebSocketTransport] = field(default_factory=set)
    heartbeats: Heartbeats | None = None
    spawner: TaskSpawner | None = None


class Interruptible(Protocol):
    """A wait the shutdown ends (:class:`anyio.CancelScope` is one)."""

    def cancel(self) -> None:
        """End the wait now."""
        ...


class _RequestWait:
    """A :class:`ProtocolStream`'s wait for the next request: ``cancel`` (the
    deadline, the shutdown) wakes it like the bytes would; nothing then reads
    as no request."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def cancel(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def render_error(error: RtcoreError) -> bytes:
    """A complete ``Connection: close`` error response, without h11.

    Used for errors found before h11 has a request to answer (or after it
    refused one), where h11's state machine cannot produce a response.
    """
    body = error_body(error.code, error.message)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (error.http_status, _phrase(error.http_status)),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    head.extend(k + b": " + v + b"\r\n" for k, v in error.headers)
    head.append(b"\r\n")
    return b"".join(head) + body


def peer_of(stream: ByteStream) -> Peer:
    """The remote ``(host, port)`` of a socket stream (also through TLS)."""
    address = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class HttpConnection:
    """Serve HTTP/1.1 requests (and at most one upgrade) on one connection.

    Args:
        stream: The accepted connection.
        state: Handlers, limits and shutdown signal shared by the server.
    """

    def __init__(self, stream: ByteStream, state: ServerState) -> None:
        self._stream = stream
        self._state = state
        self._limits = state.limits
        self._peer = peer_of(stream)
        # True once bytes of the current response (or a 101) went out: from
        # then on an error can only end the connection, not be answered.
        self._committed = False
        # (method, path, start) of the request being answered, for the access log.
        self._current: tuple[str, str, float] | None = None
        # An accepted upgrade, run by run() once the request loop has returned
        # (so the h11 connection, request and buffers are freed first).
        self._upgraded: tuple[WebSocketTransport, UpgradeRequest] | None = None

    __slots__ = ("_committed", "_current", "_limits", "_peer", "_state", "_stream", "_upgraded")

    def _access(self, status: int, size: int | None, code: str | None = None) -> None:
        # One line per request; the path only: a query may hold ?token=.
        current, self._current = self._current, None
        if current is None or not ACCESS_LOG.isEnabledFor(logging.INFO):
            return
        method, path, started = current
        fields: dict[str, object] = {"peer": format_peer(self._peer), "method": method, "path": path, "status": status, "bytes": size}
        fields["duration_ms"] = (time.perf_counter() - started) * 1000
        if code is not None:  # refused before the handler ran (400, 413, 426...)
            fields["code"] = code
        emit(ACCESS_LOG, logging.INFO, "http request", **fields)

    async def run(self, setup: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Serve until the connection ends; never raises for network errors.

        Args:
            setup: Connects the stream first and says whether it could (the
                asyncio listener sets an accepted socket up in the
                connection's own task, not in its accept loop). Awaited here
                rather than in a caller's frame: a frame around this one would
                stay on the stack of every idle connection.
        """
        if setup is not None:
            connected = await setup()
            setup = None
            if not connected:
                return
            self._peer = peer_of(self._stream)
        try:
            await self._serve()
            if self._upgraded is not None:
                # Here rather than in a method of its own: one coroutine frame
                # less per open WebSocket (thousands wait at once).
                (transport, request), self._upgraded = self._upgraded, None
                state = self._state
                state.websockets.add(transport)
                try:
                    if start_spawned(transport, state.spawner):
                        # run_websocket inlined (one coroutine frame less per open
                        # WebSocket): the handler runs in this frame.
                        code, reason = 1000, ""
                        path = request.path
                        try:
                            try:
                                pending = state.on_websocket(transport, request)
                                del request  # no local keeps the request (its header list is ~1.5 kB)
                                start_reader(transport)
                                await pending
                            except ConnectionClosed:
                                pass
                            except Exception:
                                log.exception("WebSocket handler failed (path %s, peer %s)", path, format_peer(self._peer))
                                code, reason = 1011, "internal error"
                            await transport.close(code, reason)
                        finally:
                            await websocket_ended(transport)
                    else:
                        # No local keeps the request (its header list is ~1.5 kB) for
                        # the connection's lifetime: run_websocket lets go of it too.
                        pending = run_websocket(transport, request, state.on_websocket, state.spawner)
                        del request
                        await pending
                finally:
                    state.websockets.discard(transport)
        except RtcoreError as error:
            if self._committed:
                log.exception("connection failed after its response began (peer %s)", self._peer)
            else:
                await self._fail(error)
        except _ENDED:
            pass
        except Exception:
            # A bug in one connection must not take the server down.
            log.exception("HTTP connection failed (peer %s)", self._peer)
        finally:
            await close_forcefully(self._stream)

    # -- the request loop ------------------------------------------------------

    async def _serve(self) -> None:
        limits = self._limits
        buf = bytearray()
        # The first request's head must be complete header_timeout after accept.
        deadline = anyio.current_time() + limits.header_timeout
        first = True
        while True:
            if not buf:
                wait_until = deadline if first else anyio.current_time() + limits.keepalive_timeout
                data = await self._wait_for_request(wait_until)
                if not data:
                    return  # idle timeout, peer closed or shutdown: close quietly
                buf += data
            self._committed = False
            if not first:  # a keep-alive request: its head gets a fresh deadline
                deadline = anyio.current_time() + limits.header_timeout
            start, end = await self._read_head(buf, deadline)
            lengths = _CONTENT_LENGTHS.findall(buf, start, end)
            if len(lengths) > 1 or (lengths and b"," in lengths[0]):
                # h11 merges identical values ("4" twice, or "4, 4") into one,
                # so the raw head is the only place they can still be seen; a
                # proxy that takes the first and one that takes the last would
                # disagree (RFC 9112 §6.3 allows refusing them).
                raise BadRequest("more than one Content-Length value is refused")
            if _FAST_UPGRADE and buf.startswith(b"GET /", start) and await self._fast_upgrade(buf, start, end):
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
            conn.receive_data(bytes(buf[start:]))
            buf.clear()
            event = _next_event(conn)
            if not isinstance(event, h11.Request):
                raise BadRequest("malformed request")
            headers = _header_list(event)
            _check_request(event, headers)
            if not await self._handle(conn, event, headers):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            # Keep-alive: the bytes after this request belong to the next one.
            buf += conn.trailing_data[0]
            first = False

    async def _wait_for_request(self, deadline: float) -> bytes:
        """First bytes of the next request, or ``b""`` at the deadline, EOF or shutdown."""
        state = self._state
        stream = self._stream
        if isinstance(stream, ProtocolStream):
            # No cancel scope (entered and left per connect, and anyio keeps per-task
            # state for it): the stream's read future, woken by the deadline's loop
            # timer or the shutdown (listed in interruptible like a scope).
            try:
                data = stream.receive_nowait(self._limits.read_size)
                if data or state.shutdown.started:
                    return data
                wait = _RequestWait(stream.readable())
                timer = asyncio.get_running_loop().call_at(deadline, wait.cancel)
                state.interruptible.add(wait)
                try:
                    await wait.future
                finally:
                    timer.cancel()
                    state.interruptible.discard(wait)
                return stream.receive_nowait(self._limits.read_size)
            except anyio.EndOfStream:
                return b""
        with anyio.CancelScope(deadline=deadline) as scope:
            state.interruptible.add(scope)
            try:
                if state.shutdown.started:
                    return b""
                return await self._stream.receive(self._limits.read_size)
            except anyio.EndOfStream:
                return b""
            finally:
                state.interruptible.discard(scope)
        return b""

    async def _read_head(self, buf: bytearray, deadline: float) -> tuple[int, int]:
        scanner = HeadScanner(self._limits)
        while (found := scanner.scan(buf)) is None:
            with anyio.CancelScope(deadline=deadline) as scope:
                buf += await self._stream.receive(self._limits.read_size)
            if scope.cancelled_caught:
                raise Unavailable(f"request head not received within {self._limits.header_timeout} s", code="timeout", http_status=408)
        return found

    async def _handle(self, conn: h11.Connection, event: h11.Request, headers: Headers) -> bool:
        """Answer one request (``headers``: its header list); ``False`` when the connection must close."""
        path, raw_path, query = split_target(event.target)
        self._current = (event.method.decode("ascii", "replace"), path, time.perf_counter())
        policy = self._state.policy
        upgrade = is_websocket_upgrade(headers)
        on_ws_path = policy.paths is None or path in policy.paths
        if upgrade and on_ws_path:
            await self._upgrade(conn, event, headers, path, query)
            return False
        if on_ws_path and policy.paths is not None:
            raise BadRequest("this path only speaks WebSocket", http_status=426, headers=((b"upgrade", b"websocket"),))

        body = await self._read_body(conn, headers)
        request = HttpRequest(
            method=event.method.decode("ascii"),
            path=path,
            raw_path=raw_path,
            query=query,
            headers=headers,
            body=body,
            peer=self._peer,
            http_version=event.http_version.decode("ascii"),
            shutdown=self._state.shutdown,
        )
        try:
            response = await self._state.on_http(request)
        except Exception:
            log.exception("HTTP handler failed: %s %s", request.method, request.path)
            response = error_response(500, "internal", "internal server error")
        head_only = event.method == b"HEAD"
        if isinstance(response, StreamingResponse):
            try:
                await self._stream_response(conn, response, head_only)
            finally:
                self._access(response.status, None)
            return False
        await self._respond(conn, response, head_only)
        self._access(response.status, len(response.body))
        return not self._state.shutdown.started

    async def _read_body(self, conn: h11.Connection, headers: Headers) -> bytes:
        limits = self._limits
        for name, value in headers:
            if name == b"content-length" and int(value) > limits.max_body_bytes:
                raise LimitExceeded(f"request body larger than {limits.max_body_bytes} bytes", code="message_too_big")
        if conn.they_are_waiting_for_100_continue:
            await self._send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        with anyio.CancelScope(deadline=anyio.current_time() + limits.body_timeout) as scope:
            while True:
                event = _next_event(conn)
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._stream.receive(limits.read_size))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body_bytes:
                        raise LimitExceeded(f"request body larger than {limits.max_body_bytes} bytes", code="message_too_big")
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                else:
                    raise anyio.EndOfStream  # the client went away
        assert scope.cancelled_caught
        raise Unavailable(f"request body not received within {limits.body_timeout} s", code="timeout", http_status=408)

    # -- responses -------------------------------------------------------------

    def _response_headers(self, headers: Headers, close: bool) -> Headers:
        out = [(k, v) for k, v in headers if k.lower() not in _FRAMING_HEADERS]
        if close:
            out.append((b"connection", b"close"))
        return out

    async def _respond(self, conn: h11.Connection, response: HttpResponse, head_only: bool) -> None:
        headers = self._response_headers(response.headers, self._state.shutdown.started)
        headers.append((b"content-length", b"%d" % len(response.body)))
        try:
            data = conn.send(
                h11.Response(status_code=response.status, headers=headers, reason=_phrase(response.status))
            )
            if response.body and not head_only:
                data += conn.send(h11.Data(data=response.body))
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            log.error("invalid response from the HTTP handler: %s", exc)
            raise RtcoreError("the handler returned an invalid response") from None
        assert data is not None
        await self._send(data)

    async def _stream_response(self, conn: h11.Connection, response: StreamingResponse, head_only: bool) -> None:
        # No Content-Length: h11 frames the body with chunked encoding for
        # HTTP/1.1 clients and by closing the connection for HTTP/1.0 ones.
        # A stream is long-lived, so the connection closes after it anyway.
        headers = self._response_headers(response.headers, close=True)
        try:
            head = conn.send(
                h11.Response(status_code=response.status, headers=headers, reason=_phrase(response.status))
            )
        except h11.LocalProtocolError as exc:
            log.error("invalid streaming response from the HTTP handler: %s", exc)
            raise RtcoreError("the handler returned an invalid response") from None
        assert head is not None
        self._committed = True
        await self._send(head)
        chunks = aiter(response.body)
        try:
            if not head_only:
                await self._pump(conn, chunks)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._limits.close_timeout):
                    await aclose()
        tail = conn.send(h11.EndOfMessage())
        assert tail is not None
        await self._send(tail)

    async def _pump(self, conn: h11.Connection, chunks: AsyncIterator[bytes]) -> None:
        """Write chunks as they come until the body ends, the client leaves or the server stops."""
        gone = False

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal gone
            try:
                while await self._stream.receive(self._limits.read_size):
                    pass  # a request pipelined behind a stream is not served
            except STREAM_ERRORS:
                gone = True
                scope.cancel()

        async with anyio.create_task_group() as tg:
            self._state.interruptible.add(tg.cancel_scope)
            try:
                tg.start_soon(watch, tg.cancel_scope)
                async for chunk in chunks:
                    if chunk:
                        data = conn.send(h11.Data(data=chunk))
                        assert data is not None
                        await self._send(data)
            finally:
                self._state.interruptible.discard(tg.cancel_scope)
            tg.cancel_scope.cancel()
        if gone:
            raise anyio.EndOfStream

    async def _send(self, data: bytes) -> None:
        timeout = self._limits.send_timeout
        if timeout is None:
            await self._stream.send(data)
        else:
            with anyio.fail_after(timeout):
                await self._stream.send(data)

    async def _fail(self, error: RtcoreError) -> None:
        """Answer an error and close, reading what the client still sends for a moment."""
        self._access(error.http_status, None, error.code)
        try:
            await self._send(render_error(error))
            try:
                await self._stream.send_eof()
            except NotImplementedError:
                return  # TLS without half-close: just close
            with anyio.move_on_after(self._limits.linger_timeout):
                while await self._stream.receive(self._limits.read_size):
                    pass
        except _ENDED:
            pass

    # -- WebSocket -----------------------------------------------------------------

    async def _fast_upgrade(self, buf: bytearray, start: int, end: int) -> bool:
        """Accept or refuse a WebSocket upgrade without h11 (see :mod:`.fasthead`).

        ``False`` (nothing done, ``buf`` untouched) when the head is not a plain
        upgrade on a WebSocket path: the caller then goes the h11 way.
        """
        parsed = parse_get(buf, start, end)
        if parsed is None:
            return False
        target, headers = parsed
        path, _, query = split_target(target)
        policy = self._state.policy
        if not is_websocket_upgrade(headers) or not (policy.paths is None or path in policy.paths):
            return False
        # From here on as _handle and _upgrade: the same checks in the same order.
        self._current = ("GET", path, time.perf_counter())
        state = self._state
        handshake = negotiate(b"GET", b"1.1", headers, state.policy, self._limits)
        # No body to wait for: without Content-Length or Transfer-Encoding a
        # request has none (RFC 9112 §6.3), so h11 would end the message here.
        if state.shutdown.started:
            raise Unavailable("the server is shutting down", code="shutdown")
        # The bytes h11 writes for this 101 (status line without a reason phrase).
        response = b"HTTP/1.1 101 \r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in handshake.headers) + b"\r\n"
        trailing = bytes(buf[end:])
        buf.clear()
        await self._accept(handshake, headers, path, query, response, trailing)
        return True

    async def _upgrade(
        self, conn: h11.Connection, event: h11.Request, headers: Headers, path: str, query: dict[str, str]
    ) -> None:
        state = self._state
        handshake = negotiate(event.method, event.http_version, headers, state.policy, self._limits)
        if not isinstance(_next_event(conn), h11.EndOfMessage):
            raise BadRequest("an upgrade request must not have a body")
        if state.shutdown.started:
            raise Unavailable("the server is shutting down", code="shutdown")
        response = conn.send(h11.InformationalResponse(status_code=101, headers=handshake.headers))
        assert response is not None
        trailing, _ = conn.trailing_data
        await self._accept(handshake, headers, path, query, response, trailing)

    async def _accept(
        self, handshake: Handshake, headers: Headers, path: str, query: dict[str, str], response: bytes, trailing: bytes
    ) -> None:
        """Send the 101 and set the WebSocket up (run() runs it)."""
        state = self._state
        stream = self._stream
        # On a ProtocolStream the 101 nearly always goes out at once: no deadline
        # (a cancel scope entered and left per connect) unless it has to wait.
        if not (isinstance(stream, ProtocolStream) and stream.write_now(response)):
            with anyio.fail_after(self._limits.handshake_timeout):
                await stream.send(response)
        self._committed = True
        self._access(101, None)
        transport = WebSocketTransport(
            self._stream,
            encoding=handshake.encoding,
            limits=self._limits,
            extensions=handshake.extensions,
            trailing_data=trailing,
            heartbeats=state.heartbeats,
        )
        origin = next((v.decode("latin-1") for k, v in headers if k == b"origin"), None)
        request = UpgradeRequest(
            path=path,
            query=query,
            headers=headers,
            token=bearer_token(headers, query),
            peer=self._peer,
            encoding=handshake.encoding,
            subprotocol=handshake.subprotocol,
            origin=origin,
            shutdown=state.shutdown,
        )
        self._upgraded = (transport, request)


def format_peer(peer: Peer) -> str | None:
    """``host:port`` (``[v6]:port``) of a peer address, for the logs."""
    if peer is None:
        return None
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _next_event(conn: h11.Connection) -> object:
    """``conn.next_event()`` with h11's protocol errors translated."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        message = str(exc) or "malformed request"
        if status in (413, 414, 431):
            raise LimitExceeded(message, code="message_too_big", http_status=status) from None
        raise BadRequest(message, http_status=status) from None


def _header_list(event: h11.Request) -> Headers:
    """The request's headers as a list of ``(lower-case name, value)``.

    ``list(event.headers)`` goes through ``Sequence.__iter__`` and one
    ``__getitem__`` call per header (py-spy: ~5 % of a connect's CPU); h11's
    ``Headers`` keeps ``(raw name, name, value)`` triples in ``_full_items``,
    read directly when it is there (h11 0.14-0.16).
    """
    items = getattr(event.headers, "_full_items", None)
    if type(items) is list:
        return [(name, value) for _, name, value in items]
    return list(event.headers)


def _check_request(event: h11.Request, headers: Headers) -> None:
    """Refuse what h11 accepts but an origin server should not (RFC 9112).

    Each rule closes a request-smuggling or confusion gap between rtcore and a
    proxy in front of it: ambiguous framing (§6.1, §6.3), versions we do not
    speak (§2.3) and request targets that are not origin-form (§3.2).
    """
    version = event.http_version
    if version not in (b"1.1", b"1.0"):
        raise BadRequest(f"HTTP version {version.decode('ascii', 'replace')} is not supported", http_status=505)
    target = event.target
    if not target.startswith(b"/"):
        # absolute-form is for proxies and asterisk-form for server-wide
        # OPTIONS; rtcore is an origin server and answers neither.
        raise BadRequest("the request target must be a path starting with /")
    lengths = chunked = False
    for name, _ in headers:
        if name == b"content-length":
            lengths = True
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and lengths:
        raise BadRequest("Content-Length and Transfer-Encoding together are refused")
    if chunked and version == b"1.0":
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request is refused (RFC 9112 §6.1)")

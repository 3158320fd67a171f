"""Helpers shared by the server tests: a running server, handlers, raw sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import msgspec

from rtcore.transport import (
    ConnectionClosed,
    FrameTransport,
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

HttpHandlerT = Callable[[HttpRequest], Awaitable[HttpResponse | StreamingResponse]]
WsHandlerT = Callable[[FrameTransport, UpgradeRequest], Awaitable[None]]


@dataclass
class Recorder:
    """What the server-side handlers saw."""

    requests: list[UpgradeRequest] = field(default_factory=list)
    closed: list[ConnectionClosed] = field(default_factory=list)
    http: list[HttpRequest] = field(default_factory=list)
    transports: list[FrameTransport] = field(default_factory=list)
    closed_event: anyio.Event = field(default_factory=anyio.Event)


def echo_handler(rec: Recorder) -> WsHandlerT:
    """Echo each message back in the connection's encoding; record the close."""

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        rec.requests.append(request)
        rec.transports.append(transport)
        try:
            while True:
                message = await transport.receive()
                data = message.encode() if isinstance(message, str) else message
                await transport.send([data])
        except ConnectionClosed as exc:
            rec.closed.append(exc)
            rec.closed_event.set()
            raise

    return handler


def basic_http(rec: Recorder) -> HttpHandlerT:
    async def handler(request: HttpRequest) -> HttpResponse | StreamingResponse:
        rec.http.append(request)
        if request.path == "/echo":
            return json_response(
                200,
                {
                    "method": request.method,
                    "body": request.body.decode(),
                    "query": request.query,
                    "token": request.token,
                },
            )
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/peer":
            return json_response(200, {"peer": list(request.peer) if request.peer else None})
        return error_response(404, "not_found", f"no route for {request.path}")

    return handler


@dataclass
class Running:
    port: int
    control: ServerControl

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_server(
    on_websocket: WsHandlerT,
    on_http: HttpHandlerT,
    *,
    limits: ServerLimits | None = None,
    policy: WebSocketPolicy | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    """Run :func:`serve` on a free port for the duration of the block."""
    control = ServerControl()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            partial(serve, on_websocket, on_http, port=0, limits=limits, policy=policy, control=control, **kwargs)
        )
        try:
            yield Running(port, control)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await control.stop(grace=0.5)
            tg.cancel_scope.cancel()


def json_of(body: bytes) -> Any:
    return msgspec.json.decode(body)


# -- raw sockets (blocking, run in a worker thread) ----------------------------


def raw_exchange(port: int, payload: bytes | list[bytes], *, delay: float = 0.0, timeout: float = 5.0) -> bytes:
    """Send ``payload`` (pieces ``delay`` apart) and read until the server closes."""
    pieces = payload if isinstance(payload, list) else [payload]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server already answered and closed
            if delay:
                import time

                time.sleep(delay)
        return read_until_eof(sock)


def read_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body

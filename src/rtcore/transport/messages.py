"""The values that cross the boundary between the server and the application.

The server parses bytes into these and the application answers with these;
neither side sees h11 or wsproto objects. They are frozen dataclasses: created
once per request, read by the handler, never mutated (cheap to build, and a
handler cannot corrupt what the server still uses).

Headers stay as h11 gives them: a list of ``(name, value)`` byte pairs with
lower-case names, in arrival order (duplicates preserved). :meth:`header`
helpers decode the common case.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

import msgspec

from .shutdown import Shutdown

__all__ = [
    "Headers",
    "HttpRequest",
    "HttpResponse",
    "Peer",
    "StreamingResponse",
    "UpgradeRequest",
    "error_response",
    "json_response",
]

Headers = list[tuple[bytes, bytes]]
#: ``(host, port)`` of the remote end, or ``None`` when the socket has none.
Peer = tuple[str, int] | None

_json_encode = msgspec.json.Encoder().encode


def _header(headers: Headers, name: str) -> str | None:
    key = name.lower().encode("ascii")
    for k, v in headers:
        if k == key:
            return v.decode("latin-1")
    return None


def split_target(target: bytes) -> tuple[str, bytes, dict[str, str]]:
    """Split a request target into ``(decoded path, raw path, query)``.

    The query keeps the first value of a repeated key (so ``?token=a&token=b``
    cannot smuggle a second token past a check that read the first).
    """
    raw_path, _, raw_query = target.partition(b"?")
    path = unquote(raw_path.decode("latin-1"))
    query: dict[str, str] = {}
    for key, value in parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True):
        query.setdefault(key, value)
    return path, raw_path, query


def bearer_token(headers: Headers, query: dict[str, str]) -> str | None:
    """The token from ``Authorization: Bearer …``, else from ``?token=``."""
    auth = _header(headers, "authorization")
    if auth is not None:
        scheme, _, credentials = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    token = query.get("token")
    return token or None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A complete HTTP request (the body is read before the handler runs).

    Attributes:
        method: Upper-case method (``"GET"``).
        path: Percent-decoded path without the query string.
        raw_path: The path bytes exactly as sent.
        query: Query parameters (first value of a repeated key).
        headers: ``(name, value)`` pairs, names lower-case.
        body: The request body (at most ``ServerLimits.max_body_bytes``).
        peer: Remote address.
        http_version: ``"1.1"`` or ``"1.0"``.
        shutdown: The server's shutdown signal (a long response such as SSE
            should end when it starts).
    """

    method: str
    path: str
    raw_path: bytes
    query: dict[str, str]
    headers: Headers
    body: bytes
    peer: Peer
    http_version: str
    shutdown: Shutdown

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        return _header(self.headers, name)

    @property
    def token(self) -> str | None:
        """The bearer token from ``Authorization`` or ``?token=``."""
        return bearer_token(self.headers, self.query)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response; the server adds ``Content-Length``.

    Attributes:
        status: HTTP status code.
        headers: Extra headers (no ``Content-Length`` / ``Transfer-Encoding``).
        body: The body bytes.
    """

    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamingResponse:
    """A response whose body is produced over time (Server-Sent Events).

    The server writes it with chunked encoding (HTTP/1.1) or until connection
    close (HTTP/1.0), one socket write per chunk so each chunk reaches the
    client at once. It stops iterating (and closes ``body`` if it is an async
    generator) when the client disconnects or the server shuts down.

    Attributes:
        status: HTTP status code.
        headers: Headers (no ``Content-Length``).
        body: The chunks to send.
    """

    status: int
    headers: Headers
    body: AsyncIterable[bytes]


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A request that became a WebSocket connection.

    Attributes:
        path: Percent-decoded path without the query string.
        query: Query parameters (first value of a repeated key).
        headers: ``(name, value)`` pairs, names lower-case.
        token: Bearer token from ``Authorization: Bearer`` or ``?token=``.
        peer: Remote address.
        encoding: ``"json"`` or ``"msgpack"``, from the subprotocol.
        subprotocol: The subprotocol we answered with, or ``None`` when the
            client offered none (then ``encoding`` is ``"json"``).
        origin: The ``Origin`` header, if any.
        shutdown: The server's shutdown signal: when it starts the session
            should send ``bye`` and close with 1001 before
            ``shutdown.deadline``, after which the transport closes by itself.
    """

    path: str
    query: dict[str, str]
    headers: Headers
    token: str | None
    peer: Peer
    encoding: Literal["json", "msgpack"]
    subprotocol: str | None
    origin: str | None
    shutdown: Shutdown

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        return _header(self.headers, name)


def json_response(status: int, data: object, headers: Headers | None = None) -> HttpResponse:
    """An :class:`HttpResponse` with a JSON body (encoded with msgspec)."""
    return HttpResponse(
        status=status,
        headers=[(b"content-type", b"application/json"), *(headers or [])],
        body=_json_encode(data),
    )


def error_body(code: str, message: str) -> bytes:
    """The JSON error body every error response uses: ``{"code", "message"}``."""
    return _json_encode({"code": code, "message": message})


def error_response(status: int, code: str, message: str, headers: Headers | None = None) -> HttpResponse:
    """A JSON error response ``{"code": ..., "message": ...}``."""
    return HttpResponse(
        status=status,
        headers=[(b"content-type", b"application/json"), *(headers or [])],
        body=error_body(code, message),
    )

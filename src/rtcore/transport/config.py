"""Every knob of the network layer, with the defaults we ship and why.

Two frozen dataclasses, so a configuration is a value that can be shared by
every connection task without locking and compared in tests:

* :class:`ServerLimits` holds the numbers: sizes, counts and timeouts. The
  defaults follow the websockets library (1 MiB messages, ping every 20 s with
  a 20 s timeout, 10 s close timeout, 8 KiB header lines, 128 headers) and are
  at least as strict as hypercorn on HTTP (431 on a 16 KiB header block, slow
  headers cut after 10 s, idle keep-alive connections closed after 5 s).
* :class:`WebSocketPolicy` holds the decisions: which paths upgrade, which
  ``Origin`` values are allowed, whether permessage-deflate may be negotiated.

Every limit is enforced by this package itself, because h11 and wsproto
enforce almost none of them (see the module docstrings of
:mod:`rtcore.transport.head` and :mod:`rtcore.transport.deflate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServerLimits", "WebSocketPolicy"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Sizes, counts and timeouts for the HTTP/WebSocket server.

    A limit of ``None`` means "unlimited"; only use that for trusted peers.

    Attributes:
        max_header_bytes: Largest request head (request line + headers + the
            blank line), in bytes. Exceeded → 431 and close, even when the
            whole block arrives in one read.
        max_header_line: Longest single header line (and request line →
            414), in bytes, CRLF excluded.
        max_headers: Most header fields in one request. Exceeded → 431.
        header_timeout: Seconds allowed to receive a complete request head,
            counted from the connection's accept (first request) or from the
            first byte of a keep-alive request. Exceeded → 408 and close
            (slowloris defence).
        keepalive_timeout: Seconds an idle keep-alive connection may wait for
            its next request before we close it silently.
        max_body_bytes: Largest request body. Exceeded → 413 and close; a
            ``Content-Length`` above it is refused before reading any body.
        body_timeout: Seconds allowed to receive a whole request body → 408.
        linger_timeout: Seconds we keep reading (and discarding) after an
            error response that closes the connection, so a client still
            sending its body reads our answer instead of a TCP reset.
        send_timeout: Seconds one socket write may block (peer not reading)
            before the connection is aborted. ``None`` waits forever.
        handshake_timeout: Seconds for the TLS handshake and for writing the
            WebSocket 101 response.
        max_connections: Open connections at most; the accept loop pauses
            while the server is full (the kernel backlog holds new ones).
        max_message_bytes: Largest inbound WebSocket message, counted across
            fragments and after decompression. Exceeded → close 1009.
        max_fragments: Most frames in one inbound message → close 1009.
        max_queue: Inbound messages buffered for :meth:`receive`; when full
            the reader stops reading the socket (TCP backpressure).
        read_size: Bytes asked from the socket per read.
        ping_interval: Seconds between server pings; ``None`` disables them.
        ping_timeout: Seconds to wait for the pong before closing with 1011.
        close_timeout: Seconds to wait for the peer's half of a close
            handshake before dropping the TCP connection.
    """

    max_header_bytes: int = 16 * KiB
    max_header_line: int = 8 * KiB
    max_headers: int = 128
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_body_bytes: int = 1 * MiB
    body_timeout: float = 30.0
    linger_timeout: float = 2.0
    send_timeout: float | None = 30.0
    handshake_timeout: float = 10.0
    max_connections: int | None = None
    max_message_bytes: int | None = 1 * MiB
    max_fragments: int | None = 1024
    max_queue: int = 16
    read_size: int = 64 * KiB
    ping_interval: float | None = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        positive = {
            "max_header_bytes": self.max_header_bytes,
            "max_header_line": self.max_header_line,
            "max_headers": self.max_headers,
            "header_timeout": self.header_timeout,
            "keepalive_timeout": self.keepalive_timeout,
            "body_timeout": self.body_timeout,
            "linger_timeout": self.linger_timeout,
            "handshake_timeout": self.handshake_timeout,
            "max_queue": self.max_queue,
            "read_size": self.read_size,
            "ping_timeout": self.ping_timeout,
            "close_timeout": self.close_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, got {value!r}")
        if self.max_body_bytes < 0:
            raise ValueError("ServerLimits.max_body_bytes must be >= 0")
        optional = {
            "send_timeout": self.send_timeout,
            "max_connections": self.max_connections,
            "max_message_bytes": self.max_message_bytes,
            "max_fragments": self.max_fragments,
            "ping_interval": self.ping_interval,
        }
        for name, opt in optional.items():
            if opt is not None and opt <= 0:
                raise ValueError(f"ServerLimits.{name} must be > 0 or None, got {opt!r}")


@dataclass(frozen=True, slots=True)
class WebSocketPolicy:
    """Which requests may become WebSocket connections, and how.

    Attributes:
        paths: Request paths that upgrade (query string excluded). ``None``
            accepts an upgrade on any path.
        allowed_origins: When set, an upgrade whose ``Origin`` header is not
            in it (or is missing) is refused with 403 before upgrading, so a
            page on another site cannot open a session with the user's
            cookies. ``None`` disables the check (non-browser deployments).
        permessage_deflate: Negotiate permessage-deflate when the client
            offers it. Off by default: compression costs CPU per subscriber
            (frames are encoded once and fanned out uncompressed) and is a
            decompression-bomb surface; when on, inflated sizes are bounded by
            :attr:`ServerLimits.max_message_bytes`.
    """

    paths: frozenset[str] | None = field(default_factory=lambda: frozenset({"/v1/ws"}))
    allowed_origins: frozenset[str] | None = None
    permessage_deflate: bool = False

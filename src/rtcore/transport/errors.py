"""Exceptions of the network layer.

h11 and wsproto raise their own exception types (``h11.RemoteProtocolError``,
``wsproto.utilities.LocalProtocolError``, ...) and anyio raises stream errors
(``BrokenResourceError``, ``ClosedResourceError``, ``EndOfStream``). They are
translated here, at the boundary, into two types only, so the session layer
never imports h11, wsproto or anyio's stream exceptions:

* :class:`ConnectionClosed`: a WebSocket is gone (normally or not); carries the
  close code and reason the application should act on.
* :class:`HttpError`: an HTTP request must be refused with a status and a
  stable error code; it is internal to the server's connection loop.
"""

from __future__ import annotations

__all__ = ["ConnectionClosed", "HttpError"]


class ConnectionClosed(Exception):
    """The WebSocket connection is closed or died.

    Attributes:
        code: The WebSocket close code: the peer's (1000, 1001, ...), ours when
            we closed first (1009 too big, 1011 ping timeout, ...), or 1006
            when the TCP connection was lost without a close frame.
        reason: The close reason text (may be empty).
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class HttpError(Exception):
    """An HTTP request is refused with ``status`` and a JSON error body.

    Attributes:
        status: HTTP status code.
        code: Stable snake_case error code (see :mod:`rtcore.errors`).
        message: Human-readable explanation.
        headers: Extra response headers.
    """

    def __init__(self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []

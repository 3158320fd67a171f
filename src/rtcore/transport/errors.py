"""Exceptions of the network layer.

h11 and wsproto raise their own exception types (``h11.RemoteProtocolError``,
``wsproto.utilities.LocalProtocolError``, ...) and anyio raises stream errors
(``BrokenResourceError``, ``ClosedResourceError``, ``EndOfStream``). They are
translated at the boundary into classes of the one tree in
:mod:`rtcore.errors`, so the session layer never imports h11, wsproto or
anyio's stream exceptions:

* :class:`~rtcore.errors.ConnectionClosed`: a WebSocket is gone (normally or
  not); ``close_code`` and ``reason`` say what the application should do.
  Re-exported here, the same class.
* An HTTP request is refused by raising the code's owner class
  (:class:`~rtcore.errors.BadRequest`, :class:`~rtcore.errors.LimitExceeded`,
  ...) with the status in ``http_status`` and extra response headers in
  ``headers``; the connection loop answers it and closes. (This replaced the
  separate ``HttpError``.)
"""

from __future__ import annotations

from ..errors import ConnectionClosed

__all__ = ["ConnectionClosed"]

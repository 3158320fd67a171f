"""rtcore's network transport: HTTP/1.1 (h11) and WebSocket (wsproto) on anyio.

This package is the layer *below* the application session. It turns bytes on
a TCP/TLS connection into either complete HTTP requests (handed to
``on_http``) or a :class:`FrameTransport` of complete WebSocket messages
(handed to ``on_websocket``), enforcing every size limit and timeout of
:class:`ServerLimits` on the way, because h11 and wsproto enforce almost none
of them.

Entry point::

    control = ServerControl()
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, on_websocket, on_http, port=0, control=control))
        ...
        await control.stop(grace=5.0)

Modules: :mod:`.config` (limits, policy), :mod:`.messages` (request/response
values), :mod:`.head` (request-head guard), :mod:`.http` (HTTP connection),
:mod:`.handshake` (upgrade negotiation), :mod:`.websocket` (the transport),
:mod:`.wsframes` (outbound frame encoding), :mod:`.deflate` (bounded
permessage-deflate), :mod:`.shutdown` and :mod:`.listener` (serve, stop).
"""

from .config import ServerLimits, WebSocketPolicy
from .errors import ConnectionClosed
from .handshake import SUBPROTOCOLS
from .http import HttpHandler
from .listener import ServerControl, serve
from .messages import (
    Headers,
    HttpRequest,
    HttpResponse,
    Peer,
    StreamingResponse,
    UpgradeRequest,
    error_response,
    json_response,
)
from .shutdown import Shutdown
from .websocket import FrameTransport, WebSocketHandler, WebSocketTransport

__all__ = [
    "SUBPROTOCOLS",
    "ConnectionClosed",
    "FrameTransport",
    "Headers",
    "HttpHandler",
    "HttpRequest",
    "HttpResponse",
    "Peer",
    "ServerControl",
    "ServerLimits",
    "Shutdown",
    "StreamingResponse",
    "UpgradeRequest",
    "WebSocketHandler",
    "WebSocketPolicy",
    "WebSocketTransport",
    "error_response",
    "json_response",
    "serve",
]

"""rtcore as an ASGI 3 application: ``rtcore.asgi.asgi_app(app)``.

Serve an :class:`~rtcore.App` from uvicorn or hypercorn, or mount it inside a
Starlette/FastAPI application, with the protocol, routes and limits of
``rtcore serve``. See :mod:`rtcore.server.asgi` for the details.
"""

from .server.asgi import AsgiApp, AsgiWebSocket, asgi_app

__all__ = ["AsgiApp", "AsgiWebSocket", "asgi_app"]

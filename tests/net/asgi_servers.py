"""Run :func:`rtcore.asgi.asgi_app` under a real ASGI server, in process, on a free port.

``uvicorn`` runs on asyncio only; ``hypercorn`` on asyncio and trio (its own
``hypercorn.asyncio`` / ``hypercorn.trio`` servers). The socket is bound here
first (so the port is known and nothing races for it) and handed to the server.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

import rtcore
from rtcore.asgi import AsgiApp, asgi_app
from rtcore.engine.node import Node
from rtcore.server.registry import SessionRegistry
from rtcore.transport import ServerLimits

KINDS = ("uvicorn", "hypercorn")


class AsgiServing:
    """What the net tests read from a server: ``port``, ``node``, ``sessions``, ``limits``."""

    def __init__(self, asgi: AsgiApp, port: int, prefix: str = "") -> None:
        self.asgi = asgi
        self.port = port
        self.prefix = prefix

    @property
    def node(self) -> Node | None:
        return self.asgi.node

    @property
    def sessions(self) -> SessionRegistry:
        return self.asgi.sessions

    @property
    def limits(self) -> ServerLimits:
        return self.asgi.limits


def _on_trio() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def run_asgi(kind: str, asgi: Any, *, started: AsgiApp | None = None, max_message: int = 16 * 1024 * 1024) -> AsyncIterator[int]:
    """Serve the ASGI app ``asgi`` with ``kind`` for the block; yield the port.

    Args:
        kind: ``"uvicorn"`` or ``"hypercorn"``.
        asgi: The ASGI application (an :class:`AsgiApp` or a host app mounting one).
        started: The :class:`AsgiApp` whose node must be running before the block starts
            (None: do not wait, e.g. mounted without lifespan: it starts lazily).
        max_message: The ASGI server's own message-size cap.
    """
    sock = _listening_socket()
    port = sock.getsockname()[1]
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        if kind == "uvicorn":
            import uvicorn

            config = uvicorn.Config(
                asgi, lifespan="auto", log_level="warning", ws="wsproto", ws_max_size=max_message, ws_ping_interval=None
            )
            server = uvicorn.Server(config)

            async def serve_uvicorn() -> None:
                await server.serve(sockets=[sock])

            async def stop_uvicorn() -> None:
                await stop.wait()
                server.should_exit = True

            tg.start_soon(serve_uvicorn)
            tg.start_soon(stop_uvicorn)
        elif kind == "hypercorn":
            from hypercorn.config import Config

            config_h = Config()
            config_h.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket
            config_h.websocket_max_message_size = max_message
            config_h.graceful_timeout = 5.0
            config_h.loglevel = "WARNING"
            if _on_trio():
                import hypercorn.trio

                tg.start_soon(lambda: hypercorn.trio.serve(asgi, config_h, shutdown_trigger=stop.wait, mode="asgi"))
            else:
                import hypercorn.asyncio

                tg.start_soon(lambda: hypercorn.asyncio.serve(asgi, config_h, shutdown_trigger=stop.wait, mode="asgi"))
        else:  # pragma: no cover - test bug
            raise ValueError(kind)
        try:
            with anyio.fail_after(20):
                while started is not None and started.node is None:
                    await anyio.sleep(0.01)
                if kind == "uvicorn":
                    while not server.started:
                        await anyio.sleep(0.01)
            yield port
        finally:
            stop.set()  # the task group then waits for the server to finish
    sock.close()


@asynccontextmanager
async def asgi_serving(kind: str, app: rtcore.App, **options: Any) -> AsyncIterator[AsgiServing]:
    """The ASGI counterpart of ``tests.net.conftest.serving``: ``Server`` options map to ``asgi_app``."""
    asgi = asgi_app(app, **options)
    limit = asgi.limits.max_message_bytes
    # The ASGI server's cap sits above ours, so the adapter's 1009 is what is tested.
    async with run_asgi(kind, asgi, started=asgi, max_message=max(16 * 1024 * 1024, 2 * (limit or 0))) as port:
        yield AsgiServing(asgi, port)

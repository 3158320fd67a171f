"""The ``websockets`` library as a test client on either anyio backend.

Server tests talk to rtcore through an independent client (the ``websockets``
library, no rtcore code), so they check the wire protocol rather than rtcore's
own client. That library's async client runs on asyncio only; under trio the
tests get its threaded client instead, each blocking call run in a worker
thread. Both raise the library's own exceptions (``ConnectionClosed``,
``InvalidStatus``), so a test reads the same on both backends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol

import anyio.to_thread
from websockets.asyncio.client import connect as asyncio_connect
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect
from websockets.typing import Data

__all__ = ["WebSocket", "connect"]


class WebSocket(Protocol):
    """What the tests use of a ``websockets`` client connection."""

    @property
    def subprotocol(self) -> Any: ...

    @property
    def response(self) -> Any: ...

    async def send(self, message: Data) -> None: ...

    async def recv(self) -> Data: ...

    async def ping(self, data: bytes | None = None) -> Awaitable[Any]: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class _Threaded:
    """The threaded client with awaitable methods (for trio)."""

    def __init__(self, ws: SyncConnection) -> None:
        self._ws = ws

    @property
    def subprotocol(self) -> Any:
        return self._ws.subprotocol

    @property
    def response(self) -> Any:
        return self._ws.response

    async def send(self, message: Data) -> None:
        await anyio.to_thread.run_sync(self._ws.send, message)

    async def recv(self) -> Data:
        # A cancelled wait (fail_after) leaves the thread blocked until the
        # connection closes at the end of the block; it then ends with ConnectionClosed.
        return await anyio.to_thread.run_sync(self._ws.recv, abandon_on_cancel=True)

    async def ping(self, data: bytes | None = None) -> Awaitable[Any]:
        pong = await anyio.to_thread.run_sync(self._ws.ping, data)
        return self._wait(pong)

    @staticmethod
    async def _wait(pong: threading.Event) -> None:
        await anyio.to_thread.run_sync(pong.wait, abandon_on_cancel=True)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await anyio.to_thread.run_sync(self._ws.close, code, reason)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@asynccontextmanager
async def connect(uri: str, **options: Any) -> AsyncIterator[WebSocket]:
    """Open a ``websockets`` client connection for the block (its options as the library takes them)."""
    if _on_asyncio():
        async with asyncio_connect(uri, **options) as ws:
            yield ws
        return
    ws = await anyio.to_thread.run_sync(partial(sync_connect, uri, **options))
    ws.__enter__()  # the library's context-manager use (it warns otherwise); connected already
    try:
        yield _Threaded(ws)
    finally:
        await anyio.to_thread.run_sync(ws.__exit__, None, None, None)

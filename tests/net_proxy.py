"""An in-process TCP proxy that cuts, stalls and resets connections.

``tc netem`` is not available on the CI machines, so network
faults between a real client and a real server come from this proxy instead:
the client connects to the proxy, the proxy to the server, and a test can

* :meth:`TcpProxy.cut` every open connection (RST by default, or a clean FIN),
* :meth:`TcpProxy.stall` forwarding (a half-open connection: no error, no
  data — what a dead NAT or a pulled cable looks like) and
  :meth:`TcpProxy.resume` it,
* :attr:`TcpProxy.refuse` new connections (closed as soon as accepted).

Usage::

    async with TcpProxy.running("127.0.0.1", server_port) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/v1/ws"
        ...
        proxy.cut()
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["TcpProxy"]

_CLOSE_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass(eq=False)
class _Link:
    client: anyio.abc.SocketStream
    upstream: anyio.abc.SocketStream
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reset: bool = True


def _rst_on_close(stream: anyio.abc.SocketStream) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    with contextlib.suppress(OSError):
        stream.extra(SocketAttribute.raw_socket).setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )


class TcpProxy:
    """Forwards connections to ``(host, port)``; see the module docstring.

    Attributes:
        port: The proxy's listening port (after start).
        accepted: Connections accepted so far.
        refuse: When true, new connections are closed at once.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        self.refuse = False
        self.links: set[_Link] = set()
        self._flowing = anyio.Event()
        self._flowing.set()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, host: str, port: int) -> AsyncIterator[TcpProxy]:
        """Run a proxy to ``(host, port)`` for the block."""
        proxy = cls(host, port)
        async with anyio.create_task_group() as tg:
            await tg.start(proxy._serve)
            try:
                yield proxy
            finally:
                proxy.cut()
                tg.cancel_scope.cancel()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)
        async with listener:  # serve() does not close it
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        if self.refuse:
            _rst_on_close(client)
            await client.aclose()
            return
        try:
            upstream = await anyio.connect_tcp(*self.target)
        except OSError:
            _rst_on_close(client)
            await client.aclose()
            return
        link = _Link(client, upstream)
        self.links.add(link)
        try:
            with link.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                    tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
        finally:
            self.links.discard(link)
            if link.reset:
                _rst_on_close(client)
                _rst_on_close(upstream)
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()

    async def _pipe(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive()
                await self._flowing.wait()
                await dst.send(data)
        except _CLOSE_ERRORS:
            pass
        scope.cancel()  # one side gone: end both

    def cut(self, *, reset: bool = True) -> int:
        """Break every open connection (RST, or FIN with ``reset=False``); return how many."""
        links = list(self.links)
        for link in links:
            link.reset = reset
            link.scope.cancel()
        return len(links)

    def stall(self) -> None:
        """Stop forwarding (connections stay open, data waits)."""
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def resume(self) -> None:
        """Forward again after :meth:`stall`."""
        self._flowing.set()

"""A load-balancing TCP proxy that injects random network faults, for the chaos soak.

Each new connection goes to a random live node (so one URL serves every
client, like a load balancer), then a seeded random schedule decides what
happens to it: reset (RST) or closed (FIN) after a random lifetime, forwarding
stalled for a while (a half-open path: no error, no data), chunks delayed, and
writes split into small pieces. ``counts`` tallies every fault injected.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

_ENDED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _rst_on_close(stream: anyio.abc.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.extra(SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ChaosProxy:
    """See the module docstring.

    Args:
        targets: Returns the ports of the nodes that are up right now.
        seed: Seeds the fault schedule.
        mean_life: Mean seconds a connection lives before it is cut.
    """

    def __init__(self, targets: Callable[[], Sequence[int]], *, seed: int, mean_life: float = 8.0) -> None:
        self.targets = targets
        self.rnd = random.Random(seed)
        self.mean_life = mean_life
        self.port = 0
        self.enabled = True
        self.counts: Counter[str] = Counter()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, targets: Callable[[], Sequence[int]], *, seed: int) -> AsyncIterator[ChaosProxy]:
        proxy = cls(targets, seed=seed)
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            proxy.port = listener.extra(SocketAttribute.local_port)

            async def serve() -> None:
                async with listener:
                    await listener.serve(proxy._handle)

            tg.start_soon(serve)
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        ports = list(self.targets())
        self.rnd.shuffle(ports)
        upstream = None
        for port in ports:
            with contextlib.suppress(OSError):
                upstream = await anyio.connect_tcp("127.0.0.1", port)
                break
        if upstream is None:
            self.counts["refused (no node up)"] += 1
            _rst_on_close(client)
            await client.aclose()
            return
        self.counts["connections"] += 1
        life = self.rnd.expovariate(1 / self.mean_life) if self.enabled else None
        reset = self.rnd.random() < 0.5
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
                if life is not None:
                    await anyio.sleep(life)
                    if self.enabled:
                        self.counts["reset (RST)" if reset else "closed (FIN)"] += 1
                        if reset:
                            _rst_on_close(client)
                            _rst_on_close(upstream)
                        tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()

    async def _pipe(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        rnd = self.rnd
        try:
            while True:
                data = await src.receive()
                if self.enabled:
                    roll = rnd.random()
                    if roll < 0.002:
                        self.counts["stalled"] += 1
                        await anyio.sleep(rnd.uniform(0.5, 4.0))
                    elif roll < 0.05:
                        self.counts["delayed"] += 1
                        await anyio.sleep(rnd.uniform(0.005, 0.2))
                    if len(data) > 1 and rnd.random() < 0.05:
                        self.counts["split"] += 1
                        cut = rnd.randrange(1, len(data))
                        await dst.send(data[:cut])
                        await anyio.sleep(0.001)
                        data = data[cut:]
                await dst.send(data)
        except _ENDED:
            pass
        scope.cancel()

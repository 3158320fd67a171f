"""1,000 concurrent WebSocket connections (the ``websockets`` library) on one server."""

from __future__ import annotations

import resource
from contextlib import AsyncExitStack

import anyio
import httpx
import pytest

from .conftest import Peer, http_url, peer, serving
from .netapp import app

pytestmark = pytest.mark.anyio

CLIENTS = 1000


@pytest.fixture
def enough_file_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * CLIENTS + 256  # client and server side of each connection, plus slack
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
@pytest.mark.usefixtures("enough_file_descriptors")
async def test_a_thousand_connections_all_receive_a_broadcast() -> None:
    stream = "room:stadium"
    async with serving(app) as server, AsyncExitStack() as stack:
        peers: list[Peer] = []
        limiter = anyio.CapacityLimiter(100)  # connect 100 at a time: the accept queue stays short

        async def join() -> None:
            async with limiter:
                p = await stack.enter_async_context(peer(server, ping_interval=None))
                subbed = await p.sub(stream)
                assert subbed["t"] == "subbed"
                peers.append(p)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(CLIENTS):
                    tg.start_soon(join)
        assert server.node is not None
        assert len(server.sessions) == CLIENTS

        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(http_url(server, "/v1/cmd/publish"), json={"stream": stream, "n": 3})
            assert r.status_code == 200

        received: list[list[int]] = []

        async def listen(p: Peer) -> None:
            received.append([e["offset"] for e in await p.events(stream, 3)])

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for p in peers:
                    tg.start_soon(listen, p)
        assert len(received) == CLIENTS
        assert all(offsets == [1, 2, 3] for offsets in received)

        async with httpx.AsyncClient(timeout=30) as http:
            metrics = (await http.get(http_url(server, "/metrics"))).text
        assert f"rtcore_connections {float(CLIENTS)}" in metrics
        assert f"rtcore_subscriptions {float(CLIENTS)}" in metrics

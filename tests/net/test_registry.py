"""The server's session registry over real sockets: WebSocket and SSE sessions, health, metrics."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

import rtcore

from .conftest import TIMEOUT, http_url, peer, serving
from .netapp import app
from .test_metrics_cli import samples
from .test_sse import sse_events, take

pytestmark = pytest.mark.anyio


async def wait_for(server: rtcore.Server, count: int) -> None:
    with anyio.fail_after(TIMEOUT):
        while len(server.sessions) != count:
            await server.sessions.changed()


@pytest.mark.asyncio_only(reason="leaving an httpx stream early abandons its inner async generators; trio reports them (ResourceWarning)")
async def test_registry_lists_websocket_and_sse_sessions() -> None:
    """Mutation: the SSE stream does not register → no ``sse`` info, health says 1 → fails.
    Mutation: ``_Connection.run`` does not discard itself → the registry never empties → fails.
    """
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        async with peer(server, token="ada") as p, http.stream("GET", http_url(server, f"/v1/streams/{stream}/sse")) as r:
            await p.sub(stream)
            sse = sse_events(r)  # keep it referenced: collecting it closes the response
            [hello] = await take(sse, 1)
            assert hello["event"] == "rtcore.subscribed"
            await p.cmd("publish", {"stream": stream, "n": 2})
            await p.events(stream, 2)
            infos = {i.kind: i for i in server.sessions.infos()}
            assert set(infos) == {"websocket", "sse"}
            ws = infos["websocket"]
            assert ws.principal == "ada" and ws.opened_at > 0
            assert [(s.stream, s.delivered) for s in ws.subscriptions] == [(stream, 2)]
            assert ws.lag({stream: 2}) == 0
            assert infos["sse"].principal == "anon" and [s.stream for s in infos["sse"].subscriptions] == [stream]
            health = (await http.get(http_url(server, "/v1/health"))).json()
            assert health["sessions"] == 2
            m = samples((await http.get(http_url(server, "/metrics"))).text)
            assert m[("rtcore_connections", ())] == 1
            assert m[("rtcore_sse_streams", ())] == 1
            assert m[("rtcore_subscriptions", ())] == 2
        await wait_for(server, 0)
        assert server.sessions.opened == 2

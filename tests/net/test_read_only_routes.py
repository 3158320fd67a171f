"""The read-only routes answer GET/HEAD and refuse other methods with 405."""

from __future__ import annotations

import anyio
import httpx
import pytest

import rtcore
from rtcore.server.runner import Server

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("path", ["/v1/health", "/metrics", "/v1/schema"])
async def test_read_only_routes_refuse_post(path: str) -> None:
    server = Server(rtcore.App(), port=0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get(path)).status_code == 200
            r = await http.post(path, content=b"{}")
            assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
            assert "GET" in r.headers["allow"]
        await server.stop(grace=0)

"""Server-Sent Events over a real socket, read with httpx streaming."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from .conftest import TIMEOUT, http_url, serving
from .netapp import app

pytestmark = pytest.mark.anyio


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE body into ``{"id", "event", "data"}`` dicts (comments skipped)."""
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in event:
                yield event
            event = {}
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                event["data"] = json.loads(value)
            else:
                event[field] = value


async def take(events: AsyncIterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out = []
    with anyio.fail_after(TIMEOUT):
        async for e in events:
            out.append(e)
            if len(out) == n:
                break
    return out


async def publish(http: httpx.AsyncClient, url: str, stream: str, n: int) -> None:
    r = await http.post(url, json={"stream": stream, "n": n})
    assert r.status_code == 200


@pytest.mark.asyncio_only(
    reason="leaving an httpx stream early abandons its inner async generators; trio reports them (ResourceWarning)"
)
async def test_sse_live_then_resume_with_last_event_id() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        cmd = http_url(server, "/v1/cmd/publish")
        url = http_url(server, f"/v1/streams/{stream}/sse")
        async with http.stream("GET", url) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            events = sse_events(r)
            [hello] = await take(events, 1)
            assert hello["event"] == "rtcore.subscribed"
            await publish(http, cmd, stream, 3)
            live = await take(events, 3)
        assert [e["event"] for e in live] == ["tick"] * 3
        epoch = hello["data"]["epoch"]
        assert [e["id"] for e in live] == [f"{epoch}:1", f"{epoch}:2", f"{epoch}:3"]
        assert [e["data"]["data"]["i"] for e in live] == [0, 1, 2]

        await publish(http, cmd, stream, 2)  # missed while disconnected
        async with http.stream("GET", url, headers={"Last-Event-ID": live[-1]["id"]}) as r:
            events = sse_events(r)
            [hello] = await take(events, 1)
            assert hello["data"]["recovered"] is True
            missed = await take(events, 2)
            await publish(http, cmd, stream, 1)
            [after] = await take(events, 1)
        assert [e["id"] for e in [*missed, after]] == [f"{epoch}:4", f"{epoch}:5", f"{epoch}:6"]


async def test_sse_bad_last_event_id_is_400() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        r = await http.get(http_url(server, "/v1/streams/room:x/sse"), headers={"Last-Event-ID": "nonsense"})
        assert r.status_code == 400 and r.json()["code"] == "bad_request"

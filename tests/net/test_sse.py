"""Server-Sent Events over a real socket, read with httpx streaming."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

import rtcore
from rtcore.engine.hub import OutboxLimits

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


@pytest.mark.asyncio_only(reason="leaving an httpx stream early abandons its inner async generators; trio reports them (ResourceWarning)")
async def test_sse_client_that_stops_reading_is_cut_then_resumes_exactly_once(caplog: pytest.LogCaptureFixture) -> None:
    """A stalled SSE reader costs the server at most its outbox bound; it is cut and resumes losslessly.

    The client stops reading while ~4 KB events are published; the socket
    buffers fill, then the server's outbox. Asserted on
    the outbox's own counters: queued bytes never exceeded the bound, and the cut
    happened. Reading again yields events 1..k in order, then ``rtcore.bye``, then
    the end of the response; resuming with ``Last-Event-ID`` yields k+1..n, each
    once.

    Mutation: drop the bound in ``Outbox.push`` (the old unbounded SSE queue) →
    no cut after 20 MB published, the peak passes the bound → fails.
    Mutation: ``SseStream`` does not push ``rtcore.bye`` on the cut → fails.
    Mutation: the cut keeps the queue (no ``clear``) and ends after it → still
    exactly once (the client resumes after what it got), but more than the
    ``bye`` stays queued after the cut → fails.
    Mutation: drop the warning in ``SseStream._slow`` → no "slow consumer cut" line → fails.
    """
    caplog.set_level(logging.WARNING, logger="rtcore.connection")
    stream = f"room:{uuid.uuid4().hex[:8]}"
    limits = OutboxLimits(max_bytes=64 * 1024, max_frames=1000)
    pad = "x" * 4000
    async with (
        serving(app, outbox=limits) as server,
        httpx.AsyncClient(timeout=TIMEOUT) as sse_http,
        httpx.AsyncClient(timeout=TIMEOUT) as http,
    ):
        assert server.node is not None
        url = http_url(server, f"/v1/streams/{stream}/sse")
        published = 0
        async with sse_http.stream("GET", url) as r:
            events = sse_events(r)
            [hello] = await take(events, 1)
            assert hello["event"] == "rtcore.subscribed"
            [session] = [s for s in server.sessions if s.info().kind == "sse"]
            outbox = session.outbox
            for _ in range(10):  # a reading client first
                await server.node.publish(stream, "blob", {"pad": pad})
                published += 1
            early = await take(events, 10)
            # Stop reading; publish until the outbox gives up on us.
            while not outbox.slow and published < 5_000:  # 20 MB: far beyond any socket buffer
                await server.node.publish(stream, "blob", {"pad": pad})
                published += 1
                await anyio.lowlevel.checkpoint()
            assert outbox.slow
            assert outbox.peak_bytes <= limits.max_bytes
            assert outbox.queued_frames == 1  # what was queued is dropped; only the bye waits
            assert server.node.stats["slow_consumers"] == 1
            assert [r.getMessage().split(" id=")[0] for r in caplog.records if r.name == "rtcore.connection"] == ["slow consumer cut"]
            for _ in range(5):  # a few more while cut: nothing is queued for us any more
                await server.node.publish(stream, "blob", {"pad": pad})
                published += 1
            assert outbox.queued_frames == 1
            with anyio.fail_after(TIMEOUT):
                first = [e async for e in events]  # read again: the response ends
        assert first[-1]["event"] == "rtcore.bye" and first[-1]["data"]["reason"] == "slow_consumer"
        got = early + first[:-1]
        epoch = hello["data"]["epoch"]
        assert [e["id"] for e in got] == [f"{epoch}:{i}" for i in range(1, len(got) + 1)]
        assert len(got) < published
        await wait_until_no_sse(server)

        async with http.stream("GET", url, headers={"Last-Event-ID": got[-1]["id"]}) as r:
            events = sse_events(r)
            [hello] = await take(events, 1)
            assert hello["data"]["recovered"] is True
            rest = await take(events, published - len(got))
        assert [e["id"] for e in rest] == [f"{epoch}:{i}" for i in range(len(got) + 1, published + 1)]


async def wait_until_no_sse(server: rtcore.Server) -> None:
    with anyio.fail_after(TIMEOUT):
        while any(s.info().kind == "sse" for s in server.sessions):
            await server.sessions.changed()

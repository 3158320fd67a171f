"""Presence for plain streams: ``GET /v1/streams/{s}/presence`` and coalesced
join/leave events, through a real :class:`rtcore.Server` with ``rtcore.client``
subscribers and httpx.

The announcer's loop interval is an hour here: the test drives
``server.presence.step()`` itself, so nothing depends on timing.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

import rtcore
import rtcore.client
from rtcore.client import Missed
from rtcore.protocol.frames import Evt
from tests.net.conftest import http_url, serving, ws_url

pytestmark = pytest.mark.anyio


def make_app() -> rtcore.App:
    app = rtcore.App("presence")
    app.presence("chat:*", events=True, interval=3600.0)
    app.presence("quiet:*")

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @app.authorize
    async def authz(principal: Any, action: str, resource: str) -> bool:
        return not (action == "presence" and getattr(principal, "id", None) == "eve")

    return app


async def next_presence(sub: rtcore.client.Subscription) -> Any:
    with anyio.fail_after(10):
        async for item in sub:
            if isinstance(item, Evt) and item.type == "presence":
                return item.data
            assert not isinstance(item, Missed)
    raise AssertionError("subscription ended")


async def test_presence_is_keyed_by_principal_and_events_are_coalesced() -> None:
    """Two connections of bob count once: he joins once and leaves only when his
    last connection ends; carol, who joins and leaves within one interval, is never
    announced; the route answers with principals and connection counts, 404 for a
    stream without presence, 403 when ``authorize`` refuses ``presence``.

    Mutation: key presence by session instead of principal in ``_present`` → bob
    "leaves" when his first connection closes → fails; drop the ``before == after``
    skip in ``PresenceAnnouncer.step`` → an empty event is appended → fails; skip the
    ``presence`` authorization in ``Routes._presence`` → eve gets 200 → fails.
    """
    app = make_app()
    async with serving(app) as server, httpx.AsyncClient(headers={"authorization": "Bearer watcher"}) as http:
        announcer = server.presence
        assert announcer is not None

        async def present(stream: str = "chat:1") -> dict[str, Any]:
            r = await http.get(http_url(server, f"/v1/streams/{stream}/presence"))
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body

        async def until(pred: Any, stream: str = "chat:1") -> dict[str, Any]:
            # Waits for the server to see a connection close (an observable condition).
            with anyio.fail_after(10):
                while not pred(body := await present(stream)):
                    await anyio.sleep(0.01)
            return body

        async with rtcore.client.connect(ws_url(server), token="watcher") as watcher:
            feed = await watcher.subscribe("chat:1")
            async with rtcore.client.connect(ws_url(server), token="bob") as b1:
                await b1.subscribe("chat:1")
                async with rtcore.client.connect(ws_url(server), token="bob") as b2:
                    await b2.subscribe("chat:1")
                    body = await present()
                    assert body["principals"] == {"bob": {"connections": 2}, "watcher": {"connections": 1}}
                    assert body["count"] == 2 and body["anonymous"] == 0 and body["node"] == server.node.id
                    assert await announcer.step() == [("chat:1", {"joined": ["bob", "watcher"], "left": []})]
                    assert await next_presence(feed) == {"joined": ["bob", "watcher"], "left": []}
                    assert await announcer.step() == [], "nothing changed: no event"
                await until(lambda b: b["principals"].get("bob") == {"connections": 1})
                assert await announcer.step() == [], "bob still has a connection: still present"
            await until(lambda b: "bob" not in b["principals"])
            async with rtcore.client.connect(ws_url(server), token="carol") as carol:
                await carol.subscribe("chat:1")
                assert "carol" in (await present())["principals"]
            await until(lambda b: "carol" not in b["principals"])
            assert await announcer.step() == [("chat:1", {"joined": [], "left": ["bob"]})]
            assert await next_presence(feed) == {"joined": [], "left": ["bob"]}

            # A declared stream without events: the route works, nothing is appended.
            async with rtcore.client.connect(ws_url(server), token="dora") as dora:
                await dora.subscribe("quiet:1")
                assert (await present("quiet:1"))["principals"] == {"dora": {"connections": 1}}
                assert await announcer.step() == []
            # An SSE subscriber is present too (its session is in the same registry).
            async with http.stream("GET", http_url(server, "/v1/streams/quiet:1/sse"), headers={"authorization": "Bearer sam"}) as sse:
                assert sse.status_code == 200
                await until(lambda b: b["principals"] == {"sam": {"connections": 1}}, "quiet:1")
            r = await http.get(http_url(server, "/v1/streams/other:1/presence"))
            assert r.status_code == 404 and r.json()["code"] == "not_found"
            r = await http.get(http_url(server, "/v1/streams/chat:1/presence"), headers={"authorization": "Bearer eve"})
            assert r.status_code == 403 and r.json()["code"] == "forbidden"


def test_presence_interval_must_be_positive() -> None:
    """``app.presence`` names the bad value."""
    with pytest.raises(ValueError, match="interval must be > 0"):
        rtcore.App("x").presence("chat:*", interval=0)


async def test_the_servers_loop_announces_joins() -> None:
    """With a short interval the server's own loop appends the event (awaited, not timed).

    Mutation: do not start ``PresenceAnnouncer.run`` in ``Server._serve`` → no event → times out.
    """
    app = rtcore.App("presence-loop")
    app.presence("chat:*", events=True, interval=0.05)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    async with serving(app) as server, rtcore.client.connect(ws_url(server), token="x") as watcher:
        feed = await watcher.subscribe("chat:1")
        assert await next_presence(feed) == {"joined": ["x"], "left": []}

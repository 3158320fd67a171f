"""The read-only admin page (``/admin``) and its data (``/admin/api``).

Mutations seen caught:

* ``authorized()`` returning True for any token → ``test_admin_api_needs_the_token`` fails;
* ``Routes`` serving the page without a configured token →
  ``test_no_token_no_admin_page`` fails;
* ``admin_data`` counting connections from its own list instead of the
  registry... (e.g. ``connection_count: 0``) → ``test_admin_numbers_are_the_metrics``
  and the browser test fail.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rtcore

from .conftest import TIMEOUT, http_url, peer, serving
from .netapp import app
from .test_example import _chromium, headless_chromium, shows

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin-token"
ROOT = Path(__file__).resolve().parents[2]


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return float(sum(s.value for s in family.samples))
    raise AssertionError(f"no {name} in /metrics")


async def test_no_token_no_admin_page() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        for path in ("/admin", "/admin/api"):
            r = await http.get(http_url(server, path), headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 404, (path, r.status_code)


async def test_admin_api_needs_the_token() -> None:
    async with serving(app, admin_token=TOKEN) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        page = await http.get(http_url(server, "/admin"))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert TOKEN not in page.text
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"}):
            r = await http.get(http_url(server, "/admin/api"), headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", headers
        r = await http.post(http_url(server, "/admin/api"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 405


async def test_admin_numbers_are_the_metrics() -> None:
    async with serving(app, admin_token=TOKEN) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        async with peer(server, token="ada") as ada, peer(server, token="bob") as bob:
            await ada.sub("room:a")
            await bob.sub("room:a")
            await bob.sub("room:b")
            assert (await ada.cmd("echo", "x"))["t"] == "ok"
            r = await http.get(http_url(server, "/admin/api"), headers={"Authorization": f"Bearer {TOKEN}"})
            metrics = (await http.get(http_url(server, "/metrics"))).text
        assert r.status_code == 200
        data = r.json()
        assert data["node"]["roles"] == ["api", "gateway", "processor"]
        assert data["connection_count"] == 2 == metric(metrics, "rtcore_connections")
        assert sorted(c["principal"] for c in data["connections"]) == ["ada", "bob"]
        assert {s["stream"]: s["subscribers"] for s in data["streams"]} == {"room:a": 2, "room:b": 1}
        assert data["metrics"]["rtcore_subscriptions"] == metric(metrics, "rtcore_subscriptions") == 3
        commands = data["metrics"]["rtcore_command_duration_seconds"]
        assert sum(series["count"] for series in commands.values()) >= 1


@pytest.mark.slow
@pytest.mark.asyncio_only(reason="the DevTools driver is the websockets library's asyncio client")
@pytest.mark.skipif(
    _chromium() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
    reason="no headless Chromium on this machine (.ci/run installs it)",
)
async def test_admin_page_in_headless_chromium(tmp_path: Path) -> None:
    """The page shows the server's numbers, live; a screenshot goes to docs/img/admin.png."""
    chromium = _chromium()
    assert chromium is not None
    async with serving(app, admin_token=TOKEN) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        async with peer(server, token="ada") as ada, peer(server, token="bob") as bob:
            await ada.sub("room:a")
            await bob.sub("room:a")
            for i in range(5):
                await ada.cmd("echo", i)
            metrics = (await http.get(http_url(server, "/metrics"))).text
            connections = int(metric(metrics, "rtcore_connections"))
            subscriptions = int(metric(metrics, "rtcore_subscriptions"))
            async with headless_chromium(chromium, tmp_path / "profile") as devtools:
                target = await devtools.call("Target.createTarget", url="about:blank")
                attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
                page = attached["sessionId"]
                await devtools.call("Page.enable", page)
                await devtools.call("Emulation.setDeviceMetricsOverride", page, width=1100, height=900, deviceScaleFactor=1, mobile=False)
                await devtools.call("Page.setLifecycleEventsEnabled", page, enabled=True)
                nav = await devtools.call("Page.navigate", page, url=http_url(server, f"/admin#{TOKEN}"))
                with anyio.fail_after(30):
                    await devtools.event("Page.lifecycleEvent", lambda p: p["name"] == "load" and p["loaderId"] == nav["loaderId"])
                    assert await devtools.evaluate(page, shows("status", "live")) == "live"
                    assert await devtools.evaluate(page, shows("t-connections", str(connections))) == str(connections)
                    assert await devtools.evaluate(page, shows("t-subscriptions", str(subscriptions))) == str(subscriptions)
                    assert await devtools.evaluate(page, shows("conn-count", "2")) == "2"
                    # Traffic while the page is open (commands, and events fanned out to
                    # both subscribers) until the page has drawn six points of each
                    # chart and the API chart one above zero: what the page shows is
                    # awaited, never a fixed sleep.
                    async with anyio.create_task_group() as traffic:

                        async def publish() -> None:
                            while True:
                                await ada.cmd("publish", {"stream": "room:a", "n": 3})
                                await bob.events("room:a", 3)
                                await anyio.sleep(0.05)

                        traffic.start_soon(publish)
                        await devtools.evaluate(
                            page,
                            """new Promise((resolve) => { const t = setInterval(() => {
                              if (series.api.length >= 6 && Number(document.getElementById("m-api").textContent) > 0) {
                                clearInterval(t); resolve(true); } }, 100); })""",
                        )
                        traffic.cancel_scope.cancel()
                shot = await devtools.call("Page.captureScreenshot", page, format="png")
    out = ROOT / "docs" / "img" / "admin.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))


async def test_admin_shows_rooms_and_processor_failures() -> None:
    """The rooms this node runs (``rtcore.rooms``' admin section) and processor
    retries / dead letters (``node.stats``).

    Mutation: drop the ``admin_section("rooms")`` registration in
    ``rooms.install`` → no ``rooms`` section → fails; stop counting in
    ``_dead_letter`` → ``dead_letters`` stays 0 → fails.
    """
    from rtcore.testing import connect as in_process
    from tests.rooms.roomapp import make_app

    rooms_app, _reg = make_app(tick_rate=None)

    @rooms_app.on("boom:*")
    async def boom(ctx: rtcore.Context, event: rtcore.Event) -> None:
        raise RuntimeError("always fails")

    @rooms_app.command("boom")
    async def fire(ctx: rtcore.Context, args: object) -> int:
        return (await ctx.publish("boom:1", "x", {})).offset

    async with serving(rooms_app, admin_token=TOKEN) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        assert server.node is not None
        async with in_process(server.node, "ada") as ada:
            room = await ada.command("room.create", {"type": "game"})
            await ada.command("boom", None)
            with anyio.fail_after(20):
                while server.node.stats["dead_letters"] < 1:
                    await anyio.sleep(0.05)
            r = await http.get(http_url(server, "/admin/api"), headers={"Authorization": f"Bearer {TOKEN}"})
        data = r.json()
        [listed] = data["sections"]["rooms"]
        assert listed["id"] == room["room_id"] and listed["members"] == 1
        assert data["stats"]["dead_letters"] == 1 and data["stats"]["processor_retries"] >= 1

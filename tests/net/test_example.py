"""The counter example as README runs it: ``rtcore serve examples/counter/app.py:app``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from rtcore.cli import load_app

from .conftest import TIMEOUT, http_url, peer, serving

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def counter_app(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(ROOT)
    return load_app("examples/counter/app.py:app")


async def test_page_and_protocol_the_page_uses(counter_app) -> None:  # type: ignore[no-untyped-def]
    async with serving(counter_app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        page = await http.get(http_url(server, "/"))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "rtcore.v1.json" in page.text and "since" in page.text
        # What the page does, step by step, with an independent client.
        async with peer(server, token="ada") as ada:
            subbed = await ada.sub("room:lobby")
            assert subbed["snap"] is True
            snap = await ada.next(lambda f: f["t"] == "snap")
            assert snap["state"]["value"] == 0
            first = await ada.cmd("room.click", {"room": "lobby", "by": 1}, key="click-1")
            again = await ada.cmd("room.click", {"room": "lobby", "by": 1}, key="click-1")
            assert first["result"] == again["result"] and again["replayed"] is True
            [evt] = await ada.events("room:lobby", 1)
        async with peer(server, token="ada") as ada:  # reconnect with since: nothing new, nothing twice
            resumed = await ada.sub("room:lobby", since={"epoch": evt["epoch"], "offset": evt["offset"]})
            assert resumed["recovered"] is True and resumed["offset"] == evt["offset"]


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(
    _chromium() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
    reason="no headless Chromium on this machine (.ci/run installs it)",
)
async def test_page_in_headless_chromium(counter_app) -> None:  # type: ignore[no-untyped-def]
    chromium = _chromium()
    assert chromium is not None, "RTCORE_REQUIRE_SERVICES=1 but no Chromium is installed"
    async with serving(counter_app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        await http.post(http_url(server, "/v1/cmd/room.click"), json={"room": "lobby", "by": 7}, headers={"Authorization": "Bearer bot"})

        def dump() -> str:
            args = [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--dump-dom",
                http_url(server, "/"),
            ]
            return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ}).stdout

        # A headless browser on a loaded 2-core machine may dump the page before its
        # WebSocket delivered the snapshot: each try is a fresh browser, up to three.
        value = None
        for _ in range(3):
            dom = await anyio.to_thread.run_sync(dump)
            m = re.search(r'<div id="value">([^<]*)</div>', dom)
            value = m.group(1) if m else None
            if value == "7":
                break
    assert value == "7", dom[-2000:]

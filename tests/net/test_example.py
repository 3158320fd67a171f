"""The counter example as README runs it: ``rtcore serve examples/counter/app.py:app``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.streams.text import TextReceiveStream
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WsClosed

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


class DevTools:
    """A minimal Chrome DevTools Protocol client over the ``websockets`` library.

    Commands are matched to their answers by id; events are queued per method
    so a test can await the one it needs (no polling, no sleeps).
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = 0
        self._answers: dict[int, tuple[anyio.Event, list[dict[str, Any]]]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._arrived = anyio.Event()

    async def read_forever(self) -> None:
        with contextlib.suppress(WsClosed):
            await self._read()

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                done, box = self._answers.pop(msg["id"])
                box.append(msg)
                done.set()
            else:
                self._events.setdefault(msg["method"], []).append(msg)
                self._arrived.set()
                self._arrived = anyio.Event()

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._ids += 1
        done, box = anyio.Event(), []
        self._answers[self._ids] = (done, box)
        msg: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        await done.wait()
        [answer] = box
        assert "error" not in answer, (method, answer["error"])
        result: dict[str, Any] = answer["result"]
        return result

    async def event(self, method: str, where: Callable[[dict[str, Any]], bool] = lambda params: True) -> dict[str, Any]:
        """The first queued (or next) event named ``method`` whose params match ``where``."""
        while True:
            queued = self._events.get(method, [])
            for i, msg in enumerate(queued):
                if where(msg["params"]):
                    return queued.pop(i)
            await self._arrived.wait()

    async def evaluate(self, session: str, expression: str) -> Any:
        """Run ``expression`` in the page; a promise is awaited."""
        r = await self.call("Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")


#: Resolves once the element's text is ``text``: a MutationObserver, not a poll.
_SHOWS = """new Promise((resolve) => {
  const el = document.getElementById(%(id)s);
  const check = () => { if (el.textContent === %(text)s) { observer.disconnect(); resolve(el.textContent); } };
  const observer = new MutationObserver(check);
  observer.observe(el, {childList: true, characterData: true, subtree: true});
  check();
})"""


def shows(element: str, text: str) -> str:
    return _SHOWS % {"id": json.dumps(element), "text": json.dumps(text)}


@asynccontextmanager
async def headless_chromium(chromium: str, profile: Path) -> AsyncIterator[DevTools]:
    """Chromium with the DevTools protocol on a free port; its browser endpoint, connected."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    async with await anyio.open_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        lines = TextReceiveStream(proc.stderr)
        seen, endpoint = "", None
        with anyio.fail_after(60):  # a cold browser start on a busy machine
            async for chunk in lines:  # Chromium announces its endpoint on stderr
                seen += chunk
                m = re.search(r"DevTools listening on (ws://\S+)", seen)
                if m:
                    endpoint = m.group(1)
                    break
        assert endpoint, f"Chromium did not start its DevTools endpoint:\n{seen[-2000:]}"
        try:
            async with anyio.create_task_group() as tg:

                async def drain() -> None:
                    async for _ in lines:  # keep the pipe from filling up
                        pass

                tg.start_soon(drain)
                async with connect(endpoint, max_size=None, open_timeout=TIMEOUT) as ws:
                    devtools = DevTools(ws)
                    tg.start_soon(devtools.read_forever)
                    yield devtools
                    with contextlib.suppress(Exception):
                        await devtools.call("Browser.close")
                tg.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()


@pytest.mark.asyncio_only(reason="the DevTools driver is the websockets library's asyncio client")
@pytest.mark.skipif(
    _chromium() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
    reason="no headless Chromium on this machine (.ci/run installs it)",
)
async def test_page_in_headless_chromium(counter_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The example page in a real browser: snapshot, a click, a live event from elsewhere.

    One browser run; every step awaits what the page shows (a MutationObserver
    promise through the DevTools protocol), never a sleep or a retry.

    Mutation: make the page ignore ``evt`` frames (``case "evt": return``) → its
    own click never shows → the wait for "8" times out → fails.
    """
    chromium = _chromium()
    assert chromium is not None, "RTCORE_REQUIRE_SERVICES=1 but no Chromium is installed"
    async with serving(counter_app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:

        async def click(by: int) -> None:
            r = await http.post(
                http_url(server, "/v1/cmd/room.click"), json={"room": "lobby", "by": by}, headers={"Authorization": "Bearer bot"}
            )
            assert r.status_code == 200, r.text

        async def head() -> int:
            r = await http.get(http_url(server, "/v1/streams/room:lobby"), headers={"Authorization": "Bearer bot"})
            assert r.status_code == 200, r.text
            return int(r.json()["head"])

        await click(7)
        async with headless_chromium(chromium, tmp_path / "profile") as devtools:
            target = await devtools.call("Target.createTarget", url="about:blank")
            attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
            page = attached["sessionId"]
            await devtools.call("Page.enable", page)
            await devtools.call("Page.setLifecycleEventsEnabled", page, enabled=True)
            nav = await devtools.call("Page.navigate", page, url=http_url(server, "/"))
            with anyio.fail_after(30):  # this navigation's load, not about:blank's
                await devtools.event("Page.lifecycleEvent", lambda p: p["name"] == "load" and p["loaderId"] == nav["loaderId"])
            try:
                with anyio.fail_after(30):
                    # The snapshot: the bot's click, made before the page opened.
                    assert await devtools.evaluate(page, shows("value", "7")) == "7"
                    assert await devtools.evaluate(page, shows("status", "live")) == "live"
                    # The page's own +1: a keyed command, stored once, shown as its event.
                    await devtools.evaluate(page, "document.getElementById('plus').click()")
                    assert await devtools.evaluate(page, shows("value", "8")) == "8"
                    assert await head() == 2
                    # A live event from another client reaches the open page.
                    await click(2)
                    assert await devtools.evaluate(page, shows("value", "10")) == "10"
            except TimeoutError:
                with anyio.fail_after(TIMEOUT):
                    text = await devtools.evaluate(page, "document.body.innerText")
                pytest.fail(f"the page did not show what was expected; it shows:\n{text}")

"""examples/tictactoe/index.html in headless Chromium: two browser contexts play a full game.

The page imports rtcore.js from ``/v1/client.js`` and draws ``room.state``.
Every step waits on what the pages show (a MutationObserver promise through the
DevTools protocol), never on a sleep, and nothing is retried. The run saves
``docs/img/tictactoe.png`` (shown in the README).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import anyio
import pytest

from rtcore.cli import load_app

from ..net.conftest import http_url, serving
from ..net.test_example import DevTools, _chromium, headless_chromium

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "img" / "tictactoe.png"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.asyncio_only(reason="the DevTools driver is the websockets library's asyncio client"),
    pytest.mark.skipif(
        _chromium() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
        reason="no headless Chromium on this machine (.ci/run installs it)",
    ),
]

#: Resolves once ``board`` and ``status`` show the given texts (MutationObserver, not a poll).
_UNTIL = """new Promise((resolve) => {
  const board = () => [...document.querySelectorAll("#board button")].map((b) => b.textContent || ".").join("");
  const status = () => document.getElementById("status").textContent;
  const check = () => {
    if (board() === %(board)s && status() === %(status)s) { observer.disconnect(); resolve([board(), status()]); }
  };
  const observer = new MutationObserver(check);
  observer.observe(document.body, { childList: true, characterData: true, subtree: true });
  check();
})"""


class Tab:
    def __init__(self, devtools: DevTools, session: str, target: str, url: str) -> None:
        self.devtools, self.session, self.target, self.url = devtools, session, target, url

    async def load(self, *, reload: bool = False) -> None:
        """Navigate (or reload: the same URL in the same tab, sessionStorage kept) and wait for ``load``."""
        nav = await self.devtools.call("Page.navigate", self.session, url=self.url, transitionType="reload" if reload else "typed")
        with anyio.fail_after(30):
            await self.devtools.event("Page.lifecycleEvent", lambda p: p["name"] == "load" and p["loaderId"] == nav["loaderId"])

    async def shows(self, board: str, status: str) -> None:
        try:
            with anyio.fail_after(20):
                got = await self.devtools.evaluate(self.session, _UNTIL % {"board": json.dumps(board), "status": json.dumps(status)})
        except TimeoutError:
            text = await self.devtools.evaluate(self.session, "document.body.innerText")
            pytest.fail(f"{self.url} did not show {board!r} / {status!r}; it shows:\n{text}")
        assert got == [board, status]

    async def click(self, cell: int) -> None:
        await self.devtools.evaluate(self.session, f"document.getElementById('cell{cell}').click()")


async def open_tab(devtools: DevTools, url: str) -> Tab:
    """A tab in a fresh browser context (its own cookies and storage: another player)."""
    context = await devtools.call("Target.createBrowserContext")
    target = await devtools.call("Target.createTarget", url="about:blank", browserContextId=context["browserContextId"])
    attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    session = attached["sessionId"]
    await devtools.call("Page.enable", session)
    await devtools.call("Page.setLifecycleEventsEnabled", session, enabled=True)
    await devtools.call("Emulation.setDeviceMetricsOverride", session, width=520, height=700, deviceScaleFactor=1, mobile=False)
    tab = Tab(devtools, session, target["targetId"], url)
    await tab.load()
    return tab


async def test_two_players_full_game_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two browser contexts play a game to a win; reloading a tab mid-game restores its board.

    Mutations: the page drops ``room.onChange(render)`` → ada never shows "Your
    turn (X)" when bob joins → fails at that wait; the page forgets its room on reload (no
    ``sessionStorage``) → the reloaded ada is matched into a new room and shows
    "Waiting for an opponent…" instead of the board → fails after the reload.
    """
    chromium = _chromium()
    assert chromium is not None, "RTCORE_REQUIRE_SERVICES=1 but no Chromium is installed"
    monkeypatch.chdir(ROOT)
    app = load_app("examples/tictactoe/app.py:app")
    async with serving(app) as server, headless_chromium(chromium, tmp_path / "profile") as devtools:
        ada = await open_tab(devtools, http_url(server, "/?name=ada"))
        await ada.shows(".........", "Waiting for an opponent…")
        bob = await open_tab(devtools, http_url(server, "/?name=bob"))
        await ada.shows(".........", "Your turn (X)")
        await bob.shows(".........", "ada's turn")

        await ada.click(0)
        await bob.shows("X........", "Your turn (O)")
        await bob.click(3)
        await ada.shows("X..O.....", "Your turn (X)")
        await ada.click(1)
        await bob.shows("XX.O.....", "Your turn (O)")
        await bob.click(4)
        await ada.shows("XX.OO....", "Your turn (X)")

        # Mid-game reload: the page takes its seat back and the board comes back.
        await ada.load(reload=True)
        await ada.shows("XX.OO....", "Your turn (X)")

        await ada.click(2)
        await ada.shows("XXXOO....", "You won")
        await bob.shows("XXXOO....", "ada won")
        shot = await devtools.call("Page.captureScreenshot", ada.session, format="png")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))

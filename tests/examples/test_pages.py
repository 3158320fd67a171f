"""The arena and crash pages in headless Chromium (they load rtcore.js from ``/v1/client.js``).

Every step waits on what a page shows (a MutationObserver promise through
the DevTools protocol), never on a sleep, and nothing is retried. The run
writes ``docs/img/arena.png`` and ``docs/img/crash.png``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ..net.test_example import DevTools, _chromium, headless_chromium
from .helpers import ROOT, load_example, serving

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.asyncio_only(reason="the DevTools driver is the websockets library's asyncio client"),
    pytest.mark.skipif(
        _chromium() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
        reason="no headless Chromium on this machine (.ci/run installs it)",
    ),
]

os.environ.setdefault("CRASH_SECRET", "tests-secret")
IMG = ROOT / "docs" / "img"

#: Resolves with ``expr``'s value once ``expr`` is truthy, re-checked on every DOM change (no polling).
_UNTIL = """new Promise((resolve) => {
  const check = () => { let v; try { v = (%(expr)s); } catch (e) { v = null; } if (v) { observer.disconnect(); resolve(v); } };
  const observer = new MutationObserver(check);
  observer.observe(document.body, { childList: true, characterData: true, subtree: true, attributes: true });
  check();
})"""


class Tab:
    def __init__(self, devtools: DevTools, session: str, url: str) -> None:
        self.devtools, self.session, self.url = devtools, session, url

    async def until(self, expr: str, timeout: float = 20.0) -> Any:
        """Wait until the JavaScript expression ``expr`` is truthy in the page; return its value."""
        try:
            with anyio.fail_after(timeout):
                return await self.devtools.evaluate(self.session, _UNTIL % {"expr": expr})
        except TimeoutError:
            text = await self.devtools.evaluate(self.session, "document.body.innerText")
            pytest.fail(f"{self.url}: `{expr}` did not become true in {timeout} s; the page shows:\n{text}")

    async def run(self, js: str) -> Any:
        return await self.devtools.evaluate(self.session, js)

    async def screenshot(self, path: Path) -> None:
        shot = await self.devtools.call("Page.captureScreenshot", self.session, format="png")
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(base64.b64decode(shot["data"]))


async def open_tab(devtools: DevTools, url: str, context: str | None = None, *, width: int = 1100, height: int = 760) -> tuple[Tab, str]:
    """A tab, in a new browser context unless ``context`` is given (same context: same browser storage)."""
    if context is None:
        context = (await devtools.call("Target.createBrowserContext"))["browserContextId"]
    target = await devtools.call("Target.createTarget", url="about:blank", browserContextId=context)
    session = (await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
    await devtools.call("Page.enable", session)
    await devtools.call("Page.setLifecycleEventsEnabled", session, enabled=True)
    # Every tab behaves as the focused, visible one (no background timer throttling).
    await devtools.call("Emulation.setFocusEmulationEnabled", session, enabled=True)
    await devtools.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1, mobile=False)
    nav = await devtools.call("Page.navigate", session, url=url)
    with anyio.fail_after(30):
        await devtools.event("Page.lifecycleEvent", lambda p: p["name"] == "load" and p["loaderId"] == nav["loaderId"])
    return Tab(devtools, session, url), context


async def needs_client_js(port: int) -> None:
    """The pages import rtcore.js from ``/v1/client.js``: say so plainly if this server lacks it."""
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{port}/v1/client.js")
    assert r.status_code == 200, f"GET /v1/client.js -> {r.status_code}: the pages need rtcore.js served by the server"


def _li(player: str) -> str:
    return f"document.querySelector('#players li[data-id=\"{player}\"]')"


async def _steer(tab: Tab, key: str, down: bool) -> None:
    kind = "keydown" if down else "keyup"
    await tab.run(f"dispatchEvent(new KeyboardEvent({kind!r}, {{key: {key!r}}}))")


async def test_arena_two_tabs_see_each_other_move(tmp_path: Path) -> None:
    """Two players in two browser contexts: each one's moves show up in the other's page.

    The mover's page predicts its own position at once; the other page shows
    the mover's server position (``data-x`` of the players list, what the
    canvas interpolates between).

    Mutation: the page stops sending its steps (drop ``room.send("input", ...)``)
    → ada's own prediction moves but bob never sees it → fails.
    """
    chromium = _chromium()
    assert chromium is not None, "RTCORE_REQUIRE_SERVICES=1 but no Chromium is installed"
    arena = load_example("arena")
    arena_bot = load_example("arena", "bot")
    async with serving(arena.app) as server, headless_chromium(chromium, tmp_path / "profile") as devtools, anyio.create_task_group() as bots:
        await needs_client_js(server.port)
        base = f"http://127.0.0.1:{server.port}/"
        ada, _ = await open_tab(devtools, base + "?name=ada")
        bob, _ = await open_tab(devtools, base + "?name=bob")
        await ada.until(_li("bob"))
        await bob.until(_li("ada"))
        # Company for the screenshot: a few bots in the same room (the page's "public" one).
        bots.start_soon(lambda: arena_bot.run_bots(f"ws://127.0.0.1:{server.port}/v1/ws", 4, tag="public", seed=1))
        for mover, watcher, name in ((ada, bob, "ada"), (bob, ada, "bob")):
            x0 = int(await watcher.until(f"{_li(name)}.dataset.x"))
            key, sign = ("ArrowLeft", -1) if x0 > 500 else ("ArrowRight", 1)
            await _steer(mover, key, True)
            # The mover sees itself move first (prediction), then the other page sees it.
            await mover.until(f"({_li(name)}.dataset.x - {x0}) * {sign} >= 100")
            await _steer(mover, key, False)
            await watcher.until(f"({_li(name)}.dataset.x - {x0}) * {sign} >= 100")
            # Once its steps are applied the two pages agree on where the mover stands.
            final = await mover.until(f"document.getElementById('net').textContent.includes(' 0 step(s)') && {_li(name)}.dataset.x")
            await watcher.until(f"{_li(name)}.dataset.x === {json.dumps(final)}")
        await ada.until(" && ".join(_li(f"bot{i}-public") for i in range(4)))
        await ada.screenshot(IMG / "arena.png")
        bots.cancel_scope.cancel()


async def test_crash_bet_in_one_tab_moves_the_balance_in_another_within_a_second(tmp_path: Path) -> None:
    """Two tabs of one player: a bet placed in the first shows in the second's balance within a second.

    The path: the bet's hold (room step) → the room's ``bet`` message → the
    processor flushes the wallet outbox → ``balance_changed`` on
    ``wallet:player:alice`` → every tab subscribed to it. The round then ends
    and the page verifies its seed and crash point (SHA-256 chain + HMAC in
    the browser) and shows "✓ verified".

    Mutation: the page ignores ``balance_changed`` events (``wallet.on`` returns
    at once) → the second tab keeps showing 1,000.00 → the one-second wait fails.
    """
    chromium = _chromium()
    assert chromium is not None, "RTCORE_REQUIRE_SERVICES=1 but no Chromium is installed"
    crash = load_example("crash")
    crash.wallet.url = f"sqlite:///{tmp_path / 'wallet.db'}"
    old = (crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed)
    crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed = 4.0, 3.0, 0.8
    try:
        async with serving(crash.app) as server, headless_chromium(chromium, tmp_path / "profile") as devtools:
            await needs_client_js(server.port)
            url = f"http://127.0.0.1:{server.port}/?name=alice"
            one, context = await open_tab(devtools, url, width=900, height=720)
            two, _ = await open_tab(devtools, url, context, width=900, height=720)
            for tab in (one, two):
                await tab.until("document.getElementById('balance').textContent === '1,000.00'")
            # A fresh betting phase (so the click lands well inside it).
            await one.until("!document.getElementById('bet').disabled && document.getElementById('status').textContent.includes('(3.')")
            await one.run("document.getElementById('amount').value = '12.5'; document.getElementById('bet').click()")
            clicked = time.monotonic()
            await two.until("document.getElementById('balance').textContent === '987.50'", timeout=1.0)
            elapsed = time.monotonic() - clicked
            await one.until("document.getElementById('balance').textContent === '987.50'")
            # The round ends; both tabs agree on the balance and the page verifies the round.
            r = await one.until("document.getElementById('status').textContent.match(/Round (\\d+) crashed/)?.[1]", timeout=60)
            await one.screenshot(IMG / "crash.png")  # the bet's outcome is on the page until the next round
            await one.until(f"[...document.querySelectorAll('#history tr')].some((tr) => tr.textContent.startsWith('#{r}') && tr.textContent.includes('✓ verified'))")
            shown = await one.until("document.getElementById('balance').textContent")
            await two.until(f"document.getElementById('balance').textContent === {json.dumps(shown)}")
            print(f"\n[crash page] balance in the second tab {elapsed * 1000:.0f} ms after the click")
    finally:
        crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed = old

"""A shared counter room: the smallest rtcore game.

Every player sees every click at once and in the same order. The room's state
is folded on the server (``app.state``), so a player who joins late or comes
back after a long time gets a snapshot instead of the whole history.

Serve it and open http://127.0.0.1:8000 in two browser tabs::

    rtcore serve examples/counter/app.py:app

The page (``index.html``, next to this file) speaks the wire protocol with the
browser's own WebSocket: it shows the counter live, sends each +1 with an
idempotency key and resumes with ``since`` after a reconnect.

Or run in-process (no network) and watch what happens::

    python examples/counter/app.py
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec

import rtcore
import rtcore.testing

app = rtcore.App("counter")
app.retention("room:*", max_events=1000)
app.page("/", (Path(__file__).parent / "index.html").read_bytes())


class Room(msgspec.Struct):
    """The folded state of a room."""

    value: int = 0
    clicks: dict[str, int] = {}

    def apply(self, event: rtcore.Event) -> None:
        self.value += event.data["by"]
        who = event.data["player"]
        self.clicks[who] = self.clicks.get(who, 0) + 1


app.state("room:*", Room, snapshot_every=50, sync_every=10)


class Click(msgspec.Struct):
    """Arguments of ``room.click``."""

    room: str
    by: int = 1


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    # Demo only: the token is the player's name. Use JWTs in production.
    return rtcore.Principal(token) if token else None


@app.command("room.click")
async def click(ctx: rtcore.Context, args: Click) -> dict[str, int]:
    if not -10 <= args.by <= 10:
        raise rtcore.Rejected("bad_click", "by must be between -10 and 10")
    assert ctx.principal is not None
    event = await ctx.publish(f"room:{args.room}", "clicked", {"player": ctx.principal.id, "by": args.by})
    return {"offset": event.offset}


async def demo() -> None:
    async with rtcore.testing.serve(app) as node:
        async with rtcore.testing.connect(node, token="ada") as ada, rtcore.testing.connect(node, token="bob") as bob:
            await ada.subscribe("room:lobby")
            await bob.subscribe("room:lobby")
            print("ada clicks:", await ada.command("room.click", {"room": "lobby", "by": 2}, key="ada-1"))
            print("ada retries the same click (same key):", await ada.command("room.click", {"room": "lobby", "by": 2}, key="ada-1"))
            print("bob clicks:", await bob.command("room.click", {"room": "lobby"}))
            for _ in range(2):
                evt = await bob.next_event("room:lobby")
                print(f"bob sees #{evt.offset}: {evt.data['player']} {evt.data['by']:+d}")
            try:
                await bob.command("room.click", {"room": "lobby", "by": 99})
            except rtcore.RtcoreError as exc:
                print("bob's big click is refused:", exc.code)
        async with rtcore.testing.connect(node, token="cy") as cy:
            await cy.subscribe("room:lobby")
            snap = await cy.next_frame(types=(rtcore.protocol.frames.Snap,))
            print(f"cy joins late and gets the room at #{snap.offset}: {snap.state} (checksum {snap.checksum[:8]})")


if __name__ == "__main__":
    anyio.run(demo)

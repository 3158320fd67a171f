"""The app the JavaScript client's tests run against (``rtcore serve tests/js/jsapp.py:app``).

* ``pub {stream, n}`` publishes ``{"n": n}`` on ``stream`` and returns its offset
  (one event per command: a command applied twice shows as a repeated ``n``);
* ``score:*`` is a stateful stream (sum of ``n``; a ``sync`` every 2 events);
* room type ``sandbox``: ``set {path, value}`` puts any JSON value in
  ``state.values``, ``hand`` adds to the player's private hand, ``say``
  broadcasts, ``get`` returns the state as the server holds it (public part
  and the caller's own hand), so a test compares it with the client's fold;
* ``/scenarios.mjs`` serves clients/js/test/scenarios.mjs, so a browser runs
  the same scenarios as Node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

import rtcore
from rtcore import rooms

app = rtcore.App("js-client-tests")
registry = rooms.install(app)

HERE = Path(__file__).resolve().parent
CLIENTS = HERE.parents[1] / "clients" / "js"


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    return rtcore.Principal(token) if token else None


class Pub(msgspec.Struct):
    stream: str
    n: int


@app.command("pub")
async def pub(ctx: rtcore.Context, args: Pub) -> int:
    event = await ctx.publish(args.stream, "n", {"n": args.n})
    return event.offset


class Dm(msgspec.Struct):
    to: str
    type: str
    data: Any = None


@app.command("dm")
async def dm(ctx: rtcore.Context, args: Dm) -> None:
    await ctx.send_to(args.to, args.type, args.data)


class Score(msgspec.Struct):
    total: int = 0

    def apply(self, event: Any) -> None:
        self.total += int(event.data["n"])


app.state("score:*", Score, snapshot_every=5, sync_every=2)


class Sandbox(msgspec.Struct):
    values: dict[str, Any] = {}
    log: list[Any] = []
    x: float = 0.0
    hands: dict[str, list[str]] = {}


class SetValue(msgspec.Struct):
    key: str
    value: Any


@registry.define("sandbox")
class SandboxRoom(rooms.Room[Sandbox]):
    private_fields = ("hands",)

    async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
        self.state.hands.setdefault(player.id, [])

    @rooms.message("set")
    async def set_value(self, player: rooms.Player, data: SetValue) -> None:
        self.state.values[data.key] = data.value
        self.state.values.setdefault("big", 2**62 + 3)  # beyond 2**53: a BigInt in JavaScript
        self.state.log.append([player.id, data.key])
        self.state.x += 0.5

    @rooms.message("hand")
    async def hand(self, player: rooms.Player, data: str) -> None:
        self.state.hands.setdefault(player.id, []).append(data)

    @rooms.message("say")
    async def say(self, player: rooms.Player, data: Any) -> None:
        self.broadcast("said", {"by": player.id, "text": data})

    @rooms.message("tell")
    async def tell(self, player: rooms.Player, data: Any) -> None:
        self.send(str(data), "note", {"from": player.id})

    @rooms.message("get")
    async def get(self, player: rooms.Player, data: Any) -> Any:
        state = msgspec.to_builtins(self.state)
        state["hands"] = {player.id: state["hands"].get(player.id, [])}
        return state


app.page("/", "<!doctype html><title>rtcore.js tests</title><p id=status>ready</p>")
app.page("/scenarios.mjs", (CLIENTS / "test" / "scenarios.mjs").read_bytes(), "text/javascript; charset=utf-8")

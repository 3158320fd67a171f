"""A room type that records its hooks, shared by the room tests."""

from __future__ import annotations

import copy
from typing import Any

import anyio
import msgspec

import rtcore
from rtcore import rooms
from rtcore.protocol.frames import Evt, Snap
from rtcore.protocol.patch import apply
from rtcore.testing import TestClient

GRACE = 10.0
DISPOSE = 5.0


class Game(msgspec.Struct):
    counter: int = 0
    log: list[str] = []
    ticks: int = 0
    fired: int = 0


class Add(msgspec.Struct):
    by: int


def make_app(
    *, tick_rate: float | None = 1.0, max_clients: int = 3, patch_rate: float | None = None
) -> tuple[rtcore.App, rooms.Rooms]:
    app = rtcore.App("rooms-test")
    registry = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    class GameRoom(rooms.Room[Game]):
        auto_dispose = DISPOSE

        async def on_create(self, options: dict[str, Any]) -> None:
            self.state.log.append("create")
            if options.get("interval"):
                self.clock.set_interval(float(options["interval"]), self.bump)

        def bump(self) -> None:
            self.state.fired += 1

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.log.append(f"join:{player.id}")

        async def on_drop(self, player: rooms.Player) -> None:
            self.state.log.append(f"drop:{player.id}")
            self.allow_reconnection(player, GRACE)

        async def on_reconnect(self, player: rooms.Player) -> None:
            self.state.log.append(f"reconnect:{player.id}")

        async def on_leave(self, player: rooms.Player, consented: bool) -> None:
            self.state.log.append(f"leave:{player.id}:{consented}")

        async def on_tick(self, dt: float) -> None:
            self.state.ticks += 1

        @rooms.message("add")
        async def add(self, player: rooms.Player, data: Add) -> int:
            self.state.counter += data.by
            return self.state.counter

        @rooms.message("fail")
        async def fail(self, player: rooms.Player, data: Any) -> None:
            self.state.counter += 1000
            self.broadcast("never", {})
            raise rtcore.Rejected("nope")

        @rooms.message("tell")
        async def tell(self, player: rooms.Player, data: Any) -> None:
            self.send(data["to"], "note", {"from": player.id})
            self.broadcast("said", {"by": player.id}, exclude=player)

        @rooms.message("lock")
        def do_lock(self, player: rooms.Player, data: Any) -> None:
            self.lock() if data else self.unlock()

    GameRoom.tick_rate = tick_rate
    GameRoom.patch_rate = patch_rate
    GameRoom.max_clients = max_clients
    registry.define("game")(GameRoom)
    return app, registry


def client_doc(client: TestClient, stream: str) -> tuple[Any, int]:
    """Fold what ``client`` received on ``stream`` with the generic patch code: (document, offset)."""
    doc: Any = None
    last = 0
    for f in client.frames:
        if isinstance(f, Snap) and f.stream == stream:
            doc, last = copy.deepcopy(f.state), f.offset
        elif isinstance(f, Evt) and f.stream == stream and f.offset == last + 1:
            if f.type == "patch":
                doc = apply(doc, copy.deepcopy(f.data["ops"]))
            last = f.offset
    return doc, last


async def caught_up(client: TestClient, stream: str, head: int) -> Any:
    """Wait until ``client`` folded ``stream`` up to ``head``; return its document."""
    with anyio.fail_after(5):
        while True:
            doc, last = client_doc(client, stream)
            if last >= head:
                return doc
            await client.next_event(stream)

"""Tic-tac-toe through a real ``rtcore serve`` process (and a :class:`rtcore.Server`
for the newcomer case) on a free port, with the ``websockets`` library, ``httpx``
and the wire protocol written by hand (the only rtcore code on the client side
is the generic, sans-IO patch fold)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest

from rtcore.cli import load_app
from rtcore.protocol.patch import apply
from rtcore.protocol.state import checksum
from tests.multinode.procs import APP, ServerProcess, processes
from tests.net.conftest import Peer, peer, serving

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tictactoe" / "app.py"


class ExampleProcess(ServerProcess):
    """``python -m rtcore.cli serve examples/tictactoe/app.py:app`` on ``memory://``."""

    def _argv(self) -> list[str]:
        argv = super()._argv()
        argv[argv.index(APP)] = f"{EXAMPLE}:app"
        return argv


class Folded:
    """One peer's copy of a room document, folded from ``snap``/``evt`` frames and checked against ``sync``."""

    def __init__(self, p: Peer, stream: str) -> None:
        self.p, self.stream = p, stream
        self.doc: Any = None
        self.offset = 0
        self.syncs = 0

    async def until(self, pred: Any) -> dict[str, Any]:
        while self.doc is None or not pred(self.doc["state"]):
            f = await self.p.next(lambda f: f["t"] in ("evt", "sync", "snap") and f.get("stream") == self.stream)
            if f["t"] == "snap":
                self.doc, self.offset = copy.deepcopy(f["state"]), f["offset"]
            elif f["t"] == "evt":
                assert f["offset"] == self.offset + 1, "events arrive in order, without gaps"
                self.offset = f["offset"]
                if f["type"] == "patch":
                    self.doc = apply(self.doc, f["data"]["ops"])
            else:
                assert f["offset"] == self.offset
                assert checksum(self.doc) == f["checksum"], "the folded document matches the server's checksum"
                self.syncs += 1
        state: dict[str, Any] = self.doc["state"]
        return state


async def test_tictactoe_over_real_sockets(tmp_path: Path) -> None:
    """Two hand-written clients meet by matchmaking on a real ``rtcore serve`` process,
    see the room listed over HTTP, play to a win, are refused an illegal move,
    rematch, and one leaves (forfeit); both hold the same board.

    Mutation: send patches computed against a stale document (skip ``prev = new``
    in ``_Actor.commit``) → the ``sync`` checksum differs → fails.
    """
    async with processes(ExampleProcess("memory://", tmp_path, "tictactoe")) as (server,), peer(
        server, token="alice"  # type: ignore[arg-type]  # peer needs only .port
    ) as a, peer(server, token="bob") as b:  # type: ignore[arg-type]
        ra = await a.cmd("room.join_or_create", {"type": "tictactoe"}, key="m1")
        rb = await b.cmd("room.join_or_create", {"type": "tictactoe"}, key="m1")
        assert ra["t"] == rb["t"] == "ok", (ra, rb)
        room = ra["result"]
        assert rb["result"]["room_id"] == room["room_id"]
        async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": "Bearer alice"}) as http:
            listed = (await http.get("/v1/rooms", params={"type": "tictactoe"})).json()
        assert [(r["room_id"], r["clients"]) for r in listed["rooms"]] == [(room["room_id"], 2)]
        stream = room["stream"]
        for p in (a, b):
            subbed = await p.sub(stream, {"epoch": "", "offset": 0})
            assert subbed["t"] == "subbed"
        fa, fb = Folded(a, stream), Folded(b, stream)
        s = await fa.until(lambda s: s["status"] == "playing")
        assert s["players"] == ["alice", "bob"] and s["turn"] == "alice"
        assert fa.doc["members"] == {"alice": {"connected": True, "grace_until": None}, "bob": {"connected": True, "grace_until": None}}

        async def move(p: Peer, cell: int, key: str) -> dict[str, Any]:
            return await p.cmd("room.send", {"room_id": room["room_id"], "type": "move", "data": {"cell": cell}}, key=key)

        out_of_turn = await move(b, 4, "b0")
        assert out_of_turn["t"] == "err" and out_of_turn["code"] == "not_your_turn"
        bad = await move(a, 9, "a-bad")
        assert bad["code"] == "bad_args" and "cell" in bad["message"]
        for i, (p, cell) in enumerate([(a, 0), (b, 3), (a, 1), (b, 4), (a, 2)]):
            reply = await move(p, cell, f"mv{i}")
            assert reply["t"] == "ok", reply
        again = await move(a, 2, "mv4")  # a retried key: the stored answer, no second move
        assert again["t"] == "ok" and again["result"][2] == "X"
        for f in (fa, fb):
            s = await f.until(lambda s: s["status"] == "over")
            assert s["winner"] == "alice" and s["reason"] == "line" and s["moves"] == [0, 3, 1, 4, 2]
        assert fa.doc == fb.doc

        for p in (a, b):
            assert (await p.cmd("room.send", {"room_id": room["room_id"], "type": "rematch"}))["t"] == "ok"
        s = await fb.until(lambda s: s["status"] == "playing")
        assert s["turn"] == "bob" and s["cells"] == [""] * 9 and s["score"] == {"alice": 1, "bob": 0}

        assert (await b.cmd("room.leave", {"room_id": room["room_id"]}))["t"] == "ok"
        s = await fa.until(lambda s: s["reason"] == "forfeit")
        assert s["winner"] == "alice" and s["status"] == "over" and s["players"] == ["alice"]
        assert list(fa.doc["members"]) == ["alice"]
        assert fa.syncs >= 1


async def test_newcomer_device_gets_the_current_board() -> None:
    """A player who played on one device (an auto-acking ``rtcore.client``, so the
    server cursor is at the head) opens a fresh client: subscribing with offset 0 it
    holds the current board, not a partial history.

    Mutation: subscribe the fresh client without ``since`` (server cursor) → it gets
    no patch and holds nothing → fails.
    """
    import anyio

    import rtcore.client
    from rtcore.protocol.frames import Position

    app = load_app(f"{EXAMPLE}:app")

    async def fold(client: rtcore.client.Client, stream: str, until: Any, since: Position | None) -> Any:
        sub = await client.subscribe(stream, since=since)
        doc: Any = None
        with anyio.fail_after(10):
            async for item in sub:
                if isinstance(item, rtcore.client.Missed):
                    doc = copy.deepcopy(item.state) if item.state is not None else doc
                elif item.type == "patch":
                    doc = apply(doc, item.data["ops"])
                if doc is not None and until(doc["state"]):
                    return doc
        return doc

    async with serving(app) as server, peer(server, token="bob") as b:
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        async with rtcore.client.connect(url, token="alice") as first:
            room = await first.command("room.join_or_create", {"type": "tictactoe"})
            await b.cmd("room.join_or_create", {"type": "tictactoe"})
            await first.command("room.send", {"room_id": room["room_id"], "type": "move", "data": {"cell": 4}})
            seen = await fold(first, room["stream"], lambda s: s["moves"] == [4], Position("", 0))
            # The case being tested: the automatic acks moved alice's server cursor to the head.
            node = server.node
            assert node is not None
            head = (await node.backend.events.info(room["stream"])).head

            async def cursor() -> int:
                cur = await node.backend.cursors.get("alice", room["stream"], now=node.clock())
                return cur[1] if cur else 0

            with anyio.fail_after(10):
                while await cursor() < head:
                    await anyio.sleep(0.02)
        async with rtcore.client.connect(url, token="alice") as fresh:
            doc = await fold(fresh, room["stream"], lambda s: s["moves"] == [4], Position("", 0))
        assert doc == seen and doc["state"]["cells"][4] == "X"

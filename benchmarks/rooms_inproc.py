"""CPU per room move inside one process: the engine and the room layer, no sockets.

::

    python benchmarks/rooms_inproc.py [--rooms 100] [--moves 200] [--reps 5] [--peer SRC]

The same two-player ``duel`` room as ``benchmarks/rooms.py``, on one
:class:`rtcore.Node` over ``memory://``: each player subscribes to the room's
stream through ``Node.subscribe`` with a sink that encodes every event frame
(as an outbox would) and drops it, and every move is a ``room.send`` through
``Node.dispatch`` (what the gateway calls). So the figure is what rtcore spends
per move between the gateway and the outbox (dispatch, the room's step, the
patch append, the fold, the fan-out) without the WebSocket transport, the
gateway's framing or the load client, which ``benchmarks/rooms.py`` includes.

Each repetition runs in a fresh process (``--child``) and reports
``time.process_time()`` over all moves / moves. With ``--peer SRC`` every
repetition is run for this tree and for rtcore imported from ``SRC`` (e.g. an
older checkout's ``src/``), alternating which goes first. Writes
``benchmarks/results/rooms-inproc-<date>.json`` and prints the medians.
"""


import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(rooms_n: int, moves: int) -> None:
    """One measurement in this process; prints ``{"us_per_move": ..., "moves_per_s": ...}``."""
    import anyio
    import msgspec

    import rtcore
    from rtcore import rooms
    from rtcore.engine.node import Node

    class Duel(msgspec.Struct):
        players: list[str] = []
        turn: str = ""
        moves: int = 0
        last: int = -1

    class MoveData(msgspec.Struct):
        n: int

    app = rtcore.App("rooms-inproc")
    registry = rooms.install(app)

    @registry.define("duel")
    class DuelRoom(rooms.Room[Duel]):
        max_clients = 2

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.players.append(player.id)
            if len(self.state.players) == 2:
                self.lock()
                self.state.turn = self.state.players[0]

        @rooms.message("move")
        async def move(self, player: rooms.Player, data: MoveData) -> None:
            s = self.state
            if s.turn != player.id:
                raise rtcore.Rejected("not_your_turn")
            s.moves += 1
            s.last = data.n
            s.turn = s.players[1] if s.players[0] == player.id else s.players[0]

    class Sink:
        """A subscriber's outbox that encodes each frame once and drops it."""

        def __init__(self, node: Node) -> None:
            self.node = node

        def spawn(self, fn: Any) -> None:
            self.node.spawn(fn)

        def live(self, stream: str, batch: list[Any]) -> None:
            for enc in batch:
                enc.encoded("json")

        async def backlog(self, stream: str, batch: list[Any]) -> None:
            for enc in batch:
                enc.encoded("json")

        def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
            pass

        def stale(self, stream: str) -> None:
            pass

    async def main() -> None:
        async with Node(app, "memory://") as node:
            pairs = []
            for i in range(rooms_n):
                a, b = rtcore.Principal(f"a{i}"), rtcore.Principal(f"b{i}")
                made = await node.dispatch(a, "room.create", {"type": "duel", "private": True})
                joined = await node.dispatch(b, "room.join", {"room_id": made.result["room_id"]})
                assert made.ok and joined.ok, (made, joined)
                for p in (a, b):
                    start = await node.subscribe(p, made.result["stream"], None, Sink(node))
                    await start.tail.fill()
                pairs.append((made.result["room_id"], a, b))

            async def play(rid: str, a: Any, b: Any) -> None:
                for n in range(moves):
                    reply = await node.dispatch(a if n % 2 == 0 else b, "room.send", {"room_id": rid, "type": "move", "data": {"n": n}})
                    assert reply.ok, reply

            await anyio.sleep(0.2)
            c0, w0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for pair in pairs:
                    tg.start_soon(play, *pair)
            c1, w1 = time.process_time(), time.perf_counter()
            total = rooms_n * moves
            print(json.dumps({"us_per_move": (c1 - c0) / total * 1e6, "moves_per_s": total / (w1 - w0), "rtcore": rtcore.__file__}))

    anyio.run(main)


def run_one(src: str | None, rooms_n: int, moves: int) -> dict[str, Any]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--rooms", str(rooms_n), "--moves", str(moves)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--moves", type=int, default=200, help="moves per room")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peer", type=Path, metavar="SRC", help="also run with rtcore imported from SRC, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.rooms, opts.moves)
        return
    peer = str(opts.peer.resolve()) if opts.peer else None
    runs: dict[str, list[dict[str, Any]]] = {"this": [], **({"peer": []} if peer else {})}
    for rep in range(opts.reps):
        order = ["this", "peer"] if rep % 2 == 0 else ["peer", "this"]
        for who in order if peer else ["this"]:
            got = run_one(peer if who == "peer" else None, opts.rooms, opts.moves)
            runs[who].append(got)
            print(f"  [{who}] {got['us_per_move']:.1f} us/move, {got['moves_per_s']:,.0f} moves/s", flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version()},
        "settings": {"rooms": opts.rooms, "moves_per_room": opts.moves, "reps": opts.reps, "peer": peer},
        "load": os.getloadavg(),
        "runs": runs,
        "median_us_per_move": {who: statistics.median(r["us_per_move"] for r in rs) for who, rs in runs.items()},
    }
    out = HERE / "results" / f"rooms-inproc-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("median us/move:", {k: round(v, 1) for k, v in report["median_us_per_move"].items()}, f"-> {out}")


if __name__ == "__main__":
    main()

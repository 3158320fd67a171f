"""CPU per room move inside one process: the engine and the room layer, no sockets.

::

    python benchmarks/rooms_inproc.py [--rooms 100] [--moves 200] [--reps 5] [--peer SRC] [--arena]

The same two-player ``duel`` room as ``benchmarks/rooms.py``, on one
:class:`rtcore.Node` over ``memory://``: each player subscribes to the room's
stream through ``Node.subscribe`` with a sink that encodes every event frame
(as an outbox would) and drops it, and every move is a ``room.send`` through
``Node.dispatch`` (what the gateway calls). So the figure is what rtcore spends
per move between the gateway and the outbox (dispatch, the room's step, the
patch append, the fold, the fan-out) without the WebSocket transport, the
gateway's framing or the load client, which ``benchmarks/rooms.py`` includes.

``--tick-doc TICKS`` runs only the room side of a 100-player tick (the
document copy, diff, fold and encoding, no event loop), deterministic, for
instruction counts under callgrind (see :func:`tick_doc`).

``--arena`` runs the 20 Hz ``arena`` room of ``benchmarks/rooms.py`` instead
(100 players subscribed with such sinks, 2 inputs/s each through
``Node.dispatch``, 8 s per repetition) and reports the tick step's CPU
(``_Actor._step`` for ``on_tick``, wrapped as in ``rooms.py``'s server) p50 and
p99, the same less the cyclic GC's CPU inside the step, and the longest GC
inside a step; it writes ``results/rooms-inproc-arena-DATE.json``.

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


def child(rooms_n: int, moves: int, public: bool = False, backend: str = "memory://") -> None:
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
        url = backend
        if backend == "sqlite":
            import tempfile

            url = f"sqlite:///{tempfile.mkdtemp()}/rooms.db"
        async with Node(app, url) as node:
            pairs = []
            for i in range(rooms_n):
                a, b = rtcore.Principal(f"a{i}"), rtcore.Principal(f"b{i}")
                made = await node.dispatch(a, "room.create", {"type": "duel", "private": not public})
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


def child_arena(players: int, seconds: float, input_hz: float) -> None:
    """The 20 Hz ``arena`` room in this process; prints the tick step's CPU figures as JSON.

    The room type of ``benchmarks/rooms.py`` (``tick_rate = patch_rate = 20``),
    ``players`` seated players each subscribed through ``Node.subscribe`` with a
    sink that encodes every frame, each sending an input every ``1/input_hz``
    seconds (staggered) through ``Node.dispatch``. The executor's tick step
    (``_Actor._step`` for ``on_tick``) is wrapped as in ``rooms.py``'s server:
    its thread CPU time, and the cyclic GC's CPU time inside it. Once every
    player is seated and subscribed, the collector is tuned as ``rtcore
    serve`` tunes it (``runner.tune_gc``, unless ``RTCORE_GC_TUNING=0``), as
    ``rooms.py``'s server does: before, this run measured an untuned
    collector, whose young collections were most of its tick p99.
    """
    import gc
    import random

    import anyio
    import msgspec

    import rtcore
    from rtcore import rooms
    from rtcore.engine.node import Node
    from rtcore.rooms import runtime

    class Arena(msgspec.Struct):
        tick: int = 0
        pos: dict[str, list[float]] = {}

    class Input(msgspec.Struct):
        x: float
        y: float

    app = rtcore.App("rooms-inproc-arena")
    registry = rooms.install(app)

    @registry.define("arena")
    class ArenaRoom(rooms.Room[Arena]):
        max_clients = 0
        tick_rate = 20
        patch_rate = 20
        auto_dispose = 3600.0

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.pos[player.id] = [0.0, 0.0]

        @rooms.message("input")
        async def input(self, player: rooms.Player, data: Input) -> None:
            self.state.pos[player.id] = [data.x, data.y]

        async def on_tick(self, dt: float) -> None:
            self.state.tick += 1

    class Sink:
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

    gc_in = {"t0": 0.0, "s": 0.0}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_in["t0"] = time.thread_time()
        else:
            gc_in["s"] += time.thread_time() - gc_in["t0"]

    gc.callbacks.append(on_gc)
    cpu: list[float] = []
    gcs: list[float] = []
    step = runtime._Actor._step

    async def timed_step(self: Any, fn: Any, args: Any) -> None:
        gc_in["s"] = 0.0
        c0 = time.thread_time()
        await step(self, fn, args)
        if getattr(fn, "__name__", "") == "on_tick":
            cpu.append(time.thread_time() - c0)
            gcs.append(gc_in["s"])

    runtime._Actor._step = timed_step  # type: ignore[method-assign]

    async def main() -> None:
        async with Node(app, "memory://") as node:
            made = await node.dispatch(rtcore.Principal("host"), "room.create", {"type": "arena"})
            assert made.ok, made
            rid, stream = made.result["room_id"], made.result["stream"]
            names = [f"p{i}" for i in range(players)]
            for name in names:
                joined = await node.dispatch(rtcore.Principal(name), "room.join", {"room_id": rid})
                assert joined.ok, joined
                start = await node.subscribe(rtcore.Principal(name), stream, None, Sink(node))
                await start.tail.fill()
            rnd = random.Random(1)
            # The collector as `rtcore serve` sets it once listening (rooms.py's
            # server does the same): a tree without the policy leaves it alone.
            from rtcore.server import runner

            if getattr(runner, "gc_tuning_wanted", lambda: False)():
                runner.tune_gc()

            async def player(name: str) -> None:
                await anyio.sleep(rnd.random() / input_hz)
                while True:
                    data = {"x": rnd.random(), "y": rnd.random()}
                    await node.dispatch(rtcore.Principal(name), "room.send", {"room_id": rid, "type": "input", "data": data})
                    await anyio.sleep(1 / input_hz)

            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(player, name)
                await anyio.sleep(1.0)  # every player sending
                cpu.clear()
                gcs.clear()
                c0, w0 = time.process_time(), time.perf_counter()
                await anyio.sleep(seconds)
                c1, w1 = time.process_time(), time.perf_counter()
                tg.cancel_scope.cancel()
            got, gc_got = list(cpu), list(gcs)
            nogc = sorted(c - g for c, g in zip(got, gc_got, strict=True))
            got.sort()

            def p(xs: list[float], q: float) -> float:
                return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

            print(
                json.dumps(
                    {
                        "ticks": len(got),
                        "tick_cpu_p50_ms": p(got, 0.5),
                        "tick_cpu_p99_ms": p(got, 0.99),
                        "tick_cpu_nogc_p50_ms": p(nogc, 0.5),
                        "tick_cpu_nogc_p99_ms": p(nogc, 0.99),
                        "tick_gc_max_ms": max(gc_got, default=0.0) * 1e3,
                        "cpu_pct": (c1 - c0) / (w1 - w0) * 100,
                        "rtcore": rtcore.__file__,
                    }
                )
            )

    anyio.run(main)


def tick_doc(ticks: int) -> None:
    """The room side of ``ticks`` ticks of a 100-player ``{tick, pos}`` state, no event loop.

    Each tick moves 10 positions (seeded, the same in every run and tree),
    then does what the owner and its node do with the state: the canonical
    copy (``state_builtins``), the diff against the last one, the fold of the
    patch into a follower's :class:`~rtcore.rooms.runtime.RoomDoc` and one
    JSON encoding of it. Deterministic, for instruction counts::

        valgrind --tool=callgrind python benchmarks/rooms_inproc.py --tick-doc 100
        valgrind --tool=callgrind python benchmarks/rooms_inproc.py --tick-doc 300

    (the difference / 200 is the instructions per tick, without the start-up).
    """
    import random

    import msgspec

    from rtcore.protocol import patch
    from rtcore.protocol.state import state_builtins
    from rtcore.rooms.runtime import RoomDoc

    class Arena(msgspec.Struct):
        tick: int = 0
        pos: dict[str, list[float]] = {}

    class Ev:
        type = "patch"

        def __init__(self, data: Any) -> None:
            self.data = data

    rnd = random.Random(1)
    st = Arena(pos={f"p{i}": [0.0, 0.0] for i in range(100)})
    prev = state_builtins(st)
    follower = RoomDoc(state=state_builtins(st), members={}, room={}, inbox=0)
    enc = msgspec.json.Encoder()
    names = sorted(st.pos)
    for n in range(ticks):
        for name in rnd.sample(names, 10):
            st.pos[name] = [rnd.random(), rnd.random()]
        st.tick += 1
        new = state_builtins(st)
        ops = patch.diff(prev, new, ["state"])
        ops.append(["set", ["inbox"], n])
        follower.apply(Ev({"ops": ops, "inbox": n}))  # type: ignore[arg-type]
        enc.encode({"ops": ops, "inbox": n})
        prev = new
    assert follower.state == prev
    print(json.dumps({"ticks": ticks, "ops_last_tick": len(ops), "rtcore": __import__("rtcore").__file__}))


def run_one(
    src: str | None, rooms_n: int, moves: int, arena: bool = False, public: bool = False, backend: str = "memory://"
) -> dict[str, Any]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--rooms", str(rooms_n), "--moves", str(moves)]
        + (["--arena"] if arena else [])
        + (["--public"] if public else [])
        + ["--backend", backend],
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
    parser.add_argument(
        "--arena",
        action="store_true",
        help="the 20 Hz arena room instead (100 players, 2 inputs/s each, 8 s per repetition): tick step CPU",
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here instead of results/rooms-inproc[-arena]-DATE.json")
    parser.add_argument(
        "--tick-doc",
        type=int,
        metavar="TICKS",
        help="only the room side of TICKS ticks of a 100-player state, no event loop (for callgrind; see tick_doc)",
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="listed rooms (as rooms.py's join_or_create makes them) instead of private ones: each step also keeps the room's listing",
    )
    parser.add_argument(
        "--backend",
        default="memory://",
        choices=["memory://", "sqlite"],
        help="the node's backend (sqlite: a fresh file in a temp dir per repetition)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.tick_doc:
        tick_doc(opts.tick_doc)
        return
    if opts.child:
        if opts.arena:
            child_arena(100, 8.0, 2.0)
        else:
            child(opts.rooms, opts.moves, opts.public, opts.backend)
        return
    if opts.arena:
        arena_main(opts)
        return
    peer = str(opts.peer.resolve()) if opts.peer else None
    runs: dict[str, list[dict[str, Any]]] = {"this": [], **({"peer": []} if peer else {})}
    for rep in range(opts.reps):
        order = ["this", "peer"] if rep % 2 == 0 else ["peer", "this"]
        for who in order if peer else ["this"]:
            got = run_one(peer if who == "peer" else None, opts.rooms, opts.moves, public=opts.public, backend=opts.backend)
            runs[who].append(got)
            print(f"  [{who}] {got['us_per_move']:.1f} us/move, {got['moves_per_s']:,.0f} moves/s", flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version()},
        "settings": {
            "rooms": opts.rooms,
            "moves_per_room": opts.moves,
            "reps": opts.reps,
            "peer": peer,
            "public": opts.public,
            "backend": opts.backend,
        },
        "load": os.getloadavg(),
        "runs": runs,
        "median_us_per_move": {who: statistics.median(r["us_per_move"] for r in rs) for who, rs in runs.items()},
    }
    out = opts.out or HERE / "results" / f"rooms-inproc-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("median us/move:", {k: round(v, 1) for k, v in report["median_us_per_move"].items()}, f"-> {out}")


def arena_main(opts: argparse.Namespace) -> None:
    """``--arena``: the tick step's CPU per repetition, this tree and (``--peer``) the other, alternating."""
    peer = str(opts.peer.resolve()) if opts.peer else None
    runs: dict[str, list[dict[str, Any]]] = {"this": [], **({"peer": []} if peer else {})}
    for rep in range(opts.reps):
        order = ["this", "peer"] if rep % 2 == 0 else ["peer", "this"]
        for who in order if peer else ["this"]:
            got = run_one(peer if who == "peer" else None, 0, 0, arena=True)
            runs[who].append(got)
            print(
                f"  [{who}] tick step CPU p50 {got['tick_cpu_p50_ms']:.3f} ms, p99 {got['tick_cpu_p99_ms']:.3f} ms "
                f"(less GC: p50 {got['tick_cpu_nogc_p50_ms']:.3f}, p99 {got['tick_cpu_nogc_p99_ms']:.3f}), "
                f"longest GC in a step {got['tick_gc_max_ms']:.2f} ms, process CPU {got['cpu_pct']:.1f} %",
                flush=True,
            )
    keys = ("tick_cpu_p50_ms", "tick_cpu_p99_ms", "tick_cpu_nogc_p50_ms", "tick_cpu_nogc_p99_ms", "cpu_pct")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version()},
        "settings": {"players": 100, "input_hz": 2.0, "seconds": 8.0, "reps": opts.reps, "peer": peer},
        "load": os.getloadavg(),
        "runs": runs,
        "median": {who: {k: statistics.median(r[k] for r in rs) for k in keys} for who, rs in runs.items()},
    }
    out = opts.out or HERE / "results" / f"rooms-inproc-arena-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("medians:", {who: {k: round(v, 3) for k, v in m.items()} for who, m in report["median"].items()}, f"-> {out}")


if __name__ == "__main__":
    main()

"""Benchmark rtcore rooms: moves, memory per player, a 20 Hz room, joins.

One command::

    python benchmarks/rooms.py [--quick]

The server (``rtcore.server.runner.Server`` with :func:`rtcore.rooms.install`)
runs in its own process (``rooms.py --serve BACKEND``), on loopback. The load
client speaks the wire protocol directly with the ``websockets`` library and
msgspec (raw JSON frames, no rtcore client code) and runs in worker processes
(``--workers``, 2 by default) so it is not the bottleneck; the CPU of the server
and of every client process is read from ``/proc/<pid>/stat`` around each
measured window and written next to each figure.

Workloads (each figure is measured ``--reps`` times, at least 3; the JSON keeps
every repetition, the README shows median and min-max):

1. **moves**: N two-player ``duel`` rooms (200 and 1,000), on ``memory://`` and
   ``sqlite://``. The player whose turn it is sends ``room.send move``; the
   round trip is from sending the command to receiving, on the same
   connection, the patch that passes the turn. moves/s, p50/p99, server CPU
   per move.
2. **memory**: 2,000 players join 1,000 rooms through matchmaking
   (``room.join_or_create`` + ``sub`` + first patch); server RSS after minus
   before, divided by 2,000. The same run gives **joins/s** (all 2,000 joins,
   64 in flight).
3. **tick**: one ``arena`` room at 20 Hz with 100 players, each sending an
   input (a new position) every ``1/--input-hz`` seconds. Tick duration is
   timed inside the server process around the room executor's tick step
   (``on_tick`` + diff + patch append), by wrapping ``_Actor._step`` in this
   benchmark's server only; server CPU % of one core; bytes of room-stream
   frames (``evt``/``sync``) received per client per second.

``--colyseus`` also measures Colyseus 0.18.8 (``benchmarks/colyseus/``: a
Node server with the same two room types and Node load workers on the
Colyseus SDK; ``npm ci`` into ``~/.cache/rtcore-colyseus/<lock hash>`` on first
use): every repetition of moves (``memory://``), joins and arena runs rtcore
and Colyseus back to back on fresh servers, alternating which goes first; the
JSON gets a ``colyseus`` section and the table a measured column and
rtcore / Colyseus ratios per repetition pair.

Writes ``benchmarks/results/rooms-<date>.json`` and regenerates the rooms
table of ``benchmarks/README.md`` (between ``<!-- rooms:begin -->`` and
``<!-- rooms:end -->``) from it (``--quick`` writes ``rooms-<date>-quick.json``
and prints the table instead); ``--table FILE.json`` only regenerates it.
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- rooms:begin -->", "<!-- rooms:end -->"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Seconds the server's CPU is read with every room set up and nobody moving.
IDLE_WINDOW = 3.0

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


# --- /proc ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# --- the server (``--serve``) -----------------------------------------------------------


def serve(backend: str) -> None:
    """Run the benchmark app; print ``READY <port>``; stop on SIGTERM."""
    import gc
    import signal
    from time import perf_counter, thread_time

    import anyio

    import rtcore
    from rtcore import rooms
    from rtcore.rooms import runtime
    from rtcore.server.runner import Server

    app = rtcore.App("roomsbench")
    registry = rooms.install(app)
    tick_durations: list[float] = []
    # The tick step's CPU time (this thread's): what the step costs, unlike the
    # wall-clock duration, is not stretched by other processes on a busy machine.
    tick_cpu: list[float] = []
    # Garbage collection inside each tick step (seconds, and the oldest
    # generation collected, -1 for none): a full collection of the server's
    # heap is a pause of its own, whatever the step did.
    tick_gc: list[list[float]] = []
    gc_now = {"t0": 0.0, "s": 0.0, "gen": -1, "total": 0.0, "full": 0}
    # The longest single collection (CPU s) of each generation since the last
    # ``bench.gc``: the pauses the GC policy causes.
    gc_max = [0.0, 0.0, 0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        # CPU time (thread_time): a descheduled collection is not counted as longer.
        if phase == "start":
            gc_now["t0"] = thread_time()
        else:
            took = thread_time() - gc_now["t0"]
            gc_now["s"] += took
            gc_now["total"] += took
            gc_now["gen"] = max(gc_now["gen"], info["generation"])
            gc_now["full"] += info["generation"] == 2
            gc_max[info["generation"]] = max(gc_max[info["generation"]], took)

    gc.callbacks.append(on_gc)

    @app.authenticate
    async def authenticate(token: str | None) -> rtcore.Principal | None:
        return rtcore.Principal(token) if token else None

    class Duel(msgspec.Struct):
        players: list[str] = []
        turn: str = ""
        moves: int = 0
        last: int = -1

    class MoveData(msgspec.Struct):
        n: int

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

    class Arena(msgspec.Struct):
        tick: int = 0
        pos: dict[str, list[float]] = {}

    class Input(msgspec.Struct):
        x: float
        y: float

    @registry.define("arena")
    class ArenaRoom(rooms.Room[Arena]):
        max_clients = 0
        tick_rate = 20
        patch_rate = 20  # one patch per tick for the inputs in between, as Colyseus's 50 ms default
        auto_dispose = 3600.0  # the creator leaves before the players come

        async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
            self.state.pos[player.id] = [0.0, 0.0]

        @rooms.message("input")
        async def input(self, player: rooms.Player, data: Input) -> None:
            self.state.pos[player.id] = [data.x, data.y]

        async def on_tick(self, dt: float) -> None:
            self.state.tick += 1

    # Tick timing: rtcore exposes none, so time the executor's whole tick step
    # (on_tick, diff, patch append) here, in the benchmark's server only.
    step = runtime._Actor._step

    async def timed_step(self: Any, fn: Any, args: Any) -> None:
        gc_now["s"], gc_now["gen"] = 0.0, -1
        t0, c0 = perf_counter(), thread_time()
        await step(self, fn, args)
        if getattr(fn, "__name__", "") == "on_tick":
            tick_durations.append(perf_counter() - t0)
            tick_cpu.append(thread_time() - c0)
            tick_gc.append([gc_now["s"], gc_now["gen"]])

    runtime._Actor._step = timed_step  # type: ignore[method-assign]

    @app.command("bench.ticks")
    async def ticks(ctx: rtcore.Context, args: Any) -> list[list[float]]:
        out = [list(tick_durations), list(tick_cpu), list(tick_gc)]
        tick_durations.clear()
        tick_cpu.clear()
        tick_gc.clear()
        return out

    @app.command("bench.gc")
    async def gc_total(ctx: rtcore.Context, args: Any) -> list[float]:
        """GC CPU s so far, full collections so far, longest collection of generation 0, 1, 2 (s) since the last call.

        With ``{"collect": true}``: a forced full collection's CPU seconds now,
        the objects it walked (tracked, not frozen) and the frozen ones: the
        worst pause the heap of the moment can cause.
        """
        if args.get("collect"):
            c0 = thread_time()
            gc.collect()
            took = thread_time() - c0
            return [took, len(gc.get_objects()), gc.get_freeze_count()]
        out = [gc_now["total"], gc_now["full"], *gc_max]
        gc_max[:] = [0.0, 0.0, 0.0]
        return out

    print("rtcore from", rtcore.__file__, file=sys.stderr)
    if os.environ.get("ROOMS_BENCH_TRACEMALLOC"):
        # Where the memory of seated players goes (a by-hand investigation aid):
        # the first call takes a baseline, later ones the top growth by line.
        import tracemalloc

        tracemalloc.start(int(os.environ["ROOMS_BENCH_TRACEMALLOC"]))
        marks: list[Any] = []

        @app.command("bench.tracemalloc")
        async def trace(ctx: rtcore.Context, args: Any) -> list[str]:
            gc.collect()  # garbage of the joins is not what seated players hold
            snap = tracemalloc.take_snapshot()
            if args and args.get("dump"):
                # --tracemalloc PREFIX: the whole snapshot, for benchmarks/ab/memdiff.py.
                snap.dump(str(args["dump"]))
                return []
            if not marks:
                marks.append(snap)
                return []
            by: dict[str, int] = {}
            for st in snap.compare_to(marks[0], "traceback"):
                # Charge each allocation to the innermost rtcore frame (module:line).
                where = next(
                    (f"{f.filename.partition('/rtcore/')[2]}:{f.lineno}" for f in st.traceback if "/rtcore/" in f.filename),
                    st.traceback[0].filename.rpartition("/")[2],
                )
                by[where] = by.get(where, 0) + st.size_diff
            return [f"{v / 1024:10.1f} kB {k}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:40]]

    def gc_policy() -> None:
        # What ``rtcore serve`` does to the collector once listening (its
        # default, or RTCORE_GC_TUNING), so the server is measured as shipped;
        # a tree without the policy leaves the collector alone.
        from rtcore.server import runner

        if getattr(runner, "gc_tuning_wanted", lambda: False)():
            runner.tune_gc()
        if os.environ.get("ROOMS_BENCH_GC_THRESHOLD"):
            # --gc-threshold: an experiment on CPython's cyclic GC, over the policy.
            gc.set_threshold(*(int(x) for x in os.environ["ROOMS_BENCH_GC_THRESHOLD"].split(",")))

    async def main() -> None:
        server = Server(app, port=0, backend=backend, grace=0.5)
        server.node_options["limits"] = rtcore.Limits(
            command_rate=1e9,
            command_burst=1_000_000_000,
            max_inflight=10_000,
            max_subscriptions=1000,
            idle_timeout=3600.0,
        )
        async with anyio.create_task_group() as tg:
            bound = await tg.start(server.serve)
            gc_policy()
            print("READY", bound, flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    await server.stop(grace=0.2)
                    break

    anyio.run(main)


#: ``--profile``: workload label -> top py-spy entries of its server (filled by ServerProcess.stop).
PROFILES: dict[str, dict[str, Any]] = {}
PROFILE = {"on": False}
#: ``--peer SRC``: the server of the peer's runs imports rtcore from SRC (PYTHONPATH).
PEER: dict[str, str | None] = {"src": None, "running": None}
#: ``--tracemalloc PREFIX``: the joins workload dumps the server's snapshots to PREFIX-{this,peer}{rep}-{1,2}.
TRACE: dict[str, str | None] = {"prefix": None}


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """The benchmark server in a child process (sampled by ``py-spy record`` under ``--profile``)."""

    def __init__(self, backend: str, label: str = "") -> None:
        env = dict(os.environ)
        if PEER["running"]:
            env["PYTHONPATH"] = str(PEER["running"])  # before the editable install: the peer's rtcore
        # ROOMS_BENCH_SERVER_LOG=FILE: the servers' stderr (appended), to see why one failed.
        log = os.environ.get("ROOMS_BENCH_SERVER_LOG")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", backend],
            stdout=subprocess.PIPE,
            stderr=open(log, "ab") if log else subprocess.DEVNULL,  # noqa: SIM115 (the child keeps it)
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}/v1/ws"
        self.pid = self.proc.pid
        self.label = label
        self.spy: subprocess.Popen[bytes] | None = None
        if PROFILE["on"] and label:
            self.spy_out = Path(tempfile.mkdtemp()) / "stacks.txt"
            self.spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.pid), "--format", "raw", "--rate", "200", "-o", str(self.spy_out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        stop_process(self.proc)
        if self.spy is not None:
            self.spy.wait(30)  # py-spy writes its file when the server exits
            PROFILES.setdefault(self.label, profile_top(self.spy_out.read_text()))


def profile_top(stacks: str, n: int = 8) -> dict[str, Any]:
    """Top ``n`` functions by own samples and by inclusive samples from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in stacks.splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        k = int(count)
        total += k
        names = [_short(f) for f in frames.split(";")]
        own[names[-1]] = own.get(names[-1], 0) + k
        for name in set(names):
            incl[name] = incl.get(name, 0) + k
    # Inclusive entries worth reading: rtcore's own functions below the event loop.
    skip = ("run", "_run", "run_forever", "_run_once", "<module>", "main", "serve", "select", "run_until_complete")
    inclusive = [(k, v) for k, v in incl.items() if "rtcore/" in k and k.split(" ")[0] not in skip]

    def top(items: Any) -> list[list[Any]]:
        return [[name, round(v / max(total, 1) * 100, 1)] for name, v in sorted(items, key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "own": top(own.items()), "inclusive": top(inclusive)}


def _short(frame: str) -> str:
    """``fn (path/to/rtcore/x/y.py:12)`` -> ``fn (rtcore/x/y.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    for marker in ("rtcore/", "site-packages/", "python3.11/"):
        if marker in path:
            path = marker + path.partition(marker)[2] if marker == "rtcore/" else path.partition(marker)[2]
            break
    return f"{name} ({path})"


# --- the load client (worker processes) ---------------------------------------------------


class Conn:
    """One raw WebSocket connection: hello, numbered requests, a frame queue per kind."""

    def __init__(self, ws: Any, name: str) -> None:
        self.ws = ws
        self.name = name
        self.rid = 0

    @classmethod
    async def open(cls, url: str, name: str) -> "Conn":
        from websockets.asyncio.client import connect

        ws = await connect(
            url,
            subprotocols=["rtcore.v1.json"],  # type: ignore[list-item]
            compression=None,
            ping_interval=None,
            max_queue=None,
            open_timeout=120,  # a saturated server (1,000 rooms of old code on a busy machine) is slow to accept
        )
        await ws.send(_encode({"t": "hello", "v": 1, "token": name}).decode())
        welcome = _decode(await ws.recv())
        assert welcome["t"] == "welcome", welcome
        return cls(ws, name)

    async def send(self, frame: dict[str, Any]) -> int:
        self.rid += 1
        frame["id"] = self.rid
        await self.ws.send(_encode(frame).decode())
        return self.rid

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send and wait for the reply (frames before it are returned in ``.early``)."""
        rid = await self.send(frame)
        while True:
            reply = _decode(await self.ws.recv())
            if reply.get("id") == rid and reply["t"] in ("ok", "err", "subbed"):
                if reply["t"] == "err":
                    raise RuntimeError(f"{self.name}: {reply}")
                return reply

    async def cmd(self, name: str, args: dict[str, Any]) -> Any:
        return (await self.request({"t": "cmd", "name": name, "args": args, "key": f"{self.name}-{self.rid + 1}"}))[
            "result"
        ]

    async def subscribe_first_patch(self, stream: str) -> dict[str, Any]:
        """``sub`` with ``since {"epoch": "", "offset": 0}``; return the first patch's document."""
        await self.request({"t": "sub", "stream": stream, "since": {"epoch": "", "offset": 0}})
        while True:
            frame = _decode(await self.ws.recv())
            if frame.get("t") == "evt" and frame["type"] == "patch":
                return dict(frame["data"]["ops"][0][2])
            if frame.get("t") == "snap":
                return dict(frame["state"])


def turn_of(ops: list[Any]) -> str | None:
    """The ``state.turn`` a patch sets, if any (the only field the mover needs)."""
    turn = None
    for op in ops:
        if op[0] != "set":
            continue
        path = op[1]
        if path == ["state", "turn"]:
            turn = op[2]
        elif not path:
            turn = op[2]["state"]["turn"]
    return turn


async def _moves_worker(url: str, rooms: int, tag: str, reps: int, seconds: float, barrier: Any, out: Any) -> None:
    pairs: list[tuple[Conn, Conn]] = []
    sem = asyncio.Semaphore(32)

    async def setup(i: int) -> tuple[Conn, Conn]:
        async with sem:
            a = await Conn.open(url, f"{tag}a{i}")
            b = await Conn.open(url, f"{tag}b{i}")
            joined = await a.cmd("room.create", {"type": "duel", "private": True})
            await b.cmd("room.join", {"room_id": joined["room_id"]})
            for c in (a, b):
                await c.request({"t": "sub", "stream": joined["stream"], "since": {"epoch": "", "offset": 0}})
            a.room = b.room = joined["room_id"]  # type: ignore[attr-defined]
            return a, b

    pairs = list(await asyncio.gather(*(setup(i) for i in range(rooms))))
    state = {"playing": False, "lat": [], "done": 0, "errors": 0, "t_end": 0.0}
    t0s: dict[str, float] = {}
    turns: dict[str, str] = {}
    n = 0

    async def move(c: Conn) -> None:
        nonlocal n
        n += 1
        t0s[c.name] = time.perf_counter()
        await c.send({"t": "cmd", "name": "room.send", "args": {"room_id": c.room, "type": "move", "data": {"n": n}}})  # type: ignore[attr-defined]

    async def reader(c: Conn) -> None:
        async for raw in c.ws:
            frame = _decode(raw)
            t = frame.get("t")
            if t == "err":
                state["errors"] += 1
                continue
            if t != "evt" or frame["type"] != "patch":
                continue
            turn = turn_of(frame["data"]["ops"])
            if turn is None:
                continue
            turns[c.room] = turn  # type: ignore[attr-defined]
            t0 = t0s.pop(c.name, None)
            if t0 is not None and turn != c.name:
                now = time.perf_counter()
                if now <= state["t_end"]:
                    state["lat"].append(now - t0)
                    state["done"] += 1
            if turn == c.name and state["playing"]:
                await move(c)

    readers = [asyncio.create_task(reader(c)) for pair in pairs for c in pair]
    await asyncio.to_thread(barrier.wait)  # set up; the parent measures the idle server
    await asyncio.to_thread(barrier.wait)
    for _ in range(reps):
        await asyncio.to_thread(barrier.wait)
        state.update(playing=True, lat=[], done=0, errors=0, t_end=time.perf_counter() + seconds)
        for a, b in pairs:
            first = a if turns.get(a.room, a.name) == a.name else b  # type: ignore[attr-defined]
            await move(first)
        await asyncio.sleep(seconds)
        state["playing"] = False
        await asyncio.sleep(0.5)  # moves in flight finish
        out.put({"lat": state["lat"], "moves": state["done"], "errors": state["errors"], "pid": os.getpid()})
    for r in readers:
        r.cancel()
    await asyncio.gather(*(c.ws.close() for pair in pairs for c in pair), return_exceptions=True)


def moves_worker(*args: Any) -> None:
    """Process entry point of workload 1."""
    asyncio.run(_moves_worker(*args))


async def _join_worker(
    url: str, players: int, tag: str, inflight: int, ready: Any, go: Any, release: Any, out: Any
) -> None:
    sem = asyncio.Semaphore(inflight)
    conns: list[Conn] = []
    ready.set()
    await asyncio.to_thread(go.wait)
    t0 = time.perf_counter()

    async def join(i: int) -> None:
        async with sem:
            c = await Conn.open(url, f"{tag}p{i}")
            joined = await c.cmd("room.join_or_create", {"type": "duel"})
            await c.subscribe_first_patch(joined["stream"])
            conns.append(c)

    await asyncio.gather(*(join(i) for i in range(players)))
    out.put({"seconds": time.perf_counter() - t0, "joined": len(conns), "pid": os.getpid()})
    # Stay connected (seated) until the parent has read the server's RSS.
    await asyncio.to_thread(release.wait)
    await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)


def join_worker(*args: Any) -> None:
    """Process entry point of workload 2."""
    asyncio.run(_join_worker(*args))


async def _arena_worker(
    url: str, room_id: str, names: list[str], input_hz: float, seconds: float, reps: int, barrier: Any, out: Any
) -> None:
    conns = [await Conn.open(url, n) for n in names]
    for c in conns:
        joined = await c.cmd("room.join", {"room_id": room_id})
        await c.request({"t": "sub", "stream": joined["stream"], "since": {"epoch": "", "offset": 0}})
    counting = {"on": False, "bytes": 0, "frames": 0, "inputs": 0}

    async def reader(c: Conn) -> None:
        async for raw in c.ws:
            # Room-stream frames only (evt/sync/snap); command replies are not state.
            if counting["on"] and raw.startswith(('{"t":"evt"', '{"t":"sync"', '{"t":"snap"')):
                counting["bytes"] += len(raw.encode() if isinstance(raw, str) else raw)
                counting["frames"] += 1

    async def sender(c: Conn, offset: float, until: float) -> None:
        await asyncio.sleep(offset)
        k = 0
        while time.perf_counter() < until:
            k += 1
            await c.send(
                {
                    "t": "cmd",
                    "name": "room.send",
                    "args": {"room_id": room_id, "type": "input", "data": {"x": k * 0.5, "y": -k * 0.25}},
                }
            )
            counting["inputs"] += 1
            await asyncio.sleep(1 / input_hz)

    readers = [asyncio.create_task(reader(c)) for c in conns]
    for _ in range(reps):
        await asyncio.to_thread(barrier.wait)
        counting.update(on=True, bytes=0, frames=0, inputs=0)
        t0 = time.perf_counter()
        until = t0 + seconds
        await asyncio.gather(*(sender(c, i / len(conns) / input_hz, until) for i, c in enumerate(conns)))
        elapsed = time.perf_counter() - t0
        counting["on"] = False
        out.put(
            {
                "bytes": counting["bytes"],
                "frames": counting["frames"],
                "inputs": counting["inputs"],
                "clients": len(conns),
                "seconds": elapsed,
                "pid": os.getpid(),
            }
        )
        await asyncio.sleep(0.3)
    for r in readers:
        r.cancel()
    await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)


def arena_worker(*args: Any) -> None:
    """Process entry point of workload 3."""
    asyncio.run(_arena_worker(*args))


# --- the parent: workloads ----------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "reps": values}


def _cpu(pids: list[int]) -> list[float]:
    out = []
    for p in pids:
        try:
            out.append(cpu_seconds(p))
        except OSError:
            out.append(0.0)
    return out


def window_figures(server_cpu_s: float, c0: list[float], c1: list[float], wall: float) -> dict[str, Any]:
    """A measured window's server CPU % of a core, each client process's CPU % and the load average."""
    return {
        "server_cpu_pct": server_cpu_s / wall * 100,
        "client_cpu_pct": [(b - a) / wall * 100 for a, b in zip(c0, c1, strict=True)],
        "load": loadavg(),
    }


def move_figures(parts: list[dict[str, Any]], seconds: float, server_cpu_s: float) -> dict[str, Any]:
    """Moves/s, move → patch p50/p99 and server CPU per move from the load workers' reports of one window."""
    lat = [x for part in parts for x in part["lat"]]
    moves = sum(part["moves"] for part in parts)
    return {
        "moves_per_s": moves / seconds,
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "server_cpu_us_per_move": server_cpu_s / max(moves, 1) * 1e6,
    }


def tick_figures(durations: list[float], cpu_durations: list[float]) -> dict[str, Any]:
    """Tick duration p50/p99/max (wall clock) and CPU p50/p99, in ms."""
    return {
        "tick_p50_ms": pct(durations, 0.5) * 1e3,
        "tick_p99_ms": pct(durations, 0.99) * 1e3,
        "tick_max_ms": max(durations) * 1e3,
        "tick_cpu_p50_ms": pct(cpu_durations, 0.5) * 1e3,
        "tick_cpu_p99_ms": pct(cpu_durations, 0.99) * 1e3,
    }


def traffic_figures(parts: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The arena players' state bytes and frames per client per second, and inputs per second."""
    clients = sum(p["clients"] for p in parts)
    return {
        "bytes_per_client_s": sum(p["bytes"] / p["seconds"] for p in parts) / clients,
        "frames_per_client_s": sum(p["frames"] / p["seconds"] for p in parts) / clients,
        "inputs_per_s": sum(p["inputs"] for p in parts) / wall,
    }


async def server_gc(url: str, collect: bool = False) -> list[float]:
    """The benchmark server's ``bench.gc`` (see there): totals and longest collection per generation, or a forced full one."""
    c = await Conn.open(url, f"gc{time.monotonic_ns()}")  # a fresh key: no replayed answer
    try:
        got = await c.cmd("bench.gc", {"collect": collect})
    except Exception:
        got = [float("nan")] * 5
    await c.ws.close()
    return [float(x) for x in got] + [0.0] * (5 - len(got))


async def server_tracemalloc(url: str, path: str) -> None:
    """``--tracemalloc``: have the benchmark server dump a tracemalloc snapshot to ``path``."""
    c = await Conn.open(url, f"tm{time.monotonic_ns()}")
    await c.cmd("bench.tracemalloc", {"dump": path})
    await c.ws.close()
    print(f"  tracemalloc snapshot: {path}", flush=True)


def run_moves(backend: str, rooms: int, reps: int, seconds: float, workers: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    server = ServerProcess(backend, f"moves {rooms} rooms {backend.split(':')[0]}")
    try:
        barrier = ctx.Barrier(workers + 1)
        out = ctx.Queue()
        procs = []
        for w in range(workers):
            share = rooms // workers + (1 if w < rooms % workers else 0)
            p = ctx.Process(target=moves_worker, args=(server.url, share, f"w{w}", reps, seconds, barrier, out))
            p.start()
            procs.append(p)
        pids = [p.pid for p in procs if p.pid is not None]
        barrier.wait(timeout=300)
        # The rooms' own cost with nobody moving (leases, idle wake-ups, supervisor).
        i0, t0 = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(IDLE_WINDOW)
        idle_pct = (cpu_seconds(server.pid) - i0) / (time.perf_counter() - t0) * 100
        barrier.wait(timeout=60)
        runs = []
        for _ in range(reps):
            barrier.wait(timeout=300)
            g0 = asyncio.run(server_gc(server.url))
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            time.sleep(seconds)
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            g1 = asyncio.run(server_gc(server.url))
            parts = [out.get(timeout=120) for _ in procs]
            moves = sum(part["moves"] for part in parts)
            wall = l1 - l0
            runs.append(
                {
                    **move_figures(parts, seconds, s1 - s0),
                    # The cyclic GC's share (read just outside the window: a slight overcount).
                    "server_gc_us_per_move": (g1[0] - g0[0]) / max(moves, 1) * 1e6,
                    "server_gc_full": g1[1] - g0[1],
                    # The longest single collection of each generation in the window (CPU ms).
                    "server_gc_max_ms": [x * 1e3 for x in g1[2:5]],
                    **window_figures(s1 - s0, c0, c1, wall),
                    "errors": sum(part["errors"] for part in parts),
                }
            )
            print(
                f"  moves {backend} {rooms} rooms: {runs[-1]['moves_per_s']:,.0f}/s p99 {runs[-1]['p99_ms']:.1f} ms, "
                f"{runs[-1]['server_cpu_us_per_move']:.0f} us/move (GC {runs[-1]['server_gc_us_per_move']:.0f}, "
                f"{runs[-1]['server_gc_full']:.0f} full; longest gen0/1/2 "
                f"{'/'.join(f'{x:.2f}' for x in runs[-1]['server_gc_max_ms'])} ms), server {runs[-1]['server_cpu_pct']:.0f}% "
                f"clients {[round(x) for x in runs[-1]['client_cpu_pct']]}%",
                flush=True,
            )
        for p in procs:
            p.join(30)
        forced = asyncio.run(server_gc(server.url, collect=True))
        print(f"  forced full collection: {forced[0] * 1e3:.1f} ms CPU, {forced[1]:,.0f} objects, {forced[2]:,.0f} frozen", flush=True)
    finally:
        server.stop()
    return {
        "backend": backend.split(":")[0],
        "rooms": rooms,
        "runs": runs,
        # With every room still set up: the longest pause a full collection of this heap takes.
        "gc_forced_full_ms": forced[0] * 1e3,
        "gc_objects": forced[1],
        "gc_frozen": forced[2],
        **{
            k: summary([r[k] for r in runs])
            for k in ("moves_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_move", "server_gc_us_per_move", "server_cpu_pct")
        },
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
        "idle_server_cpu_pct": idle_pct,
    }


def run_joins(players: int, reps: int, workers: int, inflight: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    runs = []
    for rep in range(reps):
        server = ServerProcess("memory://", "joins")
        try:
            # Warm up imports and code paths (one room, then the listing is empty again).
            warm_go, warm_ready, warm_out = ctx.Event(), ctx.Event(), ctx.Queue()
            warm_go.set()
            warm = ctx.Process(
                target=join_worker, args=(server.url, 2, f"warm{rep}", 2, warm_ready, warm_go, warm_go, warm_out)
            )
            warm.start()
            warm_out.get(timeout=60)
            warm.join(60)
            time.sleep(0.5)
            if TRACE["prefix"]:
                asyncio.run(server_tracemalloc(server.url, f"{TRACE['prefix']}-{'peer' if PEER['running'] else 'this'}{rep}-1"))
            rss0 = rss_bytes(server.pid)
            go, release = ctx.Event(), ctx.Event()
            out = ctx.Queue()
            procs, readies = [], []
            for w in range(workers):
                ready = ctx.Event()
                share = players // workers + (1 if w < players % workers else 0)
                p = ctx.Process(
                    target=join_worker,
                    args=(server.url, share, f"r{rep}w{w}", inflight // workers, ready, go, release, out),
                )
                p.start()
                procs.append(p)
                readies.append(ready)
            for r in readies:
                r.wait(60)
            pids = [p.pid for p in procs if p.pid is not None]
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            go.set()
            parts = [out.get(timeout=300) for _ in procs]
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            time.sleep(0.5)
            rss1 = rss_bytes(server.pid)
            if TRACE["prefix"]:
                asyncio.run(server_tracemalloc(server.url, f"{TRACE['prefix']}-{'peer' if PEER['running'] else 'this'}{rep}-2"))
            release.set()
            joined = sum(p["joined"] for p in parts)
            seconds = max(p["seconds"] for p in parts)
            for p in procs:
                p.join(30)
            runs.append(
                {
                    "joins_per_s": joined / seconds,
                    "rss_before_mb": rss0 / 2**20,
                    "rss_after_mb": rss1 / 2**20,
                    "rss_kb_per_player": (rss1 - rss0) / joined / 1024,
                    "server_cpu_us_per_join": (s1 - s0) / joined * 1e6,
                    "client_cpu_pct": [(b - a) / (l1 - l0) * 100 for a, b in zip(c0, c1, strict=True)],
                    "load": loadavg(),
                }
            )
            print(
                f"  joins: {runs[-1]['joins_per_s']:,.0f}/s, {runs[-1]['rss_kb_per_player']:.1f} kB/player, "
                f"clients {[round(x) for x in runs[-1]['client_cpu_pct']]}%",
                flush=True,
            )
        finally:
            server.stop()
    return {
        "players": players,
        "rooms": players // 2,
        "runs": runs,
        **{k: summary([r[k] for r in runs]) for k in ("joins_per_s", "rss_kb_per_player", "server_cpu_us_per_join")},
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
    }


def run_arena(players: int, input_hz: float, reps: int, seconds: float, workers: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    server = ServerProcess("memory://", "arena")
    try:

        async def create() -> tuple[str, Conn]:
            host = await Conn.open(server.url, "host")
            joined = await host.cmd("room.create", {"type": "arena"})
            return joined["room_id"], host

        async def ticks() -> tuple[list[float], list[float], list[list[float]]]:
            c = await Conn.open(server.url, f"probe{time.monotonic_ns()}")  # a fresh key: no replayed answer
            got = await c.cmd("bench.ticks", {})
            await c.ws.close()
            return list(got[0]), list(got[1]), list(got[2]) if len(got) > 2 else []

        async def hold_host() -> str:
            # The creator stays seated through the run only via its seat: it leaves
            # no connection open, so the room has exactly ``players`` clients (+ host seat).
            room_id, host = await create()
            await host.cmd("room.leave", {"room_id": room_id})
            await host.ws.close()
            return room_id

        room_id = asyncio.run(hold_host())
        barrier = ctx.Barrier(workers + 1)
        out = ctx.Queue()
        procs = []
        for w in range(workers):
            names = [f"a{w}-{i}" for i in range(w, players, workers)]
            p = ctx.Process(
                target=arena_worker, args=(server.url, room_id, names, input_hz, seconds, reps, barrier, out)
            )
            p.start()
            procs.append(p)
        pids = [p.pid for p in procs if p.pid is not None]
        runs = []
        for _ in range(reps):
            barrier.wait(timeout=120)
            asyncio.run(ticks())  # drop the ticks of the idle time before
            asyncio.run(server_gc(server.url))  # starts the window's longest-collection figures
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            parts = [out.get(timeout=120) for _ in procs]
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            durations, cpu_durations, gcs = asyncio.run(ticks())
            g1 = asyncio.run(server_gc(server.url))
            gc_full = [g for g, gen in gcs if gen == 2]
            # The step's CPU less the GC that ran inside it (the step's own code; the lists line up).
            cpu_nogc = [c - g[0] for c, g in zip(cpu_durations, gcs, strict=True)] if gcs else cpu_durations
            wall = l1 - l0
            runs.append(
                {
                    **tick_figures(durations, cpu_durations),
                    "ticks": len(durations),
                    # GC inside the tick steps: how many steps ran a full (generation 2) collection, the longest.
                    "tick_gc_full": len(gc_full),
                    "tick_gc_max_ms": max((g for g, _ in gcs), default=0.0) * 1e3,
                    "tick_cpu_nogc_p99_ms": pct(cpu_nogc, 0.99) * 1e3,
                    # The longest single collection of each generation in the window, in a tick step or not (CPU ms).
                    "server_gc_max_ms": [x * 1e3 for x in g1[2:5]],
                    "ticks_per_s": len(durations) / wall,
                    **traffic_figures(parts, wall),
                    **window_figures(s1 - s0, c0, c1, wall),
                }
            )
            print(
                f"  arena: tick p99 {runs[-1]['tick_p99_ms']:.2f} ms (CPU p50 {runs[-1]['tick_cpu_p50_ms']:.2f}, "
                f"p99 {runs[-1]['tick_cpu_p99_ms']:.2f} ms; {runs[-1]['tick_gc_full']} full GCs in steps, "
                f"longest GC {runs[-1]['tick_gc_max_ms']:.2f} ms; window's longest gen0/1/2 "
                f"{'/'.join(f'{x:.2f}' for x in runs[-1]['server_gc_max_ms'])} ms), server {runs[-1]['server_cpu_pct']:.1f}%, "
                f"{runs[-1]['bytes_per_client_s'] / 1000:.1f} kB/client/s, clients {[round(x) for x in runs[-1]['client_cpu_pct']]}%",
                flush=True,
            )
        for p in procs:
            p.join(30)
    finally:
        server.stop()
    return {
        "players": players,
        "tick_rate": 20,
        "input_hz": input_hz,
        "runs": runs,
        **{
            k: summary([r[k] for r in runs])
            for k in (
                "tick_p99_ms",
                "tick_cpu_p50_ms",
                "tick_cpu_p99_ms",
                "tick_cpu_nogc_p99_ms",
                "tick_gc_max_ms",
                "server_cpu_pct",
                "bytes_per_client_s",
                "ticks_per_s",
            )
        },
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
    }


# --- Colyseus (``--colyseus``) -------------------------------------------------------------

COLYSEUS_SRC = HERE / "colyseus"


def colyseus_dir() -> Path:
    """The Colyseus peer's directory, its npm packages installed (``npm ci``) on first use.

    The packages go into a cache directory keyed by the lock file's hash
    (``$XDG_CACHE_HOME/rtcore-colyseus/<hash>``, ``~/.cache`` by default), never
    into the repository; the server and load scripts are copied next to them
    on every run (Node resolves packages from the script's own directory).
    """
    lock = (COLYSEUS_SRC / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = cache / "rtcore-colyseus" / hashlib.sha256(lock).hexdigest()[:16]
    marker = d / "node_modules" / ".rtcore-installed"
    if not marker.exists():
        d.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json", ".npmrc"):
            shutil.copyfile(COLYSEUS_SRC / name, d / name)
        print(f"  npm ci in {d}", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=d, check=True, stdout=subprocess.DEVNULL)
        marker.write_text("")
    for name in ("server.mjs", "load.mjs"):
        shutil.copyfile(COLYSEUS_SRC / name, d / name)
    return d


def colyseus_versions(d: Path) -> dict[str, str]:
    out = {"node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()}
    for pkg in ("colyseus", "@colyseus/core", "@colyseus/ws-transport", "@colyseus/schema", "@colyseus/sdk"):
        out[pkg] = json.loads((d / "node_modules" / pkg / "package.json").read_text())["version"]
    return out


class ColyseusServer:
    """``node server.mjs``: the Colyseus peer in a child process (``READY <port> <bench port>``)."""

    def __init__(self, d: Path) -> None:
        log = os.environ.get("ROOMS_BENCH_SERVER_LOG")
        self.proc = subprocess.Popen(
            ["node", "server.mjs"],
            cwd=d,
            stdout=subprocess.PIPE,
            stderr=open(log, "ab") if log else subprocess.DEVNULL,  # noqa: SIM115 (the child keeps it)
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"colyseus server did not start: {line!r}")
        port, bench = (int(x) for x in line.split()[1:3])
        self.url = f"ws://127.0.0.1:{port}"
        self.bench = f"http://127.0.0.1:{bench}"
        self.pid = self.proc.pid

    def get(self, path: str, method: str = "GET") -> Any:
        """The server's side HTTP routes (``/ticks``, ``/create/NAME``)."""
        import urllib.request

        req = urllib.request.Request(self.bench + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop_process(self.proc)


class NodeWorker:
    """``node load.mjs ARGS``: one Colyseus load-client process, steered by lines on stdin."""

    def __init__(self, d: Path, args: dict[str, Any]) -> None:
        log = os.environ.get("ROOMS_BENCH_SERVER_LOG")
        self.proc = subprocess.Popen(
            ["node", "load.mjs", json.dumps(args)],
            cwd=d,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "ab") if log else subprocess.DEVNULL,  # noqa: SIM115
            text=True,
        )
        self.pid = self.proc.pid

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"colyseus load worker {self.pid} exited ({self.proc.wait()})")
        got = json.loads(line)
        if got.get("ev") == "file":  # a big message (latency samples) comes through a file (load.mjs's say)
            path = Path(got["path"])
            got = json.loads(path.read_text())
            path.unlink()
        if got.get("ev") == "error":
            raise RuntimeError(f"colyseus load worker {self.pid}: {got['error']}")
        return dict(got)

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):  # the worker may be gone already
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_moves_colyseus(d: Path, rooms: int, reps: int, seconds: float, workers: int) -> dict[str, Any]:
    """Workload 1 against Colyseus: the same windows, CPU and latency definitions as :func:`run_moves`."""
    server = ColyseusServer(d)
    procs: list[NodeWorker] = []
    try:
        for w in range(workers):
            share = rooms // workers + (1 if w < rooms % workers else 0)
            procs.append(NodeWorker(d, {"mode": "moves", "url": server.url, "rooms": share, "reps": reps, "seconds": seconds}))
        for p in procs:
            p.read()  # ready: every room set up, first turn known
        pids = [p.pid for p in procs]
        i0, t0 = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(IDLE_WINDOW)
        idle_pct = (cpu_seconds(server.pid) - i0) / (time.perf_counter() - t0) * 100
        runs = []
        for _ in range(reps):
            for p in procs:
                p.say("go")
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            time.sleep(seconds)
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            parts = [p.read() for p in procs]
            wall = l1 - l0
            runs.append(
                {
                    **move_figures(parts, seconds, s1 - s0),
                    **window_figures(s1 - s0, c0, c1, wall),
                    "errors": sum(part["errors"] for part in parts),
                    # The rooms' own move counters (all moves so far, read by the clients after the window).
                    "state_moves_total": sum(part["state_moves_total"] for part in parts),
                }
            )
            r = runs[-1]
            print(
                f"  colyseus moves {rooms} rooms: {r['moves_per_s']:,.0f}/s p99 {r['p99_ms']:.1f} ms, "
                f"{r['server_cpu_us_per_move']:.0f} us/move, server {r['server_cpu_pct']:.0f}% "
                f"clients {[round(x) for x in r['client_cpu_pct']]}%, {r['errors']} errors",
                flush=True,
            )
    finally:
        for p in procs:
            p.close()
        server.stop()
    return {
        "backend": "memory",
        "rooms": rooms,
        "runs": runs,
        **{k: summary([r[k] for r in runs]) for k in ("moves_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_move", "server_cpu_pct")},
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
        "idle_server_cpu_pct": idle_pct,
    }


def run_joins_colyseus(d: Path, players: int, reps: int, workers: int, inflight: int) -> dict[str, Any]:
    """Workload 2 against Colyseus (``joinOrCreate("duel")`` + first state), as :func:`run_joins`."""
    runs = []
    for _ in range(reps):
        server = ColyseusServer(d)
        procs: list[NodeWorker] = []
        try:
            warm = NodeWorker(d, {"mode": "joins", "url": server.url, "players": 2, "inflight": 2})
            warm.read()
            warm.say("go")
            warm.read()
            warm.say("release")
            warm.close()
            time.sleep(0.5)
            rss0 = rss_bytes(server.pid)
            for w in range(workers):
                share = players // workers + (1 if w < players % workers else 0)
                procs.append(NodeWorker(d, {"mode": "joins", "url": server.url, "players": share, "inflight": inflight // workers}))
            for p in procs:
                p.read()
            pids = [p.pid for p in procs]
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            for p in procs:
                p.say("go")
            parts = [p.read() for p in procs]
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            time.sleep(0.5)
            rss1 = rss_bytes(server.pid)
            for p in procs:
                p.say("release")
            joined = sum(p["joined"] for p in parts)
            seconds = max(p["seconds"] for p in parts)
            runs.append(
                {
                    "joins_per_s": joined / seconds,
                    "joined": joined,
                    "failed": sum(p["failed"] for p in parts),
                    "rss_before_mb": rss0 / 2**20,
                    "rss_after_mb": rss1 / 2**20,
                    "rss_kb_per_player": (rss1 - rss0) / max(joined, 1) / 1024,
                    "server_cpu_us_per_join": (s1 - s0) / max(joined, 1) * 1e6,
                    "client_cpu_pct": [(b - a) / (l1 - l0) * 100 for a, b in zip(c0, c1, strict=True)],
                    "load": loadavg(),
                }
            )
            r = runs[-1]
            print(
                f"  colyseus joins: {r['joins_per_s']:,.0f}/s, {r['rss_kb_per_player']:.1f} kB/player, "
                f"{r['joined']} joined {r['failed']} failed, clients {[round(x) for x in r['client_cpu_pct']]}%",
                flush=True,
            )
        finally:
            for p in procs:
                p.close()
            server.stop()
    return {
        "players": players,
        "rooms": players // 2,
        "runs": runs,
        **{k: summary([r[k] for r in runs]) for k in ("joins_per_s", "rss_kb_per_player", "server_cpu_us_per_join")},
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
    }


def run_arena_colyseus(d: Path, players: int, input_hz: float, reps: int, seconds: float, workers: int) -> dict[str, Any]:
    """Workload 3 against Colyseus, as :func:`run_arena`.

    A tick here is the 20 Hz simulation callback plus the 50 ms patch
    broadcast that follows it (both timed inside the server: ``/ticks``
    gives the two lists, paired in order; Node fires the two 50 ms intervals
    back to back in one timer pass), i.e. what rtcore's tick step does
    (``on_tick`` + diff + patch).
    """
    server = ColyseusServer(d)
    procs: list[NodeWorker] = []
    try:
        room_id = server.get("/create/arena", "POST")["roomId"]
        for w in range(workers):
            names = [f"a{w}-{i}" for i in range(w, players, workers)]
            procs.append(
                NodeWorker(
                    d,
                    {"mode": "arena", "url": server.url, "roomId": room_id, "names": names, "inputHz": input_hz, "seconds": seconds, "reps": reps},
                )
            )
        for p in procs:
            p.read()
        pids = [p.pid for p in procs]
        runs = []
        for _ in range(reps):
            server.get("/ticks")  # drop the ticks of the idle time before
            s0, c0, l0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            for p in procs:
                p.say("go")
            parts = [p.read() for p in procs]
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            got = server.get("/ticks")
            steps, patches = got["step"], got["patch"]
            n = min(len(steps), len(patches))
            durations = [steps[i][0] + patches[i][0] for i in range(n)]
            cpu_durations = [steps[i][1] + patches[i][1] for i in range(n)]
            wall = l1 - l0
            runs.append(
                {
                    **tick_figures(durations, cpu_durations),
                    "step_p99_ms": pct([x[0] for x in steps], 0.99) * 1e3,
                    "patch_p99_ms": pct([x[0] for x in patches], 0.99) * 1e3,
                    "ticks": len(steps),
                    "patches": len(patches),
                    "ticks_per_s": len(steps) / wall,
                    **traffic_figures(parts, wall),
                    **window_figures(s1 - s0, c0, c1, wall),
                }
            )
            r = runs[-1]
            print(
                f"  colyseus arena: tick p99 {r['tick_p99_ms']:.2f} ms (step p99 {r['step_p99_ms']:.2f}, patch p99 "
                f"{r['patch_p99_ms']:.2f}; CPU p50 {r['tick_cpu_p50_ms']:.2f}, p99 {r['tick_cpu_p99_ms']:.2f} ms), "
                f"server {r['server_cpu_pct']:.1f}%, {r['bytes_per_client_s'] / 1000:.1f} kB/client/s, "
                f"{r['frames_per_client_s']:.1f} frames/client/s, clients {[round(x) for x in r['client_cpu_pct']]}%",
                flush=True,
            )
    finally:
        for p in procs:
            p.close()
        server.stop()
    return {
        "players": players,
        "tick_rate": 20,
        "input_hz": input_hz,
        "runs": runs,
        **{
            k: summary([r[k] for r in runs])
            for k in ("tick_p99_ms", "tick_cpu_p50_ms", "tick_cpu_p99_ms", "server_cpu_pct", "bytes_per_client_s", "ticks_per_s")
        },
        "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"]),
    }


def seats_sanity(d: Path, joiners: int = 50) -> dict[str, Any]:
    """``joiners`` concurrent joins of one 2-seat room, on each server: how many get a seat.

    Colyseus: a ``duel`` room the matchmaker creates empty, then ``joiners``
    concurrent ``joinById``. rtcore: a private ``duel`` room whose creator
    holds one seat, then ``joiners - 1`` concurrent ``room.join`` on their own
    connections. Both should end with exactly 2 seated.
    """
    out: dict[str, Any] = {"joiners": joiners}
    server = ColyseusServer(d)
    try:
        room_id = server.get("/create/duel", "POST")["roomId"]
        w = NodeWorker(d, {"mode": "seats", "url": server.url, "roomId": room_id, "joiners": joiners})
        got = w.read()
        w.close()
        out["colyseus"] = {"seated": got["seated"], "refused": got["refused"]}
    finally:
        server.stop()
    rt = ServerProcess("memory://")
    try:

        async def seats() -> dict[str, Any]:
            host = await Conn.open(rt.url, "seathost")
            joined = await host.cmd("room.create", {"type": "duel", "private": True})
            conns = await asyncio.gather(*(Conn.open(rt.url, f"seat{i}") for i in range(joiners - 1)))

            async def join(c: Conn) -> str:
                try:
                    await c.cmd("room.join", {"room_id": joined["room_id"]})
                    return "ok"
                except RuntimeError as e:
                    return str(e).rpartition("'code': '")[2].partition("'")[0] or "error"

            results = await asyncio.gather(*(join(c) for c in conns))
            await asyncio.gather(*(c.ws.close() for c in [host, *conns]), return_exceptions=True)
            refused: dict[str, int] = {}
            for r in results:
                if r != "ok":
                    refused[r] = refused.get(r, 0) + 1
            return {"seated": 1 + results.count("ok"), "refused": refused}

        out["rtcore"] = asyncio.run(seats())
    finally:
        rt.stop()
    print(f"  seats: {joiners} concurrent joiners on one 2-seat room: rtcore {out['rtcore']}, colyseus {out['colyseus']}", flush=True)
    return out


def merge_reps(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One result from single-repetition results (``--colyseus`` runs each repetition apart)."""
    out = dict(parts[0])
    out["runs"] = [r for p in parts for r in p["runs"]]
    for k in keys:
        if all(k in r for r in out["runs"]):
            out[k] = summary([r[k] for r in out["runs"]])
    out["client_cpu_pct_max"] = max(p["client_cpu_pct_max"] for p in parts)
    if "idle_server_cpu_pct" in out:
        idle = [p["idle_server_cpu_pct"] for p in parts]
        out["idle_server_cpu_pct"], out["idle_server_cpu_pct_reps"] = statistics.median(idle), idle
    for k in ("gc_forced_full_ms", "gc_objects", "gc_frozen"):
        if k in out:
            out[k] = statistics.median(p[k] for p in parts)
    return out


MOVES_KEYS = ("moves_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_move", "server_gc_us_per_move", "server_cpu_pct")
JOINS_KEYS = ("joins_per_s", "rss_kb_per_player", "server_cpu_us_per_join")
ARENA_KEYS = (
    "tick_p99_ms",
    "tick_cpu_p50_ms",
    "tick_cpu_p99_ms",
    "tick_cpu_nogc_p99_ms",
    "tick_gc_max_ms",
    "server_cpu_pct",
    "bytes_per_client_s",
    "ticks_per_s",
)


# --- the README table -------------------------------------------------------------------------


def _fmt(s: dict[str, Any], digits: int = 0, scale: float = 1.0) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)})"


def _ratio(this: dict[str, Any] | None, other: dict[str, Any] | None, key: str) -> str:
    """rtcore / Colyseus of ``key``, per repetition pair (the i-th of each): median (min-max)."""
    if not this or not other:
        return "—"
    pairs = [(a[key], b[key]) for a, b in zip(this["runs"], other["runs"], strict=False) if key in a and key in b and b[key]]
    if not pairs:
        return "—"
    return _fmt(summary([a / b for a, b in pairs]), 2)


def table(report: dict[str, Any], source: str) -> str:
    """The rooms section of the README, generated from one results file.

    With a ``colyseus`` section (``--colyseus``), the Colyseus column holds
    the figures measured in the same run and a ratio column (rtcore /
    Colyseus per repetition pair) follows; without it, the column quotes the
    issue's figures as before.
    """
    m = report["machine"]
    peer = report.get("peer", {}).get("results")
    cy = report.get("colyseus")
    flags = (" --quick" if report["quick"] else "") + (" --peer SRC" if peer else "") + (" --colyseus" if cy else "")
    intro = (
        f"{report['date']}, {m['cpus']} vCPU, {m['platform']}, Python {m['python']}, "
        f"`python benchmarks/rooms.py{flags}`, "
        f"{report['settings']['workers']} load-client processes; load average at start "
        f"{', '.join(f'{x:.2f}' for x in report['load_start'])}, at end {', '.join(f'{x:.2f}' for x in report['load_end'])} "
        "(the machine is shared with other jobs). Median (min-max) of "
        f"{report['settings']['reps']} repetitions; every repetition is in `{source}`."
        + (
            " **before** = the same workloads in the same run with rtcore imported from the peer tree "
            f"(`{Path(report['peer']['src']).parent.name}`, the code before this work), each workload run "
            "for both, alternating which goes first."
            if peer
            else ""
        )
    )
    if cy:
        v = cy["versions"]
        intro += (
            f" **Colyseus** = colyseus {v['colyseus']} (@colyseus/core {v['@colyseus/core']}, ws-transport "
            f"{v['@colyseus/ws-transport']}, schema {v['@colyseus/schema']}) on Node {v['node'].lstrip('v')}, driven by "
            f"@colyseus/sdk {v['@colyseus/sdk']} load clients, measured in the same run: each repetition runs "
            "rtcore and Colyseus back to back on fresh servers, alternating which goes first. **rtcore / Colyseus** = "
            "the ratio of the two figures per repetition pair, median (min-max): above 1 means rtcore's figure is "
            "the larger (better for moves/s and joins/s, worse for latency, CPU and memory). Colyseus keeps room "
            "state in memory only, so its figures sit next to `memory://`; `—` = not measured there."
        )
    lines = [
        BEGIN,
        f"<!-- generated by `python benchmarks/rooms.py` from {source}; do not edit by hand -->",
        "",
        intro,
        "",
        "| workload | figure | rtcore | "
        + ("before | " if peer else "")
        + "goal | "
        + ("Colyseus 0.18.8 (measured) | rtcore / Colyseus |" if cy else "Colyseus 0.18.8 |"),
        "|---|---|---:|" + ("---:|" if peer else "") + "---:|---:|" + ("---:|" if cy else ""),
    ]

    def row(w: str, figure: str, this: str, before: str, goal: str, colyseus: str, measured: tuple[str, str] | None = None) -> None:
        # ``colyseus`` is the quoted figure; ``measured`` the (Colyseus cell, ratio cell) of a --colyseus run.
        if not cy:
            tail = f"{colyseus} |"
        elif measured is None:
            tail = "— | — |"
        else:
            tail = f"{measured[0]} | {measured[1]} |"
        lines.append(f"| {w} | {figure} | {this} | " + (f"{before} | " if peer else "") + f"{goal} | {tail}")

    def pget(kind: str, i: int | None = None) -> Any:
        if not peer:
            return None
        got = peer.get(kind)
        return got[i] if i is not None and got else got

    def cget_moves(r: dict[str, Any]) -> dict[str, Any] | None:
        if not cy or r["backend"] != "memory":
            return None
        return next((c for c in cy.get("moves", []) if c["rooms"] == r["rooms"]), None)

    def measured(this: dict[str, Any] | None, other: dict[str, Any] | None, key: str, digits: int = 0, scale: float = 1.0) -> tuple[str, str] | None:
        if not cy:
            return None
        if not other or key not in other:
            return ("—", "—")
        return (_fmt(other[key], digits, scale), _ratio(this, other, key))

    for i, r in enumerate(report["moves"]):
        p = pget("moves", i)
        c = cget_moves(r)
        w = f"moves, {r['rooms']:,} rooms, `{r['backend']}://`"
        row(w, "moves/s", _fmt(r["moves_per_s"]), p and _fmt(p["moves_per_s"]), "reported", "7,400-7,750", measured(r, c, "moves_per_s"))
        lat = None
        if cy:
            lat = (
                (f"{_fmt(c['p50_ms'], 1)} / {_fmt(c['p99_ms'], 1)}", f"{_ratio(r, c, 'p50_ms')} / {_ratio(r, c, 'p99_ms')}")
                if c
                else ("—", "—")
            )
        row(
            w,
            "move → patch p50 / p99 ms",
            f"{_fmt(r['p50_ms'], 1)} / {_fmt(r['p99_ms'], 1)}",
            p and f"{_fmt(p['p50_ms'], 1)} / {_fmt(p['p99_ms'], 1)}",
            "reported",
            "—",
            lat,
        )
        row(
            w,
            "server CPU µs per move",
            _fmt(r["server_cpu_us_per_move"]),
            p and _fmt(p["server_cpu_us_per_move"]),
            "≤ 130",
            "125-140",
            measured(r, c, "server_cpu_us_per_move"),
        )
        if "server_gc_us_per_move" in r:
            row(
                w,
                "of which the cyclic GC, µs per move",
                _fmt(r["server_gc_us_per_move"]),
                _fmt(p["server_gc_us_per_move"]) if p and "server_gc_us_per_move" in p else "—",
                "—",
                "—",
            )
        row(w, "server CPU % of a core", _fmt(r["server_cpu_pct"]), p and _fmt(p["server_cpu_pct"]), "—", "~100", measured(r, c, "server_cpu_pct"))
        if "idle_server_cpu_pct" in r:
            row(
                w,
                "server CPU % of a core, idle (nobody moving)",
                f"{r['idle_server_cpu_pct']:.0f}",
                p and f"{p['idle_server_cpu_pct']:.0f}",
                "—",
                "—",
                (f"{c['idle_server_cpu_pct']:.0f}", "—") if c else None,
            )
    j, pj = report["joins"], pget("joins")
    cj = cy.get("joins") if cy else None
    w = f"{j['players']:,} players in {j['rooms']:,} rooms"
    row(
        w,
        "server RSS kB per seated player",
        _fmt(j["rss_kb_per_player"], 1),
        pj and _fmt(pj["rss_kb_per_player"], 1),
        "≤ 20",
        "41-44",
        measured(j, cj, "rss_kb_per_player", 1),
    )
    row(
        w,
        "joins/s (matchmaking + seat + first patch)",
        _fmt(j["joins_per_s"]),
        pj and _fmt(pj["joins_per_s"]),
        "≥ 230",
        "~230",
        measured(j, cj, "joins_per_s"),
    )
    row(
        w,
        "server CPU µs per join",
        _fmt(j["server_cpu_us_per_join"]),
        pj and _fmt(pj["server_cpu_us_per_join"]),
        "—",
        "—",
        measured(j, cj, "server_cpu_us_per_join"),
    )
    a, pa = report["arena"], pget("arena")
    ca = cy.get("arena") if cy else None
    w = f"1 room, 20 Hz, {a['players']} players x {a['input_hz']:g} inputs/s"
    row(w, "tick p99 ms (server-side)", _fmt(a["tick_p99_ms"], 2), pa and _fmt(pa["tick_p99_ms"], 2), "≤ 1", "0.6-0.9", measured(a, ca, "tick_p99_ms", 2))
    if "tick_cpu_nogc_p99_ms" in a:

        def step(x: dict[str, Any]) -> str:
            return f"{_fmt(x['tick_cpu_p50_ms'], 2)} / {_fmt(x['tick_cpu_p99_ms'], 2)} / {_fmt(x['tick_cpu_nogc_p99_ms'], 2)}"

        row(
            w,
            "tick step CPU ms: p50 / p99 / p99 less the GC inside the step",
            step(a),
            step(pa) if pa and "tick_cpu_nogc_p99_ms" in pa else "—",
            "—",
            "—",
            (
                f"{_fmt(ca['tick_cpu_p50_ms'], 2)} / {_fmt(ca['tick_cpu_p99_ms'], 2)} / —",
                f"{_ratio(a, ca, 'tick_cpu_p50_ms')} / {_ratio(a, ca, 'tick_cpu_p99_ms')} / —",
            )
            if ca
            else None,
        )
        row(w, "longest GC inside a tick step ms", _fmt(a["tick_gc_max_ms"], 2), _fmt(pa["tick_gc_max_ms"], 2) if pa and "tick_gc_max_ms" in pa else "—", "—", "—")
    row(w, "server CPU % of a core", _fmt(a["server_cpu_pct"], 1), pa and _fmt(pa["server_cpu_pct"], 1), "≤ 20", "18.5", measured(a, ca, "server_cpu_pct", 1))
    row(
        w,
        "state kB per client per second",
        _fmt(a["bytes_per_client_s"], 1, 1e-3),
        pa and _fmt(pa["bytes_per_client_s"], 1, 1e-3),
        "≤ 33",
        "33",
        measured(a, ca, "bytes_per_client_s", 1, 1e-3),
    )
    row(w, "ticks/s observed", _fmt(a["ticks_per_s"], 1), pa and _fmt(pa["ticks_per_s"], 1), "20", "20", measured(a, ca, "ticks_per_s", 1))

    def clients(rep: dict[str, Any]) -> str:
        return ", ".join(
            [f"moves {r['rooms']:,} rooms `{r['backend']}://` {r['client_cpu_pct_max']:.0f} %" for r in rep.get("moves", [])]
            + ([f"joins {rep['joins']['client_cpu_pct_max']:.0f} %"] if "joins" in rep else [])
            + ([f"arena {rep['arena']['client_cpu_pct_max']:.0f} %"] if "arena" in rep else [])
        )

    lines += [
        "",
        "Load client CPU (highest of any client process in any repetition, % of a core): "
        + clients(report)
        + (f"; before: {clients(peer)}" if peer else "")
        + (f"; Colyseus (Node SDK clients): {clients(cy)}" if cy else "")
        + ".",
    ]
    if cy and "seats" in cy:
        st = cy["seats"]

        def refused(x: dict[str, Any]) -> str:
            # Colyseus names the room id in its refusal; the id says nothing here.
            reasons = {re.sub(r'room "[^"]*"', "room", k): n for k, n in x["refused"].items()}
            return ", ".join(f"{n} `{k}`" for k, n in reasons.items()) or "none"

        lines += [
            "",
            f"Seat check ({st['joiners']} concurrent joiners on one 2-seat `duel` room): rtcore seated "
            f"{st['rtcore']['seated']} (refused: {refused(st['rtcore'])}), Colyseus seated {st['colyseus']['seated']} "
            f"(refused: {refused(st['colyseus'])}).",
        ]
    if cy and cy.get("moves"):
        errs = sum(r["errors"] for c in cy["moves"] for r in c["runs"])
        lines += ["", f"Colyseus moves: {errs} out-of-turn rejections over every window (each mover waits for its turn)."]
    lines.append(END)
    return "\n".join(lines)


def _fresh_results_path(quick: bool) -> Path:
    """``results/rooms-DATE[-quick].json``, or ``-2``, ``-3``... after it when taken: a run never overwrites another."""
    stem = f"rooms-{time.strftime('%Y-%m-%d', time.gmtime())}{'-quick' if quick else ''}"
    path, n = HERE / "results" / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = HERE / "results" / f"{stem}-{n}.json"
    return path


def write_table(path: Path) -> None:
    report = json.loads(path.read_text())
    text = README.read_text()
    block = table(report, f"benchmarks/results/{path.name}")
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


PBEGIN, PEND = "<!-- rooms-profile:begin -->", "<!-- rooms-profile:end -->"


def write_profile_table(before: Path, after: Path) -> None:
    """The README's py-spy section: top entries of each workload's server, before and after."""
    reports = [(p, json.loads(p.read_text())) for p in (before, after)]
    lines = [
        PBEGIN,
        f"<!-- generated by `python benchmarks/rooms.py --profile-table {before.as_posix()} {after.as_posix()}`; do not edit by hand -->",
        "",
    ]
    for label in reports[0][1]["profiles"]:
        lines += [f"**{label}** (% of the server's py-spy samples)", ""]
        lines += ["| | before: own time | after: own time | before: inclusive (rtcore) | after: inclusive (rtcore) |"]
        lines += ["|---|---|---|---|---|"]
        cols = []
        for _, rep in reports:
            prof = rep.get("profiles", {}).get(label, {"own": [], "inclusive": []})
            cols.append(prof["own"])
            cols.append(prof["inclusive"])
        order = [cols[0], cols[2], cols[1], cols[3]]
        for i in range(max(len(c) for c in order)):
            cells = [f"{c[i][1]:.1f} `{c[i][0]}`" if i < len(c) else "" for c in order]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    for p, rep in reports:
        lines.append(
            f"`{p.name}`: {rep['date']}, `python benchmarks/rooms.py{' --quick' if rep['quick'] else ''} --profile ...`, "
            f"load average at start {', '.join(f'{x:.2f}' for x in rep['load_start'])}."
        )
    lines.append(PEND)
    block = "\n".join(lines)
    text = README.read_text()
    if PBEGIN in text:
        head, _, rest = text.partition(PBEGIN)
        _, _, tail = rest.partition(PEND)
        text = head + block + tail
    else:
        text = text.replace(END, END + "\n\n" + block, 1)
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (< 2 minutes): 3 s windows, 200 rooms, 1,000 joiners"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="load-client processes")
    parser.add_argument("--input-hz", type=float, default=2.0, help="inputs per second per arena player")
    parser.add_argument("--serve", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, help="only regenerate the README table from this results file")
    parser.add_argument(
        "--peer",
        type=Path,
        metavar="SRC",
        help="also run every workload with rtcore imported from SRC (e.g. a checkout's src/), alternating which goes first",
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="sample each workload's server with py-spy (figures distorted by the sampling); "
        "writes results/rooms-profile-NAME.json instead of the README figures",
    )
    parser.add_argument(
        "--profile-table",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="regenerate the README's py-spy section from two --profile results files",
    )
    parser.add_argument(
        "--gc-threshold",
        metavar="G0,G1,G2",
        help="an experiment: the benchmark's server calls gc.set_threshold(G0, G1, G2) before serving "
        "(both trees with --peer; Python's default is 700,10,10)",
    )
    parser.add_argument(
        "--tracemalloc",
        metavar="PREFIX",
        help="joins: trace the server's allocations (25 frames, or ROOMS_BENCH_TRACEMALLOC; slows it, RSS figures include the tracing) and dump "
        "snapshots before and after the joins to PREFIX-<this|peer><rep>-<1|2>; compare them with "
        "benchmarks/ab/memdiff.py BEFORE AFTER --conns 2000",
    )
    parser.add_argument(
        "--colyseus",
        action="store_true",
        help="also measure Colyseus 0.18.8 (benchmarks/colyseus/, npm ci into ~/.cache/rtcore-colyseus on first use): "
        "every repetition of moves (memory://), joins and arena runs rtcore and Colyseus back to back, alternating which goes first",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the results JSON here (default: results/rooms-DATE.json, numbered when taken; with --only: print instead)",
    )
    parser.add_argument(
        "--only",
        choices=["moves", "joins", "arena"],
        action="append",
        help="run only these workloads (no files written unless --out)",
    )
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve)
        return
    if opts.colyseus and (opts.peer or opts.profile):
        parser.error("--colyseus does not combine with --peer or --profile")
    if opts.table:
        write_table(opts.table)
        return
    if opts.profile_table:
        write_profile_table(*opts.profile_table)
        return
    PROFILE["on"] = bool(opts.profile)
    if opts.tracemalloc:
        TRACE["prefix"] = str(Path(opts.tracemalloc).resolve())
        os.environ.setdefault("ROOMS_BENCH_TRACEMALLOC", "25")  # frames; inherited by every server process
    if opts.gc_threshold:
        os.environ["ROOMS_BENCH_GC_THRESHOLD"] = opts.gc_threshold  # inherited by every server process
    reps = max(3, opts.reps)
    players = 1000 if opts.quick else 2000
    window = 3.0 if opts.quick else 6.0
    only = set(opts.only or ["moves", "joins", "arena"])
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": opts.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
        },
        "settings": {
            "reps": reps,
            "window_s": window,
            "workers": opts.workers,
            "input_hz": opts.input_hz,
            "joins_inflight": 64,
            "gc_threshold": opts.gc_threshold,
        },
        "load_start": loadavg(),
        "moves": [],
    }
    started = time.perf_counter()
    peer: dict[str, Any] = {"moves": []}
    partial = opts.out if opts.out and not opts.only else _fresh_results_path(opts.quick)

    def save() -> None:
        """Keep what was measured so far (a long run that dies still leaves its figures)."""
        if not opts.profile and not opts.only:
            partial.write_text(json.dumps(report, indent=1) + "\n")
    if opts.peer:
        PEER["src"] = str(opts.peer.resolve())
        report["peer"] = {"src": PEER["src"], "results": peer}
    turn = [0]

    def both(run: Any, *args: Any) -> tuple[Any, Any]:
        """Run a workload for this tree and (with --peer) the peer, alternating which goes first."""
        if not PEER["src"]:
            return run(*[a("this") if callable(a) else a for a in args]), None
        order = ["this", "peer"] if turn[0] % 2 == 0 else ["peer", "this"]
        turn[0] += 1
        got: dict[str, Any] = {}
        for who in order:
            PEER["running"] = PEER["src"] if who == "peer" else None
            print(f" [{who}]", flush=True)
            got[who] = run(*[a(who) if callable(a) else a for a in args])
        PEER["running"] = None
        return got["this"], got["peer"]

    cy: dict[str, Any] | None = None
    cy_dir: Path | None = None
    if opts.colyseus:
        cy_dir = colyseus_dir()
        cy = {"versions": colyseus_versions(cy_dir), "moves": []}
        report["colyseus"] = cy
        print(f"colyseus: {cy['versions']}", flush=True)
        cy["seats"] = seats_sanity(cy_dir)

    def paired(keys: tuple[str, ...], rt_run: Any, rt_args: tuple[Any, ...], cy_run: Any, cy_args: tuple[Any, ...]) -> tuple[Any, Any]:
        """``--colyseus``: each repetition runs rtcore and Colyseus back to back (fresh servers), alternating which goes first."""
        rt_parts, cy_parts = [], []
        for _ in range(reps):
            order = ["rtcore", "colyseus"] if turn[0] % 2 == 0 else ["colyseus", "rtcore"]
            turn[0] += 1
            for who in order:
                print(f" [{who}]", flush=True)
                if who == "rtcore":
                    rt_parts.append(rt_run(*rt_args))
                else:
                    cy_parts.append(cy_run(cy_dir, *cy_args))
        return merge_reps(rt_parts, keys), merge_reps(cy_parts, keys)

    with tempfile.TemporaryDirectory() as tmp:
        if "moves" in only:
            for backend in ("memory://", "sqlite"):
                for rooms in (200,) if opts.quick else (200, 1000):

                    def url(who: str, backend: str = backend, rooms: int = rooms) -> str:
                        return backend if backend != "sqlite" else f"sqlite:///{tmp}/rooms-{rooms}-{who}.db"

                    if cy is not None and backend == "memory://":
                        # Colyseus keeps room state in memory only: compared with rtcore's memory:// backend.
                        mine, theirs = paired(
                            MOVES_KEYS, run_moves, (backend, rooms, 1, window, opts.workers), run_moves_colyseus, (rooms, 1, window, opts.workers)
                        )
                        cy["moves"].append(theirs)
                        report["moves"].append(mine)
                        save()
                        continue
                    mine, theirs = both(run_moves, url, rooms, reps, window, opts.workers)
                    report["moves"].append(mine)
                    if theirs:
                        peer["moves"].append(theirs)
                    save()
    if "joins" in only:
        if cy is not None:
            report["joins"], cy["joins"] = paired(JOINS_KEYS, run_joins, (players, 1, opts.workers, 64), run_joins_colyseus, (players, 1, opts.workers, 64))
        else:
            report["joins"], peer["joins"] = both(run_joins, players, reps, opts.workers, 64)
        save()
    if "arena" in only:
        if cy is not None:
            report["arena"], cy["arena"] = paired(
                ARENA_KEYS, run_arena, (100, opts.input_hz, 1, window, opts.workers), run_arena_colyseus, (100, opts.input_hz, 1, window, opts.workers)
            )
        else:
            report["arena"], peer["arena"] = both(run_arena, 100, opts.input_hz, reps, window, opts.workers)
    report["load_end"] = loadavg()
    report["elapsed_s"] = time.perf_counter() - started
    print(f"done in {report['elapsed_s']:.0f} s")
    if opts.profile:
        report["profiles"] = PROFILES
        out = HERE / "results" / f"rooms-profile-{opts.profile}.json"
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written to {out}")
        return
    if opts.only:
        if opts.out:
            opts.out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"written to {opts.out}")
        else:
            print(json.dumps(report, indent=1)[:4000])
        return
    out = partial
    out.write_text(json.dumps(report, indent=1) + "\n")
    if opts.quick:  # a smoke run does not replace the README's figures
        print(table(report, f"benchmarks/results/{out.name}"))
        print(f"written to {out}")
        return
    write_table(out)
    print(f"written to {out} and the rooms table of {README}")


if __name__ == "__main__":
    main()

"""Benchmark the arena example: 100 players in one 20 Hz room on one server process.

One command::

    python benchmarks/arena.py [--quick] [--reps 3] [--players 100] [--input-hz 4]

**Server**: ``examples/arena/app.py`` as shipped, in its own process
(``arena.py --serve``: :class:`rtcore.server.runner.Server` on ``memory://``,
the command rate limit raised as in ``rooms.py``). rtcore exposes no timing
hooks, so this benchmark's server (only) wraps two things:

* the room executor's tick step (``_Actor._step`` for ``on_tick``: the hook,
  the diff of the state and the patch append) → **tick duration**;
* the ``room.send`` command handler, to note when each input arrived, and
  the tick step again: when a tick's patch is appended, every input whose
  first step that tick applied gets **input → visible (server)** = patch
  appended - command received. It covers the command dispatch, the inbox
  append, the wait in the player's step queue and for the next tick, and the
  tick itself (not the fan-out to sockets).

**Load**: ``--players`` players (default 100) split over ``--workers``
processes (default 2), each a raw WebSocket client (``websockets`` +
msgspec, no rtcore client code, as in ``rooms.py``). A player makes one
step every 50 ms (it changes direction about once a second) and sends its
steps in batches, ``--input-hz`` batches a second (default 4: 5 steps each).
It reads only its own ``seq`` from the patches. **Bytes per client per
second** = bytes of the room stream's ``evt``/``sync``/``snap`` frames a
client received (command replies excluded) / window, averaged over the
clients. Client side, each player also records batch sent → its last step
visible in a patch it received.

Every figure is measured ``--reps`` times (at least 3); the results file
(``benchmarks/results/arena-<date>.json``) keeps every repetition with the
load average, the server's CPU and each load process's CPU; the table in
``benchmarks/README.md`` (between ``<!-- arena:begin -->`` and
``<!-- arena:end -->``) is generated from it. ``--table FILE`` only
regenerates the table; ``--quick`` (3 s windows) prints it and writes
``arena-<date>-quick.json`` without touching the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from rooms import Conn, _cpu, _decode, cpu_seconds, loadavg, pct, summary  # noqa: E402

README = HERE / "README.md"
BEGIN, END = "<!-- arena:begin -->", "<!-- arena:end -->"


# --- the server (``--serve``) -----------------------------------------------------------


def serve() -> None:
    """Run the arena example with timing wrappers; print ``READY <port>``; stop on SIGTERM."""
    import signal
    from time import perf_counter

    import anyio

    import rtcore
    from rtcore.cli import load_app
    from rtcore.engine.app import CommandSpec
    from rtcore.rooms import runtime
    from rtcore.server.runner import Server

    app = load_app(str(ROOT / "examples" / "arena" / "app.py") + ":app")
    ticks: list[float] = []
    visible: list[float] = []
    arrived: dict[str, list[tuple[int, float]]] = {}  # player -> (first seq of an input, received at)

    spec = app.commands["room.send"]

    async def timed_send(ctx: rtcore.Context, args: Any) -> Any:
        data = args.data if isinstance(args.data, dict) else {}
        steps = data.get("steps") or []
        if args.type == "input" and steps and ctx.principal is not None:
            arrived.setdefault(ctx.principal.id, []).append((int(steps[0][0]), perf_counter()))
        return await spec.handler(ctx, args)

    app.commands["room.send"] = CommandSpec(spec.name, timed_send, spec.args_type)

    step = runtime._Actor._step

    async def timed_step(self: Any, fn: Any, args: Any) -> None:
        t0 = perf_counter()
        await step(self, fn, args)
        if getattr(fn, "__name__", "") != "on_tick":
            return
        t1 = perf_counter()
        ticks.append(t1 - t0)
        for pid, me in self.room.state.players.items():
            pending = arrived.get(pid)
            while pending and pending[0][0] <= me.seq:
                visible.append(t1 - pending.pop(0)[1])

    runtime._Actor._step = timed_step  # type: ignore[method-assign]

    @app.command("bench.take")
    async def take(ctx: Any, args: Any) -> dict[str, list[float]]:
        out = {"ticks": list(ticks), "visible": list(visible)}
        ticks.clear()
        visible.clear()
        return out

    async def main() -> None:
        server = Server(app, port=0, backend="memory://", grace=0.5)
        server.node_options["limits"] = rtcore.Limits(
            command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000, idle_timeout=3600.0
        )
        async with anyio.create_task_group() as tg:
            bound = await tg.start(server.serve)
            print("READY", bound, flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    await server.stop(grace=0.2)
                    break

    anyio.run(main)


class ServerProcess:
    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}/v1/ws"
        self.pid = self.proc.pid

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the load (worker processes) ------------------------------------------------------------


async def open_conn(url: str, name: str) -> Conn:
    """``rooms.Conn.open`` with a patient handshake (the shared machine can be very busy)."""
    from websockets.asyncio.client import connect

    ws = await connect(url, subprotocols=["rtcore.v1.json"], compression=None, ping_interval=None, max_queue=None, open_timeout=60)  # type: ignore[list-item]
    await ws.send(json.dumps({"t": "hello", "v": 1, "token": name}))
    welcome = _decode(await ws.recv())
    assert welcome["t"] == "welcome", welcome
    return Conn(ws, name)


def seq_of(ops: list[Any], me: str) -> int | None:
    """The ``players[me].seq`` a patch sets, if any (all a player reads)."""
    seq = None
    for op in ops:
        if op[0] != "set":
            continue
        path = op[1]
        if len(path) == 4 and path[2] == me and path[3] == "seq":
            seq = op[2]
        elif len(path) == 3 and path[2] == me and path[1] == "players":
            seq = op[2]["seq"]
        elif not path:
            seq = op[2]["state"]["players"].get(me, {}).get("seq")
    return seq


async def _worker(url: str, room_id: str, names: list[str], input_hz: float, seconds: float, reps: int, barrier: Any, out: Any) -> None:
    conns = [await open_conn(url, n) for n in names]
    for c in conns:
        joined = await c.cmd("room.join", {"room_id": room_id})
        await c.request({"t": "sub", "stream": joined["stream"], "since": {"epoch": "", "offset": 0}})
    counting = {"on": False, "bytes": 0, "frames": 0, "inputs": 0, "steps": 0}
    acked: dict[str, list[tuple[int, float]]] = {c.name: [] for c in conns}
    rtts: list[float] = []

    async def reader(c: Conn) -> None:
        mine = acked[c.name]
        async for raw in c.ws:
            if not raw.startswith(('{"t":"evt"', '{"t":"sync"', '{"t":"snap"')):
                continue  # command replies are not state
            if counting["on"]:
                counting["bytes"] += len(raw)
                counting["frames"] += 1
            if mine and raw.startswith('{"t":"evt"'):
                frame = _decode(raw)
                if frame.get("type") == "patch":
                    seq = seq_of(frame["data"]["ops"], c.name)
                    now = time.perf_counter()
                    while seq is not None and mine and mine[0][0] <= seq:
                        rtts.append(now - mine.pop(0)[1])

    async def player(c: Conn, offset: float, until: float, seq: list[int], rng: random.Random) -> None:
        await asyncio.sleep(offset)
        every = max(1, round(20 / input_hz))
        batch: list[list[int]] = []
        dx, dy = rng.choice((-1, 1)), rng.choice((-1, 0, 1))
        next_at = time.perf_counter()
        k = 0
        while time.perf_counter() < until:
            next_at += 0.05
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if rng.random() < 0.05:
                dx, dy = rng.choice((-1, 0, 1)), rng.choice((-1, 0, 1)) if dx else rng.choice((-1, 1))
            seq[0] += 1
            batch.append([seq[0], dx, dy])
            k += 1
            if k % every == 0:
                acked[c.name].append((seq[0], time.perf_counter()))
                await c.send({"t": "cmd", "name": "room.send", "args": {"room_id": room_id, "type": "input", "data": {"steps": batch}}})
                counting["inputs"] += 1
                counting["steps"] += len(batch)
                batch = []

    readers = [asyncio.create_task(reader(c)) for c in conns]
    seqs = {c.name: [0] for c in conns}
    rng = random.Random(os.getpid())
    for _ in range(reps):
        await asyncio.to_thread(barrier.wait)
        counting.update(on=True, bytes=0, frames=0, inputs=0, steps=0)
        rtts.clear()
        t0 = time.perf_counter()
        until = t0 + seconds
        await asyncio.gather(*(player(c, i / len(conns) / input_hz, until, seqs[c.name], rng) for i, c in enumerate(conns)))
        elapsed = time.perf_counter() - t0
        counting["on"] = False
        await asyncio.sleep(0.5)  # the last batches' acks
        out.put({**{k: counting[k] for k in ("bytes", "frames", "inputs", "steps")}, "clients": len(conns), "seconds": elapsed, "rtts": list(rtts)})
        for v in acked.values():
            v.clear()
        await asyncio.sleep(0.5)
    for r in readers:
        r.cancel()
    await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)


def worker(*args: Any) -> None:
    asyncio.run(_worker(*args))


# --- the parent --------------------------------------------------------------------------------


def run(players: int, input_hz: float, reps: int, seconds: float, workers: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    server = ServerProcess()
    try:

        async def create() -> str:
            host = await open_conn(server.url, "host")
            joined = await host.cmd("room.create", {"type": "arena", "options": {"target": 1000, "round_seconds": 3600}})
            await host.cmd("room.leave", {"room_id": joined["room_id"]})
            await host.ws.close()
            return str(joined["room_id"])

        async def take() -> dict[str, list[float]]:
            c = await open_conn(server.url, f"probe{time.monotonic_ns()}")
            got = await c.cmd("bench.take", {})
            await c.ws.close()
            return dict(got)

        room_id = asyncio.run(create())
        barrier = ctx.Barrier(workers + 1)
        out = ctx.Queue()
        procs = []
        for w in range(workers):
            names = [f"p{w}-{i}" for i in range(w, players, workers)]
            p = ctx.Process(target=worker, args=(server.url, room_id, names, input_hz, seconds, reps, barrier, out))
            p.start()
            procs.append(p)
        pids = [p.pid for p in procs if p.pid is not None]
        runs = []
        for _ in range(reps):
            barrier.wait(timeout=180)
            asyncio.run(take())  # drop what the idle time before recorded
            s0, c0, l0, load0 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter(), loadavg()
            parts = [out.get(timeout=180) for _ in procs]
            s1, c1, l1 = cpu_seconds(server.pid), _cpu(pids), time.perf_counter()
            got = asyncio.run(take())
            wall = l1 - l0
            clients = sum(p["clients"] for p in parts)
            ticks, vis = got["ticks"], got["visible"]
            rtts = [x for p in parts for x in p["rtts"]]
            inputs = sum(p["inputs"] for p in parts)
            runs.append(
                {
                    "tick_p50_ms": pct(ticks, 0.5) * 1e3,
                    "tick_p99_ms": pct(ticks, 0.99) * 1e3,
                    "tick_max_ms": max(ticks) * 1e3,
                    "ticks_per_s": len(ticks) / wall,
                    "visible_p50_ms": pct(vis, 0.5) * 1e3,
                    "visible_p99_ms": pct(vis, 0.99) * 1e3,
                    "visible_samples": len(vis),
                    "client_rtt_p50_ms": pct(rtts, 0.5) * 1e3,
                    "client_rtt_p99_ms": pct(rtts, 0.99) * 1e3,
                    "bytes_per_client_s": sum(p["bytes"] / p["seconds"] for p in parts) / clients,
                    "frames_per_client_s": sum(p["frames"] / p["seconds"] for p in parts) / clients,
                    "inputs_per_s": inputs / wall,
                    "steps_per_s": sum(p["steps"] for p in parts) / wall,
                    "server_cpu_pct": (s1 - s0) / wall * 100,
                    "server_cpu_ms_per_tick": (s1 - s0) / max(1, len(ticks)) * 1e3,
                    "client_cpu_pct": [(b - a) / wall * 100 for a, b in zip(c0, c1, strict=True)],
                    "load": load0,
                }
            )
            r = runs[-1]
            print(
                f"  tick p99 {r['tick_p99_ms']:.2f} ms, input->visible p99 {r['visible_p99_ms']:.1f} ms, "
                f"{r['bytes_per_client_s'] / 1000:.1f} kB/client/s, {r['ticks_per_s']:.1f} ticks/s, server {r['server_cpu_pct']:.0f}%, "
                f"clients {[round(x) for x in r['client_cpu_pct']]}%, load {load0}",
                flush=True,
            )
        for p in procs:
            p.join(30)
    finally:
        server.stop()
    keys = ("tick_p50_ms", "tick_p99_ms", "visible_p50_ms", "visible_p99_ms", "client_rtt_p50_ms", "client_rtt_p99_ms",
            "bytes_per_client_s", "frames_per_client_s", "ticks_per_s", "inputs_per_s", "server_cpu_pct", "server_cpu_ms_per_tick")
    return {"runs": runs, **{k: summary([r[k] for r in runs]) for k in keys},
            "client_cpu_pct_max": max(x for r in runs for x in r["client_cpu_pct"])}


# --- the README table ----------------------------------------------------------------------------


def _fmt(s: dict[str, Any], digits: int = 0, scale: float = 1.0) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)})"


def table(report: dict[str, Any], source: str) -> str:
    m, st, a = report["machine"], report["settings"], report["arena"]
    w = f"{st['players']} players, 20 Hz, {st['input_hz']:g} inputs/s each"
    lines = [
        BEGIN,
        f"<!-- generated by `python benchmarks/arena.py` from {source}; do not edit by hand -->",
        "",
        f"{report['date']}, {m['cpus']} vCPU, {m['platform']}, Python {m['python']}, `python benchmarks/arena.py"
        f"{' --quick' if report['quick'] else ''}`, {st['workers']} load processes, {st['window_s']:g} s windows; "
        f"load average at start {', '.join(f'{x:.2f}' for x in report['load_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_end'])} (the machine is shared with other jobs). "
        f"Median (min-max) of {st['reps']} repetitions; every repetition is in `{source}`.",
        "",
        "| workload | figure | value |",
        "|---|---|---:|",
        f"| {w} | tick duration p50 / p99 ms (on_tick + diff + patch append) | {_fmt(a['tick_p50_ms'], 2)} / {_fmt(a['tick_p99_ms'], 2)} |",
        f"| {w} | input → visible (server) p50 / p99 ms | {_fmt(a['visible_p50_ms'], 1)} / {_fmt(a['visible_p99_ms'], 1)} |",
        f"| {w} | bytes per client per second (room stream), kB | {_fmt(a['bytes_per_client_s'], 1, 1e-3)} |",
        f"| {w} | room-stream frames per client per second | {_fmt(a['frames_per_client_s'])} |",
        f"| {w} | ticks/s observed | {_fmt(a['ticks_per_s'], 1)} |",
        f"| {w} | inputs/s received | {_fmt(a['inputs_per_s'])} |",
        f"| {w} | server CPU % of a core | {_fmt(a['server_cpu_pct'])} |",
        f"| {w} | server CPU ms per tick (all work / ticks) | {_fmt(a['server_cpu_ms_per_tick'], 1)} |",
        f"| {w} | client: batch sent → own last step seen p50 / p99 ms | {_fmt(a['client_rtt_p50_ms'], 0)} / {_fmt(a['client_rtt_p99_ms'], 0)} |",
        "",
        f"Load processes' CPU (highest in any repetition): {a['client_cpu_pct_max']:.0f} % of a core.",
        END,
    ]
    return "\n".join(lines)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s windows; prints the table, leaves the README alone")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--players", type=int, default=100)
    parser.add_argument("--input-hz", type=float, default=4.0, help="input batches per second per player (20 steps/s in all)")
    parser.add_argument("--workers", type=int, default=2, help="load processes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, help="only regenerate the README table from this results file")
    opts = parser.parse_args()
    if opts.serve:
        serve()
        return
    if opts.table:
        write_table(opts.table)
        return
    reps, window = max(3, opts.reps), 3.0 if opts.quick else 8.0
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": opts.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True), "python": platform.python_version()},
        "settings": {"reps": reps, "window_s": window, "workers": opts.workers, "players": opts.players, "input_hz": opts.input_hz},
        "load_start": loadavg(),
    }
    started = time.perf_counter()
    report["arena"] = run(opts.players, opts.input_hz, reps, window, opts.workers)
    report["load_end"] = loadavg()
    report["elapsed_s"] = time.perf_counter() - started
    name = f"arena-{time.strftime('%Y-%m-%d', time.gmtime())}{'-quick' if opts.quick else ''}.json"
    out = HERE / "results" / name
    out.write_text(json.dumps(report, indent=1) + "\n")
    if opts.quick:
        print(table(report, f"benchmarks/results/{name}"))
        print(f"written to {out}")
        return
    write_table(out)
    print(f"written to {out} and the arena table of {README}")


if __name__ == "__main__":
    main()

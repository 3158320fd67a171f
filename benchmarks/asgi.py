"""Side by side: ``rtcore serve`` vs the ASGI adapter under uvicorn and under hypercorn.

One command::

    python benchmarks/asgi.py [--reps 3] [--seconds 5]

Each server runs the same tiny app (an ``echo`` command) in its own process
(``asgi.py --serve KIND PORT``): ``rtcore`` is :class:`rtcore.Server` (what
``rtcore serve`` runs), ``uvicorn`` and ``hypercorn`` serve
:func:`rtcore.asgi.asgi_app` with their default settings (asyncio). The load
client runs in another process (the ``websockets`` library, raw JSON frames,
no permessage-deflate offered), for ``--seconds`` after a 1 s warm-up:

* ``echo-1`` / ``echo-16``: 1 or 16 connections, each sending ``echo`` and
  waiting for its ``ok`` before the next (one in flight per connection);
  ops are round trips.
* ``fanout-50``: 50 connections subscribed to one stream, one more connection
  sending ``pub`` (one in flight); ops are events delivered to subscribers.

Measured per run: ops per second, and the server process's CPU (utime + stime
from ``/proc/<pid>/stat``) over the window divided by the ops. Each
repetition runs the three servers one after another, the order rotated every
repetition. The machine may be shared: the load average before and after each
run is recorded; prefer the CPU per command to the throughput when comparing.

Writes ``benchmarks/results/asgi-<date>.json`` (every run) and regenerates the
table of ``benchmarks/README.md`` between ``<!-- asgi:begin -->`` and
``<!-- asgi:end -->`` (median and min-max); ``--table FILE.json`` only
regenerates the table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import rtcore

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- asgi:begin -->", "<!-- asgi:end -->"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
KINDS = ("rtcore", "uvicorn", "hypercorn")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# --- the server process ----------------------------------------------------------------


app = rtcore.App("bench-asgi")


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal:
    return rtcore.Principal(token or "anon")


@app.command("echo")
async def echo(ctx: rtcore.Context, args: Any) -> Any:
    return args


@app.command("pub")
async def pub(ctx: rtcore.Context, args: Any) -> int:
    return (await ctx.publish("room:bench", "tick", args)).offset


def serve(kind: str, port: int) -> None:
    """Serve the benchmark app with ``kind`` on ``port`` until SIGTERM."""
    from rtcore.asgi import asgi_app

    # The per-connection command rate limit (a production safety net) would cap the run.
    limits = rtcore.Limits(command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000)
    if kind == "rtcore":
        rtcore.run(app, port=port, grace=0.5, session_limits=limits, on_ready=lambda p: print("READY", p, flush=True))
        return
    rt = asgi_app(app, grace=0.5, session_limits=limits)
    if kind == "uvicorn":
        import uvicorn

        config = uvicorn.Config(rt, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)

        async def main() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                await asyncio.sleep(0.01)
            print("READY", port, flush=True)
            await task

        asyncio.run(main())
    elif kind == "hypercorn":
        import signal

        import hypercorn.asyncio
        from hypercorn.config import Config

        config_h = Config()
        config_h.bind = [f"127.0.0.1:{port}"]
        config_h.loglevel = "WARNING"

        async def main_h() -> None:
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            task = asyncio.create_task(hypercorn.asyncio.serve(rt, config_h, shutdown_trigger=stop.wait, mode="asgi"))
            while rt.node is None:  # noqa: ASYNC110 - the adapter offers no event for it
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # lifespan done; the listener is bound right after
            print("READY", port, flush=True)
            await task

        asyncio.run(main_h())


# --- the load client -------------------------------------------------------------------

#: (name, connections): ``echo`` with one connection (per-command cost), with 16
#: (concurrency); ``fanout``: 1 publisher, 50 subscribers of one stream.
WORKLOADS: tuple[tuple[str, int], ...] = (("echo", 1), ("echo", 16), ("fanout", 50))


async def _open(url: str) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(url, subprotocols=["rtcore.v1.json"], compression=None, max_queue=None)  # type: ignore[list-item]
    await ws.send('{"t":"hello","v":1}')
    assert json.loads(await ws.recv())["t"] == "welcome"
    return ws


async def _client(port: int, workload: str, conns: int, warmup: float, seconds: float, started: Any, stamps: Any) -> int:
    url = f"ws://127.0.0.1:{port}/v1/ws"
    loop = asyncio.get_running_loop()
    count = 0
    measuring = False
    t_start = t_end = 0.0

    def tick() -> bool:
        """Whether to go on; flags the start of the window (the parent reads the server CPU then)."""
        nonlocal measuring
        now = loop.time()
        if not measuring and now >= t_start:
            measuring = True
            started.set()
        return now < t_end

    if workload == "echo":
        sockets = [await _open(url) for _ in range(conns)]
        t_start = loop.time() + warmup
        t_end = t_start + seconds

        async def one(ws: Any) -> None:
            nonlocal count
            i = 0
            while tick():
                i += 1
                await ws.send(f'{{"t":"cmd","id":{i},"name":"echo","args":{{"n":{i}}}}}')
                reply = await ws.recv()
                assert '"t":"ok"' in reply, reply
                if measuring:
                    count += 1

        await asyncio.gather(*(one(ws) for ws in sockets))
    else:  # fanout: count events delivered to the subscribers while one publisher publishes
        subs = [await _open(url) for _ in range(conns)]
        for ws in subs:
            await ws.send('{"t":"sub","id":1,"stream":"room:bench"}')
            assert json.loads(await ws.recv())["t"] == "subbed"
        publisher = await _open(url)
        t_start = loop.time() + warmup
        t_end = t_start + seconds
        done = asyncio.Event()

        async def reader(ws: Any) -> None:
            nonlocal count
            while not done.is_set():
                try:
                    frame = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                if measuring and not done.is_set() and frame.startswith('{"t":"evt"'):
                    count += 1

        async def publish() -> None:
            i = 0
            while tick():
                i += 1
                await publisher.send(f'{{"t":"cmd","id":{i},"name":"pub","args":{{"n":{i}}}}}')
                while '"t":"ok"' not in (reply := await publisher.recv()):
                    assert '"t":"err"' not in reply, reply
            done.set()
            stamps.set()  # the end of the window: the parent reads the server CPU now

        readers = [asyncio.create_task(reader(ws)) for ws in subs]
        await publish()
        await asyncio.gather(*readers)
        subs.append(publisher)
        sockets = subs
    stamps.set()
    for ws in sockets:
        await ws.close()
    return count


def client(port: int, workload: str, conns: int, warmup: float, seconds: float, started: Any, stamps: Any, out: Any) -> None:
    out.put(asyncio.run(_client(port, workload, conns, warmup, seconds, started, stamps)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_server(kind: str, seconds: float) -> list[dict[str, Any]]:
    """Start ``kind``'s server once and run every workload against it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", kind, str(port)], stdout=subprocess.PIPE, text=True)
    results = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"{kind} did not start: {line!r}"
        ctx = mp.get_context("spawn")
        for workload, conns in WORKLOADS:
            before_load = loadavg()
            started, stamps, out = ctx.Event(), ctx.Event(), ctx.Queue()
            worker = ctx.Process(target=client, args=(port, workload, conns, 1.0, seconds, started, stamps, out))
            worker.start()
            assert started.wait(60), "client did not start"
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            assert stamps.wait(seconds + 60), "client did not finish"
            cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
            count = out.get(timeout=60)
            worker.join(30)
            wall = t1 - t0
            results.append({
                "kind": kind,
                "workload": f"{workload}-{conns}",
                "ops": count,
                "seconds": wall,
                "per_s": count / wall,
                "server_cpu_s": cpu1 - cpu0,
                "server_cpu_us_per_op": (cpu1 - cpu0) / count * 1e6,
                "loadavg_before": before_load,
                "loadavg_after": loadavg(),
            })
    finally:
        proc.terminate()
        proc.wait(30)
    return results


# --- the table ---------------------------------------------------------------------


def _med(values: list[float], digits: int) -> str:
    fmt = f"{{:,.{digits}f}}"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


_LABELS = {
    "echo-1": ("echo, 1 connection", "round trips/s", "µs CPU/command"),
    "echo-16": ("echo, 16 connections", "round trips/s", "µs CPU/command"),
    "fanout-50": ("fan-out, 1 publisher → 50 subscribers", "events delivered/s", "µs CPU/delivered event"),
}


def table(report: dict[str, Any], source: str) -> str:
    runs = report["runs"]
    names = {
        "rtcore": "`rtcore serve`",
        "uvicorn": f"uvicorn {report['versions']['uvicorn']} + asgi_app",
        "hypercorn": f"hypercorn {report['versions']['hypercorn']} + asgi_app",
    }
    lines = [
        f"<!-- generated by `python benchmarks/asgi.py` from {source}; do not edit by hand -->",
        "",
        f"One command in flight per connection, {report['seconds']:g} s per run after a 1 s warm-up, "
        f"{report['reps']} repetitions, server order rotated each repetition "
        f"({report['date']}, {report['machine']}; {report['settings']}). Load average "
        f"{report['loadavg_min']:.2f}-{report['loadavg_max']:.2f}: the machine was shared with other jobs, "
        "so the throughput is noisy; compare the server CPU per operation.",
        "",
        "| workload | server | ops/s, median (min-max) | server CPU µs/op, median (min-max) | CPU vs `rtcore serve` |",
        "|---|---|---|---|---|",
    ]
    for workload, (label, ops, cpu_label) in _LABELS.items():
        base = [r["server_cpu_us_per_op"] for r in runs if r["kind"] == "rtcore" and r["workload"] == workload]
        if not base:
            continue
        for kind in KINDS:
            mine = [r for r in runs if r["kind"] == kind and r["workload"] == workload]
            cpu = [r["server_cpu_us_per_op"] for r in mine]
            lines.append(
                f"| {label} ({ops}; {cpu_label}) | {names[kind]} | {_med([r['per_s'] for r in mine], 0)} | {_med(cpu, 1)} | "
                f"{statistics.median(cpu) / statistics.median(base):.2f}x |"
            )
    return "\n".join(lines)


def write_table(path: Path) -> None:
    report = json.loads(path.read_text())
    text = README.read_text()
    block = f"{BEGIN}\n{table(report, f'benchmarks/results/{path.name}')}\n{END}"
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## ASGI adapter vs `rtcore serve`\n\n" + block + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--table", type=Path, help="only regenerate the README table from this results file")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.table:
        write_table(args.table)
        return
    if args.reps < 3:
        parser.error("--reps must be at least 3")
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = KINDS[rep % 3:] + KINDS[: rep % 3]
        for kind in order:
            for result in run_server(kind, args.seconds):
                result["rep"] = rep
                runs.append(result)
                print(
                    f"rep {rep} {kind:9} {result['workload']:9} {result['per_s']:9,.0f} ops/s  "
                    f"{result['server_cpu_us_per_op']:7.1f} µs CPU/op  load {result['loadavg_before'][0]:.2f}",
                    flush=True,
                )
    loads = [x for r in runs for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    date = datetime.date.today().isoformat()
    report = {
        "date": date,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": {name: metadata.version(name) for name in ("rtcore", "uvicorn", "hypercorn", "websockets")},
        "settings": "each server's defaults: uvicorn ws=auto, http=auto, asyncio loop; hypercorn asyncio worker; rtcore serve asyncio",
        "reps": args.reps,
        "seconds": args.seconds,
        "loadavg_min": min(loads),
        "loadavg_max": max(loads),
        "runs": runs,
    }
    path = HERE / "results" / f"asgi-{date}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    write_table(path)
    print(table(report, f"benchmarks/results/{path.name}"))


if __name__ == "__main__":
    main()

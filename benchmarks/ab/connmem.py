"""Connect rate and memory per idle connection, as the number open grows.

``python benchmarks/ab/connmem.py [--total 10000] [--step 1000] [--reps 1] [--servers rtcore/asyncio,peer]``

Connections are opened one after another (connect, upgrade, ``hello`` →
``welcome``, ``sub`` → ``subbed`` on one shared stream) and kept open. Per
step of ``--step`` connections it records the wall-clock rate, the server's
CPU per connection (utime+stime from /proc, the number to compare on a
shared machine), the server's idle CPU with that many open (3 s with no
connects) and the per-connection CPU net of it, and its RSS; ``kb_per_conn`` is (RSS now - RSS before the
first connection) / connections open. Every open connection stays live (it
answers pings and sends a protocol ``ping`` every 30 s, so no idle timeout
closes it). RLIMIT_NOFILE is raised for client and server.

``AB_TASKS=<prefix>`` (asyncio servers): also record the server's asyncio
tasks per open connection. ``AB_TRACEMALLOC=<prefix>``: the server dumps a
tracemalloc snapshot before the first and after the last connection
(compare them with ``benchmarks/ab/memdiff.py``). ``AB_CALLGRIND=<dir>`` runs
the rtcore servers under valgrind's callgrind, instrumented only while
connections are being opened, and reports the server's **instructions per
connect** (``server_instructions_per_conn``): a count that does not depend on
the machine's load (use a small ``--total``: the server runs ~50x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
from pathlib import Path
from typing import Any

from _harness import (
    Conn,
    cpu_seconds,
    load_average,
    now,
    raise_nofile,
    rss_bytes,
    run_client,
    self_cpu,
    start,
    write_results,
)


async def drive(
    port: int, pid: int, total: int, step: int, stream: str, count_tasks: bool = False, instrument: Any = None
) -> list[dict[str, float]]:
    await asyncio.sleep(0.5)
    rss0 = rss_bytes(pid)
    snap = os.environ.get("AB_TRACEMALLOC")
    if snap:
        os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(2)
    # The server writes its asyncio task count on SIGUSR2 (benchmarks/ab/server.py on asyncio only).
    tasks_file = f"{os.environ['AB_TASKS']}-{pid}" if count_tasks and os.environ.get("AB_TASKS") else None
    tasks0 = await _server_tasks(pid, tasks_file, 1) if tasks_file else 0
    conns: list[Conn] = []
    keepalives: list[asyncio.Task[None]] = []  # idle but alive: pings answered and sent
    steps: list[dict[str, float]] = []
    while len(conns) < total:
        if instrument is not None:
            await asyncio.to_thread(instrument, True)
        s0, c0, t0 = cpu_seconds(pid), self_cpu(), now()
        for _ in range(step):
            i = len(conns)
            c = await Conn.open(port)
            await c.hello(f"u{i}")
            await c.subscribe(stream if stream != "own" else f"room:s{i}")
            conns.append(c)
            keepalives.append(asyncio.create_task(c.keepalive()))
        elapsed = now() - t0
        s1, c1 = cpu_seconds(pid), self_cpu()
        if instrument is not None:
            await asyncio.to_thread(instrument, False)
        # What the open connections cost while nothing connects (pings, timers),
        # subtracted from the step's CPU: the per-connect cost alone.
        i0, ti = cpu_seconds(pid), now()
        await asyncio.sleep(3.0)
        idle_per_s = (cpu_seconds(pid) - i0) / (now() - ti)
        rss = rss_bytes(pid)
        extra: dict[str, float] = {}
        if tasks_file:
            tasks = await _server_tasks(pid, tasks_file, len(steps) + 2)
            extra["tasks_per_conn"] = (tasks - tasks0) / len(conns)
        steps.append(
            {
                "open": len(conns),
                "rate_per_s": step / elapsed,
                "server_cpu_us_per_conn": (s1 - s0) / step * 1e6,
                "server_idle_cpu_ms_per_s": idle_per_s * 1e3,
                "server_cpu_us_per_conn_net": max(0.0, (s1 - s0) - idle_per_s * elapsed) / step * 1e6,
                "client_cpu_us_per_conn": (c1 - c0) / step * 1e6,
                "rss_mb": rss / 1e6,
                "kb_per_conn": (rss - rss0) / len(conns) / 1e3,
                **extra,
            }
        )
        print({k: round(v, 1) for k, v in steps[-1].items()}, flush=True)
    if snap:
        os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(5)
    for t in keepalives:
        t.cancel()
    for c in conns:
        c.close()
    return steps


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def _server_tasks(pid: int, path: str, n: int) -> int:
    """The server's asyncio task count (its n-th answer to SIGUSR2; benchmarks/ab/server.py)."""
    os.kill(pid, signal.SIGUSR2)
    out = Path(f"{path}-{n}")
    for _ in range(100):
        await asyncio.sleep(0.05)
        text = _read(out)  # a few bytes from tmpfs: not worth a thread
        if text.endswith("\n"):
            return int(text)
    raise RuntimeError("the server wrote no task count (AB_TASKS needs an asyncio server)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=10000)
    ap.add_argument("--step", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--servers", default="rtcore/asyncio,peer")
    ap.add_argument("--stream", default="room:idle", help="stream every connection subscribes to ('own': one each)")
    ap.add_argument("--name", default="connmem")
    args = ap.parse_args()
    args.nofile = raise_nofile(4 * args.total + 1024)
    kinds = args.servers.split(",")
    runs: dict[str, list[list[dict[str, float]]]] = {k: [] for k in kinds}
    load_before = load_average()
    for rep in range(args.reps):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        for kind in order:
            print("==", kind, "rep", rep, flush=True)
            server = start(kind)
            try:
                count_tasks = kind != "peer" and not kind.endswith("/trio")
                steps = run_client(drive(server.port, server.pid, args.total, args.step, args.stream, count_tasks, server.instrument))
                runs[kind].append(steps)
            finally:
                server.stop()
            instructions = server.instructions()
            if instructions is not None:
                # Every step's connects were instrumented, nothing else.
                steps[-1]["server_instructions_per_conn"] = instructions / args.total
                print(kind, "instructions per connect:", round(instructions / args.total), flush=True)
    summary: dict[str, Any] = {}
    for kind, reps in runs.items():
        summary[kind] = {
            "rate_per_s_by_open": [statistics.median(r[i]["rate_per_s"] for r in reps) for i in range(len(reps[0]))],
            "server_cpu_us_per_conn_by_open": [statistics.median(r[i]["server_cpu_us_per_conn"] for r in reps) for i in range(len(reps[0]))],
            "kb_per_conn_at_total": statistics.median(r[-1]["kb_per_conn"] for r in reps),
            "tasks_per_conn_at_total": statistics.median(r[-1].get("tasks_per_conn", math.nan) for r in reps),
            "server_instructions_per_conn": statistics.median(r[-1].get("server_instructions_per_conn", math.nan) for r in reps),
        }
    write_results(args.name, {"args": vars(args), "load_before": load_before, "load_after": load_average(), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

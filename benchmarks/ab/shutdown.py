"""Graceful shutdown of N open connections: seconds and server CPU from SIGTERM to exit.

``python benchmarks/ab/shutdown.py --total 10000 --reps 3 --servers base-asyncio,rtcore-asyncio``

Each repetition starts each server fresh (order alternates) on a new
``sqlite://`` file, opens ``--total`` WebSocket clients (100 per stream, as
the ``storm`` workload of ``benchmarks/run.py``), publishes 2 events per
stream and waits until every client has them, arms the clients to reconnect
(so they hammer the closed port as in a real restart), then sends SIGTERM and
waits for the process to exit. Reported per server: wall seconds from
SIGTERM to exit, the server's CPU in that window (``wait4`` rusage minus
``/proc`` before the signal) per connection, and how many clients saw close
code 1001 and ``bye`` (told to reconnect). ``base-<loop>`` runs the tree in
``AB_BASE_SRC`` (see ``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import run  # noqa: E402  (benchmarks/run.py: Server, Pool, backend_for)
from _harness import cpu_seconds, load_average, raise_nofile  # noqa: E402


def one(name: str, total: int, pool: run.Pool) -> dict[str, float]:
    nw = len(pool.conns)
    nstreams = max(1, total // 100)
    streams = [f"storm:{j}" for j in range(nstreams)]
    with run.backend_for("sqlite") as (url, _):
        server = run.Server(name, url, run.free_port())
        try:
            per = [*run.split(total, nw - 1), 0]
            pool.all("open", [{"n": n} for n in per], url=server.url, prefix="s-", stream="storm", streams=nstreams, concurrency=max(1, 32 // (nw - 1)))
            pub = nw - 1
            pool.send(pub, "publish", url=server.url, streams=streams, per_stream=2, window=32)
            pool.recv(pub)
            for i in range(nw - 1):
                pool.send(i, "wait_offset", offset=2, limit_s=120)
            assert all(pool.recv(i)["ok"] for i in range(nw - 1))
            pool.all("storm_arm", final=4)
            assert server.proc is not None
            # STORM_PROFILE=<dir>: py-spy samples the shutdown (raw stacks; ab/top.py reads them).
            profiler = run.start_profile(server, "shutdown") if os.environ.get("STORM_PROFILE") else None
            if profiler is not None:
                time.sleep(1.0)  # py-spy attaches
            cpu0 = cpu_seconds(server.pid)
            t0 = time.time()
            server.proc.send_signal(signal.SIGTERM)
            _, status, ru = os.wait4(server.pid, 0)
            wall = time.time() - t0
            server.proc.returncode = os.waitstatus_to_exitcode(status)
            cpu = ru.ru_utime + ru.ru_stime - cpu0
            run.stop_profile(profiler)
            closes = pool.all("close_codes")
        finally:
            server.stop()
            pool.all("close")
    c1001 = sum(c.get("1001", 0) for c in closes)
    byes = sum(c.get("bye", 0) for c in closes)
    return {
        "shutdown_s": wall,
        "shutdown_cpu_us_per_conn": cpu / total * 1e6,
        "told_1001": c1001,
        "got_bye": byes,
        "exit": float(server.proc.returncode or 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="base-asyncio,rtcore-asyncio")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    raise_nofile()
    servers = args.servers.split(",")
    pool = run.Pool(args.workers + 1)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
    load0 = load_average()
    for rep in range(args.reps):
        order = servers if rep % 2 == 0 else servers[::-1]
        for s in order:
            r = one(s, args.total, pool)
            results[s].append(r)
            print(f"rep {rep + 1} {s}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    for s, rs in results.items():
        cells = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{s}: median " + ", ".join(f"{k}={v:.4g}" for k, v in cells.items()) + "; range shutdown_s " + f"{min(r['shutdown_s'] for r in rs):.3g}-{max(r['shutdown_s'] for r in rs):.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "load": [load0, load_average()], "results": results}, indent=1))


if __name__ == "__main__":
    main()

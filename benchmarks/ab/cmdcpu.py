"""Server CPU per ``echo`` command: rtcore (on each loop asked for) against the peer.

``python benchmarks/ab/cmdcpu.py [--commands 20000] [--connections 50] [--reps 3] [--servers rtcore/asyncio,peer] [--command echo|keyed]``

For each repetition every server is started fresh, in alternating order.
50 connections each run echo commands one in flight; the server's
utime+stime is read from /proc before and after → µs of server CPU per
command (what the A/B compares; wall-clock rates are reported too, but the
machine is shared). The client's own CPU per command is printed so you can
see it is not the bottleneck.

``--command keyed`` sends ``append`` with an idempotency key (a fresh key per
command, each connection on its own stream): the keyed command of goal 1 (the
peer has no ``append``; compare with its echo). ``--backend`` picks the
servers' backend: ``memory://`` (default), ``sqlite`` (a fresh file per
server) or a ``redis://`` URL (keys are unique per run, so a shared database
needs no flush).
With ``AB_CALLGRIND=<dir>`` every server runs under callgrind, instrumented
only during the measured commands, and the result has instructions per
command (deterministic, unlike CPU time on a shared machine; use a few
thousand commands, the server is ~50x slower meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from _harness import Conn, Server, cpu_seconds, load_average, now, run_client, self_cpu, start, write_results

PAYLOAD = {"p": "x" * 64}


async def drive(server: Server, connections: int, commands: int, command: str) -> dict[str, float]:
    port, pid = server.port, server.pid
    run = os.urandom(4).hex()  # keys unique per run (a redis:// database outlives the server)
    conns = [await Conn.open(port) for _ in range(connections)]
    for i, c in enumerate(conns):
        await c.hello(f"c{i}")
    next_id = [0]

    def request(i: int) -> dict[str, Any]:
        next_id[0] += 1
        rid = next_id[0]
        if command == "keyed":
            args = {"stream": f"bench:k:{i}", "data": PAYLOAD}
            return {"t": "cmd", "id": rid, "name": "append", "args": args, "key": f"k-{run}-{rid}"}
        return {"t": "cmd", "id": rid, "name": "echo", "args": PAYLOAD}

    async def worker(i: int, c: Conn, count: int, lat: list[float] | None) -> None:
        for _ in range(count):
            t0 = now()
            msg = request(i)
            c.send(msg)
            await c.expect("ok", msg["id"])
            if lat is not None:
                lat.append(now() - t0)

    await asyncio.gather(*(worker(i, c, 20, None) for i, c in enumerate(conns)))  # warm-up
    per = commands // connections
    lat: list[float] = []
    server.instrument(True)
    s0, c0, t0 = cpu_seconds(pid), self_cpu(), now()
    await asyncio.gather(*(worker(i, c, per, lat) for i, c in enumerate(conns)))
    elapsed = now() - t0
    s1, c1 = cpu_seconds(pid), self_cpu()
    server.instrument(False)
    for c in conns:
        c.close()
    n = per * connections
    lat.sort()
    return {
        "commands": n,
        "server_cpu_us_per_cmd": (s1 - s0) / n * 1e6,
        "client_cpu_us_per_cmd": (c1 - c0) / n * 1e6,
        "rate_per_s": n / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="rtcore/asyncio,peer")
    ap.add_argument("--name", default="cmdcpu")
    ap.add_argument("--command", choices=("echo", "keyed"), default="echo")
    ap.add_argument("--backend", default="memory://", help="memory://, sqlite (a fresh file per server) or a redis:// URL")
    args = ap.parse_args()
    os.environ["AB_BACKEND"] = args.backend  # read by benchmarks/ab/server.py
    kinds = args.servers.split(",")
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    load_before = load_average()
    for rep in range(args.reps):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        for kind in order:
            server = start(kind)
            try:
                r = run_client(drive(server, args.connections, args.commands, args.command if kind != "peer" else "echo"))
            finally:
                server.stop()
            instructions = server.instructions()
            if instructions is not None:
                r["instructions_per_cmd"] = instructions / r["commands"]
            r["rep"] = rep
            runs[kind].append(r)
            print(kind, {k: round(v, 2) for k, v in r.items()}, flush=True)
    summary: dict[str, Any] = {}
    for kind, rs in runs.items():
        summary[kind] = {
            key: {"median": statistics.median(r[key] for r in rs), "min": min(r[key] for r in rs), "max": max(r[key] for r in rs)}
            for key in ("server_cpu_us_per_cmd", "client_cpu_us_per_cmd", "rate_per_s", "p50_ms", "p99_ms", "instructions_per_cmd")
            if key in rs[0]
        }
    write_results(args.name, {"args": vars(args), "load_before": load_before, "load_after": load_average(), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

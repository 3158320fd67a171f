"""Benchmark rtcore against a plain ``websockets`` server doing the same job.

One command::

    python benchmarks/run.py [--quick]

Both servers run in their own processes (so they do not share a GIL with the
load client), on loopback, in the same run, driven by the same load client
(``workloads.py``, on the ``websockets`` library). Workloads:

a. command → ok round trips over 50 connections, one command in flight each;
b. fan-out of 1,000 events to 200 subscribers (subscribers in worker
   processes), publish → receive latency;
c. reconnect and replay of 1,000 missed events (time until caught up).

Prints a table (rtcore, peer, ratio rtcore/peer) and writes
``benchmarks/results/latest.json``. Compare ratios, not absolute numbers:
they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

SERVERS = {"rtcore": HERE / "rtcore_server.py", "peer": HERE / "peer_websockets.py"}

#: (key, label, higher is better)
METRICS = [
    ("cmd_msgs_per_s", "commands: round trips/s (50 conns)", True),
    ("cmd_p50_ms", "commands: p50 ms", False),
    ("cmd_p99_ms", "commands: p99 ms", False),
    ("fanout_deliveries_per_s", "fan-out: deliveries/s (200 subs x 1,000)", True),
    ("fanout_p50_ms", "fan-out: publish->receive p50 ms", False),
    ("fanout_p99_ms", "fan-out: publish->receive p99 ms", False),
    ("replay_ms", "replay 1,000 missed: time to caught up ms (median)", False),
]


class ServerProcess:
    """A benchmark server in a child process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVERS[name]), "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"{name} server did not start: {line!r}")
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}/v1/ws"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fanout(url: str, subscribers: int, events: int, workers: int, tag: str) -> dict[str, float]:
    """Workload (b): subscribers in ``workers`` processes, the publisher here."""
    ctx = mp.get_context("spawn")
    stream = f"bench:fan-{tag}-{time.monotonic_ns()}"
    out = ctx.Queue()
    procs = []
    ready = []
    for i in range(workers):
        share = subscribers // workers + (1 if i < subscribers % workers else 0)
        ev = ctx.Event()
        p = ctx.Process(target=workloads.fanout_worker, args=(url, stream, share, events, ev, out))
        p.start()
        procs.append(p)
        ready.append(ev)
    for ev in ready:
        if not ev.wait(60):
            raise RuntimeError("fan-out subscribers did not get ready")
    t0 = time.time()
    asyncio.run(workloads.publish(url, stream, events))
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
    latencies = [x for r in results for x in r["latencies"]]
    last = max(r["last"] for r in results)
    assert len(latencies) == subscribers * events, len(latencies)
    return {
        "fanout_deliveries_per_s": len(latencies) / (last - t0),
        "fanout_p50_ms": workloads.percentile(latencies, 0.5) * 1e3,
        "fanout_p99_ms": workloads.percentile(latencies, 0.99) * 1e3,
    }


def replays(url: str, missed: int, repeat: int) -> dict[str, float]:
    """Workload (c), ``repeat`` times; the median."""
    times = [asyncio.run(workloads.replay(url, missed)) for _ in range(repeat)]
    return {"replay_ms": statistics.median(times) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips and repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    opts = parser.parse_args()
    per_connection = 200 if opts.quick else 1000
    repeat = 3 if opts.quick else 7
    workers = 2

    results: dict[str, dict[str, float]] = {"rtcore": {}, "peer": {}}
    servers = {name: ServerProcess(name) for name in SERVERS}
    try:
        # Interleaved per workload, so slow drifts of the machine hit both alike.
        for name, server in servers.items():
            results[name].update(asyncio.run(workloads.commands(server.url, 50, per_connection)))
        for name, server in servers.items():
            results[name].update(fanout(server.url, 200, 1000, workers, name))
        for name, server in servers.items():
            results[name].update(replays(server.url, 1000, repeat))
    finally:
        for server in servers.values():
            server.stop()

    rows = []
    print(f"\n{'metric':<52} {'rtcore':>12} {'peer':>12} {'rtcore/peer':>12}")
    for key, label, _higher in METRICS:
        r, p = results["rtcore"][key], results["peer"][key]
        rows.append({"metric": key, "label": label, "rtcore": r, "peer": p, "ratio": r / p})
        print(f"{label:<52} {r:>12,.1f} {p:>12,.1f} {r / p:>12.2f}")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": opts.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "connections": 50,
            "per_connection": per_connection,
            "subscribers": 200,
            "events": 1000,
            "subscriber_processes": workers,
            "replay_missed": 1000,
            "replay_repeat": repeat,
        },
        "results": rows,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {opts.out}")


if __name__ == "__main__":
    main()

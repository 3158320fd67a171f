"""What the logs cost the server: CPU per operation at --log-level warning, info and debug.

The counter example runs in its own process as ``rtcore serve`` runs it
(``rtcore.logs.configure`` + ``rtcore.run``; the command rate limit raised),
its log going to a file as in production, once per level; one client sends the same
sequential workloads to each, and the server's CPU time (utime + stime from
``/proc/<pid>/stat``) is read before and after each workload:

* ``http``: POST /v1/cmd/room.click on one keep-alive connection (INFO adds an
  access line per request, DEBUG also a command line);
* ``ws``: ``cmd`` frames one at a time on one WebSocket (DEBUG adds a command
  line; INFO adds nothing per command).

Levels run in a rotating order, each run repeated; the median and the spread
(min-max) of CPU per op are reported, with the machine's load average (the
machine may be shared: compare levels within one run).

    python benchmarks/log_overhead.py            # 3 repeats
    python benchmarks/log_overhead.py --quick    # 1 repeat, fewer ops

Writes ``benchmarks/results/log-overhead.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LEVELS = ["warning", "info", "debug"]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def start(level: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    # What `rtcore serve examples/counter/app.py:app --log-level LEVEL` does, with the
    # per-connection command rate limit raised (100/s would measure the limiter).
    code = (
        "import rtcore, rtcore.logs\n"
        "from rtcore.cli import load_app\n"
        f"rtcore.logs.configure({level!r}, 'text')\n"
        "app = load_app('examples/counter/app.py:app')\n"
        f"rtcore.run(app, port={port}, session_limits=rtcore.Limits(command_rate=1e6, command_burst=1_000_000))\n"
    )
    args = [sys.executable, "-c", code]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the server at --log-level {level} did not start: {log.read_text()[-2000:]}")


def http_ops(port: int, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"room": "bench", "by": 1})
    headers = {"authorization": "Bearer ada", "content-type": "application/json"}
    for _ in range(n):
        conn.request("POST", "/v1/cmd/room.click", body, headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    conn.close()


def ws_ops(port: int, n: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/v1/ws", subprotocols=["rtcore.v1.json"]) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"t": "hello", "v": 1, "token": "ada"}))
        assert json.loads(ws.recv())["t"] == "welcome"
        for i in range(1, n + 1):
            ws.send(json.dumps({"t": "cmd", "id": i, "name": "room.click", "args": {"room": "bench"}}))
            while True:
                frame = json.loads(ws.recv())
                if frame.get("id") == i:
                    assert frame["t"] == "ok", frame
                    break


def measure(level: str, n_http: int, n_ws: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, port = start(level, log)
        try:
            http_ops(port, 50)  # warm-up (imports, first allocations)
            out: dict[str, Any] = {}
            for name, fn, n in (("http", http_ops, n_http), ("ws", ws_ops, n_ws)):
                before = cpu_seconds(proc.pid)
                t0 = time.perf_counter()
                fn(port, n)
                wall = time.perf_counter() - t0
                cpu = cpu_seconds(proc.pid) - before
                out[name] = {"ops": n, "cpu_us_per_op": cpu / n * 1e6, "wall_us_per_op": wall / n * 1e6}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        out["log_bytes"] = log.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 500 ops per workload")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    n_http = n_ws = 500 if args.quick else 3000
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {level: [] for level in LEVELS}
    for r in range(repeats):
        order = LEVELS[r % len(LEVELS) :] + LEVELS[: r % len(LEVELS)]  # rotate who goes first
        for level in order:
            runs[level].append(measure(level, n_http, n_ws))
            print(f"repeat {r + 1}/{repeats} {level}: {json.dumps(runs[level][-1])}", flush=True)
    load_after = os.getloadavg()
    summary: dict[str, Any] = {}
    for level in LEVELS:
        summary[level] = {}
        for w in ("http", "ws"):
            cpu = [run[w]["cpu_us_per_op"] for run in runs[level]]
            summary[level][w] = {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)}
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "repeats": repeats,
        "ops": {"http": n_http, "ws": n_ws},
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "log-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Log overhead ({result['when']})",
        "",
        f"`python benchmarks/log_overhead.py{' --quick' if args.quick else ''}`: server CPU µs per operation, "
        f"median (min-max) of {repeats} run(s), {n_http} ops per workload; Python {result['python']}, "
        f"{result['cpus']} CPUs, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after "
        "(shared machine: compare the rows of one run).",
        "",
        "| --log-level | HTTP command (access line at info) | WebSocket command (command line at debug) |",
        "|---|---|---|",
    ]
    for level in LEVELS:
        cells = [f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})" for s in (summary[level]["http"], summary[level]["ws"])]
        lines.append(f"| {level} | {cells[0]} | {cells[1]} |")
    (RESULTS / "log-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Connect rate and per-phase latency of connect + upgrade, ``hello`` and ``sub``, from one client process.

``python benchmarks/ab/connlatency.py [--total 6000] [--in-flight 16] [--reps 2] [--servers rtcore/asyncio,peer,rtcore/uvloop]``

One load-client process (uvloop when installed) opens ``--total``
connections with ``--in-flight`` of them being set up at a time and keeps
them open; each one times its three phases: TCP connect + upgrade (until
the 101), ``hello`` → ``welcome`` and ``sub`` → ``subbed`` (one shared
stream). Per server: the rate, the server's CPU per connection (from /proc)
and the p50/p90 of each phase. Servers start fresh per repetition, in an
order rotated each repetition. It exists to separate latency from cost when
the connect rate and the server CPU per connect disagree (`benchmarks/run.py`'s
`conns` workload spreads the connects over several client processes that
share the two cores with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

from _harness import Conn, cpu_seconds, load_average, now, raise_nofile, run_client, start, write_results


async def _open_all(port: int, pid: int, total: int, in_flight: int) -> dict[str, Any]:
    phases: list[tuple[float, float, float]] = []
    conns: list[Conn] = []
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with gate:
            t0 = now()
            c = await Conn.open(port)
            t1 = now()
            await c.hello(f"u{i}")
            t2 = now()
            await c.subscribe("room:latency")
            t3 = now()
            phases.append((t1 - t0, t2 - t1, t3 - t2))
            conns.append(c)

    cpu0, t0 = cpu_seconds(pid), now()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed, cpu = now() - t0, cpu_seconds(pid) - cpu0
    for c in conns:
        c.close()
    result: dict[str, Any] = {"rate": total / elapsed, "server_cpu_us": cpu / total * 1e6}
    for name, column in zip(("open", "hello", "sub"), zip(*phases, strict=True), strict=True):
        ordered = sorted(column)
        result[f"{name}_p50_us"] = statistics.median(ordered) * 1e6
        result[f"{name}_p90_us"] = ordered[int(0.9 * (len(ordered) - 1))] * 1e6
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=6000)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--servers", default="rtcore/asyncio,peer,rtcore/uvloop")
    ap.add_argument("--name", default="connlatency")
    args = ap.parse_args()
    raise_nofile()
    labels = args.servers.split(",")
    load_before = load_average()
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for label in labels[rep % len(labels):] + labels[: rep % len(labels)]:
            server = start(label)
            try:
                result = run_client(_open_all(server.port, server.pid, args.total, args.in_flight))
            finally:
                server.stop()
            result.update(server=label, rep=rep + 1)
            runs.append(result)
            print(
                f"{label:15} {result['rate']:7.0f}/s  server CPU {result['server_cpu_us']:5.0f} µs  "
                + "  ".join(f"{p} p50 {result[p + '_p50_us']:5.0f} p90 {result[p + '_p90_us']:5.0f} µs" for p in ("open", "hello", "sub")),
                flush=True,
            )
    summary = {
        label: {key: [r[key] for r in runs if r["server"] == label] for key in ("rate", "server_cpu_us", "open_p50_us", "hello_p50_us", "sub_p50_us")}
        for label in labels
    }
    write_results(args.name, {"args": vars(args), "load_before": load_before, "load_after": load_average(), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()

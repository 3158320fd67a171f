"""CPU of the resume path in one process: ``Node.subscribe`` with ``since`` then ``Tail.fill``, no sockets.

``python benchmarks/resume_inproc.py [--resumes 2000] [--burst 20] [--reps 5] [--peer SRC] [--out FILE]``

A ``sqlite://`` file with ``resumes / 100`` streams of 4 events; a new node
on it (as after a restart); ``resumes`` subscribers resume from offset 2
(100 per stream, ``burst`` of them started per event-loop step) into a sink
that encodes what it gets. Reported: process CPU (all threads, so the SQLite
worker's too) per resume, on asyncio, uvloop and trio. With ``--peer SRC``
the same runs on the rtcore tree at SRC (``PYTHONPATH``), alternating which
side goes first, for a before/after in one run. The connection layer
(handshake, frames, socket writes) is left out: ``run.py --only storm``
measures the whole server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(resumes: int, burst: int, loop: str) -> dict[str, float]:
    import anyio
    import anyio.lowlevel

    import rtcore
    from rtcore.engine.node import Node
    from rtcore.protocol.frames import Position

    got = 0

    class Sink:
        def __init__(self, spawn: Any) -> None:
            self.spawn = spawn

        def live(self, stream: str, batch: list[Any]) -> None:
            nonlocal got
            got += len(batch)

        async def backlog(self, stream: str, batch: list[Any]) -> None:
            nonlocal got
            for enc in batch:
                enc.encoded("json")
            got += len(batch)

        def sync(self, *args: Any) -> None:
            pass

        def stale(self, stream: str) -> None:
            raise AssertionError("stale")

    async def main() -> dict[str, float]:
        url = f"sqlite:///{tempfile.mkdtemp()}/resume.db"
        app = rtcore.App("resume")
        nstreams = max(1, resumes // 100)
        epochs = {}
        async with Node(app, url) as node:
            for j in range(nstreams):
                for k in range(4):
                    epochs[j] = (await node.publish(f"s:{j}", "t", {"k": k, "pad": "x" * 40})).epoch
        async with Node(app, url) as node, anyio.create_task_group() as tg:

            async def one(i: int) -> None:
                sub = await node.subscribe(None, f"s:{i % nstreams}", Position(epochs[i % nstreams], 2), Sink(tg.start_soon))
                assert sub.recovered
                await sub.tail.fill()

            t0, w0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as inner:
                for i in range(0, resumes, burst):
                    for k in range(i, min(resumes, i + burst)):
                        inner.start_soon(one, k)
                    await anyio.lowlevel.checkpoint()
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            reads = node.hub.reads.issued if node.hub.reads is not None else -1
            tg.cancel_scope.cancel()
        assert got == 2 * resumes, got
        # Backend reads the hub issued for all the resumes (-1: a tree without SharedReads).
        return {"cpu_us": cpu / resumes * 1e6, "wall_s": wall, "reads": reads, "rtcore": str(Path(rtcore.__file__).parent)}

    if loop == "trio":
        return anyio.run(main, backend="trio")
    return anyio.run(main, backend_options={"use_uvloop": loop == "uvloop"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resumes", type=int, default=2000)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--loops", default="asyncio,uvloop,trio")
    ap.add_argument("--peer", help="another rtcore source tree (its src directory)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts.resumes, opts.burst, opts.child)))
        return
    sides = [("this", None)] + ([("peer", opts.peer)] if opts.peer else [])
    runs: list[dict[str, Any]] = []
    load_start = list(os.getloadavg())
    for rep in range(opts.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for loop in opts.loops.split(","):
            for side, src in order:
                env = dict(os.environ)
                if src:
                    env["PYTHONPATH"] = src
                cmd = [sys.executable, __file__, "--child", loop, "--resumes", str(opts.resumes), "--burst", str(opts.burst)]
                load = os.getloadavg()[0]
                out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                runs.append({"side": side, "loop": loop, "rep": rep, "load": load, **out})
                print(f"rep {rep + 1} {loop:7} {side:4}: {out['cpu_us']:7.1f} us CPU per resume, {out.get('reads', -1)} backend reads  (load {load:.2f})", flush=True)
    summary = {}
    for loop in opts.loops.split(","):
        for side, _ in sides:
            xs = [r["cpu_us"] for r in runs if r["loop"] == loop and r["side"] == side]
            summary[f"{loop}/{side}"] = {"median_cpu_us": statistics.median(xs), "min": min(xs), "max": max(xs)}
    for k, v in summary.items():
        print(f"{k:14} {v['median_cpu_us']:7.1f} us ({v['min']:.1f}-{v['max']:.1f})")
    if opts.out:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/resume_inproc.py " + " ".join(sys.argv[1:]),
            "load_start": load_start,
            "load_end": list(os.getloadavg()),
            "runs": runs,
            "summary": summary,
        }
        opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

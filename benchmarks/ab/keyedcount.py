"""Instructions (or CPU) per keyed command through ``Node.dispatch``, for a fixed number of commands.

``python benchmarks/ab/keyedcount.py URL [--tasks 50] [--commands 2000] [--tree NAME=SRC ...]``
runs ``--commands`` keyed ``pub`` commands (idempotency key + one append, as
``keyed.py``) from ``--tasks`` tasks in one process, after a warm-up of a
tenth as many, once per tree. With ``--callgrind`` (valgrind installed) each
run is under ``valgrind --tool=callgrind`` with instrumentation switched on
only around the measured commands, and the result is user-space instructions
per command: a count that does not move with the load of a shared machine
(the kernel's share, fsyncs and socket writes, is not in it). Without it, the
process's CPU time per command. ``--nokey`` runs the same commands without a
key (the idempotency layer's share is the difference).

Example (the keyed2 A/B)::

    python benchmarks/ab/keyedcount.py sqlite:///tmp/kc.db --callgrind --reps 3 \\
        --tree main=/work/wt/base/src --tree after=src

``--out FILE`` also writes every repetition (and the load average) as JSON.
"""

# No "from __future__ import annotations": the app defined in child() needs its
# annotations evaluated where the local classes are visible.

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def child(url: str, tasks: int, total: int, nokey: bool) -> None:
    import anyio
    import anyio.lowlevel
    import msgspec

    import rtcore

    app = rtcore.App("keyed-count")

    class Pub(msgspec.Struct):
        stream: str
        data: Any = None

    @app.command("pub")
    async def pub(ctx: rtcore.Context, args: Pub) -> int:
        event = await ctx.publish(args.stream, "bench", args.data)
        return event.offset

    callgrind = bool(os.environ.get("KC_CALLGRIND"))

    async def main() -> float:
        run = os.urandom(4).hex()
        async with rtcore.Node(app, url) as node:
            principal = rtcore.Principal("bench")

            async def worker(i: int, box: list[Any]) -> None:
                n = 0
                while box[0] > 0:
                    box[0] -= 1
                    await anyio.lowlevel.checkpoint()
                    n += 1
                    raw = msgspec.Raw(b'{"stream":"k:%d","data":{"n":%d}}' % (i, n))
                    key = None if nokey else f"{run}-{i}-{n}-{box[1]}"
                    reply = await node.dispatch(principal, "pub", raw, key=key)
                    assert reply.ok, reply

            async def batch(count: int, tag: str) -> None:
                box: list[Any] = [count, tag]
                async with anyio.create_task_group() as tg:
                    for i in range(tasks):
                        tg.start_soon(worker, i, box)

            await batch(max(total // 10, tasks), "w")
            if callgrind:
                # Blocking on purpose: nothing of the node may run while the switch is flipped.
                subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True)  # noqa: ASYNC221
            cpu0 = time.process_time()
            await batch(total, "m")
            cpu = time.process_time() - cpu0
            if callgrind:
                subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True)  # noqa: ASYNC221
        return cpu

    cpu = anyio.run(main)
    print(f"RESULT {cpu / total * 1e6:.1f}", flush=True)


def one(url: str, tree: str | None, args: argparse.Namespace) -> float:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    cmd = [sys.executable, str(HERE), "--child", url, str(args.tasks), str(args.commands), "1" if args.nokey else "0"]
    with tempfile.TemporaryDirectory() as tmp:
        if url.startswith("sqlite:///"):  # a fresh file per run
            url = f"sqlite:///{tmp}/kc.db"
            cmd[3] = url
        out = f"{tmp}/cg.out"
        if args.callgrind:
            env["KC_CALLGRIND"] = "1"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        if not args.callgrind:
            return float(proc.stdout.split("RESULT", 1)[1])
        ann = subprocess.run(["callgrind_annotate", out], capture_output=True, text=True, check=True).stdout
        match = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", ann)
        assert match is not None, ann[:500]
        return int(match.group(1).replace(",", "")) / args.commands


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        url, tasks, total, nokey = sys.argv[2:6]
        child(url, int(tasks), int(total), nokey == "1")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--commands", type=int, default=2000)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--tree", action="append", default=[], help="NAME=path/to/src (repeatable)")
    p.add_argument("--callgrind", action="store_true")
    p.add_argument("--nokey", action="store_true")
    p.add_argument("--out", default=None, help="also write every repetition as JSON here")
    args = p.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this", None)]
    unit = "instructions" if args.callgrind else "CPU us"
    runs: list[dict[str, Any]] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for rep in range(args.reps):
        for name, tree in trees if rep % 2 == 0 else list(reversed(trees)):
            value = one(args.url, tree, args)
            runs.append({"rep": rep, "tree": name, "src": tree, "value": value})
            print(f"rep {rep} {name:10} {args.url.split(':')[0]:7} {value:12,.1f} {unit} per command", flush=True)
    if args.out:
        result = {
            "args": vars(args),
            "unit": f"{unit} per command",
            "load_before": load_before,
            "load_after": Path("/proc/loadavg").read_text().split()[:3],
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()

"""Where the memory of the open connections went: a tracemalloc snapshot diff.

``python benchmarks/ab/memdiff.py BEFORE AFTER [--n 25] [--by traceback|lineno] [--conns N]``

BEFORE and AFTER are the snapshots ``AB_TRACEMALLOC=<prefix>`` makes
``benchmarks/ab/server.py`` dump (``<prefix>-1`` before the first connection,
``<prefix>-2`` after the last). Prints the top differences, grouped by
allocation site (``lineno``) or by whole traceback, with bytes per connection
when ``--conns`` is given.
"""

from __future__ import annotations

import argparse
import tracemalloc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--by", default="lineno", choices=["lineno", "traceback", "filename"])
    ap.add_argument("--conns", type=int, default=0)
    ap.add_argument("--frames", type=int, default=4, help="frames shown per traceback")
    args = ap.parse_args()
    old = tracemalloc.Snapshot.load(args.before)
    new = tracemalloc.Snapshot.load(args.after)
    stats = new.compare_to(old, args.by)
    total = sum(s.size_diff for s in stats)
    per = f" = {total / args.conns:.0f} B/conn" if args.conns else ""
    print(f"total {total / 1e6:.2f} MB{per}")
    for s in stats[: args.n]:
        per = f" {s.size_diff / args.conns:7.0f} B/conn {s.count_diff / args.conns:5.2f} blocks/conn" if args.conns else ""
        print(f"{s.size_diff / 1e3:9.1f} kB {s.count_diff:7d} blocks{per}")
        frames = s.traceback.format()
        if args.by == "traceback":
            # innermost last in format(): show the innermost frames
            frames = frames[-2 * args.frames :]
        for line in frames:
            print("      " + line.strip())


if __name__ == "__main__":
    main()

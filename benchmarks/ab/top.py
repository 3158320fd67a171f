"""Top entries of a py-spy raw (collapsed-stack) profile, as text.

``python benchmarks/ab/top.py PROFILE.txt [--n 25] [--self]``: for each
function, the share of samples in which it is on the stack (inclusive) or,
with ``--self``, at the top of the stack.
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--self", action="store_true", dest="self_only")
    args = ap.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            k = int(n)
            total += k
            frames = [re.sub(r" \(.*/(site-packages|src)/", " (", fr) for fr in stack.split(";")]
            if args.self_only:
                counts[frames[-1]] += k
            else:
                for fr in set(frames):
                    counts[fr] += k
    print(f"{total} samples; {'self' if args.self_only else 'inclusive'}")
    for fr, k in counts.most_common(args.n):
        print(f"{100 * k / total:5.1f}%  {fr}")


if __name__ == "__main__":
    main()

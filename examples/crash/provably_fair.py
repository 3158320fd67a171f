"""Provably fair crash points: a hash chain, the crash formula and its verifier.

Standard library only, so a player can run it without installing rtcore.

**The chain.** Before the first round the server picks a secret and builds
``N`` seeds by hashing backwards: ``seed[N] = SHA-256("crash-chain:" + secret)``
and ``seed[k] = SHA-256(seed[k + 1])`` down to ``seed[1]``. It publishes the
**commitment** ``SHA-256(seed[1])`` (in the room state from the first round
on) and plays round ``k`` with ``seed[k]``, revealing it when the round ends.
Since ``SHA-256(seed[k]) == seed[k - 1]`` (and ``seed[0]`` is the
commitment), every revealed seed is tied to the commitment published before
any bet: the server cannot choose a seed after seeing the bets, and nobody
can compute a future seed from past ones.

**The crash point** of a round, in hundredths (``235`` means 2.35x)::

    h = first 52 bits of HMAC-SHA256(key = seed bytes, message = salt)   # salt: published, "rtcore-crash"
    crash = min(MAX, max(100, (99 * 2**52) // (2**52 - h)))              # MAX = 100000 (1000x)

so ``P(crash >= m) = 0.99 / m`` for ``1 <= m <= 1000`` (a 1 % house edge),
and about 2 % of rounds crash at 1.00x.

Verify rounds from the command line::

    python examples/crash/provably_fair.py verify --commitment C --round 17 --seed S [--crash 2.35]
    python examples/crash/provably_fair.py verify --history history.json   # [{"round", "seed", "crash"}...] + commitment
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

SALT = "rtcore-crash"
E = 2**52
#: The highest crash point (x100): 1000x.
MAX_CRASH = 100_000


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crash_point(seed: str, salt: str = SALT) -> int:
    """The crash point of the round played with ``seed`` (hex), in hundredths."""
    digest = hmac.new(bytes.fromhex(seed), salt.encode(), hashlib.sha256).hexdigest()
    h = int(digest[:13], 16)
    return min(MAX_CRASH, max(100, (99 * E) // (E - h)))


class Chain:
    """The server's secret chain of ``length`` seeds (round ``k`` uses ``seed(k)``).

    Args:
        secret: The server's secret (kept private; the seeds derive from it).
        length: How many rounds the chain covers.
    """

    def __init__(self, secret: bytes, length: int) -> None:
        if length < 1:
            raise ValueError("the chain needs at least one seed")
        self.length = length
        seeds = [""] * (length + 1)
        h = hashlib.sha256(b"crash-chain:" + secret).digest()
        for k in range(length, 0, -1):
            seeds[k] = h.hex()
            h = hashlib.sha256(h).digest()
        seeds[0] = h.hex()
        self._seeds = seeds

    @property
    def commitment(self) -> str:
        """``SHA-256(seed(1))``: published before the first round."""
        return self._seeds[0]

    def seed(self, round_no: int) -> str:
        """The seed of round ``round_no`` (1..length); secret until the round ends."""
        if not 1 <= round_no <= self.length:
            raise ValueError(f"round {round_no} is outside the chain (1..{self.length})")
        return self._seeds[round_no]


def chain_ok(commitment: str, round_no: int, seed: str) -> bool:
    """Whether hashing ``seed`` ``round_no`` times gives ``commitment``."""
    try:
        h = bytes.fromhex(seed)
    except ValueError:
        return False
    for _ in range(round_no):
        h = hashlib.sha256(h).digest()
    return h.hex() == commitment


def verify_round(commitment: str, round_no: int, seed: str, crash: int | None = None, salt: str = SALT) -> list[str]:
    """Problems with one revealed round (empty: it verifies).

    Checks that the seed belongs to the chain published as ``commitment`` at
    position ``round_no`` and, if given, that ``crash`` is the crash point the
    formula gives for it.
    """
    problems = []
    if not chain_ok(commitment, round_no, seed):
        problems.append(f"round {round_no}: seed {seed[:12]}... does not hash to the commitment in {round_no} steps")
    elif crash is not None and crash_point(seed, salt) != crash:
        problems.append(f"round {round_no}: crash {crash / 100:.2f}x, but the seed gives {crash_point(seed, salt) / 100:.2f}x")
    return problems


def verify_history(commitment: str, rounds: Iterable[Mapping[str, Any]], salt: str = SALT) -> list[str]:
    """Problems with a list of revealed rounds ``{"round", "seed", "crash"}`` (empty: all verify).

    Consecutive rounds are also checked against each other
    (``SHA-256(seed[k]) == seed[k - 1]``), which is what a player watching
    round after round checks in one hash.
    """
    problems: list[str] = []
    by_round = {int(r["round"]): r for r in rounds}
    for k in sorted(by_round):
        r = by_round[k]
        prev = by_round.get(k - 1)
        if prev is not None and sha256_hex(bytes.fromhex(str(r["seed"]))) != prev["seed"]:
            problems.append(f"round {k}: SHA-256(seed) is not round {k - 1}'s seed")
            continue
        problems += verify_round(commitment, k, str(r["seed"]), r.get("crash"), salt)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify crash rounds against the published commitment.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check revealed seeds and crash points")
    v.add_argument("--commitment", help="the published commitment (hex)")
    v.add_argument("--round", type=int, help="the round number")
    v.add_argument("--seed", help="the round's revealed seed (hex)")
    v.add_argument("--crash", type=float, help="the crash point shown, e.g. 2.35")
    v.add_argument("--history", help='a JSON file: {"commitment", "salt", "history": [{"round", "seed", "crash"}]} (the room state)')
    args = parser.parse_args(argv)
    if args.history:
        with open(args.history) as f:
            doc = json.load(f)
        doc = doc.get("state", doc)
        rounds = [r for r in doc["history"] if r.get("seed")]
        problems = verify_history(doc["commitment"], rounds, doc.get("salt", SALT))
        checked = len(rounds)
    else:
        if not (args.commitment and args.round and args.seed):
            parser.error("give --history, or --commitment, --round and --seed")
        crash = None if args.crash is None else round(args.crash * 100)
        problems = verify_round(args.commitment, args.round, args.seed, crash)
        checked = 1
        if not problems:
            print(f"round {args.round}: crash point {crash_point(args.seed) / 100:.2f}x")
    for p in problems:
        print("FAIL", p)
    if problems:
        return 1
    print(f"OK: {checked} round(s) verify against commitment")
    return 0


if __name__ == "__main__":
    sys.exit(main())

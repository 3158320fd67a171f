"""Crash bots: players that bet every round and check the game's promises.

    python examples/crash/bot.py --url ws://127.0.0.1:8000/v1/ws --bots 5 --rounds 10

Each bot joins the crash room, bets a random amount in every betting phase
(half of them with an automatic cash-out target, half cashing out by hand
when the multiplier passes theirs), and after each round:

* **verifies fairness**: the revealed seed hashes to the published
  commitment (and to the previous round's seed), and the crash point is what
  the formula in ``provably_fair.py`` gives for it;
* **keeps its own books**: stake lost, profit won, or refunded.

At the end it checks that the wallet agrees with its books, and that the
last live ``balance_changed`` event it received on ``wallet:player:{me}``
shows the same balance the ``wallet.balance`` command answers.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

import rtcore.client
from rtcore.errors import RtcoreError

sys.path.insert(0, str(Path(__file__).parent))
from provably_fair import sha256_hex, verify_round

MIN_BET = 1_00


Predicate = Callable[[dict[str, Any]], bool]


def betting_after(last: int) -> Predicate:
    """The room state shows a betting phase of a round after ``last``."""
    return lambda s: s["status"] == "betting" and s["round"] > last


def cash_out_moment(r: int, target: int) -> Predicate:
    """Round ``r`` reached ``target`` (hundredths), or is no longer running."""
    return lambda s: s["round"] != r or s["status"] != "running" or s["multiplier"] >= target


def settled(r: int) -> Predicate:
    """Round ``r`` is settled (or a later one began)."""
    return lambda s: s["round"] > r or (s["round"] == r and s["settled"])


@dataclass
class Result:
    """What one bot saw."""

    name: str
    rounds: int = 0
    bets: int = 0
    won: int = 0
    lost: int = 0
    refunded: int = 0
    verified: int = 0
    problems: list[str] = field(default_factory=list)
    balance: int = 0  # the wallet's, at the end
    books: int = 0  # what the bot's own books say
    live: int | None = None  # the last balance_changed seen live
    refused: dict[str, int] = field(default_factory=dict)


async def bot(url: str, name: str, rounds: int, rng: random.Random, *, check_books: bool = True, patience: float = 120.0) -> Result:
    res = Result(name)
    acct = f"player:{name}"
    async with rtcore.client.connect(url, token=name) as client:
        room = await client.join_or_create("crash", timeout=patience)
        wallet = await client.subscribe(f"wallet:{acct}")

        changed = [anyio.Event()]  # set (and replaced) whenever a live balance arrives

        async def follow_balance() -> None:
            async for item in wallet:
                data = getattr(item, "data", None)
                if isinstance(data, dict) and "available" in data:
                    res.live = data["available"] + data["held"]
                    event, changed[0] = changed[0], anyio.Event()
                    event.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_balance)
            # The welcome transfer happened in our join's step: books start from it.
            bal = await client.command("wallet.balance", {"account": acct}, timeout=patience)
            res.books = bal["available"] + bal["held"]
            last_round, prev_seed = 0, None
            while res.rounds < rounds:
                s = await room.wait_for(betting_after(last_round), timeout=patience)
                r = s["round"]
                last_round = r
                amount, auto = rng.randrange(MIN_BET, 20_00), 0
                manual = rng.randrange(110, 400)
                if rng.random() < 0.5:
                    auto, manual = rng.randrange(105, 400), 0
                try:
                    bal = await client.command("wallet.balance", {"account": acct}, timeout=patience)
                    if bal["available"] < amount:
                        added = await room.send("topup", timeout=patience) - bal["available"]
                        res.books += added
                    await room.send("bet", {"amount": amount, "auto": auto}, timeout=patience)
                    res.bets += 1
                except RtcoreError as exc:  # betting_closed (slow, or a restart cancelled the round), ...
                    res.refused[exc.code] = res.refused.get(exc.code, 0) + 1
                if manual:
                    s = await room.wait_for(cash_out_moment(r, manual), timeout=patience)
                    if s["round"] == r and s["status"] == "running":
                        try:
                            await room.send("cashout", timeout=patience)
                        except RtcoreError as exc:  # crashed meanwhile
                            res.refused[exc.code] = res.refused.get(exc.code, 0) + 1
                s = await room.wait_for(settled(r), timeout=patience)
                if s["round"] == r:
                    bet = s["bets"].get(name)
                    if bet is not None:
                        if bet["result"] == "won":
                            res.won += 1
                            res.books += bet["payout"] - bet["amount"]
                        elif bet["result"] == "lost":
                            res.lost += 1
                            res.books -= bet["amount"]
                        else:
                            res.refunded += 1
                    res.problems += verify_round(s["commitment"], r, s["seed"], s["crash"], s["salt"])
                    if prev_seed is not None and prev_seed[0] == r - 1 and sha256_hex(bytes.fromhex(s["seed"])) != prev_seed[1]:
                        res.problems.append(f"round {r}: SHA-256(seed) is not round {r - 1}'s seed")
                    prev_seed = (r, s["seed"])
                    res.verified += 1
                else:
                    check_books = False  # a round went by unseen (we were reconnecting): no books for it
                res.rounds += 1
            bal = await client.command("wallet.balance", {"account": acct}, timeout=patience)
            res.balance = bal["available"] + bal["held"]
            if check_books and res.balance != res.books:
                res.problems.append(f"wallet says {res.balance}, my books say {res.books}")
            with anyio.fail_after(5):  # the live stream catches up with the ledger
                while res.live != res.balance:
                    await changed[0].wait()
            tg.cancel_scope.cancel()
        await room.leave()
    return res


async def run_bots(url: str, bots: int, rounds: int, *, seed: int | None = None, prefix: str = "bot", **options: Any) -> list[Result]:
    """Run ``bots`` bots for ``rounds`` rounds each; return what each saw."""
    rng = random.Random(seed)
    tag = secrets.token_hex(3)
    results: list[Result] = []

    async def one(i: int) -> None:
        results.append(await bot(url, f"{prefix}{i}-{tag}", rounds, random.Random(rng.random()), **options))

    async with anyio.create_task_group() as tg:
        for i in range(bots):
            tg.start_soon(one, i)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws")
    parser.add_argument("--bots", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results = await run_bots(args.url, args.bots, args.rounds, seed=args.seed)
    elapsed = time.perf_counter() - started
    print(f"{len(results)} bots x {args.rounds} rounds in {elapsed:.1f} s")
    print(f"bets {sum(r.bets for r in results)}: won {sum(r.won for r in results)}, lost {sum(r.lost for r in results)}, refunded {sum(r.refunded for r in results)}")
    print(f"rounds verified (seed -> commitment, crash point): {sum(r.verified for r in results)}")
    problems = [p for r in results for p in r.problems]
    for p in problems:
        print("PROBLEM", p)
    print("all books agree with the wallet" if not problems else f"{len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    anyio.run(main)

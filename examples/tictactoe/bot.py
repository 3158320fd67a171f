"""Tic-tac-toe bots: pairs of random players on a running server.

    python examples/tictactoe/bot.py --url ws://127.0.0.1:8000/v1/ws --games 100

Each pair meets through matchmaking (``room.join_or_create`` with a metadata
tag only the pair uses), plays ``--games`` games in total across the pairs
(rematches in the same room), checks every finished game and prints the
results. The bots hold the board with no game code: ``room.state`` of
:mod:`rtcore.client` follows the server's state by folding the room's generic
patches.
"""

from __future__ import annotations

import argparse
import random
import secrets
import time
from typing import Any

import anyio

import rtcore.client
from rtcore.errors import RtcoreError

LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def check(game: dict[str, Any]) -> None:
    """Raise if a finished game is not a legal tic-tac-toe game."""
    moves, cells = game["moves"], game["cells"]
    assert len(set(moves)) == len(moves), f"a cell was played twice: {moves}"
    assert sum(1 for c in cells if c) == len(moves), f"board {cells} does not match moves {moves}"
    if game["reason"] == "line":
        assert any(cells[a] and cells[a] == cells[b] == cells[c] for a, b, c in LINES), f"no line on {cells}"
    if game["reason"] == "draw":
        assert all(cells) and len(moves) == 9


async def bot(url: str, name: str, tag: str, games: int, results: list[dict[str, Any]], rng: random.Random) -> None:
    async with rtcore.client.connect(url, token=name) as client:
        room = await client.join_or_create("tictactoe", metadata={"pair": tag})
        moved_at, played = -1, 0

        def my_move(s: dict[str, Any]) -> bool:
            return s["status"] == "playing" and s["turn"] == name and moved_at != len(s["moves"])

        def game_over(s: dict[str, Any]) -> bool:
            return s["status"] == "over" and s["games"] > played

        while True:
            # room.state follows the server's (the client folds the room's patches).
            s = await room.wait_for(lambda s: my_move(s) or game_over(s), timeout=300)
            if my_move(s):
                moved_at = len(s["moves"])
                cell = rng.choice([i for i, c in enumerate(s["cells"]) if not c])
                try:
                    await room.send("move", {"cell": cell})
                except RtcoreError as exc:  # e.g. the turn clock ran out meanwhile
                    print(f"{name}: move refused: {exc.code}")
                continue
            played = s["games"]
            check(s)
            if name == s["players"][0]:
                results.append({"winner": s["winner"], "reason": s["reason"], "moves": len(s["moves"]), "x": s["players"][0]})
            if played >= games:
                break
            await room.send("rematch")
        await room.leave()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws")
    parser.add_argument("--games", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=10, help="games played at once")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    run = secrets.token_hex(3)
    pairs = max(1, min(args.pairs, args.games))
    per_pair = [args.games // pairs + (1 if i < args.games % pairs else 0) for i in range(pairs)]
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, n in enumerate(per_pair):
            tag = f"{run}-{i}"
            for side in "ab":
                tg.start_soon(bot, args.url, f"bot{i}{side}-{run}", tag, n, results, random.Random(rng.random()))
    elapsed = time.perf_counter() - started
    x_wins = sum(1 for r in results if r["winner"] == r["x"])
    o_wins = sum(1 for r in results if r["winner"] and r["winner"] != r["x"])
    draws = sum(1 for r in results if not r["winner"])
    moves = sum(r["moves"] for r in results)
    print(f"{len(results)} games in {elapsed:.2f} s ({len(results) / elapsed:.1f} games/s, {moves / elapsed:.0f} moves/s)")
    print(f"X (first seat) won {x_wins}, O won {o_wins}, draws {draws}; all games legal")
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    print("endings:", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


if __name__ == "__main__":
    anyio.run(main)

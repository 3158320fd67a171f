"""Arena bots: players that chase the nearest gem, with client-side prediction.

    python examples/arena/bot.py --url ws://127.0.0.1:8000/v1/ws --bots 10

Each bot joins the arena (``room.join_or_create``; ``--tag`` keeps a run's
bots in their own room), samples its "controls" 20 times a second, predicts
its own position at once and sends its steps in batches (``--input-hz``
batches a second). On every sample it reconciles with the server's state
(``players[me]`` position + its own unacknowledged steps, see ``app.py``) and
counts a **correction** whenever that differs from what it predicted. After
``--rounds`` finished rounds it waits until the server applied its last step,
checks that prediction and server agree exactly, leaves and reports.
"""

from __future__ import annotations

import argparse
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

import rtcore.client

# The same constants and step function as app.py: the bot runs on its own,
# and tests/examples/test_arena.py checks that both move alike.
WIDTH, HEIGHT = 1000, 700
STRAIGHT, DIAGONAL = 10, 7
RADIUS = 15
TICK = 1 / 20


def step(x: int, y: int, dx: int, dy: int) -> tuple[int, int]:
    """One step, exactly as the server's ``app.step``."""
    d = DIAGONAL if dx and dy else STRAIGHT
    return min(WIDTH - RADIUS, max(RADIUS, x + dx * d)), min(HEIGHT - RADIUS, max(RADIUS, y + dy * d))


def replay(x: int, y: int, steps: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Apply ``steps`` ``[seq, dx, dy]`` from ``(x, y)``: the reconciled position."""
    for _, dx, dy in steps:
        x, y = step(x, y, dx, dy)
    return x, y


def steer(x: int, y: int, gems: list[list[int]]) -> tuple[int, int]:
    """The direction (-1/0/1 per axis) towards the nearest gem."""
    if not gems:
        return 0, 0
    gx, gy = min(gems, key=lambda g: (g[0] - x) ** 2 + (g[1] - y) ** 2)
    ang = math.atan2(gy - y, gx - x)
    dx = 0 if abs(gx - x) < STRAIGHT // 2 else (1 if math.cos(ang) > 0.38 else -1 if math.cos(ang) < -0.38 else 0)
    dy = 0 if abs(gy - y) < STRAIGHT // 2 else (1 if math.sin(ang) > 0.38 else -1 if math.sin(ang) < -0.38 else 0)
    return dx, dy


@dataclass
class Result:
    """What one bot did."""

    name: str
    steps: int = 0
    batches: int = 0
    corrections: int = 0
    rounds: int = 0
    score: int = 0
    wins: int = 0
    ack_ms: list[float] = field(default_factory=list)  # batch sent -> its last step visible to this bot


async def bot(url: str, name: str, tag: str, rounds: int, input_hz: float, options: dict[str, Any], rng: random.Random) -> Result:
    res = Result(name)
    async with rtcore.client.connect(url, token=name) as client:
        room = await client.join_or_create("arena", options, metadata={"arena": tag})
        s = await room.wait_for(lambda s: name in s["players"])
        me = s["players"][name]
        x, y, seq = me["x"], me["y"], me["seq"]
        pending: list[tuple[int, int, int]] = []  # sent, not yet applied by the server
        batch: list[tuple[int, int, int]] = []
        sent_at: list[tuple[int, float]] = []  # (last seq of a batch, when it was sent)
        counted = s["round"] if s["status"] == "over" else 0
        every = max(1, round(1 / (TICK * input_hz)))
        next_at = time.monotonic()

        async def send(steps: list[tuple[int, int, int]]) -> None:
            try:
                await room.send("input", {"steps": steps})
            except rtcore.RtcoreError as exc:  # e.g. a reconnect outlived the timeout: reconciliation copes
                print(f"{name}: input refused: {exc.code}")

        async with anyio.create_task_group() as tg:
            tick = 0
            while res.rounds < rounds:
                next_at += TICK
                await anyio.sleep(max(0.0, next_at - time.monotonic()))
                s = room.state
                if s is None or name not in s["players"]:
                    continue  # resyncing (snapshot on its way)
                me = s["players"][name]
                # Reconcile: the server's position plus the steps it has not applied yet.
                pending = [p for p in pending if p[0] > me["seq"]]
                now = time.monotonic()
                while sent_at and sent_at[0][0] <= me["seq"]:
                    res.ack_ms.append((now - sent_at.pop(0)[1]) * 1000)
                rx, ry = replay(me["x"], me["y"], pending)
                if (rx, ry) != (x, y):
                    res.corrections += 1
                    x, y = rx, ry
                if s["status"] == "over" and s["round"] != counted:
                    counted = s["round"]
                    res.rounds += 1
                    res.score += s["players"][name]["score"]
                    res.wins += s["winner"] == name
                    continue
                if s["status"] == "playing":
                    dx, dy = steer(x, y, s["gems"])
                    if rng.random() < 0.05:  # a little noise, so bots do not stack up
                        dx, dy = rng.choice((-1, 0, 1)), rng.choice((-1, 0, 1))
                    if dx or dy:
                        seq += 1
                        x, y = step(x, y, dx, dy)  # predict: move now, not when the server says so
                        pending.append((seq, dx, dy))
                        batch.append((seq, dx, dy))
                        res.steps += 1
                tick += 1
                if batch and tick % every == 0:
                    sent_at.append((batch[-1][0], time.monotonic()))
                    tg.start_soon(send, batch)
                    res.batches += 1
                    batch = []
            if batch:
                sent_at.append((batch[-1][0], time.monotonic()))
                tg.start_soon(send, batch)
                res.batches += 1
        # Every step sent is applied (or was dropped): prediction and server agree exactly.
        final = await room.wait_for(lambda s: s["players"][name]["seq"] >= seq, timeout=30)
        me = final["players"][name]
        if (me["x"], me["y"]) != (x, y):
            raise AssertionError(f"{name}: predicted {(x, y)}, server says {(me['x'], me['y'])} at seq {me['seq']}")
        await room.leave()
    return res


async def run_bots(
    url: str, bots: int, *, rounds: int = 1, input_hz: float = 4.0, tag: str | None = None,
    options: dict[str, Any] | None = None, seed: int | None = None, prefix: str = "bot",
) -> list[Result]:
    """Run ``bots`` bots in one room until each saw ``rounds`` rounds end; return their results."""
    rng = random.Random(seed)
    tag = tag or secrets.token_hex(3)
    results: list[Result] = []

    async def one(i: int) -> None:
        results.append(await bot(url, f"{prefix}{i}-{tag}", tag, rounds, input_hz, options or {}, random.Random(rng.random())))

    async with anyio.create_task_group() as tg:
        for i in range(bots):
            tg.start_soon(one, i)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws")
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="rounds to play before leaving")
    parser.add_argument("--input-hz", type=float, default=4.0, help="input batches each bot sends per second")
    parser.add_argument("--tag", default="", help="room metadata tag (bots with one tag share a room; default: the room people see)")
    parser.add_argument("--target", type=int, default=None, help="gems to win, when the bots create the room")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    options = {} if args.target is None else {"target": args.target}
    started = time.perf_counter()
    results = await run_bots(args.url, args.bots, rounds=args.rounds, input_hz=args.input_hz, tag=args.tag or "public", options=options, seed=args.seed)
    elapsed = time.perf_counter() - started
    acks = sorted(ms for r in results for ms in r.ack_ms)
    steps = sum(r.steps for r in results)
    print(f"{len(results)} bots played {args.rounds} round(s) in {elapsed:.1f} s: {steps} steps in {sum(r.batches for r in results)} inputs")
    print(f"corrections (prediction != server + unacked steps): {sum(r.corrections for r in results)}")
    if acks:
        print(f"input sent -> applied and seen: p50 {acks[len(acks) // 2]:.0f} ms, p99 {acks[int(len(acks) * 0.99)]:.0f} ms")
    for r in sorted(results, key=lambda r: -r.wins)[:3]:
        print(f"  {r.name}: {r.wins} win(s), {r.score} gems")


if __name__ == "__main__":
    anyio.run(main)

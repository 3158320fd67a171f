"""Arena: a real-time game on rtcore rooms (20 Hz authoritative tick).

Players run around a 1000 x 700 field collecting gems; the first to
``target`` gems (default 20) wins the round, or the best score when the
round's time runs out (default 90 s). A new round starts 5 s later.

How movement works (the model every client follows, see README.md):

* A client samples its controls 20 times a second. Each sample with a
  direction is one **step** ``[seq, dx, dy]`` (``dx``, ``dy`` in -1, 0, 1) with
  a sequence number that increases by one per step; steps are sent in small
  batches with ``room.send("input", {"steps": [[seq, dx, dy], ...]})``.
* The server queues a player's steps and its **tick** (20 Hz, ``on_tick``)
  applies one per player (more when a client is behind), moves the avatar
  with :func:`step` (integers: the same result on every machine), picks up
  gems, and records the last applied step in ``players[id].seq``.
* A step whose ``seq`` is not above the last one the server saw is **ignored**
  (a late duplicate or a replayed batch never moves anyone twice), and a
  player may not send more than 20 steps a second plus a 1 s burst (a client
  that speeds up its clock gains nothing).
* The client predicts itself: it applies its own steps at once, and on every
  state it **reconciles**: ``position = server position + the steps it sent
  with seq > players[me].seq``, re-applied with the same :func:`step`. Others
  are drawn 100 ms in the past, interpolated between received positions.

Run it (one process, embedded backend; open http://127.0.0.1:8000 in tabs)::

    rtcore serve examples/arena/app.py:app --backend arena.db

and add bots::

    python examples/arena/bot.py --url ws://127.0.0.1:8000/v1/ws --bots 10
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec

import rtcore
from rtcore import rooms

WIDTH, HEIGHT = 1000, 700
#: Distance moved per step along an axis, and along each axis on a diagonal
#: (10 * 0.7: integers, so every client computes exactly what the server does).
STRAIGHT, DIAGONAL = 10, 7
#: An avatar's radius; a gem is picked up when an avatar's centre is this close.
RADIUS, PICKUP = 15, 22
GEMS = 24
TICK_RATE = 20
#: Steps a player may send per second, and the burst allowed on top.
STEPS_PER_SECOND, BURST = 20, 20
#: Steps one input message may carry, and steps queued per player at most.
MAX_BATCH, MAX_QUEUE = 20, 40
#: A player whose queue holds more than this is behind: the tick applies the excess at once.
LAG_STEPS = 4
ROUND_SECONDS, TARGET, BREAK_SECONDS = 90.0, 20, 5.0
COLORS = 12

app = rtcore.App("arena")
registry = rooms.install(app)
app.page("/", (Path(__file__).parent / "index.html").read_bytes())


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    # Demo only: the token is the player's name. Use signed tokens in production.
    return rtcore.Principal(token) if token else None


def step(x: int, y: int, dx: int, dy: int) -> tuple[int, int]:
    """Move one step from ``(x, y)`` in direction ``(dx, dy)``, kept inside the field.

    The page (``index.html``) and the bot (``bot.py``) carry the same function:
    prediction is exact only if every side moves alike.
    """
    d = DIAGONAL if dx and dy else STRAIGHT
    return min(WIDTH - RADIUS, max(RADIUS, x + dx * d)), min(HEIGHT - RADIUS, max(RADIUS, y + dy * d))


class Avatar(msgspec.Struct):
    x: int
    y: int
    color: int
    seq: int = 0  # the last step the server applied: the client reconciles from here
    score: int = 0


class Arena(msgspec.Struct):
    """The room's state, as every player sees it."""

    tick: int = 0
    round: int = 1
    status: str = "playing"  # playing | over
    ends_at: float = 0.0  # when the round's time runs out (Unix time)
    next_round_at: float = 0.0  # while over: when the next round starts
    target: int = TARGET
    round_seconds: float = ROUND_SECONDS
    winner: str = ""
    players: dict[str, Avatar] = {}
    gems: list[list[int]] = []
    wins: dict[str, int] = {}


class Input(msgspec.Struct):
    """Data of the ``input`` message: steps ``[seq, dx, dy]``, oldest first."""

    steps: list[tuple[int, int, int]]


@registry.define("arena")
class ArenaRoom(rooms.Room[Arena]):
    max_clients = 0
    tick_rate = TICK_RATE
    auto_dispose = 30.0

    def __init__(self) -> None:
        # Not part of the state (not sent, not restored by a new owner): queued
        # steps, the highest seq seen and each player's step budget. After a
        # change of owner the queues are empty and clients reconcile.
        self.queues: dict[str, list[tuple[int, int, int]]] = {}
        self.seen: dict[str, int] = {}
        self.budget: dict[str, tuple[float, float]] = {}
        self.rng = random.Random()

    async def on_create(self, options: dict[str, Any]) -> None:
        s = self.state
        s.target = int(options.get("target", TARGET))
        s.round_seconds = float(options.get("round_seconds", ROUND_SECONDS))
        if not (1 <= s.target <= 1000 and 1 <= s.round_seconds <= 3600):
            raise rtcore.Rejected("bad_options", "target must be 1..1000 and round_seconds 1..3600")
        s.gems = [self._gem() for _ in range(GEMS)]
        s.ends_at = self.clock.now + s.round_seconds
        self.clock.set_timeout(s.round_seconds, self._time_up, s.round)

    async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
        x, y = self.rng.randrange(RADIUS, WIDTH - RADIUS), self.rng.randrange(RADIUS, HEIGHT - RADIUS)
        self.state.players[player.id] = Avatar(x, y, color=len(self.state.players) % COLORS)

    async def on_leave(self, player: rooms.Player, consented: bool) -> None:
        self.state.players.pop(player.id, None)
        self.queues.pop(player.id, None)
        self.seen.pop(player.id, None)
        self.budget.pop(player.id, None)

    @rooms.message("input")
    async def input(self, player: rooms.Player, data: Input) -> dict[str, int]:
        """Queue steps for the next ticks; returns how many were accepted and ignored."""
        me = self.state.players.get(player.id)
        if me is None:
            raise rtcore.Rejected("not_playing", "join the arena first")
        if len(data.steps) > MAX_BATCH:
            raise rtcore.Rejected("too_many_steps", f"at most {MAX_BATCH} steps per input, got {len(data.steps)}")
        now = self.clock.now
        tokens, at = self.budget.get(player.id, (float(BURST), now))
        tokens = min(float(BURST + STEPS_PER_SECOND), tokens + (now - at) * STEPS_PER_SECOND)
        seen = max(self.seen.get(player.id, 0), me.seq)
        queue = self.queues.setdefault(player.id, [])
        accepted = 0
        for seq, dx, dy in data.steps:
            # The reconciliation rule: a step at or below the last seq seen is
            # ignored (a duplicate, a replay or a step overtaken by a later one).
            if seq <= seen or not (-1 <= dx <= 1 and -1 <= dy <= 1):
                continue
            seen = seq
            if tokens < 1 or len(queue) >= MAX_QUEUE:
                continue  # over budget: dropped; the client's reconciliation undoes it
            tokens -= 1
            queue.append((seq, dx, dy))
            accepted += 1
        self.seen[player.id] = seen
        self.budget[player.id] = (tokens, now)
        return {"accepted": accepted, "ignored": len(data.steps) - accepted}

    async def on_tick(self, dt: float) -> None:
        s = self.state
        s.tick += 1
        for pid, queue in self.queues.items():
            if not queue:
                continue
            me = s.players.get(pid)
            if me is None:
                continue
            take = max(1, len(queue) - LAG_STEPS)
            for seq, dx, dy in queue[:take]:
                me.x, me.y = step(me.x, me.y, dx, dy)
                me.seq = seq
                if s.status == "playing":
                    self._pickup(pid, me)
            del queue[:take]

    # --- rounds ---------------------------------------------------------------------

    def _pickup(self, pid: str, me: Avatar) -> None:
        s = self.state
        for i, (gx, gy) in enumerate(s.gems):
            if (gx - me.x) ** 2 + (gy - me.y) ** 2 <= PICKUP * PICKUP:
                me.score += 1
                s.gems[i] = self._gem()
                if me.score >= s.target:
                    self._finish(pid)
                    return

    def _time_up(self, round_no: int) -> None:
        s = self.state
        if s.status == "playing" and s.round == round_no:
            best = max(s.players.items(), key=lambda kv: kv[1].score, default=None)
            self._finish(best[0] if best and best[1].score > 0 else "")

    def _finish(self, winner: str) -> None:
        s = self.state
        s.status, s.winner = "over", winner
        if winner:
            s.wins[winner] = s.wins.get(winner, 0) + 1
        s.next_round_at = self.clock.now + BREAK_SECONDS
        self.clock.set_timeout(BREAK_SECONDS, self._next_round, s.round)

    def _next_round(self, round_no: int) -> None:
        s = self.state
        if s.status != "over" or s.round != round_no:
            return
        s.round += 1
        s.status, s.winner, s.next_round_at = "playing", "", 0.0
        for me in s.players.values():
            me.score = 0
        s.gems = [self._gem() for _ in range(GEMS)]
        s.ends_at = self.clock.now + s.round_seconds
        self.clock.set_timeout(s.round_seconds, self._time_up, s.round)

    def _gem(self) -> list[int]:
        margin = RADIUS * 2
        return [self.rng.randrange(margin, WIDTH - margin), self.rng.randrange(margin, HEIGHT - margin)]

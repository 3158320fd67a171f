"""Three ``rtcore serve`` processes on one Redis play 20 tic-tac-toe games; the
owners of most rooms are killed with ``kill -9`` mid-game, with moves in
flight; every game finishes with a legal, complete history.

Players are :mod:`rtcore.client` instances, each behind its own failover TCP
proxy (what a load balancer does), connected to different processes than
their opponents, so most moves are forwarded to the room's owner. The
servers run the shipped example (``examples/tictactoe/app.py``) through the
CLI with ``--idempotency-lease 2``: a move in flight on a killed process keeps
its idempotency key pending for that lease (60 s by default), after which the
client's retry with the same key runs on a live process.

``RTCORE_ROOMS_FAILOVER_GAMES`` sets the number of games (default 20) for a
longer soak.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from pathlib import Path
from typing import Any

import anyio
import pytest

import rtcore.client
from rtcore.protocol.frames import Position
from rtcore.protocol.patch import apply
from rtcore.rooms.runtime import LEASE
from tests.multinode.procs import APP, FailoverProxy, ServerProcess, private_redis, processes, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tictactoe" / "app.py"
GAMES = int(os.environ.get("RTCORE_ROOMS_FAILOVER_GAMES", "20"))
IDEMPOTENCY_LEASE = 2.0
#: The games must finish within this many seconds of the kill: the room lease
#: runs out, a live node adopts the room (on the next forwarded command or the
#: supervisor's round, itself under a lease of the same length), in-flight
#: commands wait out their idempotency lease, clients reconnect with backoff.
FINISH_WITHIN = 2 * LEASE + IDEMPOTENCY_LEASE + 5.0
LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


class TicTacToeProcess(ServerProcess):
    def _argv(self) -> list[str]:
        argv = super()._argv()
        argv[argv.index(APP)] = f"{EXAMPLE}:app"
        return [*argv, "--idempotency-lease", str(IDEMPOTENCY_LEASE)]


def replay_history(moves: list[int]) -> tuple[list[str], str]:
    """Play ``moves`` (X first) on an empty board; return the board and how it ended.

    Fails if a cell is played twice or a move follows the end of the game.
    """
    cells = [""] * 9
    ended = ""
    for i, cell in enumerate(moves):
        assert not ended, f"move {i} ({cell}) after the game ended ({ended}): {moves}"
        assert not cells[cell], f"cell {cell} played twice: {moves}"
        cells[cell] = "XO"[i % 2]
        if any(cells[a] and cells[a] == cells[b] == cells[c] for a, b, c in LINES):
            ended = "line"
        elif all(cells):
            ended = "draw"
    return cells, ended


class Player:
    def __init__(self, name: str, port: int, rng: random.Random) -> None:
        self.name = name
        self.url = f"ws://127.0.0.1:{port}/v1/ws"
        self.rng = rng
        self.acked: list[int] = []  # cells of the moves the server acknowledged
        self.final: dict[str, Any] | None = None
        self.moves_seen = 0
        self.busy = False  # a move command is in flight

    async def play(self, room: dict[str, Any], create: bool, joined: anyio.Event, killed: anyio.Event) -> None:
        async with rtcore.client.connect(self.url, token=self.name, backoff_base=0.05, backoff_max=0.5) as client:
            if create:
                created = await client.command("room.create", {"type": "tictactoe", "private": True}, timeout=60)
                assert "stream" in created, f"{self.name}: room.create answered {created}"
                room.update(created)
                joined.set()
            else:
                await joined.wait()
                await client.command("room.join", {"room_id": room["room_id"]}, timeout=60)
            sub = await client.subscribe(room["stream"], since=Position("", 0))
            doc: Any = None
            moved_at = -1
            async for item in sub:
                # A snapshot (a fresh subscriber's first item, or a resync) is a
                # state like any other: it may be this player's turn in it, and
                # no patch may follow until this player moves.
                if isinstance(item, rtcore.client.Missed):
                    if item.state is None:
                        continue
                    doc = copy.deepcopy(item.state)
                elif item.type == "patch":
                    doc = apply(doc, item.data["ops"])
                else:
                    continue
                s = doc["state"]
                self.moves_seen = len(s["moves"])
                if s["status"] == "over":
                    self.final = s
                    return
                if s["status"] == "playing" and s["turn"] == self.name and moved_at != len(s["moves"]):
                    moved_at = len(s["moves"])
                    if moved_at >= 4:
                        await killed.wait()  # no game may finish before the kill
                    # Paced and jittered, so moves are in flight when the owners die.
                    await anyio.sleep(self.rng.uniform(0.0, 0.2))
                    cell = self.rng.choice([i for i, c in enumerate(s["cells"]) if not c])
                    self.busy = True
                    await client.command(
                        "room.send", {"room_id": room["room_id"], "type": "move", "data": {"cell": cell}}, timeout=90
                    )
                    self.busy = False
                    self.acked.append(cell)


async def test_kill_minus_9_owners_mid_game(tmp_path: Path) -> None:
    """20 games on three processes; two of them (the owners of the rooms created
    through them) are killed with ``kill -9`` while games are at their 2nd-4th
    move, some moves in flight. Every game finishes on the survivor within the
    lease + reconnect time, with a legal, complete history (X and O
    alternate, no cell twice, no move after the end, the final board is the
    replay of the history), no move applied twice, every acknowledged move
    in the history, and both players holding the same final state.

    Mutation: skip takeover (``_Runtime._adopt`` returns None even when the
    room's lease is free) → forwarded moves wait forever on the dead owners →
    the games do not finish → fails.
    """
    rng = random.Random(9)
    with private_redis() as redis:
        servers = [TicTacToeProcess(redis.url, tmp_path, f"node{i}") for i in range(3)]
        async with processes(*servers) as procs:
            ports = [p.port for p in procs]
            async with contextlib.AsyncExitStack() as stack:
                proxies = []
                for i in range(3):
                    order = ports[i:] + ports[:i]
                    proxies.append(await stack.enter_async_context(FailoverProxy.running(order)))
                games: list[tuple[Player, Player, dict[str, Any]]] = []
                killed = anyio.Event()
                in_flight_at_kill = 0
                with anyio.fail_after(120):
                    async with anyio.create_task_group() as tg:
                        for g in range(GAMES):
                            # X creates the room on node g % 3 (its owner); O plays through the next node.
                            x = Player(f"x{g}", proxies[g % 3].port, random.Random(rng.random()))
                            o = Player(f"o{g}", proxies[(g + 1) % 3].port, random.Random(rng.random()))
                            room: dict[str, Any] = {}
                            joined = anyio.Event()
                            tg.start_soon(x.play, room, True, joined, killed)
                            tg.start_soon(o.play, room, False, joined, killed)
                            games.append((x, o, room))
                        await wait_until(
                            lambda: all(x.moves_seen >= 2 for x, _, _ in games),
                            timeout=60,
                            what="two moves in every game",
                        )
                        in_flight_at_kill = sum(p.busy for x, o, _ in games for p in (x, o))
                        procs[0].kill()  # kill -9: owners of the rooms created through proxies 0 and 1
                        procs[1].kill()
                        killed.set()
                        with anyio.fail_after(FINISH_WITHIN):
                            await wait_until(
                                lambda: all(x.final is not None and o.final is not None for x, o, _ in games),
                                timeout=FINISH_WITHIN + 1,
                                what="every game finished after the kill",
                                state=lambda: [(x.moves_seen, x.busy, o.busy) for x, o, _ in games],
                            )
                assert procs[2].alive, procs[2].log()
                print(f"{GAMES} games; {in_flight_at_kill} move commands in flight at the kill")
                for x, o, _room in games:
                    assert x.final is not None and o.final is not None
                    assert x.final == o.final
                    s = x.final
                    moves = s["moves"]
                    assert len(set(moves)) == len(moves), f"a move applied twice: {moves}"
                    cells, ended = replay_history(moves)
                    assert cells == s["cells"], f"board {s['cells']} is not the replay of {moves}"
                    assert ended == s["reason"], f"ended {s['reason']!r}, history says {ended!r}: {moves}"
                    assert sorted(x.acked + o.acked) == sorted(moves), "every acknowledged move is in the history"

"""Two-player tic-tac-toe on rtcore rooms.

Everything a game server needs is in the room class below: matchmaking
(``room.join_or_create``), seats (``max_clients = 2``), a 30 s turn clock, a
20 s reconnection grace after a drop (then the game is forfeited), and a
rematch. Handlers change ``self.state`` directly; rtcore runs them one at a
time and sends each change to both players as a small patch.

Run it on the embedded backend (state survives a restart)::

    rtcore serve examples/tictactoe/app.py:app --backend tictactoe.db

and play bots against each other::

    python examples/tictactoe/bot.py --url ws://127.0.0.1:8000/v1/ws --games 100

Client side (any language), see docs/rooms.md:

* ``cmd room.join_or_create {"type": "tictactoe"}`` → ``{"room_id", "stream", ...}``
* ``sub`` the ``stream`` with ``since {"epoch": "", "offset": 0}`` and fold the
  ``patch`` events (``rtcore.protocol.patch.apply``): the document's ``state``
  is the :class:`Board` below, ``members`` who is seated and connected.
* ``cmd room.send {"room_id", "type": "move", "data": {"cell": 4}}``
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec

import rtcore
from rtcore import rooms

TURN_SECONDS = 30.0
DROP_GRACE = 20.0
LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]

app = rtcore.App("tictactoe")
registry = rooms.install(app)


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    # Demo only: the token is the player's name. Use signed tokens in production.
    return rtcore.Principal(token) if token else None


class Board(msgspec.Struct):
    """The room's state, as both players see it."""

    cells: list[str] = msgspec.field(default_factory=lambda: [""] * 9)
    players: list[str] = []  # players[0] plays X and starts the first game
    status: str = "waiting"  # waiting | playing | over
    turn: str = ""  # whose move it is
    deadline: float = 0.0  # when the turn clock runs out (Unix time)
    winner: str = ""  # a player id, or "" for a draw
    reason: str = ""  # line | draw | timeout | forfeit
    moves: list[int] = []  # cells in the order they were played
    rematch: list[str] = []
    games: int = 0
    score: dict[str, int] = {}


class Move(msgspec.Struct):
    cell: Annotated[int, msgspec.Meta(ge=0, le=8)]


@registry.define("tictactoe")
class TicTacToe(rooms.Room[Board]):
    max_clients = 2
    auto_dispose = 10.0

    turn_timer: rooms.Timer | None = None

    async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
        self.state.players.append(player.id)
        self.state.score.setdefault(player.id, 0)
        if len(self.state.players) == 2:
            self.lock()  # full: matchmaking skips it
            self._start(first=self.state.players[0])

    async def on_drop(self, player: rooms.Player) -> None:
        self.allow_reconnection(player, DROP_GRACE)  # the turn clock keeps running meanwhile

    async def on_leave(self, player: rooms.Player, consented: bool) -> None:
        s = self.state
        if s.status == "playing":
            self._finish(winner=self._other(player.id), reason="forfeit")
        s.players.remove(player.id)
        s.rematch = [p for p in s.rematch if p != player.id]
        self.unlock()  # the next player to join starts a new game with the one left

    @rooms.message("move")
    async def move(self, player: rooms.Player, data: Move) -> list[str]:
        s = self.state
        if s.status != "playing":
            raise rtcore.Rejected("game_not_running", f"the game is {s.status}")
        if s.turn != player.id:
            raise rtcore.Rejected("not_your_turn", f"it is {s.turn}'s turn")
        if s.cells[data.cell]:
            raise rtcore.Rejected("cell_taken", f"cell {data.cell} is taken")
        s.cells[data.cell] = "X" if player.id == s.players[0] else "O"
        s.moves.append(data.cell)
        mark = s.cells[data.cell]
        if any(all(s.cells[i] == mark for i in line) for line in LINES):
            self._finish(winner=player.id, reason="line")
        elif all(s.cells):
            self._finish(winner="", reason="draw")
        else:
            self._turn(self._other(player.id))
        return s.cells

    @rooms.message("rematch")
    async def rematch(self, player: rooms.Player, data: Any) -> None:
        s = self.state
        if s.status != "over" or len(s.players) < 2:
            raise rtcore.Rejected("no_rematch", "a rematch needs a finished game and two players")
        if player.id not in s.rematch:
            s.rematch.append(player.id)
        if len(s.rematch) == 2:
            # The loser of the last game (or O after a draw) starts.
            first = self._other(s.winner) if s.winner else s.players[1 if s.games % 2 else 0]
            self._start(first=first)

    # --- helpers ---------------------------------------------------------------

    def _other(self, pid: str) -> str:
        return next((p for p in self.state.players if p != pid), "")

    def _start(self, first: str) -> None:
        s = self.state
        s.cells, s.moves, s.rematch = [""] * 9, [], []
        s.status, s.winner, s.reason = "playing", "", ""
        self._turn(first)

    def _turn(self, pid: str) -> None:
        self.state.turn = pid
        self.state.deadline = self.clock.now + TURN_SECONDS
        if self.turn_timer is not None:
            self.turn_timer.cancel()
        self.turn_timer = self.clock.set_timeout(TURN_SECONDS, self._timeout, pid, len(self.state.moves))

    def _timeout(self, pid: str, moves: int) -> None:
        s = self.state
        if s.status == "playing" and s.turn == pid and len(s.moves) == moves:
            self._finish(winner=self._other(pid), reason="timeout")

    def _finish(self, winner: str, reason: str) -> None:
        s = self.state
        s.status, s.winner, s.reason, s.turn, s.deadline = "over", winner, reason, "", 0.0
        s.games += 1
        if winner:
            s.score[winner] = s.score.get(winner, 0) + 1
        if self.turn_timer is not None:
            self.turn_timer.cancel()
            self.turn_timer = None


# The browser page, served at /: it plays with rtcore.js (served at /v1/client.js).
app.page("/", (Path(__file__).parent / "index.html").read_bytes())

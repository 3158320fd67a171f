"""Crash: a provably fair betting game on rtcore rooms and rtcore.wallet.

A round: 6 s of betting, then a multiplier rises from 1.00x (``e^(0.08 t)``:
2x after 8.7 s) until the round's crash point. A player who cashes out
before the crash (by hand, or at an automatic target set with the bet) wins
``stake x multiplier``; everyone still in at the crash loses the stake.

Money is an :mod:`rtcore.wallet` ledger (chips, in hundredths):

* a **bet** places a hold ``crash:{room}:{round}:{player}`` from the
  player's account ``player:{id}`` to ``house:CHIPS``;
* a **cash-out** pays the profit with a transfer ``...:win`` from the house
  and **voids** the hold (the stake goes back); a lost bet is **captured**
  (the stake goes to the house) when the round settles;
* every balance change goes out on ``wallet:player:{id}`` (each of the
  player's tabs subscribes to it), so balances move live everywhere.

Ids are derived from the room, round and player, so a step that runs again
(after a crash of the server, a new owner re-applies what it had not
published) replays instead of paying twice. When a server restarts in the
middle of a round, the first step of the room's new owner **cancels** that
round: every pending hold of it is voided (a cash-out whose win was paid is
completed the same way), and the round's seed is revealed as usual. So
``rtcore wallet reconcile`` is clean and no hold stays pending, whatever
moment the process died (see README.md and tests/examples/test_crash.py).

Crash points come from a published hash chain (``provably_fair.py``): the
state holds the commitment from the first round on, each round reveals its
seed when it ends, and anyone can recompute the crash point.

Run it (one process, embedded backend; open http://127.0.0.1:8000)::

    rtcore serve examples/crash/app.py:app --backend crash-events.db

Settings (environment): ``CRASH_WALLET`` (wallet store URL, default
``sqlite:///crash-wallet.db``), ``CRASH_SECRET`` (chain secret; default: read
or create ``crash-secret.key`` in the working directory), ``CRASH_CHAIN``
(rounds per chain, 10000), ``CRASH_BET_SECONDS`` (6), ``CRASH_PAUSE`` (3),
``CRASH_SPEED`` (0.08, growth per second).
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec

import rtcore
import rtcore.wallet
from rtcore import rooms
from rtcore.wallet import Hold, HoldRequest, TransferRequest, WalletError

sys.path.insert(0, str(Path(__file__).parent))  # provably_fair.py, when loaded from elsewhere
from provably_fair import SALT, Chain, crash_point

CURRENCY = "CHIPS"
HOUSE = f"house:{CURRENCY}"
#: Chips given to a new player, and what ``topup`` refills to (hundredths).
WELCOME = 1000_00
MIN_BET, MAX_BET = 1_00, 500_00
HISTORY = 50
#: Seconds a dropped player keeps the seat.
DROP_GRACE = 60.0
#: A hold outlives its round by far; the wallet sweep would release it only after a long outage.
HOLD_MARGIN = 3600.0
#: Room messages after which the wallet outbox is flushed to ``wallet:*`` (see ``publish_balances``).
LEDGER_MESSAGES = frozenset({"joined", "bet", "cashout", "settled", "cancelled", "topup"})


@dataclass
class Settings:
    """The game's settings (read from the environment when the module loads)."""

    wallet_url: str = "sqlite:///crash-wallet.db"
    secret: bytes = b""
    chain_length: int = 10_000
    bet_seconds: float = 6.0
    pause_seconds: float = 3.0
    speed: float = 0.08
    chains: dict[str, Chain] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        secret = env.get("CRASH_SECRET", "").encode()
        if not secret:
            key = Path("crash-secret.key")
            if not key.exists():
                key.write_text(secrets.token_hex(32))
                key.chmod(0o600)
            secret = key.read_text().strip().encode()
        return cls(
            wallet_url=env.get("CRASH_WALLET", "sqlite:///crash-wallet.db"),
            secret=secret,
            chain_length=int(env.get("CRASH_CHAIN", "10000")),
            bet_seconds=float(env.get("CRASH_BET_SECONDS", "6")),
            pause_seconds=float(env.get("CRASH_PAUSE", "3")),
            speed=float(env.get("CRASH_SPEED", "0.08")),
        )

    def chain(self, room_id: str) -> Chain:
        """The room's chain (one per room: rooms never share seeds)."""
        chain = self.chains.get(room_id)
        if chain is None:
            chain = self.chains[room_id] = Chain(self.secret + b":" + room_id.encode(), self.chain_length)
        return chain


settings = Settings.from_env()

app = rtcore.App("crash")
registry = rooms.install(app)
wallet = rtcore.wallet.install(app, settings.wallet_url, sweep_every=1.0)
app.page("/", (Path(__file__).parent / "index.html").read_bytes())
app.retention("wallet:*", max_events=1000)


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    # Demo only: the token is the player's name. Use signed tokens in production.
    if not token or ":" in token or len(token) > 64:
        return None
    return rtcore.Principal(token)


@app.authorize
async def authorize(principal: Any, action: str, resource: str) -> bool:
    if action.startswith("wallet.") and action not in ("wallet.balance", "wallet.history"):
        return False  # money moves through the game only
    if action in ("subscribe", "history") and resource.startswith("wallet:player:"):
        return resource == f"wallet:player:{getattr(principal, 'id', '')}"
    return rooms.allowed(principal, action, resource)


@app.on("room:*")
async def publish_balances(ctx: rtcore.Context, event: rtcore.Event) -> None:
    """After a room step that moved money, publish the new balances (the wallet outbox).

    Rooms have no ``ctx``; their steps broadcast a message instead, and this
    processor (fed by the node's live feed) flushes. The wallet's sweep loop
    flushes every second too, which covers anything this misses (a crash).
    """
    data = event.data
    if event.type == "msg" and isinstance(data, dict) and data.get("type") in LEDGER_MESSAGES:
        await wallet.flush(ctx.publish)


def account(uid: str) -> str:
    return f"player:{uid}"


def multiplier(speed: float, elapsed: float) -> int:
    """The multiplier (hundredths) ``elapsed`` seconds into a round."""
    return int(100 * math.exp(speed * max(0.0, elapsed)))


class Bet(msgspec.Struct):
    amount: int
    auto: int = 0  # automatic cash-out target (hundredths), 0: none
    cashout: int = 0  # the multiplier cashed out at (hundredths), 0: not (yet)
    payout: int = 0
    result: str = ""  # won | lost | refunded


class Round(msgspec.Struct):
    round: int
    crash: int
    seed: str
    status: str  # crashed | cancelled
    bets: int = 0


class Crash(msgspec.Struct):
    """The room's state, as every player sees it (amounts in hundredths)."""

    commitment: str = ""
    salt: str = SALT
    chain_length: int = 0
    speed: float = 0.08
    round: int = 0
    status: str = "idle"  # betting | running | crashed | cancelled
    settled: bool = False
    betting_ends_at: float = 0.0
    started_at: float = 0.0
    next_round_at: float = 0.0
    multiplier: int = 100
    crash: int = 0  # revealed with the seed when the round ends
    seed: str = ""
    bets: dict[str, Bet] = {}
    history: list[Round] = []  # newest first


class BetArgs(msgspec.Struct):
    amount: Annotated[int, msgspec.Meta(ge=MIN_BET, le=MAX_BET)]
    auto: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0


@registry.define("crash")
class CrashRoom(rooms.Room[Crash]):
    max_clients = 0
    tick_rate = 10
    auto_dispose = 600.0

    def __init__(self) -> None:
        self.ready = False  # set by the first step of this owner (see _ensure)

    # --- hooks ---------------------------------------------------------------------

    async def on_create(self, options: dict[str, Any]) -> None:
        chain = settings.chain(self.id)
        s = self.state
        s.commitment, s.chain_length, s.speed = chain.commitment, chain.length, settings.speed
        await wallet.store.create_account(HOUSE, CURRENCY, kind="system", owner="house")
        self.ready = True
        self._open(1)

    async def on_join(self, player: rooms.Player, options: dict[str, Any]) -> None:
        await self._ensure()
        await wallet.store.create_account(account(player.id), CURRENCY, owner=player.id)
        await wallet.store.transfer(TransferRequest(f"welcome:{player.id}", HOUSE, account(player.id), WELCOME, CURRENCY))
        self.broadcast("joined", {"player": player.id})

    async def on_drop(self, player: rooms.Player) -> None:
        await self._ensure()
        self.allow_reconnection(player, DROP_GRACE)  # a reload or a flaky network keeps the seat

    async def on_leave(self, player: rooms.Player, consented: bool) -> None:
        await self._ensure()  # the bet, if any, stays in the round

    async def on_dispose(self) -> None:
        await self._ensure()
        if self.state.status in ("betting", "running"):
            await self._cancel()
        elif self.state.status == "crashed" and not self.state.settled:
            await self._settle(self.state.round)

    async def on_tick(self, dt: float) -> None:
        await self._ensure()
        s = self.state
        if s.status != "running":
            return
        crash = self._crash_point()
        m = min(multiplier(s.speed, self.clock.now - s.started_at), crash - 1)
        if m > s.multiplier:
            s.multiplier = m
        await self._autos(s.multiplier)

    @rooms.message("bet")
    async def bet(self, player: rooms.Player, data: BetArgs) -> dict[str, Any]:
        """Bet ``amount`` on this round (betting phase only); ``auto``: cash out there by itself."""
        await self._ensure()
        s = self.state
        if s.status != "betting":
            raise rtcore.Rejected("betting_closed", f"round {s.round} is {s.status}; bet in the next one")
        if player.id in s.bets:
            raise rtcore.Rejected("already_bet", f"one bet per round; you bet {s.bets[player.id].amount / 100:.2f}")
        if data.auto and data.auto <= 100:
            raise rtcore.Rejected("bad_auto", "auto cash-out must be above 1.00x (101 or more)")
        expires = s.betting_ends_at + math.log(1000) / s.speed + HOLD_MARGIN
        meta = {"game": "crash", "room": self.id, "round": str(s.round)}
        # WalletError (insufficient_funds, ...) is a Rejected: the sender gets it, nothing changes.
        await wallet.store.hold(HoldRequest(self._hold(s.round, player.id), account(player.id), HOUSE, data.amount, CURRENCY, expires, meta))
        s.bets[player.id] = Bet(data.amount, auto=data.auto)
        self.broadcast("bet", {"player": player.id, "amount": data.amount})
        return {"round": s.round, "amount": data.amount}

    @rooms.message("cashout")
    async def cashout(self, player: rooms.Player, data: Any) -> dict[str, Any]:
        """Cash out now at the current multiplier."""
        await self._ensure()
        s = self.state
        bet = s.bets.get(player.id)
        if s.status != "running" or bet is None or bet.cashout:
            raise rtcore.Rejected("no_open_bet", "no bet of yours is riding in a running round")
        m = multiplier(s.speed, self.clock.now - s.started_at)
        if m >= self._crash_point():
            raise rtcore.Rejected("crashed", "too late: the round crashed")
        # Automatic targets passed since the last tick go first, at their target:
        # a bet whose own target was passed is paid there, not at m.
        await self._autos(m)
        if not bet.cashout:
            await self._cash_out(player.id, bet, m)
        return {"multiplier": bet.cashout, "payout": bet.payout}

    @rooms.message("topup")
    async def topup(self, player: rooms.Player, data: Any) -> int:
        """Refill an empty account (available below the minimum bet) to the welcome amount."""
        await self._ensure()
        bal = await wallet.store.get_balance(account(player.id))
        if bal.available >= MIN_BET:
            raise rtcore.Rejected("not_empty", "top-ups are for empty accounts")
        await wallet.store.transfer(
            TransferRequest(f"topup:{self.id}:{self.state.round}:{player.id}", HOUSE, account(player.id), WELCOME - bal.available, CURRENCY)
        )
        self.broadcast("topup", {"player": player.id})
        return WELCOME

    # --- rounds (timer callbacks are room methods with builtin args: durable) -------

    def _open(self, round_no: int) -> None:
        s = self.state
        if round_no > s.chain_length:
            s.status = "idle"  # the chain is used up: a new room (new chain) takes over
            return
        s.round, s.status, s.settled = round_no, "betting", False
        s.bets, s.multiplier, s.crash, s.seed = {}, 100, 0, ""
        s.betting_ends_at, s.started_at, s.next_round_at = self.clock.now + settings.bet_seconds, 0.0, 0.0
        self.clock.set_timeout(settings.bet_seconds, self._start, round_no)

    async def _start(self, round_no: int) -> None:
        await self._ensure()
        s = self.state
        if s.round != round_no or s.status != "betting":
            return
        s.status, s.started_at, s.multiplier = "running", self.clock.now, 100
        crash = self._crash_point()
        self.clock.set_timeout(math.log(crash / 100) / s.speed, self._crash, round_no)

    async def _crash(self, round_no: int) -> None:
        await self._ensure()
        s = self.state
        if s.round != round_no or s.status != "running":
            return
        crash = self._crash_point()
        # Automatic cash-outs below the crash point are paid at their target,
        # whether or not a tick saw the multiplier pass it.
        await self._autos(crash - 1)
        s.status, s.multiplier = "crashed", crash
        self._reveal("crashed")
        # Settle in the next step: this one's patch (status "crashed") is
        # written first, so a restart in between settles instead of cancelling.
        self.clock.set_timeout(0, self._settle, round_no)

    async def _settle(self, round_no: int) -> None:
        await self._ensure()
        s = self.state
        if s.round != round_no or s.status != "crashed" or s.settled:
            return
        for uid in self._bettors():
            hold = await self._pending(s.round, uid)
            bet = s.bets.get(uid)
            if bet is not None and bet.cashout:
                if hold is not None:  # cut between the win and the void: complete the cash-out
                    await wallet.store.void(hold.id)
                continue
            if hold is not None:
                if bet is None:  # a hold whose bet was never recorded (cut mid-step): refund it
                    s.bets[uid] = Bet(hold.amount, result="refunded")
                    await wallet.store.void(hold.id)
                    continue
                await wallet.store.capture(hold.id)
            if bet is not None:
                bet.result = "lost"
        s.settled = True
        self._next()
        self.broadcast("settled", {"round": round_no, "crash": s.crash})

    async def _cancel(self) -> None:
        """Cancel the current round (its owner restarted): void every pending hold of it."""
        s = self.state
        for uid in self._bettors():
            hold = await self._pending(s.round, uid)
            bet = s.bets.get(uid)
            win = await wallet.store.get_transfer(self._hold(s.round, uid) + ":win")
            if hold is not None:
                await wallet.store.void(hold.id)
                if bet is None:
                    bet = s.bets[uid] = Bet(hold.amount)
            if bet is None:
                continue
            if win is not None and not bet.cashout:  # paid before the cut: it stands
                bet.cashout = int(win.metadata.get("multiplier", "0"))
                bet.payout = bet.amount + win.amount
            if not bet.cashout:
                bet.result = "refunded"
            elif not bet.result:
                bet.result = "won"
        s.status, s.settled = "cancelled", True
        self._reveal("cancelled")
        self._next()
        self.broadcast("cancelled", {"round": s.round})

    def _next(self) -> None:
        s = self.state
        s.next_round_at = self.clock.now + settings.pause_seconds
        self.clock.set_timeout(settings.pause_seconds, self._next_round, s.round + 1)

    async def _next_round(self, round_no: int) -> None:
        await self._ensure()
        s = self.state
        if s.round == round_no - 1 and s.settled:
            self._open(round_no)

    # --- money ---------------------------------------------------------------------

    async def _autos(self, m: int) -> None:
        """Cash out every bet whose automatic target is at or below ``m``, at its target."""
        for uid, bet in sorted(self.state.bets.items(), key=lambda kv: kv[1].auto):
            if bet.auto and not bet.cashout and bet.auto <= m:
                await self._cash_out(uid, bet, bet.auto)

    async def _cash_out(self, uid: str, bet: Bet, m: int) -> None:
        s = self.state
        payout = bet.amount * m // 100
        hold_id = self._hold(s.round, uid)
        if payout > bet.amount:
            meta = {"game": "crash", "room": self.id, "round": str(s.round), "multiplier": str(m)}
            await wallet.store.transfer(TransferRequest(hold_id + ":win", HOUSE, account(uid), payout - bet.amount, CURRENCY, meta))
        await wallet.store.void(hold_id)
        bet.cashout, bet.payout, bet.result = m, payout, "won"
        self.broadcast("cashout", {"player": uid, "multiplier": m, "payout": payout})

    async def _pending(self, round_no: int, uid: str) -> Hold | None:
        record = await wallet.store.get_transfer(self._hold(round_no, uid))
        return record if isinstance(record, Hold) and record.status == "pending" else None

    def _hold(self, round_no: int, uid: str) -> str:
        return f"crash:{self.id}:{round_no}:{uid}"

    def _bettors(self) -> list[str]:
        """Who may hold a bet in this round: its recorded bettors and every member.

        A member's bet whose hold committed but whose patch was not written
        (the server died in between) is not in ``bets``; the member is still
        in the document, because its join was an earlier step.
        """
        return sorted(set(self.state.bets) | {p.id for p in self.players})

    def _crash_point(self) -> int:
        return crash_point(settings.chain(self.id).seed(self.state.round), self.state.salt)

    def _reveal(self, status: str) -> None:
        s = self.state
        s.crash, s.seed = self._crash_point(), settings.chain(self.id).seed(s.round)
        s.history.insert(0, Round(s.round, s.crash, s.seed, status, len(s.bets)))
        del s.history[HISTORY:]

    async def _ensure(self) -> None:
        """The first step of a new owner: finish what the last owner left in the middle.

        A round that was betting or running is cancelled (its players could
        not cash out while no server ran); a crashed round that was not
        settled is settled. Idempotent: every wallet call checks the hold first.
        """
        if self.ready:
            return
        s = self.state
        if s.commitment and s.commitment != settings.chain(self.id).commitment:
            raise rtcore.Rejected("wrong_chain", "this server's secret does not match the room's published commitment")
        self.ready = True  # before the work: _settle and _cancel call back here
        try:
            if s.status in ("betting", "running"):
                await self._cancel()
            elif s.status == "crashed" and not s.settled:
                await self._settle(s.round)
        except BaseException:
            self.ready = False  # the step is reverted: the next one tries again
            raise


__all__ = ["Bet", "Crash", "CrashRoom", "WalletError", "app", "registry", "settings", "wallet"]

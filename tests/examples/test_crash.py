"""The crash example: fairness, money on a FakeClock, restarts, and bots over real sockets."""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtcore.errors import RtcoreError
from rtcore.rooms import Rooms
from rtcore.testing import FakeClock, connect, serve
from rtcore.wallet import Hold, HoldRequest, last_balance_event, reconcile

from .helpers import load_example, serving, ws_url

pytestmark = pytest.mark.anyio

os.environ.setdefault("CRASH_SECRET", "tests-secret")  # else the module creates crash-secret.key in the cwd
crash = load_example("crash")
crash_bot = load_example("crash", "bot")
fair = load_example("crash", "provably_fair")


# --- fairness ----------------------------------------------------------------------


def test_chain_verifies_and_crash_points_are_recomputed() -> None:
    """Every revealed seed hashes to the commitment at its position and to the previous
    seed; the crash point is recomputed from the seed alone.

    Mutation: reveal a different seed (the next round's, or another chain's) →
    ``verify_round`` / ``verify_history`` report it (asserted below).
    """
    chain = fair.Chain(b"secret", 200)
    rounds = [{"round": k, "seed": chain.seed(k), "crash": fair.crash_point(chain.seed(k))} for k in range(1, 201)]
    assert fair.verify_history(chain.commitment, rounds) == []
    for r in rounds[:20]:
        assert fair.verify_round(chain.commitment, r["round"], r["seed"], r["crash"]) == []
    # A different seed for round 5: the next round's, or round 5 of another chain.
    other = fair.Chain(b"other secret", 200)
    assert fair.verify_round(chain.commitment, 5, chain.seed(6)) != []
    assert fair.verify_round(chain.commitment, 5, other.seed(5)) != []
    tampered = [dict(r) for r in rounds]
    tampered[4]["seed"] = other.seed(5)
    assert any("round 5" in p for p in fair.verify_history(chain.commitment, tampered))
    # The right seed with a crash point it does not give.
    wrong = rounds[9]["crash"] + 1
    assert fair.verify_round(chain.commitment, 10, rounds[9]["seed"], wrong) != []
    # The command line says the same (exit status).
    assert fair.main(["verify", "--commitment", chain.commitment, "--round", "3", "--seed", chain.seed(3)]) == 0
    assert fair.main(["verify", "--commitment", chain.commitment, "--round", "3", "--seed", chain.seed(4)]) == 1


def test_crash_point_formula() -> None:
    """The documented formula: ``min(MAX, max(100, 99 * 2^52 // (2^52 - h)))``, h = 52 bits of HMAC.

    Mutation: use ``100 * E`` instead of ``99 * E`` (no house edge) → the
    known value below changes → fails.
    """
    import hashlib
    import hmac

    seed = hashlib.sha256(b"x").hexdigest()
    h = int(hmac.new(bytes.fromhex(seed), b"rtcore-crash", hashlib.sha256).hexdigest()[:13], 16)
    assert fair.crash_point(seed) == min(100_000, max(100, (99 * 2**52) // (2**52 - h)))
    points = [fair.crash_point(fair.sha256_hex(str(i).encode())) for i in range(4000)]
    assert min(points) == 100 and all(100 <= p <= 100_000 for p in points)
    # About 0.99 / 2 of rounds reach 2x (a wide band: this is a sanity check, not a statistic test).
    assert 0.40 < sum(p >= 200 for p in points) / len(points) < 0.60


# --- the game on a FakeClock ----------------------------------------------------------


@asynccontextmanager
async def game(tmp_path: Path, backend: str = "memory://", **settings: Any) -> AsyncIterator[tuple[Any, FakeClock]]:
    crash.wallet.url = f"sqlite:///{tmp_path / 'wallet.db'}"
    old = {k: getattr(crash.settings, k) for k in ("bet_seconds", "pause_seconds", "speed")}
    for k, v in {"bet_seconds": 2.0, "pause_seconds": 1.0, "speed": 1.0, **settings}.items():
        setattr(crash.settings, k, v)
    clock = FakeClock(time.time())
    try:
        async with serve(crash.app, backend, clock=clock) as node:
            yield node, clock
    finally:
        for k, v in old.items():
            setattr(crash.settings, k, v)


async def _step(reg: Rooms, node: Any, rid: str, clock: FakeClock, seconds: float) -> Any:
    clock.advance(seconds)
    await reg.settle(node, rid)
    return (await reg.state(node, rid))["state"]


async def _balance(uid: str) -> int:
    b = await crash.wallet.store.get_balance(f"player:{uid}")
    return int(b.available + b.held)


async def _holds_of(store: Any) -> list[Hold]:
    ids = {e.transfer_id for e in await store.entries(0, limit=100_000)}
    holds = [await store.get_transfer(i) for i in sorted(ids)]
    return [h for h in holds if isinstance(h, Hold)]


async def test_bets_cash_outs_and_losses_move_the_right_money(tmp_path: Path) -> None:
    """Rounds on a FakeClock until an automatic cash-out both won and lost.

    Each round: alice bets 10.00 with auto cash-out at 1.50x, bob 20.00 and
    cashes out by hand at 1.20x. The crash point is the one the chain gives;
    a cash-out below it pays ``stake x multiplier`` (profit transfer + void),
    a bet still in at the crash is captured; every hold ends captured or
    voided; balances follow; the revealed seed verifies.

    Mutation: capture cashed-out bets in ``_settle`` too (drop the
    ``bet.cashout`` branch) → the winner's balance and hold status fail.
    """
    reg: Rooms = crash.registry
    async with game(tmp_path) as (node, clock), connect(node, "alice") as a, connect(node, "bob") as b:
        rid = (await a.command("room.join_or_create", {"type": "crash"}))["room_id"]
        await b.command("room.join_or_create", {"type": "crash"})
        chain = crash.settings.chain(rid)
        seen: set[str] = set()
        for _ in range(40):
            s = await _step(reg, node, rid, clock, 0)
            assert s["status"] == "betting"
            r = s["round"]
            before = {u: await _balance(u) for u in ("alice", "bob")}
            send = {"room_id": rid}
            await a.command("room.send", {**send, "type": "bet", "data": {"amount": 10_00, "auto": 150}})
            await b.command("room.send", {**send, "type": "bet", "data": {"amount": 20_00}})
            with pytest.raises(RtcoreError) as twice:
                await b.command("room.send", {**send, "type": "bet", "data": {"amount": 1_00}})
            assert twice.value.code == "already_bet"
            point = fair.crash_point(chain.seed(r))
            s = await _step(reg, node, rid, clock, crash.settings.bet_seconds)
            assert s["status"] == "running" or point == 100
            s = await _step(reg, node, rid, clock, math.log(1.2) + 0.01)
            bob_out = None
            try:
                bob_out = await b.command("room.send", {**send, "type": "cashout"})
            except RtcoreError as exc:
                assert exc.code in ("no_open_bet", "crashed") and point <= 121
            s = await _step(reg, node, rid, clock, math.log(max(point, 101) / 100) + 0.5)
            s = await _step(reg, node, rid, clock, 0)
            assert (s["round"], s["status"], s["settled"]) == (r, "crashed", True)
            assert s["crash"] == point and fair.verify_round(s["commitment"], r, s["seed"], s["crash"]) == []
            alice_won = point > 150
            assert s["bets"]["alice"]["result"] == ("won" if alice_won else "lost")
            after = {u: await _balance(u) for u in ("alice", "bob")}
            assert after["alice"] - before["alice"] == (5_00 if alice_won else -10_00)
            if bob_out is not None:
                assert after["bob"] - before["bob"] == bob_out["payout"] - 20_00 and bob_out["payout"] >= 24_00
            else:
                assert after["bob"] - before["bob"] == -20_00
            for uid, won in (("alice", alice_won), ("bob", bob_out is not None)):
                hold = await crash.wallet.store.get_transfer(f"crash:{rid}:{r}:{uid}")
                assert isinstance(hold, Hold) and hold.status == ("voided" if won else "captured")
            seen.add("won" if alice_won else "lost")
            await _step(reg, node, rid, clock, crash.settings.pause_seconds)
            if seen == {"won", "lost"}:
                break
        assert seen == {"won", "lost"}
        assert all(h.status != "pending" for h in await _holds_of(crash.wallet.store))
        report = await reconcile(crash.wallet.store, last_balance_event(node.backend.events))
        assert report.ok, report.mismatches


async def test_betting_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bets only while betting, within limits, covered by the balance; cash-out needs a riding bet.

    The round's crash point is pinned to 2.00x: about one round in 33 crashes
    at 1.00x, which ends it the moment betting closes and captures the bet,
    so the held balance checked below depended on the random room id.

    Mutation: drop the ``status != "betting"`` check → the late bet is accepted → fails.
    """
    monkeypatch.setattr(crash, "crash_point", lambda seed, salt: 200)
    reg: Rooms = crash.registry
    async with game(tmp_path) as (node, clock), connect(node, "carol") as c:
        rid = (await c.command("room.join_or_create", {"type": "crash"}))["room_id"]
        send = {"room_id": rid}

        async def refused(type_: str, data: Any = None) -> str:
            with pytest.raises(RtcoreError) as exc:
                await c.command("room.send", {**send, "type": type_, "data": data})
            return exc.value.code

        assert await refused("bet", {"amount": 50}) == "bad_args"  # below the minimum
        assert await refused("bet", {"amount": 10_00, "auto": 100}) == "bad_auto"
        assert await refused("cashout") == "no_open_bet"
        assert await refused("topup") == "not_empty"
        await c.command("room.send", {**send, "type": "bet", "data": {"amount": 500_00}})
        s = await _step(reg, node, rid, clock, 0)
        assert s["bets"]["carol"]["amount"] == 500_00
        await _step(reg, node, rid, clock, crash.settings.bet_seconds)
        assert await refused("bet", {"amount": 1_00}) == "betting_closed"
        bal = await crash.wallet.store.get_balance("player:carol")
        assert (bal.available, bal.held) == (500_00, 500_00)


async def test_restart_mid_round_voids_every_hold_of_it(tmp_path: Path) -> None:
    """A node stops in the middle of a round; the next node to own the room cancels it:
    every hold of the round is voided, the one whose bet was never recorded
    (a step cut between the wallet commit and the patch) included, and the
    seed is revealed as for any round.

    Mutation: make ``_bettors`` return only ``bets`` → the orphan hold stays
    pending → fails. Mutation: skip ``_cancel`` in ``_ensure`` → holds stay
    pending and the round never ends → fails.
    """
    reg: Rooms = crash.registry
    backend = f"sqlite:///{tmp_path / 'events.db'}"
    async with game(tmp_path, backend) as (node, clock), connect(node, "alice") as a, connect(node, "bob") as b:
        rid = (await a.command("room.join_or_create", {"type": "crash"}))["room_id"]
        await b.command("room.join_or_create", {"type": "crash"})
        await a.command("room.send", {"room_id": rid, "type": "bet", "data": {"amount": 7_00}})
        s = await _step(reg, node, rid, clock, 0)
        r = s["round"]
        # bob's bet step was cut after the wallet committed its hold: no trace in the room.
        orphan = HoldRequest(f"crash:{rid}:{r}:bob", "player:bob", crash.HOUSE, 3_00, crash.CURRENCY, time.time() + 3600, {"game": "crash"})
        await crash.wallet.store.hold(orphan)
        assert "bob" not in s["bets"]
    async with game(tmp_path, backend) as (node, clock):
        await reg.runtime(node).supervise()  # what the supervisor loop does every 2 s: adopt rooms without an owner
        s = await _step(reg, node, rid, clock, 0.2)  # the first tick runs the recovery
        assert (s["round"], s["status"], s["settled"]) == (r, "cancelled", True)
        assert {u: b["result"] for u, b in s["bets"].items()} == {"alice": "refunded", "bob": "refunded"}
        assert fair.verify_round(s["commitment"], r, s["seed"], s["crash"]) == []
        holds = await _holds_of(crash.wallet.store)
        assert {h.id: h.status for h in holds} == {f"crash:{rid}:{r}:alice": "voided", f"crash:{rid}:{r}:bob": "voided"}
        assert await _balance("alice") == crash.WELCOME and await _balance("bob") == crash.WELCOME
        s = await _step(reg, node, rid, clock, crash.settings.pause_seconds)
        assert (s["round"], s["status"]) == (r + 1, "betting")


# --- bots over real sockets -----------------------------------------------------------


@pytest.mark.slow
async def test_bots_play_rounds_to_the_end_and_the_books_balance(tmp_path: Path) -> None:
    """Three bots (the example's ``bot.py``) play 3 rounds each on a real server.

    Each bot verifies every round's seed and crash point, keeps its own books
    and checks them against the wallet and its live balance stream; then no
    hold is pending and reconciliation is clean.

    Mutation: pay the full payout as profit in ``_cash_out`` (``payout``
    instead of ``payout - bet.amount``) → the books disagree → fails.
    """
    crash.wallet.url = f"sqlite:///{tmp_path / 'wallet.db'}"
    old = (crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed)
    crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed = 2.0, 0.3, 1.5
    try:
        async with serving(crash.app) as server:
            results = await crash_bot.run_bots(ws_url(server), 3, 3, seed=3, patience=30.0)
            store = crash.wallet.store
            node = server.node
            assert all(h.status != "pending" for h in await _holds_of(store))
            report = await reconcile(store, last_balance_event(node.backend.events))
            assert report.ok, report.mismatches
    finally:
        crash.settings.bet_seconds, crash.settings.pause_seconds, crash.settings.speed = old
    assert len(results) == 3
    for r in results:
        assert r.problems == [], r
        assert r.rounds == 3 and r.verified == 3 and r.bets >= 2, r
        assert r.balance == r.books == r.live, r


async def test_restart_after_the_crash_before_settling_captures_the_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node stops after a round crashed (status written) but before it settled;
    the next owner settles it: the lost bet is captured, nothing is refunded.

    (The first node's ``_settle`` is replaced by a no-op, so its durable timer
    is not re-armed by name either: only the new owner's recovery settles.)

    Mutation: drop the ``crashed and not settled`` branch of ``_ensure`` → the
    round never settles → fails; make ``_settle`` void instead of capture →
    alice's 7.00 comes back → fails.
    """
    reg: Rooms = crash.registry
    backend = f"sqlite:///{tmp_path / 'events.db'}"
    settle = crash.CrashRoom._settle

    async def not_yet(self: Any, round_no: int) -> None:
        return None

    monkeypatch.setattr(crash.CrashRoom, "_settle", not_yet)  # the first node dies before settling
    async with game(tmp_path, backend) as (node, clock), connect(node, "alice") as a:
        rid = (await a.command("room.join_or_create", {"type": "crash"}))["room_id"]
        await a.command("room.send", {"room_id": rid, "type": "bet", "data": {"amount": 7_00}})
        point = fair.crash_point(crash.settings.chain(rid).seed(1))
        await _step(reg, node, rid, clock, crash.settings.bet_seconds)
        s = await _step(reg, node, rid, clock, math.log(point / 100) + 0.2)
        assert (s["status"], s["settled"]) == ("crashed", False)
    monkeypatch.setattr(crash.CrashRoom, "_settle", settle)
    async with game(tmp_path, backend) as (node, clock):
        await reg.runtime(node).supervise()
        s = await _step(reg, node, rid, clock, 0.2)
        assert (s["round"], s["status"], s["settled"], s["bets"]["alice"]["result"]) == (1, "crashed", True, "lost")
        hold = await crash.wallet.store.get_transfer(f"crash:{rid}:1:alice")
        assert isinstance(hold, Hold) and hold.status == "captured"
        assert await _balance("alice") == crash.WELCOME - 7_00


async def test_a_player_reads_only_their_own_wallet_and_moves_money_only_by_playing(tmp_path: Path) -> None:
    """``wallet:player:alice`` is alice's alone; players cannot call the money-moving ``wallet.*`` commands.

    Mutation: make ``authorize`` return ``rooms.allowed(...)`` only → bob
    subscribes to alice's balance stream and transfers chips to himself → fails.
    """
    async with game(tmp_path) as (node, _clock), connect(node, "alice") as a, connect(node, "bob") as b:
        await a.command("room.join_or_create", {"type": "crash"})
        await b.command("room.join_or_create", {"type": "crash"})
        await a.subscribe("wallet:player:alice")
        assert (await a.command("wallet.balance", {"account": "player:alice"}))["available"] == crash.WELCOME
        with pytest.raises(RtcoreError) as peek:
            await b.subscribe("wallet:player:alice")
        assert peek.value.code == "forbidden"
        with pytest.raises(RtcoreError) as steal:
            await b.command("wallet.balance", {"account": "player:alice"})
        assert steal.value.code == "forbidden"
        with pytest.raises(RtcoreError) as move:
            await b.command("wallet.transfer", {"id": "t1", "debit": "player:bob", "credit": "player:alice", "amount": 1_00, "currency": "CHIPS"})
        assert move.value.code == "forbidden"
        assert await _balance("bob") == crash.WELCOME


# --- property: any bets, any cash-outs, the money follows the rules -------------------

_bet = st.tuples(
    st.integers(1_00, 50_00),  # amount
    st.sampled_from([0, 0, 105, 150, 300]),  # auto cash-out (hundredths), 0: none
    st.sampled_from([0, 0, 110, 200]),  # manual cash-out target, 0: none
)
_round = st.dictionaries(st.sampled_from(["p1", "p2", "p3"]), _bet, max_size=3)


@settings(max_examples=8, deadline=None)
@given(rounds=st.lists(_round, min_size=1, max_size=3))
async def test_any_bets_settle_by_the_rules_and_no_hold_stays_pending(tmp_path_factory: pytest.TempPathFactory, rounds: list[dict[str, tuple[int, int, int]]]) -> None:
    """Hypothesis: random bets (amounts, automatic and manual cash-outs) over several rounds.

    A model computed from the crash points alone (not from the room) says
    what each player should have: a win pays ``stake x multiplier`` (an
    automatic cash-out below the crash point at its target, a manual one at
    the multiplier it got), anything else loses the stake. After each round
    every balance equals the model, no hold is pending; at the end
    reconciliation is clean.

    Mutation: pay automatic cash-outs at the multiplier seen instead of
    their target (``_cash_out(uid, bet, m)`` in ``_autos``) → balances differ
    from the model → fails. Mutation: drop ``_autos(m)`` from the ``cashout``
    handler → a manual cash-out overtakes an automatic target passed since the
    last tick (the bug this test found) → fails.
    """
    tmp = tmp_path_factory.mktemp("prop")
    reg: Rooms = crash.registry
    async with game(tmp) as (node, clock), connect(node, "p1") as c1, connect(node, "p2") as c2, connect(node, "p3") as c3:
        players = {"p1": (None, c1), "p2": (None, c2), "p3": (None, c3)}
        if True:
            rid = (await players["p1"][1].command("room.join_or_create", {"type": "crash"}))["room_id"]
            for p in ("p2", "p3"):
                await players[p][1].command("room.join_or_create", {"type": "crash"})
            chain = crash.settings.chain(rid)
            model = {p: crash.WELCOME for p in players}
            for bets in rounds:
                s = await _step(reg, node, rid, clock, 0)
                r = s["round"]
                point = fair.crash_point(chain.seed(r))
                for p, (amount, auto, _manual) in bets.items():
                    await players[p][1].command("room.send", {"room_id": rid, "type": "bet", "data": {"amount": amount, "auto": auto}})
                await _step(reg, node, rid, clock, crash.settings.bet_seconds)
                # Manual cash-outs, in the order their targets come.
                elapsed = 0.0
                manual = {}
                crash_at = math.log(max(point, 101) / 100) / crash.settings.speed
                for p, (_a, _auto, target) in sorted(bets.items(), key=lambda kv: kv[1][2]):
                    if not target:
                        continue
                    # A target beyond the crash is tried just after it (refused), never
                    # so late that the next round (pause_seconds later) has begun.
                    at = min(math.log(target / 100) / crash.settings.speed + 0.001, crash_at + 0.3)
                    s = await _step(reg, node, rid, clock, max(0.0, at - elapsed))
                    elapsed = max(elapsed, at)
                    manual[p] = crash.multiplier(crash.settings.speed, elapsed)  # what the model expects
                    try:
                        got = await players[p][1].command("room.send", {"room_id": rid, "type": "cashout"})
                    except RtcoreError as exc:
                        assert exc.code in ("no_open_bet", "crashed"), exc
                    else:
                        auto = bets[p][1]
                        assert got["multiplier"] == (auto if auto and auto <= manual[p] else manual[p])
                # To just past the crash: the manual cash-outs above already moved the
                # clock ``elapsed`` seconds into the flight (going further would run
                # into the next round's start, ``pause_seconds`` after the crash).
                s = await _step(reg, node, rid, clock, max(0.0, crash_at + 0.3 - elapsed))
                s = await _step(reg, node, rid, clock, 0)
                assert (s["round"], s["status"], s["settled"]) == (r, "crashed", True)
                for p, (amount, auto, _target) in bets.items():
                    # The first target reached below the crash point pays: the automatic
                    # one at its value, the manual one at the multiplier of its moment.
                    reached = [m for m in (auto, manual.get(p, 0)) if m and m < point]
                    if auto and auto < point and (p not in manual or auto <= manual[p]):
                        model[p] += amount * auto // 100 - amount
                    elif reached:
                        model[p] += amount * min(reached) // 100 - amount
                    else:
                        model[p] -= amount
                assert {p: await _balance(p) for p in players} == model
                assert [h.id for h in await _holds_of(crash.wallet.store) if h.status == "pending"] == []
                await _step(reg, node, rid, clock, crash.settings.pause_seconds)
            report = await reconcile(crash.wallet.store, last_balance_event(node.backend.events))
            assert report.ok, report.mismatches

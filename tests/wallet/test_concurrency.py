"""Concurrent traffic on one store: no lost update, no double apply, no deadlock.

Each test is bounded by :func:`anyio.fail_after`, so a deadlock (or a lock
wait that never ends) fails the test instead of hanging the suite. The bound
is generous: it is a liveness check, not a timing assertion.
"""

from __future__ import annotations

import random
from collections import Counter

import anyio
import anyio.lowlevel
import pytest

from rtcore.wallet import Hold, HoldRequest, TransferRequest, WalletError, WalletStore
from rtcore.wallet.reconciliation import check_ledger

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
LIVENESS = 120  # seconds; only reached on a deadlock
PLAYERS = ["p0", "p1", "p2", "p3", "p4"]


async def test_many_tasks_transferring_among_five_accounts(store: WalletStore) -> None:
    await store.create_account("mint", "EUR", kind="system")
    model = dict.fromkeys(PLAYERS, 0)
    model["mint"] = 0
    for name in PLAYERS:
        await store.create_account(name, "EUR")
        # Enough for every transfer to succeed whatever the interleaving, so the
        # final balances depend only on *which* transfers ran, not their order.
        await store.transfer(TransferRequest(f"fund-{name}", "mint", name, 1_000_000, "EUR"), now=T0)
        model[name] += 1_000_000
        model["mint"] -= 1_000_000

    rng = random.Random(7)
    shared = []  # ids that several tasks send, with identical fields: must apply once
    for i in range(40):
        debit, credit = rng.sample(PLAYERS, 2)
        shared.append(TransferRequest(f"shared-{i}", debit, credit, rng.randint(1, 500), "EUR"))
    plans: list[list[TransferRequest]] = []
    for task in range(20):
        plan = []
        for n in range(50):
            if n % 5 == 0:
                plan.append(rng.choice(shared))
            else:
                debit, credit = rng.sample(PLAYERS, 2)
                plan.append(TransferRequest(f"task{task}-{n}", debit, credit, rng.randint(1, 500), "EUR"))
        plans.append(plan)

    applied: Counter[str] = Counter()
    replayed: Counter[str] = Counter()

    async def worker(plan: list[TransferRequest]) -> None:
        for req in plan:
            result = await store.transfer(req, now=T0 + 1)
            (replayed if result.replayed else applied)[req.id] += 1
            await anyio.lowlevel.checkpoint()  # interleave with the other tasks even on a fast engine

    with anyio.fail_after(LIVENESS):
        async with anyio.create_task_group() as tg:
            for plan in plans:
                tg.start_soon(worker, plan)

    distinct = {req.id: req for plan in plans for req in plan}
    for req in distinct.values():
        model[req.debit] -= req.amount
        model[req.credit] += req.amount
    assert set(applied) == set(distinct)
    assert all(count == 1 for count in applied.values()), "an id was applied twice"
    assert sum(applied.values()) + sum(replayed.values()) == 20 * 50

    balances = {b.account: b for b in await store.all_balances()}
    assert {name: b.available for name, b in balances.items()} == model
    assert sum(b.total for b in balances.values()) == 0
    snapshot = await store.snapshot()
    assert len(snapshot.entries) == 2 * (len(distinct) + len(PLAYERS))
    assert check_ledger(snapshot).ok


async def test_concurrent_debits_never_overdraw(store: WalletStore) -> None:
    await store.create_account("house", "EUR", kind="system")
    await store.create_account("alice", "EUR")
    await store.transfer(TransferRequest("fund", "house", "alice", 1_000, "EUR"), now=T0)
    outcomes: Counter[str] = Counter()

    async def spend(i: int) -> None:
        try:
            if i % 2:
                await store.transfer(TransferRequest(f"spend-{i}", "alice", "house", 30, "EUR"), now=T0)
            else:
                await store.hold(HoldRequest(f"bet-{i}", "alice", "house", 30, "EUR", T0 + 60), now=T0)
            outcomes["ok"] += 1
        except WalletError as exc:
            outcomes[exc.code] += 1

    with anyio.fail_after(LIVENESS):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(spend, i)

    # 1000 // 30 = 33 debits fit, whatever the interleaving; every other one is refused.
    assert outcomes == Counter({"ok": 33, "insufficient_funds": 27})
    b = await store.get_balance("alice")
    assert b.available == 1_000 - 33 * 30
    assert b.available >= 0
    assert check_ledger(await store.snapshot()).ok


async def test_racing_settlements_of_one_hold_settle_it_once(store: WalletStore) -> None:
    await store.create_account("house", "EUR", kind="system")
    await store.create_account("alice", "EUR")
    await store.transfer(TransferRequest("fund", "house", "alice", 100, "EUR"), now=T0)
    await store.hold(HoldRequest("bet", "alice", "house", 40, "EUR", T0 + 60), now=T0)
    winners: list[str] = []
    losers: Counter[str] = Counter()

    async def settle(i: int) -> None:
        try:
            if i % 3 == 0:
                await store.void("bet", now=T0 + 1)
                winners.append("void")
            else:
                await store.capture("bet", 10 + i % 3, now=T0 + 1)
                winners.append("capture")
        except WalletError as exc:
            losers[exc.code] += 1

    with anyio.fail_after(LIVENESS):
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(settle, i)

    assert len(winners) == 1
    assert losers == Counter({"hold_not_pending": 11})
    hold = await store.get_transfer("bet")
    assert isinstance(hold, Hold)
    assert hold.status == {"void": "voided", "capture": "captured"}[winners[0]]
    b = await store.get_balance("alice")
    assert (b.available, b.held) == (100 - hold.captured, 0)
    assert check_ledger(await store.snapshot()).ok


async def test_racing_creates_of_one_account_agree(store: WalletStore) -> None:
    results: list[object] = []
    refused: Counter[str] = Counter()

    async def create(i: int) -> None:
        try:
            results.append(await store.create_account("alice", "EUR", owner="alice" if i % 4 else "mallory"))
        except WalletError as exc:
            refused[exc.code] += 1

    with anyio.fail_after(LIVENESS):
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(create, i)

    winner = await store.get_account("alice")
    # Whoever won, every same-field create returned it and every other one was refused.
    assert all(r == winner for r in results)
    assert len(results) + refused["account_exists_with_different_fields"] == 16
    assert len(results) == (12 if winner.owner == "alice" else 4)

"""Reconciliation finds every kind of disagreement (pure, on hand-made snapshots)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from rtcore.wallet import Account, Balance, Entry, LedgerSnapshot
from rtcore.wallet.reconciliation import check_ledger

pytestmark = pytest.mark.anyio

HOUSE = Account("house", "EUR", "system", None)
ALICE = Account("alice", "EUR", "player", 0)


def entry(id: int, account: str, delta: int, available: int, held_delta: int = 0, held: int = 0, **kw: Any) -> Entry:
    fields: dict[str, Any] = {
        "id": id,
        "account": account,
        "currency": "EUR",
        "transfer_id": f"t{id}",
        "reason": "transfer",
        "delta": delta,
        "held_delta": held_delta,
        "available": available,
        "held": held,
        "created_at": 1.0,
    }
    fields.update(kw)
    return Entry(**fields)


def sound() -> LedgerSnapshot:
    """house -> alice 100, then alice holds 30."""
    return LedgerSnapshot(
        accounts=(ALICE, HOUSE),
        balances=(Balance("alice", "EUR", 70, 30), Balance("house", "EUR", -100, 0)),
        entries=(
            entry(1, "house", -100, -100),
            entry(2, "alice", 100, 100),
            entry(3, "alice", -30, 70, held_delta=30, held=30, reason="hold"),
        ),
        unpublished=frozenset({3}),
    )


def kinds(snapshot: LedgerSnapshot, events: Any = None) -> list[tuple[str, str]]:
    return [(m.kind, m.subject) for m in check_ledger(snapshot, events).mismatches]


def test_a_sound_ledger_reconciles() -> None:
    report = check_ledger(sound())
    assert report.ok
    assert (report.accounts, report.entries, report.totals) == (2, 3, {"EUR": 0})


def test_a_stored_balance_that_differs_from_the_entries() -> None:
    snap = msgspec.structs.replace(
        sound(), balances=(Balance("alice", "EUR", 71, 30), Balance("house", "EUR", -100, 0))
    )
    assert kinds(snap) == [("balance", "alice"), ("zero_sum", "EUR")]


def test_an_entry_whose_balance_after_is_wrong() -> None:
    base = sound()
    bad = (*base.entries[:2], entry(3, "alice", -30, 71, held_delta=30, held=30, reason="hold"))
    assert kinds(msgspec.structs.replace(base, entries=bad)) == [("entry_chain", "alice")]


def test_money_created_outside_double_entry() -> None:
    base = sound()
    snap = msgspec.structs.replace(
        base,
        entries=(*base.entries, entry(4, "alice", 5, 75, held=30)),
        balances=(Balance("alice", "EUR", 75, 30), Balance("house", "EUR", -100, 0)),
    )
    assert kinds(snap) == [("zero_sum", "EUR"), ("zero_sum", "EUR")]


def test_a_player_below_the_floor_and_an_unknown_account_and_a_wrong_currency() -> None:
    base = sound()
    snap = msgspec.structs.replace(
        base,
        entries=(
            *base.entries,
            entry(4, "ghost", 1, 1),
            entry(5, "alice", -75, -5, held=30, currency="USD"),
            entry(6, "house", 75, -25),
        ),
        balances=(Balance("alice", "EUR", -5, 30), Balance("house", "EUR", -25, 0)),
    )
    assert sorted(kinds(snap)) == [("currency", "alice"), ("floor", "alice"), ("unknown_account", "ghost")]


def test_streams_are_compared_with_the_last_entry() -> None:
    good = {
        "alice": {"entry_id": 3, "available": 70, "held": 30},
        "house": {"entry_id": 1, "available": -100, "held": 0},
    }
    assert check_ledger(sound(), good).streams_checked == 2
    assert kinds(sound(), good) == []

    wrong_amount = {**good, "alice": {"entry_id": 3, "available": 69, "held": 30}}
    assert kinds(sound(), wrong_amount) == [("stream", "alice")]

    # Behind by entry 3 only, which is still in the outbox: lagging, not broken.
    behind = {**good, "alice": {"entry_id": 2, "available": 100, "held": 0}}
    report = check_ledger(sound(), behind)
    assert report.ok
    assert report.lagging == ("alice",)

    # Behind by an entry that is marked published: the event was lost.
    published = msgspec.structs.replace(sound(), unpublished=frozenset())
    assert kinds(published, behind) == [("stream", "alice")]

    foreign = {**good, "house": {"entry_id": 2, "available": 100, "held": 0}}
    assert kinds(sound(), foreign) == [("stream", "house")]
    no_id = {**good, "house": {"available": 1}}
    assert kinds(sound(), no_id) == [("stream", "house")]
    # Newer than the snapshot: cannot be judged, so not reported.
    assert kinds(sound(), {**good, "alice": {"entry_id": 99, "available": 0, "held": 0}}) == []
    # Only the accounts in the mapping are checked.
    assert check_ledger(sound(), {"alice": good["alice"]}).streams_checked == 1

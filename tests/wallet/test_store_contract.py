"""The WalletStore contract: every engine passes these tests unchanged.

The ``store`` fixture (tests/wallet/conftest.py) gives a fresh SQLite store
and a fresh PostgreSQL schema; the tests never know which one they run on.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from rtcore.errors import BackendError
from rtcore.wallet import (
    Balance,
    HoldRequest,
    TransferRequest,
    WalletError,
    WalletStore,
    open_wallet_store,
    reconcile,
)

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0


async def setup_accounts(store: WalletStore, alice: int = 100) -> None:
    await store.create_account("house", "EUR", kind="system")
    await store.create_account("alice", "EUR", owner="alice")
    await store.create_account("bob", "EUR", owner="bob", floor=-20)
    await store.create_account("carl", "USD")
    if alice:
        await store.transfer(TransferRequest("fund-alice", "house", "alice", alice, "EUR"), now=T0)


async def expect_unchanged(store: WalletStore, code: str, call: Awaitable[Any]) -> WalletError:
    """Await ``call``, expect WalletError ``code``, and check nothing was written."""
    before = await store.snapshot()
    with pytest.raises(WalletError) as info:
        await call
    assert info.value.code == code, info.value
    assert await store.snapshot() == before
    return info.value


async def balance(store: WalletStore, account: str) -> tuple[int, int]:
    b = await store.get_balance(account)
    return b.available, b.held


# -- accounts ------------------------------------------------------------------------


async def test_store_implements_the_protocol(store: WalletStore) -> None:
    assert isinstance(store, WalletStore)


async def test_create_account_is_idempotent_and_rejects_other_fields(store: WalletStore) -> None:
    first = await store.create_account("alice", "EUR", owner="alice")
    assert await store.create_account("alice", "EUR", owner="alice") == first
    assert await store.get_account("alice") == first
    assert await store.get_balance("alice") == Balance("alice", "EUR", 0, 0)
    await expect_unchanged(store, "account_exists_with_different_fields", store.create_account("alice", "USD"))
    await expect_unchanged(store, "invalid_account", store.create_account("a b", "EUR"))


async def test_unknown_account_lookups(store: WalletStore) -> None:
    for call in (store.get_balance("ghost"), store.get_account("ghost"), store.history("ghost")):
        with pytest.raises(WalletError) as info:
            await call
        assert info.value.code == "account_not_found"


# -- transfers -------------------------------------------------------------------------


async def test_transfer_moves_money_and_reports_balance_changes(store: WalletStore) -> None:
    await setup_accounts(store, alice=0)
    result = await store.transfer(TransferRequest("t1", "house", "alice", 250, "EUR", {"why": "deposit"}), now=T0)
    assert not result.replayed
    assert (result.transfer.id, result.transfer.amount, result.transfer.metadata) == ("t1", 250, {"why": "deposit"})
    assert [(c.account, c.available, c.held, c.delta, c.transfer_id, c.reason) for c in result.changes] == [
        ("house", -250, 0, -250, "t1", "transfer"),
        ("alice", 250, 0, 250, "t1", "transfer"),
    ]
    assert result.changes[0].entry_id < result.changes[1].entry_id
    assert await balance(store, "alice") == (250, 0)
    assert await balance(store, "house") == (-250, 0)
    assert await store.get_transfer("t1") == result.transfer
    assert await store.get_transfer("nope") is None


async def test_transfer_same_id_same_fields_returns_the_first_result(store: WalletStore) -> None:
    await setup_accounts(store)
    req = TransferRequest("t1", "alice", "bob", 100, "EUR")
    first = await store.transfer(req, now=T0)
    before = await store.snapshot()
    # alice has nothing left: a second execution would fail; a replay must not.
    again = await store.transfer(req, now=T0 + 50)
    assert again.replayed
    assert (again.transfer, again.changes) == (first.transfer, first.changes)
    assert await store.snapshot() == before


async def test_transfer_same_id_other_fields_is_refused(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.transfer(TransferRequest("t1", "alice", "bob", 10, "EUR"), now=T0)
    for other in (
        TransferRequest("t1", "alice", "bob", 11, "EUR"),
        TransferRequest("t1", "alice", "house", 10, "EUR"),
        TransferRequest("t1", "alice", "bob", 10, "EUR", {"k": "v"}),
    ):
        await expect_unchanged(store, "transfer_exists_with_different_fields", store.transfer(other, now=T0))
    hold = HoldRequest("t1", "alice", "bob", 10, "EUR", T0 + 60)
    await expect_unchanged(store, "transfer_exists_with_different_fields", store.hold(hold, now=T0))


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (TransferRequest("t", "alice", "bob", 0, "EUR"), "invalid_amount"),
        (TransferRequest("t", "alice", "bob", -5, "EUR"), "invalid_amount"),
        (TransferRequest("t", "ghost", "bob", 5, "EUR"), "account_not_found"),
        (TransferRequest("t", "alice", "ghost", 5, "EUR"), "account_not_found"),
        (TransferRequest("t", "alice", "carl", 5, "EUR"), "currency_mismatch"),
        (TransferRequest("t", "alice", "bob", 5, "USD"), "currency_mismatch"),
        (TransferRequest("t", "alice", "bob", 101, "EUR"), "insufficient_funds"),
        (TransferRequest("t", "bob", "alice", 21, "EUR"), "insufficient_funds"),
        (TransferRequest("t", "alice", "alice", 5, "EUR"), "same_account"),
        (TransferRequest("", "alice", "bob", 5, "EUR"), "invalid_id"),
        (TransferRequest("t", "alice", "bob", 5, "EUR", {"k": 5}), "invalid_metadata"),  # type: ignore[dict-item]
    ],
)
async def test_bad_transfers_change_nothing(store: WalletStore, request_: TransferRequest, code: str) -> None:
    await setup_accounts(store)
    await expect_unchanged(store, code, store.transfer(request_, now=T0))


async def test_overdraft_floor_and_system_accounts(store: WalletStore) -> None:
    await setup_accounts(store, alice=0)
    await store.transfer(TransferRequest("b1", "bob", "house", 20, "EUR"), now=T0)
    assert await balance(store, "bob") == (-20, 0)
    await expect_unchanged(store, "insufficient_funds", store.transfer(TransferRequest("b2", "bob", "house", 1, "EUR")))
    await store.transfer(TransferRequest("h1", "house", "alice", 10**12, "EUR"), now=T0)
    assert (await store.get_balance("house")).available == 20 - 10**12


# -- holds --------------------------------------------------------------------------------


async def test_hold_then_partial_capture(store: WalletStore) -> None:
    await setup_accounts(store)
    placed = await store.hold(HoldRequest("bet1", "alice", "house", 40, "EUR", T0 + 60, {"round": "7"}), now=T0)
    assert placed.hold.status == "pending"
    assert [(c.account, c.available, c.held, c.delta, c.held_delta, c.reason) for c in placed.changes] == [
        ("alice", 60, 40, -40, 40, "hold"),
    ]
    assert await balance(store, "alice") == (60, 40)
    await expect_unchanged(store, "insufficient_funds", store.transfer(TransferRequest("t", "alice", "bob", 61, "EUR")))

    captured = await store.capture("bet1", 15, now=T0 + 1)
    assert (captured.hold.status, captured.hold.captured, captured.hold.settled_at) == ("captured", 15, T0 + 1)
    assert [(c.account, c.available, c.held, c.reason) for c in captured.changes] == [
        ("alice", 85, 0, "capture"),
        ("house", -85, 0, "capture"),
    ]
    assert await balance(store, "alice") == (85, 0)
    assert await store.get_transfer("bet1") == captured.hold


async def test_full_capture_and_replayed_hold_shows_current_status(store: WalletStore) -> None:
    await setup_accounts(store)
    req = HoldRequest("bet1", "alice", "house", 40, "EUR", T0 + 60)
    placed = await store.hold(req, now=T0)
    captured = await store.capture("bet1", now=T0 + 1)
    assert captured.hold.captured == 40
    assert await balance(store, "alice") == (60, 0)
    again = await store.hold(req, now=T0 + 2)
    assert again.replayed
    assert again.hold.status == "captured"
    assert again.changes == placed.changes


async def test_void_releases_the_hold(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.hold(HoldRequest("bet1", "alice", "house", 40, "EUR", T0 + 60), now=T0)
    voided = await store.void("bet1", now=T0 + 1)
    assert voided.hold.status == "voided"
    assert [(c.account, c.available, c.held, c.reason) for c in voided.changes] == [("alice", 100, 0, "void")]
    assert await balance(store, "alice") == (100, 0)
    assert await balance(store, "house") == (-100, 0)


async def test_bad_hold_operations_change_nothing(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.hold(HoldRequest("bet1", "alice", "house", 40, "EUR", T0 + 60), now=T0)
    await expect_unchanged(store, "capture_exceeds_hold", store.capture("bet1", 41, now=T0))
    await expect_unchanged(store, "invalid_amount", store.capture("bet1", 0, now=T0))
    await expect_unchanged(store, "invalid_amount", store.capture("bet1", -3, now=T0))
    await expect_unchanged(store, "hold_not_found", store.capture("nope", now=T0))
    await expect_unchanged(store, "hold_not_found", store.void("nope", now=T0))
    await expect_unchanged(store, "hold_not_found", store.capture("fund-alice", now=T0))
    await expect_unchanged(
        store, "insufficient_funds", store.hold(HoldRequest("bet2", "alice", "house", 61, "EUR", T0 + 60), now=T0)
    )
    await expect_unchanged(
        store, "invalid_expiry", store.hold(HoldRequest("bet2", "alice", "house", 1, "EUR", T0), now=T0)
    )
    await expect_unchanged(
        store, "currency_mismatch", store.hold(HoldRequest("bet2", "alice", "carl", 1, "EUR", T0 + 9), now=T0)
    )
    await store.void("bet1", now=T0 + 1)
    await expect_unchanged(store, "hold_not_pending", store.capture("bet1", now=T0 + 2))
    await expect_unchanged(store, "hold_not_pending", store.void("bet1", now=T0 + 2))


async def test_capture_after_void_or_capture_is_refused(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.hold(HoldRequest("bet1", "alice", "house", 10, "EUR", T0 + 60), now=T0)
    await store.capture("bet1", 5, now=T0)
    err = await expect_unchanged(store, "hold_not_pending", store.capture("bet1", 5, now=T0))
    assert "captured" in err.message
    await expect_unchanged(store, "hold_not_pending", store.void("bet1", now=T0))


async def test_expiry(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.hold(HoldRequest("early", "alice", "house", 10, "EUR", T0 + 10), now=T0)
    await store.hold(HoldRequest("late", "alice", "house", 20, "EUR", T0 + 20), now=T0)
    assert await store.expire_holds(T0 + 9.999) == []
    # Past the deadline but not swept yet: refused, and nothing changes.
    await expect_unchanged(store, "hold_not_pending", store.capture("early", now=T0 + 10))
    await expect_unchanged(store, "hold_not_pending", store.void("early", now=T0 + 10))

    expired = await store.expire_holds(T0 + 10)
    assert [(r.hold.id, r.hold.status) for r in expired] == [("early", "expired")]
    assert [(c.account, c.available, c.held, c.reason) for c in expired[0].changes] == [("alice", 80, 20, "expire")]
    assert await store.expire_holds(T0 + 10) == []
    await expect_unchanged(store, "hold_not_pending", store.capture("early", now=T0 + 11))

    await store.capture("late", now=T0 + 19)
    assert await store.expire_holds(T0 + 100) == []
    assert await balance(store, "alice") == (80, 0)


async def test_expire_holds_respects_the_limit(store: WalletStore) -> None:
    await setup_accounts(store)
    for i in range(5):
        await store.hold(HoldRequest(f"h{i}", "alice", "house", 1, "EUR", T0 + 1 + i), now=T0)
    first = await store.expire_holds(T0 + 100, limit=2)
    assert [r.hold.id for r in first] == ["h0", "h1"]
    rest = await store.expire_holds(T0 + 100)
    assert [r.hold.id for r in rest] == ["h2", "h3", "h4"]
    assert await balance(store, "alice") == (100, 0)


# -- history, outbox, reconcile ----------------------------------------------------------------


async def test_history_pages_cover_every_entry_once(store: WalletStore) -> None:
    await setup_accounts(store)
    for i in range(7):
        await store.transfer(TransferRequest(f"t{i}", "alice", "bob", 1, "EUR"), now=T0 + i)
    seen = []
    after = 0
    pages = 0
    while True:
        page = await store.history("alice", after_entry_id=after, limit=3)
        pages += 1
        seen.extend(page.entries)
        if page.next_after is None:
            break
        after = page.next_after
    assert pages == 3
    assert [e.transfer_id for e in seen] == ["fund-alice", *(f"t{i}" for i in range(7))]
    assert [e.available for e in seen] == [100, 99, 98, 97, 96, 95, 94, 93]
    assert all(a.id < b.id for a, b in itertools.pairwise(seen))
    assert (await store.history("alice", after_entry_id=seen[-1].id)).entries == ()
    everything = await store.entries()
    assert len(everything) == 2 * 8
    assert await store.entries(after_entry_id=everything[3].id, limit=2) == everything[4:6]


async def test_outbox_holds_every_change_until_published(store: WalletStore) -> None:
    await setup_accounts(store)
    result = await store.transfer(TransferRequest("t1", "alice", "bob", 5, "EUR"), now=T0)
    pending = await store.unpublished()
    assert [c.entry_id for c in pending] == sorted(c.entry_id for c in pending)
    assert pending[-2:] == list(result.changes)
    await store.mark_published([c.entry_id for c in pending[:-1]])
    assert await store.unpublished() == [result.changes[-1]]
    await store.mark_published([result.changes[-1].entry_id, 999_999])
    await store.mark_published([])
    assert await store.unpublished() == []
    snapshot = await store.snapshot()
    assert snapshot.unpublished == frozenset()


async def test_reconcile_is_clean_after_every_kind_of_operation(store: WalletStore) -> None:
    await setup_accounts(store)
    await store.transfer(TransferRequest("t1", "alice", "bob", 5, "EUR"), now=T0)
    await store.hold(HoldRequest("h1", "alice", "house", 20, "EUR", T0 + 5), now=T0)
    await store.hold(HoldRequest("h2", "bob", "house", 3, "EUR", T0 + 5), now=T0)
    await store.hold(HoldRequest("h3", "bob", "house", 1, "EUR", T0 + 5), now=T0)
    await store.capture("h1", 7, now=T0 + 1)
    await store.void("h2", now=T0 + 1)
    await store.expire_holds(T0 + 5)

    balances = {b.account: b for b in await store.all_balances()}
    assert sorted(balances) == ["alice", "bob", "carl", "house"]
    assert sum(b.total for b in balances.values() if b.currency == "EUR") == 0

    # A stream that has every event is clean; one that lacks only outbox entries is lagging.
    last: dict[str, dict[str, Any]] = {}
    for change in await store.unpublished():
        last[change.account] = {"entry_id": change.entry_id, "available": change.available, "held": change.held}

    async def last_event(account: str) -> dict[str, Any] | None:
        return last.get(account)

    report = await reconcile(store, last_event)
    assert report.ok, report.mismatches
    assert report.totals == {"EUR": 0, "USD": 0}
    assert report.streams_checked == 4
    assert report.lagging == ()

    del last["alice"]  # alice's stream is empty, but all her entries are still in the outbox
    report = await reconcile(store, last_event)
    assert report.ok
    assert report.lagging == ("alice",)

    await store.mark_published([c.entry_id for c in await store.unpublished() if c.account == "alice"])
    report = await reconcile(store, last_event)  # now the stream misses published events
    assert [(m.kind, m.subject) for m in report.mismatches] == [("stream", "alice")]


# -- opening --------------------------------------------------------------------------------


async def test_open_wallet_store_rejects_unknown_urls() -> None:
    with pytest.raises(ValueError, match="unsupported wallet store URL"):
        await open_wallet_store("mysql://x")
    with pytest.raises(ValueError, match="sqlite:///"):
        await open_wallet_store("sqlite://")


async def test_sqlite_store_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    store = await open_wallet_store(url)
    try:
        await setup_accounts(store)
        await store.hold(HoldRequest("h1", "alice", "house", 30, "EUR", T0 + 60), now=T0)
    finally:
        await store.aclose()
    with pytest.raises(BackendError):
        await store.get_balance("alice")
    reopened = await open_wallet_store(url)
    try:
        assert await balance(reopened, "alice") == (70, 30)
        assert (await reopened.capture("h1", now=T0 + 1)).hold.status == "captured"
        assert (await reconcile(reopened)).ok
    finally:
        await reopened.aclose()


async def test_sqlite_unopenable_path_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        await open_wallet_store(f"sqlite:///{tmp_path / 'missing-dir' / 'w.db'}")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_postgres_store_on_trio_is_a_clear_backend_error() -> None:
    """psycopg's async connections run on asyncio only: on trio, opening says so.

    Mutation: drop the asyncio check in PostgresWalletStore.open → psycopg's bare
    "no running event loop" RuntimeError escapes → fails.
    """
    with pytest.raises(BackendError, match="asyncio backend only"):
        await open_wallet_store("postgresql://nobody@127.0.0.1:1/none")

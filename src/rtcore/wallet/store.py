"""The interface every wallet store implements, and the URL opener.

A store is a thin transactional driver around :mod:`rtcore.wallet.ledger`:
each operation is one database transaction that reads the rows the rule
needs (locking them where the engine requires), calls the ``plan_*``
function, and writes the plan: the transfer or hold row, the new balances,
the ledger entries and one outbox row per entry. Either all of it commits or
none of it does, so a crash can never leave a balance that disagrees with the
entries, and every committed entry has an outbox row until its
``balance_changed`` event is known to be in the stream.

Engines:

* ``sqlite:///path.db`` -> :class:`~rtcore.wallet.sqlite_store.SqliteWalletStore`
* ``postgresql://...`` -> :class:`~rtcore.wallet.postgres_store.PostgresWalletStore`
  (needs ``psycopg``; imported only when such a URL is opened).

Every store passes ``tests/wallet/test_store_contract.py`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import msgspec

from .ledger import Account, AccountKind, Balance, BalanceChanged, Entry, Hold, HoldRequest, Transfer, TransferRequest

__all__ = [
    "HistoryPage",
    "HoldResult",
    "LedgerSnapshot",
    "TransferResult",
    "WalletStore",
]


class TransferResult(msgspec.Struct, frozen=True):
    """What :meth:`WalletStore.transfer` returns.

    Attributes:
        transfer: The stored transfer.
        changes: The ``balance_changed`` records of its entries, in entry
            order (for a replay: the original ones, so re-publishing them with
            their entry keys is harmless).
        replayed: True when the id existed with the same fields and nothing
            was written.
    """

    transfer: Transfer
    changes: tuple[BalanceChanged, ...]
    replayed: bool = False


class HoldResult(msgspec.Struct, frozen=True):
    """What the hold operations return.

    Attributes:
        hold: The hold after the operation (for a replayed ``hold``: its
            current status).
        changes: ``balance_changed`` records of the entries written (for a
            replay: those of the original hold), in entry order.
        replayed: True when nothing was written.
    """

    hold: Hold
    changes: tuple[BalanceChanged, ...]
    replayed: bool = False


class HistoryPage(msgspec.Struct, frozen=True):
    """One page of an account's entries, oldest first.

    Attributes:
        entries: Up to ``limit`` entries with id greater than the cursor.
        next_after: Pass as ``after_entry_id`` for the next page, or ``None``
            when this was the last page.
    """

    entries: tuple[Entry, ...]
    next_after: int | None


class LedgerSnapshot(msgspec.Struct, frozen=True):
    """The whole ledger read in one consistent transaction, for reconciliation.

    Attributes:
        accounts: Every account.
        balances: Every stored balance.
        entries: Every entry, in id order.
        unpublished: Ids of entries still in the outbox.
    """

    accounts: tuple[Account, ...]
    balances: tuple[Balance, ...]
    entries: tuple[Entry, ...]
    unpublished: frozenset[int]


@runtime_checkable
class WalletStore(Protocol):
    """A transactional wallet store.

    Every method that takes ``now`` uses the store's clock when it is
    ``None`` (tests pass a fake time). Every method raises
    :class:`~rtcore.wallet.errors.WalletError` for a refused operation (and
    then nothing was changed) and :class:`~rtcore.errors.BackendError` when
    the engine failed (and then the operation may be retried with the same id).
    """

    async def create_account(
        self,
        id: str,
        currency: str,
        *,
        kind: AccountKind = "player",
        floor: int | None = None,
        owner: str | None = None,
    ) -> Account:
        """Create an account with a zero balance (idempotent for the same fields)."""
        ...

    async def get_account(self, account_id: str) -> Account:
        """Return an account, or raise ``account_not_found``."""
        ...

    async def get_balance(self, account_id: str) -> Balance:
        """Return an account's balance, or raise ``account_not_found``."""
        ...

    async def transfer(self, request: TransferRequest, *, now: float | None = None) -> TransferResult:
        """Post a transfer (see :func:`~rtcore.wallet.ledger.plan_transfer`)."""
        ...

    async def hold(self, request: HoldRequest, *, now: float | None = None) -> HoldResult:
        """Place a hold (see :func:`~rtcore.wallet.ledger.plan_hold`)."""
        ...

    async def capture(self, hold_id: str, amount: int | None = None, *, now: float | None = None) -> HoldResult:
        """Capture all or part of a pending hold; the rest is released."""
        ...

    async def void(self, hold_id: str, *, now: float | None = None) -> HoldResult:
        """Void a pending hold, releasing all of it."""
        ...

    async def expire_holds(self, now: float | None = None, *, limit: int = 1000) -> list[HoldResult]:
        """Expire up to ``limit`` pending holds whose deadline is ``<= now``.

        Each hold is expired in its own transaction; the results are in the
        order they were committed.
        """
        ...

    async def get_transfer(self, transfer_id: str) -> Transfer | Hold | None:
        """Return the transfer or hold with this id, if any."""
        ...

    async def history(self, account_id: str, after_entry_id: int = 0, limit: int = 100) -> HistoryPage:
        """Page through an account's entries in id order (raise ``account_not_found``)."""
        ...

    async def all_balances(self) -> list[Balance]:
        """Every account's balance, ordered by account id."""
        ...

    async def entries(self, after_entry_id: int = 0, limit: int = 1000) -> list[Entry]:
        """Entries of all accounts with id > ``after_entry_id``, in id order."""
        ...

    async def snapshot(self) -> LedgerSnapshot:
        """Accounts, balances, entries and the outbox, read in one transaction."""
        ...

    async def unpublished(self, limit: int = 1000) -> list[BalanceChanged]:
        """``balance_changed`` records still in the outbox, in entry order."""
        ...

    async def mark_published(self, entry_ids: Iterable[int]) -> None:
        """Remove entries from the outbox once their event is in the stream."""
        ...

    async def aclose(self) -> None:
        """Close the store's connections."""
        ...

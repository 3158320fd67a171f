"""Open a wallet store by URL: picks the engine module for the scheme.

Kept apart from :mod:`.store` (the interface) so the engines can import the
interface without the interface importing them back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import anyio

from .ledger import Account, AccountKind, Balance, BalanceChanged, Entry, Hold, HoldRequest, Transfer, TransferRequest
from .store import HistoryPage, HoldResult, LedgerSnapshot, TransferResult, WalletStore

__all__ = ["LazyWalletStore", "open_wallet_store"]


async def open_wallet_store(url: str) -> WalletStore:
    """Open (and create the tables of) the wallet store named by ``url``.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, or a
            libpq URL ``postgresql://user@host:port/db``; a ``schema=name``
            query parameter selects the PostgreSQL schema (created if missing).

    Returns:
        An open store; close it with :meth:`WalletStore.aclose`.

    Raises:
        ValueError: unknown scheme.
        BackendError: the database could not be opened.
    """
    if url.startswith("sqlite://"):
        from .sqlite_store import SqliteWalletStore

        return await SqliteWalletStore.open(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_store import PostgresWalletStore

        return await PostgresWalletStore.open(url)
    raise ValueError(f"unsupported wallet store URL {url!r}: use sqlite:///path.db or postgresql://...")


class LazyWalletStore:
    """A :class:`WalletStore` that opens ``url`` on first use, in the running event loop.

    Why: an application module declares its app at import time
    (``rtcore.wallet.install(app, "sqlite:///wallet.db")``) and is then served
    by ``rtcore.run`` or ``rtcore serve``, which start the event loop
    themselves. Connection pools and worker-thread limiters belong to the loop
    that created them, so the store cannot be opened at import time; this
    wrapper opens it the first time a command, loop or reconcile needs it.

    The opened store belongs to the first event loop that used it; after
    :meth:`aclose` the next call opens a fresh one.

    Args:
        url: A URL for :func:`open_wallet_store`.
        opener: Opens the URL (for tests and custom store options).
    """

    def __init__(self, url: str, opener: Callable[[str], Awaitable[WalletStore]] | None = None) -> None:
        self.url = url
        self._opener = opener or open_wallet_store
        self._store: WalletStore | None = None
        self._lock: anyio.Lock | None = None

    async def opened(self) -> WalletStore:
        """The underlying store, opening it (once, even when called concurrently) if needed."""
        if self._store is not None:
            return self._store
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._store is None:
                self._store = await self._opener(self.url)
            return self._store

    async def create_account(
        self,
        id: str,
        currency: str,
        *,
        kind: AccountKind = "player",
        floor: int | None = None,
        owner: str | None = None,
    ) -> Account:
        """See :meth:`WalletStore.create_account`."""
        return await (await self.opened()).create_account(id, currency, kind=kind, floor=floor, owner=owner)

    async def get_account(self, account_id: str) -> Account:
        """See :meth:`WalletStore.get_account`."""
        return await (await self.opened()).get_account(account_id)

    async def get_balance(self, account_id: str) -> Balance:
        """See :meth:`WalletStore.get_balance`."""
        return await (await self.opened()).get_balance(account_id)

    async def transfer(self, request: TransferRequest, *, now: float | None = None) -> TransferResult:
        """See :meth:`WalletStore.transfer`."""
        return await (await self.opened()).transfer(request, now=now)

    async def hold(self, request: HoldRequest, *, now: float | None = None) -> HoldResult:
        """See :meth:`WalletStore.hold`."""
        return await (await self.opened()).hold(request, now=now)

    async def capture(self, hold_id: str, amount: int | None = None, *, now: float | None = None) -> HoldResult:
        """See :meth:`WalletStore.capture`."""
        return await (await self.opened()).capture(hold_id, amount, now=now)

    async def void(self, hold_id: str, *, now: float | None = None) -> HoldResult:
        """See :meth:`WalletStore.void`."""
        return await (await self.opened()).void(hold_id, now=now)

    async def expire_holds(self, now: float | None = None, *, limit: int = 1000) -> list[HoldResult]:
        """See :meth:`WalletStore.expire_holds`."""
        return await (await self.opened()).expire_holds(now, limit=limit)

    async def get_transfer(self, transfer_id: str) -> Transfer | Hold | None:
        """See :meth:`WalletStore.get_transfer`."""
        return await (await self.opened()).get_transfer(transfer_id)

    async def history(self, account_id: str, after_entry_id: int = 0, limit: int = 100) -> HistoryPage:
        """See :meth:`WalletStore.history`."""
        return await (await self.opened()).history(account_id, after_entry_id, limit)

    async def all_balances(self) -> list[Balance]:
        """See :meth:`WalletStore.all_balances`."""
        return await (await self.opened()).all_balances()

    async def entries(self, after_entry_id: int = 0, limit: int = 1000) -> list[Entry]:
        """See :meth:`WalletStore.entries`."""
        return await (await self.opened()).entries(after_entry_id, limit)

    async def snapshot(self) -> LedgerSnapshot:
        """See :meth:`WalletStore.snapshot`."""
        return await (await self.opened()).snapshot()

    async def unpublished(self, limit: int = 1000) -> list[BalanceChanged]:
        """See :meth:`WalletStore.unpublished`."""
        return await (await self.opened()).unpublished(limit)

    async def mark_published(self, entry_ids: Iterable[int]) -> None:
        """See :meth:`WalletStore.mark_published`."""
        await (await self.opened()).mark_published(entry_ids)

    async def aclose(self) -> None:
        """Close the underlying store if it was opened (a later call reopens it)."""
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()

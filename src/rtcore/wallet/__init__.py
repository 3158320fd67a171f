"""A ledger-grade wallet: double-entry transfers and holds in integer minor units.

Layers (each only knows the ones below it):

* :mod:`rtcore.wallet.ledger` - the rules, pure (sans-IO, ``now`` passed in);
* :mod:`rtcore.wallet.store` - the :class:`WalletStore` interface and
  :func:`open_wallet_store`; engines in :mod:`~rtcore.wallet.sqlite_store`
  and :mod:`~rtcore.wallet.postgres_store` run the rules in real transactions;
* :mod:`rtcore.wallet.reconcile` - proves balances, entries and streams agree;
* :mod:`rtcore.wallet.commands` - the ``wallet.*`` commands for an App:
  ``app.include(rtcore.wallet.commands(store))``, or
  ``rtcore.wallet.install(app, store_or_url)`` which also schedules the
  sweep (hold expiry and outbox flush) as an ``@app.loop``;
* :mod:`rtcore.wallet.cli` - ``rtcore wallet reconcile``.

``rtcore.wallet.commands`` is the router factory (a function), not the module:
the package re-exports it under the module's name so the one-liner above reads
naturally. Import argument types with ``from rtcore.wallet.commands import ...``.

See docs/wallet.md for the model, the guarantees and the error codes.
"""

from __future__ import annotations

from .commands import WalletRouter, commands, install, last_balance_event
from .errors import WALLET_ERROR_CODES, WalletError
from .ledger import (
    Account,
    Balance,
    BalanceChanged,
    Entry,
    Hold,
    HoldRequest,
    Transfer,
    TransferRequest,
)
from .reconcile import Mismatch, ReconcileReport, check_ledger, reconcile
from .store import (
    HistoryPage,
    HoldResult,
    LazyWalletStore,
    LedgerSnapshot,
    TransferResult,
    WalletStore,
    open_wallet_store,
)

__all__ = [
    "WALLET_ERROR_CODES",
    "Account",
    "Balance",
    "BalanceChanged",
    "Entry",
    "HistoryPage",
    "Hold",
    "HoldRequest",
    "HoldResult",
    "LazyWalletStore",
    "LedgerSnapshot",
    "Mismatch",
    "ReconcileReport",
    "Transfer",
    "TransferRequest",
    "TransferResult",
    "WalletError",
    "WalletRouter",
    "WalletStore",
    "check_ledger",
    "commands",
    "install",
    "last_balance_event",
    "open_wallet_store",
    "reconcile",
]

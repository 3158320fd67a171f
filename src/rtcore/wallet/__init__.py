"""A ledger-grade wallet: double-entry transfers and holds in integer minor units.

Layers (each only knows the ones below it):

* :mod:`rtcore.wallet.ledger` - the rules, pure (sans-IO, ``now`` passed in);
* :mod:`rtcore.wallet.store` - the :class:`WalletStore` interface and
  :func:`open_wallet_store`; engines in :mod:`~rtcore.wallet.sqlite_store`
  and :mod:`~rtcore.wallet.postgres_store` run the rules in real transactions;
* :mod:`rtcore.wallet.reconcile` - proves balances, entries and streams agree.

See docs/wallet.md for the model, the guarantees and the error codes.
"""

from __future__ import annotations

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
from .store import HistoryPage, HoldResult, LedgerSnapshot, TransferResult, WalletStore, open_wallet_store

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
    "LedgerSnapshot",
    "Mismatch",
    "ReconcileReport",
    "Transfer",
    "TransferRequest",
    "TransferResult",
    "WalletError",
    "WalletStore",
    "check_ledger",
    "open_wallet_store",
    "reconcile",
]

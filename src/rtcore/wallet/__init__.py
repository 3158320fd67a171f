"""A ledger-grade wallet: double-entry transfers and holds in integer minor units.

Layers (each only knows the ones below it):

* :mod:`rtcore.wallet.ledger` - the rules, pure (sans-IO, ``now`` passed in);
* :mod:`rtcore.wallet.store` - the :class:`WalletStore` interface and
  :func:`open_wallet_store`; engines in :mod:`~rtcore.wallet.sqlite_store`
  and :mod:`~rtcore.wallet.postgres_store` run the rules in real transactions;
* :mod:`rtcore.wallet.reconciliation` - proves balances, entries and streams agree;
* :mod:`rtcore.wallet.router` - the ``wallet.*`` commands for an App:
  ``app.include(rtcore.wallet.commands(store))``, or
  ``rtcore.wallet.install(app, store_or_url)`` which also schedules the
  sweep (hold expiry and outbox flush) as an ``@app.loop``; given a URL, the
  router's lifespan opens the store when a node starts and closes it when
  the node stops;
* :mod:`rtcore.wallet.cli` - ``rtcore wallet reconcile``.

``rtcore.wallet.commands`` is the router factory (a function) from
:mod:`rtcore.wallet.router`. Import argument types with
``from rtcore.wallet.router import ...``.

See docs/wallet.md for the model, the guarantees and the error codes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import WALLET_ERROR_CODES, WalletError

if TYPE_CHECKING:
    from .engines import open_wallet_store
    from .ledger import Account, Balance, BalanceChanged, Entry, Hold, HoldRequest, Transfer, TransferRequest
    from .reconciliation import Mismatch, ReconcileReport, check_ledger, reconcile
    from .router import WalletRouter, commands, install, last_balance_event
    from .store import (
        HistoryPage,
        HoldResult,
        LedgerSnapshot,
        TransferResult,
        WalletStore,
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


# Public names are imported on first use (as websockets does), so that
# importing a sans-IO submodule such as ``rtcore.protocol.frames`` does not load
# the engine, the server and anyio through this package's ``__init__``.
_LAZY: dict[str, str] = {
    "Account": ".ledger",
    "Balance": ".ledger",
    "BalanceChanged": ".ledger",
    "check_ledger": ".reconciliation",
    "commands": ".router",
    "Entry": ".ledger",
    "HistoryPage": ".store",
    "Hold": ".ledger",
    "HoldRequest": ".ledger",
    "HoldResult": ".store",
    "install": ".router",
    "last_balance_event": ".router",
    "LedgerSnapshot": ".store",
    "Mismatch": ".reconciliation",
    "open_wallet_store": ".engines",
    "reconcile": ".reconciliation",
    "ReconcileReport": ".reconciliation",
    "Transfer": ".ledger",
    "TransferRequest": ".ledger",
    "TransferResult": ".store",
    "WalletRouter": ".router",
    "WalletStore": ".store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

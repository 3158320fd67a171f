"""Wallet error codes and the one exception class that carries them.

Every refusal of the ledger is a :class:`WalletError`, a subclass of
:class:`rtcore.errors.Rejected`, so the command layer and both transports
answer it like any other application rejection (``err`` frame, HTTP status)
without knowing the wallet exists. The table :data:`WALLET_ERROR_CODES` is the
single source of truth for the code list: ``docs/wallet.md`` is checked
against it by a test, and :class:`WalletError` takes ``retryable`` and
``http_status`` from it so that no call site can disagree with the docs.

The codes live here rather than in :data:`rtcore.errors.ERROR_CODES` because
they are the wallet's contract, not the wire protocol's: rtcore's core never
emits them.

Every wallet error means *nothing was changed*: the stores raise it from inside
their transaction, which is then rolled back.
"""

from __future__ import annotations

from typing import Final

from ..errors import ErrorInfo, Rejected

__all__ = ["WALLET_ERROR_CODES", "WalletError"]

#: Every code the wallet raises. Business-rule refusals are 422 (the request
#: was understood but the ledger says no), malformed input is 400, unknown
#: objects 404, and id reuse 409. None is retryable: sending the same request
#: again gives the same answer until something *else* changes the ledger.
WALLET_ERROR_CODES: Final[dict[str, ErrorInfo]] = {
    "invalid_amount": ErrorInfo(False, 400, "The amount is not a positive integer of minor units (or is too large)."),
    "invalid_id": ErrorInfo(False, 400, "A transfer or hold id is empty, too long or not printable."),
    "invalid_account": ErrorInfo(False, 400, "An account definition is malformed (id, currency, kind or floor)."),
    "invalid_metadata": ErrorInfo(False, 400, "Metadata must be a small map of strings to strings."),
    "invalid_expiry": ErrorInfo(False, 400, "A hold must expire strictly after it is created."),
    "same_account": ErrorInfo(False, 400, "The debit and credit accounts are the same account."),
    "account_not_found": ErrorInfo(False, 404, "No account has this id."),
    "account_exists_with_different_fields": ErrorInfo(
        False, 409, "An account with this id exists with another currency, kind, floor or owner."
    ),
    "currency_mismatch": ErrorInfo(False, 422, "The accounts and the request do not all use the same currency."),
    "insufficient_funds": ErrorInfo(False, 422, "The debit account's available balance would fall below its floor."),
    "balance_overflow": ErrorInfo(False, 422, "A balance would leave the range the stores can represent."),
    "hold_not_found": ErrorInfo(False, 404, "No hold has this id."),
    "hold_not_pending": ErrorInfo(False, 409, "The hold was already captured, voided or has expired."),
    "capture_exceeds_hold": ErrorInfo(False, 422, "The capture amount is larger than the amount held."),
    "transfer_exists_with_different_fields": ErrorInfo(
        False, 409, "A transfer or hold with this id exists with other fields."
    ),
}


class WalletError(Rejected):
    """A ledger rule refused the operation; nothing was changed.

    ``retryable`` and ``http_status`` come from :data:`WALLET_ERROR_CODES`.

    Example::

        raise WalletError("insufficient_funds", "alice has 3 available, needs 5")
    """

    def __init__(self, code: str, message: str = "") -> None:
        info = WALLET_ERROR_CODES[code]
        super().__init__(code, message or info.description, retryable=info.retryable, http_status=info.http_status)

"""The wallet's ledger rules, with no I/O (sans-IO).

Rule 1: every decision about money lives in this module. The stores only load
rows, call one ``plan_*`` function inside their transaction and write what it
returns; so SQLite, PostgreSQL and the tests' model all obey the same rules
byte for byte. Nothing here imports anyio, sockets or a clock: ``now`` is
always passed in.

The model
---------

* An :class:`Account` holds one currency. ``player`` accounts may not let
  their ``available`` balance drop below their ``floor`` (0 unless an
  overdraft floor such as -500 is given); ``system`` accounts (the house, the
  mint, fees) have no floor unless one is given.
* Amounts are ``int`` minor units (cents), never floats.
* A :class:`Balance` has ``available`` (spendable) and ``held`` (reserved by
  pending holds). Their sum is the *posted* balance.
* Double entry: every operation produces postings whose posted deltas sum to
  zero, so for every currency the sum of ``available + held`` over all
  accounts is always exactly zero. Money is created only by debiting a
  system account.

The operations and the postings they produce (``Δavailable``, ``Δheld``)::

    transfer  a -> b, n        a: (-n, 0)         b: (+n, 0)
    hold      a -> b, n        a: (-n, +n)        (b is untouched until capture)
    capture   c of hold n      a: (n - c, -n)     b: (+c, 0)   the rest is released
    void      hold n           a: (+n, -n)
    expire    hold n           a: (+n, -n)

Overdraft checks use ``available`` only, so funds reserved by a hold can no
longer be spent: a hold is as binding as a transfer. Capture and release
never need a check (they only give back what the hold took).

Idempotency
-----------

Transfers and holds share one id space. Asking again for an id that exists
with the same fields is not an error: the ``plan_*`` function returns
:class:`Replay` with the stored record and the store answers the first result
without writing anything. The same id with any other field (including
transfer versus hold) raises ``transfer_exists_with_different_fields``.
Accounts follow the same rule (``account_exists_with_different_fields``).

Error order is fixed, so every store reports the same code for the same
input: malformed request, then id reuse, then missing accounts, then
currencies, then funds. Every error is a
:class:`~rtcore.wallet.errors.WalletError` and means nothing was changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

import msgspec

from .errors import WalletError

__all__ = [
    "MAX_AMOUNT",
    "MAX_BALANCE",
    "Account",
    "AccountKind",
    "Balance",
    "BalanceChanged",
    "Entry",
    "Hold",
    "HoldRequest",
    "HoldStatus",
    "Plan",
    "Posting",
    "Reason",
    "Replay",
    "Transfer",
    "TransferRequest",
    "balance_changed",
    "check_account_reuse",
    "new_account",
    "plan_capture",
    "plan_expire",
    "plan_hold",
    "plan_transfer",
    "plan_void",
    "validate_hold",
    "validate_transfer",
]

AccountKind = Literal["player", "system"]
HoldStatus = Literal["pending", "captured", "voided", "expired"]
#: Why an entry was written; also the ``reason`` of its ``balance_changed``.
Reason = Literal["transfer", "hold", "capture", "void", "expire"]

#: Largest amount of one transfer or hold, in minor units.
MAX_AMOUNT: Final = 10**15
#: Largest absolute balance; keeps every number inside a signed 64-bit column.
MAX_BALANCE: Final = 2**62

_MAX_ID_BYTES: Final = 128
_CURRENCY: Final = re.compile(r"[A-Z][A-Z0-9_]{0,15}")
_MAX_METADATA_KEYS: Final = 32
_MAX_METADATA_KEY: Final = 64
_MAX_METADATA_VALUE: Final = 512

Metadata = dict[str, str]


# -- rows -------------------------------------------------------------------


class Account(msgspec.Struct, frozen=True):
    """One account; immutable once created.

    Attributes:
        id: Account id, 1-128 bytes of printable non-space characters (it
            names the stream ``wallet:{id}``).
        currency: Currency code such as ``"EUR"`` or ``"CHIPS"``
            (``[A-Z][A-Z0-9_]{0,15}``).
        kind: ``"player"`` (floor defaults to 0) or ``"system"`` (no floor
            unless given).
        floor: Lowest ``available`` balance allowed (0 or negative for an
            overdraft); ``None`` means unbounded (system accounts only).
        owner: Id of the principal who owns the account, if any; the command
            layer uses it for authorization.
    """

    id: str
    currency: str
    kind: AccountKind = "player"
    floor: int | None = 0
    owner: str | None = None


class Balance(msgspec.Struct, frozen=True):
    """An account's balance at one moment.

    Attributes:
        account: Account id.
        currency: The account's currency.
        available: Spendable amount (what overdraft checks look at).
        held: Amount reserved by pending holds.
    """

    account: str
    currency: str
    available: int = 0
    held: int = 0

    @property
    def total(self) -> int:
        """Posted balance: ``available + held``."""
        return self.available + self.held


class TransferRequest(msgspec.Struct, frozen=True):
    """Move ``amount`` from ``debit`` to ``credit`` now.

    Attributes:
        id: Caller-chosen unique id; retrying with the same id and fields
            returns the first result.
        debit: Account the money leaves.
        credit: Account the money enters.
        amount: Positive integer of minor units.
        currency: Must be the currency of both accounts.
        metadata: Small string map stored with the transfer (game, round...).
    """

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    metadata: Metadata = msgspec.field(default_factory=dict)


class HoldRequest(msgspec.Struct, frozen=True):
    """Reserve ``amount`` on ``debit`` for a later capture to ``credit``.

    Attributes:
        id: Caller-chosen unique id (shares the id space of transfers).
        debit: Account whose funds are reserved (the player placing a bet).
        credit: Account that receives the captured part (the house).
        amount: Positive integer of minor units.
        currency: Must be the currency of both accounts.
        expires_at: Unix time after which the hold can no longer be captured
            and is released by ``expire_holds``.
        metadata: Small string map stored with the hold.
    """

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    expires_at: float
    metadata: Metadata = msgspec.field(default_factory=dict)


class Transfer(msgspec.Struct, frozen=True):
    """A posted transfer as stored.

    Attributes:
        id: Transfer id.
        debit: Debited account.
        credit: Credited account.
        amount: Amount moved.
        currency: Currency of both accounts.
        metadata: The request's metadata.
        created_at: When it was posted (Unix seconds).
    """

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    metadata: Metadata
    created_at: float


class Hold(msgspec.Struct, frozen=True):
    """A hold (pending transfer) as stored.

    Attributes:
        id: Hold id.
        debit: Account whose funds are reserved.
        credit: Account that receives the captured amount.
        amount: Amount reserved.
        currency: Currency of both accounts.
        expires_at: Deadline for capture (Unix seconds).
        metadata: The request's metadata.
        created_at: When the hold was placed.
        status: ``pending`` until captured, voided or expired.
        captured: Amount moved to ``credit`` (0 unless captured).
        settled_at: When the status left ``pending``.
    """

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    expires_at: float
    metadata: Metadata
    created_at: float
    status: HoldStatus = "pending"
    captured: int = 0
    settled_at: float | None = None


class Entry(msgspec.Struct, frozen=True):
    """One ledger line: one account's balance change, with the balance after it.

    Entries are append-only. Their ids increase in commit order per account,
    so an account's entries replayed in id order rebuild its balance, and
    ``available``/``held`` of its newest entry *are* its balance.

    Attributes:
        id: Entry id assigned by the store (increasing).
        account: Account changed.
        currency: Its currency.
        transfer_id: The transfer or hold that caused the change.
        reason: Which operation.
        delta: Change of ``available``.
        held_delta: Change of ``held``.
        available: ``available`` after this entry.
        held: ``held`` after this entry.
        created_at: When it was written.
    """

    id: int
    account: str
    currency: str
    transfer_id: str
    reason: Reason
    delta: int
    held_delta: int
    available: int
    held: int
    created_at: float


class BalanceChanged(msgspec.Struct, frozen=True):
    """Data of the ``balance_changed`` event appended to ``wallet:{account}``.

    Attributes:
        account: Account changed.
        currency: Its currency.
        available: ``available`` after the change.
        held: ``held`` after the change.
        delta: Change of ``available``.
        held_delta: Change of ``held``.
        transfer_id: The transfer or hold that caused it.
        entry_id: The ledger entry; publish with ``key=f"entry:{entry_id}"``
            so a re-publish never doubles the event.
        reason: ``transfer``, ``hold``, ``capture``, ``void`` or ``expire``.
    """

    account: str
    currency: str
    available: int
    held: int
    delta: int
    held_delta: int
    transfer_id: str
    entry_id: int
    reason: Reason


def balance_changed(entry: Entry) -> BalanceChanged:
    """The ``balance_changed`` event data for a ledger entry."""
    return BalanceChanged(
        account=entry.account,
        currency=entry.currency,
        available=entry.available,
        held=entry.held,
        delta=entry.delta,
        held_delta=entry.held_delta,
        transfer_id=entry.transfer_id,
        entry_id=entry.id,
        reason=entry.reason,
    )


# -- plans --------------------------------------------------------------------


class Posting(msgspec.Struct, frozen=True):
    """An entry to write, before the store gives it an id.

    Attributes:
        account: Account changed.
        currency: Its currency.
        reason: Which operation.
        delta: Change of ``available``.
        held_delta: Change of ``held``.
        available: ``available`` after the change.
        held: ``held`` after the change.
    """

    account: str
    currency: str
    reason: Reason
    delta: int
    held_delta: int
    available: int
    held: int


class Plan(msgspec.Struct, frozen=True):
    """What a store must write, atomically, to carry out one operation.

    Attributes:
        record: The transfer or hold to insert (``insert=True``) or the hold
            to update (its new status).
        insert: Whether ``record`` is new.
        postings: Entries to append, in this order (debit side first).
        balances: New balances of the accounts the postings touch.
    """

    record: Transfer | Hold
    insert: bool
    postings: tuple[Posting, ...]
    balances: tuple[Balance, ...]


class Replay(msgspec.Struct, frozen=True):
    """The id exists with the same fields: answer the stored record, write nothing.

    Attributes:
        record: The stored transfer or hold (a hold in its current status).
    """

    record: Transfer | Hold


# -- validation -----------------------------------------------------------------


def _valid_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value.encode()) <= _MAX_ID_BYTES
        and value.isprintable()
        and not any(ch.isspace() for ch in value)
    )


def _is_int(value: object) -> bool:
    # bool is an int subclass; True is not an amount of money.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_amount(amount: object) -> int:
    if not _is_int(amount):
        raise WalletError("invalid_amount", f"amount must be an integer of minor units, got {amount!r}")
    assert isinstance(amount, int)
    if amount <= 0:
        raise WalletError("invalid_amount", f"amount must be positive, got {amount}")
    if amount > MAX_AMOUNT:
        raise WalletError("invalid_amount", f"amount must be at most {MAX_AMOUNT}, got {amount}")
    return amount


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, Mapping):
        raise WalletError("invalid_metadata", "metadata must be a map of strings to strings")
    if len(metadata) > _MAX_METADATA_KEYS:
        raise WalletError("invalid_metadata", f"metadata has more than {_MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_METADATA_KEY:
            raise WalletError(
                "invalid_metadata", f"metadata key {key!r} must be a string of 1-{_MAX_METADATA_KEY} chars"
            )
        if not isinstance(value, str) or len(value) > _MAX_METADATA_VALUE:
            raise WalletError(
                "invalid_metadata", f"metadata[{key!r}] must be a string of at most {_MAX_METADATA_VALUE} chars"
            )


def _check_request(id: str, debit: str, credit: str, amount: int, metadata: object) -> None:
    if not _valid_id(id):
        raise WalletError("invalid_id", f"id {id!r} must be 1-{_MAX_ID_BYTES} bytes of printable non-space characters")
    _check_amount(amount)
    for side, account in (("debit", debit), ("credit", credit)):
        if not isinstance(account, str) or not account:
            raise WalletError("account_not_found", f"{side} account {account!r} is not an account id")
    if debit == credit:
        raise WalletError("same_account", f"debit and credit are both {debit!r}")
    _check_metadata(metadata)


def validate_transfer(req: TransferRequest) -> None:
    """Check what can be checked without reading any row.

    Raises:
        WalletError: ``invalid_id``, ``invalid_amount``, ``account_not_found``
            (empty account id), ``same_account`` or ``invalid_metadata``.
    """
    _check_request(req.id, req.debit, req.credit, req.amount, req.metadata)


def validate_hold(req: HoldRequest, now: float) -> None:
    """Like :func:`validate_transfer`, plus the expiry must be after ``now``.

    Raises:
        WalletError: as :func:`validate_transfer`, or ``invalid_expiry``.
    """
    _check_request(req.id, req.debit, req.credit, req.amount, req.metadata)
    expires_at = req.expires_at
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or expires_at != expires_at:
        raise WalletError("invalid_expiry", f"expires_at must be a Unix time, got {expires_at!r}")
    if expires_at <= now:
        raise WalletError("invalid_expiry", f"expires_at {expires_at} is not after now ({now})")


def new_account(
    id: str,
    currency: str,
    *,
    kind: AccountKind = "player",
    floor: int | None = None,
    owner: str | None = None,
) -> Account:
    """Validate and normalize an account definition.

    Args:
        id: Account id.
        currency: Currency code.
        kind: ``"player"`` or ``"system"``.
        floor: Overdraft floor (0 or negative). ``None`` means 0 for a player
            and unbounded for a system account.
        owner: Owning principal id, if any.

    Returns:
        The account to store.

    Raises:
        WalletError: ``invalid_account`` naming the bad field.
    """
    if not _valid_id(id):
        raise WalletError(
            "invalid_account", f"account id {id!r} must be 1-{_MAX_ID_BYTES} bytes of printable non-space characters"
        )
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise WalletError("invalid_account", f"currency {currency!r} must match [A-Z][A-Z0-9_]{{0,15}}")
    if kind not in ("player", "system"):
        raise WalletError("invalid_account", f"kind must be 'player' or 'system', got {kind!r}")
    if floor is None:
        floor = 0 if kind == "player" else None
    elif not _is_int(floor) or floor > 0 or floor < -MAX_BALANCE:
        raise WalletError("invalid_account", f"floor must be an integer <= 0, got {floor!r}")
    if owner is not None and not _valid_id(owner):
        raise WalletError("invalid_account", f"owner {owner!r} must be a principal id")
    return Account(id=id, currency=currency, kind=kind, floor=floor, owner=owner)


def check_account_reuse(existing: Account, wanted: Account) -> Account:
    """Decide a ``create_account`` for an id that already exists.

    Returns:
        ``existing`` when ``wanted`` has the same fields (idempotent create).

    Raises:
        WalletError: ``account_exists_with_different_fields``.
    """
    if existing != wanted:
        raise WalletError(
            "account_exists_with_different_fields",
            f"account {existing.id!r} exists as {_describe_account(existing)}, not {_describe_account(wanted)}",
        )
    return existing


def _describe_account(a: Account) -> str:
    return f"{a.kind} {a.currency} floor={a.floor} owner={a.owner}"


# -- rules ------------------------------------------------------------------------


def _require(balance: Balance | None, account_id: str, accounts: Mapping[str, Account]) -> Account:
    account = accounts.get(account_id)
    if balance is None or account is None:
        raise WalletError("account_not_found", f"no account {account_id!r}")
    return account


def _check_currency(currency: str, debit: Account, credit: Account) -> None:
    if debit.currency != credit.currency:
        raise WalletError(
            "currency_mismatch", f"{debit.id!r} holds {debit.currency}, {credit.id!r} holds {credit.currency}"
        )
    if currency != debit.currency:
        raise WalletError("currency_mismatch", f"request is in {currency!r}, the accounts hold {debit.currency}")


def _check_range(*values: int) -> None:
    for value in values:
        if not -MAX_BALANCE <= value <= MAX_BALANCE:
            raise WalletError("balance_overflow", f"a balance would become {value}")


def _change(balance: Balance, reason: Reason, delta: int, held_delta: int) -> tuple[Posting, Balance]:
    available = balance.available + delta
    held = balance.held + held_delta
    _check_range(available, held, available + held)
    after = Balance(account=balance.account, currency=balance.currency, available=available, held=held)
    posting = Posting(
        account=balance.account,
        currency=balance.currency,
        reason=reason,
        delta=delta,
        held_delta=held_delta,
        available=available,
        held=held,
    )
    return posting, after


def _check_funds(account: Account, balance: Balance, amount: int) -> None:
    if account.floor is not None and balance.available - amount < account.floor:
        raise WalletError(
            "insufficient_funds",
            f"{account.id!r} has {balance.available} available (floor {account.floor}), needs {amount}",
        )


def _same_transfer(existing: Transfer | Hold, req: TransferRequest) -> bool:
    return isinstance(existing, Transfer) and (
        existing.debit,
        existing.credit,
        existing.amount,
        existing.currency,
        existing.metadata,
    ) == (req.debit, req.credit, req.amount, req.currency, dict(req.metadata))


def _same_hold(existing: Transfer | Hold, req: HoldRequest) -> bool:
    return isinstance(existing, Hold) and (
        existing.debit,
        existing.credit,
        existing.amount,
        existing.currency,
        existing.expires_at,
        existing.metadata,
    ) == (req.debit, req.credit, req.amount, req.currency, req.expires_at, dict(req.metadata))


def _reused(existing: Transfer | Hold) -> WalletError:
    kind = "transfer" if isinstance(existing, Transfer) else "hold"
    return WalletError(
        "transfer_exists_with_different_fields",
        f"a {kind} with id {existing.id!r} exists with other fields "
        f"({existing.debit} -> {existing.credit}, {existing.amount} {existing.currency})",
    )


def _rows(accounts: Mapping[str, Account], balances: Mapping[str, Balance]) -> None:
    # Guard against a store handing in rows of other accounts by mistake:
    # an account and its balance must agree on the currency.
    for account_id, balance in balances.items():
        account = accounts.get(account_id)
        if account is not None and account.currency != balance.currency:  # pragma: no cover - store bug
            raise AssertionError(
                f"balance row of {account_id!r} is in {balance.currency}, account in {account.currency}"
            )


def plan_transfer(
    req: TransferRequest,
    *,
    existing: Transfer | Hold | None,
    accounts: Mapping[str, Account],
    balances: Mapping[str, Balance],
    now: float,
) -> Plan | Replay:
    """Decide a transfer.

    Args:
        req: The request.
        existing: The stored transfer or hold with ``req.id``, if any.
        accounts: The debit and credit accounts that exist (missing ones absent).
        balances: Their current balances, read inside the store's transaction
            (with the rows locked where the engine needs it).
        now: Current time.

    Returns:
        :class:`Replay` for a repeated request, else the :class:`Plan` to write.

    Raises:
        WalletError: see the module docstring for the order of checks.
    """
    validate_transfer(req)
    if existing is not None:
        if _same_transfer(existing, req):
            return Replay(existing)
        raise _reused(existing)
    _rows(accounts, balances)
    debit = _require(balances.get(req.debit), req.debit, accounts)
    credit = _require(balances.get(req.credit), req.credit, accounts)
    _check_currency(req.currency, debit, credit)
    debit_balance, credit_balance = balances[req.debit], balances[req.credit]
    _check_funds(debit, debit_balance, req.amount)
    out, debit_after = _change(debit_balance, "transfer", -req.amount, 0)
    into, credit_after = _change(credit_balance, "transfer", req.amount, 0)
    record = Transfer(
        id=req.id,
        debit=req.debit,
        credit=req.credit,
        amount=req.amount,
        currency=req.currency,
        metadata=dict(req.metadata),
        created_at=now,
    )
    return Plan(record=record, insert=True, postings=(out, into), balances=(debit_after, credit_after))


def plan_hold(
    req: HoldRequest,
    *,
    existing: Transfer | Hold | None,
    accounts: Mapping[str, Account],
    balances: Mapping[str, Balance],
    now: float,
) -> Plan | Replay:
    """Decide a hold: reserve ``req.amount`` of the debit account's available funds.

    Args:
        req: The request.
        existing: The stored transfer or hold with ``req.id``, if any.
        accounts: The debit and credit accounts that exist.
        balances: Their current balances.
        now: Current time.

    Returns:
        :class:`Replay` (with the hold in its *current* status) for a repeated
        request, else the :class:`Plan` to write.

    Raises:
        WalletError: as :func:`plan_transfer`, plus ``invalid_expiry``.
    """
    # A replay must not fail because time moved on since the first request,
    # so the expiry is only checked for new holds.
    _check_request(req.id, req.debit, req.credit, req.amount, req.metadata)
    if existing is not None:
        if _same_hold(existing, req):
            return Replay(existing)
        raise _reused(existing)
    validate_hold(req, now)
    _rows(accounts, balances)
    debit = _require(balances.get(req.debit), req.debit, accounts)
    credit = _require(balances.get(req.credit), req.credit, accounts)
    _check_currency(req.currency, debit, credit)
    debit_balance = balances[req.debit]
    _check_funds(debit, debit_balance, req.amount)
    posting, after = _change(debit_balance, "hold", -req.amount, req.amount)
    record = Hold(
        id=req.id,
        debit=req.debit,
        credit=req.credit,
        amount=req.amount,
        currency=req.currency,
        expires_at=float(req.expires_at),
        metadata=dict(req.metadata),
        created_at=now,
    )
    return Plan(record=record, insert=True, postings=(posting,), balances=(after,))


def _pending_hold(hold: Transfer | Hold | None, hold_id: str, now: float) -> Hold:
    if not isinstance(hold, Hold):
        # A *transfer* with this id is not a hold either.
        raise WalletError("hold_not_found", f"no hold {hold_id!r}")
    if hold.status != "pending":
        raise WalletError("hold_not_pending", f"hold {hold_id!r} is {hold.status}")
    if now >= hold.expires_at:
        # Expired by the clock even if expire_holds has not swept it yet.
        raise WalletError("hold_not_pending", f"hold {hold_id!r} expired at {hold.expires_at}")
    return hold


def _hold_balance(balances: Mapping[str, Balance], account_id: str) -> Balance:
    balance = balances.get(account_id)
    if balance is None:  # pragma: no cover - accounts are never deleted
        raise WalletError("account_not_found", f"no account {account_id!r}")
    return balance


def plan_capture(
    hold_id: str,
    amount: int | None,
    *,
    hold: Transfer | Hold | None,
    balances: Mapping[str, Balance],
    now: float,
) -> Plan:
    """Decide a capture: move ``amount`` (default: all) of a pending hold.

    The part of the hold that is not captured goes back to the debit
    account's available balance in the same entry.

    Args:
        hold_id: The hold's id.
        amount: Amount to capture, or ``None`` for the full hold.
        hold: The stored record with this id, if any.
        balances: Current balances of the hold's two accounts.
        now: Current time.

    Returns:
        The :class:`Plan` to write.

    Raises:
        WalletError: ``invalid_amount``, ``hold_not_found``,
            ``hold_not_pending`` (captured, voided, or past ``expires_at``)
            or ``capture_exceeds_hold``.
    """
    if amount is not None:
        _check_amount(amount)
    pending = _pending_hold(hold, hold_id, now)
    take = pending.amount if amount is None else amount
    if take > pending.amount:
        raise WalletError("capture_exceeds_hold", f"hold {hold_id!r} holds {pending.amount}, capture asks {take}")
    release, debit_after = _change(
        _hold_balance(balances, pending.debit), "capture", pending.amount - take, -pending.amount
    )
    into, credit_after = _change(_hold_balance(balances, pending.credit), "capture", take, 0)
    record = msgspec.structs.replace(pending, status="captured", captured=take, settled_at=now)
    return Plan(record=record, insert=False, postings=(release, into), balances=(debit_after, credit_after))


def _plan_release(pending: Hold, status: HoldStatus, balances: Mapping[str, Balance], now: float) -> Plan:
    reason: Reason = "void" if status == "voided" else "expire"
    posting, after = _change(_hold_balance(balances, pending.debit), reason, pending.amount, -pending.amount)
    record = msgspec.structs.replace(pending, status=status, settled_at=now)
    return Plan(record=record, insert=False, postings=(posting,), balances=(after,))


def plan_void(hold_id: str, *, hold: Transfer | Hold | None, balances: Mapping[str, Balance], now: float) -> Plan:
    """Decide a void: cancel a pending hold and give its funds back.

    Args:
        hold_id: The hold's id.
        hold: The stored record with this id, if any.
        balances: Current balance of the hold's debit account.
        now: Current time.

    Returns:
        The :class:`Plan` to write.

    Raises:
        WalletError: ``hold_not_found`` or ``hold_not_pending`` (a hold past
            its deadline is expired: ``expire_holds`` releases it).
    """
    return _plan_release(_pending_hold(hold, hold_id, now), "voided", balances, now)


def plan_expire(hold: Hold, *, balances: Mapping[str, Balance], now: float) -> Plan | None:
    """Decide the expiry of one hold found by a sweep.

    Args:
        hold: The hold as re-read inside the sweep's transaction.
        balances: Current balance of its debit account.
        now: Current time.

    Returns:
        The :class:`Plan` to write, or ``None`` if the hold is not (or no
        longer) pending and past its deadline - a capture or void won the race.
    """
    if hold.status != "pending" or now < hold.expires_at:
        return None
    return _plan_release(hold, "expired", balances, now)

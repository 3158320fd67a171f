"""SQL and row mapping shared by the SQLite and PostgreSQL stores.

Both engines store the same four tables, prefixed ``wallet_`` so they can
share a database file or schema with rtcore's event backends:

* ``wallet_accounts``: the account and its *current* balance (``available``,
  ``held``). The balance columns are a cache of the entries that is updated
  in the same transaction; reconciliation proves they agree.
* ``wallet_transfers``: transfers and holds in one id space (``kind``), so a
  unique primary key enforces ledger idempotency even under races.
* ``wallet_entries``: the append-only ledger, one row per balance change,
  carrying the balance after it.
* ``wallet_outbox``: ids of entries whose ``balance_changed`` event is not yet
  known to be in the stream (transactional outbox).

Statements are written with ``%s`` placeholders (psycopg); the SQLite store
converts them with :func:`qmark`. Only the DDL differs per engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, cast

import msgspec

from .ledger import (
    Account,
    AccountKind,
    Balance,
    Entry,
    Hold,
    HoldStatus,
    Plan,
    Reason,
    Transfer,
)

ACCOUNT_COLS: Final = "id, currency, kind, floor, owner, available, held"
TRANSFER_COLS: Final = (
    "id, kind, debit, credit, amount, currency, metadata, created_at, expires_at, status, captured, settled_at"
)
ENTRY_COLS: Final = "id, account, currency, transfer_id, reason, delta, held_delta, available, held, created_at"

INSERT_ACCOUNT: Final = (
    "INSERT INTO wallet_accounts (id, currency, kind, floor, owner, available, held, created_at) "
    "VALUES (%s, %s, %s, %s, %s, 0, 0, %s)"
)
SELECT_ACCOUNT: Final = f"SELECT {ACCOUNT_COLS} FROM wallet_accounts WHERE id = %s"
SELECT_ALL_ACCOUNTS: Final = f"SELECT {ACCOUNT_COLS} FROM wallet_accounts ORDER BY id"
UPDATE_BALANCE: Final = "UPDATE wallet_accounts SET available = %s, held = %s WHERE id = %s"
SELECT_TRANSFER: Final = f"SELECT {TRANSFER_COLS} FROM wallet_transfers WHERE id = %s"
INSERT_TRANSFER: Final = (
    f"INSERT INTO wallet_transfers ({TRANSFER_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_HOLD: Final = "UPDATE wallet_transfers SET status = %s, captured = %s, settled_at = %s WHERE id = %s"
SELECT_EXPIRED: Final = (
    "SELECT id FROM wallet_transfers WHERE kind = 'hold' AND status = 'pending' AND expires_at <= %s "
    "ORDER BY expires_at, id LIMIT %s"
)
INSERT_ENTRY: Final = (
    "INSERT INTO wallet_entries (account, currency, transfer_id, reason, delta, held_delta, available, held, created_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)
INSERT_OUTBOX: Final = "INSERT INTO wallet_outbox (entry_id) VALUES (%s)"
DELETE_OUTBOX: Final = "DELETE FROM wallet_outbox WHERE entry_id = %s"
SELECT_OUTBOX_IDS: Final = "SELECT entry_id FROM wallet_outbox"
SELECT_UNPUBLISHED: Final = (
    f"SELECT {', '.join('e.' + c.strip() for c in ENTRY_COLS.split(','))} "
    "FROM wallet_outbox o JOIN wallet_entries e ON e.id = o.entry_id ORDER BY e.id LIMIT %s"
)
SELECT_ORIGINAL_ENTRIES: Final = (
    f"SELECT {ENTRY_COLS} FROM wallet_entries WHERE transfer_id = %s AND reason IN ('transfer', 'hold') ORDER BY id"
)
SELECT_HISTORY: Final = f"SELECT {ENTRY_COLS} FROM wallet_entries WHERE account = %s AND id > %s ORDER BY id LIMIT %s"
SELECT_ENTRIES: Final = f"SELECT {ENTRY_COLS} FROM wallet_entries WHERE id > %s ORDER BY id LIMIT %s"
SELECT_ALL_ENTRIES: Final = f"SELECT {ENTRY_COLS} FROM wallet_entries ORDER BY id"

_METADATA: Final = msgspec.json.Encoder(order="sorted")
_METADATA_DECODER: Final = msgspec.json.Decoder(dict[str, str])


def qmark(sql: str) -> str:
    """Turn psycopg ``%s`` placeholders into sqlite3 ``?`` ones."""
    return sql.replace("%s", "?")


def account_params(account: Account, now: float) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_ACCOUNT`."""
    return (account.id, account.currency, account.kind, account.floor, account.owner, now)


def row_to_account(row: Sequence[Any]) -> tuple[Account, Balance]:
    """Split a :data:`ACCOUNT_COLS` row into the account and its balance."""
    id_, currency, kind, floor, owner, available, held = row
    account = Account(id=id_, currency=currency, kind=cast(AccountKind, kind), floor=floor, owner=owner)
    return account, Balance(account=id_, currency=currency, available=available, held=held)


def record_params(record: Transfer | Hold) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_TRANSFER`."""
    metadata = _METADATA.encode(record.metadata).decode()
    if isinstance(record, Transfer):
        return (record.id, "transfer", record.debit, record.credit, record.amount, record.currency, metadata,
                record.created_at, None, "posted", record.amount, record.created_at)  # fmt: skip
    return (record.id, "hold", record.debit, record.credit, record.amount, record.currency, metadata,
            record.created_at, record.expires_at, record.status, record.captured, record.settled_at)  # fmt: skip


def hold_update_params(hold: Hold) -> tuple[Any, ...]:
    """Parameters of :data:`UPDATE_HOLD`."""
    return (hold.status, hold.captured, hold.settled_at, hold.id)


def row_to_record(row: Sequence[Any]) -> Transfer | Hold:
    """Build a transfer or hold from a :data:`TRANSFER_COLS` row."""
    id_, kind, debit, credit, amount, currency, metadata, created_at, expires_at, status, captured, settled_at = row
    meta = _METADATA_DECODER.decode(metadata)
    if kind == "transfer":
        return Transfer(
            id=id_, debit=debit, credit=credit, amount=amount, currency=currency, metadata=meta, created_at=created_at
        )
    return Hold(
        id=id_,
        debit=debit,
        credit=credit,
        amount=amount,
        currency=currency,
        expires_at=expires_at,
        metadata=meta,
        created_at=created_at,
        status=cast(HoldStatus, status),
        captured=captured,
        settled_at=settled_at,
    )


def row_to_entry(row: Sequence[Any]) -> Entry:
    """Build an entry from an :data:`ENTRY_COLS` row."""
    id_, account, currency, transfer_id, reason, delta, held_delta, available, held, created_at = row
    return Entry(
        id=id_,
        account=account,
        currency=currency,
        transfer_id=transfer_id,
        reason=cast(Reason, reason),
        delta=delta,
        held_delta=held_delta,
        available=available,
        held=held,
        created_at=created_at,
    )


def entry_params(plan: Plan, index: int, now: float) -> tuple[Any, ...]:
    """Parameters of :data:`INSERT_ENTRY` for the ``index``-th posting of ``plan``."""
    p = plan.postings[index]
    return (p.account, p.currency, plan.record.id, p.reason, p.delta, p.held_delta, p.available, p.held, now)


def entry_from_plan(plan: Plan, index: int, entry_id: int, now: float) -> Entry:
    """The :class:`Entry` just written for the ``index``-th posting of ``plan``."""
    p = plan.postings[index]
    return Entry(
        id=entry_id,
        account=p.account,
        currency=p.currency,
        transfer_id=plan.record.id,
        reason=p.reason,
        delta=p.delta,
        held_delta=p.held_delta,
        available=p.available,
        held=p.held,
        created_at=now,
    )

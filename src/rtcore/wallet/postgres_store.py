"""The PostgreSQL wallet store (psycopg 3, async).

Concurrency control, and why it is this one:

* Transactions run at READ COMMITTED and **lock the account rows they will
  change with ``SELECT ... FOR UPDATE``, one statement per row, in sorted id
  order** (sorted by Python's code-point order, the same in every code path,
  so a database collation can never reorder them). ``FOR UPDATE`` waits for
  the previous writer and then returns the *committed* row, so the balance a
  rule checks is the balance it writes over: no lost update. Two transactions
  that need the same two accounts request them in the same order, so they
  queue instead of deadlocking.
* Capture, void and expiry lock the hold row first, then its accounts. No
  path locks accounts and then waits on an *existing* hold row, so hold and
  account locks cannot form a cycle either.
* Belt and braces: a ``deadlock_detected`` or ``serialization_failure`` (which
  PostgreSQL may still raise, e.g. from foreign-key checks) and a
  ``unique_violation`` (two requests racing to insert the same new id) roll
  the transaction back and run it again from the start, a bounded number of
  times with jittered backoff. The retry re-reads everything, so a racing
  duplicate id turns into the normal idempotent replay.
* Entry ids come from an identity column; because an account's row stays
  locked until commit, an account's entries get increasing ids in commit
  order, which is what history paging and the streams rely on.

Connections come from a small built-in pool (:class:`_Pool`); a connection
that is left in a transaction (cancelled mid-query) or broken is closed
rather than reused. The rules themselves are in :mod:`rtcore.wallet.ledger`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from ..errors import BackendError
from ..protocol.backoff import backoff_delay
from . import _sql as q
from .errors import WalletError
from .ledger import (
    Account,
    AccountKind,
    Balance,
    BalanceChanged,
    Entry,
    Hold,
    HoldRequest,
    Plan,
    Replay,
    Transfer,
    TransferRequest,
    balance_changed,
    check_account_reuse,
    new_account,
    plan_capture,
    plan_expire,
    plan_hold,
    plan_transfer,
    plan_void,
    validate_transfer,
)
from .store import HistoryPage, HoldResult, LedgerSnapshot, TransferResult

__all__ = ["PostgresWalletStore"]

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: How often a transaction is re-run after a deadlock, serialization failure
#: or duplicate-key race before the error reaches the caller.
MAX_ATTEMPTS: Final = 8

#: Default seconds one wallet operation may take (see ``PostgresWalletStore.open``).
TIMEOUT: Final = 10.0
_RETRY: Final = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected, psycopg.errors.UniqueViolation)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS wallet_accounts (
    id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('player', 'system')),
    floor BIGINT,
    owner TEXT,
    available BIGINT NOT NULL,
    held BIGINT NOT NULL CHECK (held >= 0),
    created_at DOUBLE PRECISION NOT NULL,
    CHECK (floor IS NULL OR available >= floor)
);
CREATE TABLE IF NOT EXISTS wallet_transfers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('transfer', 'hold')),
    debit TEXT NOT NULL REFERENCES wallet_accounts (id),
    credit TEXT NOT NULL REFERENCES wallet_accounts (id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    status TEXT NOT NULL,
    captured BIGINT NOT NULL,
    settled_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS wallet_transfers_pending ON wallet_transfers (expires_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS wallet_entries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL REFERENCES wallet_accounts (id),
    currency TEXT NOT NULL,
    transfer_id TEXT NOT NULL REFERENCES wallet_transfers (id),
    reason TEXT NOT NULL,
    delta BIGINT NOT NULL,
    held_delta BIGINT NOT NULL,
    available BIGINT NOT NULL,
    held BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS wallet_entries_account ON wallet_entries (account, id);
CREATE INDEX IF NOT EXISTS wallet_entries_transfer ON wallet_entries (transfer_id);
CREATE TABLE IF NOT EXISTS wallet_outbox (
    entry_id BIGINT PRIMARY KEY REFERENCES wallet_entries (id)
);
"""

# Any fixed number: serializes concurrent schema creation across processes
# (CREATE TABLE IF NOT EXISTS itself races on the catalog).
_MIGRATION_LOCK: Final = 0x72746377616C6C  # "rtcwall"

_GUC: Final = re.compile(r"[A-Za-z0-9_.]+")

_LOCK_ACCOUNT: Final = q.SELECT_ACCOUNT + " FOR UPDATE"
_LOCK_TRANSFER: Final = q.SELECT_TRANSFER + " FOR UPDATE"


def _split_url(url: str) -> tuple[str, str | None]:
    """Take the ``schema`` query parameter (ours, not libpq's) out of ``url``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def _on_asyncio() -> bool:
    """Whether an asyncio event loop runs here (psycopg's async connections need one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Pool:
    """At most ``size`` connections, handed out one task at a time."""

    def __init__(self, conninfo: str, schema: str | None, size: int, settings: Mapping[str, str] | None = None) -> None:
        self._conninfo = conninfo
        # Session settings go in the startup packet, so every connection (and
        # every retry) sees the same search_path and GUCs without a round trip.
        gucs = dict(settings or {})
        if schema is not None:
            gucs["search_path"] = schema
        for key, value in gucs.items():
            if not _GUC.fullmatch(key) or not _GUC.fullmatch(value):
                raise ValueError(f"unsupported PostgreSQL session setting {key}={value!r}")
        self._options = " ".join(f"-c {key}={value}" for key, value in gucs.items())
        self._idle: list[Conn] = []
        self._slots = anyio.Semaphore(size)
        self._closed = False

    async def _connect(self) -> Conn:
        options: dict[str, Any] = {"autocommit": True}
        if self._options:
            options["options"] = self._options
        return await psycopg.AsyncConnection.connect(self._conninfo, **options)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        if self._closed:
            raise BackendError("the wallet store is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            finally:
                # Judge the connection, not the exception: after a refused
                # operation (WalletError) the transaction was rolled back and
                # the connection is idle and fine; after a cancellation or a
                # network error it is mid-query, in a failed transaction or
                # closed, and must not be handed to the next caller.
                if not self._closed and not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                    self._idle.append(conn)
                else:
                    with anyio.CancelScope(shield=True):
                        await conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class PostgresWalletStore:
    """A :class:`~rtcore.wallet.store.WalletStore` on PostgreSQL.

    Open with :meth:`open` (or :func:`rtcore.wallet.open_wallet_store`).

    Args:
        pool: The connection pool.
        clock: Returns the current Unix time when a call gives no ``now``.
    """

    def __init__(self, pool: _Pool, *, clock: Callable[[], float] = time.time, timeout: float = TIMEOUT) -> None:
        self._pool = pool
        self._clock = clock
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 8,
        settings: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        operation_timeout: float = TIMEOUT,
    ) -> PostgresWalletStore:
        """Connect and create the schema and tables if needed.

        Args:
            url: libpq URL; an optional ``schema=name`` query parameter.
            schema: Schema to use (overrides the URL's); created if missing.
                ``None`` uses the server's default search path.
            pool_size: Most connections open at once.
            settings: Session settings for every pooled connection, such as
                ``{"lock_timeout": "5s"}`` (names and values of
                ``[A-Za-z0-9_.]`` only).
            clock: Time source for calls without ``now``.
            operation_timeout: Seconds one operation (connection, transaction and its
                retries included) may take before it fails with a retryable
                :class:`~rtcore.errors.BackendError`: a paused or unreachable
                server answers nothing and would otherwise hang every request.

        Raises:
            BackendError: PostgreSQL is unreachable or refused the schema, or
                the event loop is not asyncio's (psycopg's async API needs it).
        """
        if not _on_asyncio():
            raise BackendError(
                "the PostgreSQL wallet store runs on the asyncio backend only (psycopg's async "
                "connections need an asyncio event loop); on trio use the SQLite wallet store"
            )
        conninfo, url_schema = _split_url(url)
        schema = schema or url_schema
        pool = _Pool(conninfo, schema, pool_size, settings)
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                if schema is not None:
                    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                    await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    await conn.execute(statement)
        except psycopg.Error as exc:
            raise BackendError(f"cannot open the PostgreSQL wallet store: {exc}") from exc
        return cls(pool, clock=clock, timeout=operation_timeout)

    # -- plumbing ---------------------------------------------------------------

    async def _tx(self, work: Callable[[Conn], Awaitable[T]], *, read_only: bool = False) -> T:
        """Run ``work`` in a transaction, re-running it after a transient conflict.

        Bounded by the store's timeout: a connection cut by it is closed, not
        reused (the pool judges it mid-query). If the COMMIT itself was cut
        the outcome is unknown to us; the caller retries with the same
        transfer id and the ledger's dedup by id answers it.
        """
        try:
            with anyio.fail_after(self._timeout):
                return await self._tx_attempts(work, read_only)
        except TimeoutError:
            raise BackendError(f"the wallet database did not answer within {self._timeout:g} s") from None

    async def _tx_attempts(self, work: Callable[[Conn], Awaitable[T]], read_only: bool) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    if read_only:
                        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    return await work(conn)
            except _RETRY as exc:
                if attempt == MAX_ATTEMPTS:
                    raise BackendError(f"wallet transaction kept conflicting: {exc}") from exc
                await anyio.sleep(backoff_delay(attempt, 0.002, 1.0, jitter=1.0))  # full jitter
            except psycopg.Error as exc:
                raise BackendError(f"wallet database error: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _now(self, now: float | None) -> float:
        return float(self._clock() if now is None else now)

    @staticmethod
    async def _lock_accounts(conn: Conn, ids: Iterable[str]) -> tuple[dict[str, Account], dict[str, Balance]]:
        accounts: dict[str, Account] = {}
        balances: dict[str, Balance] = {}
        for account_id in sorted(set(ids)):  # the one global lock order
            cur = await conn.execute(_LOCK_ACCOUNT, (account_id,))
            row = await cur.fetchone()
            if row is not None:
                accounts[account_id], balances[account_id] = q.row_to_account(row)
        return accounts, balances

    @staticmethod
    async def _record(conn: Conn, record_id: str, *, lock: bool = False) -> Transfer | Hold | None:
        cur = await conn.execute(_LOCK_TRANSFER if lock else q.SELECT_TRANSFER, (record_id,))
        row = await cur.fetchone()
        return None if row is None else q.row_to_record(row)

    @staticmethod
    async def _original(conn: Conn, record_id: str) -> tuple[BalanceChanged, ...]:
        cur = await conn.execute(q.SELECT_ORIGINAL_ENTRIES, (record_id,))
        return tuple(balance_changed(q.row_to_entry(r)) for r in await cur.fetchall())

    @staticmethod
    async def _apply(conn: Conn, plan: Plan, now: float) -> tuple[BalanceChanged, ...]:
        if plan.insert:
            await conn.execute(q.INSERT_TRANSFER, q.record_params(plan.record))
        else:
            assert isinstance(plan.record, Hold)
            await conn.execute(q.UPDATE_HOLD, q.hold_update_params(plan.record))
        for balance in plan.balances:
            await conn.execute(q.UPDATE_BALANCE, (balance.available, balance.held, balance.account))
        changes = []
        for index in range(len(plan.postings)):
            cur = await conn.execute(q.INSERT_ENTRY, q.entry_params(plan, index, now))
            row = await cur.fetchone()
            assert row is not None
            entry_id = int(row[0])
            await conn.execute(q.INSERT_OUTBOX, (entry_id,))
            changes.append(balance_changed(q.entry_from_plan(plan, index, entry_id, now)))
        return tuple(changes)

    async def _one_account(self, conn: Conn, account_id: str) -> tuple[Account, Balance]:
        cur = await conn.execute(q.SELECT_ACCOUNT, (account_id,))
        row = await cur.fetchone()
        if row is None:
            raise WalletError("account_not_found", f"no account {account_id!r}")
        return q.row_to_account(row)

    # -- WalletStore ---------------------------------------------------------------

    async def create_account(
        self,
        id: str,
        currency: str,
        *,
        kind: AccountKind = "player",
        floor: int | None = None,
        owner: str | None = None,
    ) -> Account:
        """Create an account with a zero balance (idempotent for the same fields).

        Raises:
            WalletError: ``invalid_account`` or ``account_exists_with_different_fields``.
        """
        wanted = new_account(id, currency, kind=kind, floor=floor, owner=owner)
        now = self._now(None)

        async def work(conn: Conn) -> Account:
            accounts, _ = await self._lock_accounts(conn, [wanted.id])
            if wanted.id in accounts:
                return check_account_reuse(accounts[wanted.id], wanted)
            # A racing create of the same id makes this INSERT fail with a
            # unique violation; _tx then re-runs us and we take the branch above.
            await conn.execute(q.INSERT_ACCOUNT, q.account_params(wanted, now))
            return wanted

        return await self._tx(work)

    async def get_account(self, account_id: str) -> Account:
        """Return an account (raises ``account_not_found``)."""
        return (await self._tx(lambda conn: self._one_account(conn, account_id)))[0]

    async def get_balance(self, account_id: str) -> Balance:
        """Return an account's balance (raises ``account_not_found``)."""
        return (await self._tx(lambda conn: self._one_account(conn, account_id)))[1]

    async def transfer(self, request: TransferRequest, *, now: float | None = None) -> TransferResult:
        """Post a transfer (rules: :func:`~rtcore.wallet.ledger.plan_transfer`)."""
        validate_transfer(request)  # refuse malformed requests before touching the database
        at = self._now(now)

        async def work(conn: Conn) -> TransferResult:
            accounts, balances = await self._lock_accounts(conn, [request.debit, request.credit])
            existing = await self._record(conn, request.id)
            decision = plan_transfer(request, existing=existing, accounts=accounts, balances=balances, now=at)
            if isinstance(decision, Replay):
                assert isinstance(decision.record, Transfer)
                return TransferResult(decision.record, await self._original(conn, request.id), replayed=True)
            assert isinstance(decision.record, Transfer)
            return TransferResult(decision.record, await self._apply(conn, decision, at))

        return await self._tx(work)

    async def hold(self, request: HoldRequest, *, now: float | None = None) -> HoldResult:
        """Place a hold (rules: :func:`~rtcore.wallet.ledger.plan_hold`)."""
        at = self._now(now)

        async def work(conn: Conn) -> HoldResult:
            accounts, balances = await self._lock_accounts(conn, [request.debit, request.credit])
            existing = await self._record(conn, request.id)
            decision = plan_hold(request, existing=existing, accounts=accounts, balances=balances, now=at)
            if isinstance(decision, Replay):
                assert isinstance(decision.record, Hold)
                return HoldResult(decision.record, await self._original(conn, request.id), replayed=True)
            assert isinstance(decision.record, Hold)
            return HoldResult(decision.record, await self._apply(conn, decision, at))

        return await self._tx(work)

    async def _settle(self, hold_id: str, amount: int | None, void: bool, now: float | None) -> HoldResult:
        at = self._now(now)

        async def work(conn: Conn) -> HoldResult:
            record = await self._record(conn, hold_id, lock=True)  # hold first, then its accounts
            ids = [record.debit, record.credit] if isinstance(record, Hold) else []
            _, balances = await self._lock_accounts(conn, ids)
            if void:
                plan = plan_void(hold_id, hold=record, balances=balances, now=at)
            else:
                plan = plan_capture(hold_id, amount, hold=record, balances=balances, now=at)
            assert isinstance(plan.record, Hold)
            return HoldResult(plan.record, await self._apply(conn, plan, at))

        return await self._tx(work)

    async def capture(self, hold_id: str, amount: int | None = None, *, now: float | None = None) -> HoldResult:
        """Capture ``amount`` (default all) of a pending hold; release the rest."""
        return await self._settle(hold_id, amount, False, now)

    async def void(self, hold_id: str, *, now: float | None = None) -> HoldResult:
        """Void a pending hold, releasing all of it."""
        return await self._settle(hold_id, None, True, now)

    async def expire_holds(self, now: float | None = None, *, limit: int = 1000) -> list[HoldResult]:
        """Expire pending holds whose deadline is ``<= now`` (one transaction each)."""
        at = self._now(now)

        async def candidates(conn: Conn) -> list[str]:
            cur = await conn.execute(q.SELECT_EXPIRED, (at, limit))
            return [str(row[0]) for row in await cur.fetchall()]

        async def expire_one(conn: Conn, hold_id: str) -> HoldResult | None:
            record = await self._record(conn, hold_id, lock=True)
            if not isinstance(record, Hold):  # pragma: no cover - ids come from the holds
                return None
            _, balances = await self._lock_accounts(conn, [record.debit])
            plan = plan_expire(record, balances=balances, now=at)  # re-checked under the lock
            if plan is None:
                return None
            assert isinstance(plan.record, Hold)
            return HoldResult(plan.record, await self._apply(conn, plan, at))

        results = []
        for hold_id in await self._tx(candidates):
            result = await self._tx(lambda conn, hold_id=hold_id: expire_one(conn, hold_id))  # type: ignore[misc]
            if result is not None:
                results.append(result)
        return results

    async def get_transfer(self, transfer_id: str) -> Transfer | Hold | None:
        """Return the transfer or hold with this id, if any."""
        return await self._tx(lambda conn: self._record(conn, transfer_id))

    async def history(self, account_id: str, after_entry_id: int = 0, limit: int = 100) -> HistoryPage:
        """Page through an account's entries, oldest first."""
        limit = max(1, limit)

        async def work(conn: Conn) -> HistoryPage:
            await self._one_account(conn, account_id)
            cur = await conn.execute(q.SELECT_HISTORY, (account_id, after_entry_id, limit + 1))
            rows: Sequence[Any] = await cur.fetchall()
            entries = tuple(q.row_to_entry(r) for r in rows[:limit])
            return HistoryPage(entries=entries, next_after=entries[-1].id if len(rows) > limit else None)

        return await self._tx(work, read_only=True)

    async def all_balances(self) -> list[Balance]:
        """Every account's balance, ordered by account id."""

        async def work(conn: Conn) -> list[Balance]:
            cur = await conn.execute(q.SELECT_ALL_ACCOUNTS)
            return [q.row_to_account(r)[1] for r in await cur.fetchall()]

        return await self._tx(work)

    async def entries(self, after_entry_id: int = 0, limit: int = 1000) -> list[Entry]:
        """Entries of all accounts after ``after_entry_id``, in id order.

        Entry ids of *different* accounts may commit out of order; page with
        :meth:`snapshot` or per account (:meth:`history`) when that matters.
        """

        async def work(conn: Conn) -> list[Entry]:
            cur = await conn.execute(q.SELECT_ENTRIES, (after_entry_id, limit))
            return [q.row_to_entry(r) for r in await cur.fetchall()]

        return await self._tx(work)

    async def snapshot(self) -> LedgerSnapshot:
        """Accounts, balances, entries and outbox from one REPEATABLE READ transaction."""

        async def work(conn: Conn) -> LedgerSnapshot:
            pairs = [q.row_to_account(r) for r in await (await conn.execute(q.SELECT_ALL_ACCOUNTS)).fetchall()]
            entries = tuple(q.row_to_entry(r) for r in await (await conn.execute(q.SELECT_ALL_ENTRIES)).fetchall())
            outbox = frozenset(int(r[0]) for r in await (await conn.execute(q.SELECT_OUTBOX_IDS)).fetchall())
            return LedgerSnapshot(
                accounts=tuple(a for a, _ in pairs),
                balances=tuple(b for _, b in pairs),
                entries=entries,
                unpublished=outbox,
            )

        return await self._tx(work, read_only=True)

    async def unpublished(self, limit: int = 1000) -> list[BalanceChanged]:
        """Outbox records in entry order."""

        async def work(conn: Conn) -> list[BalanceChanged]:
            cur = await conn.execute(q.SELECT_UNPUBLISHED, (limit,))
            return [balance_changed(q.row_to_entry(r)) for r in await cur.fetchall()]

        return await self._tx(work)

    async def mark_published(self, entry_ids: Iterable[int]) -> None:
        """Drop entries from the outbox (unknown ids are ignored)."""
        ids = [(i,) for i in entry_ids]
        if not ids:
            return

        async def work(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(q.DELETE_OUTBOX, ids)

        await self._tx(work)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()

"""The embedded wallet store: stdlib :mod:`sqlite3` in real transactions.

Durability and isolation choices, and why:

* ``journal_mode=WAL`` so readers (balances, history, reconcile) never block
  the writer and the writer never blocks them;
* ``synchronous=FULL`` because a wallet must not lose a committed transfer
  on power loss (WAL's default NORMAL may drop the last transactions);
* every write is ``BEGIN IMMEDIATE``: it takes the database write lock
  *before* reading the balances it will check, so two writers (threads or
  processes) can never both read the same balance and lose an update, and no
  transaction ever has to be upgraded from reader to writer (which is where
  SQLite's ``SQLITE_BUSY`` deadlocks come from);
* reads that must agree with each other (:meth:`snapshot`) run in one
  deferred transaction, i.e. one WAL snapshot.

sqlite3 calls block, so all of them run in a worker thread through
:func:`anyio.to_thread.run_sync` with a :class:`anyio.CapacityLimiter` of one:
the event loop never blocks, and the single connection is never used by two
threads at once. The rules themselves are in :mod:`rtcore.wallet.ledger`.

Group commit. With ``synchronous=FULL`` every commit waits for an fsync
(milliseconds on real disks), and there is one writer, so one transaction
per operation caps the store at a few hundred operations per second however
many clients wait. Writes are therefore queued and committed in groups: the
first waiting caller becomes the *leader* and runs everything queued (up to
:data:`GROUP_MAX` operations) in ONE ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the
worker thread, each operation inside its own ``SAVEPOINT``. An operation
that is refused (or fails) rolls back to its savepoint only, so it still
changes nothing; the others commit together, sharing one fsync. Nobody gets
an answer before the ``COMMIT`` has returned, so "answered ok" still means
"durable". If the commit itself fails, every operation of the group gets
``backend_unavailable`` (retryable: nothing was written). Operations in a
group run one after another exactly as they would alone, so every rule and
the per-account entry order are unchanged. A leader hands over after the
group holding its own operation, so no caller waits behind an unbounded
stream of others' work.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from ..errors import BackendError
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

__all__ = ["GROUP_MAX", "SqliteWalletStore"]

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS wallet_accounts (
    id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('player', 'system')),
    floor INTEGER,
    owner TEXT,
    available INTEGER NOT NULL,
    held INTEGER NOT NULL CHECK (held >= 0),
    created_at REAL NOT NULL,
    CHECK (floor IS NULL OR available >= floor)
) STRICT;
CREATE TABLE IF NOT EXISTS wallet_transfers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('transfer', 'hold')),
    debit TEXT NOT NULL REFERENCES wallet_accounts (id),
    credit TEXT NOT NULL REFERENCES wallet_accounts (id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    status TEXT NOT NULL,
    captured INTEGER NOT NULL,
    settled_at REAL
) STRICT;
CREATE INDEX IF NOT EXISTS wallet_transfers_pending ON wallet_transfers (expires_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS wallet_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES wallet_accounts (id),
    currency TEXT NOT NULL,
    transfer_id TEXT NOT NULL REFERENCES wallet_transfers (id),
    reason TEXT NOT NULL,
    delta INTEGER NOT NULL,
    held_delta INTEGER NOT NULL,
    available INTEGER NOT NULL,
    held INTEGER NOT NULL,
    created_at REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS wallet_entries_account ON wallet_entries (account, id);
CREATE INDEX IF NOT EXISTS wallet_entries_transfer ON wallet_entries (transfer_id);
CREATE TABLE IF NOT EXISTS wallet_outbox (
    entry_id INTEGER PRIMARY KEY REFERENCES wallet_entries (id)
) STRICT;
"""


#: Most write operations committed in one transaction (see "Group commit").
GROUP_MAX: Final = 256


class _Op:
    """One queued write operation and, once run, its outcome."""

    __slots__ = ("args", "error", "finished", "fn", "result")

    def __init__(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: object = None
        self.error: BaseException | None = None
        self.finished = False


def _path_of(url: str) -> str:
    # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db ; sqlite:///:memory:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"a SQLite wallet URL looks like sqlite:///path.db, got {url!r}")
    return url[len(prefix) :]


class SqliteWalletStore:
    """A :class:`~rtcore.wallet.store.WalletStore` on one SQLite database file.

    Open with :meth:`open` (or :func:`rtcore.wallet.open_wallet_store`).

    Args:
        conn: An open connection in autocommit mode (``isolation_level=None``)
            whose schema exists; :meth:`open` makes one.
        clock: Returns the current Unix time when a call gives no ``now``.
    """

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        self._limiter = anyio.CapacityLimiter(1)
        self._closed = False
        # Group commit (see the module docstring). Touched only by the event
        # loop, except _in_group, which only the worker thread touches.
        self._queue: list[_Op] = []
        self._leader = False
        self._group_done: anyio.Event | None = None
        self._in_group = False

    @classmethod
    async def open(cls, url: str, *, clock: Callable[[], float] = time.time) -> SqliteWalletStore:
        """Open ``sqlite:///path.db``, creating the file and tables if needed.

        Raises:
            ValueError: the URL is not a SQLite URL.
            BackendError: SQLite could not open or set up the file.
        """
        path = _path_of(url)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # executescript() commits any open transaction first, so the
                # BEGIN must be part of the script itself.
                try:
                    conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await anyio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open wallet database {path!r}: {exc}") from exc
        return cls(conn, clock=clock)

    # -- plumbing ---------------------------------------------------------------

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the worker thread; translate engine errors at this boundary."""
        if self._closed:
            raise BackendError("the wallet store is closed")

        def call() -> T:
            return fn(*args, **kwargs)

        try:
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise BackendError(f"wallet database error: {exc}") from exc

    async def _run_write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the write operation ``fn`` in the next group commit; return or raise its outcome."""
        if self._closed:
            raise BackendError("the wallet store is closed")
        assert not kwargs, "write operations take positional arguments"
        op = _Op(fn, args)
        self._queue.append(op)
        try:
            while not op.finished:
                if self._leader:
                    if self._group_done is None:
                        self._group_done = anyio.Event()
                    await self._group_done.wait()
                else:
                    await self._lead(op)
        except BaseException:
            # Cancelled while still queued: it never runs. (Once in a group
            # that started it runs to the end; the caller just never hears.)
            if op in self._queue:
                self._queue.remove(op)
            raise
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    async def _lead(self, mine: _Op) -> None:
        """Commit groups until ``mine`` is done, then wake the others (one of them leads next)."""
        self._leader = True
        try:
            while not mine.finished:
                group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
                try:
                    await anyio.to_thread.run_sync(self._commit_group, group, limiter=self._limiter)
                finally:
                    # Cancelled before the thread took the group: put the
                    # others back in front, in order (ours goes: we are leaving).
                    unrun = [op for op in group if not op.finished and op is not mine]
                    self._queue[:0] = unrun
        finally:
            self._leader = False
            done, self._group_done = self._group_done, None
            if done is not None:
                done.set()

    def _commit_group(self, group: list[_Op]) -> None:
        """Worker thread: run ``group`` in one transaction, one savepoint per operation."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._in_group = True
            try:
                for op in group:
                    try:
                        op.result = op.fn(*op.args)
                    except sqlite3.Error as exc:
                        if not conn.in_transaction:
                            raise  # SQLite rolled the whole transaction back: the group is lost
                        op.error = BackendError(f"wallet database error: {exc}")
                    except Exception as exc:
                        op.error = exc
            finally:
                self._in_group = False
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for op in group:
                op.result, op.error = None, BackendError(f"wallet database error: {exc}")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            for op in group:
                op.finished = True

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One operation's transaction: its own, or a savepoint inside a group commit."""
        conn = self._conn
        if self._in_group:
            conn.execute("SAVEPOINT wallet_op")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO wallet_op")
                    conn.execute("RELEASE wallet_op")
                raise
            conn.execute("RELEASE wallet_op")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _now(self, now: float | None) -> float:
        return float(self._clock() if now is None else now)

    # -- row helpers (worker thread, inside a transaction) -----------------------

    @staticmethod
    def _accounts(conn: sqlite3.Connection, ids: Sequence[str]) -> tuple[dict[str, Account], dict[str, Balance]]:
        accounts: dict[str, Account] = {}
        balances: dict[str, Balance] = {}
        for account_id in ids:
            row = conn.execute(q.qmark(q.SELECT_ACCOUNT), (account_id,)).fetchone()
            if row is not None:
                accounts[account_id], balances[account_id] = q.row_to_account(row)
        return accounts, balances

    @staticmethod
    def _record(conn: sqlite3.Connection, record_id: str) -> Transfer | Hold | None:
        row = conn.execute(q.qmark(q.SELECT_TRANSFER), (record_id,)).fetchone()
        return None if row is None else q.row_to_record(row)

    @staticmethod
    def _original(conn: sqlite3.Connection, record_id: str) -> tuple[BalanceChanged, ...]:
        rows = conn.execute(q.qmark(q.SELECT_ORIGINAL_ENTRIES), (record_id,)).fetchall()
        return tuple(balance_changed(q.row_to_entry(r)) for r in rows)

    @staticmethod
    def _apply(conn: sqlite3.Connection, plan: Plan, now: float) -> tuple[BalanceChanged, ...]:
        if plan.insert:
            conn.execute(q.qmark(q.INSERT_TRANSFER), q.record_params(plan.record))
        else:
            assert isinstance(plan.record, Hold)
            conn.execute(q.qmark(q.UPDATE_HOLD), q.hold_update_params(plan.record))
        for balance in plan.balances:
            conn.execute(q.qmark(q.UPDATE_BALANCE), (balance.available, balance.held, balance.account))
        changes = []
        for index in range(len(plan.postings)):
            (entry_id,) = conn.execute(q.qmark(q.INSERT_ENTRY), q.entry_params(plan, index, now)).fetchone()
            conn.execute(q.qmark(q.INSERT_OUTBOX), (entry_id,))
            changes.append(balance_changed(q.entry_from_plan(plan, index, entry_id, now)))
        return tuple(changes)

    # -- operations (worker thread) ----------------------------------------------

    def _create_account_sync(self, wanted: Account, now: float) -> Account:
        with self._write() as conn:
            accounts, _ = self._accounts(conn, [wanted.id])
            if wanted.id in accounts:
                return check_account_reuse(accounts[wanted.id], wanted)
            conn.execute(q.qmark(q.INSERT_ACCOUNT), q.account_params(wanted, now))
            return wanted

    def _get_sync(self, account_id: str) -> tuple[Account, Balance]:
        row = self._conn.execute(q.qmark(q.SELECT_ACCOUNT), (account_id,)).fetchone()
        if row is None:
            raise WalletError("account_not_found", f"no account {account_id!r}")
        return q.row_to_account(row)

    def _transfer_sync(self, req: TransferRequest, now: float) -> TransferResult:
        with self._write() as conn:
            accounts, balances = self._accounts(conn, [req.debit, req.credit])
            decision = plan_transfer(
                req, existing=self._record(conn, req.id), accounts=accounts, balances=balances, now=now
            )
            if isinstance(decision, Replay):
                assert isinstance(decision.record, Transfer)
                return TransferResult(decision.record, self._original(conn, req.id), replayed=True)
            assert isinstance(decision.record, Transfer)
            return TransferResult(decision.record, self._apply(conn, decision, now))

    def _hold_sync(self, req: HoldRequest, now: float) -> HoldResult:
        with self._write() as conn:
            accounts, balances = self._accounts(conn, [req.debit, req.credit])
            decision = plan_hold(
                req, existing=self._record(conn, req.id), accounts=accounts, balances=balances, now=now
            )
            if isinstance(decision, Replay):
                assert isinstance(decision.record, Hold)
                return HoldResult(decision.record, self._original(conn, req.id), replayed=True)
            assert isinstance(decision.record, Hold)
            return HoldResult(decision.record, self._apply(conn, decision, now))

    def _settle_sync(self, hold_id: str, amount: int | None, void: bool, now: float) -> HoldResult:
        with self._write() as conn:
            record = self._record(conn, hold_id)
            ids = [record.debit, record.credit] if isinstance(record, Hold) else []
            _, balances = self._accounts(conn, ids)
            if void:
                plan = plan_void(hold_id, hold=record, balances=balances, now=now)
            else:
                plan = plan_capture(hold_id, amount, hold=record, balances=balances, now=now)
            assert isinstance(plan.record, Hold)
            return HoldResult(plan.record, self._apply(conn, plan, now))

    def _expire_sync(self, now: float, limit: int) -> list[HoldResult]:
        ids = [row[0] for row in self._conn.execute(q.qmark(q.SELECT_EXPIRED), (now, limit)).fetchall()]
        results = []
        for hold_id in ids:
            with self._write() as conn:
                record = self._record(conn, hold_id)
                if not isinstance(record, Hold):  # pragma: no cover - ids come from the holds table
                    continue
                _, balances = self._accounts(conn, [record.debit])
                plan = plan_expire(record, balances=balances, now=now)
                if plan is None:
                    continue
                assert isinstance(plan.record, Hold)
                results.append(HoldResult(plan.record, self._apply(conn, plan, now)))
        return results

    def _history_sync(self, account_id: str, after: int, limit: int) -> HistoryPage:
        with self._read() as conn:
            self._get_sync(account_id)
            rows = conn.execute(q.qmark(q.SELECT_HISTORY), (account_id, after, limit + 1)).fetchall()
        entries = tuple(q.row_to_entry(r) for r in rows[:limit])
        more = len(rows) > limit
        return HistoryPage(entries=entries, next_after=entries[-1].id if more else None)

    def _snapshot_sync(self) -> LedgerSnapshot:
        with self._read() as conn:
            pairs = [q.row_to_account(r) for r in conn.execute(q.SELECT_ALL_ACCOUNTS).fetchall()]
            entries = tuple(q.row_to_entry(r) for r in conn.execute(q.SELECT_ALL_ENTRIES).fetchall())
            outbox = frozenset(r[0] for r in conn.execute(q.SELECT_OUTBOX_IDS).fetchall())
        return LedgerSnapshot(
            accounts=tuple(a for a, _ in pairs),
            balances=tuple(b for _, b in pairs),
            entries=entries,
            unpublished=outbox,
        )

    def _mark_sync(self, ids: list[int]) -> None:
        with self._write() as conn:
            conn.executemany(q.qmark(q.DELETE_OUTBOX), [(i,) for i in ids])

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
        return await self._run_write(self._create_account_sync, wanted, self._clock())

    async def get_account(self, account_id: str) -> Account:
        """Return an account (raises ``account_not_found``)."""
        return (await self._run(self._get_sync, account_id))[0]

    async def get_balance(self, account_id: str) -> Balance:
        """Return an account's balance (raises ``account_not_found``)."""
        return (await self._run(self._get_sync, account_id))[1]

    async def transfer(self, request: TransferRequest, *, now: float | None = None) -> TransferResult:
        """Post a transfer (rules: :func:`~rtcore.wallet.ledger.plan_transfer`)."""
        validate_transfer(request)  # refuse malformed requests without taking the write lock
        return await self._run_write(self._transfer_sync, request, self._now(now))

    async def hold(self, request: HoldRequest, *, now: float | None = None) -> HoldResult:
        """Place a hold (rules: :func:`~rtcore.wallet.ledger.plan_hold`)."""
        return await self._run_write(self._hold_sync, request, self._now(now))

    async def capture(self, hold_id: str, amount: int | None = None, *, now: float | None = None) -> HoldResult:
        """Capture ``amount`` (default all) of a pending hold; release the rest."""
        return await self._run_write(self._settle_sync, hold_id, amount, False, self._now(now))

    async def void(self, hold_id: str, *, now: float | None = None) -> HoldResult:
        """Void a pending hold, releasing all of it."""
        return await self._run_write(self._settle_sync, hold_id, None, True, self._now(now))

    async def expire_holds(self, now: float | None = None, *, limit: int = 1000) -> list[HoldResult]:
        """Expire pending holds whose deadline is ``<= now`` (one transaction each)."""
        return await self._run_write(self._expire_sync, self._now(now), limit)

    async def get_transfer(self, transfer_id: str) -> Transfer | Hold | None:
        """Return the transfer or hold with this id, if any."""
        return await self._run(self._record, self._conn, transfer_id)

    async def history(self, account_id: str, after_entry_id: int = 0, limit: int = 100) -> HistoryPage:
        """Page through an account's entries, oldest first."""
        return await self._run(self._history_sync, account_id, after_entry_id, max(1, limit))

    async def all_balances(self) -> list[Balance]:
        """Every account's balance, ordered by account id."""
        snapshot = await self._run(self._all_accounts_sync)
        return [balance for _, balance in snapshot]

    def _all_accounts_sync(self) -> list[tuple[Account, Balance]]:
        return [q.row_to_account(r) for r in self._conn.execute(q.SELECT_ALL_ACCOUNTS).fetchall()]

    async def entries(self, after_entry_id: int = 0, limit: int = 1000) -> list[Entry]:
        """Entries of all accounts after ``after_entry_id``, in id order."""

        def read() -> list[Entry]:
            rows = self._conn.execute(q.qmark(q.SELECT_ENTRIES), (after_entry_id, limit)).fetchall()
            return [q.row_to_entry(r) for r in rows]

        return await self._run(read)

    async def snapshot(self) -> LedgerSnapshot:
        """Accounts, balances, entries and outbox from one read transaction."""
        return await self._run(self._snapshot_sync)

    async def unpublished(self, limit: int = 1000) -> list[BalanceChanged]:
        """Outbox records in entry order."""

        def read() -> list[BalanceChanged]:
            rows = self._conn.execute(q.qmark(q.SELECT_UNPUBLISHED), (limit,)).fetchall()
            return [balance_changed(q.row_to_entry(r)) for r in rows]

        return await self._run(read)

    async def mark_published(self, entry_ids: Iterable[int]) -> None:
        """Drop entries from the outbox (unknown ids are ignored)."""
        ids = list(entry_ids)
        if ids:
            await self._run_write(self._mark_sync, ids)

    async def aclose(self) -> None:
        """Close the connection (waits for a running operation to finish)."""
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._conn.close, limiter=self._limiter)

    def __repr__(self) -> str:
        return f"<SqliteWalletStore closed={self._closed}>"

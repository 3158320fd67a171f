"""The ``sqlite:///path.db`` backend: embedded, durable, no service to run.

Why it is shaped this way:

* **One connection, one worker at a time.** The stdlib :mod:`sqlite3` driver is
  blocking, so every database call runs in a worker thread: on asyncio the
  connection's own thread (:class:`_Thread`, calls in arrival order), on
  other loops :func:`anyio.to_thread.run_sync` with a ``CapacityLimiter(1)``.
  The event loop never blocks, and because only one call runs at a time the
  single connection is never used concurrently: appends are serialized in this
  process, and ``BEGIN IMMEDIATE`` serializes them against other processes
  that open the same file.
* **Durable on return, one fsync per group.** The file is in WAL mode with
  ``synchronous=FULL``: the WAL is fsynced at every commit. Writes are
  group-committed (see :class:`_Db`): every write queued while one group
  commits joins the next group, one transaction with a savepoint per write,
  and each caller is answered only after the COMMIT covering its write
  returned. So an append (or idempotency record) that returned survives a
  ``kill -9`` of the process or a power cut, and a busy node pays one fsync
  for many writes instead of one each.
* **A global commit sequence.** Every event row has ``seq INTEGER PRIMARY KEY
  AUTOINCREMENT``. SQLite has one writer at a time, so ``seq`` grows in commit
  order across every process writing the file, and per stream it grows with
  the offset. The live feed is a cursor on ``seq``: events appended through
  this process are pushed to the feeds right after commit (no latency), and a
  poller reads ``seq > cursor`` every :data:`POLL_INTERVAL` seconds to pick up
  events that other processes appended. A pushed event is delivered only when
  it is exactly the next ``seq`` (``cursor + 1``); otherwise something from
  another process sits in between and the poller delivers both in order. One
  cursor per feed makes "in order, never twice" a single integer comparison.
* **Streams are created on first touch.** As in the memory backend, ``info``
  and ``read`` of an unknown stream give it an epoch (a write), so the epoch a
  client sees before the first event is the one the first event carries.

* **Consumer groups ride on ``seq``.** A group is a row holding the last
  ``seq`` handed to any member, plus one ``group_pending`` row per event a
  member holds and has not acknowledged. Both live in the database, so a
  restarted process (or another process on the same file) continues where
  the group left off. The global log is the ``events`` table itself: an
  event trimmed by its stream's retention before the group read it is not
  delivered.

The URL follows the SQLAlchemy convention: ``sqlite:///rel/path.db`` is
relative to the working directory, ``sqlite:////abs/path.db`` is absolute and
``sqlite:///:memory:`` is a private in-memory database (tests only: nothing
is durable and no other process can see it).

Column ``off`` holds the offset (``offset`` is an SQL keyword). Event payloads
are msgpack (msgspec) blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple, Unpack

import anyio
import msgspec

from ..errors import BackendError, ConflictError
from ..protocol.idempotency import DEFAULT_TTL, claimable
from ._batch import UNSET, Batcher, Job
from .base import (
    AppendResult,
    Backend,
    Event,
    GroupMessage,
    IdempotencyRecord,
    Outcome,
    ReadResult,
    Retention,
    Snapshot,
    StreamInfo,
)
from .memory import new_epoch

__all__ = [
    "CURSOR_SWEEP_EVERY",
    "MAX_GROUP",
    "POLL_INTERVAL",
    "WAL_AUTOCHECKPOINT",
    "SqliteBackend",
    "SqliteCursorStore",
    "SqliteEventLog",
    "SqliteGroupLog",
    "SqliteIdempotencyStore",
    "SqliteLeaseStore",
    "SqliteSnapshotStore",
    "open_sqlite",
]

#: How often (seconds) a running live feed looks for events appended by other processes.
POLL_INTERVAL = 0.05

#: Most rows one poll reads; a feed far behind catches up over several polls.
_POLL_BATCH = 1000

#: Most writes one group commit holds (the rest wait for the next group).
MAX_GROUP = 512

#: WAL pages (4 KiB each) after which a commit checkpoints them into the database
#: file (SQLite's default is 1,000): fewer, larger checkpoints copy each hot page
#: once per checkpoint instead of many times. The WAL file may grow to about
#: 40 MB before it is reused, and a crash recovery replays at most that much.
WAL_AUTOCHECKPOINT = 10_000

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    name  TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    head  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    off    INTEGER NOT NULL,
    epoch  TEXT NOT NULL,
    type   TEXT NOT NULL,
    data   BLOB NOT NULL,
    ts     REAL NOT NULL,
    key    TEXT,
    UNIQUE (stream, off)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_key ON events (stream, key) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    scope   TEXT NOT NULL,
    key     TEXT NOT NULL,
    state   TEXT NOT NULL,
    expires REAL NOT NULL,
    record  BLOB NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires);
CREATE TABLE IF NOT EXISTS cursors (
    principal TEXT NOT NULL,
    stream    TEXT NOT NULL,
    epoch     TEXT NOT NULL,
    off       INTEGER NOT NULL,
    expires   REAL,
    PRIMARY KEY (principal, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    stream   TEXT PRIMARY KEY,
    epoch    TEXT NOT NULL,
    off      INTEGER NOT NULL,
    state    BLOB NOT NULL,
    checksum TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name    TEXT PRIMARY KEY,
    holder  TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumer_groups (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_pending (
    grp        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    consumer   TEXT NOT NULL,
    delivered  REAL NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
"""

_EVENT_COLS = "seq, stream, off, epoch, type, data, ts, key"
# A stream's epoch and head plus its retained event with a key (NULLs when
# none), through the events_key index: one statement for a keyed append's reads.
_STREAM_AND_KEYED = (
    "SELECT s.epoch, s.head, e.seq, e.stream, e.off, e.epoch, e.type, e.data, e.ts, e.key "
    "FROM streams s LEFT JOIN events e ON e.stream = s.name AND e.key = ? WHERE s.name = ?"
)
_Row = tuple[int, str, int, str, str, bytes, float, str | None]
# Claims a key that has no row at all (rowcount 1); any existing row is left
# for the claim rule to judge.
_IDEM_EXISTS = "SELECT 1 FROM idempotency WHERE scope = ? AND key = ?"
_IDEM_CLAIM_NEW = "INSERT OR IGNORE INTO idempotency (scope, key, state, expires, record) VALUES (?, ?, ?, ?, ?)"

_encode = msgspec.msgpack.Encoder().encode
_decode_any = msgspec.msgpack.Decoder().decode
_decode_record = msgspec.msgpack.Decoder(IdempotencyRecord).decode


def _row_event(row: _Row) -> Event:
    _seq, stream, off, epoch, type_, data, ts, key = row
    return Event(stream, epoch, off, type_, _decode_any(data), ts, key)


def _path_from_url(url: str) -> str:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ValueError(f"expected sqlite:///path.db (or sqlite:////abs/path.db, sqlite:///:memory:), got {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path:
        raise ValueError(f"no database path in {url!r}")
    return path


def _commit(conn: sqlite3.Connection) -> None:
    """``COMMIT``: with WAL and ``synchronous=FULL`` this is the fsync that makes a group durable.

    A module function (not inlined) so tests can make a group's commit fail.
    """
    conn.execute("COMMIT")


class _Write(Job):
    """One queued write and what to run after the commit that covers it."""

    __slots__ = ("after", "fn")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any] | None, after: Callable[[], None] | None) -> None:
        super().__init__()
        self.fn = fn
        self.after = after

    def run(self, conn: sqlite3.Connection) -> Any:
        """The write's statements (on the worker thread, inside the group's transaction)."""
        assert self.fn is not None
        return self.fn(conn)

    def committed(self) -> None:
        """Runs on the worker right after the COMMIT that covers the write."""
        if self.after is not None:
            self.after()


class _Append(_Write):
    """An event append as a job object: its arguments in slots.

    The hot write (two per room move) was a closure and a lambda: some ten
    cells and two functions per append, each a container the cyclic
    collector walks while the append waits for its group commit. With a
    thousand moves in flight those were a fifth of the young objects and
    young collections took 10-30 ms each (``gc.callbacks``, 1,000 sqlite rooms).
    """

    __slots__ = ("blob", "data", "expect", "key", "log", "now", "out", "retention", "stream", "type")

    def __init__(
        self,
        log: SqliteEventLog,
        stream: str,
        type_: str,
        data: Any,
        now: float,
        key: str | None,
        expect: int | None,
        retention: Retention | None,
    ) -> None:
        super().__init__(None, None)
        self.log = log
        self.stream = stream
        self.type = type_
        self.blob = _encode(data)
        self.data = data
        self.now = now
        self.key = key
        self.expect = expect
        self.retention = retention
        # The new event and its seq, for the live feeds once committed (see _append_rows).
        self.out: list[tuple[int, Event]] = []

    def run(self, conn: sqlite3.Connection) -> Any:
        self.out.clear()  # a rerun of the group (see _run_group) starts afresh
        return self._rows(conn)

    def _rows(self, conn: sqlite3.Connection) -> AppendResult | int:
        return _append_rows(
            conn, self.stream, self.type, self.blob, self.data, self.now, self.key, self.expect, self.retention, self.out
        )

    def committed(self) -> None:
        # Published to the shared queue only once the group's COMMIT returned
        # (a rolled-back append must never reach a feed), in commit order.
        self.log._committed.extend(self.out)


def _run_group(conn: sqlite3.Connection, group: list[_Write]) -> None:
    """Run ``group`` as one transaction (one fsync); a write that raises fails alone.

    The writes run back to back with no savepoints (two statements per write
    saved on the hot path). If one raises, the whole transaction is rolled
    back and the group runs again with each write in its own savepoint
    (:func:`_run_isolated`), so the failing write loses its changes and its
    error is its own while the others commit. A write's ``fn`` may therefore
    run twice and must keep no state outside the database between runs. If
    the COMMIT itself fails this raises, and the caller fails every write of
    the group.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        try:
            for w in group:
                w.result = w.run(conn)
        except Exception:
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            _run_isolated(conn, group)
        _commit(conn)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    for w in group:
        if w.error is None:
            w.committed()


def _run_isolated(conn: sqlite3.Connection, group: list[_Write]) -> None:
    """Run every write of ``group`` in its own savepoint; a write that raises is rolled back alone."""
    for w in group:
        w.result = UNSET
        conn.execute("SAVEPOINT w")
        try:
            w.result = w.run(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO w")
            w.result, w.error = UNSET, exc
        conn.execute("RELEASE w")


class _BeginAppend(_Append):
    """A keyed command's claim, append and outcome as one job (see :meth:`SqliteBackend.begin_append`)."""

    __slots__ = ("claim",)

    def __init__(
        self,
        log: SqliteEventLog,
        stream: str,
        type_: str,
        data: Any,
        now: float,
        event_key: str,
        expect: int | None,
        retention: Retention | None,
        claim: tuple[str, str, bytes, tuple[Any, ...], float | None, bool],
    ) -> None:
        super().__init__(log, stream, type_, data, now, event_key, expect, retention)
        #: ``(scope, key, fingerprint, pending row params, outcome_ttl, sweep)``.
        self.claim = claim

    def run(self, conn: sqlite3.Connection) -> tuple[IdempotencyRecord | None, AppendResult | int | None]:
        self.out.clear()  # a rerun of the group (see _run_group) starts afresh
        scope, key, fingerprint, params, outcome_ttl, sweep = self.claim
        if outcome_ttl is not None and conn.execute(_IDEM_EXISTS, (scope, key)).fetchone() is None:
            # A fresh key (nearly every command): the claim would be
            # overwritten in this same transaction, so only the final row
            # is written: the outcome, or the claim if the append conflicts.
            fresh = self._rows(conn)
            if isinstance(fresh, int):
                conn.execute(_IDEM_CLAIM_NEW, params)
            else:
                done = IdempotencyRecord(fingerprint, "done", self.now + outcome_ttl, Outcome(True, fresh.event.offset))
                _store_done(conn, scope, key, _encode(done), done.expires, self.now, sweep)
            return None, fresh
        existing = _claim(conn, scope, key, fingerprint, self.now, params)
        if existing is not None:
            return existing, None
        result = self._rows(conn)
        if outcome_ttl is not None and not isinstance(result, int):
            done = IdempotencyRecord(fingerprint, "done", self.now + outcome_ttl, Outcome(True, result.event.offset))
            _store_done(conn, scope, key, _encode(done), done.expires, self.now, sweep)
        return None, result


def _outcome(w: _Write) -> Any:
    """What a committed write returned; raise its error (engine failures as :class:`BackendError`)."""
    if w.error is not None:
        if isinstance(w.error, sqlite3.Error):
            raise BackendError(f"sqlite: {w.error}") from w.error
        raise w.error
    return w.result


class _Thread:
    """The connection's own worker thread, for asyncio: one call at a time, in arrival order.

    ``anyio.to_thread.run_sync`` costs ~56 µs of CPU per call on asyncio
    (its capacity limiter and worker bookkeeping) against ~28 µs for a
    queue and ``call_soon_threadsafe``, and a busy node pays it once per
    group commit and once per read. A caller cancelled while its call runs
    stops waiting, but the call still finishes before the next one starts,
    so the connection is never used by two threads at once.
    """

    __slots__ = ("_queue", "_thread")

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread (started on first use); return or raise its outcome."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="rtcore-sqlite", daemon=True)
            self._thread.start()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return await fut

    def stop(self) -> None:
        """Let the thread end after the calls queued before this one."""
        if self._thread is not None:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, loop, fut = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, fut, result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class _Db:
    """The one connection plus the one-at-a-time worker that uses it.

    Writes are **group-committed** (see :mod:`rtcore.backends._batch`): every
    write queued while a group commits joins the next group, which runs as
    one ``BEGIN IMMEDIATE ... COMMIT`` on the worker thread, so one fsync (and
    one thread hop) covers them all. Each caller is answered only after the
    COMMIT that covers its write returned, so an acknowledged write is on
    disk. The window is not a timer: a group is whatever arrived while the
    previous one was committing (at most :data:`MAX_GROUP` writes).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._limiter = anyio.CapacityLimiter(1)
        self._thread = _Thread()
        self.closed = False
        #: The group committer (``groups.batches`` groups held ``groups.jobs`` writes).
        self.groups: Batcher[_Write] = Batcher(self._commit_group, MAX_GROUP)

    async def run(self, fn: Callable[[sqlite3.Connection, Unpack[Ts]], T], *args: *Ts) -> T:
        """Run ``fn(conn, *args)`` on the worker, mapping engine failures to BackendError."""
        if self.closed:
            raise BackendError("the sqlite backend is closed")
        try:
            return await self._call(fn, self.conn, *args)
        except sqlite3.Error as exc:
            raise BackendError(f"sqlite: {exc}") from exc

    async def write(self, fn: Callable[[sqlite3.Connection], T], after: Callable[[], None] | None = None) -> T:
        """Run ``fn(conn)`` in the next group commit; return once that commit is durable.

        Args:
            fn: The write (runs on the worker thread inside a savepoint; if it
                raises, only its own changes are rolled back).
            after: Runs on the worker thread right after the covering COMMIT
                (in queue order), never if ``fn`` raised or the commit failed.

        Raises:
            BackendError: the engine failed, or the group's COMMIT failed
                (retryable: nothing of this write was kept).
        """
        if self.closed:
            raise BackendError("the sqlite backend is closed")
        return _outcome(await self.groups.submit(_Write(fn, after)))  # type: ignore[no-any-return]

    async def _commit_group(self, group: list[_Write]) -> None:
        try:
            if self.closed:
                raise BackendError("the sqlite backend is closed")
            await self._call(_run_group, self.conn, group)
        except BaseException as exc:
            # Nothing of the group was kept (or a failed COMMIT left it
            # unknown): no write of it may be reported done.
            for w in group:
                w.result, w.error = UNSET, exc

    async def close(self) -> None:
        if self.closed:
            return
        await self._call(self.conn.close)
        self._thread.stop()
        self.closed = True

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the connection's worker (see :class:`_Thread`)."""
        if asyncio._get_running_loop() is not None:
            return await self._thread.run(fn, *args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


def _ensure_stream(conn: sqlite3.Connection, stream: str) -> tuple[str, int]:
    row = conn.execute("SELECT epoch, head FROM streams WHERE name = ?", (stream,)).fetchone()
    if row is None:
        epoch = new_epoch()
        conn.execute("INSERT INTO streams (name, epoch, head) VALUES (?, ?, 0)", (stream, epoch))
        return epoch, 0
    return row[0], row[1]


def _first(conn: sqlite3.Connection, stream: str, head: int) -> int:
    row = conn.execute("SELECT MIN(off) FROM events WHERE stream = ?", (stream,)).fetchone()
    return head + 1 if row[0] is None else int(row[0])


def _trim(conn: sqlite3.Connection, stream: str, retention: Retention, now: float, head: int | None = None) -> int:
    """Apply ``retention`` to ``stream``; ``head``: its head, when the caller has just written it."""
    dropped = 0
    if retention.max_events is not None:
        if head is None:
            cur = conn.execute(
                "DELETE FROM events WHERE stream = ? AND off <= (SELECT head FROM streams WHERE name = ?) - ?",
                (stream, stream, retention.max_events),
            )
            dropped += cur.rowcount
        elif head > retention.max_events:
            # Offsets are dense from 1: a stream whose head is within
            # max_events holds no more than that, and most streams (a game's
            # room) never get there, so an append skips the statement.
            cur = conn.execute("DELETE FROM events WHERE stream = ? AND off <= ?", (stream, head - retention.max_events))
            dropped += cur.rowcount
    if retention.max_age is not None:
        # Same rule as the memory backend: drop from the oldest while older
        # than the cutoff, stopping at the first young enough event (``now`` is
        # caller-supplied, so timestamps need not be monotonic).
        cutoff = now - retention.max_age
        row = conn.execute("SELECT MIN(off) FROM events WHERE stream = ? AND ts >= ?", (stream, cutoff)).fetchone()
        if row[0] is None:
            cur = conn.execute("DELETE FROM events WHERE stream = ?", (stream,))
        else:
            cur = conn.execute("DELETE FROM events WHERE stream = ? AND off < ?", (stream, row[0]))
        dropped += cur.rowcount
    return dropped


class _SqliteFeed:
    """A live feed: pushed local commits plus a ``seq`` poller for other processes."""

    def __init__(self, log: SqliteEventLog, deliver: Callable[[Event], None]) -> None:
        self._log = log
        self._deliver = deliver
        self._streams: set[str] = set()
        self._all = False
        self._cursor: int | None = None  # highest seq already handled (None: not running)

    def watch(self, stream: str) -> None:
        if stream == "*":
            self._all = True
        else:
            self._streams.add(stream)

    def unwatch(self, stream: str) -> None:
        if stream == "*":
            self._all = False
        else:
            self._streams.discard(stream)

    def _wants(self, stream: str) -> bool:
        return self._all or stream in self._streams

    def push(self, seq: int, event: Event) -> None:
        """A commit made through this process: deliver it now if nothing is missing before it."""
        if self._cursor is None or seq != self._cursor + 1:
            return  # seq <= cursor: already handled; a gap: the poller fills it in order
        self._cursor = seq
        if self._wants(event.stream):
            self._deliver(event)

    def _take(self, rows: list[_Row], high: int) -> None:
        assert self._cursor is not None
        for row in rows:
            if row[0] <= self._cursor:
                continue  # delivered by a push while the poll was in flight
            self._cursor = row[0]
            if self._wants(row[1]):
                self._deliver(_row_event(row))
        self._cursor = max(self._cursor, high)

    async def run(self) -> None:
        db = self._log._db
        self._cursor = await db.run(_max_seq)
        self._log._feeds.append(self)
        try:
            while True:
                await anyio.sleep(POLL_INTERVAL)
                rows, high = await db.run(_rows_after, self._cursor)
                self._take(rows, high)
        finally:
            self._log._feeds.remove(self)
            self._cursor = None


def _max_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return 0 if row is None else int(row[0])


def _rows_after(conn: sqlite3.Connection, cursor: int) -> tuple[list[_Row], int]:
    """Rows with ``seq > cursor`` (one batch) and the seq the reader may advance to."""
    conn.execute("BEGIN")  # one snapshot for both statements
    try:
        high = _max_seq(conn)
        if high <= cursor:
            return [], cursor
        rows: list[_Row] = conn.execute(
            f"SELECT {_EVENT_COLS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (cursor, high, _POLL_BATCH),
        ).fetchall()
        if len(rows) == _POLL_BATCH:
            high = rows[-1][0]  # more to come: advance only over what was read
        return rows, high
    finally:
        conn.execute("COMMIT")


def _append_rows(
    conn: sqlite3.Connection,
    stream: str,
    type_: str,
    blob: bytes,
    data: Any,
    now: float,
    key: str | None,
    expect: int | None,
    retention: Retention | None,
    committed: list[tuple[int, Event]],
) -> AppendResult | int:
    """The statements of one append (inside the caller's transaction); the head on an ``expect`` mismatch.

    A new event goes to ``committed`` (with its ``seq``), for the live feeds
    once the transaction has committed.
    """
    if key is None:
        epoch, head = _ensure_stream(conn, stream)
    else:
        # The stream's row and the keyed event (if retained) in one statement.
        row = conn.execute(_STREAM_AND_KEYED, (key, stream)).fetchone()
        if row is None:
            epoch, head = _ensure_stream(conn, stream)
        elif row[2] is not None:
            return AppendResult(_row_event(row[2:]), duplicate=True)
        else:
            epoch, head = row[0], row[1]
    if expect is not None and expect != head:
        return head
    head += 1
    conn.execute("UPDATE streams SET head = ? WHERE name = ?", (head, stream))
    cur = conn.execute(
        "INSERT INTO events (stream, off, epoch, type, data, ts, key) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (stream, head, epoch, type_, blob, now, key),
    )
    if retention is not None:
        _trim(conn, stream, retention, now, head)
    event = Event(stream, epoch, head, type_, data, now, key)
    assert cur.lastrowid is not None
    committed.append((cur.lastrowid, event))
    return AppendResult(event)


def _claim(
    conn: sqlite3.Connection, scope: str, key: str, fingerprint: bytes, now: float, params: tuple[Any, ...]
) -> IdempotencyRecord | None:
    """Claim ``key`` (``params``: its pending row) or return the record that keeps it (see ``begin``)."""
    # A fresh key (nearly every command) is claimed by one statement;
    # only a key that has a row is read and judged by the claim rule.
    if conn.execute(_IDEM_CLAIM_NEW, params).rowcount == 1:
        return None
    row = conn.execute("SELECT record, expires FROM idempotency WHERE scope = ? AND key = ?", (scope, key)).fetchone()
    if row is not None and row[1] > now:
        rec = _decode_record(row[0])
        if not claimable(rec, fingerprint, now):
            return rec
    conn.execute(
        "INSERT OR REPLACE INTO idempotency (scope, key, state, expires, record) VALUES (?, ?, ?, ?, ?)", params
    )
    return None


def _store_done(conn: sqlite3.Connection, scope: str, key: str, blob: bytes, expires: float, now: float, sweep: bool) -> None:
    """Write the finished record of ``key`` (``blob``, expiring at ``expires``); ``sweep``: also delete expired records."""
    conn.execute(
        "INSERT OR REPLACE INTO idempotency (scope, key, state, expires, record) VALUES (?, ?, ?, ?, ?)",
        (scope, key, "done", expires, blob),
    )
    if sweep:  # occasional garbage collection keeps the table bounded
        conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))


def _pending_params(scope: str, key: str, fingerprint: bytes, now: float, lease: float, ttl: float) -> tuple[Any, ...]:
    """The row of a pending claim of ``key``."""
    pending = IdempotencyRecord(fingerprint, "pending", now + max(ttl, lease), lease=now + lease)
    return (scope, key, "pending", pending.expires, _encode(pending))


class SqliteEventLog:
    """:class:`~rtcore.backends.base.EventLog` on an SQLite file."""

    def __init__(self, db: _Db) -> None:
        self._db = db
        self._feeds: list[_SqliteFeed] = []
        # Commits in commit order, filled on the worker thread right after each
        # COMMIT and drained on the event loop, so pushes keep seq order even
        # when the awaiting tasks resume out of order.
        self._committed: deque[tuple[int, Event]] = deque()

    def _drain(self) -> None:
        while self._committed:
            seq, event = self._committed.popleft()
            for feed in tuple(self._feeds):
                feed.push(seq, event)

    async def append(
        self,
        stream: str,
        type: str,
        data: Any,
        *,
        now: float,
        key: str | None = None,
        expect: int | None = None,
        retention: Retention | None = None,
    ) -> AppendResult:
        """Append one event; see :meth:`rtcore.backends.base.EventLog.append`."""
        db = self._db
        if db.closed:
            raise BackendError("the sqlite backend is closed")
        # _Db.write inlined, with a job object instead of a closure (see _Append).
        result: AppendResult | int = _outcome(await db.groups.submit(_Append(self, stream, type, data, now, key, expect, retention)))
        self._drain()
        if isinstance(result, int):
            raise ConflictError(f"stream {stream!r} head is {result}, expected {expect}")
        return result

    async def read(self, stream: str, *, after: int, limit: int) -> ReadResult:
        """Read up to ``limit`` retained events with offset > ``after``."""

        def tx(conn: sqlite3.Connection) -> ReadResult:
            epoch, head = _ensure_stream(conn, stream)
            rows: list[_Row] = []
            if limit > 0:
                rows = conn.execute(
                    f"SELECT {_EVENT_COLS} FROM events WHERE stream = ? AND off > ? ORDER BY off LIMIT ?",
                    (stream, after, limit),
                ).fetchall()
            return ReadResult(epoch, head, _first(conn, stream, head), [_row_event(r) for r in rows])

        return await self._db.write(tx)

    async def info(self, stream: str) -> StreamInfo:
        """Return the stream's epoch, head and first retained offset."""

        def tx(conn: sqlite3.Connection) -> StreamInfo:
            epoch, head = _ensure_stream(conn, stream)
            return StreamInfo(epoch, head, _first(conn, stream, head))

        return await self._db.write(tx)

    async def trim(self, stream: str, retention: Retention, *, now: float) -> int:
        """Drop events beyond ``retention``; return how many were dropped."""

        def tx(conn: sqlite3.Connection) -> int:
            _ensure_stream(conn, stream)
            return _trim(conn, stream, retention, now)

        return await self._db.write(tx)

    async def streams(self, pattern: str = "*") -> list[str]:
        """Names of the known streams matching the glob ``pattern``."""
        rows: list[tuple[str]] = await self._db.run(
            lambda conn: conn.execute("SELECT name FROM streams ORDER BY name").fetchall()
        )
        # fnmatch rather than SQL GLOB so every backend agrees on the pattern syntax.
        return [name for (name,) in rows if fnmatch.fnmatchcase(name, pattern)]

    def live(self, deliver: Callable[[Event], None]) -> _SqliteFeed:
        """Create a live feed; see :class:`~rtcore.backends.base.LiveFeed`."""
        return _SqliteFeed(self, deliver)


class SqliteIdempotencyStore:
    """:class:`~rtcore.backends.base.IdempotencyStore` on SQLite."""

    def __init__(self, db: _Db) -> None:
        self._db = db
        self._finishes = 0

    async def begin(
        self, scope: str, key: str, fingerprint: bytes, *, now: float, lease: float, ttl: float = DEFAULT_TTL
    ) -> IdempotencyRecord | None:
        """Claim ``key`` or return the live record (see the Protocol)."""
        params = _pending_params(scope, key, fingerprint, now, lease, ttl)
        return await self._db.write(lambda conn: _claim(conn, scope, key, fingerprint, now, params))

    def _count_finish(self) -> bool:
        """Count one finish; whether it is the one that also deletes expired records (every 1024th)."""
        self._finishes += 1
        return self._finishes % 1024 == 0

    async def finish(
        self, scope: str, key: str, outcome: Outcome, *, now: float, ttl: float, fingerprint: bytes | None = None
    ) -> None:
        """Store the final outcome for ``ttl`` seconds."""
        sweep = self._count_finish()
        # With the fingerprint given (dispatch always gives it) the record is
        # encoded here, off the worker, and the write is one statement.
        done = None if fingerprint is None else _encode(IdempotencyRecord(fingerprint, "done", now + ttl, outcome))

        def tx(conn: sqlite3.Connection) -> None:
            blob = done
            if blob is None:
                row = conn.execute(
                    "SELECT record FROM idempotency WHERE scope = ? AND key = ?", (scope, key)
                ).fetchone()
                fp = _decode_record(row[0]).fingerprint if row is not None else b""
                blob = _encode(IdempotencyRecord(fp, "done", now + ttl, outcome))
            _store_done(conn, scope, key, blob, now + ttl, now, sweep)

        await self._db.write(tx)

    async def release(self, scope: str, key: str) -> None:
        """Mark a pending key released (bound to its fingerprint); a finished outcome is kept."""

        def tx(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT record FROM idempotency WHERE scope = ? AND key = ? AND state = 'pending'", (scope, key)
            ).fetchone()
            if row is not None:
                rec = msgspec.structs.replace(_decode_record(row[0]), state="released")
                conn.execute(
                    "UPDATE idempotency SET state = 'released', record = ? WHERE scope = ? AND key = ?",
                    (_encode(rec), scope, key),
                )

        await self._db.write(tx)


#: Every this many cursor advances, one of them also deletes the expired cursors.
CURSOR_SWEEP_EVERY = 1024

# The position is replaced when the stored cursor expired (a newcomer's
# position), is of another epoch, or is behind; the expiry always moves.
# ``expires IS NULL`` (a row from before cursors expired) compares as live.
_CURSOR_MOVES = "cursors.expires <= :now OR cursors.epoch != excluded.epoch OR excluded.off > cursors.off"
_CURSOR_ADVANCE = (
    "INSERT INTO cursors (principal, stream, epoch, off, expires) VALUES (:p, :s, :e, :o, :x) "
    "ON CONFLICT (principal, stream) DO UPDATE SET "
    f"epoch = CASE WHEN {_CURSOR_MOVES} THEN excluded.epoch ELSE cursors.epoch END, "
    f"off = CASE WHEN {_CURSOR_MOVES} THEN excluded.off ELSE cursors.off END, "
    "expires = excluded.expires"
)


class SqliteCursorStore:
    """:class:`~rtcore.backends.base.CursorStore` on SQLite.

    Each row carries its expiry; :meth:`get` ignores expired rows and every
    :data:`CURSOR_SWEEP_EVERY`-th :meth:`advance` deletes them (through the
    ``cursors_expires`` index), so the table holds about one TTL's worth of
    cursors. Rows written before cursors expired (``expires`` NULL, see
    :func:`_migrate`) stay readable and get ``now + ttl`` at the first sweep.
    """

    def __init__(self, db: _Db) -> None:
        self._db = db
        self._advances = 0

    async def get(self, principal: str, stream: str, *, now: float) -> tuple[str, int] | None:
        """Return ``(epoch, offset)``, or ``None`` if absent or expired."""
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT epoch, off FROM cursors WHERE principal = ? AND stream = ? "
                "AND (expires IS NULL OR expires > ?)",
                (principal, stream, now),
            ).fetchone()
        )
        return None if row is None else (row[0], row[1])

    async def advance(self, principal: str, stream: str, epoch: str, offset: int, *, now: float, ttl: float) -> None:
        """Move forward within an epoch (another epoch replaces it) and expire at ``now + ttl``."""
        self._advances += 1
        sweep = self._advances % CURSOR_SWEEP_EVERY == 0
        args = {"p": principal, "s": stream, "e": epoch, "o": offset, "x": now + ttl, "now": now}

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(_CURSOR_ADVANCE, args)
            if sweep:  # occasional garbage collection keeps the table bounded
                conn.execute("DELETE FROM cursors WHERE expires <= ?", (now,))
                conn.execute("UPDATE cursors SET expires = ? WHERE expires IS NULL", (now + ttl,))

        await self._db.write(tx)


class SqliteSnapshotStore:
    """:class:`~rtcore.backends.base.SnapshotStore` on SQLite."""

    def __init__(self, db: _Db) -> None:
        self._db = db

    async def get(self, stream: str) -> Snapshot | None:
        """Return the newest snapshot of ``stream``."""
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT epoch, off, state, checksum FROM snapshots WHERE stream = ?", (stream,)
            ).fetchone()
        )
        return None if row is None else Snapshot(stream, row[0], row[1], bytes(row[2]), row[3])

    async def put(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` unless a newer one of the same epoch exists."""
        s = snapshot
        await self._db.write(
            lambda conn: conn.execute(
                "INSERT INTO snapshots (stream, epoch, off, state, checksum) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET epoch = excluded.epoch, off = excluded.off, "
                "state = excluded.state, checksum = excluded.checksum "
                "WHERE snapshots.epoch != excluded.epoch OR excluded.off >= snapshots.off",
                (s.stream, s.epoch, s.offset, s.state, s.checksum),
            )
        )


class SqliteLeaseStore:
    """:class:`~rtcore.backends.base.LeaseStore` on SQLite."""

    def __init__(self, db: _Db) -> None:
        self._db = db

    async def acquire(self, name: str, holder: str, *, now: float, ttl: float) -> bool:
        """Take or renew ``name`` for ``holder``; False if someone else holds it."""

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires <= ?",
                (name, holder, now + ttl, now),
            )
            return cur.rowcount == 1

        return await self._db.write(tx)

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up if ``holder`` has it."""
        await self._db.write(
            lambda conn: conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
        )


def _create_group(conn: sqlite3.Connection, group: str) -> int:
    """Create ``group`` at the newest seq if missing; return its position."""
    conn.execute("INSERT OR IGNORE INTO consumer_groups (name, last) VALUES (?, ?)", (group, _max_seq(conn)))
    return int(conn.execute("SELECT last FROM consumer_groups WHERE name = ?", (group,)).fetchone()[0])


class SqliteGroupLog:
    """:class:`~rtcore.backends.base.GroupLog` on SQLite: positions and pending lists in the file.

    Waiting for new events polls every :data:`POLL_INTERVAL` seconds (other
    processes may append), with a cheap read-only check before taking the
    write lock.
    """

    def __init__(self, db: _Db) -> None:
        self._db = db

    async def create(self, group: str) -> None:
        """Create ``group`` at the newest event unless it exists."""
        await self._db.write(lambda conn: _create_group(conn, group))

    async def read(self, group: str, consumer: str, *, now: float, count: int, block: float) -> list[GroupMessage]:
        """Hand up to ``count`` new events to ``consumer``; poll up to ``block`` seconds."""

        def has_new(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT last FROM consumer_groups WHERE name = ?", (group,)).fetchone()
            return row is None or _max_seq(conn) > int(row[0])

        def tx(conn: sqlite3.Connection) -> list[GroupMessage]:
            last = _create_group(conn, group)
            rows: list[_Row] = conn.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, count)
            ).fetchall()
            if not rows:
                return []
            conn.executemany(
                "INSERT OR REPLACE INTO group_pending (grp, seq, consumer, delivered, deliveries) VALUES (?, ?, ?, ?, 1)",
                [(group, r[0], consumer, now) for r in rows],
            )
            conn.execute("UPDATE consumer_groups SET last = ? WHERE name = ?", (rows[-1][0], group))
            return [GroupMessage(str(r[0]), _row_event(r), 1) for r in rows]

        deadline = anyio.current_time() + max(block, 0.0)
        while True:
            if await self._db.run(has_new):
                out = await self._db.write(tx)
                if out:
                    return out
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return []
            await anyio.sleep(min(POLL_INTERVAL, remaining))

    async def ack(self, group: str, ids: list[str]) -> None:
        """Forget the pending entries ``ids``."""
        if not ids:
            return
        params = [(group, int(i)) for i in ids]
        await self._db.write(
            lambda conn: conn.executemany("DELETE FROM group_pending WHERE grp = ? AND seq = ?", params)
        )

    async def claim(self, group: str, consumer: str, *, min_idle: float, now: float, count: int) -> list[GroupMessage]:
        """Move pending entries idle for ``min_idle`` seconds to ``consumer``."""

        def tx(conn: sqlite3.Connection) -> list[GroupMessage]:
            pending = conn.execute(
                "SELECT seq, deliveries FROM group_pending WHERE grp = ? AND delivered <= ? ORDER BY seq LIMIT ?",
                (group, now - min_idle, count),
            ).fetchall()
            out: list[GroupMessage] = []
            for seq, deliveries in pending:
                row = conn.execute(f"SELECT {_EVENT_COLS} FROM events WHERE seq = ?", (seq,)).fetchone()
                if row is None:  # trimmed away: nothing left to hand out
                    conn.execute("DELETE FROM group_pending WHERE grp = ? AND seq = ?", (group, seq))
                    continue
                conn.execute(
                    "UPDATE group_pending SET consumer = ?, delivered = ?, deliveries = ? WHERE grp = ? AND seq = ?",
                    (consumer, now, deliveries + 1, group, seq),
                )
                out.append(GroupMessage(str(seq), _row_event(row), deliveries + 1))
            return out

        return await self._db.write(tx)


class SqliteBackend(Backend):
    """All stores in one SQLite file (``sqlite:///path.db``)."""

    events: SqliteEventLog
    idempotency: SqliteIdempotencyStore

    def __init__(self, url: str, db: _Db) -> None:
        super().__init__(
            url,
            events=SqliteEventLog(db),
            idempotency=SqliteIdempotencyStore(db),
            cursors=SqliteCursorStore(db),
            snapshots=SqliteSnapshotStore(db),
            leases=SqliteLeaseStore(db),
            groups=SqliteGroupLog(db),
        )
        self._db = db

    async def begin_append(
        self,
        scope: str,
        key: str,
        fingerprint: bytes,
        *,
        now: float,
        lease: float,
        ttl: float,
        stream: str,
        type: str,
        data: Any,
        event_key: str,
        expect: int | None = None,
        retention: Retention | None = None,
        outcome_ttl: float | None = None,
    ) -> tuple[IdempotencyRecord | None, AppendResult | None]:
        """Claim, append (and finish) in one write of one group commit (see :meth:`Backend.begin_append`).

        Every statement's effect becomes durable with the same COMMIT, and
        the caller is answered only after it: the claim, the event only if
        the claim succeeded, the outcome only if the event is there.
        """
        sweep = outcome_ttl is not None and self.idempotency._count_finish()
        params = _pending_params(scope, key, fingerprint, now, lease, ttl)
        claim = (scope, key, fingerprint, params, outcome_ttl, sweep)
        job = _BeginAppend(self.events, stream, type, data, now, event_key, expect, retention, claim)
        db = self._db
        if db.closed:
            raise BackendError("the sqlite backend is closed")
        existing, result = _outcome(await db.groups.submit(job))
        self.events._drain()
        if isinstance(result, int):
            raise ConflictError(f"stream {stream!r} head is {result}, expected {expect}")
        return existing, result

    async def aclose(self) -> None:
        """Close the connection (checkpointing the WAL is left to SQLite)."""
        await self._db.close()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file made by an older rtcore up to :data:`_SCHEMA`.

    ``cursors.expires``: files made before cursors expired get the column,
    NULL in their rows, which :class:`SqliteCursorStore` reads as live until
    its first sweep gives them a full TTL. In one ``BEGIN IMMEDIATE`` so two
    processes opening the same old file do not both add the column.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(cursors)")}
        if "expires" not in columns:
            conn.execute("ALTER TABLE cursors ADD COLUMN expires REAL")
        conn.execute("CREATE INDEX IF NOT EXISTS cursors_expires ON cursors (expires)")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread
    # is off because anyio may pick a different pool thread per call; the
    # CapacityLimiter(1) guarantees no two calls overlap.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise BackendError(f"sqlite: could not switch {path!r} to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        # Durability is the WAL's fsync at every COMMIT; the checkpoint only
        # copies committed pages into the main file. At SQLite's default
        # (every 1,000 WAL pages) a busy node checkpointed often and copied
        # the same hot pages (the streams row, index leaves) again each time.
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.executescript(_SCHEMA)
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


async def open_sqlite(url: str) -> Backend:
    """Open (creating if needed) the SQLite database named by ``url``.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` or
            ``sqlite:///:memory:``.

    Returns:
        A :class:`SqliteBackend`; call :meth:`~rtcore.backends.base.Backend.aclose`
        when done.

    Raises:
        ValueError: the URL is not an sqlite URL.
        BackendError: the file could not be opened or prepared.
    """
    path = _path_from_url(url)
    try:
        conn = await anyio.to_thread.run_sync(_connect, path)
    except sqlite3.Error as exc:
        raise BackendError(f"sqlite: cannot open {path!r}: {exc}") from exc
    return SqliteBackend(url, _Db(conn))

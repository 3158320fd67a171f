"""The ``memory://`` backend: everything in this process, nothing survives it.

The default for tests and for trying rtcore. Appends are synchronous under
the hood (no await between reading the head and writing the event), which is
what makes them atomic on one event loop; the live feed is pushed from inside
``append`` so every watcher sees events in offset order.

Consumer groups (:class:`MemoryGroupLog`) run over an in-process global list
of every appended event, numbered by a global sequence and capped at
:data:`GLOBAL_LOG_MAX` entries. Several :class:`~rtcore.engine.node.Node` objects
sharing one :class:`MemoryBackend` form a real group; nothing survives the
process, so the group's position does not either.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import random
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from ..errors import ConflictError
from ..protocol.idempotency import DEFAULT_TTL, claimable
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

__all__ = ["GLOBAL_LOG_MAX", "MemoryBackend", "MemoryEventLog", "MemoryGroupLog", "new_epoch"]

#: Most events the global log (what consumer groups read) keeps; older ones fall off.
GLOBAL_LOG_MAX = 100_000


#: Epochs come from a generator seeded from the OS (reseeded in a forked child,
#: which would otherwise repeat its parent's epochs): ``secrets.token_hex`` is a
#: system call per epoch, and the Redis backend draws a candidate epoch for
#: every append (used only when the append creates the stream). Epochs need to
#: be unpredictable to no one, only unlikely to repeat: 48 random bits, as before.
_EPOCHS = random.Random(secrets.randbits(128))


def _reseed_epochs() -> None:
    _EPOCHS.seed(secrets.randbits(128))


os.register_at_fork(after_in_child=_reseed_epochs)


def new_epoch() -> str:
    """A fresh random epoch id (12 hex characters)."""
    return f"{_EPOCHS.getrandbits(48):012x}"


class _Stream:
    __slots__ = ("epoch", "events", "head", "keys")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.head = 0
        # A list until the first event is trimmed, then a deque (popleft): most
        # streams of a room server (a room's inbox, its document, its code) are
        # never trimmed, and an empty deque is ~760 bytes against ~60 (tracemalloc).
        self.events: list[Event] | deque[Event] = []
        self.keys: dict[str, Event] = {}

    @property
    def first(self) -> int:
        return self.events[0].offset if self.events else self.head + 1

    def drop_oldest(self) -> None:
        events = self.events
        if type(events) is list:
            events = self.events = deque(events)
        assert isinstance(events, deque)
        old = events.popleft()
        if old.key is not None and self.keys.get(old.key) is old:
            del self.keys[old.key]


class _MemoryFeed:
    def __init__(self, log: MemoryEventLog, deliver: Callable[[Event], None]) -> None:
        self._log = log
        self._deliver = deliver
        self._streams: set[str] = set()
        self._all = False

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

    def push(self, event: Event) -> None:
        if self._all or event.stream in self._streams:
            self._deliver(event)

    async def run(self) -> None:
        self._log._feeds.append(self)
        try:
            await anyio.sleep_forever()
        finally:
            self._log._feeds.remove(self)


class MemoryEventLog:
    """In-process :class:`~rtcore.backends.base.EventLog`."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._feeds: list[_MemoryFeed] = []
        # The global log for consumer groups: events in append order; the last
        # one has global sequence number ``_seq``.
        self._all: deque[Event] = deque(maxlen=GLOBAL_LOG_MAX)
        self._seq = 0
        # Only kept once a consumer group exists: groups start after the newest
        # event, so before the first one nobody can ever read the global log
        # (an app without processors would otherwise hold GLOBAL_LOG_MAX events).
        self.keep_global = False
        # Set (and replaced) on every append; group readers that found nothing wait on it.
        self._appended: anyio.Event | None = None

    def _get(self, stream: str) -> _Stream:
        s = self._streams.get(stream)
        if s is None:
            s = self._streams[stream] = _Stream()
        return s

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
        s = self._get(stream)
        if key is not None and key in s.keys:
            return AppendResult(s.keys[key], duplicate=True)
        if expect is not None and expect != s.head:
            raise ConflictError(f"stream {stream!r} head is {s.head}, expected {expect}")
        s.head += 1
        event = Event(stream, s.epoch, s.head, type, data, now, key)
        s.events.append(event)
        if key is not None:
            s.keys[key] = event
        if retention is not None:
            self._trim(s, retention, now)
        for feed in tuple(self._feeds):
            feed.push(event)
        if self.keep_global:
            self._all.append(event)
        self._seq += 1
        if self._appended is not None:
            self._appended.set()
            self._appended = None
        return AppendResult(event)

    def _global(self, seq: int) -> Event | None:
        """The event with global sequence ``seq``, or None once it fell off the capped log."""
        index = seq - (self._seq - len(self._all) + 1)
        return self._all[index] if 0 <= index < len(self._all) else None

    async def read(self, stream: str, *, after: int, limit: int) -> ReadResult:
        s = self._get(stream)
        events: list[Event] = []
        if limit > 0 and s.events:
            # Offsets are dense, so the index of `after + 1` is computable.
            start = max(0, after + 1 - s.events[0].offset)
            for i in range(start, min(len(s.events), start + limit)):
                events.append(s.events[i])
        return ReadResult(s.epoch, s.head, s.first, events)

    async def info(self, stream: str) -> StreamInfo:
        s = self._get(stream)
        return StreamInfo(s.epoch, s.head, s.first)

    async def trim(self, stream: str, retention: Retention, *, now: float) -> int:
        return self._trim(self._get(stream), retention, now)

    @staticmethod
    def _trim(s: _Stream, retention: Retention, now: float) -> int:
        dropped = 0
        if retention.max_events is not None:
            while len(s.events) > retention.max_events:
                s.drop_oldest()
                dropped += 1
        if retention.max_age is not None:
            cutoff = now - retention.max_age
            while s.events and s.events[0].ts < cutoff:
                s.drop_oldest()
                dropped += 1
        return dropped

    async def streams(self, pattern: str = "*") -> list[str]:
        return sorted(name for name in self._streams if fnmatch.fnmatchcase(name, pattern))

    def live(self, deliver: Callable[[Event], None]) -> _MemoryFeed:
        return _MemoryFeed(self, deliver)

    def reset(self) -> None:
        """Forget all history, as a restarted server without persistence would.

        Streams touched afterwards get a new epoch; used by tests of epoch changes.
        """
        self._streams.clear()


class MemoryIdempotencyStore:
    """In-process :class:`~rtcore.backends.base.IdempotencyStore`.

    Records are dropped when they expire: every ``begin`` and ``finish`` pops the expired ones
    off a heap ordered by expiry (amortized O(log n) per write), so the store
    holds at most what was written within one TTL, whatever the number of
    distinct keys.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], IdempotencyRecord] = {}
        # (expires, scope, key); entries superseded by a later write stay in the
        # heap until they come up and are skipped (their expiry no longer matches).
        self._expiries: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._records)

    async def begin(
        self, scope: str, key: str, fingerprint: bytes, *, now: float, lease: float, ttl: float = DEFAULT_TTL
    ) -> IdempotencyRecord | None:
        self._expire(now)
        rec = self._records.get((scope, key))
        if rec is not None and not claimable(rec, fingerprint, now):
            return rec
        self._put(scope, key, IdempotencyRecord(fingerprint, "pending", now + max(ttl, lease), lease=now + lease))
        return None

    async def finish(
        self, scope: str, key: str, outcome: Outcome, *, now: float, ttl: float, fingerprint: bytes | None = None
    ) -> None:
        self._expire(now)
        rec = self._records.get((scope, key))
        fp = fingerprint if fingerprint is not None else (rec.fingerprint if rec is not None else b"")
        self._put(scope, key, IdempotencyRecord(fp, "done", now + ttl, outcome))

    async def release(self, scope: str, key: str) -> None:
        rec = self._records.get((scope, key))
        if rec is not None and rec.state == "pending":
            # Same expiry: the heap entry pushed by begin still matches it.
            self._records[(scope, key)] = msgspec.structs.replace(rec, state="released")

    def _put(self, scope: str, key: str, rec: IdempotencyRecord) -> None:
        self._records[(scope, key)] = rec
        heapq.heappush(self._expiries, (rec.expires, scope, key))

    def _expire(self, now: float) -> None:
        heap, records = self._expiries, self._records
        while heap and heap[0][0] <= now:
            expires, scope, key = heapq.heappop(heap)
            rec = records.get((scope, key))
            if rec is not None and rec.expires == expires:
                del records[(scope, key)]


class _Cursor:
    __slots__ = ("epoch", "expires", "offset", "queued")

    def __init__(self, epoch: str, offset: int, expires: float) -> None:
        self.epoch = epoch
        self.offset = offset
        self.expires = expires
        # Expiry of this cursor's live entry in the heap; always <= ``expires``.
        self.queued = expires


class MemoryCursorStore:
    """In-process :class:`~rtcore.backends.base.CursorStore`.

    Cursors expire ``ttl`` seconds after their last advance. Every ``advance``
    pops the heap entries that came due (amortized O(log n)). Unlike the
    idempotency store's heap, this one holds **one entry per cursor**, not one
    per write: a cursor is advanced on every ack, so an entry per advance would
    make memory grow with the ack rate. An advance that pushes the expiry later
    leaves the entry where it is; when the entry comes up and the cursor was
    advanced meanwhile, it goes back into the heap at the new expiry (at most
    once per TTL per cursor). So the store holds what was acked within one TTL.
    """

    def __init__(self) -> None:
        self._cursors: dict[tuple[str, str], _Cursor] = {}
        # (expires, principal, stream): one live entry per cursor (its
        # ``queued``); an entry superseded by an earlier expiry is skipped.
        self._expiries: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._cursors)

    async def get(self, principal: str, stream: str, *, now: float) -> tuple[str, int] | None:
        cur = self._cursors.get((principal, stream))
        if cur is None or cur.expires <= now:
            return None
        return cur.epoch, cur.offset

    async def advance(self, principal: str, stream: str, epoch: str, offset: int, *, now: float, ttl: float) -> None:
        self._expire(now)
        expires = now + ttl
        cur = self._cursors.get((principal, stream))
        if cur is None or cur.expires <= now:
            self._cursors[(principal, stream)] = _Cursor(epoch, offset, expires)
            heapq.heappush(self._expiries, (expires, principal, stream))
            return
        if cur.epoch != epoch or offset > cur.offset:
            cur.epoch, cur.offset = epoch, offset
        cur.expires = expires
        if expires < cur.queued:
            # Earlier than its heap entry (a shorter ttl, or the clock went
            # back): queue it again so it is not kept past its expiry.
            cur.queued = expires
            heapq.heappush(self._expiries, (expires, principal, stream))

    def _expire(self, now: float) -> None:
        heap, cursors = self._expiries, self._cursors
        while heap and heap[0][0] <= now:
            queued, principal, stream = heapq.heappop(heap)
            cur = cursors.get((principal, stream))
            if cur is None or cur.queued != queued:
                continue  # superseded entry
            if cur.expires <= now:
                del cursors[(principal, stream)]
            else:  # advanced since it was queued: requeue at its current expiry
                cur.queued = cur.expires
                heapq.heappush(heap, (cur.expires, principal, stream))


class MemorySnapshotStore:
    """In-process :class:`~rtcore.backends.base.SnapshotStore`."""

    def __init__(self) -> None:
        self._snaps: dict[str, Snapshot] = {}

    async def get(self, stream: str) -> Snapshot | None:
        return self._snaps.get(stream)

    async def put(self, snapshot: Snapshot) -> None:
        cur = self._snaps.get(snapshot.stream)
        if cur is None or cur.epoch != snapshot.epoch or snapshot.offset >= cur.offset:
            self._snaps[snapshot.stream] = snapshot


class MemoryLeaseStore:
    """In-process :class:`~rtcore.backends.base.LeaseStore`."""

    def __init__(self) -> None:
        self._leases: dict[str, tuple[str, float]] = {}

    async def acquire(self, name: str, holder: str, *, now: float, ttl: float) -> bool:
        cur = self._leases.get(name)
        if cur is not None and cur[0] != holder and cur[1] > now:
            return False
        self._leases[name] = (holder, now + ttl)
        return True

    async def release(self, name: str, holder: str) -> None:
        cur = self._leases.get(name)
        if cur is not None and cur[0] == holder:
            del self._leases[name]


class _Group:
    __slots__ = ("last", "pending")

    def __init__(self, last: int) -> None:
        self.last = last  # global seq of the newest event handed to any member
        # global seq -> [consumer, delivered at, deliveries]
        self.pending: dict[int, list[Any]] = {}


class MemoryGroupLog:
    """In-process :class:`~rtcore.backends.base.GroupLog` over :class:`MemoryEventLog`'s global log."""

    def __init__(self, log: MemoryEventLog) -> None:
        self._log = log
        self._groups: dict[str, _Group] = {}

    def _group(self, group: str) -> _Group:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(self._log._seq)
            self._log.keep_global = True
        return g

    async def create(self, group: str) -> None:
        self._group(group)

    async def read(self, group: str, consumer: str, *, now: float, count: int, block: float) -> list[GroupMessage]:
        log = self._log
        with anyio.move_on_after(max(block, 0.0)):
            while True:
                g = self._group(group)
                out: list[GroupMessage] = []
                while g.last < log._seq and len(out) < count:
                    g.last += 1
                    event = log._global(g.last)
                    if event is None:
                        continue  # fell off the capped global log before anyone read it
                    g.pending[g.last] = [consumer, now, 1]
                    out.append(GroupMessage(str(g.last), event, 1))
                if out or block <= 0:
                    return out
                if log._appended is None:
                    log._appended = anyio.Event()
                await log._appended.wait()
        return []

    async def ack(self, group: str, ids: list[str]) -> None:
        g = self._group(group)
        for i in ids:
            g.pending.pop(int(i), None)

    async def claim(self, group: str, consumer: str, *, min_idle: float, now: float, count: int) -> list[GroupMessage]:
        g = self._group(group)
        out: list[GroupMessage] = []
        for seq in sorted(g.pending):
            if len(out) >= count:
                break
            entry = g.pending[seq]
            if entry[1] > now - min_idle:
                continue
            event = self._log._global(seq)
            if event is None:
                del g.pending[seq]  # gone from the global log: nothing left to hand out
                continue
            entry[0], entry[1], entry[2] = consumer, now, entry[2] + 1
            out.append(GroupMessage(str(seq), event, entry[2]))
        return out


class MemoryBackend(Backend):
    """All four stores in memory (``memory://``)."""

    events: MemoryEventLog

    def __init__(self, url: str = "memory://") -> None:
        log = MemoryEventLog()
        super().__init__(
            url,
            events=log,
            idempotency=MemoryIdempotencyStore(),
            cursors=MemoryCursorStore(),
            snapshots=MemorySnapshotStore(),
            leases=MemoryLeaseStore(),
            groups=MemoryGroupLog(log),
        )

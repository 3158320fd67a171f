"""The ``memory://`` backend: everything in this process, nothing survives it.

The default for tests and for trying rtcore. Appends are synchronous under
the hood (no await between reading the head and writing the event), which is
what makes them atomic on one event loop; the live feed is pushed from inside
``append`` so every watcher sees events in offset order.
"""

from __future__ import annotations

import fnmatch
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ..errors import ConflictError
from .base import (
    AppendResult,
    Backend,
    Event,
    IdempotencyRecord,
    Outcome,
    ReadResult,
    Retention,
    Snapshot,
    StreamInfo,
)

__all__ = ["MemoryBackend", "MemoryEventLog", "new_epoch"]


def new_epoch() -> str:
    """A fresh random epoch id (12 hex characters)."""
    return secrets.token_hex(6)


class _Stream:
    __slots__ = ("epoch", "events", "head", "keys")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.head = 0
        self.events: deque[Event] = deque()
        self.keys: dict[str, Event] = {}

    @property
    def first(self) -> int:
        return self.events[0].offset if self.events else self.head + 1

    def drop_oldest(self) -> None:
        old = self.events.popleft()
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
        return AppendResult(event)

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
    """In-process :class:`~rtcore.backends.base.IdempotencyStore`."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], IdempotencyRecord] = {}

    async def begin(
        self, scope: str, key: str, fingerprint: bytes, *, now: float, lease: float
    ) -> IdempotencyRecord | None:
        rec = self._records.get((scope, key))
        if rec is not None and rec.expires > now:
            return rec
        self._records[(scope, key)] = IdempotencyRecord(fingerprint, "pending", now + lease)
        return None

    async def finish(self, scope: str, key: str, outcome: Outcome, *, now: float, ttl: float) -> None:
        rec = self._records.get((scope, key))
        fp = rec.fingerprint if rec is not None else b""
        self._records[(scope, key)] = IdempotencyRecord(fp, "done", now + ttl, outcome)
        if len(self._records) > 4096 and len(self._records) % 1024 == 0:
            self._expire(now)

    async def release(self, scope: str, key: str) -> None:
        rec = self._records.get((scope, key))
        if rec is not None and rec.state == "pending":
            del self._records[(scope, key)]

    def _expire(self, now: float) -> None:
        for k in [k for k, r in self._records.items() if r.expires <= now]:
            del self._records[k]


class MemoryCursorStore:
    """In-process :class:`~rtcore.backends.base.CursorStore`."""

    def __init__(self) -> None:
        self._cursors: dict[tuple[str, str], tuple[str, int]] = {}

    async def get(self, principal: str, stream: str) -> tuple[str, int] | None:
        return self._cursors.get((principal, stream))

    async def advance(self, principal: str, stream: str, epoch: str, offset: int) -> None:
        cur = self._cursors.get((principal, stream))
        if cur is None or cur[0] != epoch or offset > cur[1]:
            self._cursors[(principal, stream)] = (epoch, offset)


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


class MemoryBackend(Backend):
    """All four stores in memory (``memory://``)."""

    events: MemoryEventLog

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(
            url,
            events=MemoryEventLog(),
            idempotency=MemoryIdempotencyStore(),
            cursors=MemoryCursorStore(),
            snapshots=MemorySnapshotStore(),
            leases=MemoryLeaseStore(),
        )

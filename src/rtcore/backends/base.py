"""The storage interfaces every backend implements.

A backend is four small stores plus a live feed, behind Protocols so that the
core never knows which engine it runs on:

* :class:`EventLog`: per-stream append-only logs with dense offsets from 1,
  an epoch, idempotent appends (``key``), optimistic concurrency (``expect``)
  and retention; plus :meth:`EventLog.live`, the node-wide feed of appended
  events that the Hub fans out.
* :class:`IdempotencyStore`: command results by (scope, key), with an atomic
  ``begin`` so two nodes can never both run the same key.
* :class:`CursorStore`: the last acknowledged position per (principal, stream),
  forgotten when not advanced for a TTL.
* :class:`SnapshotStore`: the latest snapshot of each stateful stream.
* :class:`LeaseStore`: renewable leases so exactly one node runs a loop.
* :class:`GroupLog`: consumer groups over the global log of every appended
  event, so each event reaches one member of a group across all nodes, at
  least once, and a dead member's events are claimed by another.
* :class:`SignalBus`: an ephemeral channel between the nodes of a backend
  (bytes in, bytes out at every listening node, never stored), which carries
  direct messages to a principal's live connections.

Every implementation runs the shared contract suite in
``tests/contract/`` unchanged. Time is always passed in (``now``), never read,
so the rules stay testable with a fake clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

from ..errors import RtcoreError
from ..protocol.idempotency import DEFAULT_TTL
from ..protocol.types import (
    AppendResult,
    Event,
    GroupMessage,
    IdempotencyRecord,
    Outcome,
    ReadResult,
    Retention,
    Snapshot,
    StreamInfo,
)

_log = logging.getLogger(__name__)

__all__ = [
    "AppendResult",
    "Backend",
    "CursorStore",
    "Event",
    "EventLog",
    "GroupLog",
    "GroupMessage",
    "IdempotencyRecord",
    "IdempotencyStore",
    "LeaseStore",
    "LiveFeed",
    "LocalSignalBus",
    "Outcome",
    "ReadResult",
    "Retention",
    "SignalBus",
    "SignalFeed",
    "Snapshot",
    "SnapshotStore",
    "StreamInfo",
]


@runtime_checkable
class LiveFeed(Protocol):
    """A node's view of events as they are appended, in offset order per stream.

    The callback given to :meth:`EventLog.live` is called once per event, in
    offset order per stream, for every watched stream (``"*"`` watches all).
    It must not block: the Hub only enqueues.
    """

    def watch(self, stream: str) -> None:
        """Start delivering ``stream`` (idempotent; ``"*"`` means every stream)."""

    def unwatch(self, stream: str) -> None:
        """Stop delivering ``stream``."""

    async def run(self) -> None:
        """Deliver events until cancelled (engines that push synchronously just wait)."""


@runtime_checkable
class EventLog(Protocol):
    """Per-stream ordered logs."""

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
        """Append one event atomically.

        Args:
            stream: Stream name.
            type: Event type.
            data: Payload (msgspec builtins).
            now: Current time (stored as ``ts``, used for age retention).
            key: Idempotency key: if an event with this key is still retained in
                ``stream``, it is returned with ``duplicate=True`` and nothing is
                appended (checked before ``expect``).
            expect: Expected current head; if the head differs, nothing is
                appended and :class:`~rtcore.errors.ConflictError` is raised.
            retention: Trim the stream to this after the append.

        Returns:
            The stored event.

        Raises:
            ConflictError: ``expect`` did not match the head.
            BackendError: the engine failed.
        """
        ...

    async def read(self, stream: str, *, after: int, limit: int) -> ReadResult:
        """Read up to ``limit`` retained events with offset > ``after``, oldest first."""
        ...

    async def info(self, stream: str) -> StreamInfo:
        """Return the stream's epoch, head and first retained offset."""
        ...

    async def trim(self, stream: str, retention: Retention, *, now: float) -> int:
        """Drop events beyond ``retention``; return how many were dropped."""
        ...

    async def streams(self, pattern: str = "*") -> list[str]:
        """Names of the known streams matching a glob ``pattern``."""
        ...

    def live(self, deliver: Callable[[Event], None]) -> LiveFeed:
        """Create this node's live feed; ``deliver`` gets each appended event."""
        ...


@runtime_checkable
class IdempotencyStore(Protocol):
    """Command outcomes by (scope, key); ``begin`` is atomic across nodes."""

    async def begin(
        self, scope: str, key: str, fingerprint: bytes, *, now: float, lease: float, ttl: float = DEFAULT_TTL
    ) -> IdempotencyRecord | None:
        """Claim ``key`` for a new execution, or return the existing record.

        Atomically: when :func:`~rtcore.protocol.idempotency.claimable` says
        the stored record (if any) may be claimed with ``fingerprint``, write a
        pending record (``lease = now + lease``, ``expires = now + ttl``) and
        return ``None``: the caller owns the key. Otherwise return the record
        untouched: the caller decides (see :mod:`rtcore.protocol.idempotency`).
        """
        ...

    async def finish(
        self, scope: str, key: str, outcome: Outcome, *, now: float, ttl: float, fingerprint: bytes | None = None
    ) -> None:
        """Store the final outcome for ``ttl`` seconds.

        ``fingerprint`` is the command's fingerprint; stores must use it when
        given (the pending record may have been garbage-collected after its
        lease ran out while the command was still running).
        """
        ...

    async def release(self, scope: str, key: str) -> None:
        """Mark a pending key ``released`` (the command failed in a retryable way).

        The record keeps its fingerprint and expiry, so only the same command
        with the same arguments may claim the key again; a finished outcome is
        never touched.
        """
        ...


@runtime_checkable
class CursorStore(Protocol):
    """Last acknowledged position per (principal, stream), forgotten after a TTL.

    Every cursor expires ``ttl`` seconds after its last :meth:`advance` (the
    ``ttl`` of that call), so the store holds what was acked within one TTL,
    however many distinct (principal, stream) pairs ever acked. An expired
    cursor is absent: :meth:`get` returns ``None`` and the next
    :meth:`advance` stores its position as a new cursor's.
    """

    async def get(self, principal: str, stream: str, *, now: float) -> tuple[str, int] | None:
        """Return ``(epoch, offset)``, or ``None`` if there is none or it expired at or before ``now``."""
        ...

    async def advance(self, principal: str, stream: str, epoch: str, offset: int, *, now: float, ttl: float) -> None:
        """Move the cursor forward and make it expire at ``now + ttl``.

        A lower offset in the same epoch leaves the position as it is (the
        expiry is still refreshed: the principal is still acking); another
        epoch replaces the position.
        """
        ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Latest snapshot per stream."""

    async def get(self, stream: str) -> Snapshot | None:
        """Return the newest snapshot of ``stream``."""
        ...

    async def put(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` unless a newer one (same epoch, higher offset) exists."""
        ...


@runtime_checkable
class LeaseStore(Protocol):
    """Renewable named leases (one holder at a time)."""

    async def acquire(self, name: str, holder: str, *, now: float, ttl: float) -> bool:
        """Take or renew ``name`` for ``holder``; False if someone else holds it."""
        ...

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up if ``holder`` has it."""
        ...


@runtime_checkable
class GroupLog(Protocol):
    """Consumer groups over one global, ordered log of every appended event.

    Every :meth:`EventLog.append` also lands in the global log. A group has a
    position in it (the last event handed to any member) and a pending list:
    events handed to a member and not acknowledged yet. :meth:`read` hands
    each new event to exactly one member; :meth:`claim` moves pending events
    idle for too long (their member crashed or hangs) to another member.
    Delivery is therefore at least once: handlers dedup on
    ``(event.stream, event.epoch, event.offset)``.

    The global log is bounded (per engine); an event dropped from it before a
    group read it is never delivered to that group.
    """

    async def create(self, group: str) -> None:
        """Create ``group`` if it does not exist, positioned after the newest event.

        Only events appended afterwards are delivered; an existing group keeps
        its position and pending list (this is how a restarted node resumes).
        """
        ...

    async def read(self, group: str, consumer: str, *, now: float, count: int, block: float) -> list[GroupMessage]:
        """Hand up to ``count`` events no member has seen to ``consumer``.

        Args:
            group: The group (created with :meth:`create` if missing).
            consumer: Member id (the node id); the events become its pending ones.
            now: Current time, recorded as the delivery time.
            count: Most events to return.
            block: Wait up to this many seconds when nothing is new (0: do not wait).

        Returns:
            The events in global order (possibly none).
        """
        ...

    async def ack(self, group: str, ids: list[str]) -> None:
        """Mark deliveries as done: they are never handed out again."""
        ...

    async def claim(self, group: str, consumer: str, *, min_idle: float, now: float, count: int) -> list[GroupMessage]:
        """Take over up to ``count`` pending events delivered ``min_idle`` seconds ago or earlier.

        Whoever held them (including ``consumer`` itself, e.g. after a restart
        with the same id) loses them; ``deliveries`` grows by one.
        """
        ...


@runtime_checkable
class SignalFeed(Protocol):
    """One node's subscription to a :class:`SignalBus` (see :meth:`SignalBus.listen`)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver messages until cancelled.

        ``task_status.started()`` is called once the feed receives messages,
        so a node started with ``TaskGroup.start`` misses nothing published
        after its start returned.
        """


@runtime_checkable
class SignalBus(Protocol):
    """An ephemeral channel shared by every node on the backend.

    A message published by any node reaches the callback of every feed that
    is running at that moment, on every node (the publisher's own included),
    at most once, in no promised order, and is never stored: a node that is
    not listening, or whose connection to the engine is down, misses it. The
    engine uses it for direct messages to principals (``node.send_to``); the
    nodes filter what they receive themselves.
    """

    async def publish(self, message: bytes) -> None:
        """Send ``message`` to every running feed.

        Raises:
            BackendError: the engine cannot be reached (nothing was sent).
        """
        ...

    def listen(self, deliver: Callable[[bytes], None]) -> SignalFeed:
        """A feed that calls ``deliver`` (which must not block) with each message while it runs."""
        ...


class _LocalFeed:
    def __init__(self, bus: LocalSignalBus, deliver: Callable[[bytes], None]) -> None:
        self._bus = bus
        self._deliver = deliver

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._bus._feeds.append(self._deliver)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._bus._feeds.remove(self._deliver)


class LocalSignalBus:
    """A :class:`SignalBus` inside one process: every node that shares the backend object.

    ``memory://`` (nodes sharing one :class:`~rtcore.backends.MemoryBackend`
    are one cluster) and ``sqlite://`` (see its module docstring: processes
    sharing a file do not share this bus) use it. Publishing calls each
    feed's callback synchronously.
    """

    def __init__(self) -> None:
        self._feeds: list[Callable[[bytes], None]] = []

    async def publish(self, message: bytes) -> None:
        """Hand ``message`` to every running feed of this process."""
        for deliver in list(self._feeds):
            deliver(message)

    def listen(self, deliver: Callable[[bytes], None]) -> SignalFeed:
        """A feed of this bus (registered while its :meth:`~SignalFeed.run` runs)."""
        return _LocalFeed(self, deliver)


class Backend:
    """A bundle of the stores one engine provides.

    Attributes:
        url: The URL the backend was opened from.
        events: The event log.
        idempotency: The idempotency store.
        cursors: The cursor store.
        snapshots: The snapshot store.
        leases: The lease store.
        groups: Consumer groups over the global event log (``None`` for an
            engine without them; group processors then refuse to start).
        signals: The ephemeral channel between nodes (a process-local
            :class:`LocalSignalBus` unless the engine brings one).
    """

    def __init__(
        self,
        url: str,
        *,
        events: EventLog,
        idempotency: IdempotencyStore,
        cursors: CursorStore,
        snapshots: SnapshotStore,
        leases: LeaseStore,
        groups: GroupLog | None = None,
        signals: SignalBus | None = None,
    ) -> None:
        self.url = url
        self.events = events
        self.idempotency = idempotency
        self.cursors = cursors
        self.snapshots = snapshots
        self.leases = leases
        self.groups = groups
        self.signals: SignalBus = signals if signals is not None else LocalSignalBus()

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
        """Claim a command's idempotency key and append its first event, as one operation.

        The keyed command path (:func:`rtcore.engine.dispatch.dispatch`) calls
        this instead of :meth:`IdempotencyStore.begin` followed by
        :meth:`EventLog.append` when a handler provably does nothing before
        its first publish: one backend operation (one group commit, one
        script) instead of two. Engines override it to do both atomically;
        this generic version composes the two stores' methods, so every
        backend (memory, custom ones) keeps working.

        The claim follows :meth:`IdempotencyStore.begin` exactly; the event
        is appended (as :meth:`EventLog.append` with ``key=event_key``) only
        when the claim succeeded. A failed append (``expect`` mismatch,
        engine error) does not undo a claim that was made; the caller
        releases or finishes it as for any command.

        With ``outcome_ttl`` the command's outcome is known to be the event's
        offset (its handler returns ``event.offset`` and does nothing else):
        once the event is appended (or found, a duplicate) the key is also
        finished, as :meth:`IdempotencyStore.finish` with
        ``Outcome(True, event.offset)`` for ``outcome_ttl`` seconds, in the
        same operation. Claim, event and outcome: one operation per command.

        Returns:
            ``(record, None)`` when the key was not claimable (nothing was
            appended), else ``(None, result)``.

        Raises:
            ConflictError: claimed, but ``expect`` did not match the head.
            BackendError: the engine failed (the claim may or may not exist).
        """
        existing = await self.idempotency.begin(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
        if existing is not None:
            return existing, None
        result = await self.events.append(
            stream, type, data, now=now, key=event_key, expect=expect, retention=retention
        )
        if outcome_ttl is not None:
            outcome = Outcome(True, result.event.offset)
            try:
                await self.idempotency.finish(scope, key, outcome, now=now, ttl=outcome_ttl, fingerprint=fingerprint)
            except RtcoreError:
                # As dispatch does when storing an outcome fails: the event is
                # appended, so the command's answer stands; the claim lapses
                # after its lease and a retry's publish finds the event by its key.
                _log.exception("could not store the outcome of key %r", key)
        return None, result

    async def aclose(self) -> None:
        """Release connections and files (the memory backend has none)."""

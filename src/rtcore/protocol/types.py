"""Value types shared by the core, the engine and every backend.

Plain immutable msgspec structs, no behaviour and no I/O: events and their
positions, the shape of a stream, stored command outcomes, idempotency
records, snapshots and group deliveries. They live here, at the bottom of the
layers, so that the sans-IO protocol modules can use them without importing
the storage layer (whose package pulls in anyio and the memory engine).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "AppendResult",
    "Event",
    "GroupMessage",
    "IdempotencyRecord",
    "Outcome",
    "ReadResult",
    "Retention",
    "Snapshot",
    "StreamInfo",
]


class Event(msgspec.Struct, frozen=True):
    """One stored event.

    Attributes:
        stream: Stream name (``kind:id``).
        epoch: The stream's epoch when the event was appended.
        offset: Dense position in the stream, from 1.
        type: Application event type.
        data: Payload as msgspec builtins (dicts, lists, str, int, ...).
        ts: Append time, Unix seconds.
        key: The idempotency key of the append, if any.
    """

    stream: str
    epoch: str
    offset: int
    type: str
    data: Any
    ts: float
    key: str | None = None


class AppendResult(msgspec.Struct, frozen=True):
    """What :meth:`EventLog.append` returns: the event and whether it existed already."""

    event: Event
    duplicate: bool = False


class StreamInfo(msgspec.Struct, frozen=True):
    """The shape of a stream right now.

    Attributes:
        epoch: Current epoch (a stream that never existed gets one on first touch).
        head: Offset of the last event (0 if none was ever appended).
        first: Offset of the oldest retained event (``head + 1`` when none is retained).
    """

    epoch: str
    head: int
    first: int


class ReadResult(msgspec.Struct, frozen=True):
    """A page of history plus the stream's shape at the time of the read."""

    epoch: str
    head: int
    first: int
    events: list[Event]


class Retention(msgspec.Struct, frozen=True):
    """How much history a stream keeps: ``max_events`` and/or ``max_age`` seconds."""

    max_events: int | None = None
    max_age: float | None = None


class Outcome(msgspec.Struct, frozen=True):
    """The stored answer to a command: ``ok`` with ``result``, or an error."""

    ok: bool
    result: Any = None
    code: str | None = None
    message: str | None = None
    http_status: int | None = None  # so a replayed error keeps the status of the first answer


class IdempotencyRecord(msgspec.Struct, frozen=True):
    """One idempotency entry.

    ``state`` is ``"pending"`` while the command runs (its claim lapses at
    ``lease``, so a crashed node does not block the key forever),
    ``"released"`` after a retryable failure, and ``"done"`` once ``outcome``
    is stored. ``expires`` is when the record is forgotten (claim, release or
    finish time plus the TTL): until then the key stays bound to
    ``fingerprint``, whatever its state (see
    :func:`rtcore.protocol.idempotency.claimable`).
    """

    fingerprint: bytes
    state: Literal["pending", "released", "done"]
    expires: float
    outcome: Outcome | None = None
    #: When a pending claim lapses (0: a record written before claims had their
    #: own lease, whose ``expires`` was the lease).
    lease: float = 0.0


class Snapshot(msgspec.Struct, frozen=True):
    """Folded state of a stateful stream after ``offset`` (state in canonical msgpack)."""

    stream: str
    epoch: str
    offset: int
    state: bytes
    checksum: str


class GroupMessage(msgspec.Struct, frozen=True):
    """One event delivered to one member of a consumer group.

    Attributes:
        id: Delivery id to pass to :meth:`GroupLog.ack` (opaque; the position in
            the global log).
        event: The event.
        deliveries: How many times the group has handed this event out (1 the
            first time; more after a member died or timed out holding it).
    """

    id: str
    event: Event
    deliveries: int = 1

"""Stateful streams (sans-IO): folding events into state, snapshots, checksums.

``app.state("room:*", RoomState)`` declares that every stream matching the
pattern has a state that is the fold of its events: ``RoomState()`` is the
state before the first event and ``state.apply(event)`` advances it (it may
mutate in place and return ``None``, or return the new state).

The checksum is the blake2b-128 hex digest of the state's *canonical*
MessagePack encoding: the state is converted to msgspec builtins and encoded
with every map's keys sorted. A client in any language that folds the same
events and encodes the same way gets the same checksum, which is what ``sync``
frames let it verify.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, TypeVar

import msgspec

from .codec import canonical
from .types import Event, Snapshot

__all__ = ["StateSpec", "StreamState", "checksum", "digest", "encode_state", "state_builtins"]


class Foldable(Protocol):
    """What a state type must provide."""

    def apply(self, event: Event) -> Any:
        """Fold one event into the state (mutate and return None, or return the new state)."""


S = TypeVar("S")


def state_builtins(state: Any) -> Any:
    """A state as msgspec builtins, in canonical form.

    Map keys become strings (as every JSON client sees them, and as sorted
    MessagePack requires) and sets become sorted lists, so the result does
    not depend on hash order (which differs between processes).
    """
    return msgspec.to_builtins(state, str_keys=True, order="sorted")


def encode_state(state: Any) -> bytes:
    """Canonical bytes of a state (sorted-keys MessagePack of its builtins).

    A state type whose class sets ``builtins_only = True`` promises that its
    fields hold nothing but msgspec builtins with ``str`` map keys (no sets,
    no other keys, no structs): what :func:`state_builtins` would give back is
    then the same values, so the state is encoded as it is, keys sorted, with
    the same bytes and without building the builtins copy first (the rooms'
    documents, whose contents come from patches, are such states; the copy
    was most of a sync's cost).
    """
    if getattr(type(state), "builtins_only", False):
        return canonical(state)
    return canonical(state_builtins(state))


def digest(data: bytes) -> str:
    """blake2b-128 hex digest of canonical state bytes (a checksum, given :func:`encode_state`'s bytes)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def checksum(state: Any) -> str:
    """blake2b-128 hex digest of :func:`encode_state`."""
    return digest(encode_state(state))


class StateSpec(msgspec.Struct, frozen=True):
    """A stateful-stream declaration (made by ``app.state``).

    Attributes:
        pattern: Glob of stream names.
        type: The state class; ``type()`` must build the initial state.
        snapshot_every: Store a snapshot every N events.
        sync_every: Send a ``sync`` frame every N events (0 disables).
    """

    pattern: str
    type: Any
    snapshot_every: int = 100
    sync_every: int = 10


class StreamState:
    """The folded state of one stream at one offset."""

    __slots__ = ("epoch", "offset", "spec", "state")

    def __init__(self, spec: StateSpec, epoch: str, offset: int = 0, state: Any = None) -> None:
        self.spec = spec
        self.epoch = epoch
        self.offset = offset
        self.state = spec.type() if state is None else state

    @classmethod
    def from_snapshot(cls, spec: StateSpec, snap: Snapshot) -> StreamState:
        """Rebuild from a stored snapshot."""
        # Not strict: map keys were stored as strings (see state_builtins).
        return cls(spec, snap.epoch, snap.offset, msgspec.msgpack.decode(snap.state, type=spec.type, strict=False))

    def apply(self, event: Event) -> None:
        """Fold ``event`` (which must be the next offset of this epoch).

        Raises:
            ValueError: the event is not the next one (a caller bug: the
                :class:`~rtcore.protocol.streams.Delivery` in front guarantees order).
        """
        if event.epoch != self.epoch or event.offset != self.offset + 1:
            raise ValueError(f"state of {event.stream} at {self.epoch}:{self.offset} cannot fold {event.epoch}:{event.offset}")
        new = self.state.apply(event)
        if new is not None:
            self.state = new
        self.offset = event.offset

    @property
    def snapshot_due(self) -> bool:
        """Whether the current offset is a snapshot point."""
        return self.offset > 0 and self.offset % self.spec.snapshot_every == 0

    @property
    def sync_due(self) -> bool:
        """Whether the current offset is a sync point."""
        n = self.spec.sync_every
        return n > 0 and self.offset > 0 and self.offset % n == 0

    def checksum(self) -> str:
        """Checksum of the current state."""
        return checksum(self.state)

    def encoded(self) -> bytes:
        """The current state's canonical bytes (:func:`encode_state`): what a snapshot stores and a checksum hashes."""
        return encode_state(self.state)

    def builtins(self) -> Any:
        """The state as msgspec builtins (for a ``snap`` frame)."""
        return state_builtins(self.state)

    def snapshot(self, stream: str, data: bytes | None = None) -> Snapshot:
        """A storable snapshot of the current state.

        Args:
            stream: The stream's name.
            data: :meth:`encoded` at this offset, if the caller already has it
                (a snapshot point that is also a sync point encodes once).
        """
        if data is None:
            data = self.encoded()
        return Snapshot(stream, self.epoch, self.offset, data, digest(data))

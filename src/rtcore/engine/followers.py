"""Followers: the server-side fold of every stateful stream on one node.

A stream declared with ``app.state(pattern, Type)`` has one :class:`Follower`
per node: it loads the latest snapshot, replays the history after it through
an ordinary hub :class:`~rtcore.engine.hub.Tail`, then folds live events as
they are dispatched. It stores a snapshot every ``snapshot_every`` events and
parks a ``sync`` checksum frame until the event it covers has reached the
subscribers. The fold rules are sans-IO (:mod:`rtcore.protocol.state`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from ..backends.base import Backend
from ..errors import RtcoreError
from ..protocol.backoff import backoff_delay
from ..protocol.codec import codec_for
from ..protocol.frames import Sync
from ..protocol.state import StreamState, digest
from ..protocol.streams import Delivery, Phase
from ..protocol.types import Event, Snapshot
from .app import App
from .hub import EncodedEvent, Hub, Tail

__all__ = ["Follower", "Followers"]

log = logging.getLogger("rtcore.engine.followers")


class Follower:
    """Server-side fold of one stateful stream (the :class:`EventSink` of its tail)."""

    __slots__ = ("on_stale", "owner", "pending_sync", "ready", "state", "stream", "tail")

    def __init__(self, stream: str, state: StreamState, *, loaded: bool = False) -> None:
        self.stream = stream
        self.state = state
        # Set once the state is current; ``None`` then (a node follows every
        # room's stream: an Event kept per stream for its lifetime was ~1 kB each).
        self.ready: anyio.Event | None = None if loaded else anyio.Event()
        self.tail: Tail | None = None
        self.pending_sync: tuple[int, dict[str, bytes]] | None = None
        self.owner: Followers | None = None
        self.on_stale: Callable[[], None] = lambda: None

    def fold_batch(self, batch: list[EncodedEvent]) -> None:
        assert self.owner is not None
        for enc in batch:
            self.owner.fold(self, enc.event)

    # EventSink: history and live events are folded alike, at once.
    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        assert self.owner is not None
        self.owner.spawn(fn)

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.fold_batch(batch)

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.fold_batch(batch)

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        pass  # the follower is where sync frames come from

    def stale(self, stream: str) -> None:
        self.on_stale()


class Followers:
    """The followers of one node.

    Args:
        app: The application (its ``app.state`` declarations).
        backend: Where snapshots and history are read and stored.
        hub: The node's hub (followers are tails like subscribers).
        spawn: Runs a coroutine function in the node's task group.
    """

    def __init__(
        self, app: App, backend: Backend, hub: Hub, spawn: Callable[[Callable[[], Coroutine[Any, Any, Any]]], None]
    ) -> None:
        self._app = app
        self._backend = backend
        self._hub = hub
        self.spawn = spawn
        self._by_stream: dict[str, Follower] = {}

    async def get(self, stream: str) -> Follower:
        """The follower of ``stream``, once it holds the current state."""
        f = self._by_stream.get(stream)
        if f is None:
            f = self.start(stream)
        if f.ready is not None:
            await f.ready.wait()
        return f

    def start(self, stream: str) -> Follower:
        """Start following ``stream`` (loading its snapshot and history in a task)."""
        spec = self._app.state_for(stream)
        assert spec is not None
        f = Follower(stream, StreamState(spec, ""))
        self._by_stream[stream] = f
        self.spawn(lambda: self._load(f))
        return f

    async def _load(self, f: Follower) -> None:
        spec = f.state.spec
        for attempt in range(1_000_000):
            try:
                snap = await self._backend.snapshots.get(f.stream)
                info = await self._backend.events.info(f.stream)
                break
            except RtcoreError:
                # Backend outage: keep the node alive and try again.
                log.warning("loading the state of %s failed (attempt %d)", f.stream, attempt + 1, exc_info=True)
                await anyio.sleep(backoff_delay(attempt, 0.1, 5.0, jitter=0.0))
        if snap is not None and snap.epoch == info.epoch and info.first - 1 <= snap.offset <= info.head:
            f.state = StreamState.from_snapshot(spec, snap)
        else:
            if info.first > 1:
                log.warning("state of %s: history before %d is gone and no snapshot covers it; folding from there", f.stream, info.first)
            f.state = StreamState(spec, info.epoch, info.first - 1)

        def stale() -> None:
            # History was lost (new epoch): the next offset-1 event starts a new follower.
            if self._by_stream.get(f.stream) is f:
                del self._by_stream[f.stream]
            if f.tail is not None:
                self._hub.remove(f.tail)

        f.owner = self
        f.on_stale = stale
        f.tail = Tail(self._backend.events, f.stream, Delivery(f.state.epoch, f.state.offset), f)
        self._hub.add(f.tail)
        await f.tail.fill()
        ready, f.ready = f.ready, None
        assert ready is not None
        ready.set()  # the waiters hold it; the follower needs it no more

    async def _store_snapshot(self, snapshot: Snapshot) -> None:
        # A snapshot is an optimisation: losing one to a backend outage must
        # not take the node down; the next one (snapshot_every later) is tried.
        try:
            await self._backend.snapshots.put(snapshot)
        except RtcoreError:
            log.warning("could not store the snapshot of %s at %d", snapshot.stream, snapshot.offset, exc_info=True)

    def fresh(self, stream: str, state: StreamState) -> None:
        """Follow a history that starts now (its offset 1 is being dispatched)."""
        old = self._by_stream.get(stream)
        if old is not None and old.tail is not None:
            self._hub.remove(old.tail)
        f = Follower(stream, state, loaded=True)
        self._by_stream[stream] = f
        f.tail = Tail(self._backend.events, stream, Delivery(state.epoch, state.offset), f)
        f.tail.delivery.phase = Phase.LIVE
        f.owner = self
        self._hub.add(f.tail)

    def fold(self, f: Follower, event: Event) -> None:
        """Fold one event; schedule a snapshot and park a ``sync`` when due."""
        st = f.state
        st.apply(event)
        snapshot_due, sync_due = st.snapshot_due, st.sync_due
        if not (snapshot_due or sync_due):
            return
        # One encoding of the whole state serves both (every snapshot point is
        # a sync point with the defaults): encoding it twice was the costliest
        # part of those events' fold, on the path that fans the event out.
        data = st.encoded()
        if snapshot_due:
            snapshot = st.snapshot(f.stream, data)
            self.spawn(lambda: self._store_snapshot(snapshot))
        if sync_due:
            frame = Sync(f.stream, st.offset, digest(data), st.epoch)
            frames = {"json": codec_for("json").encode(frame), "msgpack": codec_for("msgpack").encode(frame)}
            # Subscribers must get evt k before sync k, and the hub calls the tails
            # after this fold: park the sync until _after_event.
            f.pending_sync = (st.offset, frames)

    def on_event(self, event: Event) -> None:
        """Before the tails: start following a stateful stream, or a new history of it."""
        f = self._by_stream.get(event.stream)
        if f is not None:
            # Followed already (most events): its spec is at hand, no pattern lookup.
            if event.offset == 1 and f.state.epoch != event.epoch:
                self.fresh(event.stream, StreamState(f.state.spec, event.epoch, 0))
            return
        spec = self._app.state_for(event.stream)
        if spec is None:
            return
        if event.offset == 1:
            # A new history starts: fold it from here, synchronously, so no
            # event can be trimmed before the follower saw it.
            self.fresh(event.stream, StreamState(spec, event.epoch, 0))
        else:
            self.start(event.stream)

    def after_event(self, event: Event) -> None:
        """After the tails: send a parked ``sync`` (subscribers get evt k before sync k)."""
        f = self._by_stream.get(event.stream)
        if f is not None and f.pending_sync is not None and f.pending_sync[0] == event.offset:
            offset, frames = f.pending_sync
            f.pending_sync = None
            self._hub.broadcast_sync(event.stream, offset, frames)

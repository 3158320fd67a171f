"""Followers: the server-side fold of every stateful stream on one node.

A stream declared with ``app.state(pattern, Type)`` has one :class:`Follower`
per node: it loads the latest snapshot, replays the history after it through
an ordinary hub :class:`~rtcore.engine.hub.Tail`, then folds live events as
they are dispatched. It stores a snapshot every ``snapshot_every`` events and
sends a ``sync`` checksum frame every ``sync_every`` events, once the event it
covers has reached the subscribers. The fold rules are sans-IO
(:mod:`rtcore.protocol.state`).

Such a point's work (encoding the whole state, hashing it, the snapshot and
the ``sync`` frames to every subscriber) is not done in the fold, on the
dispatch path of the event (a room's tick step), but in a callback queued on
the event loop when the event is dispatched: it runs after the dispatch, and
on asyncio normally ahead of the subscribers' socket writes that dispatch
queued, so the ``sync`` leaves in the same write as its event. The state it
encodes is the state at the point's offset: the fold of the next event (and
its dispatch to subscribers) settles a pending point first, synchronously,
so a checksum never covers a later state and subscribers still get evt k,
sync k, evt k+1 in that order.
"""

from __future__ import annotations

import asyncio
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

    __slots__ = ("error", "moved", "on_stale", "owner", "point", "ready", "state", "stream", "tail")

    def __init__(self, stream: str, state: StreamState, *, loaded: bool = False) -> None:
        self.stream = stream
        self.state = state
        # Set once the state is current; ``None`` then (a node follows every
        # room's stream: an Event kept per stream for its lifetime was ~1 kB each).
        self.ready: anyio.Event | None = None if loaded else anyio.Event()
        self.tail: Tail | None = None
        #: A snapshot/sync point folded and not yet settled: (offset, snapshot due, sync due).
        self.point: tuple[int, bool, bool] | None = None
        self.owner: Followers | None = None
        self.on_stale: Callable[[], None] = lambda: None
        #: Why the fold stopped for good (an event or snapshot it cannot fold), or None.
        self.error: Exception | None = None
        #: Set when the fold moves, fails or is replaced, for :meth:`Followers.at_least` (made only while one waits).
        self.moved: anyio.Event | None = None

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
        # Points whose settling is queued on the loop: (follower, offset), one callback for all.
        self._due: list[tuple[Follower, int]] = []

    async def get(self, stream: str) -> Follower:
        """The follower of ``stream``, once it holds the current state.

        Waits while the state is loaded (backend reads are retried, see
        :meth:`_load`). A follower whose history changed while it loaded (a
        new epoch: it went stale and was dropped) is not returned: the
        stream's current follower is waited for instead.
        """
        while True:
            f = self._by_stream.get(stream)
            if f is None:
                f = self.start(stream)
            if f.ready is not None:
                await f.ready.wait()
            if self._by_stream.get(stream) is f:
                return f

    async def at_least(self, stream: str, offset: int, epoch: str | None = None) -> Follower:
        """The follower of ``stream`` once its state covers ``offset`` (of ``epoch``, if given).

        Waits for the fold itself (woken by each event it folds, no polling),
        and looks the stream's follower up again after each wake-up: a new
        history (a new epoch) replaces the follower and its state object.
        Unbounded: bound it with a cancel scope (``anyio.fail_after``).

        Raises:
            RtcoreError: ``internal``: the fold failed for good (see :meth:`fold`).
        """
        while True:
            f = await self.get(stream)
            if f.error is not None:
                raise RtcoreError(f"the state of {stream} cannot be folded: {f.error!r}")
            st = f.state
            if st.offset >= offset and (epoch is None or st.epoch == epoch):
                return f
            if f.moved is None:
                f.moved = anyio.Event()
            await f.moved.wait()

    @staticmethod
    def _wake(f: Follower) -> None:
        """Wake the :meth:`at_least` callers waiting on ``f`` (its fold moved, failed or was replaced)."""
        moved, f.moved = f.moved, None
        if moved is not None:
            moved.set()

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
        attempt = 0
        while True:
            try:
                snap = await self._backend.snapshots.get(f.stream)
                info = await self._backend.events.info(f.stream)
                break
            except RtcoreError:
                # Backend outage: keep the node alive and try again.
                attempt += 1
                log.warning("loading the state of %s failed (attempt %d)", f.stream, attempt, exc_info=attempt == 1)
                await anyio.sleep(backoff_delay(attempt - 1, 0.1, 5.0))
        if snap is not None and snap.epoch == info.epoch and info.first - 1 <= snap.offset <= info.head:
            try:
                f.state = StreamState.from_snapshot(spec, snap)
            except Exception as exc:
                # Not the node's task group's problem (it would stop every
                # stream of the node): this stream's fold stops here.
                f.state = StreamState(spec, snap.epoch, snap.offset)
                self._failed(f, exc, f"its snapshot at {snap.offset}")
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
            self._wake(f)  # its waiters wait for the stream's next follower

        f.owner = self
        f.on_stale = stale
        f.tail = Tail(self._backend.events, f.stream, Delivery(f.state.epoch, f.state.offset), f)
        self._hub.add(f.tail)
        # Failed history reads are retried inside fill (Tail.fill), so this
        # returns once the state is current, or once the history changed under
        # it (stale: get() then waits for the stream's next follower).
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

    def fresh(self, stream: str, state: StreamState) -> Follower:
        """Follow a history that starts now (its offset 1 is being dispatched)."""
        old = self._by_stream.get(stream)
        if old is not None:
            if old.tail is not None:
                self._hub.remove(old.tail)
            self._wake(old)  # its waiters wait for this one
        f = Follower(stream, state, loaded=True)
        self._by_stream[stream] = f
        f.tail = Tail(self._backend.events, stream, Delivery(state.epoch, state.offset), f)
        f.tail.delivery.phase = Phase.LIVE
        f.owner = self
        self._hub.add(f.tail)
        return f

    def fold(self, f: Follower, event: Event) -> None:
        """Fold one event; note a snapshot/sync point (settled by :meth:`_settle`)."""
        if f.point is not None:
            # The state is still at the pending point's offset: settle it before
            # it moves on. Only a batch of history folds two events without
            # on_event in between (which settles live points): no sync, as before.
            self._settle(f, f.point[0], send=False)
        if f.error is not None:
            return  # it stopped at the event it could not fold (logged then)
        st = f.state
        try:
            st.apply(event)
        except Exception as exc:
            # Folded inside the node's tasks (the history read of _load, the
            # live dispatch): raising would stop the node, or log every later
            # event. This stream's fold stops at the last state it could fold.
            self._failed(f, exc, f"event {event.offset}")
            return
        if f.moved is not None:
            self._wake(f)
        snapshot_due, sync_due = st.snapshot_due, st.sync_due
        if snapshot_due or sync_due:
            f.point = (st.offset, snapshot_due, sync_due)

    def _failed(self, f: Follower, exc: Exception, what: str) -> None:
        """Stop ``f``'s fold for good: log it once, and tell its :meth:`at_least` callers."""
        f.error = exc
        log.error("state of %s cannot fold %s (%r): its fold stops at %d", f.stream, what, exc, f.state.offset, exc_info=exc)
        self._wake(f)

    def _settle(self, f: Follower, offset: int, *, send: bool = True) -> None:
        """Store the snapshot and send the ``sync`` of ``f``'s pending point if it is at ``offset``.

        The state is at the point's offset: every fold settles a pending point
        first. ``send=False`` (a point folded from history, not dispatched
        live) stores its snapshot but sends no ``sync``.
        """
        point = f.point
        if point is None or point[0] != offset:
            return  # settled already (by a later fold), or not folded (the follower lags)
        f.point = None
        _, snapshot_due, sync_due = point
        sync_due = sync_due and send
        if not (snapshot_due or sync_due):
            return
        st = f.state
        # One encoding of the whole state serves both (every snapshot point is
        # a sync point with the defaults).
        try:
            data = st.encoded()
        except Exception:
            # Settled on the dispatch path of the stream's next event at times:
            # a state that cannot be encoded must not stop its fold or the processors.
            log.exception("state of %s at %d cannot be encoded: no snapshot or sync there", f.stream, offset)
            return
        if snapshot_due:
            snapshot = st.snapshot(f.stream, data)
            self.spawn(lambda: self._store_snapshot(snapshot))
        if sync_due:
            frame = Sync(f.stream, offset, digest(data), st.epoch)
            frames = {"json": codec_for("json").encode(frame), "msgpack": codec_for("msgpack").encode(frame)}
            # Only to the tails that delivered evt k and nothing after it.
            self._hub.broadcast_sync(f.stream, offset, frames)

    def _defer(self, f: Follower, offset: int) -> None:
        # One loop callback settles every point queued in this loop iteration.
        self._due.append((f, offset))
        if len(self._due) > 1:
            return
        try:
            call_soon = asyncio.get_running_loop().call_soon
        except RuntimeError:  # not asyncio (trio): a task, after the dispatching one yields

            async def settle() -> None:
                self._settle_due()

            self.spawn(settle)
        else:
            # Queued before the tails push the event: on asyncio the outboxes'
            # flush (queued by the first push) runs after it, so evt k and
            # sync k leave in one write.
            call_soon(self._settle_due)

    def _settle_due(self) -> None:
        due, self._due = self._due, []
        for f, offset in due:
            self._settle(f, offset)

    def on_event(self, event: Event) -> None:
        """Before the tails: settle a pending point, start following a stateful stream, or a new history of it.

        When ``event`` will be a snapshot/sync point, queue the loop callback
        that settles it (see the module's docstring).
        """
        f = self._by_stream.get(event.stream)
        if f is not None:
            # Followed already (most events): its spec is at hand, no pattern lookup.
            point = f.point
            if point is not None:
                # Sync k goes before evt k+1 reaches any subscriber, computed on the state at k.
                self._settle(f, point[0])
            spec = f.state.spec
            if event.offset == 1 and f.state.epoch != event.epoch:
                f = self.fresh(event.stream, StreamState(spec, event.epoch, 0))
        else:
            found = self._app.state_for(event.stream)
            if found is None:
                return
            spec = found
            if event.offset == 1:
                # A new history starts: fold it from here, synchronously, so no
                # event can be trimmed before the follower saw it.
                f = self.fresh(event.stream, StreamState(spec, event.epoch, 0))
            else:
                f = self.start(event.stream)
        offset = event.offset
        if (spec.sync_every > 0 and offset % spec.sync_every == 0) or offset % spec.snapshot_every == 0:
            self._defer(f, offset)

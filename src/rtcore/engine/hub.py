"""Per-node fan-out: one live feed in, every local subscriber out.

The backend's live feed calls :meth:`Hub.dispatch` once per appended event,
in offset order per stream. Dispatch never awaits: it folds stateful streams,
then hands the event to each local :class:`Tail`, whose
:class:`~rtcore.protocol.streams.Delivery` decides (synchronously) whether to emit it,
drop it as a duplicate, or buffer it while history is being read. The event's
wire frame is encoded at most once per encoding (:class:`EncodedEvent`) and
the same bytes are queued for every subscriber, which is where fan-out speed
comes from.

A tail that finds a gap schedules a fill (an async history read) through the
``spawn`` function of whoever owns it — the connection for subscribers, the
node for state followers — so every task has an owner.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio

from ..backends.base import Event, EventLog, LiveFeed
from ..errors import RtcoreError
from ..protocol.codec import codec_for
from ..protocol.frames import Evt
from ..protocol.streams import Delivery, Phase

__all__ = ["EncodedEvent", "Hub", "Tail", "evt_frame"]

log = logging.getLogger("rtcore.engine.hub")

PAGE = 500


def evt_frame(event: Event) -> Evt:
    """The ``evt`` frame of a stored event."""
    return Evt(event.stream, event.epoch, event.offset, event.type, event.data, event.ts)


class EncodedEvent:
    """An event plus its wire bytes, encoded lazily once per encoding."""

    __slots__ = ("_json", "_msgpack", "event")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    def encoded(self, encoding: str) -> bytes:
        """Wire bytes of the ``evt`` frame in ``encoding`` (cached)."""
        if encoding == "json":
            if self._json is None:
                self._json = codec_for("json").encode(evt_frame(self.event))
            return self._json
        if self._msgpack is None:
            self._msgpack = codec_for("msgpack").encode(evt_frame(self.event))
        return self._msgpack


class Tail:
    """A consumer of one stream fed by the hub and, when needed, by history reads.

    Args:
        log: The event log to fill gaps from.
        stream: The stream.
        delivery: Its ordering state (starts in catch-up).
        emit: Called with each batch of in-order events (and their encodings).
        on_stale: Called once if the stream's epoch changes under the tail.
        spawn: Runs a coroutine function in the owner's task group.
        backlog: Used instead of ``emit`` for history pages, and awaited after
            each page so catch-up goes at the consumer's pace (a replay is a
            burst by nature and must not count against the slow-consumer limit).
    """

    def __init__(
        self,
        log: EventLog,
        stream: str,
        delivery: Delivery,
        emit: Callable[[list[EncodedEvent]], None],
        on_stale: Callable[[], None],
        spawn: Callable[[Callable[[], Coroutine[Any, Any, Any]]], None],
        backlog: Callable[[list[EncodedEvent]], Awaitable[None]] | None = None,
    ) -> None:
        self.log = log
        self._backlog = backlog
        self.stream = stream
        self.delivery = delivery
        self._emit = emit
        self._on_stale = on_stale
        self._spawn = spawn
        self._filling = False
        self.closed = False
        self.on_sync: Callable[[int, bytes, bytes], None] | None = None

    def live(self, enc: EncodedEvent) -> None:
        """Take one live event from the hub (never awaits)."""
        if self.closed:
            return
        out = self.delivery.live(enc.event)
        if out:
            self._emit([enc])
        self._check()

    def _check(self) -> None:
        d = self.delivery
        if d.phase is Phase.STALE:
            self.closed = True
            self._on_stale()
        elif d.needs_fill and not self._filling:
            self._filling = True
            self._spawn(self.fill)

    async def _send_backlog(self, batch: list[EncodedEvent]) -> None:
        if self._backlog is None:
            self._emit(batch)
        else:
            await self._backlog(batch)

    async def fill(self) -> None:
        """Read history after ``delivery.last`` until caught up, then go live."""
        self._filling = True
        try:
            stalled = 0
            while not self.closed and self.delivery.needs_fill:
                before = self.delivery.last
                try:
                    page = await self.log.read(self.stream, after=before, limit=PAGE)
                except RtcoreError:
                    # Backend outage: the owner's task must survive it; read again soon.
                    log.warning("reading %s after %d failed; retrying", self.stream, before, exc_info=True)
                    await anyio.sleep(0.5)
                    continue
                if self.closed:
                    return
                if page.epoch != self.delivery.epoch or page.first > before + 1:
                    # History we promised is gone (new epoch, or trimmed meanwhile).
                    self.delivery.phase = Phase.STALE
                    break
                out = self.delivery.history(page.events)
                if out:
                    await self._send_backlog([EncodedEvent(e) for e in out])
                if len(page.events) == PAGE:
                    continue
                rest = self.delivery.go_live()
                if rest:
                    await self._send_backlog([EncodedEvent(e) for e in rest])
                if self.delivery.needs_fill:
                    stalled = stalled + 1 if self.delivery.last == before else 0
                    if stalled >= 3:
                        # The buffer holds offsets the log cannot produce: treat as lost.
                        self.delivery.phase = Phase.STALE
                        break
        finally:
            self._filling = False
        if not self.closed:
            self._check()


class Hub:
    """Routes live events from the backend feed to local tails.

    Args:
        log: The event log whose live feed drives the hub.
        on_event: Called first for every event (state folding, processors).
        after_event: Called after the tails got the event (``sync`` frames).
    """

    def __init__(
        self,
        log: EventLog,
        on_event: Callable[[Event], None] | None = None,
        after_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._tails: dict[str, set[Tail]] = {}
        self._on_event = on_event
        self._after_event = after_event
        self.feed: LiveFeed = log.live(self.dispatch)
        self.delivered = 0

    def add(self, tail: Tail) -> None:
        """Register a tail for live events of its stream."""
        tails = self._tails.get(tail.stream)
        if tails is None:
            tails = self._tails[tail.stream] = set()
            self.feed.watch(tail.stream)
        tails.add(tail)

    def remove(self, tail: Tail) -> None:
        """Unregister a tail."""
        tail.closed = True
        tails = self._tails.get(tail.stream)
        if tails is not None:
            tails.discard(tail)
            if not tails:
                del self._tails[tail.stream]
                self.feed.unwatch(tail.stream)

    def subscribers(self, stream: str) -> int:
        """Number of local tails on ``stream``."""
        return len(self._tails.get(stream, ()))

    def dispatch(self, event: Event) -> None:
        """Deliver one appended event (called by the live feed, never awaits)."""
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a bug in a fold must not stop fan-out
                log.exception("event hook failed for %s:%s", event.stream, event.offset)
        tails = self._tails.get(event.stream)
        if tails:
            enc = EncodedEvent(event)
            for tail in tuple(tails):
                try:
                    tail.live(enc)
                except Exception:
                    log.exception("tail of %s failed", event.stream)
            self.delivered += len(tails)
        if self._after_event is not None:
            self._after_event(event)

    def broadcast_sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        """Send a ``sync`` frame to live tails of ``stream`` that delivered ``offset``."""
        for tail in tuple(self._tails.get(stream, ())):
            if tail.on_sync is not None and tail.delivery.phase is Phase.LIVE and tail.delivery.last == offset:
                tail.on_sync(offset, frames["json"], frames["msgpack"])

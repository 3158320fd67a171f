"""Per-node fan-out: one live feed in, every local subscriber out.

The backend's live feed calls :meth:`Hub.dispatch` once per appended event,
in offset order per stream. Dispatch never awaits: it folds stateful streams,
then hands the event to each local :class:`Tail`, whose
:class:`~rtcore.protocol.streams.Delivery` decides (synchronously) whether to emit it,
drop it as a duplicate, or buffer it while history is being read. The event's
wire frame is encoded at most once per encoding (:class:`EncodedEvent`) and
the same bytes are queued for every subscriber, which is where fan-out speed
comes from.

History reads go through :class:`SharedReads`: tails that ask for the same
page (stream, after, limit) at the same time share one backend read and one
list of :class:`EncodedEvent` (each event encoded once per encoding, not once
per subscriber), as after a restart, when every subscriber of a stream
resumes from the same offset at once. A read is only shared with callers
that asked before it was issued, so its snapshot is never older than any
caller's registration with the hub (see :class:`SharedReads`).

A tail delivers into an :class:`EventSink`: a subscriber's outbox (the
bounded send queue of one connection, :class:`rtcore.server.outbox.Outbox`)
or a state follower. A tail that finds a gap schedules a fill (an async
history read) through the sink's ``spawn`` — the connection for subscribers,
the node for state followers — so every task has an owner.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import anyio

from ..backends.base import Event, EventLog, LiveFeed, ReadResult
from ..errors import RtcoreError
from ..protocol.backoff import backoff_delay
from ..protocol.codec import codec_for
from ..protocol.frames import Evt
from ..protocol.streams import Delivery, Phase

__all__ = ["EncodedEvent", "EventSink", "Hub", "OutboxLimits", "SharedPage", "SharedReads", "Tail", "evt_frame"]

log = logging.getLogger("rtcore.engine.hub")

PAGE = 500
_LIVE = Phase.LIVE

#: Backoff of a tail's failed history read: the first retry after about
#: ``READ_RETRY_BASE`` s, doubling up to ``READ_RETRY_MAX`` s (half of it random,
#: so the tails of one stream do not all come back at once).
READ_RETRY_BASE = 0.05
READ_RETRY_MAX = 5.0


def evt_frame(event: Event) -> Evt:
    """The ``evt`` frame of a stored event."""
    return Evt(event.stream, event.epoch, event.offset, event.type, event.data, event.ts)


class EncodedEvent:
    """An event plus its wire bytes, encoded lazily once per encoding.

    Attributes:
        event: The event.
        sent: ``(offset, ts)`` of the event, one tuple shared by every
            subscriber's outbox that records it as the last one sent.
    """

    __slots__ = ("_json", "_msgpack", "event", "sent")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.sent = (event.offset, event.ts)
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


class SharedPage:
    """A page of history as handed to every tail that shared its read.

    Attributes:
        result: The backend's answer (read it, never change it: every
            sharer holds the same object).
    """

    __slots__ = ("_encoded", "result")

    def __init__(self, result: ReadResult) -> None:
        self.result = result
        self._encoded: list[EncodedEvent] | None = None

    def encoded(self, out: list[Event]) -> list[EncodedEvent]:
        """:class:`EncodedEvent` objects for ``out``, a run of this page's events.

        The objects (and so their encodings) are shared by every tail of the
        page; the list is the caller's own. ``out`` is what
        :meth:`~rtcore.protocol.streams.Delivery.history` returned: events of
        the page in order, without holes.
        """
        events = self.result.events
        if out and events:
            i = out[0].offset - events[0].offset
            j = i + len(out)
            if i >= 0 and j <= len(events) and events[i] is out[0] and events[j - 1] is out[-1]:
                encoded = self._encoded
                if encoded is None:
                    encoded = self._encoded = [EncodedEvent(e) for e in events]
                return encoded[i:j]
        return [EncodedEvent(e) for e in out]  # not a run of this page (never, by Delivery's rules)


class _Flight:
    """One backend read of :class:`SharedReads` and the callers waiting for it."""

    __slots__ = ("_done", "finished", "page")

    def __init__(self) -> None:
        # Made by the first waiter: most reads have none (an anyio.Event costs
        # an asyncio.Event on asyncio).
        self._done: anyio.Event | None = None
        self.finished = False
        self.page: SharedPage | None = None  # None once finished: failed or cancelled, ask again

    async def wait(self) -> None:
        if not self.finished:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()

    def finish(self) -> None:
        self.finished = True
        if self._done is not None:
            self._done.set()


class SharedReads:
    """Single-flight history reads: concurrent requests for one page share one backend read.

    The catch-up → live handoff needs every history read of a tail to see
    the log as it was *after* the tail registered with the hub (events
    appended before that are read, later ones are fed live; a read from
    before registration may miss events that the feed will not deliver
    either). So a caller never joins a read already issued: while one read
    of a page is under way, the callers that ask for the same page wait
    together for the *next* read, issued once the running one finished, and
    share it. A stream's subscribers resuming together cost one read per
    round trip instead of one each.

    If the read fails or its issuer is cancelled, the callers that waited
    for it ask again (one of them issues the next read, the others share
    it), so every caller gets its own error or a read issued after it asked.

    Args:
        log: The event log to read from.

    Attributes:
        issued: Backend reads issued.
        shared: Requests answered by a read another caller issued.
    """

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self._open: dict[tuple[str, int, int], _Flight] = {}  # not issued yet: may be joined
        self._running: dict[tuple[str, int, int], _Flight] = {}  # issued: may not be joined
        self.issued = 0
        self.shared = 0

    async def read(self, stream: str, *, after: int, limit: int) -> SharedPage:
        """A page of ``stream`` after ``after`` (at most ``limit`` events), read after this call began.

        Raises:
            RtcoreError: the backend's read failed (this caller's own attempt).
        """
        key = (stream, after, limit)
        while True:
            flight = self._open.get(key)
            if flight is None:
                return await self._issue(key)
            await flight.wait()
            if flight.page is not None:
                self.shared += 1
                return flight.page

    async def _issue(self, key: tuple[str, int, int]) -> SharedPage:
        flight = self._open[key] = _Flight()
        try:
            running = self._running.get(key)
            if running is not None:
                # Its snapshot may be older than the registration of the callers
                # joining this flight: wait, then read afresh for all of them.
                await running.wait()
            del self._open[key]  # from here on a newcomer waits for the next read
            self._running[key] = flight
            self.issued += 1
            stream, after, limit = key
            flight.page = SharedPage(await self.log.read(stream, after=after, limit=limit))
            return flight.page
        finally:
            if self._open.get(key) is flight:
                del self._open[key]
            if self._running.get(key) is flight:
                del self._running[key]
            flight.finish()


class OutboxLimits:
    """Bounds of a subscriber's send queue (a slow consumer beyond them is cut).

    Live frames that would take the queue past either bound cut the
    subscriber (WebSocket: ``bye`` ``slow_consumer`` and close 4008; SSE: the
    response ends); history replay instead waits until a frame fits within
    half of each bound. A single frame bigger than a bound is still queued
    when the queue is empty.

    Attributes:
        max_bytes: Queued bytes allowed.
        max_frames: Queued frames allowed.
    """

    __slots__ = ("max_bytes", "max_frames")

    def __init__(self, max_bytes: int = 4 << 20, max_frames: int = 10_000) -> None:
        if max_bytes < 1:
            raise ValueError(f"OutboxLimits.max_bytes must be >= 1, got {max_bytes}")
        if max_frames < 1:
            raise ValueError(f"OutboxLimits.max_frames must be >= 1, got {max_frames}")
        self.max_bytes = max_bytes
        self.max_frames = max_frames

    def __repr__(self) -> str:
        return f"OutboxLimits(max_bytes={self.max_bytes}, max_frames={self.max_frames})"


class EventSink(Protocol):
    """Where a :class:`Tail` delivers: a subscriber's outbox or a state follower.

    One sink may serve several tails (a connection's subscriptions share its
    outbox); each call names the stream.
    """

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``fn`` in the owner's task group (gap fills)."""
        ...

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        """Take in-order live events; never awaits (called from the hub's dispatch).

        ``batch`` may be shared with the other sinks of the event: read it, never change it.
        """
        ...

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:
        """Take a page of history; returns when the consumer can take more (pacing)."""
        ...

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        """Take a ``sync`` frame (``frames`` by encoding) after event ``offset``."""
        ...

    def stale(self, stream: str) -> None:
        """The stream's history changed under the tail (new epoch); called once."""
        ...


class Tail:
    """A consumer of one stream fed by the hub and, when needed, by history reads.

    Args:
        log: The event log to fill gaps from.
        stream: The stream.
        delivery: Its ordering state (starts in catch-up).
        sink: Where in-order events go: live ones through :meth:`EventSink.live`,
            history pages through :meth:`EventSink.backlog` (awaited after each
            page so catch-up goes at the consumer's pace).
        reads: Shared reads of ``log`` (the hub's :attr:`Hub.reads`), or None
            to read ``log`` directly.
    """

    def __init__(
        self, log: EventLog, stream: str, delivery: Delivery, sink: EventSink, *, reads: SharedReads | None = None
    ) -> None:
        self.log = log
        self.stream = stream
        self.delivery = delivery
        self.sink = sink
        self._reads = reads
        self._filling = False
        self._prefetched: SharedPage | None = None  # the first page, read by prefetch()
        self._prefetched_after = 0
        self.closed = False

    def live(self, enc: EncodedEvent, batch: list[EncodedEvent] | None = None) -> None:
        """Take one live event from the hub (never awaits).

        Args:
            enc: The event.
            batch: ``[enc]``, made once by the hub and handed to every sink
                (sinks never change it), or None to make one here.
        """
        if self.closed:
            return
        d = self.delivery
        event = enc.event
        if d.phase is _LIVE and event.offset == d.last + 1 and event.epoch == d.epoch:
            # The common case, without Delivery.live's list: the next event of
            # a live tail goes straight out (what Delivery.live would decide).
            d.last = event.offset
            self.sink.live(self.stream, batch if batch is not None else [enc])
            return
        out = d.live(event)
        if out:
            self.sink.live(self.stream, [enc])
        self._check()

    def _check(self) -> None:
        d = self.delivery
        if d.phase is Phase.STALE:
            self.closed = True
            self.sink.stale(self.stream)
        elif d.needs_fill and not self._filling:
            self._filling = True
            self.sink.spawn(self.fill)

    async def _send_backlog(self, batch: list[EncodedEvent]) -> None:
        await self.sink.backlog(self.stream, batch)

    async def _read(self, after: int) -> SharedPage:
        if self._reads is not None:
            return await self._reads.read(self.stream, after=after, limit=PAGE)
        return SharedPage(await self.log.read(self.stream, after=after, limit=PAGE))

    def prefetched(self, page: SharedPage) -> ReadResult:
        """Like :meth:`prefetch` with a page the hub already holds (see
        :meth:`Hub.recent`): :meth:`fill` replays it, then goes live with
        whatever the feed buffered meanwhile."""
        self._filling = True
        self._prefetched, self._prefetched_after = page, self.delivery.last
        return page.result

    async def prefetch(self) -> ReadResult:
        """Read the first page of the catch-up now (the tail must be registered).

        For a subscription that needs the stream's shape to plan its start:
        one read gives the plan its epoch, head and first offset and gives
        :meth:`fill` its first page, so no second round trip is made. Until
        :meth:`fill` runs, live events only go to the buffer (no fill is
        spawned: the owner's comes).

        Raises:
            RtcoreError: the read failed.
        """
        self._filling = True
        after = self.delivery.last
        page = await self._read(after)
        self._prefetched, self._prefetched_after = page, after
        return page.result

    async def fill(self) -> None:
        """Read history after ``delivery.last`` until caught up, then go live.

        A failed read (:class:`~rtcore.errors.RtcoreError` from the backend)
        is logged and tried again after :func:`~rtcore.protocol.backoff.backoff_delay`
        (from :data:`READ_RETRY_BASE` up to :data:`READ_RETRY_MAX` s), after
        ``delivery.last`` again, until it succeeds or the tail is closed: the
        consumer resumes when the backend comes back, with nothing sent twice
        or skipped (docs/architecture.md, "Backend read failures").
        """
        self._filling = True
        try:
            stalled = 0
            failures = 0
            while not self.closed and self.delivery.needs_fill:
                before = self.delivery.last
                shared, self._prefetched = self._prefetched, None
                if shared is None or self._prefetched_after != before:
                    try:
                        shared = await self._read(before)
                    except RtcoreError as exc:
                        # A backend outage: the owner's task (the connection, the
                        # node) must survive it, and the consumer resumes once the
                        # backend answers. The next read is again after
                        # delivery.last, so nothing is sent twice or skipped.
                        delay = backoff_delay(failures, READ_RETRY_BASE, READ_RETRY_MAX)
                        failures += 1
                        log.log(
                            logging.WARNING if exc.retryable else logging.ERROR,
                            "reading %s after %d failed (attempt %d, %s); retrying in %.2f s",
                            self.stream, before, failures, exc.code, delay, exc_info=failures == 1,
                        )
                        await anyio.sleep(delay)
                        continue
                    if failures:
                        log.warning("reading %s after %d succeeded after %d failed attempts", self.stream, before, failures)
                        failures = 0
                if self.closed:
                    return
                page = shared.result
                if page.epoch != self.delivery.epoch or page.first > before + 1:
                    # History we promised is gone (new epoch, or trimmed meanwhile).
                    self.delivery.phase = Phase.STALE
                    break
                out = self.delivery.history(page.events)
                if out:
                    await self._send_backlog(shared.encoded(out))
                if len(page.events) == PAGE:
                    continue
                while rest := self.delivery.go_live():
                    if self.delivery.phase is _LIVE:
                        # Back to buffering until these are queued: the sink may
                        # wait for room, and a live event sent meanwhile would
                        # overtake them. What arrives is drained next round.
                        self.delivery.phase = Phase.CATCHUP
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


#: Events the hub keeps per watched stream for resumes that are a few events behind.
RECENT = 8


class _Recent:
    """A watched stream's epoch, known head and its last events (``events[-1]`` is the head)."""

    __slots__ = ("epoch", "events", "head")

    def __init__(self, epoch: str, head: int) -> None:
        self.epoch = epoch
        self.head = head
        self.events: deque[EncodedEvent] = deque(maxlen=RECENT)


class Hub:
    """Routes live events from the backend feed to local tails.

    Args:
        log: The event log whose live feed drives the hub.
        on_event: Called first for every event (state folding, processors).
        after_event: Called after the tails got the event (the dispatch-latency metrics).
    """

    def __init__(
        self,
        log: EventLog,
        on_event: Callable[[Event], None] | None = None,
        after_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._tails: dict[str, set[Tail]] = {}
        # Head and last events of watched streams, from the feed and from reads
        # issued while watched; dropped when the stream is unwatched (see recent).
        self._recent: dict[str, _Recent] = {}
        #: History reads of the tails, shared by those asking for the same page at once.
        self.reads = SharedReads(log)
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
                self._recent.pop(tail.stream, None)  # nothing feeds it any more
                self.feed.unwatch(tail.stream)

    def known_head(self, stream: str) -> tuple[str, int] | None:
        """``(epoch, head)`` of ``stream`` as far as this hub knows, or None.

        Known only while the stream has tails (it is watched), from the
        highest offset the feed delivered or a read issued while watched
        reported (:meth:`note_head`). Every event after that head reaches the
        feed after it was learnt, so a tail registered now at or after the
        start of :meth:`recent` misses nothing.
        """
        r = self._recent.get(stream)
        return None if r is None else (r.epoch, r.head)

    def recent(self, stream: str, epoch: str, after: int) -> SharedPage | None:
        """The events of ``stream`` after ``after`` up to the known head, from memory, or None.

        The hub keeps the last :data:`RECENT` events the feed delivered for a
        watched stream, without holes, ending at the known head (see
        :meth:`known_head`). A resume whose position is within them (the
        common case after a restart: clients were up to date or a few events
        behind) needs no history read: the page holds the missing events,
        already encoded for the live subscribers, and every later event
        reaches the feed after the head was learnt, so a tail registered
        before this call gets it live. None: not watched, another epoch, or
        ``after`` outside the kept events (read the backend).
        """
        r = self._recent.get(stream)
        if r is None or r.epoch != epoch or not r.head - len(r.events) <= after <= r.head:
            return None
        encs = list(r.events)[len(r.events) - (r.head - after) :] if after < r.head else []
        page = SharedPage(ReadResult(epoch, r.head, after + 1, [enc.event for enc in encs]))
        page._encoded = encs
        return page

    def note_head(self, stream: str, epoch: str, head: int) -> None:
        """A read of a watched ``stream`` saw ``head`` in ``epoch`` (see :meth:`known_head`)."""
        if stream not in self._tails:
            return  # unwatched: later events may never reach this hub
        r = self._recent.get(stream)
        if r is None:
            self._recent[stream] = _Recent(epoch, head)
        elif r.epoch != epoch:
            del self._recent[stream]  # two epochs seen: unknown until a read settles it
        elif head > r.head:
            r.head = head  # the events up to it were not fed yet: none kept
            r.events.clear()

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
            r = self._recent.get(event.stream)
            if r is None:
                r = self._recent[event.stream] = _Recent(event.epoch, event.offset)
                r.events.append(enc)
            elif r.epoch != event.epoch:
                del self._recent[event.stream]  # two epochs seen: unknown until a read settles it
            elif event.offset == r.head + 1:
                r.head += 1
                r.events.append(enc)
            elif event.offset > r.head:
                # The feed skipped events (the tails will read them): keep only this one.
                r.head = event.offset
                r.events.clear()
                r.events.append(enc)
            batch = [enc]  # one list for every sink (EventSink.live never changes it)
            for tail in tuple(tails):
                try:
                    tail.live(enc, batch)
                except Exception:
                    log.exception("tail of %s failed", event.stream)
            self.delivered += len(tails)
        if self._after_event is not None:
            self._after_event(event)

    def broadcast_sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        """Send a ``sync`` frame to live tails of ``stream`` that delivered ``offset``."""
        for tail in tuple(self._tails.get(stream, ())):
            if not tail.closed and tail.delivery.phase is Phase.LIVE and tail.delivery.last == offset:
                tail.sink.sync(stream, offset, frames)

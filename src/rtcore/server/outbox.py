"""The send queue of one subscriber connection, shared by WebSocket and SSE.

An :class:`Outbox` sits between the hub (which must never wait) and a
connection's one writer (which waits for the peer):

* **Bounded.** Live frames (events fanned out by the hub, replies, ``sync``)
  are queued without awaiting. A live frame that would take the queue past
  :class:`~rtcore.engine.hub.OutboxLimits` (bytes or frames) means the
  subscriber cannot keep up: the queue is dropped, ``on_slow`` runs (the
  WebSocket session says ``bye`` ``slow_consumer`` and closes 4008; an SSE
  stream ends) and the client resumes from the last position it received.
* **Paced catch-up.** History replay is a burst by nature and must not count
  against the limit: :meth:`Outbox.push_backlog` queues a frame only while
  the queue stays within half of each bound and otherwise waits for the
  writer to drain it, so a replay goes at the consumer's pace and always
  leaves half the room for live frames.
* **Batched writes.** The writer takes everything queued at once
  (:meth:`Outbox.take`) and writes it in one call (one socket write). On
  asyncio a transport may offer a write that needs no wait
  (:class:`FastWriter`): frames queued during one event-loop tick are then
  written at its end, without waking the writer task, by one callback per
  event loop for every outbox that got frames in that tick (a room patch
  fanned out to 100 subscribers schedules one callback, not 100).

So ``queued_bytes`` never exceeds ``max_bytes`` (nor ``queued_frames``
``max_frames``), except by a single frame larger than the bound queued into
an empty outbox.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

import anyio

from ..engine.hub import EncodedEvent, OutboxLimits
from ..engine.metrics import NodeMetrics

__all__ = ["FastWriter", "Outbox", "OutboxLimits", "OutboxOwner"]

log = logging.getLogger("rtcore.server.outbox")



class OutboxOwner(Protocol):
    """What an :class:`Outbox` calls back: its connection, passed as one object
    (four bound methods stored per outbox were ~0.25 kB per connection)."""

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``fn`` in the connection's task (group)."""
        ...

    def on_slow(self) -> None:
        """A live frame did not fit (see :class:`Outbox`)."""
        ...

    def on_stale(self, stream: str) -> None:
        """The history of ``stream`` changed under a subscription."""
        ...

    def start_writer(self) -> None:
        """Start the writer task (called once, see :class:`Outbox`)."""
        ...


class _Callbacks:
    """An :class:`OutboxOwner` made of separate callables."""

    __slots__ = ("_on_slow", "_on_stale", "_spawn", "_start_writer")

    def __init__(
        self,
        spawn: Callable[[Callable[[], Coroutine[Any, Any, Any]]], None],
        on_slow: Callable[[], None],
        on_stale: Callable[[str], None],
        start_writer: Callable[[], None] | None,
    ) -> None:
        self._spawn = spawn
        self._on_slow = on_slow
        self._on_stale = on_stale
        self._start_writer = start_writer

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._spawn(fn)

    def on_slow(self) -> None:
        self._on_slow()

    def on_stale(self, stream: str) -> None:
        self._on_stale(stream)

    def start_writer(self) -> None:
        if self._start_writer is not None:
            self._start_writer()


@runtime_checkable
class FastWriter(Protocol):
    """A transport's optional wait-free write (the asyncio fast path)."""

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Send ``frames`` now if that needs no wait; ``False``: nothing was sent."""
        ...

    @property
    def call_soon(self) -> Callable[..., Any] | None:
        """The event loop's ``call_soon`` (None: no fast path on this connection)."""
        ...


class _FlushBatch:
    """The fast-path writes of one event loop: every outbox that queued frames in a tick, flushed by one callback.

    One ``call_soon`` per outbox per tick was an eighth of a 100-subscriber
    room's tick (py-spy): a handle allocated and run per subscriber. Outboxes
    are flushed in the order they first queued a frame in the tick.
    """

    # No reference to the loop (it is the weak key of _batches): the outbox's call_soon schedules.
    __slots__ = ("_due", "_scheduled")

    def __init__(self) -> None:
        self._due: list[Outbox] = []
        self._scheduled = False

    def add(self, outbox: Outbox) -> None:
        self._due.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            # Asked for now, not stored per outbox (a bound method each).
            call_soon = outbox._fast.call_soon if outbox._fast is not None else None
            assert call_soon is not None  # only outboxes with a fast path have a batch
            call_soon(self._run)

    def _run(self) -> None:
        # Swapped first: an outbox that queues again during a flush goes into the next round.
        due, self._due = self._due, []
        self._scheduled = False
        for outbox in due:
            if not outbox._flush_scheduled:
                continue  # flushed meanwhile (Outbox.flushed)
            try:
                outbox._flush()
            except Exception:  # pragma: no cover - one connection's bug must not stall the others
                log.exception("fast-path write failed")


#: One batch per event loop (keyed by the object whose ``call_soon`` it is).
_batches: weakref.WeakKeyDictionary[Any, _FlushBatch] = weakref.WeakKeyDictionary()


def _batch_for(call_soon: Callable[..., Any]) -> _FlushBatch:
    owner = getattr(call_soon, "__self__", call_soon)
    try:
        batch = _batches.get(owner)
        if batch is None:
            batch = _batches[owner] = _FlushBatch()
    except TypeError:  # pragma: no cover - an owner that takes no weak reference: a batch of its own
        batch = _FlushBatch()
    return batch


class Outbox:
    """A subscriber's bounded send queue; the :class:`~rtcore.engine.hub.EventSink` of its subscriptions.

    Args:
        limits: Queue bounds.
        render: Wire bytes of one event for this connection.
        spawn: Runs a coroutine function in the connection's task group
            (``spawn``, ``on_slow`` and ``on_stale`` are required without ``owner``).
        on_slow: Called once when a live frame does not fit (after the queue
            was dropped; frames it pushes are still queued, then the outbox
            closes).
        on_stale: Called with the stream whose history changed under a subscription.
        render_sync: Wire bytes of a ``sync`` frame from its encodings, or
            None to skip ``sync`` frames (SSE).
        clock: Unix time, for the written-latency metric.
        metrics: Node recorders for bytes sent and publish → written latency
            (None: not recorded).
        fast: The transport's wait-free write, if it has one.
        start_writer: Called once, the first time frames (or the close) need
            the writer task: the connection then starts it (None: the writer
            runs from the start). With ``fast``, most connections never need it.
        owner: The connection as one :class:`OutboxOwner` instead of
            ``spawn``, ``on_slow``, ``on_stale`` and ``start_writer`` (whose
            ``start_writer`` is then called once, on first need).

    Attributes:
        limits: Queue bounds.
        bytes_out: Bytes taken by the writer so far.
        frames_out: Frames taken by the writer so far.
        peak_bytes: Most bytes ever queued at once.
        peak_frames: Most frames ever queued at once.
        slow: Whether the outbox was cut for a slow consumer.
        last_sent: Per stream, ``(offset, publish ts)`` of the newest live
            event queued (the session removes it once acknowledged).
    """

    # One per connection: no per-instance __dict__.
    __slots__ = (
        "_batch", "_clock", "_closed", "_drained", "_fast", "_flush_scheduled", "_metrics", "_owner",
        "_queue", "_queued_bytes", "_render", "_render_sync", "_start_writer", "_unwritten_ts", "_wake",
        "_writer_busy", "bytes_out", "frames_out", "last_sent", "limits", "peak_bytes", "peak_frames", "slow",
    )

    def __init__(
        self,
        limits: OutboxLimits,
        *,
        render: Callable[[EncodedEvent], bytes],
        spawn: Callable[[Callable[[], Coroutine[Any, Any, Any]]], None] | None = None,
        on_slow: Callable[[], None] | None = None,
        on_stale: Callable[[str], None] | None = None,
        render_sync: Callable[[dict[str, bytes]], bytes] | None = None,
        clock: Callable[[], float] = time.time,
        metrics: NodeMetrics | None = None,
        fast: FastWriter | None = None,
        start_writer: Callable[[], None] | None = None,
        owner: OutboxOwner | None = None,
    ) -> None:
        self.limits = limits
        self._render = render
        self._render_sync = render_sync
        if owner is None:
            if spawn is None or on_slow is None or on_stale is None:
                raise TypeError("Outbox needs spawn, on_slow and on_stale, or an owner")
            lazy = start_writer is not None
            owner = _Callbacks(spawn, on_slow, on_stale, start_writer)
        else:
            lazy = True
        self._owner: OutboxOwner = owner
        self._clock = clock
        self._metrics = metrics
        # A list, not a deque: an empty deque is a 700-byte block, an empty list 56 bytes.
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        # The writer's wake-up, created when it waits (a writer never started needs none).
        self._wake: anyio.Event | None = None
        # The writer task is still to be started (by the owner, on first need).
        self._start_writer = lazy
        # Created by a paced replay that waits for room (most connections never do).
        self._drained: anyio.Event | None = None
        self._closed = False
        self.slow = False
        self.bytes_out = 0
        self.frames_out = 0
        self.peak_bytes = 0
        self.peak_frames = 0
        self.last_sent: dict[str, tuple[int, float]] = {}
        # Publish time of the oldest live event not yet taken (0: none), for metrics.
        self._unwritten_ts = 0.0
        call_soon = fast.call_soon if fast is not None else None
        self._fast = fast if call_soon is not None else None
        self._batch = _batch_for(call_soon) if call_soon is not None else None
        self._flush_scheduled = False
        self._writer_busy = False  # the writer task owns the send side (an awaited send)

    # --- state -----------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now."""
        return self._queued_bytes

    @property
    def queued_frames(self) -> int:
        """Frames queued now."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """Whether the outbox takes no more frames."""
        return self._closed

    def _fits(self, size: int, max_bytes: int, max_frames: int) -> bool:
        # An empty queue takes any frame: a frame is never refused for its size alone.
        return not self._queue or (self._queued_bytes + size <= max_bytes and len(self._queue) < max_frames)

    # --- queueing --------------------------------------------------------------

    def push(self, data: bytes) -> None:
        """Queue one live frame without waiting; cut the subscriber if it does not fit."""
        if self._closed:
            return
        # _fits and _append inlined: this runs once per subscriber per event (the fan-out).
        queue = self._queue
        size = self._queued_bytes + len(data)
        if queue and (size > self.limits.max_bytes or len(queue) >= self.limits.max_frames):
            self._cut()
            return
        queue.append(data)
        self._queued_bytes = size
        if size > self.peak_bytes:
            self.peak_bytes = size
        if len(queue) > self.peak_frames:
            self.peak_frames = len(queue)
        if self._flush_scheduled:
            return  # this tick's write is already due
        if self._batch is not None and not self._writer_busy:
            self._flush_scheduled = True
            self._batch.add(self)
        else:
            self._wake_writer()

    def push_now(self, data: bytes) -> None:
        """Queue one live frame like :meth:`push`, but write it at once when nothing
        is queued, due or being written and the transport takes it without waiting.

        For a command's reply with no other reply about to follow: it saves the
        end-of-tick callback, and with nothing queued there is nothing to batch
        it with. Frames queued before it still go first (it is written directly
        only into an empty outbox), frames queued after it follow it.
        """
        fast = self._fast
        if fast is not None and not self._queue and not self._flush_scheduled and not self._writer_busy and not self._closed:
            try:
                sent = fast.send_nowait([data])
            except Exception:  # pragma: no cover - let the queued path meet the error
                sent = False
            if sent:
                size = len(data)
                self.bytes_out += size
                self.frames_out += 1
                if self._metrics is not None:
                    self._metrics.bytes_out += size
                return
        self.push(data)

    async def push_backlog(self, frames: list[bytes]) -> None:
        """Queue history at the consumer's pace.

        Each frame waits until it fits within half of each bound (or the
        queue is empty); these frames never cut the subscriber.
        """
        half_bytes = self.limits.max_bytes // 2
        half_frames = self.limits.max_frames // 2
        for data in frames:
            while not self._closed and not self._fits(len(data), half_bytes, half_frames):
                await self._wait_taken()
            if self._closed:
                return
            self._append(data)

    async def _wait_taken(self) -> None:
        """Wait until the writer takes the queue (or the outbox closes)."""
        drained = self._drained
        if drained is None or drained.is_set():  # shared by every waiter until set
            drained = self._drained = anyio.Event()
        await drained.wait()

    async def flushed(self) -> None:
        """Return once every frame queued so far was handed to the transport's send
        (or the outbox closed): the connection is about to be failed and frames
        queued before the failure go out first."""
        if self._flush_scheduled:
            self._flush()  # this tick's fast-path write, now rather than at the tick's end
        while self._queue and not self._closed:
            await self._wait_taken()

    def _append(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self._queued_bytes > self.peak_bytes:
            self.peak_bytes = self._queued_bytes
        if len(self._queue) > self.peak_frames:
            self.peak_frames = len(self._queue)
        if self._batch is not None and not self._writer_busy:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._batch.add(self)
        else:
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self._start_writer:
            self._start_writer = False
            self._owner.start_writer()
        if self._wake is not None:
            self._wake.set()

    def _cut(self) -> None:
        self.slow = True
        # Drop what is queued: the client resumes from the last position it received.
        self._queue.clear()
        self._queued_bytes = 0
        self._unwritten_ts = 0.0
        self._owner.on_slow()
        self.close()

    def close(self) -> None:
        """Take no more frames; the writer sends what is queued, then :meth:`take` returns None."""
        self._closed = True
        self._wake_writer()
        if self._drained is not None:
            self._drained.set()  # a paced replay waiting for room returns now

    def abort(self) -> None:
        """The peer is gone: drop what is queued and close."""
        self._queue.clear()
        self._queued_bytes = 0
        self.close()

    # --- EventSink (called by the hub's tails) ---------------------------------

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``fn`` in the connection's task group."""
        self._owner.spawn(fn)

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        """Queue live events (never waits)."""
        render = self._render
        for enc in batch:
            self.push(render(enc))  # push is the inlined hot path (once per subscriber per event)
        if self._closed:
            return
        if not self._unwritten_ts:
            self._unwritten_ts = batch[0].event.ts
        # The same tuple for every subscriber of the event (EncodedEvent.sent).
        self.last_sent[stream] = batch[-1].sent

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:
        """Queue a page of history, paced (see :meth:`push_backlog`)."""
        await self.push_backlog([self._render(enc) for enc in batch])

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        """Queue a ``sync`` frame (live)."""
        if self._render_sync is not None:
            self.push(self._render_sync(frames))

    def stale(self, stream: str) -> None:
        """A subscription's history changed under it."""
        self._owner.on_stale(stream)

    # --- writing ---------------------------------------------------------------

    def _take_nowait(self) -> tuple[list[bytes], float]:
        batch, self._queue = self._queue, []
        self._queued_bytes = 0
        if self._drained is not None:
            self._drained.set()
        size = sum(map(len, batch))
        self.bytes_out += size
        self.frames_out += len(batch)
        if self._metrics is not None:
            self._metrics.bytes_out += size
        ts, self._unwritten_ts = self._unwritten_ts, 0.0
        return batch, ts

    def _written(self, ts: float) -> None:
        if ts and self._metrics is not None:
            # Once per write, for its oldest live event (see rtcore.engine.metrics).
            self._metrics.written.observe(self._clock() - ts)

    async def take(self) -> list[bytes] | None:
        """Wait for frames and take all of them; None once closed and empty."""
        batch, ts = await self._take()
        self._written(ts)
        return batch or None

    async def _take(self) -> tuple[list[bytes], float]:
        while not self._queue:
            if self._closed:
                return [], 0.0
            # Checked and created with no await in between: no wake-up is missed.
            wake = self._wake = anyio.Event()
            await wake.wait()
        return self._take_nowait()

    async def run(self, send: Callable[[list[bytes]], Awaitable[None]]) -> None:
        """The writer: send batches with ``send`` until the outbox is closed and empty."""
        while True:
            batch, ts = await self._take()
            if not batch:
                return
            self._writer_busy = True
            try:
                await send(batch)
            finally:
                self._writer_busy = False
            self._written(ts)

    def _flush(self) -> None:
        """Fast path (an event-loop callback): write what this tick queued, if the socket takes it now."""
        self._flush_scheduled = False
        if not self._queue:
            return  # the writer task took it meanwhile
        if self._writer_busy or self._closed:
            self._wake_writer()  # the writer task's job
            return
        assert self._fast is not None
        batch = self._queue  # send_nowait keeps no reference to it
        try:
            sent = self._fast.send_nowait(batch)
        except Exception:  # pragma: no cover - let the writer task meet the error
            sent = False
        if not sent:
            self._wake_writer()  # the writer waits for the socket (send timeout, slow consumer)
            return
        _, ts = self._take_nowait()
        self._written(ts)

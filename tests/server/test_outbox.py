"""The subscriber outbox on its own: bounds, paced catch-up, the slow-consumer cut, batched writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from rtcore.engine.hub import EncodedEvent, OutboxLimits
from rtcore.engine.metrics import NodeMetrics
from rtcore.protocol.types import Event
from rtcore.server.outbox import Outbox

pytestmark = pytest.mark.anyio


class Harness:
    """An outbox plus records of what it called."""

    def __init__(self, limits: OutboxLimits, **kwargs: Any) -> None:
        self.slow_calls = 0
        self.stale: list[str] = []
        self.spawned: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self.outbox = Outbox(
            limits,
            render=lambda e: e.encoded("json"),
            spawn=self.spawned.append,
            on_slow=self._on_slow,
            on_stale=self.stale.append,
            **kwargs,
        )

    def _on_slow(self) -> None:
        self.slow_calls += 1


def frame(i: int, size: int = 10) -> bytes:
    return str(i).encode().ljust(size, b".")


def event(offset: int, ts: float = 1000.0) -> EncodedEvent:
    return EncodedEvent(Event("s:1", "e1", offset, "t", {"i": offset}, ts))


async def drain_all(outbox: Outbox, into: list[bytes]) -> None:
    while (batch := await outbox.take()) is not None:
        into.extend(batch)


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        OutboxLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_frames"):
        OutboxLimits(max_frames=0)


async def test_live_frames_beyond_the_byte_bound_cut_the_subscriber() -> None:
    """Queued bytes never pass ``max_bytes``; the frame that would is the cut.

    Mutation: drop the bound check in ``push`` → no cut, peak 110 → fails.
    Mutation: append first and check after (the old rule) → peak_bytes 110 > 100 → fails.
    """
    h = Harness(OutboxLimits(max_bytes=100, max_frames=1000))
    for i in range(10):
        h.outbox.push(frame(i))
    assert (h.outbox.queued_bytes, h.outbox.slow, h.slow_calls) == (100, False, 0)
    h.outbox.push(frame(10))
    assert h.outbox.slow and h.slow_calls == 1 and h.outbox.closed
    assert h.outbox.queued_bytes == 0 and h.outbox.queued_frames == 0  # dropped: memory freed
    assert h.outbox.peak_bytes == 100
    h.outbox.push(frame(11))  # ignored once cut
    assert h.slow_calls == 1 and h.outbox.queued_frames == 0
    assert await h.outbox.take() is None


async def test_live_frames_beyond_the_frame_bound_cut_the_subscriber() -> None:
    """Mutation: compare ``len(queue) <= max_frames`` → a 4th frame fits → fails."""
    h = Harness(OutboxLimits(max_bytes=10_000, max_frames=3))
    for i in range(3):
        h.outbox.push(frame(i))
    assert not h.outbox.slow
    h.outbox.push(frame(3))
    assert h.outbox.slow and h.outbox.peak_frames == 3


async def test_frames_pushed_by_on_slow_are_still_sent() -> None:
    """The WebSocket session queues ``bye`` from ``on_slow``: it goes out, then the outbox ends.

    Mutation: ``_cut`` closes before calling ``on_slow`` → the bye is dropped → fails.
    """
    box: list[Outbox] = []
    outbox = Outbox(
        OutboxLimits(max_bytes=20),
        render=lambda e: e.encoded("json"),
        spawn=lambda fn: None,
        on_slow=lambda: box[0].push(b"bye"),
        on_stale=lambda s: None,
    )
    box.append(outbox)
    outbox.push(frame(0))
    outbox.push(frame(1))
    outbox.push(frame(2))  # does not fit: cut
    assert await outbox.take() == [b"bye"]
    assert await outbox.take() is None


async def test_one_frame_larger_than_the_bound_is_taken_by_an_empty_outbox() -> None:
    """A frame is never refused for its size alone (else it could never be delivered)."""
    h = Harness(OutboxLimits(max_bytes=100))
    h.outbox.push(b"x" * 500)
    assert not h.outbox.slow and h.outbox.queued_bytes == 500
    h.outbox.push(b"y")  # but nothing may pile up behind it
    assert h.outbox.slow


async def test_catch_up_waits_for_the_queue_to_drain_below_half() -> None:
    """History is queued only while it fits in half the bound; the rest waits for the writer.

    Mutation: ``push_backlog`` appends every frame at once (no pacing) → 10 frames
    queued before any take → fails.
    """
    h = Harness(OutboxLimits(max_bytes=100, max_frames=1000))
    done = anyio.Event()

    async def replay() -> None:
        await h.outbox.push_backlog([frame(i) for i in range(12)])
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        await wait_all_tasks_blocked()
        assert h.outbox.queued_bytes == 50 and not done.is_set()  # half of 100
        first = await h.outbox.take()
        await wait_all_tasks_blocked()
        second = await h.outbox.take()
        await wait_all_tasks_blocked()
        third = await h.outbox.take()
        with anyio.fail_after(5):
            await done.wait()
    assert first is not None and second is not None and third is not None
    assert [*first, *second, *third] == [frame(i) for i in range(12)]
    assert [len(first), len(second), len(third)] == [5, 5, 2]
    assert not h.outbox.slow and h.slow_calls == 0


async def test_catch_up_never_counts_toward_the_slow_consumer_limit() -> None:
    """A replay far bigger than the bound, against a slow writer, is not a slow consumer.

    Mutation: ``push_backlog`` queues with ``push`` and without pacing (history
    counts toward the live limit) → cut → fails.
    Mutation: no pacing (``_append`` every frame at once) → peak 5000 bytes → fails.
    (``push`` with pacing kept is equivalent: paced frames always fit.)
    """
    h = Harness(OutboxLimits(max_bytes=100, max_frames=1000))
    got: list[bytes] = []
    history = [frame(i) for i in range(500)]

    async def slow_writer() -> None:
        while (batch := await h.outbox.take()) is not None:
            got.extend(batch)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_writer)
        await h.outbox.push_backlog(history)
        h.outbox.close()
    assert got == history
    assert not h.outbox.slow
    assert h.outbox.peak_bytes <= 50


async def test_live_frames_keep_half_the_room_during_catch_up() -> None:
    """History stops at half; live frames can use the rest before the cut.

    Mutation: backlog waits only for "below the whole bound" → live frames find
    no room and cut at once → fails.
    """
    h = Harness(OutboxLimits(max_bytes=100, max_frames=1000))
    with anyio.fail_after(5):  # the paced replay returns once cut (woken, not left hanging)
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.outbox.push_backlog, [frame(i) for i in range(20)])
            await wait_all_tasks_blocked()
            for i in range(5):
                h.outbox.push(frame(100 + i))
            assert not h.outbox.slow and h.outbox.queued_bytes == 100
            h.outbox.push(frame(200))  # the live limit counts everything queued
            assert h.outbox.slow
    assert h.outbox.closed


async def test_a_cut_wakes_a_waiting_replay() -> None:
    """Mutation: ``close`` (called by the cut) does not set the drained event → the replay waits forever → fails."""
    h = Harness(OutboxLimits(max_bytes=100))
    finished = anyio.Event()

    async def replay() -> None:
        await h.outbox.push_backlog([frame(i) for i in range(50)])
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        await wait_all_tasks_blocked()
        for i in range(6):
            h.outbox.push(frame(i))
        assert h.outbox.slow
        with anyio.fail_after(5):
            await finished.wait()


async def test_writer_takes_everything_queued_in_one_batch() -> None:
    sent: list[list[bytes]] = []

    async def send(batch: list[bytes]) -> None:
        sent.append(batch)

    h = Harness(OutboxLimits())
    for i in range(5):
        h.outbox.push(frame(i))
    h.outbox.close()
    await h.outbox.run(send)
    assert sent == [[frame(i) for i in range(5)]]
    assert h.outbox.bytes_out == 50 and h.outbox.frames_out == 5


async def test_abort_drops_what_is_queued() -> None:
    h = Harness(OutboxLimits())
    h.outbox.push(frame(0))
    h.outbox.abort()
    assert await h.outbox.take() is None


async def test_live_events_track_last_sent_and_written_latency() -> None:
    metrics = NodeMetrics()
    h = Harness(OutboxLimits(), clock=lambda: 1000.5, metrics=metrics)
    events = [event(1, ts=1000.0), event(2, ts=1000.2)]
    h.outbox.live("s:1", events)
    assert h.outbox.last_sent == {"s:1": (2, 1000.2)}
    batch = await h.outbox.take()
    assert batch == [e.encoded("json") for e in events]
    # Once per write, for its oldest live event: 1000.5 - 1000.0.
    assert metrics.written.count == 1 and metrics.written.sum == pytest.approx(0.5)
    assert metrics.bytes_out == sum(map(len, batch))


async def test_sync_frames_are_skipped_without_a_renderer_and_stale_is_passed_on() -> None:
    h = Harness(OutboxLimits())
    h.outbox.sync("s:1", 3, {"json": b"J", "msgpack": b"M"})
    assert h.outbox.queued_frames == 0
    h2 = Harness(OutboxLimits(), render_sync=lambda frames: frames["msgpack"])
    h2.outbox.sync("s:1", 3, {"json": b"J", "msgpack": b"M"})
    assert await h2.outbox.take() == [b"M"]
    h.outbox.stale("s:1")
    assert h.stale == ["s:1"]


class FakeFast:
    """A transport offering a wait-free write, recording each call."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.calls: list[list[bytes]] = []
        self.call_soon = asyncio.get_running_loop().call_soon

    def send_nowait(self, frames: list[bytes]) -> bool:
        self.calls.append(list(frames))
        return self.accept


@pytest.mark.asyncio_only(reason="the tick-batched fast write is scheduled with asyncio's loop.call_soon; trio always uses the writer task")
async def test_fast_path_writes_a_ticks_frames_in_one_call() -> None:
    """Frames queued in one loop tick go out in one wait-free write, with its bookkeeping.

    Mutation: ``_flush`` skips ``_written`` → no latency observation → fails.
    Mutation: ``_append`` wakes the writer instead of scheduling the flush → no fast call → fails.
    """
    fast = FakeFast(accept=True)
    metrics = NodeMetrics()
    h = Harness(OutboxLimits(), fast=fast, metrics=metrics, clock=lambda: 1001.0)
    h.outbox.live("s:1", [event(1), event(2), event(3)])
    await anyio.lowlevel.checkpoint()  # one loop pass: the call_soon callback runs
    assert fast.calls == [[event(i).encoded("json") for i in (1, 2, 3)]]
    assert h.outbox.queued_frames == 0 and h.outbox.frames_out == 3
    assert metrics.written.count == 1 and metrics.written.sum == pytest.approx(1.0)


@pytest.mark.asyncio_only(reason="the tick-batched fast write is scheduled with asyncio's loop.call_soon; trio always uses the writer task")
async def test_fast_path_refused_falls_back_to_the_writer() -> None:
    """Mutation: ``_flush`` does not wake the writer when the socket refuses → hangs → fails."""
    fast = FakeFast(accept=False)
    h = Harness(OutboxLimits(), fast=fast)
    sent: list[list[bytes]] = []

    async def send(batch: list[bytes]) -> None:
        sent.append(batch)
        h.outbox.close()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.outbox.run, send)
            await wait_all_tasks_blocked()  # the writer waits for work
            h.outbox.push(frame(0))  # the fast write is tried first, and refused
    assert fast.calls == [[frame(0)]] and sent == [[frame(0)]]


@pytest.mark.asyncio_only(reason="the tick-batched fast write is scheduled with asyncio's loop.call_soon; trio always uses the writer task")
async def test_one_callback_writes_every_outbox_of_a_tick() -> None:
    """Outboxes that got frames in one loop tick are written by one callback, each in one call, in order.

    Mutation: ``_FlushBatch.add`` schedules without checking ``_scheduled`` → 3 callbacks → fails.
    Mutation: ``_FlushBatch._run`` does not swap ``_due`` for a new list → the loop's
    batch keeps every outbox it ever wrote (a leak) → fails.
    """
    loop = asyncio.get_running_loop()
    callbacks: list[Any] = []

    def call_soon(cb: Any, *args: Any) -> Any:
        callbacks.append(cb)
        return loop.call_soon(cb, *args)

    fasts = [FakeFast(accept=True) for _ in range(3)]
    for f in fasts:
        f.call_soon = call_soon
    boxes = [Harness(OutboxLimits(), fast=f).outbox for f in fasts]
    for i in (1, 2):
        for box in boxes:
            box.live("s:1", [event(i)])
    await anyio.lowlevel.checkpoint()  # one loop pass: the callback runs
    assert len(callbacks) == 1
    assert [f.calls for f in fasts] == [[[event(1).encoded("json"), event(2).encoded("json")]]] * 3
    # The next tick schedules again, for the outboxes that got frames in it only.
    boxes[1].push(frame(9))
    await anyio.lowlevel.checkpoint()
    assert len(callbacks) == 2
    assert [len(f.calls) for f in fasts] == [1, 2, 1] and fasts[1].calls[-1] == [frame(9)]
    assert all(box.queued_frames == 0 for box in boxes)
    # The loop's batch holds no outbox once written (a closed connection's outbox must not be kept).
    assert boxes[0]._batch is not None and boxes[0]._batch._due == []



async def test_a_live_event_into_an_empty_outbox_counts_toward_the_bounds() -> None:
    """The one-event fast path of ``live`` keeps the byte count and peaks that the bounds use.

    Mutation seen caught: the fast path does not set ``_queued_bytes`` → the
    frame one byte over the bound fits → fails.
    """
    h = Harness(OutboxLimits(max_bytes=100))
    e = event(1)
    size = len(e.encoded("json"))
    h.outbox.live("s:1", [e])
    assert (h.outbox.queued_bytes, h.outbox.peak_bytes, h.outbox.peak_frames) == (size, size, 1)
    assert h.outbox.last_sent == {"s:1": (1, 1000.0)}
    h.outbox.push(frame(0, 100 - size))  # exactly at the bound
    assert not h.outbox.slow
    h.outbox.push(frame(1, 1))  # one byte over
    assert h.outbox.slow and h.slow_calls == 1


@pytest.mark.asyncio_only(reason="the fast path exists on asyncio only; trio always uses the writer task")
async def test_push_now_writes_into_an_empty_outbox_at_once_and_queues_behind_others() -> None:
    """A command's reply (``push_now``) is written at once only when nothing is
    queued or due, with the same bookkeeping as a flushed frame; otherwise it
    is queued behind what came first, and a refused write falls back to the queue.

    Mutation: ``push_now`` without the empty-queue test → the reply overtakes the
    frame queued before it → fails. Mutation: not counting ``bytes_out`` → fails.
    Mutation: not falling back to ``push`` when refused → the reply is lost → fails.
    """
    fast = FakeFast(accept=True)
    metrics = NodeMetrics()
    h = Harness(OutboxLimits(), fast=fast, metrics=metrics)
    h.outbox.push_now(frame(1))
    assert fast.calls == [[frame(1)]]  # no loop pass needed
    assert (h.outbox.queued_frames, h.outbox.frames_out, h.outbox.bytes_out, metrics.bytes_out) == (0, 1, 10, 10)
    h.outbox.push(frame(2))  # due at the end of this tick
    h.outbox.push_now(frame(3))  # must not overtake it
    assert fast.calls == [[frame(1)]]
    await anyio.lowlevel.checkpoint()
    assert fast.calls == [[frame(1)], [frame(2), frame(3)]]
    fast.accept = False
    h.outbox.push_now(frame(4))  # refused: queued (and the writer's job)
    assert h.outbox.queued_frames == 1 and h.outbox.frames_out == 3
    await anyio.lowlevel.checkpoint()  # the end-of-tick write is refused too: the writer's job now
    fast.accept = True
    calls = len(fast.calls)
    h.outbox.push_now(frame(5))  # frame 4 still waits for the writer: 5 goes behind it
    assert len(fast.calls) == calls and await h.outbox.take() == [frame(4), frame(5)]

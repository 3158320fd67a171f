"""Shared history reads (:class:`rtcore.engine.hub.SharedReads`) and the one-read resume of ``Node.subscribe``.

Tails asking for the same page at the same time share one backend read and
one list of encoded events, but a read is never shared with a tail that
registered after it was issued: its snapshot could miss events appended
between the snapshot and that registration, which the live feed did not
give the tail either.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rtcore
from rtcore.backends import open_backend
from rtcore.backends.base import ReadResult
from rtcore.backends.memory import MemoryEventLog
from rtcore.engine.hub import RECENT, EncodedEvent, Hub, SharedReads, Tail
from rtcore.engine.node import Node
from rtcore.errors import BackendError
from rtcore.protocol.frames import Position
from rtcore.protocol.streams import Delivery, Phase

pytestmark = pytest.mark.anyio

STREAM = "s:1"


class Sink:
    """An EventSink recording the offsets it got, live and history, in arrival order."""

    def __init__(self, spawn: Callable[..., Any], pace: int = 0) -> None:
        self._spawn = spawn
        self.pace = pace
        self.got: list[int] = []
        self.backlog_events: list[EncodedEvent] = []
        self.stale_streams: list[str] = []

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._spawn(fn)

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.got.extend(enc.event.offset for enc in batch)

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:
        for _ in range(self.pace):
            await anyio.lowlevel.checkpoint()
        self.got.extend(enc.event.offset for enc in batch)
        self.backlog_events.extend(batch)
        batch.clear()  # this list is the sink's own: clearing it must not empty another tail's page

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:
        pass

    def stale(self, stream: str) -> None:
        self.stale_streams.append(stream)


class GatedLog:
    """Reads of a memory log that take their snapshot at once, then wait for ``gate`` to answer."""

    def __init__(self, log: MemoryEventLog) -> None:
        self.log = log
        self.gate = anyio.Event()
        self.started = 0
        self.fail_next = 0

    async def read(self, stream: str, *, after: int, limit: int) -> ReadResult:
        page = await self.log.read(stream, after=after, limit=limit)
        self.started += 1
        await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise BackendError("read failed")
        return page


async def until(cond: Callable[[], bool]) -> None:
    """Let the other tasks run until ``cond`` holds (bounded: no wall clock involved)."""
    for _ in range(10_000):
        if cond():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("never happened")


async def publish(log: MemoryEventLog, n: int) -> None:
    for _ in range(n):
        await log.append(STREAM, "t", None, now=1.0)


def tail_on(hub: Hub, reads: SharedReads, sink: Sink, epoch: str, after: int) -> Tail:
    tail = Tail(reads.log, STREAM, Delivery(epoch, after), sink, reads=reads)
    hub.add(tail)
    return tail


async def test_a_read_under_way_is_not_joined_by_a_tail_that_registered_after_it() -> None:
    """A tail registered after a read was issued gets a read of its own, issued later.

    A's read takes its snapshot (head 2); event 3 is appended (A buffers it;
    B is not registered yet); B registers and asks for the same page. Sharing
    A's read would give B a page without 3 and an empty buffer: B would go
    live at 2 and never get 3.

    Mutation seen caught: ``SharedReads.read`` joins the running read
    (``self._open.get(key) or self._running.get(key)``) → B got [] → fails.
    """
    log = MemoryEventLog()
    await publish(log, 2)
    epoch = (await log.info(STREAM)).epoch
    hub = Hub(log)
    gated = GatedLog(log)
    reads = SharedReads(gated)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(_run_feed, hub)
        a, b = Sink(tg.start_soon), Sink(tg.start_soon)
        tg.start_soon(tail_on(hub, reads, a, epoch, 2).fill)
        await until(lambda: gated.started == 1)
        await publish(log, 1)
        tg.start_soon(tail_on(hub, reads, b, epoch, 2).fill)
        await until(lambda: (STREAM, 2, 500) in reads._open)
        gated.gate.set()
        await until(lambda: len(a.got) == len(b.got) == 1)
        tg.cancel_scope.cancel()
    assert a.got == b.got == [3]
    assert reads.issued == 2 and reads.shared == 0


async def test_tails_that_ask_while_a_read_runs_share_the_next_read_and_its_encodings() -> None:
    """B and C ask while A's read runs: one read serves both, with the same EncodedEvent objects.

    Mutation seen caught: ``SharedPage.encoded`` returns its cached list itself
    (not a slice) → B's sink clears it, C gets no events → fails.
    """
    log = MemoryEventLog()
    await publish(log, 4)
    epoch = (await log.info(STREAM)).epoch
    hub = Hub(log)
    gated = GatedLog(log)
    reads = SharedReads(gated)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(_run_feed, hub)
        a, b, c = Sink(tg.start_soon), Sink(tg.start_soon), Sink(tg.start_soon)
        tg.start_soon(tail_on(hub, reads, a, epoch, 1).fill)
        await until(lambda: gated.started == 1)
        tg.start_soon(tail_on(hub, reads, b, epoch, 1).fill)
        tg.start_soon(tail_on(hub, reads, c, epoch, 1).fill)
        await until(lambda: (STREAM, 1, 500) in reads._open)
        await anyio.lowlevel.checkpoint()
        gated.gate.set()
        await until(lambda: len(a.got) == len(b.got) == len(c.got) == 3)
        tg.cancel_scope.cancel()
    assert a.got == b.got == c.got == [2, 3, 4]
    assert reads.issued == 2 and reads.shared == 1
    assert all(x is y for x, y in zip(b.backlog_events, c.backlog_events, strict=True))
    assert not any(x is y for x, y in zip(a.backlog_events, b.backlog_events, strict=True))


@pytest.mark.parametrize("how", ["fails", "cancelled"])
async def test_the_waiters_of_a_failed_or_cancelled_read_ask_again(how: str) -> None:
    """When the read the others wait for fails (or its issuer is cancelled), they read again and all get the page.

    Mutation seen caught: ``SharedReads.read`` returns ``flight.page`` even
    when it is None → the waiters' fill raises AttributeError → fails.
    """
    log = MemoryEventLog()
    await publish(log, 3)
    gated = GatedLog(log)
    reads = SharedReads(gated)  # type: ignore[arg-type]
    got: list[list[int]] = []
    errors: list[BaseException] = []

    async def reader(scope: anyio.CancelScope | None = None) -> None:
        try:
            if scope is None:
                page = await reads.read(STREAM, after=0, limit=500)
            else:
                with scope:
                    page = await reads.read(STREAM, after=0, limit=500)
                return
        except BackendError as exc:
            errors.append(exc)
            return
        got.append([e.offset for e in page.result.events])

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)  # the running read
        await until(lambda: gated.started == 1)
        issuer = anyio.CancelScope()
        tg.start_soon(reader, issuer if how == "cancelled" else None)  # issues the next read
        await until(lambda: (STREAM, 0, 500) in reads._open)
        for _ in range(3):
            tg.start_soon(reader)  # wait for the next read
        await anyio.lowlevel.checkpoint()
        if how == "cancelled":
            next_read = reads._open[(STREAM, 0, 500)]
            issuer.cancel()
            await until(lambda: next_read.finished)  # given up; the waiters ask again
        else:
            gated.fail_next = 2  # the running read and the next one fail
        gated.gate.set()
        await until(lambda: len(got) + len(errors) == (4 if how == "cancelled" else 5))
    if how == "cancelled":
        assert got == [[1, 2, 3]] * 4 and not errors
    else:
        # Each caller saw its own read fail or got a page read after it asked.
        assert len(errors) == 2 and got == [[1, 2, 3]] * 3


async def _run_feed(hub: Hub, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await hub.feed.run()


async def test_a_resume_reads_once_and_sends_subbed_with_its_first_page() -> None:
    """``Node.subscribe`` with ``since`` makes one backend read: the plan's shape and the replay's first page.

    Mutation seen caught: ``Tail.fill`` ignores the prefetched page → two reads → fails.
    """
    backend = await open_backend("memory://")
    reads: list[int] = []
    plain_read = backend.events.read

    async def counted(stream: str, *, after: int, limit: int) -> ReadResult:
        reads.append(after)
        return await plain_read(stream, after=after, limit=limit)

    backend.events.read = counted  # type: ignore[method-assign]
    async with Node(rtcore.App("t"), backend) as node, anyio.create_task_group() as tg:
        for _ in range(3):
            await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        sink = Sink(tg.start_soon)
        sub = await node.subscribe(None, STREAM, Position(epoch, 1), sink)
        assert (sub.epoch, sub.offset, sub.recovered, sub.snap) == (epoch, 3, True, None)
        await sub.tail.fill()
        assert sink.got == [2, 3] and reads == [1]
        assert sub.tail.delivery.phase is Phase.LIVE
        await node.publish(STREAM, "t")
        assert sink.got == [2, 3, 4]
        # Not a plain resume (offset beyond the head): planned from that read, recovered=False.
        other = Sink(tg.start_soon)
        sub2 = await node.subscribe(None, STREAM, Position(epoch, 9), other)
        assert (sub2.offset, sub2.recovered) == (4, False)
        await sub2.tail.fill()
        await node.publish(STREAM, "t")
        assert other.got == [5] and node.hub.subscribers(STREAM) == 2
        tg.cancel_scope.cancel()
    await backend.aclose()


async def test_a_resume_whose_read_fails_leaves_no_tail_behind() -> None:
    """The tail registered before the read is removed when the read fails (the caller gets the error).

    Mutation seen caught: no ``hub.remove`` on the failure path → a tail stays registered → fails.
    """
    backend = await open_backend("memory://")

    async def failing(stream: str, *, after: int, limit: int) -> ReadResult:
        raise BackendError("down")

    async with Node(rtcore.App("t"), backend) as node:
        await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        backend.events.read = failing  # type: ignore[method-assign]
        with pytest.raises(BackendError):
            await node.subscribe(None, STREAM, Position(epoch, 0), Sink(node.spawn))
        assert node.hub.subscribers(STREAM) == 0
    await backend.aclose()


# --- property: many resuming tails, concurrent appends, shared reads --------------------------

program = st.lists(
    st.one_of(
        st.tuples(st.just("sub"), st.integers(0, 6), st.integers(0, 3)),  # since (capped at the head), pacing
        st.tuples(st.just("pub"), st.integers(1, 3)),
        st.tuples(st.just("yield"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=30,
)


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@given(ops=program, delays=st.lists(st.integers(0, 4), min_size=1, max_size=20))
def test_every_resuming_tail_gets_exactly_its_missing_events(loop: str, ops: list[tuple[Any, ...]], delays: list[int]) -> None:
    """N subscriptions resume (``Node.subscribe`` with ``since``, then ``fill``) while events are appended and
    reads take their snapshot a random number of steps before they answer: each gets exactly the events
    after its ``since``, in order, none twice, none missing.

    Mutations seen caught: ``SharedReads.read`` joins the running read (an
    event appended between that read's snapshot and a tail's registration is
    lost); ``SharedPage.encoded`` hands out its cached list (a sink clearing
    its batch empties another's).
    """
    anyio.run(_property, ops, delays, backend=loop)


async def _property(ops: list[tuple[Any, ...]], delays: list[int]) -> None:
    backend = await open_backend("memory://")
    plain_read = backend.events.read
    calls = 0

    async def slow(stream: str, *, after: int, limit: int) -> ReadResult:
        nonlocal calls
        page = await plain_read(stream, after=after, limit=limit)  # the snapshot
        calls += 1
        for _ in range(delays[calls % len(delays)]):
            await anyio.lowlevel.checkpoint()
        return page

    backend.events.read = slow  # type: ignore[method-assign]
    subs: list[tuple[int, Sink]] = []
    async with Node(rtcore.App("t"), backend) as node, anyio.create_task_group() as tg:
        await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        head = 1

        async def resume(since: int, sink: Sink) -> None:
            sub = await node.subscribe(None, STREAM, Position(epoch, since), sink)
            assert sub.recovered
            await sub.tail.fill()

        for op in ops:
            if op[0] == "sub":
                since, sink = min(op[1], head), Sink(tg.start_soon, pace=op[2])
                subs.append((since, sink))
                tg.start_soon(resume, since, sink)
            elif op[0] == "pub":
                for _ in range(op[1]):
                    await node.publish(STREAM, "t")
                head += op[1]
            else:
                for _ in range(op[1]):
                    await anyio.lowlevel.checkpoint()
        await until(lambda: all(len(s.got) >= head - since for since, s in subs))
        for _ in range(20):  # let anything extra (a duplicate) arrive
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    await backend.aclose()
    for since, sink in subs:
        assert sink.got == list(range(since + 1, head + 1)), (since, sink.got)
        assert not sink.stale_streams


# --- resume at the head the hub already knows: no read -----------------------------------------


def _counting(backend: Any) -> list[int]:
    reads: list[int] = []
    plain_read = backend.events.read

    async def counted(stream: str, *, after: int, limit: int) -> ReadResult:
        reads.append(after)
        return await plain_read(stream, after=after, limit=limit)

    backend.events.read = counted
    return reads


async def test_a_resume_the_hub_can_serve_reads_nothing_and_misses_nothing() -> None:
    """A client up to date or a few events behind resumes without a backend read and still gets every event.

    While a stream has tails, the hub knows its head from the feed and keeps
    its last events; a resume within them (most of a reconnect storm) needs
    no history read.

    Mutations seen caught: ``Node.subscribe`` without the ``Hub.recent`` fast
    path → the resumes read → ``reads`` is not empty → fails; ``Hub.recent``
    slicing one event too few (``len - (head - after) + 1``) → ``behind``
    misses event 3 → fails.
    """
    backend = await open_backend("memory://")
    async with Node(rtcore.App("t"), backend) as node, anyio.create_task_group() as tg:
        for _ in range(2):
            await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        first = Sink(tg.start_soon)
        sub = await node.subscribe(None, STREAM, Position(epoch, 0), first)
        await sub.tail.fill()
        await node.publish(STREAM, "t")  # fed to the live tail: the hub knows head 3
        assert node.hub.known_head(STREAM) == (epoch, 3)
        reads = _counting(backend)
        again = Sink(tg.start_soon)
        sub2 = await node.subscribe(None, STREAM, Position(epoch, 3), again)
        assert (sub2.epoch, sub2.offset, sub2.recovered, sub2.snap) == (epoch, 3, True, None)
        await node.publish(STREAM, "t")  # before fill: buffered, then sent when it goes live
        await sub2.tail.fill()
        assert sub2.tail.delivery.phase is Phase.LIVE
        await node.publish(STREAM, "t")
        assert reads == [] and again.got == [4, 5] and first.got == [1, 2, 3, 4, 5]
        # A few events behind: the hub fed 3, 4 and 5 and kept them: replayed from memory.
        behind = Sink(tg.start_soon)
        sub3 = await node.subscribe(None, STREAM, Position(epoch, 2), behind)
        assert (sub3.offset, sub3.recovered) == (5, True)
        await sub3.tail.fill()
        assert reads == [] and behind.got == [3, 4, 5]
        # The very objects the live tails got (their encodings are shared, not redone).
        kept = list(node.hub._recent[STREAM].events)
        assert len(behind.backlog_events) == 3 and all(a is b for a, b in zip(behind.backlog_events, kept, strict=True))
        # Before what the hub kept (it learnt head 2 from a read): a normal resume, one read.
        further = Sink(tg.start_soon)
        sub4 = await node.subscribe(None, STREAM, Position(epoch, 1), further)
        await sub4.tail.fill()
        assert reads == [1] and further.got == [2, 3, 4, 5]
        tg.cancel_scope.cancel()
    await backend.aclose()


async def test_the_known_head_is_forgotten_when_the_stream_is_unwatched() -> None:
    """Once a stream's last tail leaves, events appended meanwhile never reach the hub: its head is unknown.

    Mutation seen caught: ``Hub.remove`` keeps ``_heads`` of an unwatched
    stream → the resume at the old head is answered from it, no read,
    events 3 and 4 are never sent → fails.
    """
    backend = await open_backend("memory://")
    async with Node(rtcore.App("t"), backend) as node, anyio.create_task_group() as tg:
        await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        sink = Sink(tg.start_soon)
        sub = await node.subscribe(None, STREAM, Position(epoch, 0), sink)
        await sub.tail.fill()
        await node.publish(STREAM, "t")
        assert node.hub.known_head(STREAM) == (epoch, 2)
        node.hub.remove(sub.tail)
        assert node.hub.known_head(STREAM) is None
        for _ in range(2):
            await node.publish(STREAM, "t")
        again = Sink(tg.start_soon)
        sub2 = await node.subscribe(None, STREAM, Position(epoch, 2), again)
        assert (sub2.offset, sub2.recovered) == (4, True)
        await sub2.tail.fill()
        assert again.got == [3, 4]
        tg.cancel_scope.cancel()
    await backend.aclose()


async def test_an_event_of_another_epoch_makes_the_head_unknown() -> None:
    """The feed brings an event of a new epoch (the stream's history was replaced): no head is assumed.

    Mutation seen caught: ``Hub.dispatch`` keeps the old ``(epoch, head)``
    on an epoch mismatch → ``known_head`` still names the old epoch → fails.
    """
    log = MemoryEventLog()
    hub = Hub(log)
    tail = Tail(log, STREAM, Delivery("e1", 0), Sink(lambda fn: None))
    hub.add(tail)
    hub.dispatch(rtcore.Event(STREAM, "e1", 1, "t", None, 0.0))
    hub.dispatch(rtcore.Event(STREAM, "e1", 2, "t", None, 0.0))
    assert hub.known_head(STREAM) == ("e1", 2)
    hub.note_head(STREAM, "e1", 1)  # an older read: the feed knows better
    assert hub.known_head(STREAM) == ("e1", 2)
    hub.dispatch(rtcore.Event(STREAM, "e2", 1, "t", None, 0.0))
    assert hub.known_head(STREAM) is None
    hub.note_head(STREAM, "e2", 1)  # a read settles it
    assert hub.known_head(STREAM) == ("e2", 1)
    hub.note_head(STREAM, "e1", 7)
    assert hub.known_head(STREAM) is None
    hub.remove(tail)
    hub.note_head(STREAM, "e2", 1)  # unwatched: nothing learnt
    assert hub.known_head(STREAM) is None


async def test_the_events_the_hub_keeps_have_no_holes() -> None:
    """After a hole in what the feed delivered, only events after it are served from memory.

    Mutation seen caught: ``Hub.dispatch`` appends an event after a hole
    without dropping the older ones → ``recent(after=2)`` returns 1, 2, 5
    as if 3 and 4 did not exist → fails.
    """
    log = MemoryEventLog()
    hub = Hub(log)
    hub.add(Tail(log, STREAM, Delivery("e1", 0), Sink(lambda fn: None)))
    for off in (1, 2, 5):
        hub.dispatch(rtcore.Event(STREAM, "e1", off, "t", None, 0.0))
    assert hub.known_head(STREAM) == ("e1", 5)
    assert hub.recent(STREAM, "e1", 2) is None and hub.recent(STREAM, "e2", 4) is None
    page = hub.recent(STREAM, "e1", 4)
    assert page is not None and [e.offset for e in page.result.events] == [5]
    assert (page.result.head, page.result.first) == (5, 5)
    hub.note_head(STREAM, "e1", 7)  # a read saw 6 and 7, not fed yet: nothing kept
    page = hub.recent(STREAM, "e1", 7)
    assert page is not None and page.result.events == [] and hub.recent(STREAM, "e1", 6) is None
    for off in range(8, 8 + RECENT + 2):
        hub.dispatch(rtcore.Event(STREAM, "e1", off, "t", None, 0.0))
    head = 7 + RECENT + 2
    page = hub.recent(STREAM, "e1", head - RECENT)
    assert page is not None and [e.offset for e in page.result.events] == list(range(head - RECENT + 1, head + 1))
    assert hub.recent(STREAM, "e1", head - RECENT - 1) is None


async def test_a_resume_behind_on_a_stream_with_retention_asks_the_backend() -> None:
    """Events the hub still holds may be trimmed in the backend: a resume behind on such a stream reads.

    Up to date it still needs no read (nothing to replay, nothing trimmed
    can matter).

    Mutation seen caught: ``Node.subscribe`` serving ``Hub.recent`` without
    the retention check → the resume after the trim is ``recovered=True``
    from memory → fails (``tests/test_property_delivery.py``'s trimmed-history
    walk fails too).
    """
    app = rtcore.App("t")
    app.retention("s:*", max_events=2)
    backend = await open_backend("memory://")
    async with Node(app, backend) as node, anyio.create_task_group() as tg:
        await node.publish(STREAM, "t")
        epoch = (await backend.events.info(STREAM)).epoch
        live = Sink(tg.start_soon)
        sub = await node.subscribe(None, STREAM, Position(epoch, 0), live)
        await sub.tail.fill()
        for _ in range(4):
            await node.publish(STREAM, "t")
        assert node.hub.known_head(STREAM) == (epoch, 5) and node.hub.recent(STREAM, epoch, 1) is not None
        reads = _counting(backend)
        behind = Sink(tg.start_soon)
        sub2 = await node.subscribe(None, STREAM, Position(epoch, 1), behind)
        assert reads == [1] and (sub2.offset, sub2.recovered) == (5, False)
        sub3 = await node.subscribe(None, STREAM, Position(epoch, 5), Sink(tg.start_soon))
        assert reads == [1] and (sub3.offset, sub3.recovered) == (5, True)
        tg.cancel_scope.cancel()
    await backend.aclose()

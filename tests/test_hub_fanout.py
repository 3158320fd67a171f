"""The hub's fan-out: a live tail's next event goes straight to its sink, anything else through Delivery."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from rtcore.backends.memory import MemoryEventLog
from rtcore.engine.hub import EncodedEvent, Hub, Tail
from rtcore.protocol.streams import Delivery, Phase
from rtcore.protocol.types import Event


class Sink:
    """An EventSink recording what it got."""

    def __init__(self) -> None:
        self.live_batches: list[list[EncodedEvent]] = []
        self.spawned: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self.stale_streams: list[str] = []

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self.spawned.append(fn)

    def live(self, stream: str, batch: list[EncodedEvent]) -> None:
        self.live_batches.append(batch)

    async def backlog(self, stream: str, batch: list[EncodedEvent]) -> None:  # pragma: no cover - not reached
        raise AssertionError("no history here")

    def sync(self, stream: str, offset: int, frames: dict[str, bytes]) -> None:  # pragma: no cover - not reached
        pass

    def stale(self, stream: str) -> None:
        self.stale_streams.append(stream)


def live_tail(hub: Hub, last: int, epoch: str = "e1") -> tuple[Tail, Sink]:
    sink = Sink()
    delivery = Delivery(epoch, last)
    delivery.phase = Phase.LIVE
    tail = Tail(MemoryEventLog(), "s:1", delivery, sink)
    hub.add(tail)
    return tail, sink


def ev(offset: int, epoch: str = "e1") -> Event:
    return Event("s:1", epoch, offset, "t", {"i": offset}, 1000.0)


def offsets(sink: Sink) -> list[int]:
    return [enc.event.offset for batch in sink.live_batches for enc in batch]


def test_live_tails_get_in_order_events_once_and_share_one_encoding() -> None:
    """Every live tail gets the next event, each one once, with one EncodedEvent for all of them.

    Mutation: the fast path in ``Tail.live`` does not advance ``delivery.last``
    → the duplicate of 6 is delivered again → fails.
    """
    hub = Hub(MemoryEventLog())
    (_, a), (_, b) = live_tail(hub, 5), live_tail(hub, 5)
    for event in (ev(6), ev(6), ev(7)):
        hub.dispatch(event)
    assert offsets(a) == offsets(b) == [6, 7]
    assert a.live_batches[0][0] is b.live_batches[0][0]


def test_a_gap_is_filled_not_skipped() -> None:
    """An event past the next offset is held back and a history read is scheduled.

    Mutation: the fast path accepts any offset above ``last`` → 8 is delivered before 6 and 7 → fails.
    """
    hub = Hub(MemoryEventLog())
    tail, sink = live_tail(hub, 5)
    hub.dispatch(ev(8))
    assert offsets(sink) == [] and tail.delivery.phase is Phase.CATCHUP and len(sink.spawned) == 1


def test_an_event_of_another_epoch_makes_the_tail_stale() -> None:
    """The next offset of a different history is not the next event.

    Mutation: the fast path skips the epoch check → offset 6 of e2 is delivered → fails.
    """
    hub = Hub(MemoryEventLog())
    tail, sink = live_tail(hub, 5)
    hub.dispatch(ev(6, epoch="e2"))
    assert offsets(sink) == [] and sink.stale_streams == ["s:1"] and tail.closed


def test_a_tail_in_catch_up_buffers_live_events() -> None:
    """Mutation: the fast path ignores the phase → a tail reading history gets 6 live, out of band → fails."""
    hub = Hub(MemoryEventLog())
    tail, sink = live_tail(hub, 5)
    tail.delivery.phase = Phase.CATCHUP
    hub.dispatch(ev(6))
    assert offsets(sink) == []

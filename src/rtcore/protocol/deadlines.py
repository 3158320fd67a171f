"""Deadlines of many objects in one heap, for one task to run (sans-IO: times are passed in).

The WebSocket keepalive (:class:`rtcore.transport.websocket.Heartbeats`) and
the session deadlines (:class:`rtcore.server.gateway.SessionTimers`) each run
one task per server that waits for the earliest deadline, instead of one task
per connection: with thousands of connections a task each costs memory and
wake-ups that grow with the number open.

Each object keeps its current deadline in one attribute, named when the heap
is made (e.g. ``_hb_at``), and an entry of the heap counts only while it
equals that attribute. Moving a deadline pushes a new entry and leaves the
old one stale. Stale entries are not searched for one by one: when they
outnumber the live ones the heap is rebuilt without them (O(n) once per n/2
of them), so it holds at most about twice the scheduled objects and does not
keep an ended object alive until its old deadline would have come.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, TypeVar

__all__ = ["DeadlineHeap"]

T = TypeVar("T")

#: Stale entries tolerated before a rebuild is considered at all.
_MIN_STALE = 32


class DeadlineHeap(Generic[T]):
    """Objects ordered by their next deadline.

    Args:
        attr: The attribute of each object that holds its current deadline
            (``None``: not scheduled). The heap owns it: objects only read it.
    """

    __slots__ = ("_attr", "_heap", "_seq", "_stale")

    def __init__(self, attr: str) -> None:
        self._attr = attr
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._stale = 0  # entries that no longer count

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def next(self) -> float:
        """The earliest entry's time (``math.inf`` when empty; it may be a stale one's)."""
        return self._heap[0][0] if self._heap else math.inf

    def schedule(self, item: T, when: float) -> None:
        """(Re)schedule ``item`` at ``when``; an earlier deadline of it no longer counts."""
        if getattr(item, self._attr) is not None:
            self._superseded()
        setattr(item, self._attr, when)
        heapq.heappush(self._heap, (when, next(self._seq), item))

    def discard(self, item: T) -> None:
        """Unschedule ``item`` (it ended); its entry is dropped at the next rebuild."""
        if getattr(item, self._attr) is not None:
            setattr(item, self._attr, None)
            self._superseded()

    def pop_due(self, now: float) -> T | None:
        """The next object whose deadline is at or before ``now`` (unscheduled first), or ``None``.

        Called in a loop, one object at a time, so that handling one may
        schedule it (or others) again.
        """
        heap, attr = self._heap, self._attr
        while heap and heap[0][0] <= now:
            when, _, item = heapq.heappop(heap)
            if getattr(item, attr) == when:
                setattr(item, attr, None)
                return item
            if self._stale:
                self._stale -= 1
        return None

    def _superseded(self) -> None:
        self._stale += 1
        heap, attr = self._heap, self._attr
        if self._stale > _MIN_STALE and self._stale * 2 > len(heap):
            heap[:] = [entry for entry in heap if getattr(entry[2], attr) == entry[0]]
            heapq.heapify(heap)
            self._stale = 0

"""``rtcore.protocol.deadlines.DeadlineHeap`` against a model (Hypothesis).

The keepalive (``Heartbeats``) and session timers (``SessionTimers``) run on
it; their own tests cover the wiring, this one the heap's rules for any mix
of schedules, reschedules, discards and pops.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rtcore.protocol.deadlines import DeadlineHeap


class Item:
    __slots__ = ("at", "name")

    def __init__(self, name: int) -> None:
        self.name = name
        self.at: float | None = None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 9), st.integers(0, 100)),
        st.tuples(st.just("discard"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("pop"), st.just(0), st.integers(0, 100)),
    ),
    max_size=300,
)


@given(ops)
def test_due_items_pop_once_at_their_current_deadline_in_order(steps: list[tuple[str, int, int]]) -> None:
    """Mutations seen caught: ``pop_due`` not checking the entry against the
    item's current deadline (a rescheduled item pops at its old time) → fails;
    ``discard`` not clearing the attribute → a discarded item pops → fails."""
    items = [Item(i) for i in range(10)]
    heap: DeadlineHeap[Item] = DeadlineHeap("at")
    model: dict[int, int] = {}  # item -> its current deadline
    for op, i, t in steps:
        if op == "schedule":
            heap.schedule(items[i], t)
            model[i] = t
        elif op == "discard":
            heap.discard(items[i])
            model.pop(i, None)
        else:
            due = sorted((when, name) for name, when in model.items() if when <= t)
            popped = []
            while (item := heap.pop_due(t)) is not None:
                assert item.at is None
                popped.append((model.pop(item.name), item.name))  # KeyError: it was not scheduled
            assert [when for when, _ in popped] == sorted(when for when, _ in popped)
            assert sorted(popped) == due
        assert all(items[i].at == when for i, when in model.items())
        assert len(heap) <= 2 * len(model) + 33


def test_rebuild_drops_stale_entries_and_keeps_live_ones() -> None:
    """Many reschedules trigger rebuilds: the heap stays near its live size and
    every item still pops once, at its last deadline.

    Mutation seen caught: the rebuild keeping the stale entries instead of the
    live ones (``!=`` for ``==``) → live items never pop → fails.
    """
    items = [Item(i) for i in range(10)]
    heap: DeadlineHeap[Item] = DeadlineHeap("at")
    for rnd in range(20):
        for item in items:
            heap.schedule(item, 1000 - rnd * 10 - item.name)
    assert len(heap) <= 2 * len(items) + 33
    popped = []
    while (item := heap.pop_due(10_000)) is not None:
        popped.append(item.name)
    assert popped == list(range(9, -1, -1))  # 809 .. 800, earliest first

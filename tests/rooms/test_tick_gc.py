"""The cyclic collector and a room's tick steps (``_hold_collector`` in rtcore/rooms/runtime.py).

A young collection that lands inside a tick step holds the tick's patch back
from every subscriber; the rooms keep the collector off during a tick step
and enable it again once the loop ran what the step woke, so the collection
that was due runs right after the step instead.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
from rtcore import rooms
from rtcore.testing import serve

pytestmark = pytest.mark.anyio


class Ticks(msgspec.Struct):
    ticks: int = 0


@pytest.fixture
def eager_collector() -> Iterator[list[str]]:
    """A collector that starts a young collection at almost every allocation; yields the log of starts."""
    log: list[str] = []
    saved = gc.get_threshold()
    was = gc.isenabled()

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            log.append(phase)

    gc.set_threshold(1, 10, 10)
    gc.enable()
    gc.callbacks.append(on_gc)
    try:
        yield log
    finally:
        gc.callbacks.remove(on_gc)
        gc.set_threshold(*saved)
        if not was:
            gc.disable()


def ticking_app(log: list[str], inside: list[int], fail: list[bool]) -> tuple[rtcore.App, rooms.Rooms]:
    """A 50 Hz room whose ``on_tick`` allocates and notes how many collections started while it ran."""
    app = rtcore.App("tick-gc")
    reg = rooms.install(app)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @reg.define("ticking")
    class Ticking(rooms.Room[Ticks]):
        tick_rate = 50

        async def on_tick(self, dt: float) -> None:
            before = len(log)
            junk = [[i] for i in range(200)]  # allocations: with threshold 1, each may start a collection
            self.state.ticks += 1
            inside.append(len(log) - before)
            del junk
            if fail and fail[0]:
                raise RuntimeError("tick failed")

    return app, reg


async def test_no_collection_starts_inside_a_tick_step_and_the_collector_comes_back(eager_collector: list[str]) -> None:
    """With a collector due at every allocation, no collection starts inside a tick step,
    collections run between the steps, and the collector is enabled again after the
    steps, also after a tick that raised.

    Mutation seen caught: drop ``_hold_collector()`` around the tick step in
    ``_Actor._fire_due`` → collections start inside ``on_tick`` → fails. Mutation seen
    caught: ``_release_collector`` that never enables the collector again (drop the
    ``call_soon``/``_enable_collector``) → ``gc.isenabled()`` is False after the ticks →
    fails.
    """
    inside: list[int] = []
    fail: list[bool] = [False]
    app, _ = ticking_app(eager_collector, inside, fail)
    async with serve(app) as node:
        made = await node.dispatch(rtcore.Principal("a"), "room.create", {"type": "ticking"})
        assert made.ok, made
        with anyio.fail_after(10):
            while len(inside) < 5:
                await anyio.sleep(0.01)
            fail[0] = True
            n = len(inside)
            while len(inside) < n + 3:
                await anyio.sleep(0.01)
        assert inside and not any(inside), inside
        between = len(eager_collector)
        await anyio.sleep(0.05)
        [[k] for k in range(100)]  # allocations: collections start again
    assert gc.isenabled()
    assert len(eager_collector) > between > 0


async def test_an_app_that_disabled_the_collector_keeps_it_disabled(eager_collector: list[str]) -> None:
    """The rooms enable again only a collector they disabled themselves.

    Mutation seen caught: ``_hold_collector`` that takes ownership whatever
    ``gc.isenabled()`` says (``owned = True`` unconditionally) → the collector is
    enabled after the ticks → fails.
    """
    inside: list[int] = []
    app, _ = ticking_app(eager_collector, inside, [])
    gc.disable()
    async with serve(app) as node:
        made = await node.dispatch(rtcore.Principal("a"), "room.create", {"type": "ticking"})
        assert made.ok, made
        with anyio.fail_after(10):
            while len(inside) < 5:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert not gc.isenabled()
    gc.enable()


async def test_a_loop_that_stopped_before_enabling_the_collector_does_not_leave_it_off(
    eager_collector: list[str],
) -> None:
    """If the event loop that was to enable the collector again stopped before running
    that callback, the next tick step (on another loop, or on trio) enables it.

    Mutation seen caught: drop the check of ``_Collector.pending``'s loop in
    ``_hold_collector`` → the stale pending callback keeps every later release from
    enabling the collector → ``gc.isenabled()`` is False after the ticks → fails.
    """
    import asyncio

    from rtcore.rooms import runtime

    gone = asyncio.new_event_loop()
    gone.close()
    gc.disable()
    runtime._Collector.owned = True
    runtime._Collector.pending = gone
    try:
        inside: list[int] = []
        app, _ = ticking_app(eager_collector, inside, [])
        async with serve(app) as node:
            made = await node.dispatch(rtcore.Principal("a"), "room.create", {"type": "ticking"})
            assert made.ok, made
            with anyio.fail_after(10):
                while len(inside) < 3:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            assert gc.isenabled()
    finally:
        runtime._Collector.owned = False
        runtime._Collector.pending = None


async def test_tick_steps_that_overlap_without_end_do_not_starve_the_collector(eager_collector: list[str]) -> None:
    """While one room's tick step waits (on its backend, say) and young collections
    fall overdue, the next tick step to start gives the collector back instead of
    holding it off again: overlapping steps (many rooms on ``sqlite://``) must not
    keep it off for good.

    Mutation seen caught: drop the ``_OVERDUE`` check in ``_hold_collector`` → the
    collector stays disabled through the second step → fails.
    """
    from rtcore.rooms import runtime

    runtime._hold_collector()  # a step in progress that waits
    try:
        assert not gc.isenabled()
        junk = [[i] for i in range(100)]  # young allocations pile up: overdue
        assert gc.get_count()[0] > runtime._OVERDUE * gc.get_threshold()[0]
        runtime._hold_collector()  # another room's step starts meanwhile
        try:
            assert gc.isenabled()
            started = len(eager_collector)
            [[k] for k in range(10)]
            assert len(eager_collector) > started  # collections run again
        finally:
            runtime._release_collector()
        del junk
    finally:
        runtime._release_collector()
    await anyio.sleep(0.01)
    assert gc.isenabled()
    assert not runtime._Collector.owned and runtime._Collector.depth == 0

"""The SignalBus contract (``Backend.signals``), run on every engine.

Two feeds on one backend stand for two nodes. Every running feed gets every
message once, bytes unchanged, in publish order; a feed that is not running
when a message is published never gets it (nothing is stored).
"""

from __future__ import annotations

import anyio
import pytest

from rtcore.backends import Backend

pytestmark = pytest.mark.anyio


class Received:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self._changed = anyio.Event()

    def __call__(self, message: bytes) -> None:
        self.items.append(message)
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, n: int) -> list[bytes]:
        with anyio.fail_after(10):
            while len(self.items) < n:
                await self._changed.wait()
        return self.items


async def test_every_running_feed_gets_each_message_once_in_order(backend_factory) -> None:
    """Mutation seen caught: ``LocalSignalBus.publish`` delivers to the first feed only →
    the second feed waits in vain → fails."""
    async with backend_factory() as b:
        b: Backend
        one, two = Received(), Received()
        messages = [b"a", b"", bytes(range(256)), b"\x00" * 3000]
        async with anyio.create_task_group() as tg:
            await tg.start(b.signals.listen(one).run)
            await tg.start(b.signals.listen(two).run)
            for m in messages:
                await b.signals.publish(m)
            await b.signals.publish(b"end")
            assert await one.until(5) == [*messages, b"end"]
            assert await two.until(5) == [*messages, b"end"]
            tg.cancel_scope.cancel()


async def test_a_feed_that_is_not_running_misses_what_is_published(backend_factory) -> None:
    """Published with no feed running, then a feed starts: it gets only what comes after
    (the marker is its first message). Mutation seen caught: ``LocalSignalBus`` keeps
    messages published while no feed runs and hands them to the next feed → fails."""
    async with backend_factory() as b:
        b: Backend
        await b.signals.publish(b"lost")
        late = Received()
        async with anyio.create_task_group() as tg:
            await tg.start(b.signals.listen(late).run)
            await b.signals.publish(b"marker")
            assert await late.until(1) == [b"marker"]
            tg.cancel_scope.cancel()

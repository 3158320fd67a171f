"""The consumer-group contract (``backend.groups``), run on memory, sqlite and redis.

Driven only through :class:`rtcore.backends.base.GroupLog`. Redis measures
idle time with its own clock, so the claim test really waits past the idle
timeout (a short one) instead of passing a later ``now``; the other engines
get both, which keeps one test for all three.
"""

from __future__ import annotations

import time

import anyio
import pytest

from rtcore.backends import Backend
from rtcore.backends.base import GroupLog, GroupMessage

pytestmark = pytest.mark.anyio

IDLE = 0.3  # seconds; the claim test waits this long for real


def _groups(b: Backend) -> GroupLog:
    assert b.groups is not None
    assert isinstance(b.groups, GroupLog)
    return b.groups


async def _publish(b: Backend, stream: str, n: int) -> None:
    for i in range(n):
        await b.events.append(stream, "e", {"i": i}, now=time.time())


async def _drain(g: GroupLog, group: str, consumer: str, *, count: int = 100) -> list[GroupMessage]:
    out: list[GroupMessage] = []
    while True:
        got = await g.read(group, consumer, now=time.time(), count=count, block=0)
        if not got:
            return out
        out += got


def _positions(msgs: list[GroupMessage]) -> list[tuple[str, int]]:
    return [(m.event.stream, m.event.offset) for m in msgs]


async def test_a_new_group_starts_after_the_newest_event(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await _publish(b, "room:1", 3)
        await g.create("audit")
        assert await _drain(g, "audit", "n1") == []
        await _publish(b, "room:1", 2)
        msgs = await _drain(g, "audit", "n1")
        assert _positions(msgs) == [("room:1", 4), ("room:1", 5)]
        assert [m.event.data for m in msgs] == [{"i": 0}, {"i": 1}]
        assert all(m.deliveries == 1 for m in msgs)


async def test_one_member_gets_each_event_once_in_global_order(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await g.create("audit")
        for i in range(6):
            await b.events.append(f"room:{i % 2}", "e", i, now=time.time())
        msgs = await _drain(g, "audit", "n1", count=4)
        assert [m.event.data for m in msgs] == list(range(6))
        await g.ack("audit", [m.id for m in msgs])
        assert await _drain(g, "audit", "n1") == []
        # a second group is independent of the first
        await g.create("other")
        await _publish(b, "room:9", 1)
        assert _positions(await _drain(g, "other", "n1")) == [("room:9", 1)]
        assert _positions(await _drain(g, "audit", "n1")) == [("room:9", 1)]


async def test_two_members_split_the_events_without_overlap(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await g.create("audit")
        await _publish(b, "room:1", 20)
        seen: dict[str, list[tuple[str, int]]] = {"a": [], "b": []}
        while True:
            a = await g.read("audit", "a", now=time.time(), count=3, block=0)
            bb = await g.read("audit", "b", now=time.time(), count=3, block=0)
            seen["a"] += _positions(a)
            seen["b"] += _positions(bb)
            await g.ack("audit", [m.id for m in a + bb])
            if not a and not bb:
                break
        assert seen["a"] and seen["b"]
        assert not set(seen["a"]) & set(seen["b"])
        assert sorted(seen["a"] + seen["b"]) == [("room:1", i) for i in range(1, 21)]


async def test_read_blocks_until_an_event_arrives(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await g.create("audit")
        got: list[GroupMessage] = []

        async def reader() -> None:
            got.extend(await g.read("audit", "n1", now=time.time(), count=10, block=5.0))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.1)
                await _publish(b, "room:1", 1)
        assert _positions(got) == [("room:1", 1)]
        assert await g.read("audit", "n1", now=time.time(), count=10, block=0.05) == []


async def test_unacked_events_of_a_dead_member_are_claimed_after_idle(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await g.create("audit")
        await _publish(b, "room:1", 5)
        t0 = time.time()
        held = await g.read("audit", "dead", now=t0, count=3, block=0)
        await g.ack("audit", [held[0].id])  # it finished one, then died holding two
        # not idle long enough yet: nothing to claim
        assert await g.claim("audit", "alive", min_idle=60, now=t0 + 1, count=10) == []
        await anyio.sleep(IDLE + 0.1)
        claimed = await g.claim("audit", "alive", min_idle=IDLE, now=t0 + IDLE + 0.1, count=10)
        assert _positions(claimed) == [("room:1", 2), ("room:1", 3)]
        assert [m.deliveries for m in claimed] == [2, 2]
        # claimed once: they are not idle any more
        assert await g.claim("audit", "other", min_idle=IDLE, now=t0 + IDLE + 0.1, count=10) == []
        await g.ack("audit", [m.id for m in claimed])
        # the events nobody read yet still go to whoever reads next
        assert _positions(await _drain(g, "audit", "alive")) == [("room:1", 4), ("room:1", 5)]
        await anyio.sleep(IDLE + 0.1)
        assert await g.claim("audit", "x", min_idle=IDLE, now=t0 + 2 * IDLE + 0.3, count=10) != []


async def test_claim_respects_count(backend_factory) -> None:
    async with backend_factory() as b:
        g = _groups(b)
        await g.create("audit")
        await _publish(b, "room:1", 5)
        t0 = time.time()
        await _drain(g, "audit", "dead")
        await anyio.sleep(IDLE + 0.1)
        first = await g.claim("audit", "alive", min_idle=IDLE, now=t0 + IDLE + 0.1, count=2)
        rest = await g.claim("audit", "alive", min_idle=IDLE, now=t0 + IDLE + 0.1, count=10)
        assert _positions(first) == [("room:1", 1), ("room:1", 2)]
        assert _positions(rest) == [("room:1", 3), ("room:1", 4), ("room:1", 5)]


async def test_ack_and_position_are_durable_across_reopen(backend_factory, tmp_path) -> None:
    """sqlite and redis keep the group in the store; memory has nothing to reopen."""
    async with backend_factory() as b:
        if type(b).__name__ == "MemoryBackend":
            pytest.skip("the memory backend keeps nothing across a reopen")
        from rtcore.backends import open_backend

        g = _groups(b)
        await g.create("audit")
        await _publish(b, "room:1", 4)
        t0 = time.time()
        msgs = await _drain(g, "audit", "n1")
        await g.ack("audit", [m.id for m in msgs[:2]])  # 3 and 4 stay pending
        await _publish(b, "room:1", 2)  # 5 and 6 were never read
        b2 = await open_backend(b.url)
        try:
            g2 = _groups(b2)
            await g2.create("audit")  # existing group: keeps position and pending list
            fresh = await _drain(g2, "audit", "n2")
            assert _positions(fresh) == [("room:1", 5), ("room:1", 6)]
            await g2.ack("audit", [m.id for m in fresh])
            await anyio.sleep(IDLE + 0.1)
            claimed = await g2.claim("audit", "n2", min_idle=IDLE, now=t0 + IDLE + 0.1, count=10)
            assert _positions(claimed) == [("room:1", 3), ("room:1", 4)]
        finally:
            await b2.aclose()

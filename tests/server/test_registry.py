"""The server's session registry, on its own."""

from __future__ import annotations

import anyio
import pytest

from rtcore.engine.hub import OutboxLimits
from rtcore.server.outbox import Outbox
from rtcore.server.registry import SessionInfo, SessionRegistry, SubscriptionInfo

pytestmark = pytest.mark.anyio


class FakeSession:
    def __init__(self, sid: str, registry: SessionRegistry | None = None, spawn_on_drain: FakeSession | None = None) -> None:
        self.id = sid
        self.outbox = Outbox(
            OutboxLimits(), render=lambda e: b"", spawn=lambda fn: None, on_slow=lambda: None, on_stale=lambda s: None
        )
        self.drained: list[float] = []
        self._registry = registry
        self._spawn_on_drain = spawn_on_drain

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            kind="websocket",
            principal="ada",
            opened_at=1.0,
            subscriptions=(SubscriptionInfo("s:1", "e1", 7), SubscriptionInfo("s:2", "e1", 2)),
            queued_bytes=self.outbox.queued_bytes,
            queued_frames=self.outbox.queued_frames,
            bytes_out=0,
        )

    async def drain(self, deadline: float) -> None:
        self.drained.append(deadline)
        if self._spawn_on_drain is not None and self._registry is not None:
            # A connection accepted just before the listener closed registers now.
            self._registry.add(self._spawn_on_drain)


async def test_add_discard_and_lookups() -> None:
    reg = SessionRegistry()
    a, b = FakeSession("a"), FakeSession("b")
    reg.add(a)
    reg.add(b)
    assert len(reg) == 2 and "a" in reg and reg.get("b") is b and set(reg) == {a, b}
    assert [i.id for i in reg.infos()] == ["a", "b"]
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.add(FakeSession("a"))
    reg.discard(FakeSession("a"))  # another object with the same id: not removed
    assert "a" in reg
    reg.discard(a)
    reg.discard(a)  # twice: ignored
    assert len(reg) == 1 and reg.get("a") is None and reg.opened == 2


async def test_changed_wakes_on_add_and_discard() -> None:
    reg = SessionRegistry()
    s = FakeSession("a")
    seen: list[int] = []

    async def watch() -> None:
        for _ in range(2):
            await reg.changed()
            seen.append(len(reg))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            reg.add(s)
            await anyio.wait_all_tasks_blocked()
            reg.discard(s)
    assert seen == [1, 0]


async def test_drain_reaches_sessions_registered_while_draining() -> None:
    """Mutation: drain only the sessions listed when it starts → ``late`` is never drained → fails."""
    reg = SessionRegistry()
    late = FakeSession("late")
    first = FakeSession("first", registry=reg, spawn_on_drain=late)
    reg.add(first)
    with anyio.fail_after(5):
        await reg.drain(2.5)
    assert first.drained == [2.5] and late.drained == [2.5]


def test_session_info_lag() -> None:
    info = FakeSession("a").info()
    assert info.lag({"s:1": 10, "s:2": 2}) == 3
    assert info.lag({}) == 0


class QuickSession(FakeSession):
    """A session that can drain without a task (``drain_now``) unless told it is busy."""

    def __init__(self, sid: str, busy: bool = False) -> None:
        super().__init__(sid)
        self.busy = busy
        self.drained_now = 0

    def drain_now(self) -> bool:
        if self.busy:
            return False
        self.drained_now += 1
        return True


async def test_drain_uses_drain_now_and_awaits_drain_only_when_refused() -> None:
    """A session that can say bye at once does it without a task; a busy one is awaited.

    Mutation seen caught: ``_drain`` ignores ``drain_now`` (a task per session
    again) → ``idle.drained == [2.5]`` → fails; ``_drain`` skips ``drain()``
    when ``drain_now()`` refused → ``busy.drained == []`` → fails.
    """
    reg = SessionRegistry()
    idle, busy = QuickSession("idle"), QuickSession("busy", busy=True)
    reg.add(idle)
    reg.add(busy)
    with anyio.fail_after(5):
        await reg.drain(2.5)
    assert (idle.drained_now, idle.drained) == (1, [])
    assert (busy.drained_now, busy.drained) == (0, [2.5])

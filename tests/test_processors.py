"""Group processors and loops across several nodes, on memory, sqlite and redis.

Every test runs the same scenario on each engine: the memory engine with
several :class:`rtcore.Node` objects sharing one backend object, sqlite with
one connection per node on the same file, redis with one client per node on
a private redis-server. A "crash" is the cancellation of a node's task while
its handler is inside an event, so nothing it holds is acknowledged.

Waits are bounded (``anyio.fail_after``) and nothing asserts on timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskGroup

import rtcore
from rtcore.backends import Backend, MemoryBackend
from rtcore.backends.base import LeaseStore

pytestmark = pytest.mark.anyio

ENGINES = ["memory", "sqlite", "redis"]
PROCESSOR_ONLY = frozenset({"processor"})
NO_PROCESSOR = frozenset({"gateway", "api"})


@asynccontextmanager
async def engine(kind: str, tmp_path: Path) -> AsyncIterator[Callable[[], Backend | str]]:
    """Yield a function giving each new node its backend (a shared object or a URL it opens)."""
    if kind == "memory":
        shared = MemoryBackend()
        yield lambda: shared
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'rt.db'}"
        yield lambda: url
    else:
        from tests.contract.engines import shared_redis_server

        server = shared_redis_server()
        server.flushall()
        yield lambda: server.url


class Running:
    """A node running in its own task, which :meth:`crash` cancels."""

    def __init__(self, node: rtcore.Node) -> None:
        self.node = node
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def crash(self) -> None:
        """Cancel the node's task (handlers in flight never acknowledge) and wait until it is gone."""
        self.scope.cancel()
        with anyio.fail_after(10):
            await self.done.wait()


async def start(tg: TaskGroup, node: rtcore.Node) -> Running:
    r = Running(node)
    started = anyio.Event()

    async def run() -> None:
        try:
            with r.scope:
                async with node:
                    started.set()
                    await anyio.sleep_forever()
        finally:
            r.done.set()

    tg.start_soon(run)
    with anyio.fail_after(10):
        await started.wait()
    return r


async def until(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            got = pred()
            if not isinstance(got, bool):
                got = await got
            if got:
                return
            await anyio.sleep(0.01)


@pytest.mark.parametrize("kind", ENGINES)
async def test_group_hands_each_event_to_one_member(kind: str, tmp_path: Path) -> None:
    app = rtcore.App()
    calls: list[tuple[str, str, int]] = []  # (node, stream, offset)

    @app.on("orders:*", group="billing")
    async def bill(ctx: rtcore.Context, event: rtcore.Event) -> None:
        calls.append((ctx.node.id, event.stream, event.offset))
        await anyio.sleep(0.005)  # long enough for the other members to get a share

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        for i in range(3):
            await start(tg, rtcore.Node(app, backend(), node_id=f"n{i}", roles=PROCESSOR_ONLY))
        api = (await start(tg, rtcore.Node(app, backend(), node_id="api", roles=NO_PROCESSOR))).node
        expected = set()
        for i in range(60):
            ev = await api.publish(f"orders:{i % 3}", "new", {"i": i})
            expected.add((ev.stream, ev.offset))
            await api.publish("other:1", "ignored", i)
        await until(lambda: {(s, o) for _n, s, o in calls} == expected)
        tg.cancel_scope.cancel()
    positions = [(s, o) for _n, s, o in calls]
    assert len(positions) == len(set(positions)) == 60  # nobody crashed: no event twice
    members = {n for n, _s, _o in calls}
    assert len(members) >= 2 and "api" not in members


@pytest.mark.parametrize("kind", ENGINES)
async def test_crashed_member_events_are_claimed_after_idle_timeout(kind: str, tmp_path: Path) -> None:
    """Proves, on every engine: the events a crashed member held are claimed and
    handled by the survivor, and the duplicate bound holds: only the event the
    victim was running when it crashed runs twice; the survivor runs every event
    exactly once. Every call is recorded (no dedup), so a duplicate shows.

    Mutations: processors.py ``_round`` never claims (``claimed = []`` instead of
    ``groups.claim(...)``) → the held events are never handled: fails. ``_handle`` acknowledges before running the handler → the
    event the victim was running is lost: fails.
    """
    app = rtcore.App()
    calls: list[tuple[str, str, int]] = []  # (node, stream, offset), every call

    @app.on("jobs:*", group="workers", idle_timeout=1.0)
    async def work(ctx: rtcore.Context, event: rtcore.Event) -> None:
        calls.append((ctx.node.id, event.stream, event.offset))
        if ctx.node.id == "victim":
            await anyio.sleep_forever()  # hangs inside the event until the crash

    def by(node: str) -> list[tuple[str, int]]:
        return [(s, o) for n, s, o in calls if n == node]

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        victim = await start(tg, rtcore.Node(app, backend(), node_id="victim"))
        api = victim.node
        events = [await api.publish("jobs:1", "job", i) for i in range(5)]
        await until(lambda: bool(by("victim")))  # the victim holds at least one event
        survivor = await start(tg, rtcore.Node(app, backend(), node_id="survivor"))
        api = survivor.node
        await victim.crash()
        events += [await api.publish("jobs:1", "job", i) for i in range(5, 20)]
        expected = {(e.stream, e.offset) for e in events}
        await until(lambda: set(by("survivor")) == expected)
        # One more claim period: an event handed out again by mistake would show up now.
        await anyio.sleep(1.2)
        tg.cancel_scope.cancel()
    assert len(by("victim")) == 1  # it hung on its first event
    assert sorted(by("survivor")) == sorted(expected)  # each once, the victim's held ones included
    twice = {pos for pos in expected if len([c for c in calls if c[1:] == pos]) > 1}
    assert twice == set(by("victim"))


@pytest.mark.parametrize("kind", ENGINES)
async def test_poison_event_is_dead_lettered_without_blocking_later_events(kind: str, tmp_path: Path) -> None:
    app = rtcore.App()
    timeline: list[tuple[str, int]] = []

    @app.on("bets:*", group="settle", max_attempts=3)
    async def settle(ctx: rtcore.Context, event: rtcore.Event) -> None:
        if event.data == "poison":
            timeline.append(("try", event.offset))
            raise ValueError("cannot settle poison")
        timeline.append(("ok", event.offset))

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        node = (await start(tg, rtcore.Node(app, backend(), node_id="n1"))).node
        await node.publish("bets:1", "bet", "fine")
        await node.publish("bets:1", "bet", "poison")
        for _ in range(5):
            await node.publish("bets:1", "bet", "fine")

        async def parked() -> bool:
            return (await node.backend.events.info("dlq:settle")).head >= 1

        await until(parked)
        await until(lambda: sum(1 for kind_, _ in timeline if kind_ == "ok") == 6)
        dlq = await node.backend.events.read("dlq:settle", after=0, limit=10)
        tg.cancel_scope.cancel()
    assert [(e.data["stream"], e.data["offset"]) for e in dlq.events] == [("bets:1", 2)]
    assert "cannot settle poison" in dlq.events[0].data["error"]
    tries = [i for i, (k, _o) in enumerate(timeline) if k == "try"]
    assert len(tries) == 3
    # the events behind the poison were handled while it waited for its retries
    assert any(k == "ok" and o > 2 for k, o in timeline[tries[0] : tries[-1]])


@pytest.mark.parametrize("kind", ENGINES)
async def test_loop_runs_on_one_node_and_moves_when_it_exits(kind: str, tmp_path: Path) -> None:
    app = rtcore.App()
    ticks: list[str] = []

    @app.loop("clock", every=0.02, lease=0.6)
    async def tick(ctx: rtcore.Context) -> None:
        ticks.append(ctx.node.id)

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        running = {n: await start(tg, rtcore.Node(app, backend(), node_id=n)) for n in ("a", "b")}
        await start(tg, rtcore.Node(app, backend(), node_id="gw", roles=NO_PROCESSOR))
        # 60 ticks of 0.02 s: the 0.6 s lease has been renewed several times meanwhile
        await until(lambda: len(ticks) >= 60)
        holders = set(ticks)
        assert len(holders) == 1
        (holder,) = holders
        other = "b" if holder == "a" else "a"
        await running[holder].crash()  # a clean exit releases the lease
        seen = len(ticks)
        await until(lambda: other in ticks[seen:])
        after = len(ticks)
        await until(lambda: len(ticks) >= after + 5)
        tg.cancel_scope.cancel()
    assert set(ticks[seen:]) == {other}


async def test_roles_are_checked_and_exposed() -> None:
    app = rtcore.App()
    assert rtcore.Node(app).roles == frozenset({"gateway", "api", "processor"})
    assert rtcore.Node(app, roles=NO_PROCESSOR).roles == NO_PROCESSOR
    with pytest.raises(ValueError, match="unknown node roles"):
        rtcore.Node(app, roles=frozenset({"processor", "janitor"}))


async def test_group_names_and_loop_names_are_unique() -> None:
    app = rtcore.App()

    @app.on("a:*", group="g")
    async def one(ctx: rtcore.Context, event: rtcore.Event) -> None: ...

    with pytest.raises(ValueError, match="already used"):
        app.on("b:*", group="g")
    app.loop("l", every=1)(one)
    with pytest.raises(ValueError, match="already registered"):
        app.loop("l", every=1)


async def test_a_group_processor_needs_a_backend_with_groups() -> None:
    app = rtcore.App()

    @app.on("a:*", group="g")
    async def handler(ctx: rtcore.Context, event: rtcore.Event) -> None: ...

    backend = MemoryBackend()
    backend.groups = None
    with pytest.raises(RuntimeError, match="no consumer groups"):
        async with rtcore.Node(app, backend):
            pass
    async with rtcore.Node(app, backend, roles=NO_PROCESSOR):  # not a processor node: fine
        pass


# --- loops under leases: the cases the fixes were about -----------------------------------


class Timeline:
    """Start and end of every tick, in the order they happened (one event loop: a total order)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, str]] = []  # ("start" | "end", node id)
        self.running = 0
        self.most_at_once = 0

    def starts(self, node: str | None = None) -> int:
        return sum(1 for kind_, n in self.marks if kind_ == "start" and node in (None, n))

    def ends(self, node: str | None = None) -> int:
        return sum(1 for kind_, n in self.marks if kind_ == "end" and node in (None, n))

    async def tick(self, node: str, seconds: float) -> None:
        """One tick that takes ``seconds`` (or until cancelled)."""
        self.marks.append(("start", node))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await anyio.sleep(seconds)
        finally:
            self.running -= 1
            self.marks.append(("end", node))


class FaultyLeases:
    """The node's lease store, with per-holder faults: ``hang`` (every call from the
    holder blocks, like a renewal stuck on a dead connection) and ``no_release``
    (the holder never says goodbye, like a process killed with -9)."""

    def __init__(self, real: LeaseStore) -> None:
        self.real = real
        self.hang: set[str] = set()
        self.no_release: set[str] = set()

    async def acquire(self, name: str, holder: str, *, now: float, ttl: float) -> bool:
        if holder in self.hang:
            await anyio.sleep_forever()
        return await self.real.acquire(name, holder, now=now, ttl=ttl)

    async def release(self, name: str, holder: str) -> None:
        if holder not in self.no_release:
            await self.real.release(name, holder)


def faulty_leases(*nodes: rtcore.Node) -> FaultyLeases:
    """Put one :class:`FaultyLeases` in front of the nodes' lease stores (they may share one)."""
    real = {id(n.backend.leases): n.backend.leases for n in nodes}
    assert len(real) == 1 or len({id(n.backend) for n in nodes}) == len(nodes)
    faults: FaultyLeases | None = None
    for n in nodes:
        if isinstance(n.backend.leases, FaultyLeases):
            continue
        wrapper = FaultyLeases(n.backend.leases)
        if faults is None:
            faults = wrapper
        else:  # separate stores (sqlite, redis): one fault set for all of them
            wrapper.hang, wrapper.no_release = faults.hang, faults.no_release
        n.backend.leases = wrapper
    assert faults is not None
    return faults


@pytest.mark.parametrize(
    ("kind", "anyio_backend"),
    [("memory", "asyncio"), ("sqlite", "asyncio"), ("redis", "asyncio"), ("memory", "trio"), ("sqlite", "trio")],
)
async def test_a_tick_slower_than_its_interval_and_its_lease_keeps_one_runner(
    kind: str, anyio_backend: str, tmp_path: Path
) -> None:
    """Proves: a ``@app.loop`` tick that takes longer than ``every`` AND longer
    than ``lease`` neither kills the loop nor lets a second node tick: the holder
    renews beside its running tick, keeps ticking back to back, and there is
    never more than one tick at a time across the nodes.

    Mutation: processors.py ``_LoopRunner._tick`` sleeps ``due - current_time()``
    without ``max(0.0, ...)`` (the bug fixed in "loops never sleep a negative
    time") → ``anyio.sleep`` of a negative time raises ``ValueError`` and the
    node dies: fails (every variant). Mutation: ``_lead`` renews every
    ``2 * lease`` instead of ``lease / 3`` → the other node takes the expired
    lease while the tick still runs: fails.
    """
    app = rtcore.App()
    timeline = Timeline()

    # lease 0.9: a renewal gets 0.3 s (lease / 3) before the holder gives up,
    # enough for SQLite's write lock on a busy machine.
    @app.loop("slow", every=0.01, lease=0.9)
    async def tick(ctx: rtcore.Context) -> None:
        await timeline.tick(ctx.node.id, 1.0)

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        for n in ("a", "b"):
            await start(tg, rtcore.Node(app, backend(), node_id=n))
        await until(lambda: timeline.ends() >= 3)
        tg.cancel_scope.cancel()
    assert timeline.most_at_once == 1
    holders = {n for kind_, n in timeline.marks}
    assert len(holders) == 1, f"the lease moved while its holder was alive: {timeline.marks}"


@pytest.mark.parametrize("kind", ENGINES)
async def test_a_holder_cut_off_from_its_lease_stops_before_another_takes_over(kind: str, tmp_path: Path) -> None:
    """Proves: when the holder's renewals hang (its backend connection is stuck)
    while a tick is still running, the holder cancels that tick before the
    lease can have expired, and only then does the other node take over: at
    most one tick runs at any moment, and the other node does tick.

    Mutation: processors.py ``_LoopRunner._acquire`` without its
    ``fail_after(lease / 3)`` → the stuck holder keeps its tick running past the
    lease while the other node starts one: fails (two at once). Mutation:
    ``_lead`` returns on a lost renewal without ``tg.cancel_scope.cancel()`` →
    the old tick runs on: fails (two at once).
    """
    app = rtcore.App()
    timeline = Timeline()

    @app.loop("long", every=0.05, lease=0.9)
    async def tick(ctx: rtcore.Context) -> None:
        await timeline.tick(ctx.node.id, 30.0)  # still running when the lease would expire

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        nodes = [(await start(tg, rtcore.Node(app, backend(), node_id=n))).node for n in ("a", "b")]
        faults = faulty_leases(*nodes)
        await until(lambda: timeline.starts() == 1)
        (holder,) = {n for _k, n in timeline.marks}
        other = "b" if holder == "a" else "a"
        faults.hang.add(holder)
        await until(lambda: timeline.starts(other) >= 1)
        tg.cancel_scope.cancel()
    assert timeline.most_at_once == 1, timeline.marks
    assert timeline.marks[:3] == [("start", holder), ("end", holder), ("start", other)]


@pytest.mark.parametrize("kind", ENGINES)
async def test_a_holder_that_dies_without_releasing_is_replaced_after_the_lease(kind: str, tmp_path: Path) -> None:
    """Proves: a holder that dies without releasing its lease (kill -9: no
    goodbye) is replaced once the lease runs out, and the two never tick at once.

    Mutation: memory.py ``MemoryLeaseStore.acquire`` ignores expiry (another
    holder is always refused) → the survivor never ticks: fails (memory).
    Mutation: processors.py ``_LoopRunner.run`` gives up after one failed
    ``_acquire`` instead of sleeping and trying again → fails (every engine).
    """
    app = rtcore.App()
    timeline = Timeline()

    @app.loop("short", every=0.02, lease=0.9)
    async def tick(ctx: rtcore.Context) -> None:
        await timeline.tick(ctx.node.id, 0.01)

    async with engine(kind, tmp_path) as backend, anyio.create_task_group() as tg:
        running = {n: await start(tg, rtcore.Node(app, backend(), node_id=n)) for n in ("a", "b")}
        faults = faulty_leases(*(r.node for r in running.values()))
        await until(lambda: timeline.ends() >= 3)
        (holder,) = {n for _k, n in timeline.marks}
        other = "b" if holder == "a" else "a"
        faults.no_release.add(holder)
        await running[holder].crash()
        seen = len(timeline.marks)
        await until(lambda: timeline.ends(other) >= 3)
        tg.cancel_scope.cancel()
    assert timeline.most_at_once == 1
    assert {n for _k, n in timeline.marks[seen:]} == {other}

"""A backend outage fails requests, never the node: the server keeps serving."""

from __future__ import annotations

import anyio
import msgspec
import pytest

import rtcore
from rtcore.backends import MemoryBackend
from rtcore.errors import BackendError
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio


class Tally(msgspec.Struct):
    n: int = 0

    def apply(self, event: rtcore.Event) -> None:
        self.n += 1


def make_app() -> rtcore.App:
    app = rtcore.App()
    app.state("tally:*", Tally, snapshot_every=2)

    @app.command("add")
    async def add(ctx: rtcore.Context, args: None) -> int:
        return (await ctx.publish("tally:1", "add", 1)).offset

    return app


async def test_outcome_store_failure_still_answers_the_command() -> None:
    """Proves: a command whose event is appended is answered even when storing its
    outcome fails (the handler returns the offset, so the keyed path folds claim,
    append and outcome into ``Backend.begin_append``: its generic version is what
    runs on ``memory://``).

    Mutation seen caught: the generic ``begin_append`` lets ``finish``'s error
    propagate → the command is answered ``backend_unavailable`` → fails.
    """
    backend = MemoryBackend()

    async def broken_finish(*args: object, **kwargs: object) -> None:
        raise BackendError("redis went away")

    backend.idempotency.finish = broken_finish  # type: ignore[method-assign]
    async with serve(make_app(), backend) as node, connect(node) as c:
        assert await c.command("add", None, key="k1") == 1
        await c.ping()  # the session survived


async def test_snapshot_store_failure_keeps_the_node_and_its_sessions() -> None:
    backend = MemoryBackend()
    puts: list[int] = []

    async def broken_put(snapshot: object) -> None:
        puts.append(1)
        raise BackendError("disk full")

    backend.snapshots.put = broken_put  # type: ignore[method-assign]
    async with serve(make_app(), backend) as node, connect(node) as c:
        for i in range(1, 6):
            assert await c.command("add") == i
        with anyio.fail_after(5):
            while len(puts) < 2:
                await anyio.sleep(0.01)
        assert (await node.state_of("tally:1")).state.n == 5
        await c.ping()


async def test_follower_load_and_history_fill_failures_are_retried() -> None:
    """Proves: loading a stateful stream's follower (snapshot + stream info) and
    filling its history survive backend failures: the node retries and the
    state arrives once the backend answers again.

    Mutation: engine/followers.py ``Followers._load`` without its ``try/except`` (first
    ``snapshots.get`` failure propagates) → the node's task group dies: fails.
    Mutation: engine/hub.py ``Tail.fill`` without its ``try/except`` around
    ``log.read`` → fails the same way.
    """
    backend = MemoryBackend()
    for _ in range(5):
        await backend.events.append("tally:1", "add", 1, now=0.0)
    failures = {"get": 2, "read": 2}
    real_get, real_read = backend.snapshots.get, backend.events.read

    async def flaky_get(stream: str) -> object:
        if failures["get"]:
            failures["get"] -= 1
            raise BackendError("redis went away")
        return await real_get(stream)

    async def flaky_read(stream: str, *, after: int, limit: int) -> object:
        if failures["read"]:
            failures["read"] -= 1
            raise BackendError("redis went away")
        return await real_read(stream, after=after, limit=limit)

    backend.snapshots.get = flaky_get  # type: ignore[method-assign, assignment]
    backend.events.read = flaky_read  # type: ignore[method-assign, assignment]
    async with rtcore.Node(make_app(), backend) as node:
        with anyio.fail_after(10):
            st = await node.state_of("tally:1")
        assert (st.offset, st.state.n) == (5, 5)
        assert failures == {"get": 0, "read": 0}
        assert (await node.publish("tally:1", "add", 1)).offset == 6  # still serving

"""App lifespans: startup before serving, shutdown in reverse, whatever ended the node.

Each test names the mutation of ``Node.__aenter__``/``__aexit__`` (or of
:meth:`rtcore.App.lifespan`/``include``) that makes it fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import rtcore
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


def _recorder(log: list[str], name: str, provides: dict[str, Any] | None = None) -> Any:
    """A lifespan (async context manager factory) that logs its startup and shutdown."""

    @asynccontextmanager
    async def lifespan(node: rtcore.Node) -> AsyncIterator[dict[str, Any] | None]:
        await anyio.lowlevel.checkpoint()
        log.append(f"start {name}")
        try:
            yield provides
        finally:
            await anyio.lowlevel.checkpoint()  # a real close awaits I/O
            log.append(f"stop {name}")

    return lifespan


def _app(log: list[str]) -> rtcore.App:
    """Three lifespans from the three ways to register one: App(lifespan=), @app.lifespan, a router."""
    app = rtcore.App(lifespan=_recorder(log, "a", {"a": 1}))

    @app.lifespan
    async def b(node: rtcore.Node) -> AsyncIterator[dict[str, Any]]:
        log.append("start b")
        yield {"b": node.resources["a"] + 1}  # sees what earlier lifespans provided
        log.append("stop b")

    router = rtcore.Router(lifespan=_recorder(log, "r", {"r": 3}))

    @router.command("resources")
    async def resources(ctx: rtcore.Context, args: None) -> dict[str, Any]:
        log.append("handler")
        return dict(ctx.resources)

    @router.command("fail")
    async def fail(ctx: rtcore.Context, args: None) -> None:
        raise Boom("handler failed")

    app.include(router)
    return app


async def test_startup_in_order_before_serving_shutdown_in_reverse() -> None:
    """Lifespans start in registration order, handlers see their resources, stop in reverse.

    Mutations: enter ``app.lifespans`` reversed → fails (startup order);
    exit them in registration order instead of with the exit stack → fails
    (shutdown order); ``include`` drops the router's lifespans → fails;
    ``ctx.resources`` not the node's merged mapping → fails.
    """
    log: list[str] = []
    app = _app(log)
    async with serve(app) as node:
        assert log == ["start a", "start b", "start r"]
        assert node.resources == {"a": 1, "b": 2, "r": 3}
        async with connect(node) as client:
            assert await client.command("resources") == {"a": 1, "b": 2, "r": 3}
            with pytest.raises(rtcore.RtcoreError):
                await client.command("fail")  # a failing handler does not stop the node
        assert log[-1] == "handler"
    assert log == ["start a", "start b", "start r", "handler", "stop r", "stop b", "stop a"]
    assert node.resources == {}  # nothing closed stays reachable


async def test_shutdown_runs_when_the_block_raised() -> None:
    """The block's error propagates unchanged and every shutdown still runs.

    Mutations: in ``Node.__aexit__`` run the lifespan shutdown only when no
    exception is passed in (``if exc[0] is None``) → fails; re-raise the task
    group's ExceptionGroup instead of the block's own error → fails.
    """
    log: list[str] = []
    with pytest.raises(Boom, match="in the block"):
        async with serve(_app(log)):
            raise Boom("in the block")
    assert log[-3:] == ["stop r", "stop b", "stop a"]


async def test_shutdown_runs_when_a_node_task_failed() -> None:
    """A background task that crashes the node's task group still gets the lifespans closed.

    Mutation: await the shutdown after ``self._cm.__aexit__`` instead of in
    its ``finally`` → fails (the task group's error skips it).
    """
    log: list[str] = []

    async def crash() -> None:
        raise Boom("task crashed")

    with pytest.raises(BaseExceptionGroup) as caught:  # the node's task group reports its tasks' errors
        async with serve(_app(log)) as node:
            node.spawn(crash)
            await anyio.sleep_forever()
    assert caught.group_contains(Boom, match="task crashed")
    assert log[-3:] == ["stop r", "stop b", "stop a"]


async def test_shutdown_runs_when_the_node_is_cancelled() -> None:
    """A node stopped by cancellation (a timeout, Ctrl-C) still completes every shutdown.

    Mutation: drop the ``CancelScope(shield=True)`` around the shutdown →
    fails (each shutdown's first await raises the cancellation, so nothing
    is logged as stopped).
    """
    log: list[str] = []
    with anyio.CancelScope() as scope:
        async with serve(_app(log)):
            scope.cancel()
            await anyio.sleep_forever()
    assert log[-3:] == ["stop r", "stop b", "stop a"]


async def test_a_failing_startup_raises_its_error_and_closes_what_started() -> None:
    """The startup error comes out of ``Node.__aenter__`` as is; earlier lifespans are closed, later ones never start.

    Mutations: do not close the lifespans already entered when one fails
    (drop ``await self._shut_down()`` in the ``except``) → fails (no
    ``stop a``); wrap the error (e.g. in an ExceptionGroup by starting the
    lifespans inside the task group) → fails the ``pytest.raises`` type.
    """
    log: list[str] = []
    app = rtcore.App(lifespan=_recorder(log, "a"))

    @app.lifespan
    async def database(node: rtcore.Node) -> AsyncIterator[None]:
        raise ConnectionRefusedError("database refused the connection")
        yield  # pragma: no cover

    app.lifespan(_recorder(log, "c"))
    node = rtcore.Node(app)
    with pytest.raises(ConnectionRefusedError, match="database refused"):
        async with node:
            pytest.fail("the node must not start")  # pragma: no cover
    assert log == ["start a", "stop a"]
    assert node.resources == {}


async def test_loops_and_processors_start_after_the_lifespans() -> None:
    """A loop's first tick already sees what the lifespans provided.

    Mutation: enter the lifespans after ``self._processors.start`` → fails
    (the loop ticks while the startup is still yielding to the scheduler).
    """
    app = rtcore.App()
    seen: list[Any] = []
    ticked = anyio.Event()

    @app.lifespan
    async def slow_open(node: rtcore.Node) -> AsyncIterator[dict[str, Any]]:
        for _ in range(100):  # an open that awaits, as a real pool does
            await anyio.lowlevel.checkpoint()
        yield {"pool": "open"}

    @app.loop("tick", every=60)
    async def tick(ctx: rtcore.Context) -> None:
        seen.append(ctx.resources.get("pool"))
        ticked.set()

    async with serve(app):
        with anyio.fail_after(5):
            await ticked.wait()
    assert seen == ["open"]


async def test_two_lifespans_may_not_provide_the_same_resource() -> None:
    """A resource name provided twice is refused at startup, naming it; the first lifespan is closed.

    Mutation: ``self.resources.update(provided)`` without the clash check → fails.
    """
    log: list[str] = []
    app = rtcore.App(lifespan=_recorder(log, "a", {"db": 1}))
    app.lifespan(_recorder(log, "b", {"db": 2}))
    with pytest.raises(ValueError, match=r"already provided: \['db'\]"):
        async with serve(app):
            pass  # pragma: no cover
    assert log == ["start a", "start b", "stop b", "stop a"]


def test_a_lifespan_must_be_callable() -> None:
    """Mutation: drop the ``callable`` check → fails (the error would only come at startup)."""
    with pytest.raises(TypeError, match="lifespan must be callable"):
        rtcore.App().lifespan("not a function")


async def test_connect_to_an_app_joins_the_node_serving_it() -> None:
    """``connect(app)`` inside ``serve(app)`` uses that node (what ``App._running`` did before).

    Mutation: ``connect`` ignores ``serve``'s nodes and always starts its own
    → fails (the served node has no session, and the event lands elsewhere).
    """
    app = rtcore.App()

    @app.command("hello")
    async def hello(ctx: rtcore.Context, args: None) -> int:
        return (await ctx.publish("room:1", "hello")).offset

    async with serve(app) as node, connect(app) as client:
        assert await client.command("hello") == 1
        assert (await node.backend.events.info("room:1")).head == 1


def test_rtcore_serve_exits_with_the_startup_error(tmp_path: Path) -> None:
    """``rtcore serve`` reports a failed startup in one line and exits 2 (like every bad invocation) after closing what started.

    Mutation: let ``_serve`` propagate the error (drop its ``except``) → fails
    (a traceback of an ExceptionGroup, no ``rtcore: error:`` line).
    """
    (tmp_path / "failing_app.py").write_text(
        textwrap.dedent(
            """
            import logging
            import rtcore

            app = rtcore.App()

            @app.lifespan
            async def cache(node):
                yield
                logging.getLogger("failing_app").warning("cache closed")

            @app.lifespan
            async def database(node):
                raise ConnectionRefusedError("database at db:5432 refused the connection")
                yield
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "rtcore.cli", "serve", "failing_app:app", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert "rtcore: error: startup failed: ConnectionRefusedError: database at db:5432 refused the connection" in lines
    assert any(line.endswith("cache closed") for line in lines)

"""A caller gets its own entry's result, even while the entry's patch is still being written."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from rtcore.testing import connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


async def test_result_while_the_patch_is_being_written() -> None:
    """``room.create`` answers the join result when the owner applied the entry but
    is still appending its patch (a slow backend: Redis, a busy SQLite).

    The inbox append returns late and the room's patch append is slow, so the
    handler asks for its result while the owner is inside that append.

    Mutation: drop the ``offset == self.applying`` wait in ``_Actor.result`` → the
    entry counts as applied with no stored result → the caller gets
    ``{"recovered": true}`` instead of the join result → fails.
    """
    app, _reg = make_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a:
        events = node.backend.events
        real = events.append

        async def slow_append(stream: str, *args: Any, **kwargs: Any) -> Any:
            if stream.startswith("room:"):
                await anyio.sleep(0.2)  # the patch write is slow
            res = await real(stream, *args, **kwargs)
            if stream.startswith("roominbox:"):
                await anyio.sleep(0.05)  # the owner reads the entry before the handler waits
            return res

        events.append = slow_append  # type: ignore[method-assign]
        created = await a.command("room.create", {"type": "game"})
        assert "stream" in created and "recovered" not in created, created

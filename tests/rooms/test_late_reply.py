"""A forwarded command whose reply is late gets its real answer, never a guessed "ok".

Found by the three-process seat race under load (four winners for one seat):
a node waiting for the owner's reply on ``roomreply:{id}`` gave up after
``IDLE_WAIT``, saw a later patch covering the entry's inbox offset, and
answered ``ok`` (``recovered``) — although the owner had refused the entry
(``room_full``). A refusal writes no patch, so a later patch says only that
the entry was applied, not how.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from rtcore.backends import open_backend
from rtcore.protocol.frames import Ok
from rtcore.testing import connect, serve

from .roomapp import make_app

pytestmark = pytest.mark.anyio


async def test_refused_entry_with_a_late_reply_is_still_refused() -> None:
    """Node B's live feed of replies is cut (every ``roomreply`` event dropped
    before B sees it); a player on B asks for the last seat after it was taken;
    then the winner leaves (a patch covering B's entry). B must answer
    ``room_full``, what the owner decided.

    Mutation: restore the old fallback in ``_Runtime._await`` (answer
    ``{"recovered": true}`` once the folded document's ``inbox`` covers the
    offset, without reading the reply) → B answers ok → fails.
    """
    app, reg = make_app(tick_rate=None, max_clients=2)
    backend = await open_backend("memory://")
    async with serve(app, backend, node_id="A") as na, serve(app, backend, node_id="B") as nb:
        rt_b = reg.runtime(nb)

        def deaf(event: Any) -> None:  # B never hears a reply live
            return None

        rt_b.on_reply = deaf  # type: ignore[method-assign]
        async with connect(na, "owner") as owner, connect(na, "winner") as winner, connect(nb, "late") as late:
            room = await owner.command("room.create", {"type": "game"})
            rid = room["room_id"]
            assert (await winner.command("room.join", {"room_id": rid}))["room_id"] == rid
            result: list[Any] = []

            async def ask() -> None:
                result.append(await late.command_reply("room.join", {"room_id": rid}, timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                # Let A refuse it (no patch), then write a patch that covers B's entry.
                await anyio.sleep(0.3)
                await winner.command("room.leave", {"room_id": rid})
            [reply] = result
            assert not isinstance(reply, Ok), f"B answered ok for a refused join: {reply}"
            assert reply.code == "room_full"

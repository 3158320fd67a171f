"""Seat race across processes: three ``rtcore serve`` processes on one Redis,
50 clients spread over them race for the last free seat of a two-seat room.

The servers run the shared test room type (``tests/rooms/roomapp.py``) with
``max_clients=2`` rather than the tic-tac-toe example: the example locks its
room when the second player sits down, so the losers would get
``room_locked`` and the test would not exercise the seat count itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import rtcore.client
from rtcore.errors import RtcoreError
from tests.multinode.procs import ServerProcess, private_redis, processes

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]
JOINERS = 50


class SeatRaceProcess(ServerProcess):
    """``rtcore.run`` of the shared room test app with two seats per room."""

    def _argv(self) -> list[str]:
        options = {"port": self.port, "backend": self.backend, "grace": 1.0}
        code = (
            "import rtcore\n"
            "from tests.rooms.roomapp import make_app\n"
            "app, _ = make_app(tick_rate=None, max_clients=2)\n"
            f"rtcore.run(app, **{options!r})\n"
        )
        return [*super()._argv()[:1], "-c", code]


async def room_document(url: str, stream: str) -> Any:
    """The room's current document as ``url``'s node serves it (the subscription's snapshot)."""
    async with rtcore.client.connect(url, token="observer") as client:
        sub = await client.subscribe(stream)
        async for item in sub:
            if isinstance(item, rtcore.client.Missed) and item.state is not None:
                return item.state
        raise AssertionError(f"{url}: no snapshot of {stream}")


async def test_50_joiners_on_three_redis_nodes_for_the_last_seat(tmp_path: Path) -> None:
    """A two-seat room with its owner seated; 50 clients (distinct principals,
    round-robin over three processes sharing one Redis, so most joins are
    forwarded to the room's owner) send ``room.join`` at once. Exactly one
    succeeds, 49 get ``room_full``, and the room's document read from every
    node seats exactly the owner and that one winner.

    Mutation: drop the ``room_full`` check in ``_Actor._op_join``
    (``src/rtcore/rooms/runtime.py``) → all 50 join, 51 seated → fails.
    """
    with private_redis() as redis:
        servers = [SeatRaceProcess(redis.url, tmp_path, f"node{i}") for i in range(3)]
        async with processes(*servers) as procs:
            urls = [p.ws for p in procs]
            with anyio.fail_after(60):
                async with rtcore.client.connect(urls[0], token="owner") as owner:
                    room = await owner.command("room.create", {"type": "game"}, timeout=20)
                    results: dict[str, str] = {}

                    async def joiner(i: int) -> None:
                        name = f"p{i}"
                        async with rtcore.client.connect(urls[i % 3], token=name) as c:
                            try:
                                await c.command("room.join", {"room_id": room["room_id"]}, timeout=30)
                                results[name] = "ok"
                            except RtcoreError as exc:
                                results[name] = exc.code

                    async with anyio.create_task_group() as tg:
                        for i in range(JOINERS):
                            tg.start_soon(joiner, i)

                    winners = sorted(n for n, r in results.items() if r == "ok")
                    codes = sorted(results.values())
                    assert len(results) == JOINERS
                    assert len(winners) == 1, codes
                    assert codes.count("room_full") == JOINERS - 1, codes
                    for url in urls:
                        doc = await room_document(url, room["stream"])
                        assert sorted(doc["members"]) == sorted(["owner", *winners]), (url, doc)

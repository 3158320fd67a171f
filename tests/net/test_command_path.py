"""The per-command path over a real socket: commands that need no await answered
in the connection's task, replies written at once, pipelined ones batched."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from rtcore.transport.aiostream import ProtocolStream

from .conftest import serving
from .netapp import app
from .test_connection_tasks import masked, raw_client

pytestmark = pytest.mark.anyio


def spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The list every socket write of the served connections goes to (the write is still made)."""
    writes: list[bytes] = []
    real = ProtocolStream.write_now

    def spy(self: ProtocolStream, data: bytes) -> int:
        writes.append(data)
        return real(self, data)

    monkeypatch.setattr(ProtocolStream, "write_now", spy)
    return writes

@pytest.mark.asyncio_only(reason="replies are written without the writer task only on asyncio (ProtocolStream)")
async def test_pipelined_commands_are_answered_in_order_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five keyed commands (run by a command worker) in one read: five replies,
    in order, in one socket write; a lone command's reply is written on its own.

    A reply is written at once (``Outbox.push_now``) only when no other command
    of the connection is queued behind it; otherwise it is queued and the
    tick's replies go out together.

    Mutation checked: ``_Connection._command`` calling ``push_now`` without the
    ``not self._commands`` test → five writes → fails.
    """
    writes = spy_writes(monkeypatch)
    async with serving(app) as server, raw_client(server.port, "room:cmd") as client:

        async def ok(rid: int) -> dict[str, Any]:
            msg = await client.message("ok")
            assert msg["id"] == rid
            return msg

        writes.clear()
        await client.stream.send(masked(0x1, json.dumps({"t": "cmd", "id": 2, "name": "echo", "args": {"n": 0}, "key": "k2"}).encode()))
        assert (await ok(2))["result"] == {"n": 0}
        assert len(writes) == 1
        writes.clear()
        burst = b"".join(
            masked(0x1, json.dumps({"t": "cmd", "id": rid, "name": "echo", "args": {"n": rid}, "key": f"k{rid}"}).encode()) for rid in range(10, 15)
        )
        await client.stream.send(burst)
        for rid in range(10, 15):
            assert (await ok(rid))["result"] == {"n": rid}
        assert len(writes) == 1


@pytest.mark.asyncio_only(reason="counts asyncio tasks")
async def test_a_command_that_needs_no_await_starts_no_task_and_pipelined_ones_share_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """``echo`` (no await in its handler) is answered in the connection's own
    task: no command worker is started; five of them in one read are answered
    in order, in one write. A command that awaits (``slow``) still gets a worker.

    Mutations checked: ``dispatch_now`` always returning None → a worker task
    appears → fails; inline replies written at once (``batch=False``) → five
    writes → fails.
    """
    writes = spy_writes(monkeypatch)
    async with serving(app) as server, raw_client(server.port, "room:inline") as client:
        tasks = len(asyncio.all_tasks())
        writes.clear()
        burst = b"".join(
            masked(0x1, json.dumps({"t": "cmd", "id": rid, "name": "echo", "args": {"n": rid}}).encode()) for rid in range(10, 15)
        )
        await client.stream.send(burst)
        for rid in range(10, 15):
            msg = await client.message("ok")
            assert (msg["id"], msg["result"]) == (rid, {"n": rid})
        assert len(writes) == 1
        assert len(asyncio.all_tasks()) == tasks
        await client.stream.send(masked(0x1, json.dumps({"t": "cmd", "id": 20, "name": "slow", "args": {}}).encode()))
        assert (await client.message("ok"))["id"] == 20
        assert len(asyncio.all_tasks()) == tasks + 1  # the idle worker it left

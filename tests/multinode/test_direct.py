"""Direct messages across two ``rtcore serve`` processes on one Redis (PUB/SUB ``rt:signal``).

Clients are :mod:`rtcore.client` over real sockets. "Nobody else got it" is
proven with a later ``marker`` sent through the same path: Redis delivers a
channel's messages to each subscriber in publish order and a node pushes them
to a connection in that order, so a client whose first message is the
marker never got the earlier one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import rtcore.client
from rtcore.backends import open_backend

from .procs import ServerProcess, private_redis, processes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.asyncio_only(reason="the nodes are subprocesses; a trio run would repeat the same servers"),
]

APP = "tests/multinode/dmapp.py:app"
SECRET = "s3cr3t-5513"


class Inbox:
    """What one client's ``on_message(None, ...)`` or a room's ``on_message`` received, awaitable."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = anyio.Event()

    def put(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def first(self, timeout: float = 10.0) -> Any:
        with anyio.fail_after(timeout):
            while not self.items:
                await self._changed.wait()
        return self.items[0]

    async def count(self, n: int, timeout: float = 10.0) -> list[Any]:
        with anyio.fail_after(timeout):
            while len(self.items) < n:
                await self._changed.wait()
        return self.items


def inbox_of(client: rtcore.client.Client) -> Inbox:
    inbox = Inbox()
    client.on_message(None, inbox.put)
    return inbox


async def stored_anywhere(url: str, needle: str) -> list[str]:
    """The streams in Redis with an event whose data mentions ``needle``."""
    backend = await open_backend(url)
    try:
        hits = []
        for stream in await backend.events.streams():
            page = await backend.events.read(stream, after=0, limit=10_000)
            if any(needle in msgspec.json.encode(e.data).decode() for e in page.events):
                hits.append(stream)
        return hits
    finally:
        await backend.aclose()


async def test_direct_messages_cross_nodes_and_are_never_stored(tmp_path: Path) -> None:
    """bob has three tabs (two on node 1, one MessagePack, and one on node 2): a
    ``dm`` command on node 1 reaches all three, once, and neither alice nor carol
    (node 2). dave, offline when a message is sent to him, connects to node 2
    afterwards and gets only the marker; Redis holds neither message. A room owned
    by node 2 sends bob a message when alice (node 1) asks it to: his tabs on both
    nodes get it, routed to the room where the tab follows it.

    Mutation seen caught: ``RedisBackend`` without its ``RedisSignalBus`` (the
    process-local default bus) → bob's tab on node 2 never gets the node-1
    message → fails. Mutation seen caught: ``Node.send_to`` also appends to the
    old stream ``roomdm:{user}`` → ``stored_anywhere`` finds the secret → fails.
    """
    with private_redis(persistent=False) as redis:
        n1 = ServerProcess(redis.url, tmp_path, "n1", app=APP)
        n2 = ServerProcess(redis.url, tmp_path, "n2", app=APP)
        async with processes(n1, n2):
            async with (
                rtcore.client.connect(n1.ws, token="alice") as alice,
                rtcore.client.connect(n1.ws, token="bob") as tab1,
                rtcore.client.connect(n1.ws, token="bob", encoding="msgpack") as tab2,
                rtcore.client.connect(n2.ws, token="bob") as tab3,
                rtcore.client.connect(n2.ws, token="carol") as carol,
            ):
                inboxes = {name: inbox_of(c) for name, c in (("alice", alice), ("tab1", tab1), ("tab2", tab2), ("tab3", tab3), ("carol", carol))}
                await alice.command("dm", {"to": "bob", "type": "note", "data": {"code": SECRET}})
                for tab in ("tab1", "tab2", "tab3"):
                    assert await inboxes[tab].first() == {"type": "note", "data": {"code": SECRET}, "room": None}
                for name in ("alice", "carol"):
                    await alice.command("dm", {"to": name, "type": "marker"})
                    assert await inboxes[name].first() == {"type": "marker", "data": None, "room": None}, f"{name} got bob's note"
                # Once per tab: the next one each tab gets is the next message.
                await alice.command("dm", {"to": "bob", "type": "after"})
                for tab in ("tab1", "tab2", "tab3"):
                    assert [m["type"] for m in await inboxes[tab].count(2)] == ["note", "after"]

                # Offline: dropped, not replayed to a later connection.
                await alice.command("dm", {"to": "dave", "type": "note", "data": {"code": SECRET + "-dave"}})
                async with rtcore.client.connect(n2.ws, token="dave") as dave:
                    dave_inbox = inbox_of(dave)
                    await alice.command("dm", {"to": "dave", "type": "marker"})
                    assert await dave_inbox.first() == {"type": "marker", "data": None, "room": None}
                    assert len(dave_inbox.items) == 1

                # A room owned by node 2 messages bob's tabs on both nodes.
                room3 = await tab3.join_or_create("chat")
                room1 = await tab1.join(room3.id)
                room_inboxes = {"tab1": Inbox(), "tab3": Inbox()}
                room1.on_message("note", room_inboxes["tab1"].put)
                room3.on_message("note", room_inboxes["tab3"].put)
                await alice.join(room3.id)
                await alice.command("room.send", {"room_id": room3.id, "type": "tell", "data": {"to": "bob"}})
                for tab in ("tab1", "tab3"):
                    assert await room_inboxes[tab].first() == {"from": "alice", "n": 1}
                # tab2 follows no room: the message reaches the application with its room id.
                assert (await inboxes["tab2"].count(3))[2] == {"type": "note", "data": {"from": "alice", "n": 1}, "room": room3.id}
                assert [m["type"] for m in inboxes["tab1"].items] == ["note", "after"], "routed to the room, not the client"
            assert await stored_anywhere(redis.url, SECRET) == []

"""Direct messages (``node.send_to`` / ``ctx.send_to``): ephemeral ``msg`` frames to every
live connection of a principal, on every node, never stored.

In-process (``rtcore.testing``, ``memory://``), asyncio and trio. "Nobody else got
it" is proven without waiting for time to pass: after the message under test,
each other client is sent a ``marker`` through the same path, and a connection
receives direct messages in the order they were sent to it, so a client whose
first ``msg`` is the marker never got the earlier one.

The same guarantees over real sockets and two ``rtcore serve`` processes on
Redis: tests/net/test_direct_ws.py and tests/multinode/test_direct.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rtcore
from rtcore.backends import open_backend
from rtcore.engine.direct import decode_envelope, encode_envelope
from rtcore.errors import BackendError, BadRequest
from rtcore.protocol.codec import codec_for
from rtcore.protocol.frames import Msg
from rtcore.testing import TestClient, connect, serve
from rtcore.testing.strategies import json_values, texts
from tests.redis_server import RedisServer, redis_server_binary, require_services

pytestmark = pytest.mark.anyio

SECRET = {"code": "s3cr3t-7781"}


class Dm(msgspec.Struct):
    to: str
    type: str
    data: Any = None


def make_app() -> rtcore.App:
    app = rtcore.App("direct-test")

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @app.command("dm")
    async def dm(ctx: rtcore.Context, args: Dm) -> None:
        await ctx.send_to(args.to, args.type, args.data)

    return app


async def first_msg(client: TestClient, timeout: float | None = 5.0) -> Msg:
    msg = await client.next_frame(types=(Msg,), timeout=timeout if timeout is not None else float("inf"))
    assert isinstance(msg, Msg)
    return msg


async def markers(sender: TestClient, *others: TestClient) -> None:
    """Send each other client a marker; assert it is the first direct message it gets."""
    for other in others:
        assert other.welcome is not None and other.welcome.principal is not None
        await sender.command("dm", {"to": other.welcome.principal, "type": "marker"})
        assert await first_msg(other) == Msg("marker", None, None), f"{other.welcome.principal} got a message meant for someone else"


async def stored_anywhere(node: rtcore.Node, needle: str) -> list[str]:
    """The streams of the node's backend with an event whose data mentions ``needle``."""
    hits = []
    for stream in await node.backend.events.streams():
        page = await node.backend.events.read(stream, after=0, limit=10_000)
        if any(needle in msgspec.json.encode(e.data).decode() for e in page.events):
            hits.append(stream)
    return hits


async def test_reaches_every_tab_of_the_principal_and_nobody_else() -> None:
    """Three tabs of ``bob`` (one of them MessagePack) each get the message once, as a
    ``msg`` frame; ``alice`` (the sender) and ``carol`` get nothing; no stream holds it.

    Mutation seen caught: ``Presence.receivers`` returns only the first receiver →
    tabs 2 and 3 wait in vain → fails. Mutation seen caught: ``Node._on_signal``
    hands the message to every receiver of every principal → carol's first ``msg``
    is bob's → fails.
    """
    app = make_app()
    async with (
        serve(app) as node,
        connect(node, "alice") as alice,
        connect(node, "bob") as tab1,
        connect(node, "bob", encoding="msgpack") as tab2,
        connect(node, "bob") as tab3,
        connect(node, "carol") as carol,
    ):
        await alice.command("dm", {"to": "bob", "type": "note", "data": SECRET})
        for tab in (tab1, tab2, tab3):
            assert await first_msg(tab) == Msg("note", SECRET, None)
        await markers(alice, alice, carol)
        # Exactly once per tab: the next message each tab gets is the following one.
        await alice.command("dm", {"to": "bob", "type": "after"})
        for tab in (tab1, tab2, tab3):
            assert await first_msg(tab) == Msg("after", None, None)
            assert [m.type for m in tab.messages] == ["note", "after"], "surfaced once to the application"
        assert await stored_anywhere(node, SECRET["code"]) == []


async def test_a_principal_offline_when_sent_never_gets_it() -> None:
    """A message to a principal with no live connection is dropped: a tab that
    connects afterwards gets nothing of it, and no stream of the backend holds it
    (the "not persisted" guarantee).

    Mutation seen caught: ``Node.send_to`` also appends the message to the old
    persisted stream ``roomdm:{user}`` → ``stored_anywhere`` finds it → fails.
    Mutation seen caught: ``Node._on_signal`` keeps messages for principals with no
    receiver and the gateway hands them to the next connection of that principal
    → the late tab's first ``msg`` is the old note → fails.
    """
    app = make_app()
    async with serve(app) as node, connect(node, "alice") as alice:
        await alice.command("dm", {"to": "bob", "type": "note", "data": SECRET})
        async with connect(node, "bob") as late:
            await markers(alice, late)
            assert late.messages == [Msg("marker", None, None)]
        assert await stored_anywhere(node, SECRET["code"]) == []
        assert node.presence.receivers("bob") == (), "a closed connection leaves no receiver behind"


async def test_reaches_tabs_on_another_node_and_a_node_without_gateway_does_not_listen() -> None:
    """Two nodes sharing one ``memory://`` backend (the in-process stand-in for two
    processes on one Redis): a command on node A reaches bob's tabs on A and on B.
    A node without the ``gateway`` role sends but does not listen.

    Mutation seen caught: ``Node.__aenter__`` starts no signal feed → bob's tab on
    node B gets nothing → fails.
    """
    app = make_app()
    backend = await open_backend("memory://")
    async with (
        serve(app, backend, node_id="A") as a,
        serve(app, backend, node_id="B") as b,
        serve(app, backend, node_id="W", roles=frozenset({"api", "processor"})) as worker,
        connect(a, "alice") as alice,
        connect(a, "bob") as bob_a,
        connect(b, "bob") as bob_b,
        connect(b, "carol") as carol,
    ):
        await alice.command("dm", {"to": "bob", "type": "note", "data": SECRET})
        assert await first_msg(bob_a) == Msg("note", SECRET, None)
        assert await first_msg(bob_b) == Msg("note", SECRET, None)
        await markers(alice, carol)
        await rtcore.Context(worker, None).send_to("bob", "from-worker", [1, 2])
        for tab in (bob_a, bob_b):
            assert await first_msg(tab) == Msg("from-worker", [1, 2], None)
        assert len(backend.signals._feeds) == 2, "nodes A and B listen; the worker node does not"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("principal", "type_", "data"),
    [("", "note", None), ("bob", "", None), ("bob", "note", object())],
)
async def test_bad_input_is_bad_request(principal: str, type_: str, data: Any) -> None:
    """An empty principal or type, or data msgspec cannot encode, raise ``BadRequest``
    at the sender instead of reaching nobody silently."""
    async with serve(make_app()) as node:
        with pytest.raises(BadRequest):
            await node.send_to(principal, type_, data)


async def test_a_room_tracked_by_the_client_gets_it_as_a_direct_change() -> None:
    """A message naming a room the client follows goes to that room (``direct``
    change, ``room.on_message``), not to ``client.on_message``; one naming no room
    goes to ``client.on_message``.

    Mutation seen caught: ``ClientSession._route_rooms`` passes room messages on
    unrouted → the room's callback never fires → fails.
    """
    from tests.rooms.roomapp import make_app as make_room_app

    app, reg = make_room_app(tick_rate=None)
    async with serve(app) as node, connect(node, "a") as a, connect(node, "b") as b:
        room = await b.join_or_create("game")
        got_room: list[Any] = []
        got_client: list[Any] = []
        room.on_message("note", got_room.append)
        b.on_message(None, got_client.append)
        await a.command("room.join", {"room_id": room.id})
        await a.command("room.send", {"room_id": room.id, "type": "tell", "data": {"to": "b"}})
        await reg.send(rtcore.Context(node, None), "b", "promo", {"x": 1})
        assert await first_msg(b) == Msg("note", {"from": "a"}, room.id)
        assert await first_msg(b) == Msg("promo", {"x": 1}, None)
        assert got_room == [{"from": "a"}]
        assert got_client == [{"type": "promo", "data": {"x": 1}, "room": None}]


@given(
    principal=texts(max_size=8).filter(bool),
    type_=texts(max_size=8).filter(bool),
    room=st.none() | texts(max_size=8),
    data=json_values(),
)
def test_the_envelope_renders_the_same_msg_frame_in_both_encodings(principal: str, type_: str, room: str | None, data: Any) -> None:
    """Whatever the payload, the bus envelope decodes to the sender's principal, and
    the ``msg`` frame a node builds from it (MessagePack: the payload's bytes
    embedded as they are; JSON: decoded once) decodes, in each encoding, to the
    frame the sender meant.

    Mutation seen caught: ``DirectMessage.encoded`` embeds the raw MessagePack
    payload in the JSON frame too → the JSON frame does not decode → fails.
    """
    msg = decode_envelope(encode_envelope(principal, type_, data, room))
    assert msg is not None and msg.principal_id == principal
    for encoding in ("json", "msgpack"):
        frame = codec_for(encoding).decode_server(msg.encoded(encoding))
        assert frame == Msg(type_, data, room)
        assert msg.encoded(encoding) is msg.encoded(encoding), "built once per encoding"


def test_a_foreign_bus_message_is_dropped() -> None:
    """Bytes on the bus that are not an envelope (another program on the Redis
    channel) are ignored, not raised into the node's feed."""
    assert decode_envelope(b"hello") is None
    assert decode_envelope(msgspec.msgpack.encode({"to": "bob"})) is None


@pytest.mark.redis
async def test_after_redis_restarts_the_node_subscribes_again() -> None:
    """A ``redis://`` node whose subscriber connection died with Redis (kill -9,
    restart) receives direct messages again once Redis is back. Messages sent
    meanwhile are lost (at most once), so probes are sent until one arrives.

    Two layers resubscribe: coredis's PubSub retry policy, and
    ``_RedisSignalFeed.run``'s own loop when coredis gives up. Seen: the PubSub
    with ``NoRetryPolicy()`` alone still passes (the loop subscribes again);
    mutation seen caught: ``NoRetryPolicy()`` and the loop run once → no probe
    ever arrives → fails.
    """
    if redis_server_binary() is None:
        if require_services():
            pytest.fail("redis-server is not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    server = RedisServer(persistent=False)
    server.start()
    try:
        async with serve(make_app(), server.url) as node, connect(node, "bob") as bob:
            ctx = rtcore.Context(node, None)
            await ctx.send_to("bob", "before")
            assert await first_msg(bob) == Msg("before", None, None)
            server.restart()
            got: Msg | None = None
            with anyio.fail_after(60):
                probe = 0
                while got is None:
                    probe += 1
                    with contextlib.suppress(BackendError):
                        await ctx.send_to("bob", "probe", probe)
                    with anyio.move_on_after(0.25):
                        got = await first_msg(bob, timeout=None)
            assert got.type == "probe"
            await ctx.send_to("bob", "after")
            while (msg := await first_msg(bob)).type == "probe":
                pass  # a probe that arrived after its wait
            assert msg == Msg("after", None, None)
    finally:
        server.stop()

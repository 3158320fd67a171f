"""Every limit, end to end, produces its documented error (real sockets)."""

from __future__ import annotations

import socket
import time
import uuid

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from rtcore import Limits
from rtcore.engine.hub import OutboxLimits
from rtcore.transport import ServerLimits
from tests.ws_client import connect

from .conftest import TIMEOUT, http_url, peer, serving, ws_url
from .netapp import app

pytestmark = pytest.mark.anyio


async def wait_until(predicate: object, timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.01)


async def test_message_too_big_closes_1009_and_welcome_announces_the_real_limit() -> None:
    async with serving(app, limits=ServerLimits(max_message_bytes=4096)) as server, peer(server) as p:
        assert p.welcome["limits"]["max_message_size"] == 4096
        assert (await p.cmd("echo", "x" * 3000))["t"] == "ok"
        await p.ws.send('{"t":"cmd","id":1,"name":"echo","args":"' + "x" * 5000 + '"}')
        code, _ = await p.closed()
        assert code == 1009


async def test_http_body_too_big_is_413() -> None:
    async with serving(app, limits=ServerLimits(max_body_bytes=1024)) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        r = await http.post(http_url(server, "/v1/cmd/echo"), content=b'"' + b"x" * 2000 + b'"')
        assert r.status_code == 413


async def test_no_hello_in_time_gets_bye_timeout_and_1008() -> None:
    async with serving(app, limits=ServerLimits(handshake_timeout=0.3)) as server, peer(server, hello=False) as p:
        code, frames = await p.closed()
        assert code == 1008
        assert frames == [{"t": "bye", "code": "timeout", "message": frames[0]["message"], "reconnect": True}]


async def test_idle_session_gets_bye_idle_timeout_and_1001() -> None:
    async with serving(app, session_limits=Limits(idle_timeout=0.3)) as server, peer(server) as p:
        assert p.welcome["limits"]["idle_timeout"] == 0.3
        code, frames = await p.closed()
        assert code == 1001
        assert [(f["t"], f["code"], f["reconnect"]) for f in frames] == [("bye", "idle_timeout", True)]


@pytest.mark.asyncio_only(reason="pauses reading on the asyncio transport of the websockets client to stop its pongs")
async def test_missing_pongs_close_1011() -> None:
    limits = ServerLimits(ping_interval=0.1, ping_timeout=0.2, close_timeout=0.3)
    async with serving(app, limits=limits) as server:
        async with connect(
            ws_url(server), subprotocols=[Subprotocol("rtcore.v1.json")], ping_interval=None, open_timeout=TIMEOUT
        ) as ws:
            await ws.send('{"t":"hello","v":1}')
            assert '"welcome"' in await ws.recv()
            assert server.node is not None
            ws.transport.pause_reading()  # this client stops answering pings
            await wait_until(lambda: not server.sessions)
            ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed) as info:
                with anyio.fail_after(TIMEOUT):
                    while True:
                        await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011


async def test_too_many_subscriptions() -> None:
    async with serving(app, session_limits=Limits(max_subscriptions=2)) as server, peer(server) as p:
        assert (await p.sub("room:a"))["t"] == "subbed"
        assert (await p.sub("room:b"))["t"] == "subbed"
        err = await p.sub("room:c")
        assert (err["t"], err["code"], err["retryable"]) == ("err", "too_many_subscriptions", False)
        await p.request({"t": "unsub", "stream": "room:a"})
        assert (await p.sub("room:c"))["t"] == "subbed"


async def test_command_rate_limit_is_retryable_and_keeps_the_connection() -> None:
    async with serving(app, session_limits=Limits(command_rate=0.001, command_burst=2)) as server, peer(server) as p:
        assert (await p.cmd("add", {"a": 1, "b": 1}))["t"] == "ok"
        assert (await p.cmd("add", {"a": 1, "b": 1}))["t"] == "ok"
        err = await p.cmd("add", {"a": 1, "b": 1})
        assert (err["t"], err["code"], err["retryable"]) == ("err", "rate_limited", True)
        assert (await p.request({"t": "ping"}))["t"] == "pong"


async def test_header_block_too_big_is_431() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        headers = {f"x-filler-{i}": "a" * 4000 for i in range(5)}  # 20 KB > 16 KiB
        r = await http.get(http_url(server, "/v1/health"), headers=headers)
        assert r.status_code == 431


def _slow_header_client(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # ...and never the blank line
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


async def test_slow_headers_get_408() -> None:
    async with serving(app, limits=ServerLimits(header_timeout=0.3)) as server:
        data = await anyio.to_thread.run_sync(_slow_header_client, server.port)
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_origin_allowlist_refuses_with_403_before_upgrade() -> None:
    async with serving(app, allowed_origins=["https://game.example"]) as server:
        for origin in ("https://evil.example", None):
            with pytest.raises(InvalidStatus) as info:
                async with connect(ws_url(server), origin=Origin(origin) if origin else None, open_timeout=TIMEOUT):
                    pass
            assert info.value.response.status_code == 403
        async with peer(server, origin="https://game.example") as p:
            assert p.welcome["t"] == "welcome"


async def test_bad_token_on_websocket_is_err_unauthenticated_then_1008() -> None:
    async with serving(app) as server:
        async with peer(server, hello=False) as p:
            await p.send({"t": "hello", "v": 1, "token": "bad"})
            code, frames = await p.closed()
            assert code == 1008
            assert [(f["t"], f["code"]) for f in frames] == [("err", "unauthenticated")]
        # The token may come with the upgrade request instead (browsers: ?token=).
        async with peer(server, hello=False, query="token=bad") as p:
            await p.send({"t": "hello", "v": 1})
            code, frames = await p.closed()
            assert code == 1008 and frames[0]["code"] == "unauthenticated"
        async with peer(server, hello=False, additional_headers={"Authorization": "Bearer ada"}) as p:
            await p.send({"t": "hello", "v": 1})
            assert (await p.next())["principal"] == "ada"


async def test_bad_token_over_http_is_401() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        r = await http.post(http_url(server, "/v1/cmd/add"), json={"a": 1, "b": 1}, headers={"Authorization": "Bearer bad"})
        assert r.status_code == 401
        assert r.json()["code"] == "unauthenticated"
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_token_expiry_without_refresh_closes_1008() -> None:
    async with serving(app, token_grace=0.2) as server, peer(server, token="exp:0.2:ada") as p:
        code, frames = await p.closed()
        assert code == 1008
        assert [(f["t"], f["code"]) for f in frames] == [("err", "token_expired"), ("bye", "token_expired")]
        assert frames[0]["id"] is None and frames[0]["retryable"] is True
        assert frames[1]["reconnect"] is False


async def test_token_refresh_keeps_the_session() -> None:
    async with serving(app, token_grace=0.3) as server, peer(server, token="exp:0.2:ada") as p:
        expired = await p.next()
        assert (expired["t"], expired["code"]) == ("err", "token_expired")
        ok = await p.request({"t": "auth", "token": "ada"})
        assert ok["t"] == "ok" and ok["result"] == {"principal": "ada"}
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:  # well past the grace period
            assert (await p.request({"t": "ping"}))["t"] == "pong"
            await anyio.sleep(0.05)
        # Refreshing as someone else is refused.
        err = await p.request({"t": "auth", "token": "bob"})
        assert err["code"] == "unauthenticated"


async def test_websocket_reader_that_stops_reading_gets_bye_slow_consumer_and_4008() -> None:
    """A WebSocket subscriber that stops reading is cut at its outbox bound: ``bye`` ``slow_consumer``, close 4008.

    The client (``max_queue=2``, no permessage-deflate: the ASGI servers would
    otherwise compress the padding away) stops reading while ~4 KB events are published;
    its socket buffers fill, the server's writer blocks, the outbox fills. The
    cut happens at the bound (peak never above it), and once the client reads
    again it gets events 1..k in order, then ``bye`` ``slow_consumer``
    (``reconnect: true``), then close 4008. Also run under the ASGI servers
    (tests/net/test_asgi.py), where the block comes from the ASGI ``send``.

    Mutation: ``AsgiWebSocket.close`` sends code 1000 whatever it is asked → the
    ASGI runs fail (1000 != 4008).
    Mutation: ``_Connection._slow`` does not close the session → no 4008 → fails.
    """
    stream = f"room:{uuid.uuid4().hex[:8]}"
    limits = OutboxLimits(max_bytes=64 * 1024, max_frames=1000)
    pad = "x" * 4000
    async with serving(app, outbox=limits) as server, peer(server, max_queue=2, compression=None) as p:
        assert server.node is not None
        assert (await p.sub(stream))["t"] == "subbed"
        [session] = [s for s in server.sessions if s.info().kind == "websocket"]
        outbox = session.outbox
        published = 0
        while not outbox.slow and published < 5_000:  # 20 MB: far beyond any socket buffer
            await server.node.publish(stream, "blob", {"pad": pad})
            published += 1
            await anyio.lowlevel.checkpoint()
        assert outbox.slow
        assert outbox.peak_bytes <= limits.max_bytes
        code, frames = await p.closed()
    assert code == 4008
    bye = frames[-1]
    assert (bye["t"], bye["code"], bye["reconnect"]) == ("bye", "slow_consumer", True)
    offsets = [f["offset"] for f in frames if f["t"] == "evt"]
    assert offsets == list(range(1, len(offsets) + 1))
    assert len(offsets) < published

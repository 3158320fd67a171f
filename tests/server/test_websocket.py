"""WebSocket upgrade and transport over real sockets, the websockets library as client."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable

import anyio
import anyio.lowlevel
import pytest
import sniffio
from websockets.exceptions import ConnectionClosed as ClientClosed
from websockets.exceptions import InvalidStatus

from rtcore.transport import (
    ConnectionClosed,
    FrameTransport,
    ServerLimits,
    UpgradeRequest,
    WebSocketPolicy,
)
from rtcore.transport.websocket import InlineReader
from tests.ws_client import connect

from .helpers import Recorder, basic_http, echo_handler, json_of, read_until_eof, running_server

pytestmark = pytest.mark.anyio

NO_PROXY = {"proxy": None, "compression": None}


async def wait_closed(rec: Recorder) -> ConnectionClosed:
    with anyio.fail_after(5):
        await rec.closed_event.wait()
    return rec.closed[-1]


async def test_default_subprotocol_is_json_text() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        async with connect(srv.ws_url, **NO_PROXY) as ws:
            assert ws.subprotocol is None  # not offered, so not answered
            await ws.send('{"t":"ping","id":1}')
            assert await ws.recv() == '{"t":"ping","id":1}'  # text frame back
        assert rec.requests[0].encoding == "json"
        assert rec.requests[0].subprotocol is None
        assert rec.requests[0].path == "/v1/ws"
        assert (await wait_closed(rec)).close_code == 1000


@pytest.mark.parametrize(
    ("offer", "chosen", "encoding"),
    [
        (["rtcore.v1.json"], "rtcore.v1.json", "json"),
        (["rtcore.v1.msgpack"], "rtcore.v1.msgpack", "msgpack"),
        (["other", "rtcore.v1.msgpack", "rtcore.v1.json"], "rtcore.v1.msgpack", "msgpack"),
    ],
)
async def test_subprotocol_negotiation(offer: list[str], chosen: str, encoding: str) -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        async with connect(srv.ws_url, subprotocols=offer, **NO_PROXY) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == chosen
            message: str | bytes = b"\x81\xa1t\xa4ping" if encoding == "msgpack" else '{"t":"ping"}'
            await ws.send(message)
            assert await ws.recv() == message  # binary for msgpack, text for json
        assert rec.requests[0].encoding == encoding


async def test_unknown_subprotocol_is_400() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.ws_url, subprotocols=["graphql-ws"], **NO_PROXY):  # type: ignore[list-item]
                pass
    response = info.value.response
    assert response.status_code == 400
    assert json_of(response.body or b"")["code"] == "bad_request"
    assert rec.requests == []


async def test_origin_allowlist() -> None:
    rec = Recorder()
    policy = WebSocketPolicy(allowed_origins=frozenset({"https://game.example"}))
    async with running_server(echo_handler(rec), basic_http(rec), policy=policy) as srv:
        async with connect(srv.ws_url, origin="https://game.example", **NO_PROXY) as ws:  # type: ignore[arg-type]
            await ws.send("ok")
            assert await ws.recv() == "ok"
        for origin in ("https://evil.example", None):
            with pytest.raises(InvalidStatus) as info:
                async with connect(srv.ws_url, origin=origin, **NO_PROXY):  # type: ignore[arg-type]
                    pass
            assert info.value.response.status_code == 403
            assert json_of(info.value.response.body or b"")["code"] == "forbidden"
    assert len(rec.requests) == 1
    assert rec.requests[0].origin == "https://game.example"


async def test_token_and_query_reach_the_handler() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        async with connect(srv.ws_url + "?token=q1&x=2", **NO_PROXY):
            pass
        headers = {"Authorization": "Bearer h1"}
        async with connect(srv.ws_url + "?token=q1", additional_headers=headers, **NO_PROXY):
            pass
    assert rec.requests[0].token == "q1"
    assert rec.requests[0].query == {"token": "q1", "x": "2"}
    assert rec.requests[1].token == "h1"  # the header wins over the query
    assert rec.requests[0].peer is not None and rec.requests[0].peer[0] == "127.0.0.1"


async def test_plain_get_on_ws_path_is_426() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        import httpx

        async with httpx.AsyncClient() as client:
            r = await client.get(srv.ws_url.replace("ws://", "http://"))
    assert r.status_code == 426
    assert r.json()["code"] == "bad_request"


async def test_message_too_big_closes_1009() -> None:
    rec = Recorder()
    limits = ServerLimits(max_message_bytes=1024)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        async with connect(srv.ws_url, **NO_PROXY) as ws:
            await ws.send("a" * 1024)  # exactly at the limit: fine
            assert await ws.recv() == "a" * 1024
            await ws.send("é" * 600)  # 600 characters, 1200 bytes: counted in bytes
            with pytest.raises(ClientClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert (await wait_closed(rec)).close_code == 1009


async def test_fragmented_oversize_closes_1009() -> None:
    rec = Recorder()
    limits = ServerLimits(max_message_bytes=1024)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        async with connect(srv.ws_url, **NO_PROXY) as ws:
            # Every fragment is small; together they exceed the limit. The close
            # may reach the client while it still sends fragments (trio's
            # threaded client) or when it reads.
            with pytest.raises(ClientClosed) as info:
                await ws.send([b"x" * 300 for _ in range(5)])
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert (await wait_closed(rec)).close_code == 1009


async def test_too_many_fragments_closes_1009() -> None:
    rec = Recorder()
    limits = ServerLimits(max_fragments=4)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        async with connect(srv.ws_url, **NO_PROXY) as ws:
            # websockets ends a fragmented message with an empty final frame:
            # three chunks are four frames, the most allowed.
            await ws.send([b"a", b"b", b"c"])
            assert await ws.recv() == "abc"  # echoed in the json encoding: text
            # The server closes after the fifth frame: under load that close can
            # reach the client while it is still sending, so send may raise too.
            with pytest.raises(ClientClosed) as info:
                await ws.send([b"x"] * 10)
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_deflate_is_off_by_default() -> None:
    rec = Recorder()
    async with (
        running_server(echo_handler(rec), basic_http(rec)) as srv,
        connect(srv.ws_url, proxy=None, compression="deflate") as ws,
    ):
        assert "sec-websocket-extensions" not in ws.response.headers
        await ws.send("plain")
        assert await ws.recv() == "plain"


async def test_deflate_round_trip_and_bomb_is_bounded() -> None:
    rec = Recorder()
    policy = WebSocketPolicy(permessage_deflate=True)
    async with running_server(echo_handler(rec), basic_http(rec), policy=policy) as srv:
        async with connect(srv.ws_url, proxy=None, compression="deflate", max_size=None) as ws:
            assert ws.response.headers["sec-websocket-extensions"].startswith("permessage-deflate")
            await ws.send("compress me " * 1000)
            assert await ws.recv() == "compress me " * 1000
            # 64 MiB of zeros deflate to ~64 KiB: a bomb against a 1 MiB limit.
            await ws.send(bytes(64 * 1024 * 1024))
            with pytest.raises(ClientClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert (await wait_closed(rec)).close_code == 1009


async def test_server_answers_pings() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv, connect(srv.ws_url, **NO_PROXY) as ws:
        pong = await ws.ping(b"abc")
        with anyio.fail_after(5):
            await pong


async def test_client_answering_pings_stays_connected() -> None:
    rec = Recorder()
    limits = ServerLimits(ping_interval=0.05, ping_timeout=0.5)
    async with (
        running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv,
        connect(srv.ws_url, **NO_PROXY) as ws,
    ):
        await anyio.sleep(0.3)  # several server pings, answered by the client library
        await ws.send("still here")
        assert await ws.recv() == "still here"


def _handshake(sock: socket.socket, path: str = "/v1/ws") -> bytes:
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return head


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Parse unmasked server frames (tests only need short ones)."""
    out = []
    while data:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if n == 126:
            (n,) = struct.unpack("!H", data[2:4])
            offset = 4
        out.append((opcode, data[offset : offset + n]))
        data = data[offset + n :]
    return out


async def test_ping_timeout_closes_1011() -> None:
    rec = Recorder()
    limits = ServerLimits(ping_interval=0.05, ping_timeout=0.2, close_timeout=0.2)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:

        def silent_client() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                head = _handshake(sock)
                return head, read_until_eof(sock)  # never answers the pings

        head, data = await anyio.to_thread.run_sync(silent_client)
        assert head.startswith(b"HTTP/1.1 101 ")
        frames = _frames(data)
        assert frames[0][0] == 0x9  # a ping
        close = next(payload for opcode, payload in frames if opcode == 0x8)
        assert struct.unpack("!H", close[:2])[0] == 1011
        assert (await wait_closed(rec)).close_code == 1011


async def test_invalid_utf8_fails_the_connection_1007() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                _handshake(sock)
                mask = b"\x00\x00\x00\x00"
                sock.sendall(b"\x81\x82" + mask + b"\xff\xfe")  # text frame, invalid UTF-8
                return read_until_eof(sock)

        data = await anyio.to_thread.run_sync(client)
        close = next(payload for opcode, payload in _frames(data) if opcode == 0x8)
        assert struct.unpack("!H", close[:2])[0] == 1007
        assert (await wait_closed(rec)).close_code == 1007


async def test_first_frame_right_behind_the_handshake() -> None:
    received: list[bytes | str] = []
    done = anyio.Event()

    async def collector(transport: FrameTransport, request: UpgradeRequest) -> None:
        try:
            while True:
                received.append(await transport.receive())
        finally:
            done.set()

    rec = Recorder()
    async with running_server(collector, basic_http(rec)) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                key = base64.b64encode(os.urandom(16))
                # Handshake, one text frame and a close frame in one write.
                sock.sendall(
                    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    b"\x81\x82\x00\x00\x00\x00hi" + b"\x88\x82\x00\x00\x00\x00\x03\xe8"
                )
                return read_until_eof(sock)

        data = await anyio.to_thread.run_sync(client)
        with anyio.fail_after(5):
            await done.wait()
    # The message that arrived before the close is still delivered; the close is echoed.
    assert received == ["hi"]
    assert _frames(data.partition(b"\r\n\r\n")[2]) == [(0x8, b"\x03\xe8")]


async def test_server_close_reaches_client() -> None:
    async def closer(transport: FrameTransport, request: UpgradeRequest) -> None:
        await transport.send([b'{"t":"err","code":"unauthenticated"}'])
        await transport.close(1008, "bad token")

    rec = Recorder()
    async with running_server(closer, basic_http(rec)) as srv, connect(srv.ws_url, **NO_PROXY) as ws:
        assert await ws.recv() == '{"t":"err","code":"unauthenticated"}'
        with pytest.raises(ClientClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "bad token")


async def test_send_after_close_raises_connection_closed() -> None:
    errors: list[ConnectionClosed] = []
    done = anyio.Event()

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        with contextlib.suppress(ConnectionClosed):
            await transport.receive()
        try:
            await transport.send([b"too late"])
        except ConnectionClosed as exc:
            errors.append(exc)
        done.set()

    rec = Recorder()
    async with running_server(handler, basic_http(rec)) as srv:
        async with connect(srv.ws_url, **NO_PROXY) as ws:
            await ws.close(1001, "bye")
        with anyio.fail_after(5):
            await done.wait()
    assert (errors[0].close_code, errors[0].reason) == (1001, "bye")


async def test_batch_is_delivered_in_order_with_every_size() -> None:
    payloads = [b"a" * 10, b"b" * 125, b"c" * 126, b"d" * 65535, b"e" * 65536, b"f" * 200_000, b""]

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        await transport.send(payloads)
        await transport.receive()

    rec = Recorder()
    async with (
        running_server(handler, basic_http(rec)) as srv,
        connect(srv.ws_url, subprotocols=["rtcore.v1.msgpack"], **NO_PROXY) as ws,  # type: ignore[list-item]
    ):
        got = [await ws.recv() for _ in payloads]
    assert got == payloads


async def test_handler_exception_closes_1011() -> None:
    async def broken(transport: FrameTransport, request: UpgradeRequest) -> None:
        raise RuntimeError("session bug")

    rec = Recorder()
    async with running_server(broken, basic_http(rec)) as srv, connect(srv.ws_url, **NO_PROXY) as ws:
        with pytest.raises(ClientClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011


async def test_close_is_bounded_when_the_peer_never_answers() -> None:
    closed = anyio.Event()

    async def closer(transport: FrameTransport, request: UpgradeRequest) -> None:
        await transport.close(1000)  # the raw client below never answers the close frame
        closed.set()

    rec = Recorder()
    limits = ServerLimits(close_timeout=0.2)
    async with running_server(closer, basic_http(rec), limits=limits) as srv:
        data = await _mute_client(srv.port)
        with anyio.fail_after(5):
            await closed.wait()
    assert _frames(data) == [(0x8, b"\x03\xe8")]


async def test_close_nowait_sends_frames_and_close_in_one_go_and_is_bounded() -> None:
    """``close_nowait`` (graceful shutdown's close): the messages, then the close
    frame, and a peer that never answers is still dropped after ``close_timeout``.

    On trio (no fast path) it refuses and the handler closes the awaited way.
    Mutations seen caught: no ``_bound_close_wait()`` in ``close_nowait`` → the
    mute client never sees EOF (its 5 s socket timeout) → fails; the close
    frame written before the messages → frame order differs → fails.
    """
    used: list[bool] = []

    async def closer(transport: FrameTransport, request: UpgradeRequest) -> None:
        done = transport.close_nowait([b"bye"], 1001, "shutdown")  # type: ignore[attr-defined]
        used.append(done)
        if not done:
            await transport.send([b"bye"])
            await transport.close(1001, "shutdown")
            return
        with contextlib.suppress(ConnectionClosed):
            while True:
                await transport.receive()  # ends when the transport gives up on the peer

    rec = Recorder()
    limits = ServerLimits(close_timeout=0.2)
    async with running_server(closer, basic_http(rec), limits=limits) as srv:
        data = await _mute_client(srv.port)
    assert _frames(data) == [(0x1, b"bye"), (0x8, b"\x03\xe9shutdown")]
    assert used == [_is_asyncio()]


async def _mute_client(port: int) -> bytes:
    """Open a WebSocket and never answer: every byte the server sends until it gives up (EOF)."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            _handshake(sock)
            return read_until_eof(sock)  # EOF once the server gives up waiting

    return await anyio.to_thread.run_sync(run)


def _is_asyncio() -> bool:
    return sniffio.current_async_library() == "asyncio"


async def test_send_to_a_peer_that_does_not_read_times_out() -> None:
    outcome: list[ConnectionClosed] = []
    done = anyio.Event()

    async def flooder(transport: FrameTransport, request: UpgradeRequest) -> None:
        try:
            while True:
                await transport.send([b"x" * 1_000_000])
        except ConnectionClosed as exc:
            outcome.append(exc)
        finally:
            done.set()

    rec = Recorder()
    limits = ServerLimits(send_timeout=0.2, ping_interval=None)
    async with running_server(flooder, basic_http(rec), limits=limits) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            await anyio.to_thread.run_sync(_handshake, sock)
            with anyio.fail_after(10):
                await done.wait()  # the client never reads: the server's writes stall
    assert outcome[0].close_code == 1006
    assert "send timeout" in outcome[0].reason


async def test_messages_before_a_protocol_error_are_answered_first() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                _handshake(sock)
                mask = b"\x00\x00\x00\x00"
                # A valid text frame, then a frame with a reserved opcode (0x5), in one write.
                sock.sendall(b"\x81\x82" + mask + b"hi" + b"\x85\x80" + mask)
                return read_until_eof(sock)

        data = await anyio.to_thread.run_sync(client)
    frames = _frames(data)
    assert frames[0] == (0x1, b"hi")  # the echo comes before the failure
    assert frames[1][0] == 0x8 and struct.unpack("!H", frames[1][1][:2])[0] == 1002


async def test_take_reader_awaits_what_the_callback_returns_before_the_next_message() -> None:
    """Backpressure of the inline reader: a message whose callback returned an
    awaitable holds back every later message (and the socket) until it is done.

    Mutation seen caught: ``_deliver`` not awaiting the callback's result →
    "after" is delivered while "block" is still pending → fails.
    """
    gate = anyio.Event()
    got: list[str | bytes] = []
    done = anyio.Event()

    def on_message(message: str | bytes) -> Awaitable[None] | None:
        got.append(message)
        if message == "after":
            done.set()
        return gate.wait() if message == "block" else None

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, InlineReader)
        assert transport.take_reader(on_message)  # before the first await: granted
        await transport.run_reader()

    rec = Recorder()
    async with running_server(handler, basic_http(rec)) as srv, connect(srv.ws_url, **NO_PROXY) as ws:
        await ws.send("block")
        await ws.send("after")
        with anyio.fail_after(5):
            while not got:
                await anyio.sleep(0.01)
        await anyio.wait_all_tasks_blocked()
        assert got == ["block"]
        gate.set()
        with anyio.fail_after(5):
            await done.wait()
        assert got == ["block", "after"]


async def test_take_reader_is_refused_once_the_reader_task_runs() -> None:
    """Once the reader task runs, ``take_reader`` is refused: two read loops on
    one socket would split its frames between them.

    Mutation seen caught: ``take_reader`` without its "already reading"
    check (``_reading`` / ``_inbox``) → it is granted while the reader task
    already reads → fails.
    """
    claimed: list[bool] = []

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        message = await transport.receive()  # the reader task has delivered a message: it runs
        assert isinstance(transport, InlineReader)
        claimed.append(transport.take_reader(lambda m: None))
        await transport.send([message.encode() if isinstance(message, str) else message])

    rec = Recorder()
    async with running_server(handler, basic_http(rec)) as srv, connect(srv.ws_url, **NO_PROXY) as ws:
        await ws.send("hi")
        with anyio.fail_after(5):
            assert await ws.recv() == "hi"
        assert claimed == [False]


def _live_upgrade_requests() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is UpgradeRequest)


async def test_upgrade_request_is_released_once_the_handler_drops_it() -> None:
    """Neither the HTTP connection nor run_websocket keeps the upgrade request
    (its header list, ~1.5 kB) for the connection's lifetime: a handler that
    reads what it needs and drops it leaves none alive while it serves.

    Mutation seen caught: ``await run_websocket(transport, request, ...)`` in
    ``HttpConnection.run`` (its local holds the request) → fails; so does
    ``await handler(transport, request)`` in ``run_websocket``.
    """
    seen: list[str | None] = []
    counted = anyio.Event()
    alive: list[int] = []

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        seen.append(request.token)
        del request
        message = await transport.receive()
        alive.append(_live_upgrade_requests())
        counted.set()
        await transport.send([message.encode() if isinstance(message, str) else message])
        with contextlib.suppress(ConnectionClosed):
            await transport.receive()

    rec = Recorder()
    async with running_server(handler, basic_http(rec)) as srv:
        async with connect(srv.ws_url + "?token=t0", **NO_PROXY) as ws:
            await ws.send("hi")
            with anyio.fail_after(5):
                await counted.wait()
                assert await ws.recv() == "hi"
    assert seen == ["t0"]
    assert alive == [0]


def test_upgrade_and_connection_tokens_in_every_form() -> None:
    """``Upgrade``/``Connection`` tokens are found alone (the fast path), in
    comma lists, with spaces around them, in any case and on repeated lines;
    empty values and other tokens are not upgrades.

    Mutation seen caught: the single-token fast path of ``_tokens`` not
    stripping the value → ``b" websocket "`` is not an upgrade → fails.
    """
    from rtcore.transport.handshake import _tokens, is_websocket_upgrade

    assert is_websocket_upgrade([(b"upgrade", b"websocket")])
    assert is_websocket_upgrade([(b"upgrade", b" WebSocket ")])
    assert is_websocket_upgrade([(b"upgrade", b"h2c, websocket")])
    assert is_websocket_upgrade([(b"upgrade", b"h2c"), (b"upgrade", b"websocket")])
    assert not is_websocket_upgrade([(b"upgrade", b"")])
    assert not is_websocket_upgrade([(b"upgrade", b"h2c")])
    assert not is_websocket_upgrade([(b"connection", b"websocket")])
    assert _tokens([(b"connection", b"keep-alive, Upgrade"), (b"connection", b" close ")], b"connection") == ["keep-alive", "Upgrade", "close"]
    assert _tokens([(b"connection", b" , ,")], b"connection") == []

"""Listener: bound port, TLS, graceful shutdown, many connections."""

from __future__ import annotations

import resource
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed as ClientClosed

from rtcore.transport import (
    ConnectionClosed,
    FrameTransport,
    HttpRequest,
    HttpResponse,
    ServerControl,
    ServerLimits,
    StreamingResponse,
    UpgradeRequest,
    serve,
)
from rtcore.transport.websocket import WebSocketTransport
from tests.ws_client import connect

from .helpers import Recorder, basic_http, echo_handler, running_server

pytestmark = pytest.mark.anyio

NO_PROXY = {"proxy": None, "compression": None}


async def test_port_zero_reports_the_bound_port() -> None:
    rec = Recorder()
    control = ServerControl()
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, echo_handler(rec), basic_http(rec), port=0, control=control))
        assert port == control.port == await control.wait_ready()
        assert port > 0
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/echo")).status_code == 200
        await control.stop(grace=1)
    assert control.stopped
    assert control.connections == 0


async def test_graceful_shutdown_lets_sessions_say_bye() -> None:
    async def session(transport: FrameTransport, request: UpgradeRequest) -> None:
        await transport.send([b'{"t":"welcome"}'])
        await request.shutdown.wait()
        assert request.shutdown.remaining() > 0
        await transport.send([b'{"t":"bye","code":"shutdown","reconnect":true}'])
        await transport.close(1001, "server shutdown")

    rec = Recorder()
    control = ServerControl()
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, session, basic_http(rec), control=control))
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", **NO_PROXY) as ws:
            assert await ws.recv() == '{"t":"welcome"}'
            tg.start_soon(partial(control.stop, grace=5.0))
            assert await ws.recv() == '{"t":"bye","code":"shutdown","reconnect":true}'
            with pytest.raises(ClientClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert control.stopped


async def test_shutdown_deadline_closes_remaining_websockets_1001() -> None:
    rec = Recorder()
    control = ServerControl()
    limits = ServerLimits(close_timeout=1.0)
    async with anyio.create_task_group() as tg:
        # The echo handler ignores the shutdown: the server closes it at the deadline.
        port = await tg.start(partial(serve, echo_handler(rec), basic_http(rec), limits=limits, control=control))
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", **NO_PROXY) as ws:
            control.begin_stop(grace=0.2)
            with pytest.raises(ClientClosed) as info:
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        with anyio.fail_after(5):
            await control.stop()
    assert rec.closed[0].close_code == 1001


async def test_shutdown_deadline_leaves_websockets_already_closing_to_their_own_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebSocket whose handler already sent its close frame is not closed a second time at the deadline.

    It ends by itself (the peer's reply or its own ``close_timeout``); a
    second close task per connection only waited for the same reply, and
    with 10,000 connections closing (a server restart) the deadline passed
    while they closed and it doubled the shutdown's work.

    Mutation seen caught: the forced pass without ``if not transport.closed``
    → ``close`` is called twice on the transport → fails.
    """
    calls: list[int] = []
    plain_close = WebSocketTransport.close

    async def counted(self: WebSocketTransport, code: int = 1000, reason: str = "") -> None:
        calls.append(code)
        await plain_close(self, code, reason)

    monkeypatch.setattr(WebSocketTransport, "close", counted)

    async def closing(transport: FrameTransport, request: UpgradeRequest) -> None:
        await request.shutdown.wait()
        await transport.close(1001, "going away")  # the peer never answers: waits close_timeout

    control = ServerControl()
    limits = ServerLimits(close_timeout=1.0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, closing, basic_http(Recorder()), limits=limits, control=control))
        async with await anyio.connect_tcp("127.0.0.1", port) as sock:
            await sock.send(
                b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert (await sock.receive()).startswith(b"HTTP/1.1 101")
            control.begin_stop(grace=0.1)  # the deadline passes while the handler's close waits
            close_frame = await sock.receive()
            assert close_frame[:1] == b"\x88" and close_frame[2:4] == (1001).to_bytes(2, "big")
            with anyio.fail_after(10):
                await control.stop()
    assert calls.count(1001) == 1  # the handler's (the 1000 after it: run_websocket's when the handler returns)


async def test_shutdown_refuses_new_connections_and_closes_idle_keep_alive() -> None:
    """Mutation seen caught (asyncio): ``_wait_for_request`` not listing its
    ``ProtocolStream`` wait in ``state.interruptible`` → the idle keep-alive
    connection stays open through the shutdown → fails."""
    rec = Recorder()
    control = ServerControl()
    limits = ServerLimits(keepalive_timeout=60)
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, echo_handler(rec), basic_http(rec), limits=limits, control=control))
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/echo")).status_code == 200
            assert control.connections == 1  # idle keep-alive connection
            with anyio.fail_after(5):
                await control.stop(grace=10)  # returns long before the grace: nothing is busy
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/echo")


async def test_shutdown_ends_sse_streams() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await anyio.sleep_forever()

    async def on_http(request: HttpRequest) -> HttpResponse | StreamingResponse:
        return StreamingResponse(200, [(b"content-type", b"text/event-stream")], events())

    rec = Recorder()
    control = ServerControl()
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, echo_handler(rec), on_http, control=control))
        async with httpx.AsyncClient() as client, client.stream("GET", f"http://127.0.0.1:{port}/sse") as r:
            chunks = r.aiter_text()
            assert await chunks.__anext__() == "data: 1\n\n"
            control.begin_stop(grace=5)
            rest = [c async for c in chunks]  # the stream ends cleanly (terminating chunk)
        assert rest == []
        with anyio.fail_after(5):
            await control.stop()


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for a self-signed localhost certificate."""
    try:
        import trustme
    except ImportError:
        trustme = None
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if trustme is not None:
        ca = trustme.CA()
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
        ca.configure_trust(client)
        return server, client
    if shutil.which("openssl") is None:
        pytest.skip("neither trustme nor openssl is available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server.load_cert_chain(cert, key)
    client.load_verify_locations(cert)
    return server, client


async def test_tls_http_and_websocket(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_contexts
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec), ssl_context=server_ctx) as srv:
        async with httpx.AsyncClient(verify=client_ctx) as client:
            r = await client.get(f"https://localhost:{srv.port}/echo")
            assert r.status_code == 200
            assert r.json()["method"] == "GET"
        async with connect(f"wss://localhost:{srv.port}/v1/ws", ssl=client_ctx, **NO_PROXY) as ws:
            await ws.send("over tls")
            assert await ws.recv() == "over tls"
        # A plain-text client on the TLS port is dropped, and the server goes on.
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"http://127.0.0.1:{srv.port}/echo")
        async with httpx.AsyncClient(verify=client_ctx) as client:
            assert (await client.get(f"https://localhost:{srv.port}/echo")).status_code == 200


# -- scale ---------------------------------------------------------------------------


@pytest.mark.asyncio_only(
    reason="a thousand clients: under trio the websockets client is its threaded one, one thread per blocking call"
)
async def test_thousand_concurrent_websockets_all_receive_a_broadcast() -> None:
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * n + 256  # client and server end of each connection, plus slack
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"fd limit {hard} is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    transports: list[FrameTransport] = []
    all_in = anyio.Event()

    async def subscriber(transport: FrameTransport, request: UpgradeRequest) -> None:
        transports.append(transport)
        if len(transports) == n:
            all_in.set()
        try:
            while True:
                await transport.receive()
        except ConnectionClosed:
            pass

    rec = Recorder()
    received: list[str] = []
    limits = ServerLimits(ping_interval=None)
    async with running_server(subscriber, basic_http(rec), limits=limits, backlog=n) as srv:

        async def client(ready: anyio.Event) -> None:
            async with connect(srv.ws_url, ping_interval=None, open_timeout=60, **NO_PROXY) as ws:
                ready.set()
                message = await ws.recv()
                assert isinstance(message, str)
                received.append(message)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for start in range(0, n, 100):  # connect in waves of 100
                    waves = [anyio.Event() for _ in range(start, min(n, start + 100))]
                    for ready in waves:
                        tg.start_soon(client, ready)
                    for ready in waves:
                        await ready.wait()
                await all_in.wait()
                frame = b'{"t":"evt","stream":"room:7","offset":1}'
                async with anyio.create_task_group() as fan_out:
                    for transport in transports:
                        fan_out.start_soon(transport.send, [frame])
    assert len(received) == n
    assert set(received) == {'{"t":"evt","stream":"room:7","offset":1}'}

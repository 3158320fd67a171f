"""The asyncio write fast path of WebSocketTransport (public anyio API only), and trio without it."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct

import anyio
import pytest
from websockets.asyncio.client import connect

from rtcore.transport import FrameTransport, ServerLimits, UpgradeRequest
from rtcore.transport.aiostream import ProtocolStream
from rtcore.transport.websocket import WebSocketTransport

from .helpers import Recorder, basic_http, running_server

pytestmark = pytest.mark.anyio

NO_PROXY = {"proxy": None, "compression": None, "max_size": None}
#: Far more than loopback socket buffers take in one write: the kernel takes part of it.
BIG = 32 << 20
#: No keepalive pings: a ping is a write, and would push leftover bytes out by itself.
NO_PING = ServerLimits(ping_interval=None)


@pytest.mark.asyncio_only(reason="the asyncio write fast path (loop.call_soon, ProtocolStream.write_now) exists only on asyncio; test_trio_writes_through_anyio covers trio")
async def test_send_nowait_leftover_goes_out_before_later_writes() -> None:
    """A batch the kernel takes only partly is completed before anything written after it.

    serve() runs asyncio connections on :class:`ProtocolStream`, whose
    transport keeps what the kernel did not take.

    Mutations: ``_write`` does not put ``_unsent`` first (anyio streams) → the
    client sees a corrupt stream or ``tail`` before ``big`` ends → fails;
    ``ProtocolStream.write_now`` writing while the transport still buffers
    (no ``get_write_buffer_size`` check) → ``second`` is accepted → fails.
    """
    big = os.urandom(BIG)
    seen: dict[str, object] = {}

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, WebSocketTransport)
        seen["fast"] = transport.call_soon is not None
        seen["accepted"] = transport.send_nowait([big])
        seen["partial"] = _left_over(transport)  # the scenario under test really happened
        seen["second"] = transport.send_nowait([b"second"])  # refused: bytes are left over
        await transport.send([b"tail"])
        await transport.receive()

    rec = Recorder()
    async with (
        running_server(handler, basic_http(rec), limits=NO_PING) as srv,
        connect(srv.ws_url, subprotocols=["rtcore.v1.msgpack"], **NO_PROXY) as ws,  # type: ignore[arg-type]
    ):
        with anyio.fail_after(10):
            got = [await ws.recv(), await ws.recv()]
    assert seen == {"fast": True, "accepted": True, "partial": True, "second": False}
    assert got[0] == big
    assert got[1] == b"tail"


@pytest.mark.asyncio_only(reason="the asyncio write fast path (loop.call_soon, ProtocolStream.write_now) exists only on asyncio; test_trio_writes_through_anyio covers trio")
async def test_send_nowait_leftover_is_flushed_without_another_write() -> None:
    """Nothing else is written after a partial ``send_nowait``: the flusher task completes it.

    On :class:`ProtocolStream` (what serve() uses on asyncio) the asyncio
    transport completes the write; on an anyio stream ``send_nowait`` starts
    ``_flush_unsent`` for it.

    Mutation seen caught: ``ProtocolStream.write_now`` handing the transport
    only the first 64 kB (``transport.write(data[:65536])``) and reporting
    all of it → the client never gets the whole message → fails (timeout).
    """
    big = os.urandom(BIG)

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, WebSocketTransport)
        assert transport.send_nowait([big])
        await transport.receive()

    rec = Recorder()
    async with (
        running_server(handler, basic_http(rec), limits=NO_PING) as srv,
        connect(srv.ws_url, subprotocols=["rtcore.v1.msgpack"], **NO_PROXY) as ws,  # type: ignore[arg-type]
    ):
        with anyio.fail_after(10):
            assert await ws.recv() == big


@pytest.mark.asyncio_only(reason="the asyncio write fast path (loop.call_soon, ProtocolStream.write_now) exists only on asyncio; test_trio_writes_through_anyio covers trio")
async def test_tls_streams_never_take_the_fast_path() -> None:
    """The fast path writes the raw socket: it must be off for anything but a plain TCP stream.

    Mutation: ``_direct_socket`` accepts any stream exposing ``raw_socket``
    (a TLS stream does, from its transport stream) → fails.
    """
    from anyio.streams.tls import TLSStream

    from rtcore.transport.websocket import _direct_socket

    async def serve_one(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_one)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            assert _direct_socket(stream) is not None
            read_bio, write_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
            ssl_object = ssl.create_default_context().wrap_bio(read_bio, write_bio)
            tls = TLSStream(stream, False, ssl_object, read_bio, write_bio)  # no handshake needed here
            # A TLS stream exposes its TCP stream's attributes, raw_socket included.
            assert tls.extra(anyio.abc.SocketAttribute.raw_socket, None) is not None
            assert _direct_socket(tls) is None
        tg.cancel_scope.cancel()


def _left_over(transport: WebSocketTransport) -> bool:
    """Bytes of an accepted write still waiting: in ``_unsent`` (anyio stream, os.write)
    or in the asyncio transport's buffer (:class:`ProtocolStream`, what serve() uses on asyncio)."""
    stream = transport._stream
    if isinstance(stream, ProtocolStream):
        assert stream._transport is not None
        return stream._transport.get_write_buffer_size() > 0
    return bool(transport._unsent)


def _read_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` unmasked, unfragmented server data frames."""
    buf = b""
    out: list[bytes] = []

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            buf += chunk

    while len(out) < count:
        need(2)
        n, offset = buf[1] & 0x7F, 2
        if n == 126:
            need(4)
            (n,) = struct.unpack("!H", buf[2:4])
            offset = 4
        elif n == 127:
            need(10)
            (n,) = struct.unpack("!Q", buf[2:10])
            offset = 10
        need(offset + n)
        out.append(buf[offset : offset + n])
        buf = buf[offset + n :]
    return out


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_writes_through_anyio(anyio_backend: str) -> None:
    """On trio there is no fast path; batches still go out whole and in order."""
    payloads = [b"a" * 10, b"b" * 70_000, b"c" * 3_000_000, b""]
    fast: list[bool] = []

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, WebSocketTransport)
        fast.append(transport.call_soon is not None or transport.send_nowait([b"x"]))
        await transport.send(payloads)
        await transport.receive()

    def client(port: int) -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            key = base64.b64encode(os.urandom(16))
            sock.sendall(
                b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Protocol: rtcore.v1.msgpack\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 101 ")
            return _read_frames(sock, len(payloads))

    rec = Recorder()
    async with running_server(handler, basic_http(rec), limits=ServerLimits(ping_interval=None)) as srv:
        got = await anyio.to_thread.run_sync(client, srv.port)
    assert fast == [False]
    assert got == payloads

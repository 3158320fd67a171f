"""ProtocolStream: the asyncio connections' byte stream (rtcore.transport.aiostream).

serve() runs every plain-TCP connection on asyncio (uvloop too) on a
:class:`ProtocolStream` instead of anyio's socket stream; trio and TLS keep
anyio's. These tests pin what the upper layers rely on: reading pauses when
the application falls behind (TCP backpressure) and resumes when it catches
up, ``write_now`` never writes past bytes the transport still holds, a close
delivers what was accepted, and the end of the connection reads as anyio's
exceptions.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from rtcore.transport import FrameTransport, ServerLimits, UpgradeRequest
from rtcore.transport.aiostream import ProtocolStream
from rtcore.transport.websocket import WebSocketTransport

from .helpers import Recorder, basic_http, running_server

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def pair(high_water: int = 64 * 1024) -> AsyncIterator[tuple[ProtocolStream, socket.socket]]:
    """A ProtocolStream on one end of a connected socket pair, and the other end (blocking, for threads)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    _, stream = await loop.connect_accepted_socket(lambda: ProtocolStream(high_water=high_water, linger=5.0), ours)
    try:
        yield stream, theirs
    finally:
        await stream.aclose()
        theirs.close()


@pytest.mark.asyncio_only(reason="ProtocolStream is the asyncio path; trio keeps anyio's streams")
async def test_reading_pauses_at_high_water_and_resumes_when_read() -> None:
    """Unread bytes beyond ``high_water`` pause the transport's reading; reading them resumes it.

    Mutations seen caught: no ``pause_reading`` in ``data_received`` → the
    transport still reads → fails; no ``resume_reading`` in ``receive`` → the
    rest never arrives → fails (timeout).
    """
    async with pair(high_water=1024) as (stream, peer):
        transport = stream._transport
        assert transport is not None
        payload = bytes(range(256)) * 64  # 16 kB: far past high_water
        await anyio.to_thread.run_sync(peer.sendall, payload)
        with anyio.fail_after(5):
            while not stream._paused:
                await anyio.sleep(0.01)
        assert not transport.is_reading()
        got = b""
        with anyio.fail_after(5):
            while len(got) < len(payload):
                got += await stream.receive(4096)
        assert got == payload
        assert transport.is_reading()


@pytest.mark.asyncio_only(reason="ProtocolStream is the asyncio path; trio keeps anyio's streams")
async def test_write_now_refuses_while_bytes_wait_and_close_still_delivers_them() -> None:
    """``write_now`` takes nothing while the transport holds bytes; ``aclose`` flushes them.

    Mutations seen caught: ``write_now`` without its ``get_write_buffer_size``
    check → the second write is taken → fails; ``close_now`` always aborting
    → the peer gets less than was accepted → fails.
    """
    async with pair() as (stream, peer):
        big = b"x" * (32 << 20)  # more than the loopback socket buffers take at once
        assert stream.write_now(big) == len(big)
        transport = stream._transport
        assert transport is not None and transport.get_write_buffer_size() > 0
        assert stream.write_now(b"later") == 0
        await stream.aclose()

        def read_all() -> int:
            n = 0
            while chunk := peer.recv(1 << 20):
                n += len(chunk)
            return n

        with anyio.fail_after(10):
            assert await anyio.to_thread.run_sync(read_all) == len(big)


@pytest.mark.asyncio_only(reason="ProtocolStream is the asyncio path; trio keeps anyio's streams")
async def test_end_of_stream_reads_as_anyio_exceptions() -> None:
    """EOF → EndOfStream (after the bytes before it), aclose → ClosedResourceError, writes after aclose fail.

    Mutation seen caught: ``receive`` raising before returning buffered bytes
    (the EOF check ahead of the buffer) → the last bytes are lost → fails.
    """
    async with pair() as (stream, peer):
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
        with anyio.fail_after(5):
            while not stream._eof:  # both the bytes and the FIN are in before the first read
                await anyio.sleep(0.01)
        got = b""
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            while True:
                got += await stream.receive()
        assert got == b"last words"
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()
        with pytest.raises(OSError):
            stream.write_now(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")


async def test_serve_uses_protocol_streams_on_asyncio_only(anyio_backend: str) -> None:
    """What a WebSocket runs on: a ProtocolStream on asyncio, anyio's stream on trio.

    Mutation seen caught: ``_protocol_streams`` returning False → asyncio
    serves anyio streams → fails.
    """
    seen: list[bool] = []

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, WebSocketTransport)
        seen.append(isinstance(transport._stream, ProtocolStream))

    rec = Recorder()
    async with running_server(handler, basic_http(rec), limits=ServerLimits(ping_interval=None)) as srv:
        stream = await anyio.connect_tcp("127.0.0.1", srv.port)
        async with stream:
            await stream.send(
                b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Protocol: rtcore.v1.json\r\n\r\n"
            )
            with anyio.fail_after(5):
                while not seen:
                    await anyio.sleep(0.01)
    assert seen == [anyio_backend == "asyncio"]

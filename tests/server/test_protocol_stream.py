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
from functools import partial

import anyio
import pytest

from rtcore.transport import FrameTransport, ServerControl, ServerLimits, UpgradeRequest, serve
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


def test_wsproto_event_deque_is_replaced_by_an_empty_list() -> None:
    """Each WebSocket's wsproto connection gets ``_NoEvents`` instead of its 0.8-kB deque.

    wsproto fills that deque only in ``receive_data(None)``, which the
    transport never calls; if a wsproto release renamed or started using it,
    this fails rather than the saving silently disappearing (or events being lost).

    Mutation seen caught: ``_new_wsproto`` returning wsproto's connection
    unchanged → fails.
    """
    from collections import deque

    from wsproto.events import TextMessage

    from rtcore.transport.websocket import _new_wsproto, _NoEvents

    ws = _new_wsproto(())
    assert isinstance(ws._events, _NoEvents) and not isinstance(ws._events, deque)
    # Frames still come out of events() (they are read from the frame protocol directly).
    ws.receive_data(b"\x81\x82\0\0\0\0hi")  # a masked text frame "hi", mask key 0
    assert [(type(e), e.data) for e in ws.events() if isinstance(e, TextMessage)] == [(TextMessage, "hi")]


@pytest.mark.asyncio_only(reason="patches asyncio's sock_accept, which only the asyncio accept loop uses")
async def test_emfile_on_accept_pauses_and_serving_goes_on(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Out of file descriptors at accept(): a warning and a short pause, not a dead listener.

    Mutation seen caught: EMFILE left out of ``_TRANSIENT_ACCEPT`` → the
    accept loop raises, the server stops → the request fails.
    """
    import errno

    import httpx

    loop = asyncio.get_running_loop()
    real = loop.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def sock_accept(sock: socket.socket) -> tuple[socket.socket, object]:
        if failures:
            taken, _ = await real(sock)  # a client waits: drop it, fail as if the kernel had refused
            taken.close()
            raise failures.pop()
        return await real(sock)

    async def never(transport: FrameTransport, request: UpgradeRequest) -> None:
        raise AssertionError("no WebSocket here")

    rec = Recorder()
    async with running_server(never, basic_http(rec)) as srv:
        monkeypatch.setattr(loop, "sock_accept", sock_accept)

        async def get() -> httpx.Response:
            async with httpx.AsyncClient() as client:  # a new connection each time
                return await client.get(f"{srv.http_url}/echo", timeout=5)

        # The accept already waiting when the patch went in is the real one.
        assert (await get()).status_code == 200
        with pytest.raises(httpx.TransportError):
            await get()  # the connection "lost" to EMFILE
        assert (await get()).status_code == 200
    assert not failures
    assert any("accept() failed" in r.getMessage() for r in caplog.records)


async def test_a_handler_that_ignores_the_close_is_cancelled_after_the_deadline() -> None:
    """A connection task still running ``close_timeout`` after the shutdown deadline is cancelled.

    On asyncio the connection tasks are the listener's own (``_NativeTasks``),
    not a task group's, so the listener cancels them itself; on trio the task
    group's deadline does. The handler here ignores the close and would
    sleep for 20 s; only a cancel from the listener ends it sooner, and only
    a cancel sets ``cancelled``.

    Mutation seen caught: ``_NativeTasks.cancel_and_wait`` not cancelling
    (waiting only) → ``serve`` returns only when the handler's sleep ends by
    itself, uncancelled: the assertion on ``cancelled`` fails after ~20 s
    (earlier the handler slept forever and the mutation hung the run).
    """
    cancelled = anyio.Event()

    async def stubborn(transport: FrameTransport, request: UpgradeRequest) -> None:
        try:
            await anyio.sleep(20)  # a bound, so that the mutation fails instead of hanging
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    rec = Recorder()
    control = ServerControl()
    limits = ServerLimits(close_timeout=0.2, ping_interval=None)
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve, stubborn, basic_http(rec), limits=limits, control=control))
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(
                b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 101 ")
                await control.stop(grace=0.1)
    assert cancelled.is_set()
    assert control.connections == 0


@pytest.mark.asyncio_only(reason="ProtocolStream is the asyncio path; trio keeps anyio's streams")
async def test_close_forcefully_closes_a_protocol_stream_at_once_even_when_cancelled() -> None:
    """``close_forcefully`` closes a ProtocolStream without a cancel scope or an
    await: inside an already cancelled scope the stream is still closed (a
    waiting reader wakes with ``ClosedResourceError``), as
    ``anyio.aclose_forcefully`` under a shield does for other streams.

    Mutation seen caught: the ProtocolStream branch returning without
    ``close_now()`` → the stream stays open → fails.
    """
    from rtcore.transport.aiostream import close_forcefully

    async with pair() as (stream, _peer):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await close_forcefully(stream)
        transport = stream._transport
        assert transport is not None and transport.is_closing()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()


@pytest.mark.asyncio_only(reason="ProtocolStream is the asyncio path; trio keeps anyio's streams")
async def test_receive_nowait_and_readable_wait_without_a_receive_frame() -> None:
    """``receive_nowait`` returns ``b""`` instead of waiting; ``readable`` is a
    future done once there is something to say (bytes, EOF); one waiter at a
    time, and a waiter cancelled while waiting does not block the next. The
    woken future is forgotten (an idle stream keeps none).

    Mutations seen caught: ``readable`` not replacing a done future (``reader
    is not None`` alone → BusyResourceError after the cancelled wait) →
    fails; ``_wake_reader`` keeping ``_reader`` → fails; ``readable`` not
    waking at once when bytes are already buffered → fails (timeout).
    """
    async with pair() as (stream, peer):
        assert stream.receive_nowait() == b""
        waiting = stream.readable()
        with pytest.raises(anyio.BusyResourceError):
            stream.readable()
        waiting.cancel()  # what cancelling the task awaiting it does
        fut = stream.readable()  # the cancelled one does not count
        await anyio.to_thread.run_sync(peer.sendall, b"abc")
        with anyio.fail_after(5):
            await fut
        assert stream._reader is None
        with anyio.fail_after(5):
            await stream.readable()  # bytes already buffered: done at once
        assert stream.receive_nowait(2) == b"ab"
        assert stream.receive_nowait() == b"c"
        peer.shutdown(socket.SHUT_WR)
        with anyio.fail_after(5):
            await stream.readable()
        with pytest.raises(anyio.EndOfStream):
            stream.receive_nowait()


@pytest.mark.asyncio_only(reason="the accept loop on raw sockets is the asyncio listener's")
async def test_accept_takes_queued_connections_without_an_event_loop_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections the kernel has queued are accepted back to back, a burst at a time.

    After a restart thousands of clients reconnect at once: accepting one
    connection per event-loop step (its transport set up in the accept loop,
    which waits for ``connection_made``) let the kernel's accept queue
    overflow while the loop was busy. ``accept`` now takes queued sockets
    without yielding, and yields once after ``_ACCEPT_BURST`` in a row so
    the accepted connections get to run.

    Mutations seen caught: an event-loop step per accepted connection (as
    when ``accept`` awaited ``connect_accepted_socket``: an ``await
    asyncio.sleep(0)`` after ``raw.accept()``) → ``steps`` moves during the
    burst → fails; no yield after the burst (``burst < _ACCEPT_BURST`` always
    true) → ``steps`` never moves over the burst and 6 more → fails.
    """
    from types import SimpleNamespace
    from typing import Any, cast

    from rtcore.transport import listener as listener_module
    from rtcore.transport.listener import _protocol_acceptor

    # A short burst: the real one (1,024) would need more descriptors than a test may open.
    _ACCEPT_BURST = 16
    monkeypatch.setattr(listener_module, "_ACCEPT_BURST", _ACCEPT_BURST)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", backlog=256)
    sock_listener = listener.listeners[0]
    port = sock_listener.extra(anyio.abc.SocketAttribute.local_port)
    state = cast(Any, SimpleNamespace(limits=ServerLimits()))
    accept, _ = _protocol_acceptor(cast(Any, sock_listener), state)
    n = _ACCEPT_BURST + 6
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    steps = 0

    async def count_steps() -> None:
        nonlocal steps
        while True:
            await asyncio.sleep(0)
            steps += 1

    counter = asyncio.get_running_loop().create_task(count_steps())
    await asyncio.sleep(0)  # the counter is waiting for the next step
    base = steps
    accepted: list[socket.socket] = []
    try:
        with anyio.fail_after(5):
            accepted += [await accept() for _ in range(_ACCEPT_BURST)]
            assert steps == base  # the whole burst without a step
            accepted += [await accept() for _ in range(n - _ACCEPT_BURST)]
            assert steps > base  # ...then one, before the next burst
    finally:
        counter.cancel()
        for s in accepted + clients:
            s.close()
        await listener.aclose()
    assert len(accepted) == n

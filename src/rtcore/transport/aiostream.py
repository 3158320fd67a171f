"""A lean byte stream for asyncio (and uvloop) built on an ``asyncio.Protocol``.

On asyncio without TLS the listener accepts sockets itself and serves each
on a :class:`ProtocolStream` instead of anyio's socket stream. Everything
above (HTTP, the WebSocket transport, the session) sees the same
:class:`anyio.abc.ByteStream`; trio and TLS keep anyio's streams.

Why: thousands of idle WebSocket connections each hold one stream. anyio's
asyncio stream keeps a 64-slot read deque, two ``asyncio.Event`` objects
(each with a deque of its own) and two resource guards, and pauses and
resumes reading around every ``receive`` (two ``epoll_ctl`` calls per
message). This one keeps the bytes received and not yet read in one
``bytes`` object, creates a future only while a reader or a writer waits,
and pauses reading only when ``high_water`` bytes are buffered unread
(TCP backpressure when the application falls behind).

Writes: :meth:`ProtocolStream.write_now` hands bytes to the transport when
nothing is buffered in it (the asyncio transport writes the socket at once
and keeps only what the kernel did not take, in order), which is the
WebSocket transport's no-await fast path on both asyncio loops.
:meth:`ProtocolStream.send` waits until the transport's buffer is empty
again, like anyio's stream (write buffer limit 0), so a closing stream never
holds bytes an awaited ``send`` reported as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

import anyio
from anyio.abc import ByteStream, SocketAttribute

__all__ = ["ProtocolStream", "close_forcefully"]


class ProtocolStream(asyncio.Protocol, ByteStream):
    """One accepted TCP connection as an anyio :class:`~anyio.abc.ByteStream`.

    Create it as the protocol of ``loop.connect_accepted_socket``.

    Args:
        high_water: Unread bytes at which reading pauses until the reader
            catches up.
        linger: Seconds :meth:`aclose` lets a non-empty write buffer drain
            before the connection is dropped.
    """

    __slots__ = ("_buf", "_closed", "_eof", "_error", "_high_water", "_linger", "_paused", "_reader", "_transport", "_transport_lost", "_writer")

    def __init__(self, high_water: int = 64 * 1024, linger: float = 5.0) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""  # received, not yet read
        self._high_water = high_water
        self._linger = linger
        self._paused = False  # reading paused (the buffer is full)
        self._eof = False  # the peer sent FIN
        self._error: Exception | None = None  # the connection was lost with this error
        self._closed = False  # aclose() was called
        self._transport_lost = False  # connection_lost() came
        self._reader: asyncio.Future[None] | None = None  # a receive() waiting
        self._writer: asyncio.Future[None] | None = None  # a send() waiting for the buffer to drain

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        # Paused whenever anything is buffered: "writable" means "nothing queued".
        transport.set_write_buffer_limits(0)

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if len(self._buf) >= self._high_water and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep the transport open: we may still write (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        # Like anyio's stream: lost with an error reads as broken, without one as EOF
        # (buffered bytes are still read first); writes fail either way.
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = True
        self._transport_lost = True
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        pass  # send() and write_now() look at the buffer itself

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_reader(self) -> None:
        # Forget the future as it is woken: an idle connection keeps none.
        reader = self._reader
        if reader is not None:
            self._reader = None
            if not reader.done():
                reader.set_result(None)

    def _wake_writer(self) -> None:
        writer = self._writer
        if writer is not None and not writer.done():
            writer.set_result(None)

    # -- anyio ByteStream ----------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Bytes received (at most ``max_bytes``), waiting for some if none are buffered.

        Raises:
            anyio.EndOfStream: The peer closed its side.
            anyio.BrokenResourceError: The connection was lost.
            anyio.ClosedResourceError: :meth:`aclose` was called.
        """
        while not (chunk := self.receive_nowait(max_bytes)):
            await self.readable()
        return chunk

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """What :meth:`receive` returns without waiting: ``b""`` when it would wait.

        A read loop that calls this and awaits :meth:`readable` when it gets
        ``b""`` waits in its own coroutine frame, not in one of ``receive``'s
        too (thousands of idle connections wait at once).

        Raises:
            anyio.EndOfStream: The peer closed its side.
            anyio.BrokenResourceError: The connection was lost.
            anyio.ClosedResourceError: :meth:`aclose` was called.
        """
        buf = self._buf
        if not buf:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._eof:
                if self._error is not None:
                    raise anyio.BrokenResourceError from self._error
                raise anyio.EndOfStream
            return b""
        if len(buf) > max_bytes:
            chunk, self._buf = buf[:max_bytes], buf[max_bytes:]
        else:
            chunk, self._buf = buf, b""
        transport = self._transport
        if self._paused and len(self._buf) < self._high_water and transport is not None and not transport.is_closing():
            self._paused = False
            transport.resume_reading()
        return chunk

    def readable(self) -> asyncio.Future[None]:
        """A future done when :meth:`receive_nowait` has something to say (bytes,
        EOF, loss or close); await it, then call :meth:`receive_nowait` again.

        Raises:
            anyio.BusyResourceError: Another reader is waiting.
        """
        reader = self._reader
        if reader is not None and not reader.done():
            raise anyio.BusyResourceError("reading from")
        # A reader cancelled while waiting leaves a done future behind: replaced here.
        self._reader = reader = asyncio.get_running_loop().create_future()
        if self._buf or self._eof or self._closed:
            self._wake_reader()
        return reader

    def write_now(self, data: bytes) -> int:
        """Hand ``data`` to the transport if nothing is buffered in it; bytes taken (0 or all).

        The transport writes the socket at once and keeps what the kernel did
        not take, ahead of anything written later.

        Raises:
            OSError: The connection is closed or lost.
        """
        transport = self._transport
        if self._closed or self._transport_lost or transport is None or transport.is_closing():
            raise OSError("the connection is closed")
        if transport.get_write_buffer_size():
            return 0
        transport.write(data)
        return len(data)

    async def send(self, item: bytes) -> None:
        """Write ``item`` and wait until the transport has handed all of it to the kernel.

        Raises:
            anyio.BrokenResourceError: The connection was lost.
            anyio.ClosedResourceError: :meth:`aclose` was called.
        """
        await self._drain()
        transport = self._transport
        assert transport is not None
        try:
            transport.write(item)
        except RuntimeError as exc:  # uvloop: writing a closing transport
            raise anyio.BrokenResourceError from exc
        await self._drain()

    async def _drain(self) -> None:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            transport = self._transport
            assert transport is not None
            if self._transport_lost or transport.is_closing():
                raise anyio.BrokenResourceError from self._error
            if not transport.get_write_buffer_size():
                return
            if self._writer is not None:
                raise anyio.BusyResourceError("writing to")
            self._writer = writer = asyncio.get_running_loop().create_future()
            try:
                await writer
            finally:
                self._writer = None

    async def send_eof(self) -> None:
        """Half-close: send FIN after what is buffered."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(OSError):
                transport.write_eof()

    async def aclose(self) -> None:
        """Close now; bytes still buffered get ``linger`` seconds to reach the peer."""
        self.close_now()
        await anyio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Close without waiting (what :meth:`aclose` does before its checkpoint)."""
        transport = self._transport
        if self._closed:
            if transport is not None and not transport.is_closing():
                transport.abort()
            return
        self._closed = True
        self._wake_reader()
        self._wake_writer()
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # A write completed by write_now may still be partly buffered: flush it
            # (close() does), but do not wait for a peer that never reads.
            transport.close()
            asyncio.get_running_loop().call_later(self._linger, transport.abort)
        else:
            transport.abort()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        transport = self._transport
        if transport is None:
            return {}
        sock: socket.socket | None = transport.get_extra_info("socket")
        attrs: dict[Any, Callable[[], Any]] = {
            SocketAttribute.remote_address: lambda: transport.get_extra_info("peername"),
            SocketAttribute.local_address: lambda: transport.get_extra_info("sockname"),
        }
        if sock is not None:
            attrs[SocketAttribute.family] = lambda: sock.family
        return attrs


async def close_forcefully(stream: ByteStream) -> None:
    """Close ``stream`` at once, even when cancelled (what ``anyio.aclose_forcefully``
    does under a shield).

    A :class:`ProtocolStream` is closed without a cancel scope: entering a
    scope and cancelling it (anyio formats a cancel message naming the task)
    was ~5 % of a connection's CPU in py-spy.
    """
    if isinstance(stream, ProtocolStream):
        stream.close_now()
        return
    with anyio.CancelScope(shield=True):
        await anyio.aclose_forcefully(stream)

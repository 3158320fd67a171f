"""The client's WebSocket connection: anyio byte stream + wsproto framing.

Internal to :mod:`rtcore.client`: :class:`WebSocket` does the upgrade, masks
and reassembles messages (with a size limit), answers pings and runs the
close handshake; the protocol itself is :class:`~rtcore.protocol.client.ClientSession`.
Every way a connection ends raises :class:`~rtcore.errors.ConnectionClosed`.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from ..errors import ConnectionClosed, RtcoreError, error_from_wire

__all__ = ["SUBPROTOCOLS", "HandshakeRefused", "Url", "WebSocket"]

SUBPROTOCOLS: Final[dict[str, str]] = {"json": "rtcore.v1.json", "msgpack": "rtcore.v1.msgpack"}
_READ_SIZE: Final = 65536


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket handshake refused with HTTP {status}")
        self.status = status
        self.body = body

    def error(self) -> RtcoreError:
        """The server's error (from its JSON body when there is one)."""
        code, message = "bad_request", f"WebSocket handshake refused with HTTP {self.status}"
        with contextlib.suppress(Exception):
            body = msgspec.json.decode(self.body)
            code, message = str(body.get("code", code)), str(body.get("message", message))
        return error_from_wire(code, message, http_status=self.status)


@dataclass(frozen=True)
class Url:
    secure: bool
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str) -> Url:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        secure = parts.scheme == "wss"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(secure, parts.hostname, parts.port or (443 if secure else 80), target)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


class WebSocket:
    """One client WebSocket over an anyio byte stream.

    wsproto does the framing (client frames must be masked) and the close
    handshake; this class adds message reassembly with a size limit and a
    writer that merges everything queued into one socket write.
    """

    #: Longest wait for one socket write that a close must not interrupt, seconds.
    WRITE_TIMEOUT = 5.0

    def __init__(self, stream: anyio.abc.ByteStream, text: bool, max_message_size: int) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.text = text
        self.max_message_size = max_message_size
        self.close_code: int | None = None
        self.close_reason = ""
        self._inbox: deque[bytes | str] = deque()
        self._parts: list[bytes | str] = []
        self._size = 0
        self._out_send, self._out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._refused: HandshakeRefused | None = None
        self._refused_done = False
        self._accepted = False
        self._subprotocol: str | None = None

    @classmethod
    async def open(
        cls, url: Url, *, encoding: str, ssl_context: ssl.SSLContext | None, max_message_size: int
    ) -> WebSocket:
        stream: anyio.abc.ByteStream
        if url.secure:
            stream = await anyio.connect_tcp(
                url.host, url.port, tls=True, ssl_context=ssl_context, tls_standard_compatible=False
            )
        else:
            stream = await anyio.connect_tcp(url.host, url.port)
        conn = cls(stream, encoding == "json", max_message_size)
        try:
            await conn._handshake(url, SUBPROTOCOLS[encoding])
        except BaseException:
            await conn.abort()
            raise
        return conn

    async def _handshake(self, url: Url, subprotocol: str) -> None:
        request = self.ws.send(Request(host=url.host_header, target=url.target, subprotocols=[subprotocol]))
        try:
            await self.stream.send(request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            # A reset can surface on the send (trio reports it there): a lost
            # connection to retry, like a failed read, not a fatal error.
            raise ConnectionClosed(1006, "connection lost") from None
        while not self._accepted and not (self._refused is not None and self._refused_done):
            await self._read()
        if self._refused is not None:
            raise self._refused
        if self._subprotocol != subprotocol:
            raise HandshakeRefused(
                400, b'{"code":"bad_request","message":"the server did not accept the subprotocol"}'
            )

    async def _read(self) -> None:
        try:
            data = await self.stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            if self._refused is not None:  # the refusal's body ended with the connection
                raise self._refused from None
            self.close_code = self.close_code or 1006
            raise ConnectionClosed(self.close_code, self.close_reason or "connection lost") from None
        self.ws.receive_data(data)
        for event in self.ws.events():
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            self._size += len(event.data)
            if self._size > self.max_message_size:
                self.close_code = 1009
                raise ConnectionClosed(1009, "message too big")
            self._parts.append(bytes(event.data) if isinstance(event.data, bytearray) else event.data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if len(parts) == 1:
                    self._inbox.append(parts[0])
                elif isinstance(parts[0], str):
                    self._inbox.append("".join(parts))  # type: ignore[arg-type]
                else:
                    self._inbox.append(b"".join(parts))  # type: ignore[arg-type]
        elif isinstance(event, Ping):
            self._queue(event.response())
        elif isinstance(event, CloseConnection):
            self.close_code, self.close_reason = event.code, event.reason or ""
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._queue(event.response())
        elif isinstance(event, AcceptConnection):
            self._accepted = True
            self._subprotocol = event.subprotocol
        elif isinstance(event, RejectConnection):
            self._refused = HandshakeRefused(event.status_code, b"")
            self._refused_done = not event.has_body
        elif isinstance(event, RejectData) and self._refused is not None:
            self._refused.body += event.data
            self._refused_done = event.body_finished

    def _queue(self, event: Event) -> None:
        with contextlib.suppress(LocalProtocolError, anyio.ClosedResourceError):
            self._out_send.send_nowait(self.ws.send(event))

    async def flush(self) -> None:
        """Send what is queued now (before the writer task runs)."""
        data = b""
        while True:
            try:
                data += self._out_recv.receive_nowait()
            except anyio.WouldBlock:
                break
        if data:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
                raise ConnectionClosed(1006, "connection lost") from None

    async def receive(self) -> bytes | str:
        """The next message.

        Raises:
            ConnectionClosed: the connection ended (close frame, EOF or an error).
        """
        while not self._inbox:
            if self.close_code is not None:
                raise ConnectionClosed(self.close_code, self.close_reason)
            await self._read()
        return self._inbox.popleft()

    def send(self, payload: bytes) -> None:
        """Queue one message (the writer sends it)."""
        self._queue(TextMessage(payload.decode()) if self.text else BytesMessage(payload))

    async def write_loop(self) -> None:
        """Send queued frames, everything queued in one write.

        Raises:
            ConnectionClosed: the socket failed.
        """
        while True:
            chunks = [await self._out_recv.receive()]
            while True:
                try:
                    chunks.append(self._out_recv.receive_nowait())
                except anyio.WouldBlock:
                    break
            try:
                # Shielded: frames taken off the queue are written even when the
                # connection is being closed meanwhile (the acks flushed by a clean
                # close would be lost otherwise); bounded, as a dead peer may never read.
                with anyio.move_on_after(self.WRITE_TIMEOUT, shield=True):
                    await self.stream.send(b"".join(chunks))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
                raise ConnectionClosed(1006, "connection lost") from None

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Close handshake (bounded), then drop the socket."""
        with anyio.move_on_after(timeout, shield=True):
            if self.ws.state is ConnectionState.OPEN:
                data = b""
                with contextlib.suppress(LocalProtocolError):
                    data = self.ws.send(CloseConnection(code))
                while True:  # flush anything still queued, then the close frame
                    try:
                        data = self._out_recv.receive_nowait() + data
                    except anyio.WouldBlock:
                        break
                with contextlib.suppress(Exception):
                    await self.stream.send(data)
                    while self.close_code is None:
                        await self._read()
        await self.abort()

    async def abort(self) -> None:
        """Drop the socket without a close handshake."""
        self._out_send.close()
        self._out_recv.close()
        await anyio.aclose_forcefully(self.stream)

"""The client side of RFC 6455, by hand, on asyncio protocols (callbacks, no task per connection).

Written for the load client (``loadclient.py``) to be cheap per message, not
general: one text subprotocol (``rtcore.v1.json``), no extensions, no
compression. What RFC 6455 asks of a client and what this does:

* opening handshake: ``GET`` with ``Sec-WebSocket-Key`` (16 random bytes,
  base64); the ``101`` answer's ``Sec-WebSocket-Accept`` is checked
  (SHA-1 of key + GUID);
* every client frame is masked with a fresh 4-byte key (``os.urandom``). The
  XOR is one big-integer operation per frame instead of a Python loop per
  byte: that is what makes a hand-written client cheaper than one on wsproto
  (``client_cost.py`` measures both);
* server frames are unmasked; 7/16/64-bit lengths; fragmented messages
  (continuation frames) are joined;
* ``ping`` is answered with a ``pong`` carrying the same payload (the
  server's heartbeat); ``close`` is answered with a close frame and the
  transport closed.

It does not check UTF-8 of text frames or the reserved bits: the servers
under test are the ones whose correctness is tested elsewhere (Autobahn).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["WSProtocol", "encode_frame", "parse_frames", "open_ws"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_urandom = os.urandom
_from_bytes = int.from_bytes
_pack_h = struct.Struct("!H").pack
_pack_q = struct.Struct("!Q").pack

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _pack_h(n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _pack_q(n)
    key = _urandom(4)
    if n:
        # XOR the whole payload with the repeated key in one integer operation.
        masked = (_from_bytes(payload, "little") ^ _from_bytes((key * ((n >> 2) + 1))[:n], "little")).to_bytes(
            n, "little"
        )
    else:
        masked = b""
    return head + key + masked


def parse_frames(buf: bytearray) -> tuple[list[tuple[bool, int, bytes]], int]:
    """Complete unmasked frames at the start of ``buf``: ``([(fin, opcode, payload)], consumed)``."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        n = b1 & 0x7F
        p = pos + 2
        if n == 126:
            if end - p < 2:
                break
            n = (buf[p] << 8) | buf[p + 1]
            p += 2
        elif n == 127:
            if end - p < 8:
                break
            n = _from_bytes(buf[p : p + 8], "big")
            p += 8
        if b1 & 0x80:  # a masked server frame is a protocol error; unmask anyway
            if end - p < 4 + n:
                break
            key = bytes(buf[p : p + 4])
            p += 4
            raw = bytes(buf[p : p + n])
            payload = (
                (_from_bytes(raw, "little") ^ _from_bytes((key * ((n >> 2) + 1))[:n], "little")).to_bytes(n, "little")
                if n
                else b""
            )
        else:
            if end - p < n:
                break
            payload = bytes(buf[p : p + n])
        out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
        pos = p + n
    return out, pos


class WSProtocol(asyncio.Protocol):
    """One client WebSocket. ``on_message(conn, payload)`` gets every complete data message.

    ``on_close(conn)`` is called once when the connection is gone (close
    frame, reset or EOF). ``send(payload)`` writes one masked text frame
    without awaiting (the load client bounds what it has in flight itself).
    """

    __slots__ = (
        "_buf",
        "_frag",
        "_handshake",
        "_key",
        "_ready",
        "close_code",
        "closed",
        "on_close",
        "on_message",
        "state",
        "transport",
    )

    def __init__(self, request: bytes, key: str, ready: asyncio.Future[None]) -> None:
        self._buf = bytearray()
        self._frag: list[bytes] | None = None
        self._handshake: bytes | None = request
        self._key = key
        self._ready = ready
        self.transport: asyncio.Transport | None = None
        self.on_message: Callable[[WSProtocol, bytes], None] | None = None
        self.on_close: Callable[[WSProtocol], None] | None = None
        self.closed = False
        self.close_code: int | None = None  # the code of the server's close frame (None: none came)
        self.state: Any = None  # owned by the user of the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        assert self._handshake is not None
        transport.write(self._handshake)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._handshake is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            self._handshake = None
            status, _, rest = head.partition("\r\n")
            expected = base64.b64encode(hashlib.sha1(self._key.encode() + _GUID).digest()).decode()
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in rest.split("\r\n"))}
            if not status.startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != expected:
                if not self._ready.done():
                    self._ready.set_exception(ConnectionError(f"handshake refused: {status}"))
                assert self.transport is not None
                self.transport.close()
                return
            if not self._ready.done():
                self._ready.set_result(None)
            if not buf:
                return
        frames, used = parse_frames(buf)
        if used:
            del buf[:used]
        for fin, opcode, payload in frames:
            if opcode in (OP_TEXT, OP_BINARY):
                if fin:
                    if self.on_message is not None:
                        self.on_message(self, payload)
                else:
                    self._frag = [payload]
            elif opcode == OP_CONT:
                assert self._frag is not None
                self._frag.append(payload)
                if fin:
                    message = b"".join(self._frag)
                    self._frag = None
                    if self.on_message is not None:
                        self.on_message(self, message)
            elif opcode == OP_PING:
                self._write(encode_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._write(encode_frame(payload[:2], OP_CLOSE))
                self.close()
                return

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        """Write ``payload`` as one masked text frame."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(payload))

    def close(self, code: int = 1000) -> None:
        """Send a close frame (if still possible) and close the transport."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(_pack_h(code), OP_CLOSE))
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ready.done():
            self._ready.set_exception(ConnectionError(f"connection lost during handshake: {exc}"))
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close(self)


async def open_ws(host: str, port: int, path: str = "/v1/ws", subprotocol: str = "rtcore.v1.json") -> WSProtocol:
    """Open a WebSocket to ``ws://host:port/path`` and finish the handshake."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(_urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode()
    ready: asyncio.Future[None] = loop.create_future()
    _, proto = await loop.create_connection(lambda: WSProtocol(request, key, ready), host, port)
    try:
        await asyncio.wait_for(ready, 30)
    except BaseException:
        proto.abort()
        raise
    return proto

"""Bad input on the wire gets its documented answer, and the server keeps serving.

Each case is sent over a raw socket (the ``websockets`` library and httpx
refuse to send most of these) to a real :class:`rtcore.Server`, and is checked
against docs/protocol.md ("Bad input" in §11 and §13): the HTTP status and
error ``code``, or the WebSocket close code, the ``err`` frame for frames the
session answers, and that the connection then ends (or, where documented, stays
open). While it happens another client is connected; afterwards it, and a new
connection, are still served.

Each test names the mutation that breaks it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import ByteStream

import rtcore
from rtcore.transport import ConnectionClosed, ServerLimits, Shutdown, UpgradeRequest, WebSocketTransport
from rtcore.transport.websocket import run_websocket

from .conftest import TIMEOUT, Peer, peer, serving
from .netapp import app

pytestmark = pytest.mark.anyio

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9


# --- raw HTTP -------------------------------------------------------------------


async def read_all(stream: ByteStream) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    with anyio.fail_after(TIMEOUT):
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


async def raw_http(server: rtcore.Server, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``request`` as is; return the (only) response, read until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        await stream.send(request)
        return parse_response(await read_all(stream))


def chunked_post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keyed_post(key_header: bytes) -> bytes:
    return (
        b"POST /v1/cmd/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + key_header
        + b"\r\nContent-Length: 4\r\n\r\n\"hi\""
    )


# --- raw WebSocket ----------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, built by hand: any flag, any length, masked or not."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWs:
    """A WebSocket client with no opinions: sends what it is given, parses what comes back."""

    def __init__(self, stream: ByteStream, buf: bytes) -> None:
        self.stream = stream
        self.buf = buf

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            self.buf += await self.stream.receive()

    async def read_frame(self) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload). Server frames are never masked."""
        with anyio.fail_after(TIMEOUT):
            await self._fill(2)
            b0, b1 = self.buf[0], self.buf[1]
            assert not b1 & 0x80, "a server frame must not be masked"
            n, at = b1 & 0x7F, 2
            if n == 126:
                await self._fill(4)
                (n,), at = struct.unpack("!H", self.buf[2:4]), 4
            elif n == 127:
                await self._fill(10)
                (n,), at = struct.unpack("!Q", self.buf[2:10]), 10
            await self._fill(at + n)
            payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
            assert b0 & 0x80, "the server does not fragment"
            return b0 & 0x0F, payload

    async def read_json(self) -> dict[str, Any]:
        opcode, payload = await self.read_frame()
        assert opcode == OP_TEXT, f"expected a text frame, got opcode {opcode}"
        result: dict[str, Any] = json.loads(payload)
        return result

    async def closed(self) -> tuple[int, list[dict[str, Any]]]:
        """Read until the server's close frame; its code, the frames before it; then TCP must end."""
        frames: list[dict[str, Any]] = []
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_CLOSE:
                break
            frames.append(json.loads(payload))
        (code,) = struct.unpack("!H", payload[:2])
        assert self.buf == b"", "nothing may follow the close frame"
        assert await read_all(self.stream) == b"", "the server closes TCP after its close frame"
        return code, frames


@asynccontextmanager
async def raw_ws(server: rtcore.Server, *, encoding: str = "json") -> AsyncIterator[RawWs]:
    """Upgrade by hand (``rtcore.v1.<encoding>``), say ``hello`` and await ``welcome``."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: rtcore.v1.{encoding}\r\n\r\n"
    ).encode()
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        await stream.send(request)
        buf = b""
        with anyio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive()
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        ws = RawWs(stream, rest)
        if encoding == "json":
            await stream.send(frame(OP_TEXT, b'{"t":"hello","v":1}'))
            assert (await ws.read_json())["t"] == "welcome"
        else:
            await stream.send(frame(OP_BINARY, b"\x82\xa1t\xa5hello\xa1v\x01"))
            opcode, payload = await ws.read_frame()
            assert opcode == OP_BINARY and b"welcome" in payload
        yield ws


@asynccontextmanager
async def bystander(server: rtcore.Server) -> AsyncIterator[Peer]:
    """A well-behaved client connected throughout; on exit it, and a newcomer, are still served."""
    async with peer(server, token="bystander") as other:
        assert (await other.cmd("echo", "before"))["result"] == "before"
        yield other
        assert (await other.cmd("echo", "after"))["result"] == "after"
    async with peer(server, token="newcomer") as new:
        assert (await new.cmd("echo", "new"))["result"] == "new"


# --- HTTP: chunked request bodies --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b"zz\r\n{}\r\n0\r\n\r\n", "non-hex chunk size"),
        (b"-2\r\n{}\r\n0\r\n\r\n", "signed chunk size"),
        (b"1" + b"0" * 20 + b"\r\n{}\r\n0\r\n\r\n", "chunk size of 21 hex digits (overflow)"),
        (b"2\n{}\r\n0\r\n\r\n", "chunk-size line ended by a bare LF"),
        (b"2\r\n{}XX0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"0x2\r\n{}\r\n0\r\n\r\n", "chunk size with a 0x prefix"),
        (b"2\r\n{}\r\n0\r\nbad trailer\r\n\r\n", "malformed trailer line"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_malformed_chunked_body_is_400_bad_request(body: bytes, what: str) -> None:
    """Mutation: let ``_next_event`` pass h11's ``RemoteProtocolError`` through
    (no translation to 400) → the connection drops without a response → every case fails."""
    async with serving(app) as server, bystander(server):
        status, headers, error = await raw_http(server, chunked_post("/v1/cmd/echo", body))
        assert (status, error["code"]) == (400, "bad_request"), (what, status, error)
        assert headers["connection"] == "close"


async def test_chunk_size_beyond_the_body_limit_is_413() -> None:
    """A 20-hex-digit (2**76) chunk, and a 1 MiB + 1 one: refused once the body passes the limit.

    Mutation: drop the running body-size check in ``HttpConnection._read_body``
    (only Content-Length checked) → the 2 KiB body of a 1 KiB server is accepted → fails.
    """
    limits = ServerLimits(max_body_bytes=1024)
    async with serving(app, limits=limits) as server, bystander(server):
        for size in (b"10000000000000000000", b"%x" % 2048):
            body = size + b"\r\n" + b"x" * 2048  # the client sends more than the limit, then waits
            status, _, error = await raw_http(server, chunked_post("/v1/cmd/echo", body))
            assert (status, error["code"]) == (413, "message_too_big"), (size, status, error)
            assert "1024" in error["message"]


async def test_valid_chunked_body_is_served() -> None:
    """The control case: the same request, well-formed, runs the command (and trailers are fine)."""
    async with serving(app) as server:
        body = b'3\r\n"hi\r\n1;ext=1\r\n"\r\n0\r\nX-Trailer: t\r\n\r\n'
        status, _, reply = await raw_http(server, chunked_post("/v1/cmd/echo", body, "Connection: close"))
        assert (status, reply) == (200, {"result": "hi", "replayed": False})


# --- HTTP: Idempotency-Key ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status", "code", "says"),
    [
        (b"Idempotency-Key: " + b"k" * 256, 400, "bad_args", "1..255"),
        (b"Idempotency-Key:", 400, "bad_args", "got 0"),
        (b"Idempotency-Key:    ", 400, "bad_args", "got 0"),
        (b"Idempotency-Key: " + b"k" * 9000, 431, "message_too_big", "header line longer than 8192"),
        (b"Idempotency-Key: a\x00b", 400, "bad_request", ""),
    ],
    ids=["256-chars", "empty", "blank", "9000-byte-line", "NUL"],
)
async def test_bad_idempotency_key_header(header: bytes, status: int, code: str, says: str) -> None:
    """Mutation: drop ``check_key(key)`` in ``Node.dispatch`` → the 256-char, empty and blank keys run the command → fails."""
    async with serving(app) as server, bystander(server):
        got, _, error = await raw_http(server, keyed_post(header))
        assert (got, error["code"]) == (status, code), error
        assert says in error["message"]
        if code == "bad_args":
            assert error["retryable"] is False


async def test_idempotency_key_of_255_chars_is_accepted_and_replays() -> None:
    """The boundary: 255 characters is a key (the second call replays)."""
    async with serving(app) as server:
        header = b"Idempotency-Key: " + b"k" * 255
        first = await raw_http(server, keyed_post(header))
        again = await raw_http(server, keyed_post(header))
        assert first[0] == again[0] == 200
        assert (first[2]["replayed"], again[2]["replayed"]) == (False, True)
        assert again[1]["idempotent-replayed"] == "true"


# --- WebSocket: frames the session answers -------------------------------------------


async def test_binary_frame_on_a_json_connection() -> None:
    """JSON in a binary frame is accepted (documented); anything else is ``err bad_frame``, session open.

    Mutation: make the JSON codec refuse bytes → the binary ``ping`` gets ``bad_frame`` → fails.
    """
    async with serving(app) as server, bystander(server), raw_ws(server) as ws:
        await ws.stream.send(frame(OP_BINARY, b'{"t":"ping","id":7}'))
        assert await ws.read_json() == {"t": "pong", "id": 7}
        await ws.stream.send(frame(OP_BINARY, b"\x82\xa1t\xa4ping\xa2id\x08"))  # MessagePack, not JSON
        err = await ws.read_json()
        assert (err["t"], err["code"], err["id"]) == ("err", "bad_frame", None)
        await ws.stream.send(frame(OP_TEXT, b'{"t":"ping","id":9}'))
        assert await ws.read_json() == {"t": "pong", "id": 9}  # still open


async def test_text_frame_on_a_msgpack_connection_is_bad_frame() -> None:
    """docs §3: a text frame on ``rtcore.v1.msgpack`` gets ``err bad_frame``; the session stays open.

    Mutation: decode a text frame on a msgpack connection as its UTF-8 bytes
    (instead of ``BadFrame`` in ``Codec._decode``) → no ``err`` → fails.
    """
    async with serving(app) as server, bystander(server), raw_ws(server, encoding="msgpack") as ws:
        await ws.stream.send(frame(OP_TEXT, b'{"t":"ping","id":3}'))
        opcode, payload = await ws.read_frame()
        assert opcode == OP_BINARY
        err = msgspec.msgpack.decode(payload)
        assert (err["t"], err["code"], err["id"]) == ("err", "bad_frame", None)
        assert "binary" in err["message"]
        await ws.stream.send(frame(OP_BINARY, b"\x82\xa1t\xa4ping\xa2id\x04"))
        opcode, payload = await ws.read_frame()
        assert msgspec.msgpack.decode(payload) == {"t": "pong", "id": 4}  # still open


# --- WebSocket: framing errors (close 1002, then TCP closed) ---------------------------

PING = b'{"t":"ping","id":1}'


@pytest.mark.asyncio_only(
    reason="known limit on trio: the close after a framing error can overtake the reply to a message queued just before it (docs/architecture.md, Known limits)"
)
@pytest.mark.parametrize(
    ("bad", "close"),
    [
        (frame(OP_TEXT, PING, rsv=0b100), 1002),  # RSV1 without permessage-deflate
        (frame(OP_TEXT, PING, rsv=0b010), 1002),  # RSV2: no extension defines it
        (frame(OP_TEXT, PING, rsv=0b001), 1002),  # RSV3
        (frame(OP_TEXT, PING, masked=False), 1002),  # client frames must be masked
        (frame(OP_PING, b"p" * 126), 1002),  # control frame payload > 125 bytes
        (frame(OP_CLOSE, struct.pack("!H", 1000) + b"r" * 124), 1002),  # close frame > 125 bytes
        (frame(OP_PING, b"p", fin=False), 1002),  # fragmented control frame
        (frame(OP_TEXT, b'{"t":', fin=False) + frame(OP_PING, b"x", fin=False), 1002),  # ... inside a message
        (frame(0x3, b"x"), 1002),  # reserved opcode
        (frame(OP_CONT, b"x"), 1002),  # continuation with nothing to continue
        (frame(OP_TEXT, b'{"t":"\xff"}'), 1007),  # invalid UTF-8 in a text frame
        (frame(OP_CLOSE, struct.pack("!H", 1004)), 1002),  # a close code no endpoint may send
    ],
    ids=[
        "rsv1",
        "rsv2",
        "rsv3",
        "unmasked",
        "ping-126-bytes",
        "close-126-bytes",
        "fragmented-ping",
        "fragmented-ping-inside-message",
        "reserved-opcode",
        "orphan-continuation",
        "invalid-utf8",
        "close-code-1004",
    ],
)
async def test_framing_error_closes_with_its_code(bad: bytes, close: int) -> None:
    """Close 1002 (1007 for bad UTF-8), nothing else sent, TCP closed; a command sent
    just before the bad frame is still answered.

    The parsing is wsproto's; what these guard is that the transport accepts
    no extension it did not negotiate and answers wsproto's verdict as is.

    Mutations: give the server's wsproto ``Connection`` an enabled
    permessage-deflate extension when none was negotiated → RSV1 is taken for
    compression (close 1007, not 1002) → "rsv1" fails; close with 1000 instead
    of wsproto's code in ``_on_close`` → every case fails; the session
    reading inline without a flush before the failure
    (``take_reader(conn.on_message)``, no ``outbox.flushed``) → the pong is
    not written before the close frame → fails.
    """
    async with serving(app) as server, bystander(server), raw_ws(server) as ws:
        await ws.stream.send(frame(OP_TEXT, b'{"t":"ping","id":5}') + bad)
        code, frames = await ws.closed()
        assert frames == [{"t": "pong", "id": 5}]
        assert code == close


# --- the transport's close after a framing error is not delayed --------------------------


async def test_framing_error_close_is_sent_at_once_when_the_application_just_entered_receive() -> None:
    """The application calls ``receive()`` just as a bad close frame arrives: the close
    frame must go out at once, not after the one-second catch-up wait.

    Deterministic: the handler enters ``receive()`` (anyio yields once before it
    counts as a waiting receiver), then the reader parses the bad frame from the
    upgrade's trailing bytes. Once every task is blocked the 1002 must be on the wire.

    Mutation: in ``_let_application_catch_up`` count anyio's waiting receivers
    (``tasks_waiting_receive > 0``) instead of ``_waiting_at`` → no close frame
    yet → fails (Autobahn 7.9.x failed the same way, "FAILED BY CLIENT").
    """
    bad_close = frame(OP_CLOSE, struct.pack("!H", 1004))  # 1004 is reserved: a protocol error
    with socket.create_server(("127.0.0.1", 0)) as listener:
        async with await anyio.connect_tcp("127.0.0.1", listener.getsockname()[1]) as server_side:
            client, _ = listener.accept()
            with client:
                transport = WebSocketTransport(
                    server_side, encoding="json", limits=ServerLimits(ping_interval=None), trailing_data=bad_close
                )
                request = UpgradeRequest("/v1/ws", {}, [], None, None, "json", None, None, Shutdown())
                received: list[object] = []

                async def handler(t: Any, _r: UpgradeRequest) -> None:
                    try:
                        received.append(await t.receive())
                    except ConnectionClosed as exc:
                        received.append(getattr(exc, "close_code", exc.code))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(run_websocket, transport, request, handler)
                    await anyio.wait_all_tasks_blocked()
                    try:
                        first = client.recv(64, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        first = b""
                    assert first[:1] == b"\x88" and first[2:4] == b"\x03\xea", f"no 1002 close frame on the wire yet: {first!r}"
                    client.shutdown(socket.SHUT_WR)  # the peer hangs up: the connection ends
                assert received == [1002]

"""Fuzz targets: one function per parser, each taking arbitrary bytes.

Each target feeds its input to code that ships and checks that only
documented errors come out, with the documented codes, and that what comes
out is self-consistent. A target raises ``AssertionError`` (or any
undocumented exception) on a defect. They are driven three ways:

* ``tests/hardening/test_fuzz.py``: Hypothesis, a bounded budget in CI;
* ``python -m tests.hardening.fuzz``: atheris (coverage-guided) or a plain
  random-mutation loop, a million inputs and more, saving crashing inputs to
  ``tests/hardening/corpus/<target>/``;
* ``test_fuzz.py`` replays every saved input as a regression test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import wsproto
import wsproto.events as ws_events
from wsproto.utilities import RemoteProtocolError

from rtcore.errors import ERROR_CODES, BadFrame, BadRequest, LimitExceeded
from rtcore.protocol.codec import codec_for
from rtcore.protocol.frames import Limits, Ok
from rtcore.protocol.session import (
    Close,
    DoAck,
    DoAuthenticate,
    DoCommand,
    DoSubscribe,
    DoUnsubscribe,
    Send,
    Session,
)
from rtcore.transport import ServerLimits
from rtcore.transport.head import HeadScanner

CODECS = {name: codec_for(name) for name in ("json", "msgpack")}  # type: ignore[arg-type]

#: Close codes a session may ask for (docs/protocol.md, close codes).
SESSION_CLOSE_CODES = {1000, 1001, 1002, 1008, 1011, 4008}


# --- 1. the frame decoder, both encodings -----------------------------------------


def codec(data: bytes) -> None:
    """Client and server frame decoders: a frame or ``BadFrame``; frames round-trip."""
    for c in CODECS.values():
        for decode in (c.decode_client, c.decode_server):
            try:
                frame = decode(data)
            except BadFrame as exc:
                assert exc.code == "bad_frame"
                assert exc.request_id is None or isinstance(exc.request_id, int)
                continue
            again = decode(c.encode(frame))
            assert type(again) is type(frame)


# --- 2. the HTTP head scanner -------------------------------------------------------

_LIMITS = ServerLimits(max_header_bytes=2048, max_header_line=512, max_headers=16)


def _scan(data: bytes, cuts: list[int]) -> tuple[Any, ...]:
    scanner = HeadScanner(_LIMITS)
    buf = bytearray()
    last = 0
    try:
        for cut in [*cuts, len(data)]:
            buf += data[last:cut]
            last = cut
            found = scanner.scan(buf)
            if found is not None:
                return ("head", *found)
    except (BadRequest, LimitExceeded) as exc:
        assert exc.http_status in (400, 414, 431), exc.http_status
        return ("error", type(exc).__name__, exc.http_status)
    return ("need more",)


def http_head(data: bytes) -> None:
    """Whole or in pieces, the scanner finds the same head or raises the same error."""
    whole = _scan(data, [])
    step = 1 + (data[0] % 7 if data else 0)
    pieces = _scan(data, list(range(step, len(data), step)))
    assert whole == pieces, (whole, pieces)
    if whole[0] == "head":
        start, end = whole[1], whole[2]
        head = data[start:end]
        assert head.endswith(b"\r\n\r\n") and end - start <= _LIMITS.max_header_bytes
        assert b"\n" not in head.replace(b"\r\n", b"")  # no bare LF got through


# --- 3. the WebSocket parser with the session behind it ------------------------------

_UPGRADE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_OPCODES = (0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3)


def _frames(data: bytes) -> bytes:
    """Turn fuzz bytes into client frames: mostly well-formed, masked, with fuzzed payloads.

    Layout per frame: one control byte (fin, rsv, opcode index, mask on/off),
    one length byte, then the payload. A hello is sent first often enough to
    reach the OPEN state.
    """
    out = bytearray()
    i = 0
    while i + 2 <= len(data):
        ctl, n = data[i], data[i + 1]
        payload = data[i + 2 : i + 2 + n]
        i += 2 + n
        fin = 0x80 if ctl & 1 == 0 else 0
        rsv = 0x40 if ctl & 0xF0 == 0xF0 else 0
        opcode = _OPCODES[(ctl >> 1) % len(_OPCODES)]
        masked = ctl & 0x08 != 0x08 or ctl == 0x08
        head = bytearray([fin | rsv | opcode])
        length = len(payload)
        if length < 126:
            head.append((0x80 if masked else 0) | length)
        else:
            head += bytes([(0x80 if masked else 0) | 126]) + length.to_bytes(2, "big")
        if masked:
            key = bytes([ctl, n, 0x5A, 0xA5])
            payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
            head += key
        out += head + payload
    return bytes(out + data[i:])


_HELLO = msgspec.json.encode({"t": "hello", "v": 1})


def _drive(session: Session, actions: list[Any], codec_: Any) -> None:
    """Play the driver: answer what the session asks, check every action."""
    queue = list(actions)
    while queue:
        action = queue.pop(0)
        if isinstance(action, Send):
            codec_.encode(action.frame)  # every frame it asks to send must encode
        elif isinstance(action, Close):
            assert action.code in SESSION_CLOSE_CODES, action
        elif isinstance(action, DoAuthenticate):
            queue += session.authenticated(object(), "fuzz", None, 0.0, action.refresh_id)
        elif isinstance(action, (DoSubscribe, DoCommand)):
            queue += session.reply(action.id, Ok(id=action.id, result=None))
        elif isinstance(action, DoUnsubscribe):
            session.unsubscribed(action.stream)
        else:
            assert isinstance(action, DoAck), action


def websocket_session(data: bytes) -> None:
    """wsproto parses fuzzed frames; messages go to a live session; only documented outcomes."""
    encoding = "json" if not data or data[0] % 2 == 0 else "msgpack"
    codec_ = CODECS[encoding]
    ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    ws.receive_data(_UPGRADE)
    for event in ws.events():
        assert isinstance(event, ws_events.Request)
        ws.send(ws_events.AcceptConnection())
    session = Session("fuzz", codec_, Limits(), 0.0)
    hello = _HELLO if encoding == "json" else msgspec.msgpack.encode({"t": "hello", "v": 1})
    stream = _frames(bytes([0x01 if encoding == "json" else 0x05, len(hello)]) + hello + data[1:])
    message = bytearray()
    now = 0.0
    try:
        ws.receive_data(stream)
        for event in ws.events():
            if isinstance(event, ws_events.Message):
                message += event.data if isinstance(event.data, bytes) else event.data.encode()
                if len(message) > 1 << 20:
                    return  # the transport closes with 1009 here
                if event.message_finished:
                    now += 0.001
                    _drive(session, session.receive_data(bytes(message), now), codec_)
                    message.clear()
            elif isinstance(event, ws_events.CloseConnection):
                return
    except RemoteProtocolError as exc:
        # wsproto refuses the frame; the transport closes with this code.
        assert exc.event_hint is None or isinstance(exc.event_hint, ws_events.CloseConnection)


# --- 4. the HTTP command route ---------------------------------------------------------

_HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503}


class _RouteHarness:
    """One running node (memory://) behind the HTTP routes, on a private event loop."""

    def __init__(self) -> None:
        from rtcore.server.registry import SessionRegistry
        from rtcore.server.routes import Routes

        from .fuzz_app import app

        self.loop = asyncio.new_event_loop()
        self.node_cm: Any = None
        self.routes: Routes | None = None

        async def start() -> None:
            from rtcore.engine.node import Node

            self.node_cm = Node(app, "memory://")
            node = await self.node_cm.__aenter__()
            self.routes = Routes(node, frozenset({"api", "gateway", "processor"}), SessionRegistry())

        self.loop.run_until_complete(start())

    def request(self, data: bytes) -> Any:
        from rtcore.transport import HttpRequest

        assert self.routes is not None
        names = ("echo", "add", "nope", "", "a%2Fb", "echo/x")
        name = names[data[0] % len(names)] if data else "echo"
        key = None
        if len(data) > 1 and data[1] % 3 == 0:
            key = data[2:10].decode("latin-1")
        headers = [(b"content-type", b"application/json")]
        if key is not None:
            headers.append((b"idempotency-key", key.encode("latin-1")))
        request = HttpRequest(
            method="POST", path=f"/v1/cmd/{name}", raw_path=f"/v1/cmd/{name}".encode(), query={},
            headers=headers, body=data[10:], peer=None, http_version="1.1", shutdown=None,  # type: ignore[arg-type]
        )
        return self.loop.run_until_complete(self.routes.handle(request))


_harness: _RouteHarness | None = None


def http_command(data: bytes) -> None:
    """POST /v1/cmd/{name} with fuzzed body and key: a documented status and JSON body, never 500."""
    global _harness
    if _harness is None:
        _harness = _RouteHarness()
    response = _harness.request(data)
    assert response.status in _HTTP_STATUSES, (response.status, response.body)
    body = msgspec.json.decode(response.body)
    if response.status != 200:
        assert body["code"] in ERROR_CODES, body
        assert isinstance(body["message"], str) and body["message"]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": codec,
    "http_head": http_head,
    "websocket_session": websocket_session,
    "http_command": http_command,
}

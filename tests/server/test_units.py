"""Sans-IO pieces of the server, without sockets."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Generator
from typing import Any, cast

import anyio
import pytest
from anyio.abc import ByteStream
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader
from wsproto.frame_protocol import CloseReason, FrameProtocol, RsvBits
from wsproto.frame_protocol import Opcode as WsOpcode

from rtcore.errors import RtcoreError
from rtcore.server.gateway import SessionTimers
from rtcore.transport import ServerLimits, WebSocketPolicy, WebSocketTransport
from rtcore.transport.deflate import BoundedPerMessageDeflate
from rtcore.transport.handshake import accept_key, negotiate
from rtcore.transport.head import HeadScanner
from rtcore.transport.websocket import Heartbeats
from rtcore.transport.wsframes import OP_BINARY, OP_TEXT, encode_frames

pytestmark = pytest.mark.anyio

# -- outbound frames, checked with the websockets library's own parser -----------


def parse_all(data: bytes, extensions: list[Extension] | None = None) -> list[Frame]:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        parser: Generator[None, None, Frame] = Frame.parse(
            reader.read_exact, mask=False, max_size=None, extensions=extensions
        )
        try:
            next(parser)
        except StopIteration as stop:
            frames.append(stop.value)
        else:  # pragma: no cover - parser wanted more data than there is
            raise AssertionError("truncated frame")
    return frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_encoded_frame_sizes_parse_in_websockets(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    (frame,) = parse_all(encode_frames(OP_BINARY, [payload]))
    assert frame.opcode is Opcode.BINARY
    assert frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
    assert frame.data == payload


def test_batch_of_text_frames_parses_in_websockets() -> None:
    payloads = [b'{"t":"evt","offset":%d}' % i for i in range(50)] + [b"x" * 300]
    frames = parse_all(encode_frames(OP_TEXT, payloads))
    assert [f.data for f in frames] == payloads
    assert {f.opcode for f in frames} == {Opcode.TEXT}


class RecordingStream(ByteStream):
    """A byte stream that records writes and never yields data."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send(self, item: bytes) -> None:
        self.writes.append(item)

    async def send_eof(self) -> None:
        pass

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        pass


def dispose(transport: WebSocketTransport) -> None:
    """Close the inbound queue that :func:`run_websocket` would have closed (if one was made)."""
    if transport._inbox is not None:
        transport._inbox.close()
    transport._close_inbox()


async def test_send_is_one_write_for_the_whole_batch() -> None:
    stream = RecordingStream()
    transport = WebSocketTransport(stream, encoding="json", limits=ServerLimits())
    batch = [b'{"t":"evt","offset":%d}' % i for i in range(10)]
    await transport.send(batch)
    assert len(stream.writes) == 1
    assert [f.data for f in parse_all(stream.writes[0])] == batch
    await transport.send([])
    assert len(stream.writes) == 1
    dispose(transport)


async def test_deflated_send_is_one_write_too() -> None:
    stream = RecordingStream()
    deflate = BoundedPerMessageDeflate(1024)
    assert deflate.accept("permessage-deflate") is not None
    transport = WebSocketTransport(stream, encoding="msgpack", limits=ServerLimits(), extensions=[deflate])
    await transport.send([b"a" * 100, b"b" * 100])
    assert len(stream.writes) == 1
    assert len(stream.writes[0]) < 100  # compressed
    client_side = PerMessageDeflate(False, False, 15, 15)
    frames = parse_all(stream.writes[0], [client_side])
    assert [f.data for f in frames] == [b"a" * 100, b"b" * 100]
    dispose(transport)


async def test_keepalive_heap_drops_closed_connections() -> None:
    """The shared Heartbeats heap holds at most about twice the open connections:
    closed ones (and superseded deadlines) are dropped when they outnumber the
    live entries, not kept (with their transport) until their deadline.

    Mutation seen caught: ``Heartbeats._superseded`` never rebuilding the heap
    → 1,000 entries for 10 open connections → fails.
    """
    limits = ServerLimits(ping_interval=20.0)
    heartbeats = Heartbeats(limits)
    transports = [
        WebSocketTransport(RecordingStream(), encoding="json", limits=limits, heartbeats=heartbeats) for _ in range(1000)
    ]
    for t in transports:
        heartbeats.start(t)
    for t in transports[10:]:
        heartbeats.discard(t)  # what run_websocket does when a connection ends
    assert len(heartbeats) <= 2 * 10 + 33
    live = transports[:10]
    for t in live:  # a pong moves the deadline: the old entry is superseded
        heartbeats.schedule(t, anyio.current_time() + 40.0)
    assert len(heartbeats) <= 2 * 10 + 33
    assert all(t._hb_at is not None for t in live)
    for t in transports:
        dispose(t)


# -- request head guard ---------------------------------------------------------------


def scan(data: bytes, limits: ServerLimits | None = None, step: int = 0) -> tuple[int, int] | None:
    scanner = HeadScanner(limits or ServerLimits())
    if not step:
        return scanner.scan(data)
    buf = bytearray()
    found = None
    for i in range(0, len(data), step):
        buf += data[i : i + step]
        found = scanner.scan(buf)
        if found:
            break
    return found


@pytest.mark.parametrize("step", [0, 1, 7])
def test_head_end_is_found_however_it_is_split(step: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert scan(head + b"body", step=step) == (0, len(head))


def test_leading_empty_lines_are_skipped() -> None:
    assert scan(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n") == (4, 22)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 8200, 431),  # an unfinished over-long line fails early
        (b"GET /" + b"a" * 8200, 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 129 + b"\r\n", 431),
    ],
)
def test_head_errors(data: bytes, status: int) -> None:
    with pytest.raises(RtcoreError) as info:
        scan(data)
    assert info.value.http_status == status


def test_total_head_size_is_checked_in_one_read() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n"
    with pytest.raises(RtcoreError) as info:
        scan(head * 5 + b"\r\n")
    assert info.value.http_status == 431
    assert scan(head * 3 + b"\r\n") is not None


# -- handshake -----------------------------------------------------------------------


KEY = base64.b64encode(b"0123456789abcdef")
BASE = [
    (b"host", b"x"),
    (b"upgrade", b"websocket"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-version", b"13"),
]


def test_accept_key_matches_rfc_example() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("headers", "method", "status"),
    [
        ([h for h in BASE if h[0] != b"sec-websocket-key"], b"GET", 400),
        ([*BASE[:3], (b"sec-websocket-key", b"short"), BASE[4]], b"GET", 400),
        ([*BASE[:4], (b"sec-websocket-version", b"8")], b"GET", 426),
        ([h for h in BASE if h[0] != b"connection"], b"GET", 400),
        (BASE, b"POST", 405),
    ],
)
def test_bad_upgrades(headers: list[tuple[bytes, bytes]], method: bytes, status: int) -> None:
    with pytest.raises(RtcoreError) as info:
        negotiate(method, b"1.1", headers, WebSocketPolicy(), ServerLimits())
    assert info.value.http_status == status


def test_negotiation_picks_the_clients_first_known_subprotocol() -> None:
    headers = [
        *BASE,
        (b"sec-websocket-protocol", b"x, rtcore.v1.msgpack"),
        (b"sec-websocket-protocol", b"rtcore.v1.json"),
    ]
    hs = negotiate(b"GET", b"1.1", headers, WebSocketPolicy(), ServerLimits())
    assert (hs.encoding, hs.subprotocol) == ("msgpack", "rtcore.v1.msgpack")
    assert (b"sec-websocket-protocol", b"rtcore.v1.msgpack") in hs.headers


def test_deflate_offer_with_bad_parameter_is_declined() -> None:
    headers = [*BASE, (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits=abc")]
    hs = negotiate(b"GET", b"1.1", headers, WebSocketPolicy(permessage_deflate=True), ServerLimits())
    assert hs.extensions == []


# -- bounded inflater ----------------------------------------------------------------------


def deflate_message(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_inflater_never_produces_more_than_the_budget() -> None:
    limit = 64 * 1024
    bomb = deflate_message(bytes(50 * 1024 * 1024))  # 50 MiB of zeros, ~50 KiB compressed
    ext = BoundedPerMessageDeflate(limit)
    ext.accept("permessage-deflate")
    proto = FrameProtocol(client=False, extensions=[ext])
    assert ext.frame_inbound_header(proto, WsOpcode.BINARY, RsvBits(True, False, False), len(bomb)) == RsvBits(
        True, False, False
    )
    produced = 0
    for i in range(0, len(bomb), 4096):
        out = ext.frame_inbound_payload_data(proto, bomb[i : i + 4096])
        if isinstance(out, CloseReason):
            assert out is CloseReason.MESSAGE_TOO_BIG
            break
        produced += len(out)
        assert produced <= limit
    else:
        raise AssertionError("the bomb was not stopped")


def test_inflater_round_trips_messages_within_the_budget() -> None:
    ext = BoundedPerMessageDeflate(1000)
    ext.accept("permessage-deflate")
    proto = FrameProtocol(client=False, extensions=[ext])
    for text in (b"hello " * 100, b"again " * 150):  # context takeover across messages
        data = deflate_message(text)
        ext.frame_inbound_header(proto, WsOpcode.TEXT, RsvBits(True, False, False), len(data))
        body = ext.frame_inbound_payload_data(proto, data)
        tail = ext.frame_inbound_complete(proto, True)
        assert isinstance(body, bytes) and isinstance(tail, bytes)
        assert body + tail == text


class _FailingKeepalive(WebSocketTransport):
    def _heartbeat_due(self, now: float) -> None:
        raise RuntimeError("a bug in one connection's keepalive")


class _RecordingKeepalive(WebSocketTransport):
    due = anyio.Event()

    def _heartbeat_due(self, now: float) -> None:
        type(self).due.set()


async def test_one_connections_keepalive_failure_does_not_stop_the_others() -> None:
    """The shared Heartbeats task survives a connection whose keepalive step raises
    (it is logged): the other connections are still pinged.

    Mutation seen caught: no ``try``/``except`` around ``_heartbeat_due`` in
    ``Heartbeats.run`` → the task dies with the RuntimeError → fails.
    """
    limits = ServerLimits(ping_interval=0.01)
    heartbeats = Heartbeats(limits)
    _RecordingKeepalive.due = anyio.Event()
    failing = _FailingKeepalive(RecordingStream(), encoding="json", limits=limits, heartbeats=heartbeats)
    recording = _RecordingKeepalive(RecordingStream(), encoding="json", limits=limits, heartbeats=heartbeats)
    heartbeats.start(failing)
    heartbeats.schedule(recording, anyio.current_time() + 0.05)  # due after the failing one
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeats.run)
            await _RecordingKeepalive.due.wait()
            tg.cancel_scope.cancel()
    dispose(failing)
    dispose(recording)


class _TimedSession:
    """What SessionTimers reads of a session: its current deadline."""

    def __init__(self) -> None:
        self._deadline: float | None = None

    def _on_deadline(self, now: float) -> None:  # pragma: no cover - the test runs no deadline
        raise AssertionError


async def test_session_timer_heap_drops_ended_sessions() -> None:
    """SessionTimers holds at most about twice the open sessions: ended ones are
    dropped when they outnumber the live entries, not kept (with their
    connection and transport) until their idle deadline would have come.

    Mutation seen caught: ``SessionTimers._superseded`` never rebuilding the
    heap → 1,000 entries for 10 open sessions → fails.
    """
    timers = SessionTimers(cast(Any, None))  # the node is only read by run()
    sessions = [_TimedSession() for _ in range(1000)]
    for i, conn in enumerate(sessions):
        timers.schedule(cast(Any, conn), 45.0 + i)
    for conn in sessions[10:]:
        timers.discard(cast(Any, conn))  # what a session does when it ends
    assert len(timers) <= 2 * 10 + 33
    assert all(conn._deadline is not None for conn in sessions[:10])

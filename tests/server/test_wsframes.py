"""The inbound fast path: simple client data frames read without wsproto.

``read_data_frame`` must take exactly the frames wsproto would turn into one
whole message, decode them as wsproto does, and leave every other frame to
wsproto; the transport must fall back to wsproto mid-buffer without losing or
reordering anything.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from rtcore.transport import FrameTransport, ServerLimits, UpgradeRequest
from rtcore.transport.websocket import WebSocketTransport
from rtcore.transport.wsframes import read_data_frame, unmask

from .helpers import Recorder, basic_http, echo_handler, read_until_eof, running_server
from .test_websocket import _frames, _handshake, wait_closed

BIG = 1 << 62


def client_frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True, mask: bytes = b"\x11\x22\x33\x44", rsv: int = 0) -> bytes:
    """A client frame (masked with ``mask``, or unmasked when ``mask`` is empty), shortest length."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    flag = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, flag | n)
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, flag | 126, n)
    else:
        head = struct.pack("!BBQ", b0, flag | 127, n)
    return head + mask + (unmask(payload, mask) if mask else payload)


def wsproto_messages(data: bytes) -> list[bytes | str]:
    ws = Connection(ConnectionType.SERVER)
    ws.receive_data(data)
    out: list[bytes | str] = []
    for event in ws.events():
        assert isinstance(event, TextMessage | BytesMessage)
        assert event.message_finished
        out.append(event.data)
    return out


def test_unmask_matches_the_rfc() -> None:
    """Mutation checked: ``unmask`` repeating the key from the wrong end (little- vs
    big-endian mix-up) fails here."""
    rng = random.Random(7)
    for n in (0, 1, 3, 4, 5, 125, 1000):
        payload = rng.randbytes(n)
        mask = rng.randbytes(4)
        assert unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [0x1, 0x2])
def test_simple_frames_read_as_wsproto_reads_them(size: int, opcode: int) -> None:
    """Every length encoding, text and binary, masked with a random key: the same
    message as wsproto, and the position right after the frame.

    Mutations checked: reading the 16-bit length from the wrong bytes, skipping
    the 4-byte mask key, returning bytes for text frames: each fails here."""
    rng = random.Random(size * 3 + opcode)
    text = "".join(rng.choice("aé€😀") for _ in range(size // 4 + 1)).encode()[:size]
    payload = text.decode("utf-8", "ignore").encode() if opcode == 0x1 else rng.randbytes(size)
    frame = client_frame(payload, opcode=opcode, mask=rng.randbytes(4))
    data = b"junk" + frame + b"\x81"  # a frame in the middle of a buffer
    got = read_data_frame(data, 4, BIG)
    assert got is not None
    message, end = got
    assert end == 4 + len(frame)
    assert [message] == wsproto_messages(frame)
    assert type(message) is (str if opcode == 0x1 else bytes)


@pytest.mark.parametrize(
    ("why", "frame"),
    [
        ("incomplete header", client_frame(b"hello")[:5]),
        ("incomplete payload", client_frame(b"hello")[:-1]),
        ("incomplete 16-bit length", client_frame(b"x" * 200)[:3]),
        ("incomplete 64-bit length", client_frame(b"x" * 70000)[:9]),
        ("not final (a fragment)", client_frame(b"hello", fin=False)),
        ("continuation", client_frame(b"hello", opcode=0x0)),
        ("ping", client_frame(b"hello", opcode=0x9)),
        ("close", client_frame(b"\x03\xe8", opcode=0x8)),
        ("reserved opcode", client_frame(b"", opcode=0x5)),
        ("reserved bit", client_frame(b"hello", rsv=0x40)),
        ("unmasked", client_frame(b"hello", mask=b"") + b"\0" * 8),
        ("16-bit length for a short payload", b"\x81\xfe\x00\x05\x00\x00\x00\x00hello"),
        ("64-bit length for a 16-bit payload", b"\x81\xff" + struct.pack("!Q", 5) + b"\x00\x00\x00\x00hello"),
        ("64-bit length with its top bit set", b"\x81\xff" + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00"),
        ("invalid UTF-8 in text", client_frame(b"\xff\xfe")),
        ("a UTF-16 surrogate in text", client_frame(b"\xed\xa0\x80")),
    ],
)
def test_anything_else_is_left_to_wsproto(why: str, frame: bytes) -> None:
    """Mutations checked: dropping the FIN test, the reserved-bit test (accepting
    0xC1), the mask-bit test, either shortest-length test, the completeness
    test or the UTF-8 validation: each makes one of these cases fail."""
    assert read_data_frame(frame, 0, BIG) is None, why


@st.composite
def damaged_frames(draw: st.DrawFn) -> bytes:
    """A client frame of any opcode, maybe with one byte changed and maybe cut short."""
    payload = draw(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
    frame = client_frame(
        payload,
        opcode=draw(st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA])),
        fin=draw(st.booleans()),
        mask=draw(st.binary(min_size=4, max_size=4)),
    )
    if draw(st.booleans()):
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1 :]
    return frame[: draw(st.integers(0, len(frame)))] if draw(st.booleans()) else frame


@settings(max_examples=500, deadline=None)
@given(damaged_frames(), st.binary(max_size=20))
def test_what_it_takes_wsproto_reads_as_the_same_message(frame: bytes, rest: bytes) -> None:
    """Whenever a frame is taken, wsproto reads the same bytes as exactly that one
    message, with nothing left over (so what follows starts a frame of its own).

    Mutation checked: dropping the reserved-bit test (accepting 0xC1) makes
    Hypothesis find a counterexample here too."""
    data = frame + rest
    got = read_data_frame(data, 0, BIG)
    if got is None:
        return
    message, end = got
    assert wsproto_messages(data[:end]) == [message]


def test_a_payload_over_the_limit_is_left_to_wsproto() -> None:
    """Mutation checked: ignoring ``max_payload`` fails here."""
    frame = client_frame(b"x" * 100)
    assert read_data_frame(frame, 0, 99) is None
    assert read_data_frame(frame, 0, 100) is not None


# -- over a real socket ----------------------------------------------------------

def _exchange(port: int, first: bytes, burst: bytes, replies: int) -> list[tuple[int, bytes]]:
    """Handshake, send ``first`` and wait for its echo (so the read loop has gone
    back to waiting: the fast path is armed), then ``burst`` in one write; return
    the frames of the first ``replies`` answers to it, or (``replies`` < 0) of all
    until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        _handshake(sock)
        sock.sendall(first)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
            buf += sock.recv(65536)
        sock.sendall(burst)
        data = buf + (_read_until_close(sock) if replies < 0 else _read_frames(sock, replies))
    return _frames(data)


def _read_until_close(sock: socket.socket) -> bytes:
    """Read up to the server's close frame, answer it, then read until EOF."""
    data = b""
    while True:
        ends = _frames_complete(data)
        closes = [payload for opcode, payload in _frames(data[: ends[-1]] if ends else b"") if opcode == 0x8]
        if closes:
            break
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    code = closes[0][:2]
    # (A protocol error: the server may have half-closed without waiting for ours.)
    with contextlib.suppress(OSError):
        sock.sendall(client_frame(code, opcode=0x8))
    return data + read_until_eof(sock)


def _read_frames(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(_frames_complete(data)) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _frames_complete(data: bytes) -> list[int]:
    """Ends of the complete frames in ``data``."""
    ends, pos = [], 0
    while len(data) - pos >= 2:
        n, off = data[pos + 1] & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            (n,) = struct.unpack("!H", data[pos + 2 : pos + 4])
            off = 4
        if pos + off + n > len(data):
            break
        pos += off + n
        ends.append(pos)
    return ends


@pytest.mark.anyio
async def test_mixed_burst_is_answered_in_order() -> None:
    """Simple frames, a ping, a fragmented message and a 16-bit-length frame in one
    write: every message echoed, the pong in its place, in order (the read loop
    switches between the fast path and wsproto mid-buffer).

    Mutations checked: returning ``data`` instead of ``data[pos:]`` from
    ``_receive_simple`` (messages delivered twice), and not stopping the fast
    path at the first frame it does not take (the ping's bytes then reach the
    next read as garbage): each fails here."""
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        burst = (
            client_frame(b"a")
            + client_frame(b"bin", opcode=0x2)
            + client_frame(b"p!", opcode=0x9)
            + client_frame(b"fr", fin=False)
            + client_frame(b"ag", opcode=0x0)
            + client_frame("é".encode() * 100)
            + client_frame(b"z")
        )
        frames = await anyio.to_thread.run_sync(_exchange, srv.port, client_frame(b"first"), burst, 6)
    # The pong is written by the read loop at once, the echoes by the handler's
    # task: only the data frames are ordered among themselves.
    assert [f for f in frames if f[0] == 0x1] == [
        (0x1, b"first"),
        (0x1, b"a"),
        (0x1, b"bin"),  # echoed in the connection's encoding (json: text)
        (0x1, b"frag"),
        (0x1, "é".encode() * 100),
        (0x1, b"z"),
    ]
    assert (0xA, b"p!") in frames


@pytest.mark.anyio
async def test_oversize_single_frame_after_a_message_closes_1009() -> None:
    """With the fast path armed, one frame over ``max_message_bytes`` still closes 1009.

    Mutation checked: ``_receive_simple`` passing no limit to ``read_data_frame``
    delivers the message instead (and this fails)."""
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec), limits=ServerLimits(max_message_bytes=100)) as srv:
        frames = await anyio.to_thread.run_sync(_exchange, srv.port, client_frame(b"first"), client_frame(b"x" * 101), -1)
        assert frames[0] == (0x1, b"first")
        assert frames[1][0] == 0x8 and struct.unpack("!H", frames[1][1][:2])[0] == 1009
        assert (await wait_closed(rec)).close_code == 1009


@pytest.mark.anyio
async def test_invalid_utf8_after_a_message_closes_1007() -> None:
    """With the fast path armed, invalid UTF-8 in a text frame still closes 1007,
    after the echo of the valid message before it in the same write.

    Mutation checked: ``read_data_frame`` decoding text with ``errors="replace"``
    delivers a message instead (and this fails)."""
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        burst = client_frame(b"ok") + client_frame(b"\xff\xfe")
        frames = await anyio.to_thread.run_sync(_exchange, srv.port, client_frame(b"first"), burst, -1)
        assert frames[:2] == [(0x1, b"first"), (0x1, b"ok")]
        assert frames[2][0] == 0x8 and struct.unpack("!H", frames[2][1][:2])[0] == 1007
        assert (await wait_closed(rec)).close_code == 1007


@pytest.mark.anyio
async def test_reading_ahead_is_false_only_for_the_last_message_of_a_read() -> None:
    """The callback of ``take_reader`` learns whether more messages of the same
    read follow (``reading_ahead``): True for all but the last of a burst read by
    the fast path, True again afterwards.

    Mutation checked: ``_receive_simple`` leaving ``_ahead`` at True (or setting
    it False for every message) fails here."""
    seen: list[tuple[str | bytes, bool]] = []
    transports: list[WebSocketTransport] = []
    done = anyio.Event()

    def on_message(message: str | bytes) -> None:
        seen.append((message, transports[0].reading_ahead))
        if message == "c":
            done.set()

    async def handler(transport: FrameTransport, request: UpgradeRequest) -> None:
        assert isinstance(transport, WebSocketTransport)
        transports.append(transport)
        assert transport.take_reader(on_message)
        await transport.run_reader()

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            _handshake(sock)
            sock.sendall(client_frame(b"first"))
            while not seen:  # the read loop waits again: the fast path is armed
                time.sleep(0.01)
            sock.sendall(client_frame(b"a") + client_frame(b"b") + client_frame(b"c"))
            while not done.is_set():
                time.sleep(0.01)

    rec = Recorder()
    async with running_server(handler, basic_http(rec)) as srv:
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(client, srv.port)
    assert seen[1:] == [("a", True), ("b", True), ("c", False)]
    assert transports[0].reading_ahead

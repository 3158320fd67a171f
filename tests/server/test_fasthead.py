"""The upgrade fast path (transport/fasthead.py) answers exactly as the h11 path.

``HttpConnection`` reads a plain WebSocket upgrade's head with
``fasthead.parse_get`` and skips h11; anything the parser does not take goes
the h11 way. Two properties keep the two paths the same:

* ``parse_get`` takes a head only when h11 (with rtcore's ``_header_list`` and
  ``_check_request``) takes it too, as a body-less HTTP/1.1 ``GET`` with the
  same target and the same header list;
* a whole connection answers the same bytes (101 with the same headers, or
  the same refusal: status, code and message) and hands the application the
  same ``UpgradeRequest`` with the fast path on and off
  (``http._FAST_UPGRADE``), for random and mutated heads.

Mutations seen caught (each made in ``fasthead.py`` or ``http.py``, then undone):

* allow a space before the colon in ``_BLOCK`` (``[ \\t]*:``) →
  ``test_parse_get_agrees_with_h11`` fails (h11 refuses ``Host : x`` with 400);
* accept ``HTTP/1.0`` in ``_REQUEST_LINE`` → both property tests fail (h11
  gives version 1.0, and the h11 path refuses the upgrade with 400);
* drop the ``Host`` count (accept no Host) → both property tests fail
  (h11 refuses a 1.1 request without Host);
* drop the Content-Length/Transfer-Encoding fallback → ``test_framing_headers_go_to_h11``
  and the property tests fail (``Content-Length: 5`` is a body: 400 on the h11 path);
* let ``\\x00``-``\\x08`` or ``\\x0b`` into field values (``_VALUE_OWS``),
  or ``@`` into tokens → ``test_parse_get_agrees_with_h11`` fails
  (and the edge-bytes test);
* write the 101 with a reason phrase (``101 Switching Protocols``) →
  ``test_connection_answers_alike`` and ``test_upgrade_with_pipelined_frame`` fail;
* drop the shutdown check in ``_fast_upgrade`` → ``test_refused_during_shutdown``
  fails (101 instead of 503);
* make ``parse_get`` always return None → ``test_common_heads_take_the_fast_path`` fails;
* strip only spaces around field values (``value.strip(b" ")``) →
  ``test_parse_get_agrees_with_h11_on_edge_bytes`` fails;
* ``trailing = b""`` in ``_fast_upgrade`` → ``test_upgrade_with_pipelined_frame`` fails.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import h11
import pytest
from anyio.abc import ByteStream
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rtcore.errors import RtcoreError
from rtcore.transport import http, websocket
from rtcore.transport.config import ServerLimits, WebSocketPolicy
from rtcore.transport.fasthead import parse_get
from rtcore.transport.head import HeadScanner
from rtcore.transport.http import HttpConnection, ServerState, _check_request, _header_list, _next_event
from rtcore.transport.messages import HttpRequest, HttpResponse, UpgradeRequest, json_response
from rtcore.transport.shutdown import Shutdown
from rtcore.transport.websocket import WebSocketTransport

pytestmark = pytest.mark.anyio

EXAMPLES = int(os.environ.get("RTCORE_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# The parser alone is cheap: more examples.
PARSER_SETTINGS = settings(SETTINGS, max_examples=EXAMPLES * 5)
LIMITS = ServerLimits()
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

GOOD_LINES = [
    b"Host: example.com",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
]
EXTRA_LINES = [
    b"Host: other",
    b"Host : x",
    b"Host:",
    b"host:\texample.com\t",
    b"Upgrade: WebSocket, h2c",
    b"upgrade: foo",
    b"Connection: keep-alive, Upgrade",
    b"Connection: close",
    b"Sec-WebSocket-Key: short",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 8",
    b"Sec-WebSocket-Protocol: rtcore.v1.msgpack, rtcore.v1.json",
    b"Sec-WebSocket-Protocol: chat",
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    b"Origin: https://example.com",
    b"Authorization: Bearer tok",
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue",
    b"X-A: a\x00b",
    b"X-A: \x01",
    b"X-A: caf\xe9",
    b"X-A:",
    b"X-A:   spaced   value   ",
    b"X-A: a\x0bb",
    b"X-A: a\rb",
    b"Bad Name: x",
    b"X@: y",
    b": empty name",
    b"X-\xff: y",
]
REQUEST_LINES = [
    b"GET /v1/ws HTTP/1.1",
    b"GET /v1/ws?token=abc&x=1&token=zz HTTP/1.1",
    b"GET /v1/w%73 HTTP/1.1",
    b"GET /other HTTP/1.1",
    b"GET /v1/ws HTTP/1.0",
    b"GET /v1/ws HTTP/2.0",
    b"GET /v1/ws HTTP/1.1 ",
    b"GET  /v1/ws HTTP/1.1",
    b"GET http://x/v1/ws HTTP/1.1",
    b"GET * HTTP/1.1",
    b"get /v1/ws HTTP/1.1",
    b"POST /v1/ws HTTP/1.1",
    b"GET /v1/\x7fws HTTP/1.1",
]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """An upgrade head, perhaps with extra, missing, bad or random lines and one byte changed."""
    lines = [draw(st.sampled_from(REQUEST_LINES[:3]) | st.sampled_from(REQUEST_LINES))]
    fields = list(GOOD_LINES)
    listed = st.sampled_from(EXTRA_LINES)
    for _ in range(draw(st.integers(0, 4))):
        if fields and draw(st.integers(0, 4)) == 0:
            del fields[draw(st.integers(0, len(fields) - 1))]
        else:
            extra = draw(listed | listed | listed | st.binary(max_size=30).filter(lambda b: b"\n" not in b))
            fields.insert(draw(st.integers(0, len(fields))), extra)
    head = b"\r\n".join(lines + fields) + b"\r\n\r\n"
    if draw(st.integers(0, 2)) == 0:  # one byte replaced, inserted or deleted
        at = draw(st.integers(0, len(head) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = bytes([draw(st.integers(0, 255))])
        if kind == "replace":
            head = head[:at] + byte + head[at + 1 :]
        elif kind == "insert":
            head = head[:at] + byte + head[at:]
        else:
            head = head[:at] + head[at + 1 :]
    return head


def scanned(data: bytes) -> tuple[int, int] | None:
    """Where HeadScanner finds the head in ``data`` (None: it refuses it or it is incomplete)."""
    try:
        return HeadScanner(LIMITS).scan(data)
    except RtcoreError:
        return None


def h11_view(data: bytes) -> tuple[Any, ...] | None:
    """What the h11 path of ``_serve`` makes of a complete head (None: refused)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMITS.max_header_bytes)
    conn.receive_data(data)
    try:
        event = _next_event(conn)
        if not isinstance(event, h11.Request):
            return None
        headers = _header_list(event)
        _check_request(event, headers)
        return event.method, event.http_version, event.target, headers, _next_event(conn)
    except RtcoreError:
        return None


def check_agreement(data: bytes) -> None:
    found = scanned(data)
    assume(found is not None)
    assert found is not None
    start, end = found
    fast = parse_get(data, start, end)
    if fast is None:
        return  # the h11 path decides: nothing to compare
    view = h11_view(data[start:])
    assert view is not None, f"fast path takes a head h11 refuses: {data!r}"
    method, version, target, headers, after = view
    assert (method, version) == (b"GET", b"1.1")
    assert fast == (target, headers)
    assert all(type(v) is bytes and type(k) is bytes for k, v in fast[1])
    assert isinstance(after, h11.EndOfMessage), "a head with a body must go to h11"


@PARSER_SETTINGS
@given(head=heads())
def test_parse_get_agrees_with_h11(head: bytes) -> None:
    check_agreement(head)


#: Bytes that matter to the field grammar (token, separators, whitespace, controls, obs-text).
EDGE_BYTES = [b"a", b"Z", b"0", b"-", b"!", b"~", b":", b" ", b"\t", b"\x00", b"\x01", b"\x0b", b"\x0c", b"\r", b"\x7f", b"\x80", b"\xff", b'"', b"(", b"@", b"/"]
edge_text = st.lists(st.sampled_from(EDGE_BYTES), max_size=8).map(b"".join)


@PARSER_SETTINGS
@given(name=st.sampled_from([b"X-A", b"a"]) | edge_text, value=edge_text, after=st.booleans())
def test_parse_get_agrees_with_h11_on_edge_bytes(name: bytes, value: bytes, after: bool) -> None:
    """One header line made of the bytes the grammar turns on, before or after Host."""
    field = name + b":" + value if after else name + value
    lines = [b"GET /v1/ws HTTP/1.1", *GOOD_LINES]
    lines.insert(2 if after else 1, field)
    check_agreement(b"\r\n".join(lines) + b"\r\n\r\n")


@PARSER_SETTINGS
@given(head=st.binary(max_size=200).map(lambda b: b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n" + b + b"\r\n\r\n"))
def test_parse_get_agrees_with_h11_on_random_bytes(head: bytes) -> None:
    check_agreement(head)


def test_common_heads_take_the_fast_path() -> None:
    """Browser-like and minimal upgrade heads are read without h11."""
    minimal = b"GET /v1/ws HTTP/1.1\r\n" + b"\r\n".join(GOOD_LINES) + b"\r\n\r\n"
    browser = (
        b"\r\nGET /v1/ws?token=t HTTP/1.1\r\nHost: localhost:8000\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\n"
        b"Upgrade: websocket\r\nOrigin: http://localhost:8000\r\nSec-WebSocket-Version: 13\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        b"Sec-WebSocket-Protocol: rtcore.v1.json\r\n\r\n"
    )
    for head in (minimal, browser):
        found = scanned(head)
        assert found is not None
        parsed = parse_get(head, *found)
        assert parsed is not None
        assert parsed[1] == h11_view(head[found[0] :])[3]  # type: ignore[index]


def test_framing_headers_go_to_h11() -> None:
    for extra in (b"Content-Length: 0", b"Content-Length: 5", b"Transfer-Encoding: chunked", b"content-length:0"):
        head = b"GET /v1/ws HTTP/1.1\r\n" + b"\r\n".join([*GOOD_LINES, extra]) + b"\r\n\r\n"
        assert parse_get(head, 0, len(head)) is None, extra


# -- whole connections ----------------------------------------------------------


class FakeStream(ByteStream):
    """A client that sends ``chunks`` then EOF, and keeps what the server writes."""

    def __init__(self, chunks: list[bytes], on_read: Any = None) -> None:
        self._chunks = list(chunks)
        self._on_read = on_read  # called once, with the first chunk
        self.sent = bytearray()
        self._closed = False
        self._wake = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        # After a 101 the client stays until the server's close frame, so the
        # order of what the server writes does not depend on scheduling.
        while not self._chunks and not self._closed and self.sent.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n\x88" not in self.sent:
            await self._wake.wait()
            self._wake = anyio.Event()
        if not self._chunks:
            raise anyio.EndOfStream
        chunk = self._chunks.pop(0)
        if self._on_read is not None:
            self._on_read, on_read = None, self._on_read
            on_read()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self._chunks.insert(0, rest)
        return chunk

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.sent += item
        self._wake.set()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self._chunks.clear()
        self._closed = True
        self._wake.set()


async def serve_once(
    chunks: list[bytes],
    fast: bool,
    *,
    policy: WebSocketPolicy | None = None,
    shutting_down: bool = False,
    read_one: bool = False,
    after_read: Any = None,
) -> tuple[bytes, list[Any]]:
    """Run one HttpConnection over ``chunks``: (bytes written, what the handlers saw)."""
    seen: list[Any] = []

    async def on_websocket(transport: Any, request: UpgradeRequest) -> None:
        seen.append(
            (request.path, request.query, request.headers, request.token, request.encoding, request.subprotocol, request.origin)
        )
        assert isinstance(transport, WebSocketTransport)
        if read_one:
            seen.append(await transport.receive())
            if after_read is not None:
                after_read(transport)

    async def on_http(request: HttpRequest) -> HttpResponse:
        seen.append((request.method, request.path, request.headers))
        return json_response(200, {"path": request.path})

    shutdown = Shutdown()
    state = ServerState(
        on_http=on_http,
        on_websocket=on_websocket,
        limits=LIMITS,
        policy=policy or WebSocketPolicy(),
        shutdown=shutdown,
    )
    # The shutdown starts while the head is being read (before it, nothing is read).
    stream = FakeStream(chunks, (lambda: shutdown.begin(5.0)) if shutting_down else None)
    saved = http._FAST_UPGRADE
    http._FAST_UPGRADE = fast
    try:
        with anyio.fail_after(10):
            await HttpConnection(stream, state).run()
    finally:
        http._FAST_UPGRADE = saved
    return bytes(stream.sent), seen


async def both(chunks: list[bytes], **kwargs: Any) -> tuple[bytes, list[Any]]:
    fast = await serve_once(chunks, True, **kwargs)
    slow = await serve_once(chunks, False, **kwargs)
    assert fast == slow, f"{b''.join(chunks)!r}"
    return fast


@SETTINGS
@given(
    head=heads(),
    cuts=st.lists(st.integers(1, 400), max_size=2),
    deflate=st.booleans(),
    paths=st.sampled_from([None, frozenset({"/v1/ws"})]),
)
async def test_connection_answers_alike(head: bytes, cuts: list[int], deflate: bool, paths: frozenset[str] | None) -> None:
    """Same bytes out (101 or refusal) and the same UpgradeRequest, fast path on or off."""
    chunks = [head[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(head)], strict=True) if head[a:b]]
    await both(chunks, policy=WebSocketPolicy(paths=paths, permessage_deflate=deflate))


def mask(payload: bytes) -> bytes:
    key = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_upgrade_with_pipelined_frame() -> None:
    """A frame sent in the same read as the head reaches the application on both paths."""
    head = b"GET /v1/ws?token=t HTTP/1.1\r\n" + b"\r\n".join(GOOD_LINES) + b"\r\n\r\n"
    out, seen = await both([head + mask(b"hello")], read_one=True)
    assert out.startswith(b"HTTP/1.1 101 \r\n")
    assert seen[-1] == "hello"
    assert seen[0][3] == "t"


async def test_refused_during_shutdown() -> None:
    head = b"GET /v1/ws HTTP/1.1\r\n" + b"\r\n".join(GOOD_LINES) + b"\r\n\r\n"
    out, seen = await both([head], shutting_down=True)
    assert out.startswith(b"HTTP/1.1 503 ")
    assert b'"shutdown"' in out
    assert seen == []


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        (b"Sec-WebSocket-Version: 8", 426, b'"bad_request"'),
        (b"Sec-WebSocket-Protocol: chat", 400, b'"bad_request"'),
        (b"Content-Length: 5", 400, b'"bad_request"'),
        (b"Host: second", 400, b'"bad_request"'),
        (b"Transfer-Encoding: gzip", 501, b'"bad_request"'),
    ],
)
async def test_refusals_match(extra: bytes, status: int, code: bytes) -> None:
    """Each refusal has its documented status and code on both paths."""
    head = b"GET /v1/ws HTTP/1.1\r\n" + b"\r\n".join([*GOOD_LINES, extra]) + b"\r\n\r\n"
    out, _ = await both([head])
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:60]
    assert code in out


# -- wsproto is built lazily -------------------------------------------------------


async def test_connect_builds_no_wsproto_for_simple_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection without extensions makes no wsproto connection for its simple
    frames (the fast frame reader reads them); with permessage-deflate it makes one,
    at once, with the extension.

    Mutation: build it in ``WebSocketTransport.__init__`` again
    (``_new_wsproto(extensions)`` unconditionally) → fails (one built).
    """
    built: list[int] = []
    real = websocket._new_wsproto

    def counting(extensions: Any) -> Any:
        built.append(len(extensions))
        return real(extensions)

    monkeypatch.setattr(websocket, "_new_wsproto", counting)
    monkeypatch.setattr(websocket, "_WS_POOL", [])
    head = b"GET /v1/ws HTTP/1.1\r\n" + b"\r\n".join(GOOD_LINES) + b"\r\n\r\n"
    at_message: list[Any] = []
    out, seen = await serve_once(
        [head, mask(b"hello")], True, read_one=True, after_read=lambda t: at_message.append((list(built), t._wsc))
    )
    assert out.startswith(b"HTTP/1.1 101 ")
    assert seen[-1] == "hello"
    assert at_message == [([], None)]
    built.clear()  # (the close frame then needs one)
    offer = b"Sec-WebSocket-Extensions: permessage-deflate"
    out, seen = await serve_once(
        [head[:-2] + offer + b"\r\n\r\n"], True, policy=WebSocketPolicy(permessage_deflate=True)
    )
    assert b"permessage-deflate" in out
    assert built == [1]

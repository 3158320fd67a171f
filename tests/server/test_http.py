"""HTTP/1.1 layer over real sockets: limits, framing, keep-alive, streaming."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from functools import partial

import anyio
import httpx
import pytest

from rtcore.transport import HttpRequest, HttpResponse, ServerLimits, StreamingResponse

from .helpers import (
    Recorder,
    basic_http,
    echo_handler,
    json_of,
    raw_exchange,
    read_until_eof,
    running_server,
    split_response,
)

pytestmark = pytest.mark.anyio


async def raw(port: int, payload: bytes | list[bytes], delay: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    data = await anyio.to_thread.run_sync(partial(raw_exchange, port, payload, delay=delay))
    return split_response(data)


async def test_get_and_json_errors() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv, httpx.AsyncClient() as client:
        r = await client.post(f"{srv.http_url}/echo?a=1&a=2&token=t", content=b"hi")
        assert r.status_code == 200
        assert r.json() == {"method": "POST", "body": "hi", "query": {"a": "1", "token": "t"}, "token": "t"}
        r = await client.get(f"{srv.http_url}/echo", headers={"authorization": "Bearer abc"})
        assert r.json()["token"] == "abc"
        r = await client.get(f"{srv.http_url}/missing")
        assert r.status_code == 404
        assert r.json() == {"code": "not_found", "message": "no route for /missing"}
        r = await client.get(f"{srv.http_url}/boom")
        assert r.status_code == 500
        assert r.json()["code"] == "internal"


async def test_keep_alive_reuses_the_connection() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv, httpx.AsyncClient() as client:
        peers = [(await client.get(f"{srv.http_url}/peer")).json()["peer"] for _ in range(3)]
    assert peers[0] == peers[1] == peers[2]
    assert len(rec.http) == 3


async def test_pipelined_requests_on_one_connection() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        req = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        data = await anyio.to_thread.run_sync(partial(raw_exchange, srv.port, req * 2 + last))
    assert data.count(b"HTTP/1.1 200 ") == 3


async def test_idle_keep_alive_connection_is_closed() -> None:
    """An idle keep-alive connection is closed at ``keepalive_timeout``.

    Mutation seen caught (asyncio, where a ``ProtocolStream`` waits for the
    next request with a loop timer instead of a cancel scope): the timer set
    an hour late in ``HttpConnection._wait_for_request`` → fails.
    """
    rec = Recorder()
    limits = ServerLimits(keepalive_timeout=0.2)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                return read_until_eof(sock)  # returns only because the server closes

        data = await anyio.to_thread.run_sync(client)
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_http10_closes_after_response() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        status, _, body = await raw(srv.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert status == 200
    assert json_of(body)["method"] == "GET"


async def test_header_block_too_big_in_one_read_is_431() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        # 70 KB of small header lines, sent in one write.
        headers = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
        status, hdrs, body = await raw(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status == 431
    assert hdrs["connection"] == "close"
    assert json_of(body)["code"] == "message_too_big"
    assert rec.http == []


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ],
    ids=["line-too-long", "too-many-headers", "request-line-too-long"],
)
async def test_header_limits(head: bytes, status: int) -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        got, _, body = await raw(srv.port, head)
    assert got == status
    assert json_of(body)["code"] == "message_too_big"


async def test_small_header_limit_is_configurable() -> None:
    rec = Recorder()
    limits = ServerLimits(max_header_bytes=256)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        status, _, _ = await raw(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 300 + b"\r\n\r\n")
    assert status == 431


async def test_slowloris_gets_408() -> None:
    rec = Recorder()
    limits = ServerLimits(header_timeout=0.2)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        pieces = [b"GET / HTTP/1.1\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(100)]
        status, hdrs, body = await raw(srv.port, pieces, delay=0.05)
    assert status == 408
    assert hdrs["connection"] == "close"
    assert json_of(body)["code"] == "timeout"
    assert rec.http == []


async def test_slow_body_gets_408() -> None:
    rec = Recorder()
    limits = ServerLimits(body_timeout=0.2)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        pieces = [b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] + [b"a"] * 100
        status, _, body = await raw(srv.port, pieces, delay=0.05)
    assert status == 408
    assert json_of(body)["code"] == "timeout"


async def test_bare_lf_is_400() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        status, _, body = await raw(srv.port, b"GET / HTTP/1.1\nHost: x\n\n")
    assert status == 400
    assert json_of(body)["code"] == "bad_request"
    assert rec.http == []


async def test_content_length_with_transfer_encoding_is_400_and_closed() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        smuggle = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        # raw_exchange reads until EOF: returning at all proves the server closed.
        data = await anyio.to_thread.run_sync(partial(raw_exchange, srv.port, smuggle))
    status, hdrs, body = split_response(data)
    assert status == 400
    assert hdrs["connection"] == "close"
    assert json_of(body)["code"] == "bad_request"
    assert data.count(b"HTTP/1.1") == 1  # the smuggled request was not served
    assert rec.http == []


async def test_body_too_big_is_413() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv, httpx.AsyncClient() as client:
        r = await client.post(f"{srv.http_url}/echo", content=b"x" * (1024 * 1024 + 1))
        assert r.status_code == 413
        assert r.json()["code"] == "message_too_big"
        r = await client.post(f"{srv.http_url}/echo", content=b"x" * (1024 * 1024))
        assert r.status_code == 200
    assert len(rec.http) == 1


async def test_chunked_body_too_big_is_413() -> None:
    rec = Recorder()
    limits = ServerLimits(max_body_bytes=100)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        chunk = b"40\r\n" + b"a" * 64 + b"\r\n"
        status, _, body = await raw(
            srv.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
        )
    assert status == 413
    assert json_of(body)["code"] == "message_too_big"


async def test_expect_100_continue() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
                )
                interim = sock.recv(1024)
                assert interim.startswith(b"HTTP/1.1 100 ")
                sock.sendall(b"ok")
                return read_until_eof(sock)

        data = await anyio.to_thread.run_sync(client)
    status, _, body = split_response(data)
    assert status == 200
    assert json_of(body)["body"] == "ok"


async def test_sse_chunks_arrive_incrementally() -> None:
    rec = Recorder()
    step = anyio.Event()
    finished = anyio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: one\n\n"
            await step.wait()  # only sent after the client saw the first event
            yield b"data: two\n\n"
        finally:
            finished.set()

    async def on_http(request: HttpRequest) -> HttpResponse | StreamingResponse:
        return StreamingResponse(200, [(b"content-type", b"text/event-stream")], events())

    async with running_server(echo_handler(rec), on_http) as srv, httpx.AsyncClient() as client:
        async with client.stream("GET", f"{srv.http_url}/sse") as r:
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["transfer-encoding"] == "chunked"
            received = []
            async for text in r.aiter_text():
                received.append(text)
                if text == "data: one\n\n":
                    step.set()
        assert received == ["data: one\n\n", "data: two\n\n"]
        with anyio.fail_after(5):
            await finished.wait()


async def test_sse_generator_is_closed_when_client_leaves() -> None:
    rec = Recorder()
    closed = anyio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b": keep-alive\n\n"
                await anyio.sleep(0.01)
        finally:
            closed.set()

    async def on_http(request: HttpRequest) -> HttpResponse | StreamingResponse:
        return StreamingResponse(200, [(b"content-type", b"text/event-stream")], forever())

    async with running_server(echo_handler(rec), on_http) as srv:
        # A raw socket, not httpx: leaving an httpx stream early abandons its inner
        # async generators, which trio reports as a ResourceWarning (an error here).
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as sock:
            await sock.send(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            with anyio.fail_after(5):
                while b"keep-alive" not in received:
                    received += await sock.receive()
        with anyio.fail_after(5):
            await closed.wait()


async def test_head_has_length_but_no_body() -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        data = await anyio.to_thread.run_sync(
            partial(raw_exchange, srv.port, b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
    status, headers, body = split_response(data)
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nHost : y\r\n\r\n",  # whitespace before the colon
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"NOT A REQUEST\r\n\r\n",
    ],
    ids=["space-before-colon", "two-content-lengths", "nul-in-value", "garbage"],
)
async def test_malformed_requests_are_400(request_bytes: bytes) -> None:
    rec = Recorder()
    async with running_server(echo_handler(rec), basic_http(rec)) as srv:
        status, headers, body = await raw(srv.port, request_bytes)
    assert status == 400
    assert headers["connection"] == "close"
    assert json_of(body)["code"] == "bad_request"
    assert rec.http == []


async def test_max_connections_pauses_accepting() -> None:
    rec = Recorder()
    limits = ServerLimits(max_connections=1, keepalive_timeout=60)
    async with running_server(echo_handler(rec), basic_http(rec), limits=limits) as srv:
        async with httpx.AsyncClient() as first:
            assert (await first.get(f"{srv.http_url}/echo")).status_code == 200
            assert srv.control.connections == 1
            async with httpx.AsyncClient() as second:
                with pytest.raises(httpx.TimeoutException):
                    await second.get(f"{srv.http_url}/echo", timeout=0.3)  # queued in the backlog
        async with httpx.AsyncClient() as third:  # the first one left: accepted again
            assert (await third.get(f"{srv.http_url}/echo")).status_code == 200


def test_header_list_is_h11s_lower_case_pairs() -> None:
    """The request's header list (read from h11's internal triples for speed)
    equals what iterating h11's ``Headers`` gives: lower-case names, values as sent,
    in order, repeats kept.

    Mutation seen caught: ``_header_list`` taking the raw name of each triple
    (``raw`` instead of ``name``) → ``b"Host"`` where ``b"host"`` belongs → fails.
    """
    import h11

    from rtcore.transport.http import _header_list

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-Two: a\r\nx-two: B\r\nUpgrade: WebSocket\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert _header_list(event) == list(event.headers) == [(b"host", b"x"), (b"x-two", b"a"), (b"x-two", b"B"), (b"upgrade", b"WebSocket")]

"""The request-smuggling corpus against a real server (see smuggling.py for the cases).

Each refused case is sent on a raw socket with a valid request pipelined right
behind it. The server must answer the bad request with its documented status
and error code, mark the response ``Connection: close`` and close: the
pipelined request must never be answered, because after a framing error the
server cannot know where it starts (that is what smuggling exploits). A
bystander WebSocket client is checked to be served afterwards.

Mutations each test was seen to catch:

* drop the obs-fold check in ``HeadScanner.scan`` → ``te-obs-fold`` and
  ``obs-fold`` are answered 200 and the pipelined request is answered too;
* drop the raw-head Content-Length count in ``HttpConnection._serve`` →
  ``cl-twice-same`` and ``cl-list`` are served (h11 merges them);
* drop the version check in ``_check_request`` → ``http-2.0-line`` is served 200;
* drop the origin-form check → ``absolute-form`` gets 404 and the connection
  stays open;
* drop the HTTP/1.0 Transfer-Encoding rule → ``te-in-http10`` is served.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from tests.net.conftest import peer, serving
from tests.net.netapp import app

from .smuggling import ACCEPTED, REFUSED, Case, markdown_table

pytestmark = pytest.mark.anyio

PIPELINED = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; everything the server sends until it closes (or 3 s of silence)."""
    out = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.move_on_after(3.0):
            try:
                while True:
                    out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return out
    return out + b"<still open>"


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of responses with Content-Length bodies."""
    found = []
    while raw.startswith(b"HTTP/1.1 "):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return found


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
async def test_refused_with_its_status_and_closed(case: Case) -> None:
    async with serving(app) as server:
        raw = await exchange(server.port, case.request + PIPELINED)
        got = responses(raw)
        assert len(got) == 1, f"{case.name}: expected one answer then close, got {len(got)}: {raw[:300]!r}"
        status, headers, body = got[0]
        assert status == case.status, f"{case.name}: {raw[:300]!r}"
        assert headers["connection"] == "close"
        assert json.loads(body)["code"] == case.code
        assert not raw.endswith(b"<still open>"), f"{case.name}: connection left open after the error"
        # Everyone else is still served.
        async with peer(server) as other:
            reply = await other.cmd("echo", "still here")
            assert reply["t"] == "ok", reply


@pytest.mark.parametrize(("name", "why", "request_bytes", "count"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
async def test_valid_tricky_requests_are_served(name: str, why: str, request_bytes: bytes, count: int) -> None:
    async with serving(app) as server:
        raw = await exchange(server.port, request_bytes + PIPELINED)
        got = responses(raw)
        assert [s for s, _, _ in got] == [200] * count, f"{name} ({why}): {raw[:400]!r}"


def test_corpus_is_large_enough_and_names_are_unique() -> None:
    names = [c.name for c in REFUSED] + [a[0] for a in ACCEPTED]
    assert len(REFUSED) >= 30
    assert len(names) == len(set(names))


def test_security_doc_carries_the_corpus_table() -> None:
    """docs/security.md holds exactly this corpus (regenerate: ``python -m tests.hardening.smuggling``)."""
    text = DOC.read_text()
    begin, end = "<!-- smuggling:begin -->\n", "<!-- smuggling:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == markdown_table()

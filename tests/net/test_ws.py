"""The wire protocol over real sockets, spoken by the ``websockets`` library and httpx."""

from __future__ import annotations

import json
import uuid

import anyio
import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.ws_client import connect

from .conftest import TIMEOUT, http_url, peer, serving, ws_url
from .netapp import app

pytestmark = pytest.mark.anyio


async def test_json_is_the_default_without_subprotocol() -> None:
    async with serving(app) as server, peer(server, encoding=None) as p:
        assert p.ws.subprotocol is None  # nothing offered: nothing answered, JSON text frames
        assert p.welcome["session"]
        assert p.welcome["limits"]["max_message_size"] == server.limits.max_message_bytes == 1 << 20
        assert p.welcome["heartbeat"] > 0
        reply = await p.cmd("add", {"a": 2, "b": 3})
        assert reply == {"t": "ok", "id": reply["id"], "result": 5, "replayed": False}


async def test_json_subprotocol() -> None:
    async with serving(app) as server, peer(server, encoding="json") as p:
        assert p.ws.subprotocol == "rtcore.v1.json"
        pong = await p.request({"t": "ping"})
        assert pong["t"] == "pong"


async def test_msgpack_subprotocol_uses_binary_frames() -> None:
    async with serving(app) as server, peer(server, encoding="msgpack") as p:
        assert p.ws.subprotocol == "rtcore.v1.msgpack"
        assert p.welcome["t"] == "welcome"
        reply = await p.cmd("echo", {"s": "é", "n": [1, 2], "f": 1.5})
        assert reply["t"] == "ok"
        assert reply["result"] == {"s": "é", "n": [1, 2], "f": 1.5}


async def test_only_unknown_subprotocols_are_refused_before_upgrade() -> None:
    async with serving(app) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server), subprotocols=[Subprotocol("chat.v9")], open_timeout=TIMEOUT):
                pass
        assert info.value.response.status_code == 400


async def test_commands_ok_and_errors() -> None:
    async with serving(app) as server, peer(server, token="ada") as p:
        assert p.welcome["principal"] == "ada"
        ok = await p.cmd("echo", {"x": [1, "two", None]})
        assert ok["result"] == {"x": [1, "two", None]}
        err = await p.cmd("fail")
        assert (err["t"], err["code"], err["retryable"]) == ("err", "nope", False)
        err = await p.cmd("no.such.command")
        assert (err["t"], err["code"]) == ("err", "unknown_command")
        err = await p.cmd("add", {"a": 1, "b": "two"})
        assert err["code"] == "bad_args" and "$.b" in err["message"]


async def test_idempotent_retry_over_websocket_then_http_returns_the_first_result() -> None:
    key = f"k-{uuid.uuid4()}"
    name = f"c-{uuid.uuid4()}"
    async with serving(app) as server:
        async with peer(server, token="ada") as p:
            first = await p.cmd("count", {"name": name}, key=key)
            assert first["result"] == 1 and first["replayed"] is False
            again = await p.cmd("count", {"name": name}, key=key)
            assert again["result"] == 1 and again["replayed"] is True
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            headers = {"Authorization": "Bearer ada", "Idempotency-Key": key}
            r = await http.post(http_url(server, "/v1/cmd/count"), json={"name": name}, headers=headers)
            assert r.status_code == 200
            assert r.headers["idempotent-replayed"] == "true"
            assert r.json() == {"result": 1, "replayed": True}
            # Same key, other arguments: refused, not executed.
            r = await http.post(http_url(server, "/v1/cmd/count"), json={"name": name + "x"}, headers=headers)
            assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"
            # Another principal has its own key space.
            r = await http.post(
                http_url(server, "/v1/cmd/count"), json={"name": name}, headers={"Authorization": "Bearer bob", "Idempotency-Key": key}
            )
            assert r.status_code == 200 and r.json() == {"result": 2, "replayed": False}
            assert "idempotent-replayed" not in r.headers


async def test_http_command_errors_have_documented_statuses() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        r = await http.post(http_url(server, "/v1/cmd/add"), json={"a": 1, "b": 2})
        assert r.status_code == 200 and r.json()["result"] == 3
        r = await http.post(http_url(server, "/v1/cmd/nope"), json={})
        assert r.status_code == 404 and r.json()["code"] == "unknown_command"
        r = await http.post(http_url(server, "/v1/cmd/add"), content=b"{not json")
        assert r.status_code == 400 and r.json()["code"] == "bad_args"
        r = await http.get(http_url(server, "/v1/cmd/add"))
        assert r.status_code == 405
        r = await http.get(http_url(server, "/v1/health"))
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await http.get(http_url(server, "/v1/schema"))
        assert "add" in r.json()["commands"]


async def test_subscribe_replay_then_live_without_gap() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    total = 60
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:

        async def publisher() -> None:
            for _ in range(total // 3):
                r = await http.post(http_url(server, "/v1/cmd/publish"), json={"stream": stream, "n": 3})
                assert r.status_code == 200

        await http.post(http_url(server, "/v1/cmd/publish"), json={"stream": stream, "n": 1})
        epoch_probe = await http.get(http_url(server, f"/v1/streams/{stream}"))
        assert epoch_probe.json()["head"] == 1
        async with peer(server) as p, anyio.create_task_group() as tg:
            tg.start_soon(publisher)  # publishing while the subscription catches up
            subbed = await p.sub(stream, since={"epoch": "", "offset": 0})
            assert subbed["t"] == "subbed" and subbed["recovered"] is True
            events = await p.events(stream, total + 1)
        offsets = [e["offset"] for e in events]
        assert offsets == list(range(1, total + 2))  # every event once, in order, no gap
        assert {e["epoch"] for e in events} == {subbed["epoch"]}


@pytest.mark.asyncio_only(reason="aborts the asyncio transport of the websockets client (a drop with no close handshake)")
async def test_resume_after_the_client_drops() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server:
        async with peer(server, token="ada") as p:
            await p.sub(stream)
            await p.cmd("publish", {"stream": stream, "n": 5})
            seen = await p.events(stream, 5)
            p.ws.transport.abort()  # the network goes away: no close handshake
        epoch, last = seen[-1]["epoch"], seen[-1]["offset"]
        async with peer(server, token="bob") as other:
            await other.cmd("publish", {"stream": stream, "n": 4})
        async with peer(server, token="ada") as p:
            subbed = await p.sub(stream, since={"epoch": epoch, "offset": last})
            assert subbed["recovered"] is True and subbed["offset"] == 9
            assert [e["offset"] for e in await p.events(stream, 4)] == [6, 7, 8, 9]


async def test_server_cursor_resumes_from_the_last_ack() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server:
        async with peer(server, token="cy") as p:
            await p.sub(stream)
            await p.cmd("publish", {"stream": stream, "n": 3})
            await p.events(stream, 3)
            await p.send({"t": "ack", "stream": stream, "offset": 2})
            assert (await p.request({"t": "ping"}))["t"] == "pong"  # the ack is stored before pong
        async with peer(server, token="cy") as p:  # a new tab: no position, asks for the cursor
            subbed = await p.request({"t": "sub", "stream": stream, "cursor": True})
            assert subbed["recovered"] is True
            assert [e["offset"] for e in await p.events(stream, 1)] == [3]


async def test_malformed_frames_get_bad_frame_and_everyone_carries_on() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server, peer(server) as a, peer(server) as b:
        await b.sub(stream)
        await a.ws.send("{this is not json")
        err = await a.next()
        assert (err["t"], err["code"]) == ("err", "bad_frame")
        await a.ws.send(json.dumps({"t": "cmd", "id": 7, "args": {}}))  # no name
        err = await a.next()
        assert (err["t"], err["code"], err["id"]) == ("err", "bad_frame", 7)
        assert "name" in err["message"]
        await a.ws.send(json.dumps({"t": "warp", "id": 8}))
        assert (await a.next())["code"] == "bad_frame"
        # The same connection still works, and so does the other client.
        assert (await a.cmd("publish", {"stream": stream}))["t"] == "ok"
        assert [e["offset"] for e in await b.events(stream, 1)] == [1]


async def test_history_page_over_http() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        await http.post(http_url(server, "/v1/cmd/publish"), json={"stream": stream, "n": 5})
        r = await http.get(http_url(server, f"/v1/streams/{stream}"), params={"after": 2, "limit": 2})
        page = r.json()
        assert page["head"] == 5 and [e["offset"] for e in page["events"]] == [3, 4]
        r = await http.get(http_url(server, f"/v1/streams/{stream}"), params={"limit": "x"})
        assert r.status_code == 400 and r.json()["code"] == "bad_request"


async def test_pages_are_served() -> None:
    async with serving(app) as server, httpx.AsyncClient(timeout=TIMEOUT) as http:
        r = await http.get(http_url(server, "/"))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert (await http.get(http_url(server, "/nope"))).status_code == 404


async def test_msgpack_ping_bytes_are_the_documented_example() -> None:
    """docs/protocol.md §3: ``ping`` id 2 in MessagePack, and its answer, byte for byte.

    Mutation: give ``Pong`` a field with a default (``ts: float = 0.0``) → the
    answer has a third key → fails.
    """
    async with serving(app) as server, peer(server, encoding="msgpack") as p:
        await p.ws.send(bytes.fromhex("82 a1 74 a4 70 69 6e 67 a2 69 64 02"))
        with anyio.fail_after(TIMEOUT):
            answer = await p.ws.recv()
        assert answer == bytes.fromhex("82 a1 74 a4 70 6f 6e 67 a2 69 64 02")


async def test_open_session_keeps_no_upgrade_request() -> None:
    """An open session holds the token and peer it needs, not the whole upgrade
    request (header list and query dict, ~1.5 kB per idle connection).

    Mutation seen caught: ``Server._on_websocket`` an ``async def`` that
    awaits ``serve_session(..., token=request.token, ...)`` (its frame keeps
    ``request``) → fails.
    """
    import gc

    from rtcore.transport import UpgradeRequest

    async with serving(app) as server, peer(server) as p:
        assert (await p.request({"t": "ping"}))["t"] == "pong"
        gc.collect()
        assert [o for o in gc.get_objects() if type(o) is UpgradeRequest] == []

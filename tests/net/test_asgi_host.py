"""The ASGI adapter inside a host: Starlette mounts, lifespan, lazy start, refusals, imports."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from websockets.typing import Subprotocol

import rtcore
from rtcore.asgi import AsgiApp, asgi_app
from tests.ws_client import connect

from .asgi_servers import KINDS, run_asgi
from .conftest import TIMEOUT
from .netapp import app

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The ASGI server (uvicorn runs on asyncio only: its trio runs are deselected)."""
    kind: str = request.param
    return kind


async def _hello(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Open a session at ``url``: return ``welcome`` and the reply to ``add``."""
    async with connect(url, subprotocols=[Subprotocol("rtcore.v1.json")], open_timeout=TIMEOUT) as ws:
        await ws.send(json.dumps({"t": "hello", "v": 1, "token": "ada"}))
        with anyio.fail_after(TIMEOUT):
            welcome = json.loads(await ws.recv())
            await ws.send(json.dumps({"t": "cmd", "id": 1, "name": "add", "args": {"a": 2, "b": 3}}))
            reply = json.loads(await ws.recv())
    return welcome, reply


async def _first_sse_event(port: int, path: str) -> tuple[bytes, str]:
    """The status line and first event name of an SSE response (raw socket: httpx streams
    left early leave async generators behind, which trio reports)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as sock:
        await sock.send(f"GET {path} HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n".encode())
        buf = b""
        with anyio.fail_after(TIMEOUT):
            while b"\nevent:" not in buf or not buf.endswith(b"\n"):
                buf += await sock.receive()
    status = buf.split(b"\r\n", 1)[0]
    event = buf.split(b"\nevent:", 1)[1].split(b"\n", 1)[0].strip().decode()
    return status, event


async def _host_page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


def _starlette(rt: AsgiApp, *, forward_lifespan: bool) -> Starlette:
    return Starlette(
        routes=[Route("/hello", _host_page), Mount("/rt", app=rt)],
        lifespan=rt.lifespan if forward_lifespan else None,
    )


async def test_mounted_under_a_prefix_in_starlette(server_kind: str) -> None:
    """Mounted at ``/rt`` in Starlette (lifespan forwarded): WebSocket, commands, SSE and health
    answer under the prefix, the host's own route still answers, and nothing answers unprefixed.

    Mutation: ``_route_path`` ignores ``root_path`` → ``/rt/v1/ws`` is refused and
    ``/rt/v1/health`` is 404 → fails.
    Mutation: ``AsgiApp.lifespan`` does not start the node → the startup wait times out.
    """
    rt = asgi_app(app)
    async with run_asgi(server_kind, _starlette(rt, forward_lifespan=True), started=rt) as port:
        assert not rt.started_lazily
        base = f"127.0.0.1:{port}"
        welcome, reply = await _hello(f"ws://{base}/rt/v1/ws")
        assert (welcome["t"], welcome["principal"]) == ("welcome", "ada")
        assert (reply["t"], reply["result"]) == ("ok", 5)
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            assert (await http.get(f"http://{base}/hello")).text == "host"
            r = await http.post(f"http://{base}/rt/v1/cmd/add", json={"a": 40, "b": 2}, headers={"authorization": "Bearer ada"})
            assert (r.status_code, r.json()) == (200, {"result": 42, "replayed": False})
            health = await http.get(f"http://{base}/rt/v1/health")
            assert health.status_code == 200
            assert (await http.get(f"http://{base}/v1/health")).status_code == 404
            stream = f"room:{uuid.uuid4().hex[:8]}"
        status, event = await _first_sse_event(port, f"/rt/v1/streams/{stream}/sse")
        assert (status.split(b" ")[1], event) == (b"200", "rtcore.subscribed")


async def test_mounted_without_lifespan_starts_the_node_on_the_first_request(server_kind: str) -> None:
    """A Starlette ``Mount`` does not forward lifespan: the node starts on the first request
    (``started_lazily``), serves, and :meth:`AsgiApp.aclose` stops it.

    Mutation: ``__call__`` skips ``_ensure_started`` → the first request meets no node
    (500 / refused upgrade) → fails.
    Mutation: ``aclose`` does nothing → ``rt.node`` is still set afterwards → fails.
    """
    rt = asgi_app(app)
    async with run_asgi(server_kind, _starlette(rt, forward_lifespan=False)) as port:
        assert rt.node is None
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.post(f"http://127.0.0.1:{port}/rt/v1/cmd/add", json={"a": 1, "b": 2})
        assert (r.status_code, r.json()["result"]) == (200, 3)
        assert rt.started_lazily and rt.node is not None
        welcome, reply = await _hello(f"ws://127.0.0.1:{port}/rt/v1/ws")
        assert (welcome["t"], reply["result"]) == ("welcome", 5)
        with anyio.fail_after(TIMEOUT):
            await rt.aclose()
        assert rt.node is None


async def test_lifespan_runs_the_apps_startup_and_shutdown(server_kind: str) -> None:
    """ASGI ``lifespan.startup`` starts the node (the app's lifespans run) before the first
    request; ``lifespan.shutdown`` stops it (they exit).

    Mutation: ``_lifespan`` answers ``startup.complete`` without entering ``self.lifespan()``
    → the app's lifespan never ran → fails.
    """
    events: list[str] = []
    own = rtcore.App("lifespan-asgi")

    @own.lifespan
    async def record(node: rtcore.Node) -> AsyncIterator[None]:
        events.append("start")
        yield
        events.append("stop")

    @own.command("events")
    async def list_events(ctx: rtcore.Context, args: Any) -> list[str]:
        return list(events)

    rt = asgi_app(own)
    async with run_asgi(server_kind, rt, started=rt) as port:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.post(f"http://127.0.0.1:{port}/v1/cmd/events", json=None)
        assert r.json()["result"] == ["start"]
        assert not rt.started_lazily
    assert events == ["start", "stop"]
    assert rt.node is None


@pytest.mark.asyncio_only(reason="uvicorn's --root-path, and uvicorn runs on asyncio only")
async def test_uvicorn_root_path_is_stripped() -> None:
    """Behind a proxy that strips ``/rt`` (``uvicorn --root-path /rt``) routes still match.

    Mutation: ``_route_path`` ignores ``root_path`` → 404 → fails.
    """
    import socket

    import uvicorn

    rt = asgi_app(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(rt, root_path="/rt", log_level="warning", ws="wsproto"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        try:
            with anyio.fail_after(TIMEOUT):
                while not server.started:
                    await anyio.sleep(0.01)
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                r = await http.get(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/health")
            assert r.status_code == 200
        finally:
            server.should_exit = True
    sock.close()


class _Recorder:
    """ASGI ``receive``/``send`` of one WebSocket attempt, called directly (no server)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))


@pytest.mark.parametrize("extension", [True, False])
async def test_refused_origin_uses_http_response_extension_or_close_before_accept(extension: bool) -> None:
    """A refused origin is answered before accept: with the error's 403 JSON body when the
    server offers ``websocket.http.response``, else with a close before accept (which ASGI
    servers turn into 403). Never ``websocket.accept``.

    Mutation: ``_refuse`` always sends ``websocket.http.response.start`` → the
    no-extension case fails (a server without it would crash on that message).
    Mutation: origin check skipped in ``_negotiate`` → ``websocket.accept`` is sent → fails.
    """
    rt = asgi_app(app, allowed_origins=["https://game.example"])
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/v1/ws",
        "root_path": "",
        "headers": [(b"origin", b"https://evil.example")],
        "query_string": b"",
        "subprotocols": ["rtcore.v1.json"],
        "extensions": {"websocket.http.response": {}} if extension else {},
    }
    rec = _Recorder()
    async with rt.lifespan():
        await rt(scope, rec.receive, rec.send)
    if extension:
        assert [m["type"] for m in rec.sent] == ["websocket.http.response.start", "websocket.http.response.body"]
        assert rec.sent[0]["status"] == 403
        assert json.loads(rec.sent[1]["body"])["code"] == "forbidden"
    else:
        assert [m["type"] for m in rec.sent] == ["websocket.close"]


def test_importing_the_adapter_needs_no_asgi_server() -> None:
    """``import rtcore.asgi`` works with uvicorn, hypercorn and starlette unimportable.

    Mutation: ``import uvicorn`` at the top of rtcore/server/asgi.py → ImportError → fails.
    """
    code = (
        "import sys\n"
        "for name in ('uvicorn', 'hypercorn', 'starlette', 'sniffio'):\n"
        "    sys.modules[name] = None\n"
        "import rtcore, rtcore.asgi\n"
        "rt = rtcore.asgi.asgi_app(rtcore.App('x'))\n"
        "print(type(rt).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "AsgiApp"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    "cli",
    [
        ["-m", "uvicorn", "tests.net.netapp_asgi:asgi", "--ws", "wsproto", "--lifespan", "on", "--port"],
        ["-m", "hypercorn", "tests.net.netapp_asgi:asgi", "--bind"],
    ],
    ids=["uvicorn", "hypercorn"],
)
async def test_runs_from_the_asgi_servers_command_line(cli: list[str]) -> None:
    """``uvicorn module:asgi`` / ``hypercorn module:asgi`` in a real process: health,
    a session with a command, and a clean exit on SIGTERM (no error logged).

    Mutation: ``_lifespan`` raises instead of answering ``startup.complete`` → the
    servers refuse to start → fails.
    Mutation: ``_lifespan`` raises instead of answering ``shutdown.complete`` → an
    error is logged on SIGTERM → fails.
    """
    import signal

    port = _free_port()
    address = str(port) if cli[1] == "uvicorn" else f"127.0.0.1:{port}"
    async with await anyio.open_process([sys.executable, *cli, address], stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                with anyio.fail_after(30):  # the process starting up, not the test retrying
                    while True:
                        try:
                            r = await http.get(f"http://127.0.0.1:{port}/v1/health")
                            break
                        except httpx.TransportError:
                            assert proc.returncode is None, "the server exited"
                            await anyio.sleep(0.1)
            assert r.status_code == 200
            welcome, reply = await _hello(f"ws://127.0.0.1:{port}/v1/ws")
            assert (welcome["t"], reply["result"]) == ("welcome", 5)
            proc.send_signal(signal.SIGTERM)
            output = b""
            with anyio.fail_after(30):
                async for chunk in proc.stdout:
                    output += chunk
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
    text = output.decode(errors="replace")
    # uvicorn re-raises the signal after its graceful shutdown (exit -15); hypercorn exits 0.
    assert code in (0, -signal.SIGTERM), text
    assert "Traceback" not in text and "ERROR" not in text, text


async def test_a_failing_startup_is_reported_as_lifespan_startup_failed() -> None:
    """An app whose lifespan startup raises answers ``lifespan.startup.failed`` naming the
    error (the ASGI server then refuses to start), not a hang or a crash of the lifespan task.

    Mutation: ``_lifespan`` re-raises instead of sending ``startup.failed`` → the error
    escapes the call → fails.
    """
    broken = rtcore.App("broken-startup")

    @broken.lifespan
    async def database(node: rtcore.Node) -> AsyncIterator[None]:
        raise ConnectionRefusedError("database at 127.0.0.1:1 refused the connection")
        yield  # pragma: no cover

    rt = asgi_app(broken)
    messages = iter([{"type": "lifespan.startup"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    with anyio.fail_after(TIMEOUT):
        await rt({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "database at 127.0.0.1:1 refused" in sent[0]["message"]
    assert rt.node is None


async def test_websocket_path_rules(server_kind: str) -> None:
    """As in ``rtcore serve``: plain HTTP on ``/v1/ws`` is 426 with ``Upgrade: websocket``;
    a WebSocket on another path is refused before accept (404); an unknown subprotocol 400.

    Mutation: ``_websocket`` accepts any path → the ``/v1/other`` upgrade succeeds → fails.
    Mutation: ``_http`` drops the 426 branch → ``/v1/ws`` answers 404 → fails.
    """
    from websockets.exceptions import InvalidStatus

    rt = asgi_app(app)
    async with run_asgi(server_kind, rt, started=rt) as port:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.get(f"http://127.0.0.1:{port}/v1/ws")
        assert (r.status_code, r.headers["upgrade"], r.json()["code"]) == (426, "websocket", "bad_request")
        for path, status in (("/v1/other", 404), ("/v1/ws", 400)):
            protocols = [Subprotocol("chat.v9")] if path == "/v1/ws" else None
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://127.0.0.1:{port}{path}", subprotocols=protocols, open_timeout=TIMEOUT):
                    pass
            assert info.value.response.status_code == status

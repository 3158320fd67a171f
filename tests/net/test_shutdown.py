"""Graceful shutdown over real sockets, in-process and as an ``rtcore serve`` process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

import rtcore
from rtcore.transport import ServerLimits
from tests.ws_client import connect

from . import netapp
from .conftest import TIMEOUT, Peer, http_url, peer, ws_url

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


async def test_stop_lets_inflight_commands_finish_then_says_bye_1001() -> None:
    gate = f"g-{uuid.uuid4()}"
    server = rtcore.Server(netapp.app, port=0, grace=10.0)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with peer(server) as busy, peer(server) as idle:
            await busy.send({"t": "cmd", "id": 1000, "name": "slow", "args": {"gate": gate}})
            assert server.node is not None
            while not any(info.commands_in_flight for info in server.sessions.infos()):
                await anyio.sleep(0.01)  # the command is executing
            tg.start_soon(server.stop)
            while not server.node.draining:
                await anyio.sleep(0.01)
            # An idle session says goodbye at once.
            code, frames = await idle.closed()
            assert code == 1001 and [(f["t"], f["code"], f["reconnect"]) for f in frames] == [("bye", "shutdown", True)]
            # New commands are refused (retryable) while the slow one runs...
            refused = await busy.cmd("add", {"a": 1, "b": 1})
            assert (refused["t"], refused["code"], refused["retryable"]) == ("err", "shutdown", True)
            # ...and nobody new gets in.
            with pytest.raises((OSError, InvalidStatus, InvalidURI)):
                async with connect(ws_url(server), open_timeout=2):
                    pass
            netapp.GATE.setdefault(gate, anyio.Event()).set()
            code, frames = await busy.closed()
            assert code == 1001
            assert [f["t"] for f in frames] == ["ok", "bye"]
            assert frames[0] == {"t": "ok", "id": 1000, "result": "done", "replayed": False}
            assert frames[1]["code"] == "shutdown" and frames[1]["reconnect"] is True
        with anyio.fail_after(TIMEOUT):
            await server.wait_stopped()


async def test_in_flight_http_command_finishes_during_shutdown() -> None:
    gate = f"g-{uuid.uuid4()}"
    server = rtcore.Server(netapp.app, port=0)
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=TIMEOUT) as http:
        await tg.start(server.serve)
        result: list[httpx.Response] = []

        async def call() -> None:
            result.append(await http.post(http_url(server, "/v1/cmd/slow"), json={"gate": gate}))

        tg.start_soon(call)
        while gate not in netapp.GATE:
            await anyio.sleep(0.01)
        tg.start_soon(server.stop)
        assert server.node is not None
        while not server.node.draining:
            await anyio.sleep(0.01)
        netapp.GATE[gate].set()
        with anyio.fail_after(TIMEOUT):
            await server.wait_stopped()
    assert result[0].status_code == 200 and result[0].json()["result"] == "done"


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    with contextlib.suppress(ValueError, OSError):  # the test closed the pipe
        lines.extend(proc.stderr or ())


def _start(*args: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtcore.cli", "serve", *args, "--port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()
            return proc, int(m.group(1)), lines
    proc.kill()
    proc.stderr.close()
    raise AssertionError(f"rtcore serve did not start (exit {proc.wait()})")


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_rtcore_serve_process_exits_0_on_signal(sig: signal.Signals, loop: str) -> None:
    """``rtcore serve --loop`` runs on the chosen event loop, and drains on a signal on both.

    Mutation: ``anyio.run(main)`` without ``backend=`` in rtcore.run → the log names asyncio → fails.
    """
    proc, port, lines = await anyio.to_thread.run_sync(_start, "tests/net/netapp.py:app", "--grace", "5", "--loop", loop)
    try:
        assert any(f"event loop: {loop})" in line for line in lines), lines
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", subprotocols=[Subprotocol("rtcore.v1.json")], open_timeout=TIMEOUT) as ws:
            p = Peer(ws, "json")
            await p.send({"t": "hello", "v": 1})
            assert (await p.next())["t"] == "welcome"
            await p.send({"t": "cmd", "id": 1000, "name": "slow", "args": {"seconds": 0.3}})
            assert (await p.cmd("add", {"a": 1, "b": 2}))["result"] == 3
            proc.send_signal(sig)
            code, frames = await p.closed()
        assert code == 1001
        assert [f["t"] for f in frames] == ["ok", "bye"]  # the slow command finished first
        assert frames[1]["reconnect"] is True
        status = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=TIMEOUT))
        assert status == 0
        with anyio.fail_after(TIMEOUT):
            while not any("rtcore: stopped" in line for line in lines):
                await anyio.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_run_names_an_unknown_event_loop() -> None:
    """Mutation: drop the check in rtcore.run → anyio's LookupError (or a server start) instead → fails."""
    with pytest.raises(ValueError, match="anyio_backend must be 'asyncio' or 'trio', not 'curio'"):
        rtcore.run(netapp.app, port=0, anyio_backend="curio")


async def test_stop_gives_the_close_handshakes_close_timeout_after_the_drain() -> None:
    """The transport's forced close comes ``close_timeout`` after the sessions said bye, not ``grace`` + 1 s after the start.

    With thousands of connections the sessions are still sending their
    ``bye`` + close frames a second after the drain began: a deadline then
    made the transport close them itself (1001 without ``bye``) and run a
    second close task per connection. The sessions' close handshakes now get
    one deadline, ``close_timeout`` after the drain.

    Mutation seen caught: the old ``begin_stop(grace + 1.0)`` and
    ``control.stop(grace=1.0)`` → the deadline is 1 s after the drain → fails.
    """
    limits = ServerLimits(close_timeout=7.0)
    server = rtcore.Server(netapp.app, port=0, grace=0.5, limits=limits)
    seen: list[tuple[str, float, float]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        plain_drain = server.sessions.drain

        async def drain(grace: float) -> None:
            seen.append(("drain", anyio.current_time(), server.control.shutdown.deadline))
            await plain_drain(grace)
            seen.append(("drained", anyio.current_time(), server.control.shutdown.deadline))

        server.sessions.drain = drain  # type: ignore[method-assign]
        plain_stop = server.control.stop

        async def stop(grace: float = 10.0, reason: str = "server shutdown") -> None:
            server.control.begin_stop(grace, reason)  # what stop() does first: see its deadline
            seen.append(("stop", anyio.current_time(), server.control.shutdown.deadline))
            await plain_stop(grace, reason)

        server.control.stop = stop  # type: ignore[method-assign]
        async with peer(server) as idle:
            tg.start_soon(server.stop)
            code, frames = await idle.closed()
            assert code == 1001 and [f["t"] for f in frames] == ["bye"]
        with anyio.fail_after(TIMEOUT):
            await server.wait_stopped()
    (_, start, first_deadline), (_, drained, _), (_, _, deadline) = seen
    assert first_deadline >= start + 0.5 + 7.0  # nothing forced while the sessions drain
    assert deadline >= drained + 7.0  # then close_timeout for the replies to their close frames

"""Helpers for the multi-process tests: server processes, raw clients, a failover proxy.

Everything here talks to real processes over real sockets:

* :class:`ServerProcess` starts ``rtcore serve`` (the CLI) or ``python -c``
  calling :func:`rtcore.run` on a free port, waits until ``GET /v1/health``
  answers, and kills it with SIGKILL (``kill -9``) or SIGTERM. Its stderr goes
  to a file that failures print.
* :class:`RawSubscriber` is a subscriber written against the documented
  protocol with the ``websockets`` library only: it resumes with ``since``
  on another process when its process dies, and records every frame.
* :class:`Commander` sends ``put`` commands over WebSocket or HTTP, with
  idempotency keys, retrying retryable failures (and dead processes) with the
  same key.
* :class:`FailoverProxy` is a tiny TCP load balancer: each new connection
  goes to the first upstream that accepts, so :mod:`rtcore.client` (which
  knows one URL) fails over to a live process after a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from tests.redis_server import RedisServer, redis_server_binary, require_services

ROOT = Path(__file__).resolve().parents[2]
APP = "tests/multinode/mnapp.py:app"
TIMEOUT = 10.0

#: Connection-level failures: the process died or is not reachable.
NET_ERRORS = (OSError, ConnectionClosed, InvalidHandshake, httpx.TransportError, TimeoutError, anyio.EndOfStream)


def need_redis() -> None:
    """Skip (or fail with ``RTCORE_REQUIRE_SERVICES=1``) without a redis-server binary."""
    if redis_server_binary() is None:
        if require_services():
            pytest.fail("redis-server is not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")


@contextlib.contextmanager
def private_redis(*, persistent: bool = True) -> Any:
    """A private redis-server (AOF + ``appendfsync always`` when persistent), stopped after."""
    need_redis()
    server = RedisServer(persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One rtcore server process on a free port (see the module docstring).

    Args:
        backend: Backend URL.
        log_dir: Where its stderr log goes.
        name: For the log file and messages.
        roles: ``--role`` values (all roles when empty).
        cli: ``True``: ``python -m rtcore.cli serve``; ``False``: ``python -c``
            calling :func:`rtcore.run` with ``run_options``.
        run_options: Extra keyword arguments for :func:`rtcore.run` (``python -c``
            only), e.g. ``idempotency_lease=2.0`` so a command left pending by a
            killed process can be retried within the test's time.
        app: The ``module:attribute`` the CLI serves (``mnapp`` by default; CLI only).
    """

    def __init__(
        self,
        backend: str,
        log_dir: Path,
        name: str,
        *,
        roles: Sequence[str] = (),
        cli: bool = True,
        run_options: dict[str, Any] | None = None,
        app: str = APP,
    ) -> None:
        self.app = app
        self.backend = backend
        self.name = name
        self.roles = tuple(roles)
        self.cli = cli
        self.run_options = dict(run_options or {})
        self.log_path = log_dir / f"{name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def _argv(self) -> list[str]:
        if self.cli:
            argv = [sys.executable, "-m", "rtcore.cli", "serve", self.app, "--port", str(self.port)]
            argv += ["--backend", self.backend, "--log-level", "warning", "--grace", "1"]
            for role in self.roles:
                argv += ["--role", role]
            return argv
        options = {"port": self.port, "backend": self.backend, "grace": 1.0, **self.run_options}
        if self.roles:
            options["roles"] = frozenset(self.roles)
        code = (
            "import rtcore\n"
            "from tests.multinode.mnapp import app\n"
            f"rtcore.run(app, **{options!r})\n"
        )
        return [sys.executable, "-c", code]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        return subprocess.Popen(
            self._argv(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
        )

    async def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start on a fresh free port and wait for ``GET /v1/health`` → 200."""
        self.proc = self._spawn()
        async with httpx.AsyncClient(timeout=2.0) as http:
            with anyio.fail_after(timeout):
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
                    with contextlib.suppress(httpx.TransportError):
                        r = await http.get(f"{self.http}/v1/health")
                        if r.status_code == 200:
                            return self
                    await anyio.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: ``kill -9``) and reap the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.asynccontextmanager
async def processes(*servers: ServerProcess) -> AsyncIterator[list[ServerProcess]]:
    """Start the servers (in parallel); kill every one of them on exit, whatever happens."""
    try:
        async with anyio.create_task_group() as tg:
            for s in servers:
                tg.start_soon(s.start)
        yield list(servers)
    finally:
        for s in servers:
            s.kill()


def assert_alive(servers: Sequence[ServerProcess]) -> None:
    """Fail with the log of any server process that died on its own."""
    dead = [s for s in servers if not s.alive]
    assert not dead, "\n".join(f"{s.name} died (exit {s.proc.returncode if s.proc else None}):\n{s.log()}" for s in dead)


# --- raw protocol clients (websockets library only) --------------------------------


@contextlib.asynccontextmanager
async def ws_session(url: str, token: str | None = None) -> AsyncIterator[ClientConnection]:
    """Open ``url``, send ``hello``, await ``welcome``."""
    async with connect(url, subprotocols=[Subprotocol("rtcore.v1.json")], open_timeout=TIMEOUT, close_timeout=2) as ws:
        await ws.send(json.dumps({"t": "hello", "v": 1, **({"token": token} if token else {})}))
        with anyio.fail_after(TIMEOUT):
            welcome = json.loads(await ws.recv())
        assert welcome["t"] == "welcome", welcome
        yield ws


@dataclass
class RawSubscriber:
    """Subscribes to ``stream`` on ``servers[0]``; on a dead connection resumes on the next live one.

    ``frames`` is every ``subbed``/``evt``/``snap`` frame received, in order, and
    ``servers_used`` the port of each connection. The test asserts on these;
    the loop only enforces what a conforming client would: it never accepts an
    offset that is not the next one (``gaps``/``dups`` count violations).
    """

    servers: list[ServerProcess]
    stream: str
    name: str = ""
    frames: list[dict[str, Any]] = field(default_factory=list)
    servers_used: list[int] = field(default_factory=list)
    epoch: str = ""
    offset: int = 0
    subscribed: anyio.Event = field(default_factory=anyio.Event)
    gaps: int = 0
    dups: int = 0

    @property
    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["t"] == "evt"]

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.events]

    async def run(self, *, since_start: bool = True) -> None:
        index = 0
        first = True
        while True:
            server = self.servers[index % len(self.servers)]
            if not server.alive:
                index += 1
                await anyio.sleep(0.01)
                continue
            try:
                async with ws_session(server.ws) as ws:
                    self.servers_used.append(server.port)
                    sub: dict[str, Any] = {"t": "sub", "id": 1, "stream": self.stream}
                    if not first or since_start:
                        sub["since"] = {"epoch": self.epoch, "offset": self.offset}
                    await ws.send(json.dumps(sub))
                    first = False
                    while True:
                        frame = json.loads(await ws.recv())
                        self._on_frame(frame)
            except NET_ERRORS:
                index += 1  # that process is gone (or going): resume on the next one
                await anyio.sleep(0.01)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        t = frame.get("t")
        if t == "subbed":
            self.frames.append(frame)
            if not frame["recovered"] and not frame.get("snap"):
                self.epoch, self.offset = frame["epoch"], frame["offset"]
            elif frame["recovered"] and self.epoch == "" and self.offset == 0:
                self.epoch = frame["epoch"]  # "whole history" asked with an unknown epoch
            self.subscribed.set()
        elif t == "snap":
            self.frames.append(frame)
            self.epoch, self.offset = frame["epoch"], frame["offset"]
        elif t == "evt":
            self.frames.append(frame)
            if frame["epoch"] == self.epoch and frame["offset"] <= self.offset:
                self.dups += 1
                return
            if frame["epoch"] == self.epoch and frame["offset"] != self.offset + 1:
                self.gaps += 1
            self.epoch, self.offset = frame["epoch"], frame["offset"]


class Commander:
    """Sends ``put`` commands to ``servers[0]`` (then the next live one) over ``transport``.

    Every command carries an idempotency key; a connection failure or a
    retryable ``err`` is retried with the same key (on the next live process
    after a connection failure) until ``deadline`` seconds have passed.
    ``acked`` maps ``i`` to the offset its ``ok`` reported.
    """

    def __init__(self, servers: list[ServerProcess], transport: str, http: httpx.AsyncClient, *, prefix: str = "k") -> None:
        assert transport in ("ws", "http")
        self.servers = servers
        self.transport = transport
        self.http = http
        self.prefix = prefix
        self.index = 0
        self.acked: dict[int, int] = {}
        self.failures: list[str] = []  # retried errors, for the report
        self._stack: contextlib.AsyncExitStack | None = None
        self._ws: ClientConnection | None = None
        self._ids = 0

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._ws = self._stack, None, None
            with contextlib.suppress(*NET_ERRORS):
                await stack.aclose()

    def _server(self) -> ServerProcess:
        for _ in range(len(self.servers)):
            s = self.servers[self.index % len(self.servers)]
            if s.alive:
                return s
            self.index += 1
        raise RuntimeError("no live server")

    async def _send_ws(self, server: ServerProcess, args: dict[str, Any], key: str) -> dict[str, Any]:
        if self._ws is None:
            self._stack = contextlib.AsyncExitStack()
            self._ws = await self._stack.enter_async_context(ws_session(server.ws))
        self._ids += 1
        rid = self._ids
        await self._ws.send(json.dumps({"t": "cmd", "id": rid, "name": "put", "args": args, "key": key}))
        with anyio.fail_after(TIMEOUT):
            while True:
                frame = json.loads(await self._ws.recv())
                if frame.get("id") == rid and frame["t"] in ("ok", "err"):
                    return frame

    async def _send_http(self, server: ServerProcess, args: dict[str, Any], key: str) -> dict[str, Any]:
        r = await self.http.post(f"{server.http}/v1/cmd/put", json=args, headers={"Idempotency-Key": key})
        body = r.json()
        if r.status_code == 200:
            return {"t": "ok", **body}
        return {"t": "err", **body}

    def key(self, stream: str, i: int) -> str:
        return f"{self.prefix}-{stream}-{i}"

    async def try_put(self, stream: str, i: int) -> int | None:
        """One attempt at ``put(stream, i)`` on the current server: its offset, or None when unanswered.

        "Unanswered" is a dead connection or a retryable error; a final error fails the test.
        """
        server = self.servers[self.index % len(self.servers)]
        args = {"stream": stream, "i": i}
        try:
            if self.transport == "ws":
                frame = await self._send_ws(server, args, self.key(stream, i))
            else:
                frame = await self._send_http(server, args, self.key(stream, i))
        except NET_ERRORS as exc:
            self.failures.append(f"{server.name}: {type(exc).__name__}")
            await self.aclose()
            return None
        if frame["t"] == "ok":
            self.acked[i] = int(frame["result"])
            return self.acked[i]
        if not frame.get("retryable"):
            raise AssertionError(f"put {i} failed for good: {frame}")
        self.failures.append(f"{server.name}: {frame['code']}")
        return None

    async def put(self, stream: str, i: int, *, deadline: float = 30.0) -> int:
        """Run ``put(stream, i)`` until it is acknowledged; return its offset."""
        args = {"stream": stream, "i": i}
        with anyio.fail_after(deadline):
            while True:
                server = self._server()
                try:
                    if self.transport == "ws":
                        frame = await self._send_ws(server, args, self.key(stream, i))
                    else:
                        frame = await self._send_http(server, args, self.key(stream, i))
                except NET_ERRORS as exc:
                    self.failures.append(f"{server.name}: {type(exc).__name__}")
                    await self.aclose()
                    self.index += 1
                    await anyio.sleep(0.02)
                    continue
                if frame["t"] == "ok":
                    self.acked[i] = int(frame["result"])
                    return self.acked[i]
                if not frame.get("retryable"):
                    raise AssertionError(f"put {i} failed for good: {frame}")
                self.failures.append(f"{server.name}: {frame['code']}")
                await anyio.sleep(0.05)


# --- a failover TCP proxy (what a load balancer does) -------------------------------


class FailoverProxy:
    """Forwards each new connection to the first of ``ports`` that accepts it."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)
        self.port = 0
        self.routes: list[int] = []  # upstream port of each connection

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, ports: Sequence[int]) -> AsyncIterator[FailoverProxy]:
        proxy = cls(ports)
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)

            async def serve() -> None:
                async with listener:
                    await listener.serve(proxy._handle)

            tg.start_soon(serve)
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        upstream = None
        for port in self.ports:
            with contextlib.suppress(OSError):
                upstream = await anyio.connect_tcp("127.0.0.1", port)
                self.routes.append(port)
                break
        if upstream is None:
            await client.aclose()
            return

        async def pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                while True:
                    await dst.send(await src.receive())
            scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(pipe, upstream, client, tg.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()


async def history(http: httpx.AsyncClient, server: ServerProcess, stream: str) -> tuple[str, int, list[dict[str, Any]]]:
    """The whole retained history of ``stream`` over ``GET /v1/streams``: (epoch, head, events)."""
    events: list[dict[str, Any]] = []
    after = 0
    epoch = None
    while True:
        r = await http.get(f"{server.http}/v1/streams/{stream}", params={"after": after, "limit": 1000})
        assert r.status_code == 200, r.text
        page = r.json()
        if epoch is None:
            epoch = page["epoch"]
        assert page["epoch"] == epoch, "the epoch changed while paging"
        events += page["events"]
        if not page["events"] or page["events"][-1]["offset"] >= page["head"]:
            return epoch, page["head"], events
        after = page["events"][-1]["offset"]


async def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition", state: Any = None) -> None:
    """Poll ``predicate()`` every 20 ms; fail with ``what`` (and ``state()``) after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.02)
    except TimeoutError:
        detail = f": {state()!r}" if state is not None else ""
        raise AssertionError(f"timed out waiting for {what}{detail}") from None

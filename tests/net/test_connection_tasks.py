"""What an idle connection costs the server in tasks, and the shared keepalive.

An idle, authenticated WebSocket connection with one subscription used to run
four tasks (the listener's connection task, the transport's reader and
heartbeat, the session's reader). Now the session reads in the connection's
own task (:meth:`~rtcore.transport.websocket.WebSocketTransport.take_reader`),
one server-wide :class:`~rtcore.transport.websocket.Heartbeats` task pings
every connection, and the session's writer task starts only when a write
cannot complete at once (on asyncio, where writes that the kernel takes
whole need no task; on trio every write awaits, so it starts with the first
reply). These tests count tasks, they do not time anything.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
import sniffio
from anyio.abc import ByteStream

from rtcore.transport import ServerLimits

from .conftest import TIMEOUT, serving
from .netapp import app

pytestmark = pytest.mark.anyio

CONNECTIONS = 20


def count_tasks() -> int:
    """Every task of the running event loop (asyncio or trio)."""
    if sniffio.current_async_library() == "asyncio":
        return len(asyncio.all_tasks())
    import trio

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (mask key 0: the payload goes as is)."""
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + b"\0\0\0\0" + payload


class RawClient:
    """A WebSocket client with no task of its own: frames are read only when asked."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buf = b""

    async def frame(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                head = 2
                if n == 126:
                    if len(self.buf) < 4:
                        n = -1
                    else:
                        (n,) = struct.unpack("!H", self.buf[2:4])
                        head = 4
                if n >= 0 and len(self.buf) >= head + n:
                    opcode, payload = self.buf[0] & 0x0F, self.buf[head : head + n]
                    self.buf = self.buf[head + n :]
                    return opcode, payload
            with anyio.fail_after(TIMEOUT):
                self.buf += await self.stream.receive()

    async def message(self, t: str) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                msg: dict[str, Any] = json.loads(payload)
                if msg["t"] == t:
                    return msg
            elif opcode == 0x9:
                await self.stream.send(masked(0xA, payload))  # answer pings like a live client
            elif opcode == 0x8:
                raise AssertionError(f"closed: {payload!r}")


@asynccontextmanager
async def raw_client(port: int, stream: str) -> AsyncIterator[RawClient]:
    """Connect, upgrade, ``hello`` and ``sub``; yield once ``subbed`` came."""
    async with await anyio.connect_tcp("127.0.0.1", port) as sock:
        key = base64.b64encode(os.urandom(16))
        await sock.send(
            b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: rtcore.v1.json\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            with anyio.fail_after(TIMEOUT):
                head += await sock.receive()
        assert head.startswith(b"HTTP/1.1 101 "), head
        client = RawClient(sock)
        client.buf = head.split(b"\r\n\r\n", 1)[1]
        await sock.send(masked(0x1, b'{"t":"hello","v":1,"token":"u"}'))
        await client.message("welcome")
        await sock.send(masked(0x1, json.dumps({"t": "sub", "id": 1, "stream": stream}).encode()))
        await client.message("subbed")
        yield client


async def test_an_idle_subscribed_connection_runs_at_most_one_task_on_asyncio_two_on_trio() -> None:
    """Tasks per idle connection (hello + one subscription): 1 on asyncio, 2 on trio.

    Mutations seen caught: keep the transport's reader task alive although
    the session took the reader (``_reader_task`` sleeping instead of
    returning) → 2 on asyncio, 3 on trio → fails; start the session's writer task at once instead of lazily
    (``self._lazy_writer = False`` + ``tg.start_soon(self._writer)`` in
    ``_Connection.run``) → 2 on asyncio → fails; a keepalive task per
    connection (``run_websocket`` ignoring the shared ``Heartbeats``) → +1 on
    both → fails.
    """
    on_asyncio = sniffio.current_async_library() == "asyncio"
    async with serving(app) as server, AsyncExitStack() as stack:
        await anyio.wait_all_tasks_blocked()
        before = count_tasks()
        for _ in range(CONNECTIONS):
            await stack.enter_async_context(raw_client(server.port, "room:idle"))
        await anyio.wait_all_tasks_blocked()
        per_connection = (count_tasks() - before) / CONNECTIONS
        assert per_connection <= (1 if on_asyncio else 2), per_connection
        assert len(server.sessions) == CONNECTIONS


async def test_the_shared_keepalive_closes_only_the_connection_that_never_answers() -> None:
    """One Heartbeats task pings every connection; each is judged on its own pongs.

    A live client (answers every ping) and a silent one (reads nothing) are
    open side by side: the silent one is closed with 1011 after
    ``ping_timeout``, the live one still answers a command afterwards.

    Mutations seen caught: a pong not clearing the outstanding ping
    (``_ping_payload`` left set in ``_handle_events``) → the live client is
    closed with 1011 too → fails; ``_heartbeat_due`` not closing when the
    ping is still unanswered (returning instead) → the silent client is
    never closed → fails (timeout).
    """
    limits = ServerLimits(ping_interval=0.05, ping_timeout=0.3, close_timeout=0.3)
    async with serving(app, limits=limits) as server:
        async with raw_client(server.port, "room:a") as live, raw_client(server.port, "room:b") as silent:
            # The silent client reads nothing: the server's pings pile up unanswered.

            async def keep_answering() -> None:
                await live.message("never")  # answers pings until cancelled; a close fails the test

            code = None
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(keep_answering)
                    while code is None:
                        opcode, payload = await silent.frame()
                        if opcode == 0x8:
                            code = struct.unpack("!H", payload[:2])[0]
                    tg.cancel_scope.cancel()
            assert code == 1011
            await live.stream.send(masked(0x1, b'{"t":"cmd","id":7,"name":"echo","args":"still here"}'))
            reply = await live.message("ok")
            assert reply["id"] == 7 and reply["result"] == "still here"


async def _ended(client: RawClient) -> bool:
    """Read until the server closes (a close frame, or TCP without one)."""
    try:
        while True:
            opcode, payload = await client.frame()
            if opcode == 0x8:
                return True
            if opcode == 0x9:
                await client.stream.send(masked(0xA, payload))
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True


async def _sessions_gone(server: Any) -> None:
    with anyio.fail_after(TIMEOUT):
        while len(server.sessions):
            await anyio.sleep(0.01)
    await anyio.wait_all_tasks_blocked()


async def test_a_closed_connection_leaves_no_side_task_running() -> None:
    """A command still running when its connection closes is cancelled: the
    server's task count returns to what it was before the connection.

    On asyncio the session's side tasks (command workers, subscribe, login,
    writer) are native tasks of the connection, not a task group's; the
    connection cancels and awaits them itself when it ends.

    Mutation seen caught: ``_Connection._reap`` returning at once (no cancel,
    no wait) → the ``slow`` command's worker outlives the connection → the
    count is one above → fails (asyncio; trio runs the task group path).
    """
    async with serving(app) as server:
        await anyio.wait_all_tasks_blocked()
        before = count_tasks()
        async with raw_client(server.port, "room:close") as client:
            gate = "never-" + os.urandom(4).hex()
            await client.stream.send(masked(0x1, json.dumps({"t": "cmd", "id": 2, "name": "slow", "args": {"gate": gate}}).encode()))
            await anyio.wait_all_tasks_blocked()
            assert count_tasks() > before  # the connection and the waiting command
        await _sessions_gone(server)
        assert count_tasks() == before


async def test_a_side_task_that_fails_ends_its_connection(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one of a session's side tasks ends that connection (its read
    loop is cancelled, the server hangs up and logs the error) and leaves no
    task behind, as a task group child's failure does; other connections are
    untouched.

    Mutation seen caught: ``_Connection._child_done`` not cancelling the host
    task on a failure → the connection stays open → no close frame → fails
    (timeout, asyncio).
    """
    from rtcore.server import gateway

    real = gateway._Connection._subscribe

    async def buggy(self: Any, action: Any, use_cursor: bool = True, resubscribe: bool = False) -> None:
        if action.stream == "room:bug":
            raise RuntimeError("a bug in a side task")
        await real(self, action, use_cursor, resubscribe)

    monkeypatch.setattr(gateway._Connection, "_subscribe", buggy)
    async with serving(app) as server:
        await anyio.wait_all_tasks_blocked()
        before = count_tasks()
        async with raw_client(server.port, "room:ok") as other, raw_client(server.port, "room:ok") as client:
            await client.stream.send(masked(0x1, json.dumps({"t": "sub", "id": 2, "stream": "room:bug"}).encode()))
            with anyio.fail_after(TIMEOUT):
                assert await _ended(client)
            await other.stream.send(masked(0x1, b'{"t":"cmd","id":3,"name":"echo","args":"alive"}'))
            assert (await other.message("ok"))["result"] == "alive"
        await _sessions_gone(server)
        assert count_tasks() == before
    assert "a bug in a side task" in caplog.text  # logged with its traceback


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_idle_connection_on_asyncio_keeps_no_task_group_three_coroutines_and_no_wsproto() -> None:
    """Per idle connection (hello + one subscription) on asyncio: no anyio task
    group, no closure, no wsproto connection, few bound methods and at most
    three live coroutines (the HTTP connection, which runs the WebSocket
    handler itself, the session and the transport's read loop, which waits
    on the stream's future itself): a coroutine is ~0.3 kB, a task group
    ~1.1 kB, wsproto's connection ~0.9 kB, a bound method 64 bytes, times
    thousands of connections.

    Mutations seen caught: ``serve_session`` returning a coroutine that awaits
    ``conn.run()`` → 4 coroutines → fails; the listener's task running a
    coroutine that awaits ``HttpConnection(stream, state).run()`` → 4 →
    fails; ``HttpConnection.run`` awaiting ``run_websocket`` instead of
    running the handler itself (``start_spawned`` returning False) → 4 →
    fails; the read loop awaiting ``stream.receive()`` on a ``ProtocolStream``
    too → 4 → fails; the read loop in ``with self._reader_scope or nullcontext()`` again
    (a bound ``__exit__`` on its stack) → 3 bound methods per connection → fails;
    ``_park`` keeping the wsproto connection → 20 more →
    fails; ``_Connection.run`` always taking the task-group path → 1 task
    group per connection → fails; the outbox's ``render`` a lambda per
    connection again → 20 functions more → fails; the outbox given
    ``spawn=self._spawn, on_slow=..., on_stale=..., start_writer=...`` again
    instead of ``owner=self`` → 4 bound methods more per connection → fails.
    """
    import gc
    import types

    from anyio.abc import TaskGroup
    from wsproto.connection import Connection

    from rtcore.transport import websocket

    def census() -> tuple[int, int, int, int, int]:
        gc.collect()
        objects = gc.get_objects()
        return (
            sum(1 for o in objects if type(o) is types.CoroutineType),
            sum(1 for o in objects if isinstance(o, TaskGroup)),
            sum(1 for o in objects if type(o) is types.FunctionType),
            # wsproto connections not resting in the shared pool
            sum(1 for o in objects if type(o) is Connection) - len(websocket._WS_POOL),
            # the server's bound methods (the clients' run in this process too)
            sum(1 for o in objects if type(o) is types.MethodType and _server_side(o.__func__)),
        )

    async with serving(app) as server, AsyncExitStack() as stack:
        await anyio.wait_all_tasks_blocked()
        coros0, groups0, functions0, ws0, methods0 = census()
        for _ in range(CONNECTIONS):
            await stack.enter_async_context(raw_client(server.port, "room:idle"))
        await anyio.wait_all_tasks_blocked()
        coros, groups, functions, ws, methods = census()
        # The clients' own coroutines: each raw_client context is one suspended
        # async generator (not a coroutine), so what is counted is the server's.
        assert (coros - coros0) / CONNECTIONS <= 3, (coros - coros0) / CONNECTIONS
        assert groups == groups0
        assert functions - functions0 < CONNECTIONS  # no closure per connection
        assert ws - ws0 <= 0, ws - ws0
        # What is left: the presence's receiver, the outbox's flush for take_reader.
        assert (methods - methods0) / CONNECTIONS <= 2, (methods - methods0) / CONNECTIONS
        assert len(server.sessions) == CONNECTIONS


def _server_side(func: Any) -> bool:
    # rtcore's own methods, and a `with` statement's bound __exit__ on a waiting frame
    return getattr(func, "__module__", "").startswith("rtcore") or getattr(func, "__qualname__", "") == "nullcontext.__exit__"


async def test_a_close_the_peer_never_answers_ends_the_connection_after_close_timeout() -> None:
    """The read loop itself closes (a message over ``max_message_bytes``: 1009)
    and the client never sends its close frame back nor hangs up: the server
    drops TCP ``close_timeout`` later.

    On asyncio the read loop runs in no cancel scope (``ProtocolStream``): a
    loop timer closes the stream at the deadline instead; on trio the read
    loop's cancel scope gets the deadline.

    Mutation seen caught: ``_start_close`` not scheduling ``_closer`` (the
    ``elif`` branch removed) → the server waits for the close frame forever →
    the client never sees EOF → fails (timeout, asyncio).
    """
    limits = ServerLimits(max_message_bytes=64, close_timeout=0.3, ping_interval=None)
    async with serving(app, limits=limits) as server, raw_client(server.port, "room:big") as client:
        await client.stream.send(masked(0x1, b"x" * 100))
        opcode, payload = await client.frame()
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009
        with anyio.fail_after(TIMEOUT):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await client.stream.receive()


def test_a_wsproto_connection_rests_only_between_whole_messages() -> None:
    """``_at_rest`` (what lets an idle connection give its wsproto connection
    to the shared pool) holds only while nothing is half received: not with
    part of a frame header or payload buffered, not inside a fragmented
    message, not once closing.

    Mutations seen caught: ``_at_rest`` not looking at the frame decoder
    (``decoder.header is None and not decoder.buffer.buffer`` dropped) →
    fails; not looking at the message decoder → fails; not looking at the
    state → fails.
    """
    from wsproto.events import CloseConnection

    from rtcore.transport.websocket import _at_rest, _new_wsproto

    def events(ws: Any, data: bytes) -> list[Any]:
        ws.receive_data(data)
        return list(ws.events())

    ws = _new_wsproto(())
    assert _at_rest(ws)
    frame = masked(0x1, b"hello")
    assert events(ws, frame[:1]) == [] and not _at_rest(ws)  # half a header
    assert events(ws, frame[1:4]) == [] and not _at_rest(ws)  # header, part of the mask
    assert [e.data for e in events(ws, frame[4:])] == ["hello"] and _at_rest(ws)
    # header and mask complete, no payload yet
    assert events(ws, frame[:6]) == [] and not _at_rest(ws)
    assert [e.data for e in events(ws, frame[6:])] == ["hello"] and _at_rest(ws)
    first = struct.pack("!BB", 0x01, 0x80 | 3) + b"\0\0\0\0" + b"hel"  # text, not FIN
    assert [e.data for e in events(ws, first)] == ["hel"] and not _at_rest(ws)  # mid-message
    assert [e.data for e in events(ws, masked(0x0, b"lo"))] == ["lo"] and _at_rest(ws)
    assert [type(e) for e in events(ws, masked(0x8, struct.pack("!H", 1000)))] == [CloseConnection]
    assert not _at_rest(ws)
    closing = _new_wsproto(())
    closing.send(CloseConnection(code=1000))  # we close first: nothing buffered, but closing
    assert not _at_rest(closing)


async def test_messages_split_across_idle_waits_arrive_whole() -> None:
    """A command sent a few bytes at a time, and a message in two fragments,
    with the server's read loop waiting (on asyncio: parked, see ``_park``)
    in between, arrive whole and are answered; so is a ping. Then the pooled
    wsproto connections serve other connections correctly.

    Mutations seen caught (asyncio): ``_at_rest`` returning True → the bytes
    of the unfinished frame go to the pool with the connection → the reply
    never comes or the connection fails → fails; ``_park`` pooling a
    connection without checking it → fails the same way.
    """
    async with serving(app) as server, raw_client(server.port, "room:split") as client, raw_client(
        server.port, "room:split"
    ) as other:
        command = masked(0x1, b'{"t":"cmd","id":7,"name":"echo","args":"split"}')
        for i in range(0, len(command), 3):
            await client.stream.send(command[i : i + 3])
            await anyio.wait_all_tasks_blocked()
        assert (await client.message("ok"))["result"] == "split"
        text = b'{"t":"cmd","id":8,"name":"echo","args":"frag"}'
        head = struct.pack("!BB", 0x01, 0x80 | 10) + b"\0\0\0\0" + text[:10]  # text, not FIN
        await client.stream.send(head)
        await anyio.wait_all_tasks_blocked()
        await other.stream.send(masked(0x1, b'{"t":"cmd","id":9,"name":"echo","args":"other"}'))
        assert (await other.message("ok"))["result"] == "other"
        await anyio.wait_all_tasks_blocked()
        await client.stream.send(masked(0x0, text[10:]))
        assert (await client.message("ok"))["result"] == "frag"
        await client.stream.send(masked(0x9, b"pp"))
        while True:
            opcode, payload = await client.frame()
            if opcode == 0xA:
                assert payload == b"pp"
                break
        await other.stream.send(masked(0x1, b'{"t":"cmd","id":10,"name":"echo","args":"again"}'))
        assert (await other.message("ok"))["result"] == "again"

"""The TCP (optionally TLS) listener: accept, serve, stop gracefully.

:func:`serve` binds, reports the real port through ``task_status`` (so
``port=0`` works in tests), accepts connections in one task per listening
socket and runs each connection in its own task of one task group, which
therefore owns every connection task.

Why our own accept loop rather than ``Listener.serve()``: running out of file
descriptors (EMFILE) must pause accepting, not crash the server, and
``max_connections`` must stop accepting while the server is full. TLS is
negotiated in the connection's own task (``TLSStream.wrap``, as anyio's
``TLSListener`` does) under ``handshake_timeout``, so a slow TLS client never
blocks the accept loop; a failed handshake is a debug log line, not an error.

Graceful stop (:meth:`ServerControl.stop`), in order:

1. stop accepting and close the listening sockets;
2. ``Shutdown.started`` is set: idle keep-alive connections and SSE streams
   end at once, in-flight HTTP requests finish with ``Connection: close``,
   WebSocket handlers see ``request.shutdown`` and should send ``bye`` and
   close with 1001;
3. at ``Shutdown.deadline`` (now + grace) every WebSocket still open is closed
   by the transport with 1001, each close bounded by ``close_timeout``;
4. ``close_timeout`` later, whatever connection task is left is cancelled.

:func:`serve` returns when every connection is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from .aiostream import ProtocolStream
from .config import ServerLimits, WebSocketPolicy
from .http import HttpConnection, HttpHandler, ServerState
from .shutdown import Shutdown
from .websocket import Heartbeats, WebSocketHandler

__all__ = ["ServerControl", "serve"]

log = logging.getLogger("rtcore.transport")

# What a connection is served on: anyio's socket stream, or ours on asyncio without TLS.
_Stream = SocketStream | ProtocolStream

_T = TypeVar("_T")

# accept() failures that mean "out of resources for now", not "listener broken".
_TRANSIENT_ACCEPT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ServerControl:
    """A handle on a running :func:`serve`: its port, connection count, and stop.

    Create it in the event loop and pass it to :func:`serve`.

    Attributes:
        shutdown: The shutdown signal, also handed to every request.
    """

    def __init__(self) -> None:
        self.shutdown = Shutdown()
        self._port: int | None = None
        self._ready = anyio.Event()
        self._stopped = anyio.Event()
        self._connections = 0
        self._drained = anyio.Event()

    @property
    def port(self) -> int:
        """The bound port (raises before the server is listening)."""
        if self._port is None:
            raise RuntimeError("the server is not listening yet")
        return self._port

    @property
    def connections(self) -> int:
        """Open connections (HTTP and WebSocket)."""
        return self._connections

    @property
    def stopped(self) -> bool:
        """Whether :func:`serve` has returned."""
        return self._stopped.is_set()

    async def wait_ready(self) -> int:
        """Wait until the server listens; returns its port."""
        await self._ready.wait()
        return self.port

    def begin_stop(self, grace: float = 10.0, reason: str = "server shutdown") -> None:
        """Start a graceful stop without waiting for it (see the module docs).

        Args:
            grace: Seconds the application gets before open WebSockets are
                closed with 1001 by the server itself.
            reason: Close reason for those forced closes.
        """
        self.shutdown.begin(grace, reason)

    async def stop(self, grace: float = 10.0, reason: str = "server shutdown") -> None:
        """Stop gracefully and wait until :func:`serve` returned."""
        self.begin_stop(grace, reason)
        await self._stopped.wait()

    # -- used by serve() -------------------------------------------------------

    def _opened(self) -> None:
        self._connections += 1

    def _closed(self) -> None:
        self._connections -= 1
        if self._connections == 0:
            self._drained.set()

    async def _wait_drained(self) -> None:
        while self._connections:
            self._drained = anyio.Event()
            await self._drained.wait()


async def serve(
    on_websocket: WebSocketHandler,
    on_http: HttpHandler,
    *,
    host: str | None = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
    policy: WebSocketPolicy | None = None,
    control: ServerControl | None = None,
    backlog: int = 4096,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP and WebSocket on one port until ``control`` stops it.

    Args:
        on_websocket: Called with the transport and the upgrade request after
            each successful upgrade; the connection closes when it returns.
        on_http: Called with each complete HTTP request.
        host: Address to bind (``None``: all interfaces).
        port: Port to bind; 0 picks a free one (reported via ``task_status``).
        ssl_context: Serve TLS with this server context.
        limits: Sizes and timeouts (defaults: :class:`ServerLimits`).
        policy: Upgrade paths, origin allowlist, deflate.
        control: Handle used to stop the server; without one it runs until cancelled.
        backlog: Kernel accept queue length (the kernel caps it at
            ``net.core.somaxconn``). Thousands of clients reconnecting at once
            after a restart overflow a short queue: the kernel drops their
            SYNs and each waits out a TCP retransmission (1 s, then 3 s, ...).
            With 1,024, a 4,000-client reconnect storm on loopback counted
            ~17,000 listen overflows; with 4,096, none.
        task_status: Receives the bound port once listening.
    """
    limits = limits or ServerLimits()
    control = control or ServerControl()
    shutdown = control.shutdown
    state = ServerState(
        on_http=on_http,
        on_websocket=on_websocket,
        limits=limits,
        policy=policy or WebSocketPolicy(),
        shutdown=shutdown,
        heartbeats=Heartbeats(limits) if limits.ping_interval is not None else None,
    )
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=backlog)
    control._port = listener.extra(SocketAttribute.local_port)
    limiter = anyio.CapacityLimiter(limits.max_connections) if limits.max_connections else None
    try:
        async with anyio.create_task_group() as side:
            if state.heartbeats is not None:
                # Every WebSocket's keepalive pings from one task (see Heartbeats).
                side.start_soon(state.heartbeats.run)
            await _serve_connections(listener, state, control, ssl_context, limiter, task_status)
            side.cancel_scope.cancel()
    finally:
        shutdown.begin(0.0)  # cancelled from outside: tell everyone too
        control._stopped.set()


async def _serve_connections(
    listener: MultiListener[SocketStream],
    state: ServerState,
    control: ServerControl,
    ssl_context: ssl.SSLContext | None,
    limiter: anyio.CapacityLimiter | None,
    task_status: TaskStatus[int],
) -> None:
    shutdown = state.shutdown
    limits = state.limits
    native = _NativeTasks() if ssl_context is None and _protocol_streams() else None
    state.spawner = native
    try:
        async with anyio.create_task_group() as connections:
            try:
                async with anyio.create_task_group() as acceptors:
                    for socket_listener in listener.listeners:
                        assert isinstance(socket_listener, SocketListener)
                        accept, start = _acceptor(
                            socket_listener, native, connections, state, control, ssl_context, limiter
                        )
                        acceptors.start_soon(_accept_loop, accept, start, control, limiter)
                    control._ready.set()
                    task_status.started(control.port)
                    await shutdown.wait()
                    acceptors.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
            log.info("shutdown started: %d connections open", control.connections)
            for scope in list(state.interruptible):
                scope.cancel()
            connections.cancel_scope.deadline = shutdown.deadline + limits.close_timeout + 1.0
            with anyio.move_on_after(shutdown.remaining()):
                await control._wait_drained()
            if state.websockets:
                async with anyio.create_task_group() as closers:
                    for transport in list(state.websockets):
                        # One already closing (its close frame sent, or the peer's
                        # received) ends by itself within close_timeout: a second
                        # close task would only wait for the same reply (at
                        # 10,000 connections that doubled the shutdown's work).
                        if not transport.closed:
                            closers.start_soon(transport.close, 1001, shutdown.reason)
            if native is not None:
                # Not children of `connections`: wait for them here, under its deadline.
                await control._wait_drained()
    finally:
        if native is not None:
            # Past the deadline (or serve() cancelled): cancel what is left, as the
            # task group does with its own children, and wait for them to unwind.
            with anyio.CancelScope(shield=True):
                await native.cancel_and_wait()


def _acceptor(
    listener: SocketListener,
    native: _NativeTasks | None,
    connections: TaskGroup,
    state: ServerState,
    control: ServerControl,
    ssl_context: ssl.SSLContext | None,
    limiter: anyio.CapacityLimiter | None,
) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any, object], None]]:
    """:func:`_accept_loop`'s arguments: asyncio without TLS accepts onto
    :class:`ProtocolStream` and runs connections as native tasks; otherwise
    anyio's listener and the ``connections`` task group."""
    if native is not None:
        native.control = control
        native.limiter = limiter

        accept, connect = _protocol_acceptor(listener, state)

        def start_native(client: socket.socket, token: object) -> None:
            # The task sets the connection up and runs it: _NativeTasks does
            # _connection()'s bookkeeping when it ends.
            native.start_connection(connect(client), token)

        return accept, start_native  # raw sockets: the connection task makes the stream

    def start_child(stream: _Stream, token: object) -> None:
        connections.start_soon(_connection, stream, state, control, ssl_context, limiter, token)

    return listener.accept, start_child


class _NativeTasks:
    """Connection tasks started with ``loop.create_task`` (the asyncio path).

    An anyio task-group child costs about 1.5 kB more than the asyncio task
    itself (its task state, cancel scope bookkeeping and done event); the
    listener does the task group's two jobs for these itself: hold a
    reference while they run, and cancel them at the shutdown deadline.
    A connection task runs :meth:`HttpConnection.run` directly; what
    :func:`_connection` does when it ends (the connection count, the
    ``max_connections`` slot) is done by its done callback.

    Attributes:
        control: The server's control (its connection count).
        limiter: ``max_connections``' limiter (None: no limit).
    """

    __slots__ = ("_conn_done", "_loop", "_side_done", "_tokens", "control", "limiter", "tasks")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.control: ServerControl | None = None
        self.limiter: anyio.CapacityLimiter | None = None
        # Limiter tokens of running connection tasks (only with max_connections).
        self._tokens: dict[asyncio.Task[Any], object] = {}
        # One bound method each, not one per task.
        self._side_done = self._done
        self._conn_done = self._connection_done

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._side_done)
        return task

    def start_connection(self, coro: Coroutine[Any, Any, Any], token: object) -> None:
        """Run one connection (``HttpConnection.run()``); ``token`` holds its limiter slot."""
        task = self._loop.create_task(coro)
        self.tasks.add(task)
        if self.limiter is not None:
            self._tokens[task] = token
        task.add_done_callback(self._conn_done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # In a task group this would have ended the server; here only its task.
            log.error("connection side task failed", exc_info=exc)

    def _connection_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("connection task failed", exc_info=exc)
        if self.control is not None:
            self.control._closed()
        token = self._tokens.pop(task, None)
        if token is not None and self.limiter is not None:
            self.limiter.release_on_behalf_of(token)

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """:class:`~rtcore.transport.websocket.TaskSpawner`: the WebSockets' side tasks run here too."""
        self.start(func(*args))

    async def cancel_and_wait(self) -> None:
        while self.tasks:
            for task in self.tasks:
                task.cancel()
            await asyncio.wait(list(self.tasks))


def _protocol_streams() -> bool:
    """Whether connections are served on :class:`ProtocolStream` (asyncio, incl. uvloop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


async def _accept_failed(exc: OSError) -> None:
    """What a failed ``accept()`` does to an accept loop: out of resources
    (EMFILE and the like) pauses it for 0.1 s, a connection aborted before it
    was accepted is skipped, anything else ends it (re-raised)."""
    if exc.errno in _TRANSIENT_ACCEPT:
        log.warning("accept() failed (%s); pausing 0.1 s", exc)
        await anyio.sleep(0.1)
    elif exc.errno != errno.ECONNABORTED:
        raise exc


async def _accept_loop(
    accept: Callable[[], Awaitable[_T]],
    start: Callable[[_T, object], None],
    control: ServerControl,
    limiter: anyio.CapacityLimiter | None,
) -> None:
    """Accept connections one by one and ``start`` each, holding a ``limiter`` slot per connection.

    ``accept`` is anyio's listener or :func:`_protocol_acceptor`; the slot
    (acquired on behalf of a fresh token) is released by the connection task
    when it ends, or here when the accept fails.
    """
    while True:
        token = object()
        if limiter is not None:
            await limiter.acquire_on_behalf_of(token)
        try:
            stream = await accept()
        except BaseException as exc:
            if limiter is not None:
                limiter.release_on_behalf_of(token)
            if not isinstance(exc, OSError):
                raise
            await _accept_failed(exc)
            continue
        control._opened()
        start(stream, token)


def _protocol_acceptor(
    listener: SocketListener, state: ServerState
) -> tuple[Callable[[], Awaitable[socket.socket]], Callable[[socket.socket], Coroutine[Any, Any, None]]]:
    """``accept`` and the connection task for asyncio without TLS: each
    connection on a :class:`ProtocolStream`.

    ``accept`` returns the accepted socket; the connection's own task sets
    up its transport (``connect_accepted_socket``, as anyio's listener does,
    with our leaner protocol as the stream) and serves it. Why not in the
    accept loop: setting up a transport waits one event-loop step (its
    ``connection_made``), so the loop accepted one connection per step, and
    thousands reconnecting at once after a restart overflowed the kernel's
    accept queue while the loop was busy (each dropped client waits out a
    TCP retransmission, 1 s or more). Now ``accept`` takes what the kernel
    has queued without waiting (up to :data:`_ACCEPT_BURST` in a row, then
    it lets the other tasks run).
    """
    loop = asyncio.get_running_loop()
    raw: socket.socket = listener.extra(SocketAttribute.raw_socket)
    limits = state.limits
    high_water = max(limits.read_size, 64 * 1024)
    burst = 0

    def protocol() -> ProtocolStream:
        return ProtocolStream(high_water=high_water, linger=limits.close_timeout)

    async def accept() -> socket.socket:
        nonlocal burst
        if burst < _ACCEPT_BURST:
            try:
                client, _ = raw.accept()  # queued already: no future, no reader registration
            except (BlockingIOError, InterruptedError):
                pass
            else:
                burst += 1
                return client
        else:
            await asyncio.sleep(0)  # fairness: the connections just accepted run too
        burst = 0
        try:
            client, _ = await loop.sock_accept(raw)
        except asyncio.CancelledError:
            # As anyio does (bpo-41317): a cancelled sock_accept leaves its reader behind.
            with contextlib.suppress(ValueError, NotImplementedError):
                loop.remove_reader(raw)
            raise
        return client

    async def setup(client: socket.socket, stream: ProtocolStream) -> bool:
        try:
            client.setblocking(False)  # as sock_accept's sockets are (socket.accept() leaves it blocking)
            if client.family in (socket.AF_INET, socket.AF_INET6):
                # asyncio's transport does not (the accepted socket's proto is 0).
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(lambda: stream, client)
        except OSError as exc:
            client.close()
            log.debug("connection lost while being set up: %r", exc)
            return False
        return True

    def connect(client: socket.socket) -> Coroutine[Any, Any, None]:
        # HttpConnection.run awaits the setup itself: a coroutine here that
        # awaited run() would stay on every idle connection's stack.
        stream = protocol()
        return HttpConnection(stream, state).run(functools.partial(setup, client, stream))

    return accept, connect


# Connections ``accept`` takes from the kernel's queue in a row before it
# yields to the rest of the event loop once. 64 still left the 10,000-client
# storm ~20,000-23,000 accept-queue overflows (dropped SYNs, each client then
# waiting out a retransmission), 1,024 about 2,600-4,900, and less server
# CPU per resumed client (830/755 against 919/900 µs, one run).
_ACCEPT_BURST = 1024


async def _connection(
    stream: _Stream,
    state: ServerState,
    control: ServerControl,
    ssl_context: ssl.SSLContext | None,
    limiter: anyio.CapacityLimiter | None,
    token: object,
) -> None:
    try:
        if ssl_context is None:
            await HttpConnection(stream, state).run()
            return
        try:
            with anyio.fail_after(state.limits.handshake_timeout):
                tls = await TLSStream.wrap(stream, server_side=True, ssl_context=ssl_context, standard_compatible=False)
        except (TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
            log.debug("TLS handshake failed: %r", exc)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
            return
        await HttpConnection(tls, state).run()
    except Exception:
        log.exception("connection task failed")
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
    finally:
        control._closed()
        if limiter is not None:
            limiter.release_on_behalf_of(token)

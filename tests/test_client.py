"""rtcore.client over real sockets: commands, subscriptions, faults, restarts.

Every test runs a real :class:`rtcore.server.runner.Server` on port 0 (or a server
subprocess that is killed with SIGKILL and restarted on the same port) and
talks to it through :mod:`rtcore.client`; network faults come from the
in-process TCP proxy in ``tests/net_proxy.py``. Nothing asserts on timings:
timeouts only bound how long a broken test can hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import rtcore
import rtcore.client
import rtcore.testing
from rtcore.client import Missed
from rtcore.protocol.frames import Evt, Position
from rtcore.server.runner import Server

from .net_proxy import TcpProxy

pytestmark = pytest.mark.anyio

ENCODINGS = ["json", "msgpack"]


class Pub(msgspec.Struct):
    stream: str
    n: int


class Score(msgspec.Struct):
    """The state of the ``score:*`` streams: the sum of published ``n``."""

    total: int = 0

    def apply(self, event: rtcore.Event) -> None:
        self.total += event.data["n"]


class Probe:
    """What the handlers saw, shared with the test."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.effects: dict[str, int] = {}
        self.started = anyio.Event()
        self.release = anyio.Event()


def make_app(probe: Probe) -> rtcore.App:
    app = rtcore.App("client-tests")
    app.state("score:*", Score)

    @app.authenticate
    async def authenticate(token: str | None) -> rtcore.Principal | None:
        if token == "bad":
            return None
        if token and token.startswith("short:"):
            # A token that is already expired: the server asks for a refresh.
            return rtcore.Principal(token.split(":")[1], expires_at=0.0)
        return rtcore.Principal(token.split(":")[-1] if token else "anon")

    @app.command("echo")
    async def echo(ctx: rtcore.Context, args: Any) -> Any:
        return args

    @app.command("refuse")
    async def refuse(ctx: rtcore.Context, args: Any) -> None:
        raise rtcore.Rejected("insufficient_funds", "balance is 3, bet is 5")

    @app.command("sleep")
    async def sleep(ctx: rtcore.Context, args: float) -> None:
        await anyio.sleep(args)

    @app.command("pub")
    async def pub(ctx: rtcore.Context, args: Pub) -> int:
        event = await ctx.publish(args.stream, "n", {"n": args.n})
        return event.offset

    @app.command("once")
    async def once(ctx: rtcore.Context, args: str) -> str:
        """Blocks on its first attempt until the test cuts the connection."""
        probe.attempts[args] = probe.attempts.get(args, 0) + 1
        if probe.attempts[args] == 1:
            probe.started.set()
            await anyio.sleep_forever()  # cancelled when the connection is cut
        probe.effects[args] = probe.effects.get(args, 0) + 1
        await ctx.publish("log:once", "done", {"what": args})
        return f"done {args}"

    @app.command("shielded")
    async def shielded(ctx: rtcore.Context, args: str) -> str:
        """Its first attempt survives the cut and finishes later (in progress meanwhile)."""
        probe.attempts[args] = probe.attempts.get(args, 0) + 1
        with anyio.CancelScope(shield=True):
            if probe.attempts[args] == 1:
                probe.started.set()
                await probe.release.wait()
            probe.effects[args] = probe.effects.get(args, 0) + 1
        return f"done {args}"

    return app


@asynccontextmanager
async def running(app: rtcore.App, **options: Any) -> AsyncIterator[Server]:
    server = Server(app, **{"port": 0, "grace": 1.0, **options})
    # Server(limits=...) is the transport's; the session limits go to the node.
    server.node_options["limits"] = rtcore.Limits(command_rate=10_000.0, command_burst=10_000)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            await server.stop()
            tg.cancel_scope.cancel()


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/ws"


async def take(sub: rtcore.client.Subscription, n: int, timeout: float = 10.0) -> list[Evt | Missed]:
    out: list[Evt | Missed] = []
    with anyio.fail_after(timeout):
        async for item in sub:
            out.append(item)
            if len(out) == n:
                break
    return out


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# --- commands --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_command_ok_err_timeout(encoding: str) -> None:
    async with running(make_app(Probe())) as server:
        async with rtcore.client.connect(ws_url(server.port), token="alice", encoding=encoding) as client:  # type: ignore[arg-type]
            assert client.welcome is not None and client.welcome.principal == "alice"
            assert await client.command("echo", {"a": [1, 2], "b": "x"}) == {"a": [1, 2], "b": "x"}
            assert await client.command("echo", None) is None
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.command("refuse", {})
            assert err.value.code == "insufficient_funds"
            assert not err.value.retryable
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.command("nope", {})
            assert err.value.code == "unknown_command"
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.command("sleep", 5.0, timeout=0.2)
            assert err.value.code == "timeout"
            assert "sleep" in str(err.value)
            # The connection is still usable after a timeout.
            assert await client.command("echo", 7) == 7


async def test_same_key_returns_the_first_result() -> None:
    async with running(make_app(Probe())) as server:
        async with rtcore.client.connect(ws_url(server.port), token="alice") as client:
            sub = await client.subscribe("room:k")
            first = await client.command("pub", {"stream": "room:k", "n": 1}, key="k-1")
            again = await client.command("pub", {"stream": "room:k", "n": 1}, key="k-1")
            assert first == again == 1
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.command("pub", {"stream": "room:k", "n": 2}, key="k-1")
            assert err.value.code == "idempotency_key_reused"
            [evt] = await take(sub, 1)
            assert isinstance(evt, Evt) and evt.offset == 1


async def test_refused_hello_and_handshake() -> None:
    async with running(make_app(Probe())) as server:
        with pytest.raises(rtcore.RtcoreError) as err:
            async with rtcore.client.connect(ws_url(server.port), token="bad"):
                pass
        assert err.value.code == "unauthenticated"
        with pytest.raises(rtcore.RtcoreError) as err:
            async with rtcore.client.connect(f"ws://127.0.0.1:{server.port}/nope"):
                pass
        assert err.value.http_status == 404 or err.value.code in ("not_found", "bad_request")
    with pytest.raises(OSError):
        async with rtcore.client.connect(ws_url(server.port)):
            pass


# --- subscriptions -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_subscription_in_order_and_acked(encoding: str) -> None:
    async with running(make_app(Probe())) as server:
        url = ws_url(server.port)
        async with rtcore.client.connect(url, token="alice", encoding=encoding, ack_interval=0.01) as client:  # type: ignore[arg-type]
            sub = await client.subscribe("room:1")
            for n in range(20):
                await client.command("pub", {"stream": "room:1", "n": n})
            items = await take(sub, 20)
            assert [i.data["n"] for i in items if isinstance(i, Evt)] == list(range(20))
            assert client.positions["room:1"].offset == 20
            await client.command("echo", 0)  # acks are stored before later frames
            await wait_for(lambda: sub.acked is not None and sub.acked.offset == 20)
            await sub.unsubscribe()
            assert "room:1" not in client.positions
            with anyio.fail_after(1):
                assert [i async for i in sub] == []
        # A new client that opts in (cursor=True) resumes from the server cursor (the ack).
        async with rtcore.client.connect(url, token="alice", encoding=encoding) as client:  # type: ignore[arg-type]
            await client.command("pub", {"stream": "room:1", "n": 20})
            sub = await client.subscribe("room:1", cursor=True)
            [item] = await take(sub, 1)
            assert isinstance(item, Evt) and item.offset == 21


async def test_subscribe_since_replays_history() -> None:
    async with running(make_app(Probe())) as server:
        async with rtcore.client.connect(ws_url(server.port), token="alice") as client:
            for n in range(5):
                await client.command("pub", {"stream": "room:h", "n": n})
            epoch = server.node.backend is not None and (await server.node.backend.events.info("room:h")).epoch  # type: ignore[union-attr]
            sub = await client.subscribe("room:h", since=Position(str(epoch), 2))
            items = await take(sub, 3)
            assert [i.offset for i in items] == [3, 4, 5]
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.subscribe("room:h")
            assert err.value.code == "already_subscribed"
            with pytest.raises(rtcore.RtcoreError) as err:
                await client.subscribe("bad name")
            assert err.value.code == "bad_stream"


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_exactly_once_across_cuts(encoding: str) -> None:
    """Cut the TCP connection repeatedly while events flow: each event once, in order."""
    async with running(make_app(Probe())) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with (
                rtcore.client.connect(ws_url(proxy.port), token="bob", encoding=encoding, backoff_base=0.01) as reader,  # type: ignore[arg-type]
                rtcore.client.connect(ws_url(server.port), token="pub", encoding=encoding) as writer,  # type: ignore[arg-type]
            ):
                sub = await reader.subscribe("room:x")
                total = 300
                seen: list[int] = []

                async def publish() -> None:
                    for n in range(total):
                        await writer.command("pub", {"stream": "room:x", "n": n})
                        if n % 50 == 25:
                            proxy.cut(reset=n % 100 == 25)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish)
                    with anyio.fail_after(30):
                        async for item in sub:
                            assert isinstance(item, Evt), item
                            seen.append(item.data["n"])
                            if len(seen) == total:
                                break
                assert seen == list(range(total))
                assert reader.reconnects >= 3
                assert proxy.accepted >= 4


async def test_unanswered_command_resent_after_reconnect_executes_once() -> None:
    probe = Probe()
    async with running(make_app(probe)) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with rtcore.client.connect(ws_url(proxy.port), token="carol", backoff_base=0.01) as client:
                sub = await client.subscribe("log:once")
                async with anyio.create_task_group() as tg:
                    result: list[Any] = []

                    async def call() -> None:
                        result.append(await client.command("once", "bet-1", key="bet-1-key"))

                    tg.start_soon(call)
                    with anyio.fail_after(5):
                        await probe.started.wait()
                    proxy.cut()
                assert result == ["done bet-1"]
                assert probe.attempts["bet-1"] == 2  # the first attempt died with the connection
                assert probe.effects["bet-1"] == 1
                [evt] = await take(sub, 1)
                assert isinstance(evt, Evt) and evt.data == {"what": "bet-1"}
                assert client.reconnects == 1


async def test_resend_while_first_attempt_in_progress_gets_its_result() -> None:
    probe = Probe()
    async with running(make_app(probe)) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with rtcore.client.connect(ws_url(proxy.port), token="dave", backoff_base=0.01) as client:
                async with anyio.create_task_group() as tg:
                    result: list[Any] = []

                    async def call() -> None:
                        result.append(await client.command("shielded", "bet-2"))

                    tg.start_soon(call)
                    with anyio.fail_after(5):
                        await probe.started.wait()
                    proxy.cut()
                    # The resend finds the key in progress and keeps asking.
                    await wait_for(lambda: client.reconnects == 1 and client.connected)
                    await anyio.sleep(0.3)
                    assert result == []
                    probe.release.set()
                assert result == ["done bet-2"]
                assert probe.attempts["bet-2"] == 1
                assert probe.effects["bet-2"] == 1


async def test_commands_made_while_disconnected_are_sent_on_reconnect() -> None:
    async with running(make_app(Probe())) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with rtcore.client.connect(ws_url(proxy.port), token="erin", backoff_base=0.2) as client:
                proxy.refuse = True
                proxy.cut()
                await wait_for(lambda: not client.connected)
                async with anyio.create_task_group() as tg:
                    results: list[Any] = []

                    async def call(n: int) -> None:
                        results.append(await client.command("echo", n))

                    for n in range(3):
                        tg.start_soon(call, n)
                    await anyio.sleep(0.3)
                    proxy.refuse = False
                assert sorted(results) == [0, 1, 2]


async def test_heartbeat_detects_a_stalled_connection() -> None:
    async with running(make_app(Probe())) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with rtcore.client.connect(
                ws_url(proxy.port), token="fay", heartbeat=0.2, backoff_base=0.01
            ) as client:
                assert client.connected
                proxy.stall()
                await wait_for(lambda: not client.connected)
                proxy.resume()
                await wait_for(lambda: client.connected and client.reconnects >= 1)
                assert await client.command("echo", "alive") == "alive"


async def test_gives_up_after_max_attempts() -> None:
    async with running(make_app(Probe())) as server:
        async with TcpProxy.running("127.0.0.1", server.port) as proxy:
            async with rtcore.client.connect(ws_url(proxy.port), backoff_base=0.01, max_attempts=3) as client:
                sub = await client.subscribe("room:g")
                proxy.refuse = True
                proxy.cut()
                with pytest.raises(rtcore.RtcoreError) as err:
                    await take(sub, 1)
                assert err.value.code == "disconnected"
                assert client.closed is not None
                with pytest.raises(rtcore.RtcoreError):
                    await client.command("echo", 1)


async def test_graceful_shutdown_bye_reconnects() -> None:
    """bye reconnect:true (server stop) → the client comes back to a new server on the same port."""
    app = make_app(Probe())
    port = free_port()
    async with running(app, port=port, backend="memory://") as server:
        async with rtcore.client.connect(ws_url(port), token="gil", backoff_base=0.05) as client:
            assert await client.command("echo", 1) == 1
            await server.stop(grace=0.5)
            await wait_for(lambda: not client.connected)
            async with running(app, port=port):
                await wait_for(lambda: client.connected)
                assert await client.command("echo", 2) == 2
                assert client.reconnects >= 1


async def test_token_refresh() -> None:
    async with running(make_app(Probe()), token_grace=5.0) as server:
        calls: list[int] = []

        async def provider() -> str:
            calls.append(1)
            return "hal"

        async with rtcore.client.connect(ws_url(server.port), token="short:hal", token_provider=provider) as client:
            await wait_for(lambda: calls)
            await anyio.sleep(0.2)
            assert client.connected and client.reconnects == 0
            assert await client.command("echo", "ok") == "ok"


async def test_token_expired_without_provider_closes() -> None:
    async with running(make_app(Probe()), token_grace=0.2) as server:
        async with rtcore.client.connect(ws_url(server.port), token="short:ida") as client:
            await wait_for(lambda: client.closed is not None)
            assert client.closed is not None and client.closed.code == "token_expired"


# --- restarts ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys

    import msgspec

    import rtcore


    class Pub(msgspec.Struct):
        stream: str
        n: int


    app = rtcore.App("kill-test")


    @app.command("pub")
    async def pub(ctx, args: Pub) -> int:
        event = await ctx.publish(args.stream, "n", {"n": args.n})
        return event.offset


    def ready(port):
        print("READY", port, flush=True)


    rtcore.run(app, port=int(sys.argv[1]), backend=sys.argv[2], on_ready=ready, grace=0.5, idempotency_lease=1.0)
    """
)


class ServerProcess:
    """An rtcore server in a child process, killed with SIGKILL on demand."""

    def __init__(self, script: Path, port: int, backend: str) -> None:
        self.args = [sys.executable, str(script), str(port), backend]
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = await anyio.to_thread.run_sync(
            lambda: subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        )
        stdout = self.proc.stdout
        assert stdout is not None
        line = await anyio.to_thread.run_sync(stdout.readline)
        assert line.startswith(b"READY"), line

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_server_killed_and_restarted(tmp_path: Path, backend: str) -> None:
    """THE must-hold: kill -9 the server mid-stream and start it again on the same port.

    sqlite: the history survives, so the application sees every event exactly
    once, in order, with no gap. memory: the history is gone, so the
    application must be told (a Missed notice with the new epoch), then sees
    the new epoch's events in order.
    """
    script = tmp_path / "server_app.py"
    script.write_text(SERVER_SCRIPT)
    port = free_port()
    url = f"sqlite:///{tmp_path / 'rt.db'}" if backend == "sqlite" else "memory://"
    server = ServerProcess(script, port, url)
    await server.start()
    try:
        async with (
            rtcore.client.connect(ws_url(port), token="r", backoff_base=0.05, backoff_max=0.5) as reader,
            rtcore.client.connect(ws_url(port), token="w", backoff_base=0.05, backoff_max=0.5) as writer,
        ):
            sub = await reader.subscribe("room:k")
            total, kill_at = 150, 60
            items: list[Evt | Missed] = []
            killed = anyio.Event()

            done = anyio.Event()

            async def publish() -> None:
                for n in range(total):
                    await writer.command("pub", {"stream": "room:k", "n": n}, timeout=30)
                # memory://: events of the new epoch published before the reader
                # resubscribed are skipped (it is told so), so it may not see the
                # last one; keep publishing until it has seen one at or past it.
                n = total
                while not done.is_set():
                    await writer.command("pub", {"stream": "room:k", "n": n}, timeout=30)
                    n += 1
                    await anyio.sleep(0.05)

            async def kill_and_restart() -> None:
                await killed.wait()
                server.kill()  # commands in flight now are resent after the restart
                await anyio.sleep(0.3)
                await server.start()

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                tg.start_soon(kill_and_restart)
                with anyio.fail_after(60):
                    async for item in sub:
                        items.append(item)
                        if len(items) == kill_at:
                            killed.set()
                        if isinstance(item, Evt) and item.data["n"] >= total - 1:
                            done.set()
                            break
            events = [i for i in items if isinstance(i, Evt)]
            notices = [i for i in items if isinstance(i, Missed)]
            numbers = [e.data["n"] for e in events]
            if backend == "sqlite":
                assert notices == []
                assert numbers == list(range(total))
                assert [e.offset for e in events] == list(range(1, total + 1))
                assert len({e.epoch for e in events}) == 1
            else:
                [missed] = notices
                old_epoch = events[0].epoch
                assert missed.epoch != old_epoch
                before = [e for e in events if e.epoch == old_epoch]
                after = [e for e in events if e.epoch == missed.epoch]
                assert before + after == events
                # Nothing before the restart is lost or repeated; the restarted
                # server starts a new history the client was told about.
                assert [e.data["n"] for e in before] == list(range(len(before)))
                assert [e.offset for e in after] == list(range(missed.offset + 1, missed.offset + 1 + len(after)))
                # A command in flight at the kill may have run on both servers
                # (two epochs); within an epoch every number appears once.
                assert [e.data["n"] for e in after] == sorted({e.data["n"] for e in after})
                assert numbers[-1] >= total - 1
                assert items.index(missed) == len(before)
            assert reader.reconnects >= 1
    finally:
        server.stop()


# --- the newcomer: no local position means the current state ------------------------


async def _newcomer_network(app: rtcore.App) -> tuple[Missed, Position | None]:
    async with running(app) as server:
        url = ws_url(server.port)
        async with rtcore.client.connect(url, token="zoe", ack_interval=0.01) as laptop:
            sub = await laptop.subscribe("score:1")
            for n in (1, 2, 3):
                await laptop.command("pub", {"stream": "score:1", "n": n})
            items = await take(sub, 4)  # the initial state, then 3 events
            assert isinstance(items[0], Missed) and items[0].state == {"total": 0}
            await wait_for(lambda: sub.acked is not None and sub.acked.offset == 3)
            await laptop.command("echo", 0)  # acks are stored before later frames
            acked = sub.acked
        async with rtcore.client.connect(url, token="pub") as other:
            for n in (4, 5):
                await other.command("pub", {"stream": "score:1", "n": n})
        async with rtcore.client.connect(url, token="zoe") as phone:  # auto-acking, no position
            sub = await phone.subscribe("score:1")
            [first] = await take(sub, 1)
            assert isinstance(first, Missed)
            return first, acked


async def _newcomer_in_process(app: rtcore.App) -> tuple[Missed, Position | None]:
    async with rtcore.testing.serve(app) as node:
        async with rtcore.testing.connect(node, "zoe", ack_interval=0.01) as laptop:
            await laptop.subscribe("score:1")
            for n in (1, 2, 3):
                await laptop.command("pub", {"stream": "score:1", "n": n})
            for _ in range(3):
                await laptop.next_event("score:1")  # consumed: acked (batched)
            with anyio.fail_after(5):
                while (pos := laptop.session.acked("score:1")) is None or pos.offset != 3:
                    await laptop.ping()  # a round trip; the batch timer runs meanwhile
            await laptop.ping()  # acks are stored before later frames
            acked = laptop.session.acked("score:1")
        async with rtcore.testing.connect(node, "pub") as other:
            for n in (4, 5):
                await other.command("pub", {"stream": "score:1", "n": n})
        async with rtcore.testing.connect(node, "zoe") as phone:
            subbed = await phone.subscribe("score:1")
            assert subbed.snap and not subbed.recovered
            with anyio.fail_after(5):
                while not phone.notices:
                    await phone.next_frame()
            return phone.notices[0], acked


@pytest.mark.parametrize("via", ["network", "in_process"])
async def test_newcomer_gets_the_current_state_although_its_principal_acked_elsewhere(via: str) -> None:
    """A fresh auto-acking client for a principal with a server cursor gets the
    CURRENT state of a stateful stream (a snapshot), not the events after
    another device's ack — the same over the network and in-process.

    Mutation: server/gateway.py passes ``use_cursor=use_cursor`` (ignoring
    ``sub.cursor``), i.e. resume from the server cursor by default → the phone
    gets events 4, 5 without the state → fails (both variants).
    """
    run = _newcomer_network if via == "network" else _newcomer_in_process
    first, acked = await run(make_app(Probe()))
    assert acked is not None and acked.offset == 3  # the principal has a server cursor at 3
    assert (first.offset, first.state) == (5, {"total": 15})
    assert first.checksum is not None


async def test_cursor_opt_in_resumes_from_the_principals_acks() -> None:
    """``cursor=True`` is the explicit way to continue where another device acked."""
    async with running(make_app(Probe())) as server:
        url = ws_url(server.port)
        async with rtcore.client.connect(url, token="yan", ack_interval=0.01) as laptop:
            sub = await laptop.subscribe("room:c", Position("", 0))
            for n in range(3):
                await laptop.command("pub", {"stream": "room:c", "n": n})
            await take(sub, 3)
            await wait_for(lambda: sub.acked is not None and sub.acked.offset == 3)
            await laptop.command("echo", 0)
        async with rtcore.client.connect(url, token="yan") as phone:
            await phone.command("pub", {"stream": "room:c", "n": 3})
            sub = await phone.subscribe("room:c", cursor=True)
            [item] = await take(sub, 1)
            assert isinstance(item, Evt) and item.offset == 4


async def test_err_replies_raise_the_class_that_owns_the_code() -> None:
    """Mutation: ClientSession builds ``RtcoreError`` instead of ``error_from_wire`` → fails."""
    async with running(make_app(Probe())) as server:
        async with rtcore.client.connect(ws_url(server.port), token="kim") as client:
            with pytest.raises(rtcore.Rejected) as err:
                await client.command("refuse")
            assert err.value.code == "insufficient_funds"
            await client.command("echo", 1, key="K1")
            with pytest.raises(rtcore.IdempotencyError) as reused:
                await client.command("echo", 2, key="K1")
            assert reused.value.code == "idempotency_key_reused"

"""The application API end to end through the in-process client."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import msgspec
import pytest

import rtcore
from rtcore.engine.node import Node
from rtcore.protocol.frames import Bye, Err, Evt, Ok, Snap, Subbed, Sync
from rtcore.protocol.state import checksum
from rtcore.server.gateway import OutboxLimits
from rtcore.testing import FakeClock, Faults, connect, serve

pytestmark = pytest.mark.anyio


class Point(msgspec.Struct):
    x: int
    y: int


class Move(msgspec.Struct):
    room: str
    to: Point
    expect: int | None = None


class Room(msgspec.Struct):
    moves: int = 0
    last: dict[str, int] = {}

    def apply(self, event: rtcore.Event) -> None:
        self.moves += 1
        self.last = event.data


def make_app() -> rtcore.App:
    app = rtcore.App()
    app.state("room:*", Room, snapshot_every=5, sync_every=2)

    @app.authenticate
    async def auth(token: str | None) -> rtcore.Principal | None:
        if token is None or token == "bad":
            return None
        name, _, exp = token.partition("@")
        return rtcore.Principal(name, roles=frozenset({"admin"} if name == "root" else ()), expires_at=float(exp) if exp else None)

    @app.authorize
    async def authz(p: rtcore.Principal | None, action: str, resource: str) -> bool:
        if resource.startswith("secret:"):
            return p is not None and "admin" in p.roles
        return not (action == "command" and resource == "admin.only" and (p is None or "admin" not in p.roles))

    @app.command("room.move")
    async def move(ctx: rtcore.Context, args: Move) -> int:
        ev = await ctx.publish(f"room:{args.room}", "moved", args.to, expect=args.expect)
        return ev.offset

    @app.command("admin.only")
    async def admin_only(ctx: rtcore.Context) -> str:
        assert ctx.principal is not None
        return ctx.principal.id

    @app.command("whoami")
    async def whoami(ctx: rtcore.Context) -> str | None:
        return ctx.principal.id if ctx.principal else None

    return app


async def test_bad_args_names_the_field_path() -> None:
    async with serve(make_app()) as node, connect(node, token="alice") as c:
        r = await c.command_reply("room.move", {"room": "1", "to": {"x": 1, "y": "up"}})
        assert isinstance(r, Err) and r.code == "bad_args" and "$.to.y" in r.message
        r = await c.command_reply("room.move", {"room": "1"})
        assert isinstance(r, Err) and r.code == "bad_args" and "to" in r.message
        r = await c.command_reply("nope", {})
        assert isinstance(r, Err) and r.code == "unknown_command"
        assert await c.command("room.move", {"room": "1", "to": {"x": 1, "y": 2}}) == 1


async def test_authentication_and_authorization() -> None:
    async with serve(make_app()) as node:
        with pytest.raises(rtcore.RtcoreError) as exc:
            async with connect(node, token="bad"):
                pass
        assert exc.value.code == "unauthenticated"
        async with connect(node, token="alice") as c, connect(node, token="root") as root:
            assert await c.command("whoami") == "alice"
            r = await c.command_reply("admin.only")
            assert isinstance(r, Err) and r.code == "forbidden"
            assert await root.command("admin.only") == "root"
            with pytest.raises(rtcore.RtcoreError) as e2:
                await c.subscribe("secret:1")
            assert e2.value.code == "forbidden"
            assert (await root.subscribe("secret:1")).stream == "secret:1"


async def test_unauthenticated_hello_closes_1008() -> None:
    async with serve(make_app()) as node:
        client = rtcore.testing.TestClient(node, token="bad", encoding="json", faults=None)
        async with anyio.create_task_group() as tg:
            client._tg = tg
            with pytest.raises(rtcore.RtcoreError):
                await client._open(tg)
            closed = await client.wait_closed()
            assert closed.close_code == 1008
            tg.cancel_scope.cancel()


async def test_expect_conflict() -> None:
    async with serve(make_app()) as node, connect(node, token="a") as c:
        assert await c.command("room.move", {"room": "1", "to": {"x": 0, "y": 0}, "expect": 0}) == 1
        r = await c.command_reply("room.move", {"room": "1", "to": {"x": 0, "y": 0}, "expect": 0})
        assert isinstance(r, Err) and r.code == "conflict"
        assert (await node.backend.events.info("room:1")).head == 1


async def test_live_state_sync_and_snapshot() -> None:
    async with serve(make_app()) as node:
        async with connect(node, token="a") as c:
            sub = await c.subscribe("room:1")
            assert sub.snap and not sub.recovered
            snap = await c.next_frame(types=(Snap,))
            assert snap.offset == 0 and snap.state == {"moves": 0, "last": {}}
            for i in range(4):
                await c.command("room.move", {"room": "1", "to": {"x": i, "y": i}})
            syncs = [await c.next_frame(types=(Sync,)) for _ in range(2)]
            assert [s.offset for s in syncs] == [2, 4]
            # the client folds what it received and proves it agrees
            mine = Room()
            evts = c.seen["room:1"]
            for e in evts:
                mine.apply(rtcore.Event(e.stream, e.epoch, e.offset, e.type, e.data, e.ts))
            assert checksum(mine) == syncs[-1].checksum
            # a sync frame always comes after the event it covers
            kinds = [(type(f).__name__, getattr(f, "offset", None)) for f in c.frames if isinstance(f, Evt | Sync)]
            assert kinds.index(("Sync", 2)) > kinds.index(("Evt", 2))
        # a new subscriber gets the folded state
        async with connect(node, token="b") as c2:
            await c2.subscribe("room:1")
            snap = await c2.next_frame(types=(Snap,))
            assert snap.offset == 4 and snap.state["moves"] == 4 and snap.state["last"] == {"x": 3, "y": 3}
        for _ in range(2):
            await node.publish("room:1", "moved", {"x": 9, "y": 9})
        stored = await node.backend.snapshots.get("room:1")
        await anyio.sleep(0.01)
        stored = await node.backend.snapshots.get("room:1")
        assert stored is not None and stored.offset == 5


async def test_server_cursor_resumes_a_new_device() -> None:
    """Resuming from the server cursor is an explicit opt-in (``sub.cursor``);
    without it a position-less subscriber starts at the current head.

    Mutation: node.subscribe reads the cursor without the opt-in → the
    ``newcomer`` subscribe below is recovered → fails.
    """
    async with serve(make_app()) as node:
        # ack_interval=None: this device acks by hand (3 of the 5 it read).
        async with connect(node, token="alice", ack_interval=None) as c:
            await c.subscribe("chat:1", rtcore.Position("", 0))
            for i in range(5):
                await node.publish("chat:1", "msg", {"i": i})
            for _ in range(5):
                await c.next_event("chat:1")
            await c.ack("chat:1", 3)
            await c.ping()
        for i in range(5, 7):
            await node.publish("chat:1", "msg", {"i": i})
        async with connect(node, token="alice") as phone:
            sub = await phone.subscribe("chat:1", cursor=True)
            assert sub.recovered
            got = [(await phone.next_event("chat:1")).offset for _ in range(4)]
            assert got == [4, 5, 6, 7]
        async with connect(node, token="alice") as newcomer:
            sub = await newcomer.subscribe("chat:1")  # no opt-in: the current head
            assert not sub.recovered and sub.offset == 7
        async with connect(node, token="bob") as other:  # bob has no cursor
            sub = await other.subscribe("chat:1", cursor=True)
            assert not sub.recovered and sub.offset == 7


async def test_server_cursor_is_forgotten_after_cursor_ttl() -> None:
    """A cursor not advanced for ``cursor_ttl`` seconds of the node's clock is
    gone: a ``sub`` with ``cursor: true`` then gets what a newcomer gets.

    Mutations seen caught: ``Node.store_ack`` stores with the default TTL
    instead of ``self.cursor_ttl`` → fails (still recovered after 61 s);
    ``Node.subscribe`` reads the cursor at ``now=0`` instead of the clock →
    fails the same way.
    """
    clock = FakeClock()
    async with serve(make_app(), clock=clock, cursor_ttl=60.0) as node:
        async with connect(node, token="alice", ack_interval=None) as c:
            await c.subscribe("chat:1", rtcore.Position("", 0))
            for i in range(5):
                await node.publish("chat:1", "msg", {"i": i})
            for _ in range(5):
                await c.next_event("chat:1")
            await c.ack("chat:1", 3)
            await c.ping()
        clock.advance(59)
        async with connect(node, token="alice", ack_interval=None) as phone:
            sub = await phone.subscribe("chat:1", cursor=True)
            assert sub.recovered and sub.offset == 5
        clock.advance(2)
        async with connect(node, token="alice", ack_interval=None) as phone:
            sub = await phone.subscribe("chat:1", cursor=True)
            assert not sub.recovered and sub.offset == 5  # a newcomer's start: the head
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="cursor_ttl"):
            Node(make_app(), cursor_ttl=bad)


async def test_processors_run_and_dead_letter() -> None:
    app = rtcore.App()
    seen: list[tuple[str, int]] = []
    attempts: list[int] = []

    @app.on("orders:*")
    async def audit(ctx: rtcore.Context, event: rtcore.Event) -> None:
        seen.append((event.stream, event.offset))

    @app.on("orders:*", max_attempts=2)
    async def fragile(ctx: rtcore.Context, event: rtcore.Event) -> None:
        attempts.append(event.offset)
        if event.data == "poison":
            raise ValueError("cannot handle poison")

    async with serve(app) as node:
        await node.publish("orders:1", "new", "ok")
        await node.publish("orders:1", "new", "poison")
        await node.publish("orders:2", "new", "ok")
        await node.publish("other:1", "new", "ignored")
        with anyio.fail_after(5):
            while len(seen) < 3 or (await node.backend.events.info("dlq:fragile")).head < 1:
                await anyio.sleep(0.01)
        assert seen == [("orders:1", 1), ("orders:1", 2), ("orders:2", 1)]
        dlq = await node.backend.events.read("dlq:fragile", after=0, limit=10)
        assert [e.data["offset"] for e in dlq.events] == [2]
        assert "poison" in dlq.events[0].data["error"]
        assert attempts.count(2) == 2


async def test_processor_accept_filters_the_feed_before_the_queue() -> None:
    """``@app.on(pattern, accept=...)``: the handler gets only the events that
    ``accept(node, event)`` lets through, in order; other processors still get every event.

    Mutation seen caught: ignore ``spec.accept`` in ``Processors.on_event`` → the handler
    gets the refused events too → fails.
    """
    app = rtcore.App()
    kept: list[int] = []
    every: list[int] = []
    asked: list[object] = []

    def keep(node: object, event: rtcore.Event) -> bool:
        asked.append(node)
        return event.data != "skip"

    @app.on("orders:*", accept=keep)
    async def filtered(ctx: rtcore.Context, event: rtcore.Event) -> None:
        kept.append(event.offset)

    @app.on("orders:*")
    async def unfiltered(ctx: rtcore.Context, event: rtcore.Event) -> None:
        every.append(event.offset)

    with pytest.raises(ValueError):
        app.on("orders:*", group="g", accept=keep)
    async with serve(app) as node:
        for data in ["a", "skip", "b", "skip", "c"]:
            await node.publish("orders:1", "new", data)
        with anyio.fail_after(5):
            while len(every) < 5 or len(kept) < 3:
                await anyio.sleep(0.01)
        assert every == [1, 2, 3, 4, 5]
        assert kept == [1, 3, 5]
        assert asked and all(n is node for n in asked)


def test_retention_and_state_lookups_see_later_declarations() -> None:
    """``retention_for``/``state_for`` remember their answer per stream; a declaration made
    after a stream was looked up is still seen.

    Mutation seen caught: drop the length check in ``App._cache`` → the remembered ``None``
    is answered after the declaration → fails.
    """
    app = rtcore.App()
    assert app.retention_for("logs:1") is None
    assert app.state_for("logs:1") is None
    app.retention("logs:*", max_events=5)
    app.state("logs:*", Room)
    rule = app.retention_for("logs:1")
    assert rule is not None and rule.max_events == 5
    spec = app.state_for("logs:1")
    assert spec is not None and spec.type is Room
    assert app.retention_for("other:1") is None and app.state_for("other:1") is None


async def test_token_expiry_refresh_and_close() -> None:
    clock = FakeClock(1000.0)
    async with serve(make_app(), clock=clock, limits=rtcore.Limits(idle_timeout=1e9), token_grace=5) as node:
        async with connect(node, token="alice@1010") as c:
            clock.advance(11)
            err = await c.next_frame(types=(Err,))
            assert err.code == "token_expired" and err.retryable and err.id is None
            reply = await c._request(lambda rid: rtcore.protocol.frames.Auth(rid, "alice@2000"), 5)
            assert isinstance(reply, Ok)
            clock.advance(10)
            assert await c.command("whoami") == "alice"
        async with connect(node, token="bob@1030") as c2:
            clock.advance(10)
            assert (await c2.next_frame(types=(Err,))).code == "token_expired"
            clock.advance(6)
            bye = await c2.next_frame(types=(Bye,))
            assert bye.code == "token_expired" and not bye.reconnect
            assert (await c2.wait_closed()).close_code == 1008


async def test_idle_timeout_says_bye() -> None:
    clock = FakeClock()
    async with serve(make_app(), clock=clock, limits=rtcore.Limits(idle_timeout=30)) as node:
        async with connect(node, token="a") as c:
            clock.advance(20)
            await c.ping()  # activity resets the idle timer
            clock.advance(20)
            assert c.closed is None
            clock.advance(11)
            bye = await c.next_frame(types=(Bye,))
            assert bye.code == "idle_timeout" and bye.reconnect
            assert (await c.wait_closed()).close_code == 1001


async def test_slow_consumer_is_cut_with_4008_and_resumes_without_loss() -> None:
    async with serve(make_app(), outbox=OutboxLimits(max_bytes=10_000, max_frames=20)) as node:
        async with connect(node, token="a", faults=Faults(delay=0.05)) as slow, connect(node, token="b") as fast:
            await slow.subscribe("feed:1", rtcore.Position("", 0))
            await fast.subscribe("feed:1", rtcore.Position("", 0))
            for i in range(100):
                await node.publish("feed:1", "tick", {"i": i})
                await anyio.lowlevel.checkpoint()  # a live feed, not one burst: the fast writer keeps up
            got = [(await fast.next_event("feed:1")).offset for _ in range(100)]
            assert got == list(range(1, 101))  # the fast one is not slowed or cut
            closed = await slow.wait_closed(timeout=10)
            assert closed.close_code == 4008
            assert node.stats["slow_consumers"] == 1
            slow.faults = None
            await slow.reconnect()
            with anyio.fail_after(5):
                while slow.cursors["feed:1"].offset < 100:
                    await slow.next_event("feed:1")
            offsets = [e.offset for e in slow.seen["feed:1"]]
            assert offsets == list(range(1, 101))


@pytest.mark.parametrize(
    "faults",
    [Faults(cut_after=7), Faults(drop=frozenset({5, 9})), Faults(duplicate=frozenset({4, 5, 6, 12})), Faults(delay=0.001)],
    ids=["cut", "drop", "duplicate", "delay"],
)
async def test_faulty_connections_lose_and_duplicate_nothing(faults: Faults) -> None:
    async with serve(make_app()) as node:
        async with connect(node, token="a", faults=faults) as c:
            await c.subscribe("feed:1", rtcore.Position("", 0))
            for i in range(20):
                await node.publish("feed:1", "tick", {"i": i})
            with anyio.fail_after(10):
                while c.cursors["feed:1"].offset < 20:
                    if c.closed is not None:
                        c.faults = None
                        await c.reconnect()
                    await anyio.sleep(0.005)
            assert [e.offset for e in c.seen["feed:1"]] == list(range(1, 21))


async def test_malformed_frame_keeps_session_and_others_alive() -> None:
    async with serve(make_app()) as node, connect(node, token="a") as bad, connect(node, token="b") as good:
        await good.subscribe("chat:1")
        await bad.send_raw('{"t":"cmd","id":7,"name":5}')
        err = await bad.next_frame(types=(Err,))
        assert err.code == "bad_frame" and err.id == 7 and "$.name" in err.message
        await bad.send_raw("not json at all")
        assert (await bad.next_frame(types=(Err,))).code == "bad_frame"
        await bad.ping()
        await node.publish("chat:1", "m", 1)
        assert (await good.next_event("chat:1")).offset == 1


async def test_msgpack_and_json_clients_see_the_same_events() -> None:
    async with serve(make_app()) as node, connect(node, token="a") as j, connect(node, token="b", encoding="msgpack") as m:
        sj = await j.subscribe("chat:1")
        sm = await m.subscribe("chat:1")
        assert isinstance(sj, Subbed) and sj.epoch == sm.epoch
        await j.command("room.move", {"room": "1", "to": {"x": 1, "y": 2}})
        await node.publish("chat:1", "m", {"text": "héllo", "n": [1, 2.5, None]})
        ej, em = await j.next_event("chat:1"), await m.next_event("chat:1")
        assert ej == em and ej.data == {"text": "héllo", "n": [1, 2.5, None]}

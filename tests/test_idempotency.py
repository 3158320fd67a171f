"""Idempotency: one key, one execution, one result.

The Hypothesis test races N clients (both encodings) sending the same command
with the same key while the first execution is held in flight, mixes in the
same key with other arguments, then releases the handler and retries
everyone. The handler must run once, everyone must end with the same result,
in-flight duplicates must get ``idempotency_in_progress`` (retryable) and a
reused key ``idempotency_key_reused``.
"""

from __future__ import annotations

import contextlib
import functools

import anyio
import anyio.lowlevel
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rtcore
from rtcore.protocol.frames import Err, Ok
from rtcore.testing import FakeClock, connect, serve

pytestmark = pytest.mark.anyio


class Bet(msgspec.Struct):
    amount: int
    on: str = "red"


def make_app(gate: anyio.Event, calls: list[int]) -> rtcore.App:
    app = rtcore.App()

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    @app.command("bet.place")
    async def place(ctx: rtcore.Context, args: Bet) -> dict[str, object]:
        calls.append(args.amount)
        await gate.wait()
        ev = await ctx.publish("bets:1", "placed", {"amount": args.amount, "on": args.on})
        return {"offset": ev.offset, "amount": args.amount}

    return app


async def _race(n: int, encodings: list[str], retries: int, reuse: bool) -> None:
    gate = anyio.Event()
    calls: list[int] = []
    app = make_app(gate, calls)
    async with serve(app) as node, contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(node, token="alice", encoding=encodings[i % len(encodings)]))
            for i in range(n)
        ]
        first: list[Ok | Err] = []
        async with anyio.create_task_group() as tg:

            async def send_first() -> None:
                first.append(await clients[0].command_reply("bet.place", {"amount": 5}, key="K"))

            tg.start_soon(send_first)
            with anyio.fail_after(5):
                while not calls:
                    await anyio.lowlevel.checkpoint()
            # duplicates while the first is executing
            for c in clients[1:]:
                r = await c.command_reply("bet.place", {"on": "red", "amount": 5}, key="K")
                assert isinstance(r, Err) and r.code == "idempotency_in_progress" and r.retryable
            if reuse:
                r = await clients[-1].command_reply("bet.place", {"amount": 6}, key="K")
                assert isinstance(r, Err) and r.code == "idempotency_key_reused" and not r.retryable
            gate.set()
        assert len(first) == 1 and isinstance(first[0], Ok) and not first[0].replayed
        result = first[0].result
        # everyone retries, several times, concurrently
        replies: list[Ok | Err] = []

        async def retry(c: rtcore.testing.TestClient) -> None:
            for _ in range(retries):
                replies.append(await c.command_reply("bet.place", {"amount": 5, "on": "red"}, key="K"))

        async with anyio.create_task_group() as tg:
            for c in clients:
                tg.start_soon(retry, c)
        for r in replies:
            assert isinstance(r, Ok) and r.replayed and r.result == result
        if reuse:
            r = await clients[0].command_reply("bet.place", {"amount": 6}, key="K")
            assert isinstance(r, Err) and r.code == "idempotency_key_reused"
        assert calls == [5]
        assert (await node.backend.events.info("bets:1")).head == 1


@settings(max_examples=200)
@given(
    n=st.integers(1, 5),
    encodings=st.lists(st.sampled_from(["json", "msgpack"]), min_size=1, max_size=3),
    retries=st.integers(1, 3),
    reuse=st.booleans(),
)
def test_one_key_executes_once(n: int, encodings: list[str], retries: int, reuse: bool) -> None:
    anyio.run(_race, n, encodings, retries, reuse)


async def test_keys_are_scoped_by_principal() -> None:
    gate = anyio.Event()
    gate.set()
    calls: list[int] = []
    async with serve(make_app(gate, calls)) as node:
        async with connect(node, token="alice") as a, connect(node, token="bob") as b:
            ra = await a.command("bet.place", {"amount": 1}, key="same")
            rb = await b.command("bet.place", {"amount": 2}, key="same")
            assert ra["offset"] == 1 and rb["offset"] == 2
            assert calls == [1, 2]


async def test_retryable_errors_are_not_stored_and_final_ones_are() -> None:
    app = rtcore.App()
    attempts: list[str] = []

    @app.command("flaky")
    async def flaky(ctx: rtcore.Context, args: dict[str, str]) -> str:
        attempts.append(args["mode"])
        if args["mode"] == "retry" and attempts.count("retry") == 1:
            raise rtcore.Rejected("busy", "try again", retryable=True)
        if args["mode"] == "final":
            raise rtcore.Rejected("insufficient_funds", "no money")
        if args["mode"] == "crash" and attempts.count("crash") == 1:
            raise RuntimeError("boom")
        return "done"

    async with serve(app) as node, connect(node) as c:
        r1 = await c.command_reply("flaky", {"mode": "retry"}, key="a")
        assert isinstance(r1, Err) and r1.code == "busy" and r1.retryable
        r2 = await c.command_reply("flaky", {"mode": "retry"}, key="a")
        assert isinstance(r2, Ok) and r2.result == "done" and not r2.replayed
        f1 = await c.command_reply("flaky", {"mode": "final"}, key="b")
        f2 = await c.command_reply("flaky", {"mode": "final"}, key="b")
        assert isinstance(f1, Err) and isinstance(f2, Err)
        assert (f1.code, f2.code, f1.retryable) == ("insufficient_funds", "insufficient_funds", False)
        c1 = await c.command_reply("flaky", {"mode": "crash"}, key="c")
        assert isinstance(c1, Err) and c1.code == "internal" and c1.retryable
        c2 = await c.command_reply("flaky", {"mode": "crash"}, key="c")
        assert isinstance(c2, Ok)
        assert attempts == ["retry", "retry", "final", "crash", "crash"]


async def test_a_released_key_stays_bound_to_its_arguments() -> None:
    """A retryable failure releases the key for a retry, never for other arguments.

    The handler's effect lands (a ledger row) and only then fails retryably:
    the shape of a database commit whose answer was lost. The same key with
    another transfer id must be refused (``idempotency_key_reused``), or one key
    would have two effects; the same arguments run again (and the handler's own
    dedup by transfer id makes that safe). Found by the PostgreSQL pause test
    (``tests/hardening/test_postgres_faults.py``): two transfers under one key.

    Mutation seen caught: ``release`` deleting the record again (memory store)
    → the reuse runs, the ledger has two rows → fails.
    """
    app = rtcore.App()
    ledger: dict[str, int] = {}
    attempts: list[str] = []

    @app.command("transfer")
    async def transfer(ctx: rtcore.Context, args: dict[str, int | str]) -> str:
        tid = str(args["id"])
        attempts.append(tid)
        ledger.setdefault(tid, int(args["amount"]))  # the store's dedup by transfer id
        if attempts.count(tid) == 1:
            raise rtcore.Rejected("backend_unavailable", "the answer was lost", retryable=True)
        return tid

    async with serve(app) as node, connect(node, token="alice") as c:
        first = await c.command_reply("transfer", {"id": "t1", "amount": 5}, key="k")
        assert isinstance(first, Err) and first.retryable
        reuse = await c.command_reply("transfer", {"id": "t1-reuse", "amount": 5}, key="k")
        assert isinstance(reuse, Err) and reuse.code == "idempotency_key_reused"
        retry = await c.command_reply("transfer", {"id": "t1", "amount": 5}, key="k")
        assert isinstance(retry, Ok) and retry.result == "t1"
        assert ledger == {"t1": 5} and attempts == ["t1", "t1"]


async def test_a_stuck_release_does_not_hold_the_retryable_answer_back() -> None:
    """The answer to a retryable failure waits for the claim's release only briefly.

    A paused Redis answers neither the command's append nor the release that
    follows; waiting for both doubled the time to the retryable answer and the
    client gave up first (``tests/hardening/test_redis_pause.py`` in CI). Here
    the release blocks until the test lets it go: the answer must come anyway,
    and once the release completes behind it the same key re-executes.

    Mutation seen caught: awaiting ``release`` inline in ``dispatch`` (no
    ``_release``) → the dispatch waits for the release, which gives up after
    its 10 s guard and raises ``TimeoutError`` out of the dispatch → fails.
    """
    app = rtcore.App()
    attempts: list[int] = []

    @app.command("put")
    async def put(ctx: rtcore.Context, args: int) -> int:
        attempts.append(args)
        if len(attempts) == 1:
            raise rtcore.Rejected("backend_unavailable", "no reply", retryable=True)
        return args

    async with serve(app) as node:
        store = node.backend.idempotency
        real_release = store.release
        gate, released = anyio.Event(), anyio.Event()

        async def stuck_release(scope: str, key: str) -> None:
            # The dispatch shields its release from cancellation, so the hang
            # guard is here: a release still waiting after 10 s raises.
            with anyio.fail_after(10):
                await gate.wait()
            await real_release(scope, key)
            released.set()

        store.release = stuck_release  # type: ignore[method-assign]
        with anyio.fail_after(30):  # hang guards, not timing assertions
            first = await node.dispatch(None, "put", b"7", key="k")
            assert not first.ok and first.code == "backend_unavailable" and first.retryable
            gate.set()
            await released.wait()
            second = await node.dispatch(None, "put", b"7", key="k")
        assert second.ok and second.result == 7 and attempts == [7, 7]


async def test_a_lapsed_claim_stays_bound_to_its_arguments() -> None:
    """A claim whose lease ran out (its node died, or the command outlived the
    lease) may be taken over by the same command only.

    Mutation seen caught: ``claimable`` returning True for any lapsed claim
    → the request with other arguments runs while the first is still in
    flight → two executions under one key → fails.
    """
    clock = FakeClock()
    gate = anyio.Event()
    calls: list[int] = []
    async with serve(make_app(gate, calls), clock=clock, idempotency_lease=5.0, limits=rtcore.Limits(idle_timeout=1e9)) as node:
        async with connect(node, token="alice") as a, connect(node, token="alice") as b, anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(a.command_reply, "bet.place", {"amount": 1}, key="k"))
            with anyio.fail_after(5):
                while not calls:
                    await anyio.sleep(0.01)
            clock.advance(6)  # the first claim's lease lapses while it still runs
            other = await b.command_reply("bet.place", {"amount": 2}, key="k")
            assert isinstance(other, Err) and other.code == "idempotency_key_reused"
            gate.set()
        assert calls == [1]


async def test_results_expire_after_ttl() -> None:
    clock = FakeClock()
    gate = anyio.Event()
    gate.set()
    calls: list[int] = []
    async with serve(make_app(gate, calls), clock=clock, idempotency_ttl=100.0, limits=rtcore.Limits(idle_timeout=1e9)) as node:
        async with connect(node, token="alice") as c:
            await c.command("bet.place", {"amount": 1}, key="k")
            clock.advance(99)
            assert (await c.command_reply("bet.place", {"amount": 1}, key="k")).replayed  # type: ignore[union-attr]
            clock.advance(2)
            r = await c.command_reply("bet.place", {"amount": 1}, key="k")
            assert isinstance(r, Ok) and not r.replayed
            assert calls == [1, 1]


async def test_publishes_inside_a_keyed_command_are_idempotent_on_reexecution() -> None:
    """A command re-executed after its record was lost appends nothing twice."""
    app = rtcore.App()

    @app.command("two")
    async def two(ctx: rtcore.Context, args: None) -> list[int]:
        a = await ctx.publish("s:1", "a", 1)
        b = await ctx.publish("s:1", "b", 2)
        return [a.offset, b.offset]

    async with serve(app) as node, connect(node) as c:
        first = await c.command("two", None, key="k")
        node.backend.idempotency._records.clear()  # type: ignore[attr-defined]
        again = await c.command("two", None, key="k")
        assert first == again == [1, 2]
        assert (await node.backend.events.info("s:1")).head == 2


async def test_bad_keys_are_rejected() -> None:
    gate = anyio.Event()
    gate.set()
    async with serve(make_app(gate, [])) as node, connect(node, token="a") as c:
        r = await c.command_reply("bet.place", {"amount": 1}, key="x" * 256)
        assert isinstance(r, Err) and r.code == "bad_args" and "255" in r.message


async def test_replayed_errors_keep_their_status_and_say_replayed() -> None:
    app = rtcore.App()

    @app.command("refuse")
    async def refuse(ctx: rtcore.Context, args: None) -> None:
        raise rtcore.Rejected("limit_reached", "no more", http_status=422)

    async with serve(app) as node, connect(node) as c:
        first = await node.dispatch(None, "refuse", None, key="k")
        again = await node.dispatch(None, "refuse", None, key="k")
        assert (first.http_status, first.replayed) == (422, False)
        assert (again.http_status, again.replayed, again.code) == (422, True, "limit_reached")
        r = await c.command_reply("refuse", None, key="k")
        assert isinstance(r, Err) and r.replayed and r.code == "limit_reached"


async def test_a_command_cancelled_while_its_outcome_is_stored_still_stores_it() -> None:
    """A cancellation (connection lost, shutdown) that lands during the outcome's write does not lose it.

    The first write is made to hang and the command is cancelled there; the
    outcome must still be stored, so a retry replays it instead of finding
    the key pending (and, after the lease, running the handler again).
    Mutation: in ``dispatch``, re-raise the cancellation of the outcome's
    first write without the shielded second one (``_finish(..., retry=True)``)
    → the retry answers ``idempotency_in_progress``.
    """
    calls: list[int] = []
    app = rtcore.App()

    @app.command("double")
    async def double(ctx: rtcore.Context, args: int) -> int:
        calls.append(args)
        return args * 2

    async with serve(app) as node:
        store = node.backend.idempotency
        real = store.finish
        attempts: list[int] = []
        entered = anyio.Event()

        async def finish(*args: object, **kwargs: object) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                entered.set()
                await anyio.sleep_forever()
            await real(*args, **kwargs)  # type: ignore[arg-type]

        store.finish = finish  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(node.dispatch, None, "double", 21, key="k"))
            await entered.wait()
            tg.cancel_scope.cancel()
        again = await node.dispatch(None, "double", 21, key="k")
        assert (again.ok, again.replayed, again.result) == (True, True, 42)
        assert calls == [21]
        assert len(attempts) == 2

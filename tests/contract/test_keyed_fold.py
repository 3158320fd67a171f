"""A keyed command's claim and first event in one backend operation (``Backend.begin_append``).

:func:`rtcore.engine.dispatch.dispatch` folds ``idempotency.begin`` into the
first publish of a handler it has proven does nothing before that publish
(``_publish_first``). These tests run the keyed command path through
``Node.dispatch`` on every engine (memory: the generic fallback; sqlite: one
write of one group commit; redis: one script) and check that the fold keeps
every idempotency rule: a retried key never appends twice, a refused claim
appends nothing and leaves the holder's claim alone, the fingerprint check
stays, a handler that failed before its publish still gets its key recorded,
and code of the application before the publish never runs twice.
"""

from __future__ import annotations

import sqlite3
import warnings
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtcore
from rtcore.backends import AppendResult, Backend, IdempotencyRecord, MemoryBackend
from rtcore.engine.dispatch import _check_publish_first, _publish_first
from rtcore.errors import BackendError
from rtcore.protocol.idempotency import fingerprint, scope_of
from rtcore.testing import FakeClock

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0


class Put(msgspec.Struct):
    stream: str
    i: int = 0


def make_app(calls: list[int]) -> rtcore.App:
    app = rtcore.App("fold")

    @app.command("put")
    async def put(ctx: rtcore.Context, args: Put) -> int:
        event = await ctx.publish(args.stream, "put", {"i": args.i})
        return event.offset

    @app.command("first")
    async def first(ctx: rtcore.Context, args: Put) -> dict[str, int]:
        event = await ctx.publish(args.stream, "put", {"i": args.i})
        return {"offset": event.offset}  # more than the offset: the outcome is stored after the handler

    @app.command("expect")
    async def expect(ctx: rtcore.Context, args: Put) -> int:
        event = await ctx.publish(args.stream, "put", {"i": args.i}, expect=args.i)
        return event.offset

    @app.command("counted")
    async def counted(ctx: rtcore.Context, args: Put) -> int:
        calls.append(args.i)  # an effect of the application before the publish
        event = await ctx.publish(args.stream, "put", {"i": args.i})
        return event.offset

    return app


def _raw(stream: str, i: int = 0) -> bytes:
    return msgspec.json.encode({"stream": stream, "i": i})


async def _head(b: Backend, stream: str) -> int:
    return (await b.events.info(stream)).head


class _Counting:
    """Counts the calls of a store method (to see which path a command took)."""

    def __init__(self, target: Any, name: str) -> None:
        self.calls = 0
        real = getattr(target, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        setattr(target, name, wrapper)


LOG: list[str] = []


async def _logs_first(ctx: rtcore.Context, args: Put) -> int:
    LOG.append(args.stream)
    return (await ctx.publish(args.stream, "put")).offset


def _compiled(source: str) -> Any:
    """The function ``f`` defined by ``source`` (compiled with its SyntaxWarnings silenced)."""
    scope: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, "<handler>", "exec"), scope)
    return scope["f"]


# A call whose callee is not ctx.publish (a tuple of fields, called).
_calls_another = _compiled("async def f(ctx, args):\n    return await (args.stream, args.i)()\n")


async def _keys_from_args(ctx: rtcore.Context, args: Put) -> int:
    return (await ctx.publish(args.stream, "put", {args.stream: 1})).offset  # hashing a field may run code


async def _with_try(ctx: rtcore.Context, args: Put) -> int:
    try:
        return (await ctx.publish(args.stream, "put")).offset
    finally:
        LOG.append("unwound")  # would run when a refused claim unwinds the handler


async def _publish_plain(ctx: rtcore.Context, args: Put) -> int:
    return (await ctx.publish(args.stream, "put", [args.i, (1, "a")], key="k", expect=args.i)).offset


def test_publish_first_is_recognised_only_without_code_before_the_publish() -> None:
    """The proof admits handlers that only build the publish's arguments, and nothing else.

    Mutation: ``_check_publish_first`` accepts any ``CALL`` (drop the
    ``stack[-2:] != ["publish", "self"]`` check) -> ``_calls_another`` is
    admitted: fails. Mutation: ``BUILD_MAP`` keys are not checked ->
    ``_keys_from_args`` is admitted: fails. Mutation:
    ``_only_implicit_handlers`` accepts every handler -> ``_with_try``
    (whose ``finally`` would run on a refused claim) is admitted: fails.
    """
    app = make_app([])
    specs = app.commands
    assert _publish_first(specs["put"].handler, Put) == 2  # _ONLY: returns the offset
    assert _publish_first(specs["first"].handler, Put) == 1  # _FIRST
    assert _publish_first(specs["expect"].handler, Put)
    assert _check_publish_first(_publish_plain, Put)
    assert not _publish_first(specs["counted"].handler, Put)  # a closure's list, appended to
    assert not _check_publish_first(_logs_first, Put)  # a global's method called
    assert not _check_publish_first(_calls_another, Put)
    assert not _check_publish_first(_keys_from_args, Put)
    assert not _check_publish_first(_with_try, Put)
    assert not _check_publish_first(_publish_plain, None)  # args given to a handler that takes none


@pytest.mark.parametrize("command", ["put", "first"])
async def test_retry_replays_and_appends_nothing_twice(backend_factory, command: str) -> None:
    """One operation claims and appends; the retry is a replay, the stream still holds one event.

    Mutations: the SQLite write appends although ``_claim`` returned a record,
    or the Redis script ``idem_begin_append`` does not return on ``rec``, or
    ``Backend.begin_append`` appends although ``begin`` returned a record
    (memory) -> the retry appends a second event: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        begins = _Counting(b.idempotency, "begin")
        p = rtcore.Principal("alice")
        expected: Any = 1 if command == "put" else {"offset": 1}
        first = await node.dispatch(p, command, _raw("s:1"), key="K")
        assert first.ok and first.result == expected and not first.replayed
        assert begins.calls == 0 or type(b) is MemoryBackend  # the engines claimed inside begin_append
        again = await node.dispatch(p, command, _raw("s:1"), key="K")
        assert again.ok and again.replayed and again.result == expected
        assert await _head(b, "s:1") == 1
        other = await node.dispatch(p, command, _raw("s:1", 7), key="K")
        assert not other.ok and other.code == "idempotency_key_reused"
        assert await _head(b, "s:1") == 1


async def test_refused_claim_appends_nothing_and_keeps_the_holders_claim(backend_factory) -> None:
    """A key another execution holds: ``idempotency_in_progress``, no event, the claim still pending.

    Mutation: ``_dispatch_publish_first`` settles (releases) the key after a
    refused claim, as if it were its own -> the holder's claim becomes
    ``released`` and a retry re-executes: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        p = rtcore.Principal("alice")
        fp = fingerprint("put", Put("s:1"))
        assert await b.idempotency.begin(scope_of("alice"), "K", fp, now=T0, lease=60, ttl=3600) is None
        r = await node.dispatch(p, "put", _raw("s:1"), key="K")
        assert not r.ok and r.code == "idempotency_in_progress" and r.retryable
        assert await _head(b, "s:1") == 0
        held = await b.idempotency.begin(scope_of("alice"), "K", fp, now=T0 + 1, lease=60, ttl=3600)
        assert held is not None and held.state == "pending"


async def test_conflict_after_the_claim_is_recorded(backend_factory) -> None:
    """The claim is made, the append's ``expect`` fails: the ``conflict`` is the key's outcome.

    Mutation: ``_claim_and_publish`` leaves the state unknown on
    ``ConflictError`` -> the command does not finish its own claim (a later
    ``begin`` finds it pending) and the retry gets ``in_progress``: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        p = rtcore.Principal("alice")
        r = await node.dispatch(p, "expect", _raw("s:1", 5), key="K")
        assert not r.ok and r.code == "conflict" and not r.replayed
        again = await node.dispatch(p, "expect", _raw("s:1", 5), key="K")
        assert not again.ok and again.code == "conflict" and again.replayed
        assert await _head(b, "s:1") == 0


async def test_failure_before_the_publish_still_binds_the_key(backend_factory) -> None:
    """A bad stream name fails the handler before anything reached the backend; the key is still recorded.

    Mutation: ``_dispatch_publish_first`` returns the reply without claiming
    when the claim was never tried -> the retry runs again (not replayed) and
    the same key with other arguments is accepted: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        p = rtcore.Principal("alice")
        bad = "x" * 10_000  # longer than any stream name may be
        r = await node.dispatch(p, "put", _raw(bad), key="K")
        assert not r.ok and r.code == "bad_stream" and not r.replayed
        again = await node.dispatch(p, "put", _raw(bad), key="K")
        assert not again.ok and again.code == "bad_stream" and again.replayed
        other = await node.dispatch(p, "put", _raw("s:1"), key="K")
        assert not other.ok and other.code == "idempotency_key_reused"
        assert await _head(b, "s:1") == 0


async def test_code_before_the_publish_runs_once(backend_factory) -> None:
    """A handler with an effect before its publish takes the general path: the retry does not run it.

    Mutation: ``_publish_first`` returns True for every handler -> the retry
    runs ``calls.append`` before its claim is refused: ``calls`` has two
    entries: fails.
    """
    calls: list[int] = []
    async with backend_factory() as b, rtcore.Node(make_app(calls), b, clock=FakeClock(T0)) as node:
        p = rtcore.Principal("alice")
        for _ in range(2):
            r = await node.dispatch(p, "counted", _raw("s:1", 3), key="K")
            assert r.ok and r.result == 1
        assert calls == [3]
        assert await _head(b, "s:1") == 1


class _LostReply(MemoryBackend):
    """Claims and appends (the outcome not stored yet), then fails as if the engine's reply was lost."""

    async def begin_append(  # type: ignore[override]
        self, scope: str, key: str, fingerprint: bytes, **kw: Any
    ) -> tuple[IdempotencyRecord | None, AppendResult | None]:
        kw.pop("outcome_ttl", None)
        await super().begin_append(scope, key, fingerprint, **kw)
        raise BackendError("redis: connection lost")


async def test_unknown_claim_is_not_released() -> None:
    """After a claim-and-append whose outcome is unknown, the key is not released (it may be held).

    Mutation: ``_dispatch_publish_first`` releases when the claim state is
    unknown -> the pending claim becomes ``released`` (another execution's
    live claim would be freed the same way): fails.
    """
    b = _LostReply()
    async with rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        r = await node.dispatch(rtcore.Principal("alice"), "put", _raw("s:1"), key="K")
        assert not r.ok and r.code == "backend_unavailable" and r.retryable
        fp = fingerprint("put", Put("s:1"))
        held = await b.idempotency.begin(scope_of("alice"), "K", fp, now=T0 + 1, lease=60, ttl=3600)
        assert held is not None and held.state == "pending"


async def test_sqlite_claim_and_event_wait_for_the_groups_commit(tmp_path, monkeypatch) -> None:
    """The claim and the event share one write: a failed COMMIT fails the command and keeps neither.

    Mutation: ``SqliteBackend.begin_append`` runs its write outside the group
    commit (``self._db.run(tx)``: each statement commits on its own, the
    failing group COMMIT does not cover it) -> the command is answered ``ok``
    although the COMMIT of its group failed: fails.
    """
    from rtcore.backends import sqlite as sqlite_backend
    from rtcore.backends.sqlite import open_sqlite

    real_commit = sqlite_backend._commit
    fail = [True]

    def flaky_commit(conn: sqlite3.Connection) -> None:
        if fail[0]:
            fail[0] = False
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(conn)

    b = await open_sqlite(f"sqlite:///{tmp_path / 'rt.db'}")
    try:
        async with rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
            p = rtcore.Principal("alice")
            await b.events.info("s:1")  # the stream exists before the failing group
            monkeypatch.setattr(sqlite_backend, "_commit", flaky_commit)
            r = await node.dispatch(p, "put", _raw("s:1"), key="K")
            assert not r.ok and r.retryable
            assert await _head(b, "s:1") == 0
            again = await node.dispatch(p, "put", _raw("s:1"), key="K")
            assert again.ok and again.result == 1 and not again.replayed
            assert await _head(b, "s:1") == 1
    finally:
        await b.aclose()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 1), st.booleans()), min_size=1, max_size=12)
)
async def test_keys_apply_once_against_a_model(backend_factory, ops: list[tuple[str, int, bool]]) -> None:
    """Any sequence of keyed ``put``s (keys A-C, two argument values, some sent twice at once).

    The model: the first command with a key appends one event and returns its
    offset; the same key and arguments replays that offset; other arguments
    get ``idempotency_key_reused``; the stream holds one event per key.
    Mutation: as in ``test_retry_replays_and_appends_nothing_twice`` (the
    claim check skipped in the fold) -> extra events and fresh offsets: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        p = rtcore.Principal("alice")
        stream = f"s:{id(ops) % 1000}"
        model: dict[str, tuple[int, int]] = {}  # key -> (args value, offset)
        for key, value, twice in ops:
            replies: list[Any] = []

            async def one(key: str = key, value: int = value, replies: list[Any] = replies) -> None:
                replies.append(await node.dispatch(p, "put", _raw(stream, value), key=key))

            async with anyio.create_task_group() as tg:
                for _ in range(2 if twice else 1):
                    tg.start_soon(one)
            executed = [r for r in replies if r.ok and not r.replayed]
            if key not in model:
                assert len(executed) == 1, replies  # the first send runs; a twin replays or finds it running
                model[key] = (value, executed[0].result)
            else:
                assert not executed, replies
            for r in replies:
                if model[key][0] != value:
                    assert not r.ok and r.code == "idempotency_key_reused"
                elif r.ok:
                    assert r.result == model[key][1]
                else:
                    assert r.code == "idempotency_in_progress" and twice
        assert await _head(b, stream) == len(model)
        assert sorted(off for _, off in model.values()) == list(range(1, len(model) + 1))



async def test_offset_only_handler_stores_its_outcome_in_the_same_operation(backend_factory) -> None:
    """``return event.offset`` after the publish: the engines store the outcome with the event, no finish after.

    Mutations: ``_dispatch_publish_first`` settles after a ``_DONE`` claim as
    well -> ``finish`` is called: fails; the SQLite write or the Redis
    script stores the offset plus one -> the retry replays another result: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        finishes = _Counting(b.idempotency, "finish")
        p = rtcore.Principal("alice")
        for i in range(3):
            r = await node.dispatch(p, "put", _raw("s:1", i), key=f"K{i}")
            assert r.ok and r.result == i + 1
        assert finishes.calls == 0 or type(b) is MemoryBackend  # memory's fallback finishes itself
        for i in range(3):
            again = await node.dispatch(p, "put", _raw("s:1", i), key=f"K{i}")
            assert again.ok and again.replayed and again.result == i + 1
        assert await _head(b, "s:1") == 3


async def test_redis_outcome_of_large_offsets(backend_factory) -> None:
    """The Redis script splices the offset into the record: every integer width of MessagePack decodes back.

    Mutation: ``_done_parts`` splits around another value (the record's
    expiry) -> the stored record does not decode or replays a wrong result: fails.
    """
    from rtcore.backends.redis import RedisBackend

    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
        if not isinstance(b, RedisBackend):
            return  # the other engines encode the record in Python (the test above)
        p = rtcore.Principal("alice")
        await b.events.info("s:big")
        for head in (126, 254, 65_534, 4_294_967_294, 5_000_000_000):
            await b.client.hset("rt:{s:big}:m", {"head": str(head)})
            r = await node.dispatch(p, "put", _raw("s:big"), key=f"K{head}")
            assert r.ok and r.result == head + 1
            again = await node.dispatch(p, "put", _raw("s:big"), key=f"K{head}")
            assert again.ok and again.replayed and again.result == head + 1


async def test_sqlite_folded_finishes_collect_expired_records(tmp_path) -> None:
    """The fold counts its finishes: every 1024th also deletes expired records, as ``finish`` does.

    Mutation: ``SqliteBackend.begin_append`` never sweeps (``sweep = False``)
    -> the expired record stays forever: fails.
    """
    from rtcore.backends.sqlite import open_sqlite

    b = await open_sqlite(f"sqlite:///{tmp_path / 'rt.db'}")
    try:
        old = await b.idempotency.begin("anon", "old", b"f" * 32, now=T0 - 10_000, lease=1, ttl=1)
        assert old is None
        async with rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:
            p = rtcore.Principal("alice")
            for i in range(1024):
                assert (await node.dispatch(p, "put", _raw("s:1"), key=f"K{i}")).ok

        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM idempotency WHERE key = 'old'").fetchone()[0])

        assert await b._db.run(count) == 0
    finally:
        await b.aclose()


async def test_conflict_stores_no_success_in_the_operation(backend_factory) -> None:
    """On an ``expect`` mismatch the operation stores no outcome: only the later finish does.

    With that finish failing (the node dies before it, say), the key is left
    pending, never finished as a success. Mutation: the Redis script stores
    the outcome whatever the append returned (``if ARGV[18] then``) -> the
    retry replays ``ok`` for a command that failed: fails.
    """
    async with backend_factory() as b, rtcore.Node(make_app([]), b, clock=FakeClock(T0)) as node:

        async def lost_finish(*args: Any, **kwargs: Any) -> None:
            raise BackendError("the node died before the finish")

        b.idempotency.finish = lost_finish  # type: ignore[method-assign]
        p = rtcore.Principal("alice")
        r = await node.dispatch(p, "expect", _raw("s:1", 5), key="K")
        assert not r.ok and r.code == "conflict"
        again = await node.dispatch(p, "expect", _raw("s:1", 5), key="K")
        assert not again.ok and again.code == "idempotency_in_progress"


async def test_folded_outcome_outlives_the_lease_and_expires_with_the_ttl(backend_factory) -> None:
    """The outcome stored in the step keeps the node's TTL: replayed after the lease, forgotten after the TTL.

    Mutation: the Redis step sends the claim's lease as the record's expiry
    (``expires_text = args[4]``) -> after the lease the key is claimable
    again and the retry runs a second time: fails. Mutation: the SQLite
    write over an existing (expired) record stores the offset plus one ->
    the last replay answers 2: fails.
    """
    clock = FakeClock(T0)
    async with backend_factory() as b, rtcore.Node(
        make_app([]), b, clock=clock, idempotency_lease=60, idempotency_ttl=3600
    ) as node:
        p = rtcore.Principal("alice")
        assert (await node.dispatch(p, "put", _raw("s:1"), key="K")).result == 1
        clock.advance(61)
        again = await node.dispatch(p, "put", _raw("s:1"), key="K")
        assert again.ok and again.replayed and again.result == 1
        clock.advance(3600)
        # Forgotten: other arguments are fine. The publish's own key still
        # finds the retained event, so nothing is appended twice (offset 1).
        fresh = await node.dispatch(p, "put", _raw("s:1", 9), key="K")
        assert fresh.ok and not fresh.replayed and fresh.result == 1
        replay = await node.dispatch(p, "put", _raw("s:1", 9), key="K")  # claimed over an expired record
        assert replay.ok and replay.replayed and replay.result == 1
        assert await _head(b, "s:1") == 1

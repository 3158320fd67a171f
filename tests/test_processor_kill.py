"""kill -9 a member of a consumer group mid-stream: at least once, and no more than that.

Two child processes (this file run as a script) each run a :class:`rtcore.Node`
with a group processor on a private redis-server. The handler logs every
call in an append-only ``calls`` table, works a little, then appends its
effect to an ``effects`` table that has NO key: a second run of the handler
for the same event leaves a second row, so duplicates stay visible. The test
publishes 300 events, kills one child with SIGKILL while it holds
unacknowledged events, reads which entries the group still had pending for
the dead member, and checks the delivery bound of docs/architecture.md:

* every event's handler ran and its effect exists (at least once);
* the survivor claimed and handled every entry the victim held unacked when
  it died (consumer-group claim after ``idle_timeout``), and at the end
  nothing is pending in the group;
* an event ran twice only if the victim held it unacked when it died (and had
  started it), never more than twice, and every other event ran exactly once.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

IDLE_TIMEOUT = 3.0  # seconds before the survivor claims what the dead child held
HANDLER_WORK = 0.01  # seconds between logging a call and writing its effect
EVENTS = 300
GROUP = "effects"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, node TEXT, stream TEXT, off INTEGER);
-- no key on purpose: every completed handler call leaves a row
CREATE TABLE IF NOT EXISTS effects (id INTEGER PRIMARY KEY, node TEXT, stream TEXT, off INTEGER);
"""


def _connect(db: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


async def child_main(url: str, db: str, node_id: str) -> None:
    """One group member: runs until killed."""
    import rtcore

    app = rtcore.App()
    conn = _connect(db)
    limiter = anyio.CapacityLimiter(1)

    def write(sql: str, args: tuple[object, ...]) -> None:
        conn.execute(sql, args)

    @app.on("kill:*", group=GROUP, idle_timeout=IDLE_TIMEOUT)
    async def effect(ctx: rtcore.Context, event: rtcore.Event) -> None:
        pos = (event.stream, event.offset)
        await anyio.to_thread.run_sync(
            write, "INSERT INTO calls (node, stream, off) VALUES (?, ?, ?)", (node_id, *pos), limiter=limiter
        )
        await anyio.sleep(HANDLER_WORK)
        await anyio.to_thread.run_sync(
            write,
            "INSERT INTO effects (node, stream, off) VALUES (?, ?, ?)",
            (node_id, *pos),
            limiter=limiter,
        )

    async with rtcore.Node(app, url, node_id=node_id, roles=frozenset({"processor"})):
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "child":
    anyio.run(child_main, sys.argv[2], sys.argv[3], sys.argv[4])
    raise SystemExit(0)

# --- the test (imported by pytest) ------------------------------------------------

import pytest  # noqa: E402
from anyio.abc import Process  # noqa: E402

from tests.redis_server import RedisServer, redis_server_binary, require_services  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the group members are subprocesses running asyncio; a trio run would repeat them"),
]


def _count(db: str, sql: str) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def _spawn(url: str, db: str, node_id: str) -> Process:
    proc = await anyio.open_process([sys.executable, __file__, "child", url, db, node_id], stderr=None)
    assert proc.stdout is not None
    with anyio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive(1)
    assert line.strip() == b"ready", line
    return proc


Position = tuple[str, int]


async def _pending(backend: object, consumer: str | None = None) -> dict[str, Position]:
    """Entries of the group still unacknowledged (for ``consumer``, or anyone): id -> (stream, offset)."""
    client = backend.client  # type: ignore[attr-defined]
    rows = await client.xpending("rt:all", GROUP, start="-", end="+", count=10_000, consumer=consumer)
    out: dict[str, Position] = {}
    for row in rows:
        (entry,) = await client.xrange("rt:all", row.identifier, row.identifier)
        fields = entry.field_values
        out[row.identifier.decode()] = (fields[b"s"].decode(), int(fields[b"o"]))
    return out


async def test_kill_9_a_group_member_mid_stream(tmp_path: Path) -> None:
    """Proves the group's delivery bound when a member dies holding events (see the module docstring).

    Mutations (each verified to fail):
      * processors.py ``_GroupMember._round`` never claims (``claimed = []``
        instead of ``groups.claim(...)``) → the victim's held events stay
        pending, no survivor effect: fails.
      * processors.py ``_handle`` acknowledges before calling the handler → the
        event the victim was running when it died is lost: fails ("events whose
        effect never happened").
      * processors.py ``_handle`` acknowledges only failures → entries stay
        pending and are handed out again: fails ("still unacknowledged").
    """
    if redis_server_binary() is None:
        if require_services():
            pytest.fail("redis-server is not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    from rtcore.backends.redis import open_redis

    db = str(tmp_path / "effects.db")
    conn = _connect(db)
    conn.executescript(_SCHEMA)
    conn.close()
    children: list[Process] = []
    with RedisServer(persistent=False) as server:
        try:
            victim = await _spawn(server.url, db, "victim")
            children.append(victim)
            children.append(await _spawn(server.url, db, "survivor"))
            backend = await open_redis(server.url)
            try:
                expected: set[Position] = set()
                held: dict[str, Position] = {}

                async def kill_mid_stream() -> None:
                    # Kill once the victim has done real work and the stream is still flowing.
                    with anyio.fail_after(60):
                        while _count(db, "SELECT COUNT(*) FROM calls WHERE node = 'victim'") < 20:
                            await anyio.sleep(0.005)
                    victim.send_signal(signal.SIGKILL)
                    await victim.wait()
                    # Read at once: nobody may claim these before IDLE_TIMEOUT has passed.
                    held.update(await _pending(backend, "victim"))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_mid_stream)
                    for i in range(EVENTS):
                        res = await backend.events.append(f"kill:{i % 5}", "job", {"i": i}, now=float(i))
                        expected.add((res.event.stream, res.event.offset))
                        await anyio.sleep(0.002)

                async def settled() -> bool:
                    done = {(s, o) for s, o in _rows(db, "SELECT stream, off FROM effects")}
                    return done >= expected and not await _pending(backend)

                # Bounded wait; the assertions below say what is missing if it runs out.
                with anyio.move_on_after(30):
                    while not await settled():
                        await anyio.sleep(0.05)
                # Let a wrong duplicate (a redelivery after idle_timeout) show up before counting.
                await anyio.sleep(IDLE_TIMEOUT)
                pending_at_end = await _pending(backend)
            finally:
                await backend.aclose()
        finally:
            for proc in children:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                await proc.aclose()

    calls = _rows(db, "SELECT node, stream, off FROM calls")
    effects = _rows(db, "SELECT node, stream, off FROM effects")
    held_positions = set(held.values())
    assert held_positions, "the victim held no unacknowledged events when it died"
    assert held_positions <= expected

    # At least once: every event's handler completed somewhere, and the group has nothing left.
    assert not expected - {(s, o) for _n, s, o in effects}, "events whose effect never happened"
    assert {(s, o) for _n, s, o in calls} == expected
    assert not pending_at_end, f"still unacknowledged at the end: {sorted(pending_at_end.values())[:10]}"

    # The claim: the survivor completed every event the dead member held.
    by_survivor = {(s, o) for n, s, o in effects if n == "survivor"}
    missing = held_positions - by_survivor
    assert not missing, f"held by the victim when it died, never handled by the survivor: {sorted(missing)}"

    # The bound: only the victim's held events ran twice, none more than twice.
    call_counts = Counter((s, o) for _n, s, o in calls)
    effect_counts = Counter((s, o) for _n, s, o in effects)
    assert max(call_counts.values()) <= 2 and max(effect_counts.values()) <= 2
    started_by_victim = {(s, o) for n, s, o in calls if n == "victim"}
    twice = {pos for pos, n in call_counts.items() if n == 2}
    assert twice == held_positions & started_by_victim, (
        f"run twice: {sorted(twice)}; held by the dead victim and started: "
        f"{sorted(held_positions & started_by_victim)}"
    )
    effects_twice = {pos for pos, n in effect_counts.items() if n == 2}
    assert effects_twice <= twice
    # Each member ran an event at most once (the handler never failed: no retries).
    assert max(Counter(calls).values()) == 1
    print(
        f"\nkill -9 test: {EVENTS} events, {len(calls)} handler calls, victim held {len(held)} "
        f"unacked ({len(held_positions & started_by_victim)} started), {len(twice)} ran twice, "
        f"{len(effects_twice)} effects twice"
    )


def _rows(db: str, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()

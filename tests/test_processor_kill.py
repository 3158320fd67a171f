"""kill -9 a member of a consumer group mid-stream; every event's effect still happens once.

Two child processes (this file run as a script) each run a :class:`rtcore.Node`
with a group processor on a private redis-server. The handler logs every
call in an append-only ``calls`` table, works a little, then writes its
effect with ``INSERT OR IGNORE`` keyed by ``(stream, offset)`` — the
idempotent-handler pattern the docs ask for. The test publishes 300 events,
kills one child with SIGKILL while it holds unacknowledged events, and
checks that the survivor claimed them: every effect exists exactly once.
Duplicate handler calls (at-least-once delivery) are counted and reported,
not forbidden.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
from pathlib import Path

import anyio

IDLE_TIMEOUT = 1.5  # seconds before the survivor claims what the dead child held
HANDLER_WORK = 0.01  # seconds between logging a call and writing its effect
EVENTS = 300
GROUP = "effects"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, node TEXT, stream TEXT, off INTEGER);
CREATE TABLE IF NOT EXISTS effects (stream TEXT, off INTEGER, node TEXT, PRIMARY KEY (stream, off));
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
            "INSERT OR IGNORE INTO effects (stream, off, node) VALUES (?, ?, ?)",
            (*pos, node_id),
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


async def _pending_of(backend: object, consumer: str) -> int:
    client = backend.client  # type: ignore[attr-defined]
    summary = await client.xpending("rt:all", GROUP)
    return int(dict(summary.consumers).get(consumer.encode(), 0))


async def test_kill_9_a_group_member_mid_stream(tmp_path: Path) -> None:
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
                expected: set[tuple[str, int]] = set()
                held_at_kill = -1

                async def kill_mid_stream() -> None:
                    nonlocal held_at_kill
                    # Kill once the victim has done real work and the stream is still flowing.
                    with anyio.fail_after(60):
                        while _count(db, "SELECT COUNT(*) FROM calls WHERE node = 'victim'") < 20:
                            await anyio.sleep(0.005)
                    victim.send_signal(signal.SIGKILL)
                    await victim.wait()
                    held_at_kill = await _pending_of(backend, "victim")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_mid_stream)
                    for i in range(EVENTS):
                        res = await backend.events.append(f"kill:{i % 5}", "job", {"i": i}, now=float(i))
                        expected.add((res.event.stream, res.event.offset))
                        await anyio.sleep(0.002)
                with anyio.fail_after(60):
                    while _count(db, "SELECT COUNT(*) FROM effects") < EVENTS:
                        await anyio.sleep(0.05)
            finally:
                await backend.aclose()
        finally:
            for proc in children:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                await proc.aclose()

    conn = sqlite3.connect(db)
    effects = conn.execute("SELECT stream, off FROM effects").fetchall()
    calls = conn.execute("SELECT node, stream, off FROM calls").fetchall()
    conn.close()
    assert held_at_kill > 0, "the victim held no unacknowledged events when it died"
    assert {(s, o) for s, o in effects} == expected  # every effect happened, once per (stream, offset)
    assert len(effects) == EVENTS
    called = [(s, o) for _n, s, o in calls]
    assert set(called) == expected
    duplicates = len(called) - len(set(called))
    by_node = {n: sum(1 for c in calls if c[0] == n) for n in ("victim", "survivor")}
    print(
        f"\nkill -9 test: {EVENTS} events, {len(called)} handler calls ({by_node}), "
        f"{duplicates} duplicate calls, victim held {held_at_kill} unacked events when killed"
    )

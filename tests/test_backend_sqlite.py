"""SQLite-specific guarantees the shared contract cannot express.

Durability across close/reopen and ``kill -9``, and a live feed that sees
appends made by another process on the same file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from rtcore.backends import Backend, Event, Outcome, Snapshot, open_backend
from rtcore.backends.sqlite import CURSOR_SWEEP_EVERY, open_sqlite

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
SRC = str(Path(__file__).resolve().parents[1] / "src")


class Collector(list[Event]):
    """A deliver callback that can be awaited until it holds ``n`` events."""

    def __init__(self) -> None:
        super().__init__()
        self._want = 0
        self._reached = anyio.Event()

    def append(self, event: Event) -> None:
        super().append(event)
        if self._want and len(self) >= self._want:
            self._reached.set()

    async def wait_for(self, n: int) -> None:
        self._want, self._reached = n, anyio.Event()
        if len(self) >= n:
            return
        await self._reached.wait()


def _url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute, so this is the four-slash form


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


async def test_open_backend_dispatches_sqlite_urls(tmp_path: Path) -> None:
    b = await open_backend(_url(tmp_path / "d" / "x.db"))
    try:
        assert (await b.events.append("s:1", "e", {}, now=T0)).event.offset == 1
    finally:
        await b.aclose()
    assert (tmp_path / "d" / "x.db").exists()
    with pytest.raises(ValueError):
        await open_sqlite("sqlite://")


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    url = _url(tmp_path / "rt.db")
    b = await open_sqlite(url)
    try:
        for i in range(5):
            await b.events.append("room:1", "moved", {"i": i}, now=T0 + i, key=f"k{i}")
        epoch = (await b.events.info("room:1")).epoch
        assert await b.idempotency.begin("p", "cmd1", b"fp", now=T0, lease=60) is None
        await b.idempotency.finish("p", "cmd1", Outcome(True, {"n": 1}), now=T0, ttl=3600)
        assert await b.idempotency.begin("p", "cmd2", b"fp2", now=T0, lease=60) is None
        await b.cursors.advance("alice", "room:1", epoch, 4, now=T0, ttl=3600)
        await b.snapshots.put(Snapshot("room:1", epoch, 5, b"\x80", "c5"))
        assert await b.leases.acquire("tick", "n1", now=T0, ttl=30)
    finally:
        await b.aclose()

    b = await open_sqlite(url)
    try:
        info = await b.events.info("room:1")
        assert (info.epoch, info.head, info.first) == (epoch, 5, 1)
        page = await b.events.read("room:1", after=0, limit=10)
        assert [(e.offset, e.data, e.key, e.ts) for e in page.events] == [
            (i + 1, {"i": i}, f"k{i}", T0 + i) for i in range(5)
        ]
        # the key index survived: a retried append is still a duplicate
        dup = await b.events.append("room:1", "moved", {"i": 2}, now=T0 + 9, key="k2")
        assert dup.duplicate and dup.event.offset == 3
        done = await b.idempotency.begin("p", "cmd1", b"fp", now=T0 + 1, lease=60)
        assert done is not None and done.state == "done" and done.outcome == Outcome(True, {"n": 1})
        pending = await b.idempotency.begin("p", "cmd2", b"fp2", now=T0 + 1, lease=60)
        assert pending is not None and pending.state == "pending" and pending.fingerprint == b"fp2"
        assert await b.cursors.get("alice", "room:1", now=T0 + 1) == (epoch, 4)
        snap = await b.snapshots.get("room:1")
        assert snap == Snapshot("room:1", epoch, 5, b"\x80", "c5")
        assert not await b.leases.acquire("tick", "n2", now=T0 + 1, ttl=30)
        nxt = await b.events.append("room:1", "moved", {"i": 5}, now=T0 + 10)
        assert (nxt.event.offset, nxt.event.epoch) == (6, epoch)
    finally:
        await b.aclose()


#: The ``cursors`` table as files made before cursors expired have it.
_OLD_CURSORS = """
CREATE TABLE cursors (
    principal TEXT NOT NULL,
    stream    TEXT NOT NULL,
    epoch     TEXT NOT NULL,
    off       INTEGER NOT NULL,
    PRIMARY KEY (principal, stream)
) WITHOUT ROWID;
INSERT INTO cursors VALUES ('alice', 'room:1', 'e1', 4);
"""


async def _sweep(b: Backend, *, now: float, ttl: float, tag: str) -> None:
    """Advance other cursors until the store's own sweep has run once (at ``now``)."""
    async with anyio.create_task_group() as tg:
        for i in range(CURSOR_SWEEP_EVERY):
            tg.start_soon(lambda i=i: b.cursors.advance(f"{tag}{i}", "room:2", "e1", 1, now=now, ttl=ttl))


async def test_cursors_of_an_older_file_are_kept_then_expire(tmp_path: Path) -> None:
    """Opening a file made before cursors expired adds ``cursors.expires``; its
    cursors stay readable, and the first sweep gives them one TTL.

    Mutations seen caught: drop the ``ALTER TABLE`` from ``_migrate`` → fails
    (no such column); ``get`` reads ``expires IS NULL`` as expired → fails
    (alice's cursor is lost at the upgrade); drop the sweep's ``UPDATE ...
    WHERE expires IS NULL`` → fails (alice is never forgotten).
    """
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(_OLD_CURSORS)
    for _ in range(2):  # the second open finds the file migrated already
        b = await open_sqlite(_url(path))
        try:
            assert await b.cursors.get("alice", "room:1", now=T0) == ("e1", 4)
        finally:
            await b.aclose()

    b = await open_sqlite(_url(path))
    try:
        await _sweep(b, now=T0, ttl=10, tag="a")
        assert await b.cursors.get("alice", "room:1", now=T0 + 9) == ("e1", 4)
        assert await b.cursors.get("alice", "room:1", now=T0 + 10) is None
        await _sweep(b, now=T0 + 20, ttl=10, tag="b")
        db: Any = b
        rows = await db._db.run(lambda conn: conn.execute("SELECT principal FROM cursors").fetchall())
        assert {principal[0] for (principal,) in rows} == {"b"}  # alice and the "a" cursors are gone
    finally:
        await b.aclose()


async def test_closed_backend_refuses_work(tmp_path: Path) -> None:
    from rtcore.errors import BackendError

    b = await open_sqlite(_url(tmp_path / "rt.db"))
    await b.aclose()
    await b.aclose()  # idempotent
    with pytest.raises(BackendError):
        await b.events.info("s:1")


_APPENDER = textwrap.dedent(
    """
    import sys
    import anyio
    from rtcore.backends.sqlite import open_sqlite

    async def main(url: str, stream: str, n: int, linger: bool) -> None:
        b = await open_sqlite(url)
        for i in range(n):
            res = await b.events.append(stream, "n", {"i": i, "src": "child"}, now=1.0 + i)
            print(res.event.offset, flush=True)  # printed == acknowledged
        if linger:
            await anyio.sleep_forever()
        await b.aclose()

    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "linger")
    """
)


async def test_live_feed_sees_appends_from_another_process(tmp_path: Path) -> None:
    url = _url(tmp_path / "rt.db")
    b = await open_sqlite(url)
    try:
        got = Collector()
        feed = b.events.live(got.append)
        feed.watch("s:1")
        async with anyio.create_task_group() as tg:
            await tg.start(_run_feed, feed)

            async def local() -> None:
                for i in range(50):
                    await b.events.append("s:1", "n", {"i": i, "src": "parent"}, now=T0)
                    await anyio.sleep(0.01)  # spread over the child's run so the two interleave

            tg.start_soon(local)
            await anyio.run_process(
                [sys.executable, "-c", _APPENDER, url, "s:1", "50", "exit"], env=_child_env(), check=True
            )
            await anyio.run_process(
                [sys.executable, "-c", _APPENDER, url, "other:1", "5", "exit"], env=_child_env(), check=True
            )
            with anyio.fail_after(30):
                await got.wait_for(100)
            await anyio.sleep(0.3)  # a few more polls: nothing may be delivered twice
            tg.cancel_scope.cancel()
        assert [e.offset for e in got] == list(range(1, 101))
        assert {e.stream for e in got} == {"s:1"}
        assert {e.data["src"] for e in got} == {"parent", "child"}
        history = await b.events.read("s:1", after=0, limit=1000)
        assert got == history.events
    finally:
        await b.aclose()


async def _run_feed(feed: object, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    from rtcore.backends import LiveFeed

    assert isinstance(feed, LiveFeed)
    task_status.started()
    await feed.run()


async def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    url = _url(tmp_path / "rt.db")
    printed: list[int] = []
    async with await anyio.open_process(
        [sys.executable, "-c", _APPENDER, url, "kill:1", "1000", "linger"], env=_child_env()
    ) as proc:
        assert proc.stdout is not None
        buf = b""
        with anyio.fail_after(120):
            async for chunk in proc.stdout:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                printed.extend(int(x) for x in lines)
                if len(printed) >= 300:
                    proc.send_signal(signal.SIGKILL)
                    break
            # lines the child printed before it died were acknowledged too
            async for chunk in proc.stdout:
                buf += chunk
            printed.extend(int(x) for x in buf.split(b"\n") if x)
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL

    assert printed == list(range(1, len(printed) + 1))
    b = await open_sqlite(url)
    try:
        info = await b.events.info("kill:1")
        assert info.head >= len(printed)
        page = await b.events.read("kill:1", after=0, limit=2000)
        assert [e.offset for e in page.events] == list(range(1, info.head + 1))
        assert [e.data for e in page.events] == [{"i": o - 1, "src": "child"} for o in range(1, info.head + 1)]
        assert {e.epoch for e in page.events} == {info.epoch}
        # the log is still writable after the crash
        assert (await b.events.append("kill:1", "n", {}, now=T0)).event.offset == info.head + 1
    finally:
        await b.aclose()


async def test_claim_of_a_key_with_a_row_follows_the_claim_rule(tmp_path: Path) -> None:
    """``begin`` claims a fresh key in one insert, and judges a key that has a row.

    Mutation caught: treating the first insert as a claim whatever it did
    (``rowcount >= 0``): a finished key would be claimed again (its outcome
    not replayed) and a live claim taken over.
    """
    b = await open_sqlite(_url(tmp_path / "claim.db"))
    try:
        idem = b.idempotency
        assert await idem.begin("p", "k", b"fp", now=T0, lease=30) is None
        live = await idem.begin("p", "k", b"fp", now=T0 + 1, lease=30)
        assert live is not None and live.state == "pending"
        await idem.finish("p", "k", Outcome(True, 7), now=T0 + 2, ttl=100, fingerprint=b"fp")
        done = await idem.begin("p", "k", b"fp", now=T0 + 3, lease=30)
        assert done is not None and done.state == "done" and done.outcome == Outcome(True, 7)
        # Expired: claimable again, also by another fingerprint.
        assert await idem.begin("p", "k", b"other", now=T0 + 200, lease=30) is None
    finally:
        await b.aclose()

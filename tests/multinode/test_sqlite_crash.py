"""``kill -9`` of a server on SQLite in the middle of 1,000 acknowledged commands."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from .procs import TIMEOUT, Commander, ServerProcess, history, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the nodes are subprocesses running asyncio; a trio run would repeat the same servers"),
]

N = 1000
WORKERS = 8  # commands in flight at once (half WebSocket, half HTTP)
STREAM = "orders:1"


async def test_sqlite_kill_9_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    """Proves: on ``sqlite:///...`` (WAL, ``synchronous=FULL``), a server killed
    with SIGKILL while 8 clients have keyed ``put`` commands in flight keeps
    every acknowledged event: after a restart on the same file the stream is
    dense from offset 1, each acknowledged command's event is at the offset its
    ``ok`` reported, and the only events without an ``ok`` belong to commands
    that were in flight at the kill. Retrying those (and every other command)
    with the same idempotency keys adds each event at most once: the final
    stream holds exactly the 1,000 commands, once each."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    # python -c + rtcore.run: a short idempotency lease, so a command the dead
    # process left "pending" can be retried after 1 s instead of 60 s.
    options = {"idempotency_lease": 1.0}
    first = ServerProcess(url, tmp_path, "first", cli=False, run_options=options)
    second = ServerProcess(url, tmp_path, "second", cli=False, run_options=options)
    try:
        await first.start()
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            commanders = [
                Commander([first], "ws" if w % 2 == 0 else "http", http, prefix=f"w{w}") for w in range(WORKERS)
            ]
            shares = [list(range(w, N, WORKERS)) for w in range(WORKERS)]
            unanswered: set[int] = set()
            unsent: set[int] = set()

            async def work(c: Commander, items: list[int]) -> None:
                for k, i in enumerate(items):
                    if not first.alive:
                        unsent.update(items[k:])
                        return
                    if await c.try_put(STREAM, i) is None:
                        unanswered.add(i)
                        unsent.update(items[k + 1 :])
                        return

            async def kill_midway() -> None:
                await wait_until(lambda: sum(len(c.acked) for c in commanders) >= N * 2 // 5, what="traffic")
                first.kill()

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_midway)
                for c, items in zip(commanders, shares, strict=True):
                    tg.start_soon(work, c, items)
            for c in commanders:
                await c.aclose()
            acked_at_kill = {i: off for c in commanders for i, off in c.acked.items()}
            assert not first.alive and unanswered, "the kill did not hit commands in flight"

            # Restart on the same file: what is there before any retry.
            await second.start()
            commanders_after = [Commander([second], c.transport, http, prefix=c.prefix) for c in commanders]
            _, head, events = await history(http, second, STREAM)
            by_offset = {e["offset"]: e["data"]["i"] for e in events}
            assert [e["offset"] for e in events] == list(range(1, head + 1)), "offsets are not dense"
            assert all(by_offset[off] == i for i, off in acked_at_kill.items()), "an acknowledged event is missing or wrong"
            extra = set(by_offset.values()) - set(acked_at_kill)
            assert extra <= unanswered, "an event exists for a command that was never sent"
            assert len(by_offset) == len(set(by_offset.values())), "a command appended twice"

            # Retry the unanswered commands with their keys, then send the rest,
            # and resend a few acknowledged ones: replays, no new events.
            async def finish(c: Commander, items: list[int]) -> None:
                for i in items:
                    if i in unanswered or i in unsent or i % 97 == 0:
                        await c.put(STREAM, i, deadline=30.0)

            async with anyio.create_task_group() as tg:
                for c, items in zip(commanders_after, shares, strict=True):
                    tg.start_soon(finish, c, items)
            for c in commanders_after:
                await c.aclose()
            _, head, events = await history(http, second, STREAM)
    finally:
        first.kill()
        second.kill()

    final = [e["data"]["i"] for e in events]
    assert head == N and [e["offset"] for e in events] == list(range(1, N + 1))
    assert sorted(final) == list(range(N)), "a command is missing or appended twice"
    acked_after = {i: off for c in commanders_after for i, off in c.acked.items()}
    for i, off in {**acked_at_kill, **acked_after}.items():
        assert final[off - 1] == i
    # A resent acknowledged command was replayed: same offset as its first ok.
    assert all(acked_after[i] == acked_at_kill[i] for i in acked_after if i in acked_at_kill)
    executed = len(extra)
    print(
        f"\nsqlite kill -9: {len(acked_at_kill)} acked before the kill, {len(unanswered)} in flight "
        f"({executed} of them had already appended), {len(unsent)} not yet sent"
    )

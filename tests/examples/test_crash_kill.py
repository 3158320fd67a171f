"""The crash example under ``kill -9``: `rtcore serve` on sqlite://, bots betting, SIGKILL mid-round.

After the restart, the room's new owner cancels the interrupted round:
every hold of it ends voided (or captured, for rounds that had settled
before), the bots' books still match the wallet, and `rtcore wallet
reconcile` is clean.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import rtcore.client
from rtcore.wallet import Hold, open_wallet_store

from .helpers import ROOT, load_example

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    # The server is a subprocess (the same whatever loop the test runs on) and the
    # bots' client code runs on trio in test_crash.py; once is enough for ~30 s.
    pytest.mark.asyncio_only(reason="a 30 s run against a subprocess server; the bot client is covered on trio elsewhere"),
]

os.environ.setdefault("CRASH_SECRET", "tests-secret")
crash_bot = load_example("crash", "bot")

_READY = re.compile(rb"serving 'crash' on http://127\.0\.0\.1:(\d+)")


async def _start(env: dict[str, str], events: str, port: int, log: Path) -> tuple[anyio.abc.Process, int]:
    cmd = [sys.executable, "-m", "rtcore.cli", "serve", "examples/crash/app.py:app", "--backend", events,
           "--port", str(port), "--idempotency-lease", "2", "--grace", "1"]
    proc = await anyio.open_process(cmd, cwd=ROOT, env=env, stdout=None)
    assert proc.stderr is not None
    seen = b""
    with anyio.fail_after(30):
        while (m := _READY.search(seen)) is None:
            chunk = await proc.stderr.receive(4096)
            seen += chunk
    with log.open("ab") as f:
        f.write(seen)

    async def drain() -> None:  # keep reading stderr so the server never blocks on a full pipe
        assert proc.stderr is not None
        try:
            async for chunk in proc.stderr:
                with log.open("ab") as f:
                    f.write(chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    _start.drains.append(drain)  # type: ignore[attr-defined]
    return proc, int(m.group(1))


_start.drains = []  # type: ignore[attr-defined]


async def _holds(wallet_url: str) -> list[Hold]:
    store = await open_wallet_store(wallet_url)
    try:
        ids = {e.transfer_id for e in await store.entries(0, limit=1_000_000)}
        holds = [await store.get_transfer(i) for i in sorted(ids)]
        return [h for h in holds if isinstance(h, Hold)]
    finally:
        await store.aclose()


async def test_kill_9_mid_round_then_every_hold_resolved_and_reconcile_clean(tmp_path: Path) -> None:
    """SIGKILL `rtcore serve` while bets ride in a running round; restart; check the money.

    Mutation: skip ``_cancel`` in ``CrashRoom._ensure`` → the interrupted
    round's holds stay pending after the restart → fails. Mutation: make
    ``_cancel`` capture instead of void → the bots' books (refunded) disagree
    with the wallet → fails.
    """
    wallet_url = f"sqlite:///{tmp_path / 'wallet.db'}"
    events = f"sqlite:///{tmp_path / 'events.db'}"
    log = tmp_path / "server.log"
    env = {**os.environ, "CRASH_WALLET": wallet_url, "CRASH_SECRET": "kill-test", "CRASH_BET_SECONDS": "1.5",
           "CRASH_PAUSE": "0.5", "CRASH_SPEED": "0.4", "PYTHONUNBUFFERED": "1"}
    proc, port = await _start(env, events, 0, log)
    url = f"ws://127.0.0.1:{port}/v1/ws"
    killed_round: dict[str, Any] = {}
    results: list[Any] = []
    try:
        async with anyio.create_task_group() as tg:
            for drain in _start.drains:  # type: ignore[attr-defined]
                tg.start_soon(drain)
            _start.drains.clear()  # type: ignore[attr-defined]

            bots_done = anyio.Event()

            async def bots() -> None:
                results.extend(await crash_bot.run_bots(url, 4, 6, seed=11, patience=90.0))
                bots_done.set()

            tg.start_soon(bots)
            async with rtcore.client.connect(url, token="watcher") as watcher:
                room = await watcher.join_or_create("crash")
                # Mid-round: the multiplier is rising and bets ride on it.
                s = await room.wait_for(
                    lambda s: s["round"] >= 2 and s["status"] == "running" and s["multiplier"] >= 105
                    and sum(1 for b in s["bets"].values() if not b["cashout"]) >= 2,
                    timeout=90,
                )
                killed_round.update(round=s["round"], room=room.info["id"], bets=dict(s["bets"]))
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                proc, _ = await _start(env, events, port, log)
                tg.start_soon(_start.drains.pop())  # type: ignore[attr-defined]
                r = killed_round["round"]
                s = await room.wait_for(lambda s: s["round"] > r or (s["round"] == r and s["settled"]), timeout=90)
                # Right after the recovery: no hold of the interrupted round (or any before) is pending.
                rid = killed_round["room"]
                holds = await _holds(wallet_url)
                mine = [h for h in holds if h.id.startswith(f"crash:{rid}:{r}:")]
                assert mine, "no bet rode in the killed round"
                early = [h for h in holds if int(h.id.split(":")[2]) <= r]
                assert [h.id for h in early if h.status == "pending"] == []
                assert all(h.status == "voided" for h in mine), [(h.id, h.status) for h in mine]
                await room.leave()
            with anyio.fail_after(120):
                await bots_done.wait()
            tg.cancel_scope.cancel()  # the stderr drains
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert len(results) == 4
    for res in results:
        assert res.problems == [], (res, log.read_text()[-3000:])
        assert res.rounds == 6
    assert sum(res.refunded for res in results) >= 1  # the killed round's bets came back
    assert [h.id for h in await _holds(wallet_url) if h.status == "pending"] == []
    cli = await anyio.run_process(
        [sys.executable, "-m", "rtcore.cli", "wallet", "reconcile", "--store", wallet_url, "--events", events], check=False
    )
    assert cli.returncode == 0, cli.stdout.decode() + cli.stderr.decode()

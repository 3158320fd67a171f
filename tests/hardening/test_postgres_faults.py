"""PostgreSQL paused (SIGSTOP of every process of the cluster) and then
restarted, under wallet load over real HTTP and WebSocket.

The cluster is the test's own (``tests/pg_server.py``: initdb in a temp dir,
a free port), never the machine's shared one. 10 clients make 40 transfers
each (10 % sent twice with one key, 6 % with a key reused for an unseen
transfer id). After some transfers are accepted, PostgreSQL is paused for
``RTCORE_PG_PAUSE`` seconds (10 by default), resumed, and later restarted
(fast shutdown, start again). Proves:

* requests made while it is paused are answered with a retryable error
  (``backend_unavailable``) within the store's timeout (3 s here), not left
  hanging: the clients see retryable answers;
* nothing acknowledged is lost and nothing is applied twice: the ledger holds
  exactly the accepted transfers, each once; balances and the balance
  streams reconcile;
* it recovers by itself: the same server process finishes the load.

Mutation seen caught: remove the ``anyio.fail_after`` bound in
``PostgresWalletStore._tx`` → requests hang through the pause, past the
3 s idempotency lease; their retries run again beside them and a key gets
two different answers (``stats.mismatched``) → fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from rtcore.server.runner import Server
from tests.pg_server import PostgresServer, postgres_binaries
from tests.redis_server import require_services
from tests.wallet.netload import ADMIN_TOKEN, HttpConn, Plan, Stats, build_app, create_accounts, fund_accounts, run_load
from tests.wallet.test_network import OPENING, check_ledger

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the PostgreSQL wallet store runs on asyncio only (psycopg's async API)"),
]

PAUSE = float(os.environ.get("RTCORE_PG_PAUSE", "10"))


async def test_postgres_paused_then_restarted_under_wallet_load(tmp_path: Path) -> None:
    if postgres_binaries() is None:
        if require_services():
            pytest.fail("PostgreSQL server binaries are not installed and RTCORE_REQUIRE_SERVICES=1")
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    from rtcore.wallet.postgres_store import PostgresWalletStore

    plan = Plan(clients=10, per_client=40)
    pg = PostgresServer()
    await anyio.to_thread.run_sync(pg.start)
    try:
        store = await PostgresWalletStore.open(pg.url, pool_size=8, operation_timeout=3.0)
        try:
            await create_accounts(store, plan.accounts)
            server = Server(build_app(store), port=0, backend=f"sqlite:///{tmp_path / 'events.db'}", idempotency_lease=3.0)
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve)
                stats = Stats()
                admin = HttpConn(f"http://127.0.0.1:{port}", ADMIN_TOKEN, 1)
                opening = await fund_accounts(admin, plan, OPENING, stats)
                await admin.aclose()
                during: dict[str, int] = {}

                async def faults() -> None:
                    with anyio.fail_after(120):
                        while len(stats.accepted) < 30:
                            await anyio.sleep(0.05)
                    before = stats.retried_retryable
                    pg.pause()
                    try:
                        await anyio.sleep(PAUSE)
                    finally:
                        pg.resume()
                    during["pause"] = stats.retried_retryable - before
                    with anyio.fail_after(120):
                        accepted = len(stats.accepted)
                        while len(stats.accepted) < accepted + 30:
                            await anyio.sleep(0.05)
                    before = stats.retried_retryable
                    await anyio.to_thread.run_sync(pg.restart)
                    during["restart"] = stats.retried_retryable - before

                async with anyio.create_task_group() as load:
                    load.start_soon(faults)
                    await run_load(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws", plan, stats)
                total = plan.clients * plan.per_client
                assert stats.mismatched == []
                assert len(stats.accepted) + len(stats.refused) == total
                assert during["pause"] > 0, "no retryable answer while PostgreSQL was paused: requests hung"
                assert server.node is not None
                await check_ledger(store, opening, stats, server.node.backend.events)
                print(
                    f"\npostgres paused {PAUSE:.0f} s and restarted under load: {len(stats.accepted)} accepted, "
                    f"{len(stats.refused)} refused, retryable answers retried {stats.retried_retryable} "
                    f"(during the pause {during['pause']}, after the restart {during['restart']}), "
                    f"unanswered (client timeouts) {stats.unanswered}"
                )
                await server.stop()
        finally:
            await store.aclose()
    finally:
        await anyio.to_thread.run_sync(pg.stop)

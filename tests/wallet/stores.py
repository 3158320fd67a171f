"""Wallet store factories shared by the contract, stateful and concurrency tests.

Every test gets a fresh store: a new SQLite file in the test's temp dir, or a
new PostgreSQL schema ``wallet_test_<random>`` that is dropped afterwards, so
tests never see each other's rows (and can run while other suites use the
same database).

PostgreSQL is found at ``$RTCORE_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``). When it is unreachable the
postgres cases are skipped with the reason, unless ``RTCORE_REQUIRE_SERVICES=1``,
which turns the skip into a failure (CI sets it so a missing service cannot
pass silently).
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from rtcore.wallet import WalletStore

PG_URL = os.environ.get("RTCORE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
STORE_KINDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.asyncio_only(reason="psycopg's async connections run on asyncio only"),
        ],
    ),
]


@functools.cache
def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used for tests, or ``None`` when it can."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the test extra installs it
        return "psycopg is not installed"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        # One line: pytest -rs prints the reason as given, and psycopg's spans several.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {PG_URL} is not reachable: {first}"
    return None


def require_store(kind: str) -> None:
    """Skip (or, with RTCORE_REQUIRE_SERVICES=1, fail) when ``kind`` cannot run here."""
    if kind != "postgres":
        return
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("RTCORE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"RTCORE_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@asynccontextmanager
async def fresh_store(kind: str, tmp_dir: Path) -> AsyncIterator[WalletStore]:
    """Open an empty store of ``kind`` and remove it afterwards."""
    if kind == "sqlite":
        from rtcore.wallet.sqlite_store import SqliteWalletStore

        store: WalletStore = await SqliteWalletStore.open(f"sqlite:///{tmp_dir / f'wallet-{uuid.uuid4().hex}.db'}")
        try:
            yield store
        finally:
            await store.aclose()
        return

    import psycopg
    from psycopg import sql

    from rtcore.wallet.postgres_store import PostgresWalletStore

    schema = f"wallet_test_{uuid.uuid4().hex[:16]}"
    # synchronous_commit=off only skips the WAL flush wait at commit (these
    # tests never crash the server), which makes the suite several times
    # faster; isolation and locking are exactly as in production.
    store = await PostgresWalletStore.open(PG_URL, schema=schema, pool_size=8, settings={"synchronous_commit": "off"})
    try:
        yield store
    finally:
        await store.aclose()
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@asynccontextmanager
async def fresh_store_url(kind: str, tmp_dir: Path) -> AsyncIterator[str]:
    """A URL naming an empty store of ``kind`` (for a server process to open); removed afterwards.

    SQLite: a new file in ``tmp_dir``. PostgreSQL: a new schema at
    ``PG_URL``, with the server's default settings (durable commits), dropped
    afterwards.
    """
    if kind == "sqlite":
        yield f"sqlite:///{tmp_dir / f'wallet-{uuid.uuid4().hex}.db'}"
        return

    import psycopg
    from psycopg import sql

    schema = f"wallet_test_{uuid.uuid4().hex[:16]}"
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    finally:
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

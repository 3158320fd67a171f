"""Extra engines for the contract suite: sqlite (temp file per test) and redis.

Self-contained on purpose: ``conftest.py`` imports this module while it is
still initialising, so nothing here may import from it. The Redis server is
started lazily by the first test that needs it (one per test session, killed
at interpreter exit) and flushed before every test, so each test sees an
empty database without paying for a server start.
"""

from __future__ import annotations

import atexit
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from rtcore.backends import Backend
from rtcore.backends.sqlite import open_sqlite
from tests.redis_server import RedisServer, redis_server_binary, require_services

# Same shape as conftest.Factory (see the module docstring for why it is repeated).
Factory = Callable[[], AbstractAsyncContextManager[Backend]]


@asynccontextmanager
async def sqlite_backend() -> AsyncIterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="rtcore-sqlite-") as tmp:
        backend = await open_sqlite(f"sqlite:///{Path(tmp) / 'rt.db'}")
        try:
            yield backend
        finally:
            await backend.aclose()


_server: RedisServer | None = None


def shared_redis_server() -> RedisServer:
    """The session's redis-server (started on first use); skips or fails when redis-server is missing."""
    global _server
    if _server is None:
        if redis_server_binary() is None:
            reason = "redis-server is not installed"
            if require_services():
                pytest.fail(f"{reason} and RTCORE_REQUIRE_SERVICES=1")
            pytest.skip(reason)
        server = RedisServer(persistent=False).start()
        atexit.register(server.stop)
        _server = server
    _server.start()  # no-op while it runs; brings it back if a test killed it
    return _server


@asynccontextmanager
async def redis_backend() -> AsyncIterator[Backend]:
    from rtcore.backends.redis import open_redis

    server = shared_redis_server()
    server.flushall()
    backend = await open_redis(server.url)
    try:
        yield backend
    finally:
        await backend.aclose()


EXTRA_FACTORIES: dict[str, Factory] = {"sqlite": sqlite_backend, "redis": redis_backend}

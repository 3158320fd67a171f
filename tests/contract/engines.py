"""Extra engines for the contract suite: sqlite (temp file per test) and redis."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from rtcore.backends import Backend
from rtcore.backends.sqlite import open_sqlite

# Same shape as conftest.Factory; not imported from there because conftest
# imports this module while it is still initialising.
Factory = Callable[[], AbstractAsyncContextManager[Backend]]


@asynccontextmanager
async def sqlite_backend() -> AsyncIterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="rtcore-sqlite-") as tmp:
        backend = await open_sqlite(f"sqlite:///{Path(tmp) / 'rt.db'}")
        try:
            yield backend
        finally:
            await backend.aclose()


EXTRA_FACTORIES: dict[str, Factory] = {"sqlite": sqlite_backend}

"""Backends the contract suite runs against.

Each backend registers a factory in :data:`BACKEND_FACTORIES`: an async
context manager that yields a fresh, empty :class:`rtcore.backends.Backend`.
The tests in this package take the ``backend`` fixture and never know which
engine they run on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from rtcore.backends import Backend, MemoryBackend

Factory = Callable[[], AbstractAsyncContextManager[Backend]]


@asynccontextmanager
async def memory_backend() -> AsyncIterator[Backend]:
    backend = MemoryBackend()
    try:
        yield backend
    finally:
        await backend.aclose()


BACKEND_FACTORIES: dict[str, Factory] = {"memory": memory_backend}

try:  # later backends add themselves without touching the tests
    from tests.contract.engines import EXTRA_FACTORIES
except ImportError:  # pragma: no cover - until an engine module exists
    EXTRA_FACTORIES = {}
BACKEND_FACTORIES.update(EXTRA_FACTORIES)


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def backend_factory(request: pytest.FixtureRequest) -> Factory:
    return BACKEND_FACTORIES[request.param]

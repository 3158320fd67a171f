from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

#: Every ``@pytest.mark.anyio`` test runs once per backend: rtcore is written on
#: anyio and must behave the same on asyncio and on trio.
ANYIO_BACKENDS = ("asyncio", "trio")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "asyncio_only(reason): run only on the asyncio backend; the reason (required) says why trio cannot run it",
    )


@pytest.fixture(scope="module", params=ANYIO_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the trio run of tests marked ``asyncio_only`` and of tests under uvicorn (listed as deselected).

    The marker must carry a ``reason`` so the asyncio-only list stays short and justified.
    """
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("server_kind") == "uvicorn" and callspec.params.get("anyio_backend") == "trio":
            dropped.append(item)  # uvicorn runs on asyncio only (tests/net/test_asgi.py)
            continue
        marker = item.get_closest_marker("asyncio_only")
        if marker is None:
            keep.append(item)
            continue
        if not (marker.kwargs.get("reason") or marker.args):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.asyncio_only needs a reason")
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("anyio_backend") == "trio":
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep

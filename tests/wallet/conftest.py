"""Fixtures of the wallet tests: ``store_kind`` and a fresh ``store`` (see :mod:`tests.wallet.stores`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rtcore.wallet import WalletStore
from tests.wallet.stores import STORE_KINDS, fresh_store, require_store


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    require_store(kind)
    return kind


@pytest.fixture
async def store(store_kind: str, tmp_path: Path, anyio_backend: str) -> AsyncIterator[WalletStore]:
    async with fresh_store(store_kind, tmp_path) as opened:
        yield opened

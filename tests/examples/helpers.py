"""Shared helpers of the example tests: load an example module, run a server on a free port."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio

import rtcore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load_example(name: str, module: str = "app") -> ModuleType:
    """Import ``examples/<name>/<module>.py`` under a unique module name (once)."""
    mod_name = f"example_{name}_{module}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    if str(EXAMPLES / name) not in sys.path:
        sys.path.insert(0, str(EXAMPLES / name))  # its neighbours, as `rtcore serve` makes them importable
    spec = importlib.util.spec_from_file_location(mod_name, EXAMPLES / name / f"{module}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # so the room's annotations resolve
    spec.loader.exec_module(mod)
    return mod


@asynccontextmanager
async def serving(app: rtcore.App, **options: Any) -> AsyncIterator[rtcore.Server]:
    """Run a :class:`rtcore.Server` for ``app`` on a free port for the block."""
    server = rtcore.Server(app, port=0, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            with anyio.fail_after(30):
                await server.stop(grace=2.0)


def ws_url(server: rtcore.Server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ws"

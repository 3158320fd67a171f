"""The sans-IO core never imports an event loop, a socket or a clock.

Two independent checks per module:

* static: its source, parsed with :mod:`ast`, has no ``import`` / ``from ...
  import`` of a forbidden module and never calls a clock (``time.time()``,
  ``datetime.now()``, ...);
* dynamic: importing it in a fresh interpreter pulls in no forbidden module,
  compared with a baseline interpreter that imports only msgspec (which may
  load some of the stdlib itself).

Plus the curated public API of the ``rtcore`` package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rtcore

PACKAGE_DIR = Path(rtcore.__file__).resolve().parent

SANS_IO_MODULES = [
    "rtcore.protocol.types",
    "rtcore.protocol.frames",
    "rtcore.protocol.codec",
    "rtcore.errors",
    "rtcore.protocol.session",
    "rtcore.protocol.streams",
    "rtcore.protocol.state",
    "rtcore.protocol.idempotency",
    "rtcore.protocol.client",
    "rtcore.protocol.backoff",
    "rtcore.protocol.patch",
    "rtcore.protocol.deadlines",
    "rtcore.wallet.ledger",
]

FORBIDDEN = frozenset(
    {"anyio", "asyncio", "trio", "socket", "selectors", "ssl", "threading", "time", "datetime", "_thread"}
)
#: Calls that read a clock: ``<anything>.<attr>()``.
CLOCK_ATTRS = frozenset(
    {
        "time",
        "time_ns",
        "monotonic",
        "monotonic_ns",
        "perf_counter",
        "perf_counter_ns",
        "process_time",
        "now",
        "utcnow",
        "today",
        "current_time",
    }
)


def module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    return PACKAGE_DIR.joinpath(*parts[:-1], parts[-1] + ".py")


def violations(source: str) -> list[str]:
    """Every forbidden import or clock call in ``source`` (as readable strings)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] in FORBIDDEN:
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in CLOCK_ATTRS:
                found.append(f"line {node.lineno}: call {ast.unparse(func)}()")
            elif isinstance(func, ast.Name) and func.id in CLOCK_ATTRS | {"__import__"}:
                found.append(f"line {node.lineno}: call {func.id}()")
            elif isinstance(func, ast.Attribute) and func.attr == "import_module":
                found.append(f"line {node.lineno}: dynamic import {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import anyio.abc",
        "import os, socket",
        "from asyncio import sleep",
        "from datetime import datetime",
        "import threading as th",
        "def f():\n    import ssl",
        "x = time.monotonic()",
        "x = datetime.now()",
        "x = dt.datetime.utcnow()",
        "x = loop.time()",
        "from time import monotonic\nx = monotonic()",
        "m = __import__('selectors')",
        "import importlib\nm = importlib.import_module('trio')",
    ],
)
def test_checker_catches_violations(source: str) -> None:
    assert violations(source)


def test_checker_accepts_clean_code() -> None:
    source = textwrap.dedent(
        """
        from __future__ import annotations
        import hashlib, re
        from .frames import Ping
        def tick(self, now: float) -> float:
            return now + self.timeout
        """
    )
    assert violations(source) == []


@pytest.mark.parametrize("name", SANS_IO_MODULES)
def test_source_has_no_io_imports_or_clock_calls(name: str) -> None:
    path = module_path(name)
    assert path.exists(), path
    assert violations(path.read_text(encoding="utf-8")) == []


# --- dynamic check ------------------------------------------------------------

_BASELINE = "import sys, json, msgspec; print(json.dumps(sorted(sys.modules)))"

# The real packages, in a fresh interpreter: ``import rtcore.protocol.frames``
# runs ``rtcore/__init__.py`` and ``rtcore/protocol/__init__.py`` too, exactly
# as an application would. Their public names load lazily, so a sans-IO module
# pulls in nothing but itself and what *it* imports.
_PROBE = """
import importlib, json, sys
import msgspec
importlib.import_module({name!r})
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


@pytest.fixture(scope="module")
def baseline_modules() -> set[str]:
    return _modules_after(_BASELINE)


@pytest.mark.parametrize("name", SANS_IO_MODULES)
def test_import_pulls_in_no_io_module(name: str, baseline_modules: set[str]) -> None:
    """Mutation: make ``rtcore/__init__.py`` import ``.engine.node`` eagerly (or add
    ``import anyio`` to any sans-IO module) and this fails."""
    loaded = _modules_after(_PROBE.format(name=name))
    assert name in loaded
    new = loaded - baseline_modules
    bad = sorted(m for m in new if m.split(".")[0] in FORBIDDEN)
    assert bad == [], f"importing {name} loads {bad}"
    assert "rtcore.engine.node" not in loaded
    assert "rtcore.backends" not in loaded


def test_probe_detects_an_io_import(baseline_modules: set[str]) -> None:
    # rtcore.backends.memory imports anyio: the same probe must notice it.
    loaded = _modules_after(_PROBE.format(name="rtcore.backends.memory"))
    assert "anyio" in loaded - baseline_modules


# --- public API ----------------------------------------------------------------

EXPORTED = {
    "App",
    "AuthError",
    "Backend",
    "BackendError",
    "BadFrame",
    "BadRequest",
    "ConflictError",
    "ConnectionClosed",
    "Context",
    "Event",
    "IdempotencyError",
    "LimitExceeded",
    "Limits",
    "Node",
    "Position",
    "Principal",
    "ProtocolError",
    "Rejected",
    "Reply",
    "Retention",
    "Router",
    "RtcoreError",
    "Server",
    "Unavailable",
    "__version__",
    "open_backend",
    "run",
}


def test_all_is_the_curated_list() -> None:
    assert set(rtcore.__all__) == EXPORTED
    assert len(rtcore.__all__) == len(set(rtcore.__all__)), "duplicates in __all__"


def test_every_exported_name_exists() -> None:
    for name in rtcore.__all__:
        assert hasattr(rtcore, name), name


def test_exported_members_live_in_rtcore() -> None:
    # Like httpx's test_exported_members: what we export is ours, not a re-export of a dependency.
    for name in rtcore.__all__:
        member = getattr(rtcore, name)
        module = getattr(member, "__module__", None)
        if module is not None and name != "__version__":
            assert module.startswith("rtcore"), (name, module)


@pytest.mark.parametrize("name", SANS_IO_MODULES)
def test_module_all_names_exist(name: str) -> None:
    module = __import__(name, fromlist=["__all__"])
    for member in getattr(module, "__all__", []):
        assert hasattr(module, member), f"{name}.__all__ names missing {member}"

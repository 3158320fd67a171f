"""The package layout is the architecture: every import points down, no circles.

Layers, bottom to top (a module may import its own package and any lower
layer, never a higher one or a peer on the same layer):

====  ==================================  =========================================
 0    ``rtcore.errors``, ``rtcore.logs``   the error tree; logger names, log formats
 1    ``rtcore.protocol``                  sans-IO wire protocol and rules
 2    ``rtcore.backends``, ``transport``   storage engines; HTTP/WebSocket on anyio
 3    ``rtcore.engine``                    app declarations, node, hub, processors
 4    ``rtcore.server``, ``rtcore.auth``   session driver, routes, SSE, runner; JWT hook
 5    ``rtcore.client``, ``wallet``        plugins and clients on the public layers
 6    ``rtcore.testing``                   in-process helpers
 7    ``rtcore``                           the public API (lazy re-exports, ``rtcore.asgi``)
 8    ``rtcore.cli``                       the command line
====  ==================================  =========================================

Imports under ``if TYPE_CHECKING:`` count for the layering (a type is a
dependency too) but not for the cycle check, which looks at what Python runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rtcore

PACKAGE_DIR = Path(rtcore.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "rtcore.errors": 0,
    "rtcore.logs": 0,
    "rtcore.protocol": 1,
    "rtcore.backends": 2,
    "rtcore.transport": 2,
    "rtcore.engine": 3,
    "rtcore.server": 4,
    "rtcore.auth": 4,
    "rtcore.client": 5,
    "rtcore.wallet": 5,
    "rtcore.rooms": 5,
    "rtcore.testing": 6,
    "rtcore.cli": 8,
    "rtcore": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer unit a module belongs to (the longest prefix in LAYERS)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in LAYERS:
            return head
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported rtcore module, under TYPE_CHECKING) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    typing_only.add(id(sub))
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in typing_only) for a in node.names if a.name.split(".")[0] == "rtcore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "rtcore":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                sub = PACKAGE_DIR.parent.joinpath(*candidate.split("."))
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                found.append((candidate if is_module else target, id(node) in typing_only))
    return found


SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in SOURCES}


def downward_violations(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        mine = unit_of(module)
        for target, _typing in imports:
            theirs = unit_of(target)
            if mine == theirs or (mine == "rtcore" and module == "rtcore"):
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{module} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
    return bad


def cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[list[str]]:
    edges = {m: sorted({t for t, typing in imps if not typing and t in graph and t != m}) for m, imps in graph.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            # A package's __init__ importing its own submodules is not a circle.
            if m == t.rsplit(".", 1)[0]:
                continue
            if state.get(t) == 1:
                found.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_every_import_points_down() -> None:
    """Mutation: add ``from ..engine.node import Node`` to ``protocol/session.py``
    (or ``from ..server import gateway`` to ``engine/node.py``) and this fails."""
    assert downward_violations(GRAPH) == []


def test_no_import_cycles() -> None:
    """Mutation: import ``.node`` at module level in ``engine/metrics.py`` and this fails."""
    assert cycles(GRAPH) == []


@pytest.mark.parametrize(
    ("graph", "expect_layer_error", "expect_cycle"),
    [
        ({"rtcore.protocol.session": [("rtcore.engine.node", False)], "rtcore.engine.node": []}, True, False),
        ({"rtcore.engine.a": [("rtcore.engine.b", False)], "rtcore.engine.b": [("rtcore.engine.a", False)]}, False, True),
        ({"rtcore.engine.a": [("rtcore.engine.b", False)], "rtcore.engine.b": [("rtcore.engine.a", True)]}, False, False),
        ({"rtcore.server.x": [("rtcore.engine.node", False)], "rtcore.engine.node": []}, False, False),
    ],
)
def test_the_checks_catch_what_they_should(
    graph: dict[str, list[tuple[str, bool]]], expect_layer_error: bool, expect_cycle: bool
) -> None:
    assert bool(downward_violations(graph)) is expect_layer_error
    assert bool(cycles(graph)) is expect_cycle

"""Packaging: what a user installs works without the test tools, and says what it is.

* the package imports no test-only library, and an optional dependency only
  in the module that needs it (declared in the matching extra);
* ``rtcore.testing`` imports without Hypothesis (only ``rtcore.testing.strategies`` needs it);
* ``rtcore.auth.jwt`` without PyJWT names the extra to install;
* LICENSE, the ``dev`` extra, ``.ci/run`` and the README's commands agree with pyproject;
* the test command skips service-backed tests with a one-line reason each when
  Redis/PostgreSQL are missing, and fails instead with ``RTCORE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "rtcore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

#: Third-party modules the package may import anywhere (the core dependencies).
CORE = {"anyio", "msgspec", "wsproto", "h11", "prometheus_client"}
#: Optional modules: the only package modules allowed to import them, and their extra.
OPTIONAL = {
    "coredis": ({"rtcore/backends/redis.py"}, "redis"),
    "psycopg": ({"rtcore/wallet/postgres_store.py"}, "postgres"),
    "jwt": ({"rtcore/auth/jwt_auth.py"}, "jwt"),
    "hypothesis": ({"rtcore/testing/strategies.py"}, "test"),
    # Imported only when the ASGI host already runs on trio (so it is installed).
    "trio": ({"rtcore/server/asgi.py"}, "test"),
}
#: Distribution names of the optional modules (as written in pyproject).
DIST = {"coredis": "coredis", "psycopg": "psycopg", "jwt": "pyjwt", "hypothesis": "hypothesis", "trio": "trio"}


def third_party_imports() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "rtcore":
                    found.append((str(path.relative_to(SRC.parent)), top))
    return found


def test_no_test_only_or_undeclared_imports_in_the_package() -> None:
    """Mutation: add ``import pytest`` (or ``import coredis`` in ``engine/node.py``) anywhere under src/ → fails."""
    bad = []
    for module, top in third_party_imports():
        if top in CORE:
            continue
        allowed = OPTIONAL.get(top)
        if allowed is None or module not in allowed[0]:
            bad.append(f"{module} imports {top}")
    assert bad == []


def test_optional_imports_are_declared_in_their_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    deps = " ".join(PYPROJECT["project"]["dependencies"]).lower().replace("-", "_")
    for top in CORE:
        assert top in deps, f"{top} is imported but not a dependency"
    for top, (_modules, extra) in OPTIONAL.items():
        assert any(req.lower().startswith(DIST[top]) for req in extras[extra]), (top, extra)


def run_python(code: str, blocked: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in ``python -I`` with ``blocked`` modules unimportable (as if not installed)."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run([sys.executable, "-I", "-c", prelude + code], capture_output=True, text=True, timeout=60, cwd="/")


TEST_TOOLS = ["hypothesis", "pytest", "trio", "httpx", "websockets", "trustme", "jwt", "coredis", "psycopg"]


def test_rtcore_testing_imports_without_hypothesis_or_any_test_tool() -> None:
    """Mutation: ``from . import strategies`` in ``rtcore/testing/__init__.py`` → fails (ImportError)."""
    proc = run_python(
        "import anyio, rtcore, rtcore.testing, rtcore.auth, rtcore.cli, rtcore.server, rtcore.wallet, rtcore.rooms\n"
        "app = rtcore.App()\n"
        "@app.command('echo')\n"
        "async def echo(ctx, args: int) -> int:\n"
        "    return args\n"
        "async def main():\n"
        "    async with rtcore.testing.connect(app) as c:\n"
        "        assert await c.command('echo', 7) == 7\n"
        "anyio.run(main)\n"
        "print('ok')\n",
        TEST_TOOLS,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    proc = run_python("import rtcore.testing.strategies", ["hypothesis"])
    assert proc.returncode != 0 and "needs Hypothesis: pip install hypothesis" in proc.stderr.splitlines()[-1]


def test_jwt_without_pyjwt_names_the_extra() -> None:
    proc = run_python("import rtcore.auth\nrtcore.auth.jwt('k')", ["jwt"])
    assert proc.returncode != 0
    assert "pip install 'rtcore[jwt]'" in proc.stderr.splitlines()[-1]


def test_license_extras_and_ci_agree() -> None:
    """Mutation: put mypy back in the ``test`` extra, or install only ``.[test]`` in .ci/run → fails."""
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == "MIT" and license_text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in license_text
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {e: {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in reqs} for e, reqs in extras.items()}
    assert {"mypy", "ruff"} <= names["dev"]
    assert not ({"mypy", "ruff"} & names["test"])
    assert 'pip install -q -e ".[test,dev]"' in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers and (SRC / "py.typed").exists()
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the SPDX expression says it


def test_readme_quickstart_makes_a_venv_and_names_real_extras() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quickstart") : readme.index("## A first app")]
    assert "python3 -m venv .venv" in quick and ". .venv/bin/activate" in quick
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for group in re.findall(r"rtcore\[([a-z,]+)\]|\.\[([a-z,]+)\]", readme):
        for name in ",".join(group).split(","):
            assert not name or name in extras, f"README names extra {name!r}, pyproject has {sorted(extras)}"


def _no_services_env(tmp_path: Path) -> dict[str, str]:
    """An environment where neither redis-server nor PostgreSQL can be found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RTCORE_REQUIRE_SERVICES", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{bin_dir}"  # the venv only: no redis-server
    env["RTCORE_TEST_POSTGRES"] = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    return env


SERVICE_TESTS = ["tests/test_backend_redis.py", "tests/wallet/test_store_contract.py"]


def test_missing_services_skip_with_one_line_each_unless_required(tmp_path: Path) -> None:
    """Mutation: return the multi-line psycopg message from ``postgres_unavailable`` (drop
    its first-line cut) → a SKIPPED reason spans lines; drop the ``require_services()``
    check in the Redis fixture → the required run passes."""
    env = _no_services_env(tmp_path)
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-x", *SERVICE_TESTS]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout.splitlines()
    skipped = [ln for ln in out if ln.startswith("SKIPPED")]
    assert any("redis-server is not installed" in ln for ln in skipped), out[-20:]
    assert any("PostgreSQL at" in ln and "not reachable" in ln for ln in skipped), out[-20:]
    summary = out[out.index(next(ln for ln in out if "short test summary info" in ln)) + 1 : -1]
    # Between the header and the final count only SKIPPED lines: one line per reason.
    assert summary and all(ln.startswith("SKIPPED") for ln in summary), summary
    required = subprocess.run(
        [*args[:-2], "tests/test_backend_redis.py"], cwd=ROOT, env={**env, "RTCORE_REQUIRE_SERVICES": "1"}, capture_output=True, text=True, timeout=600
    )
    assert required.returncode != 0 and "RTCORE_REQUIRE_SERVICES" in required.stdout


@pytest.mark.parametrize("extra", ["redis", "postgres", "jwt", "test", "dev"])
def test_every_extra_the_docs_name_exists(extra: str) -> None:
    assert extra in PYPROJECT["project"]["optional-dependencies"]

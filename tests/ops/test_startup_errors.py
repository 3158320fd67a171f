"""Every bad ``rtcore serve`` invocation: exit status 2 and one line on stderr naming the problem.

Each case runs the installed ``rtcore`` command in a subprocess, as an
operator would. Before: a taken port printed a 78-line ``ExceptionGroup``,
``--port 99999`` an ``OverflowError``, a bad ``--backend`` a traceback.
Missing extras are simulated by putting a package that raises ImportError in
front of the real one on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "examples" / "counter" / "app.py") + ":app"
RTCORE = str(Path(sys.executable).with_name("rtcore"))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blocked(tmp_path: Path, *modules: str) -> str:
    """A PYTHONPATH entry where importing each of ``modules`` fails, as if not installed."""
    root = tmp_path / "blocked"
    for name in modules:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ModuleNotFoundError({'No module named ' + repr(name)!r}, name={name!r})\n")
    return str(root)


def serve(*args: str, cwd: Path = ROOT, pythonpath: str | None = None) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([RTCORE, "serve", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr.splitlines()


def one_line(code: int, lines: list[str], *needles: str) -> str:
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("rtcore: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_port_in_use(taken_port: int) -> None:
    """Mutation: log the startup failure with ``exc_info`` at ERROR in ``_serve`` → a traceback, many lines."""
    one_line(*serve(APP, "--port", str(taken_port)), f"127.0.0.1:{taken_port}", "already in use")


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_invalid_port(port: str) -> None:
    """Mutation: drop ``_check_port`` → OverflowError from the socket layer, exit 2 but "startup failed: OverflowError"."""
    one_line(*serve(APP, "--port", port), f"invalid port {port}", "0..65535")


def test_unknown_backend_scheme() -> None:
    one_line(*serve(APP, "--backend", "mongodb://db/0"), "unknown backend URL scheme 'mongodb'", "redis://", "sqlite://")


def test_unreachable_redis_hides_the_password() -> None:
    port = closed_port()
    line = one_line(*serve(APP, "--port", "0", "--backend", f"redis://:hunter2@127.0.0.1:{port}/0"), "unreachable", f"127.0.0.1:{port}")
    assert "hunter2" not in line


def pg_app(tmp_path: Path, port: int) -> str:
    path = tmp_path / "pgapp.py"
    path.write_text(
        "import rtcore\n"
        "from rtcore.wallet.engines import open_wallet_store\n"
        "app = rtcore.App()\n"
        "@app.lifespan\n"
        "async def wallet(node):\n"
        f"    store = await open_wallet_store('postgresql://rtcore@127.0.0.1:{port}/wallet')\n"
        "    yield {'store': store}\n"
        "    await store.aclose()\n"
    )
    return f"{path}:app"


def test_unreachable_postgresql(tmp_path: Path) -> None:
    port = closed_port()
    one_line(*serve(pg_app(tmp_path, port), "--port", "0"), "unreachable", "PostgreSQL", str(port))


def test_missing_redis_extra(tmp_path: Path) -> None:
    """Mutation: drop the ``pip install`` hint in ``open_backend`` → the line lacks the command."""
    one_line(
        *serve(APP, "--port", "0", "--backend", "redis://127.0.0.1:1/0", pythonpath=blocked(tmp_path, "coredis")),
        "pip install 'rtcore[redis]'",
    )


def test_missing_postgres_extra(tmp_path: Path) -> None:
    """Mutation: drop the ``except ImportError`` in ``open_wallet_store`` and ``psycopg`` from
    ``rtcore.cli._EXTRAS`` → "startup failed: ModuleNotFoundError", no pip command."""
    one_line(
        *serve(pg_app(tmp_path, closed_port()), "--port", "0", pythonpath=blocked(tmp_path, "psycopg")),
        "pip install 'rtcore[postgres]'",
    )


def test_bad_tls_files(tmp_path: Path) -> None:
    one_line(*serve(APP, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key")), "--tls-cert", "no such file")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    one_line(*serve(APP, "--tls-cert", str(junk), "--tls-key", str(junk)), "cannot load the TLS certificate", "junk.pem")
    one_line(*serve(APP, "--tls-cert", str(junk)), "--tls-key")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nowhere.py:app", "no such file"),
        ("no_such_module_xyz:app", "cannot import module 'no_such_module_xyz'"),
        (APP.replace(":app", ":nope"), "has no attribute 'nope'"),
        (APP.replace(":app", ":Room"), "is a StructMeta, not an rtcore.App"),
        (":app", "expected MODULE:APP"),
    ],
)
def test_bad_app_path(spec: str, needle: str) -> None:
    one_line(*serve(spec, "--port", "0"), needle)


def test_bad_listen_address() -> None:
    one_line(*serve(APP, "--host", "256.1.1.1"), "cannot listen on 256.1.1.1")


def test_a_failing_lifespan(tmp_path: Path) -> None:
    """Any other startup failure: still one line naming the exception, exit 2."""
    path = tmp_path / "boom.py"
    path.write_text(
        "import rtcore\napp = rtcore.App()\n@app.lifespan\nasync def boom(node):\n    raise RuntimeError('cache at c:1 refused')\n    yield\n"
    )
    one_line(*serve(f"{path}:app", "--port", "0"), "startup failed: RuntimeError: cache at c:1 refused")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
        ([], "the following arguments are required: MODULE:APP"),
        (["--loop", "uv"], "argument --loop: invalid choice: 'uv'"),
    ],
)
def test_argparse_errors_are_one_line_too(args: list[str], needle: str) -> None:
    """Mutation: drop ``_Parser.error`` (argparse's own prints the usage first) → several lines."""
    code, lines = serve(*args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("rtcore serve: error: ") and needle in lines[0] and "rtcore serve --help" in lines[0]

"""Autobahn TestSuite conformance of the WebSocket path ``rtcore serve`` ships.

kosoku (the Autobahn fuzzing client, native, no docker; ``pip install
kosoku==0.1.0``, which ``.ci/run`` does) drives ``tests/autobahn/echo_server.py``:
:class:`rtcore.Server` with its default WebSocket policy, whose gateway
session writes every echo through its outbox and writer (see that module's
docstring for the one test-only hook). The test reads kosoku's
Autobahn-format report (``index.json``) and asserts that every one of the
suite's 517 cases ran and passed:

* with the defaults, cases 1-10 (framing, pings, reserved bits and opcodes,
  fragmentation, UTF-8, close handshake, limits, big and many messages) all
  pass, and every compression case (12.x/13.x) finds permessage-deflate
  declined (Autobahn's ``UNIMPLEMENTED``: off by default, as documented) and
  closes cleanly;
* with ``WebSocketPolicy(permessage_deflate=True)``, the one switch that
  differs, the 12.x/13.x cases pass too.

A case "passes" when Autobahn's verdict is ``OK`` or ``INFORMATIONAL`` for
both the messages and the close: stricter than kosoku's own exit status,
which also accepts ``NON-STRICT``. The server must also survive the run and
log no error.

Takes about four minutes of both cores; ``.ci/run`` runs it as part of the
test suite (it no longer runs Autobahn separately). To run a subset by hand,
see ``echo_server.py``.

Mutations this catches (each verified to fail the test):
* drop the ``_let_application_catch_up`` fix in ``transport/websocket.py``
  (count waiting receivers again) → 7.9.x/6.x close late → ``FAILED BY CLIENT``;
* accept RSV1 without an extension (wsproto ``extensions`` ignored) → 3.x fail.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

KOSOKU_VERSION = "0.1.0"  # pinned: case files and verdicts change between releases
CASES = 517
COMPRESSION = ("12.", "13.")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PASS = {"OK", "INFORMATIONAL"}


def _kosoku() -> str | None:
    try:
        if importlib.metadata.version("kosoku") != KOSOKU_VERSION:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    beside = Path(sys.executable).parent / "kosoku"
    return str(beside) if beside.exists() else shutil.which("kosoku")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        _kosoku() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
        reason=f"kosoku=={KOSOKU_VERSION} is not installed (.ci/run installs it)",
    ),
]


@contextmanager
def echo_server(tmp: Path, *args: str) -> Iterator[tuple[str, Path]]:
    """Start ``echo_server.py``; yield its ``/v1/ws`` URL and its log; stop it after."""
    log = tmp / f"server{'-'.join(('', *args))}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "echo_server.py"), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until bound, or '' if it died
        assert line.startswith("LISTENING "), f"echo server did not start: {line!r}\n{log.read_text()}"
        yield f"ws://127.0.0.1:{int(line.split()[1])}/v1/ws", log
        assert proc.poll() is None, f"the echo server died during the run:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def run_kosoku(url: str, outdir: Path, *include: str) -> dict[str, dict[str, Any]]:
    """Run the cases (all, or ``include`` globs) against ``url``; return the report by case id."""
    kosoku = _kosoku()
    assert kosoku is not None, f"RTCORE_REQUIRE_SERVICES=1 but kosoku=={KOSOKU_VERSION} is not installed"
    outdir.mkdir()
    args = [kosoku, "-p", "2", "-o", str(outdir)]
    for pattern in include:
        args += ["-i", pattern]
    # Exit status 1 just means "some case did not pass": the report says which.
    done = subprocess.run([*args, url], cwd=outdir, capture_output=True, text=True, timeout=1100)
    index = outdir / "index.json"
    assert index.exists(), f"kosoku wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    [(_agent, cases)] = json.loads(index.read_text()).items()  # one server under test
    return {case: {**entry, "file": outdir / entry["reportfile"]} for case, entry in cases.items()}


def failures(report: dict[str, dict[str, Any]]) -> list[str]:
    """Cases whose verdict is not a pass, with what Autobahn said about them."""
    out = []
    for case, entry in sorted(report.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
        if entry["behavior"] not in PASS or entry["behaviorClose"] not in PASS:
            detail = json.loads(Path(entry["file"]).read_text())
            out.append(
                f"{case} {entry['behavior']}/{entry['behaviorClose']}: {detail['description']} — "
                f"{detail['result']} {detail['resultClose']} (close {detail['remoteCloseCode']})"
            )
    return out


def assert_clean_log(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-4000:]


def test_autobahn_all_cases_pass_through_the_gateway(tmp_path: Path) -> None:
    """All 517 cases: defaults for 1-10 (and compression declined), deflate on for 12-13.

    Mutation: revert the catch-up fix (``_waiting_at`` → anyio's waiting
    receiver count) → 7.9.x ``FAILED BY CLIENT`` (close frame a second late).
    """
    with echo_server(tmp_path) as (url, log):
        report = run_kosoku(url, tmp_path / "default")
    assert_clean_log(log)
    assert len(report) == CASES, f"{len(report)} cases ran, expected {CASES}"
    compression = {c for c in report if c.startswith(COMPRESSION)}
    declined = [
        c for c in compression if report[c]["behavior"] != "UNIMPLEMENTED" or report[c]["behaviorClose"] != "OK"
    ]
    assert not declined, f"permessage-deflate is off by default, yet these compression cases did not find it declined: {declined}"
    bad = failures({c: e for c, e in report.items() if c not in compression})
    assert not bad, f"{len(bad)} of {CASES - len(compression)} cases failed:\n" + "\n".join(bad)

    with echo_server(tmp_path, "--deflate") as (url, log):
        deflated = run_kosoku(url, tmp_path / "deflate", *(f"{p}*" for p in COMPRESSION))
    assert_clean_log(log)
    assert set(deflated) == compression, "the deflate run must cover exactly the compression cases"
    bad = failures(deflated)
    assert not bad, f"{len(bad)} of {len(compression)} compression cases failed:\n" + "\n".join(bad)

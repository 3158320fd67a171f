"""Autobahn TestSuite conformance of the WebSocket path ``rtcore serve`` ships.

kosoku (the Autobahn fuzzing client, native, no docker; ``pip install
kosoku==0.1.0``, which ``.ci/run`` does) drives ``tests/autobahn/echo_server.py``:
:class:`rtcore.Server` with its default WebSocket policy, whose gateway
session writes every echo through its outbox and writer (see that module's
docstring for the one test-only hook). The test reads kosoku's
Autobahn-format report (``index.json``) and asserts that every one of the
suite's 517 cases ran and passed:

* with the default policy and limits (except two sizes raised for the 16 MiB
  and 65,536-fragment cases, no server pings and no session idle timeout, each
  explained in ``echo_server.py``), cases
  1-10 (framing, pings, reserved bits and opcodes,
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

Cases 1-10 take seconds; the compression cases take minutes (pure-Python
deflate): about four on an idle two-core machine. ``.ci/run`` runs it as part of the
test suite (it no longer runs Autobahn separately). To run a subset by hand,
see ``echo_server.py``.

Mutations verified to fail it (on case subsets):
* the gateway's ``_flush`` leaves the written batch queued (echoes repeated)
  → 1.x, 5.x, 9.7.x ``FAILED``;
* ``WebSocketTransport._on_close`` closes with 1000 instead of wsproto's code
  for a framing error → 3.x, 4.x ``WRONG CODE``.

It found a real race (fixed): a framing error arriving just as the
application entered ``receive()`` delayed the close frame by a second, and
7.9.x failed now and then with ``FAILED BY CLIENT``; the deterministic test of
that is in ``tests/net/test_bad_input.py``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
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
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        _kosoku() is None and os.environ.get("RTCORE_REQUIRE_SERVICES") != "1",
        reason=f"kosoku=={KOSOKU_VERSION} is not installed (.ci/run installs it)",
    ),
]


@contextmanager
def echo_server(tmp: Path, *args: str) -> Iterator[tuple[str, Path, dict[str, int]]]:
    """Start ``echo_server.py``; yield its ``/v1/ws`` URL, its log, and (filled in once
    it stopped) how many batches each write path carried; stop it after."""
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
        writes: dict[str, int] = {}
        yield f"ws://127.0.0.1:{int(line.split()[1])}/v1/ws", log, writes
        assert proc.poll() is None, f"the echo server died during the run:\n{log.read_text()}"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"the echo server exited with {proc.returncode}:\n{log.read_text()}"
        m = re.search(r"^WRITES nowait=(\d+) send=(\d+)$", out, re.MULTILINE)
        assert m, f"the echo server did not report its writes: {out!r}"
        writes.update(nowait=int(m.group(1)), send=int(m.group(2)))
    finally:
        if proc.poll() is None:
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
    done = subprocess.run([*args, url], cwd=outdir, capture_output=True, text=True, timeout=1700)
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

    Mutation: the gateway's ``_flush`` leaves its batch queued → echoes repeat → fails.
    """
    with echo_server(tmp_path) as (url, log, writes):
        report = run_kosoku(url, tmp_path / "default")
    assert_clean_log(log)
    # The gateway's asyncio fast path (end-of-tick send_nowait) carried echoes, as
    # it carries most frames of `rtcore serve`; the writer task takes the rest.
    assert writes["nowait"] > 0, writes
    assert len(report) == CASES, f"{len(report)} cases ran, expected {CASES}"
    compression = {c for c in report if c.startswith(COMPRESSION)}
    declined = [
        c for c in compression if report[c]["behavior"] != "UNIMPLEMENTED" or report[c]["behaviorClose"] != "OK"
    ]
    assert not declined, f"permessage-deflate is off by default, yet these compression cases did not find it declined: {declined}"
    bad = failures({c: e for c, e in report.items() if c not in compression})
    assert not bad, f"{len(bad)} of {CASES - len(compression)} cases failed:\n" + "\n".join(bad)

    with echo_server(tmp_path, "--deflate") as (url, log, writes):
        deflated = run_kosoku(url, tmp_path / "deflate", *(f"{p}*" for p in COMPRESSION))
    assert_clean_log(log)
    assert writes["send"] > 0, writes  # compressed frames go through the writer task
    assert set(deflated) == compression, "the deflate run must cover exactly the compression cases"
    bad = failures(deflated)
    assert not bad, f"{len(bad)} of {len(compression)} compression cases failed:\n" + "\n".join(bad)

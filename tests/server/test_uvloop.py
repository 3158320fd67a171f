"""``rtcore serve`` / :func:`rtcore.server.runner.run` pick uvloop on asyncio when it is installed.

uvloop is in the ``test`` extra (and ``rtcore[fast]``), so these run in CI.
Each test starts a real ``run()`` in a subprocess (the loop is chosen before
any event loop exists), reports the running loop's class from ``on_ready`` and
stops itself with SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import uvloop  # the test extra installs it: a missing uvloop is a failure, not a skip

from rtcore.server.runner import UVLOOP_ENV, uvloop_wanted

_SCRIPT = """
import asyncio, os, signal, sys
import rtcore
from rtcore.server.runner import run

app = rtcore.App("loopcheck")

def ready(port):
    loop = asyncio.get_running_loop()
    print("LOOP", type(loop).__module__, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

arg = sys.argv[1]
run(app, port=0, grace=0.1, on_ready=ready, use_uvloop=None if arg == "default" else arg == "on")
"""


def _loop_module(arg: str, env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop(UVLOOP_ENV, None)
    if env_value is not None:
        env[UVLOOP_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _SCRIPT, arg], env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("LOOP ")]
    assert len(lines) == 1, out
    return lines[0].split()[1]


def test_run_uses_uvloop_when_installed() -> None:
    """Mutation: ``run`` passes no ``backend_options`` → the loop is asyncio's → this fails."""
    assert uvloop.__name__ == "uvloop"
    assert _loop_module("default", None).startswith("uvloop")


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_env_turns_uvloop_off(value: str) -> None:
    """Mutation: ``uvloop_wanted`` ignores ``RTCORE_UVLOOP`` → uvloop runs → this fails."""
    assert _loop_module("default", value) == "asyncio.unix_events"


def test_use_uvloop_false_turns_it_off() -> None:
    """``rtcore serve --no-uvloop`` passes ``use_uvloop=False``.

    Mutation: ``uvloop_wanted(False)`` reads only the environment → uvloop runs → this fails.
    """
    assert _loop_module("off", None) == "asyncio.unix_events"


def test_uvloop_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision itself: explicit argument first, then the environment, then "installed"."""
    monkeypatch.delenv(UVLOOP_ENV, raising=False)
    assert uvloop_wanted() is True
    assert uvloop_wanted(False) is False
    monkeypatch.setenv(UVLOOP_ENV, "0")
    assert uvloop_wanted() is False
    assert uvloop_wanted(True) is True
    monkeypatch.setenv(UVLOOP_ENV, "1")
    assert uvloop_wanted() is True

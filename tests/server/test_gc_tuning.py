"""``rtcore serve`` / :func:`rtcore.server.runner.run` tune the garbage collector once listening, unless told not to.

Each run test starts a real ``run()`` in a subprocess (the collector's settings
are process-wide), reports them from ``on_ready`` and stops itself with SIGTERM.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from rtcore.server.runner import GC_ENV, GC_GEN0_THRESHOLD, gc_tuning_wanted, tune_gc

_SCRIPT = """
import gc, os, signal, sys
import rtcore
from rtcore.server.runner import run

app = rtcore.App("gccheck")

def ready(port):
    print("GC", gc.get_threshold()[0], gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

arg = sys.argv[1]
run(app, port=0, grace=0.1, on_ready=ready, gc_tuning=None if arg == "default" else arg == "on")
"""


def _gc_seen(arg: str, env_value: str | None) -> tuple[int, int]:
    env = dict(os.environ)
    env.pop(GC_ENV, None)
    if env_value is not None:
        env[GC_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _SCRIPT, arg], env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("GC ")]
    assert len(lines) == 1, out
    _, threshold, frozen = lines[0].split()
    return int(threshold), int(frozen)


@pytest.mark.parametrize(("arg", "env_value"), [("default", "0"), ("default", "off"), ("off", None), ("off", "1")])
def test_run_leaves_the_collector_alone_when_told(arg: str, env_value: str | None) -> None:
    """``gc_tuning=False`` or ``RTCORE_GC_TUNING=0`` keep CPython's defaults (the argument wins over the variable).

    Mutation seen caught: ``gc_tuning_wanted`` ignoring the variable (always on) → tuned → fails.
    """
    assert _gc_seen(arg, env_value) == (700, 0)  # CPython's default, nothing frozen


@pytest.mark.parametrize(("arg", "env_value"), [("default", None), ("default", "1"), ("on", None), ("on", "0")])
def test_run_tunes_the_collector_by_default(arg: str, env_value: str | None) -> None:
    """Mutations seen caught: ``run`` not calling ``tune_gc`` → threshold 700, nothing frozen → fails;
    ``gc_tuning_wanted`` defaulting to off (the old default) → the ``("default", None)`` case fails."""
    threshold, frozen = _gc_seen(arg, env_value)
    assert threshold == GC_GEN0_THRESHOLD
    assert frozen > 1000  # the imported modules, the app, the server


def test_gc_tuning_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision itself: explicit argument first, then the environment, then on."""
    monkeypatch.delenv(GC_ENV, raising=False)
    assert gc_tuning_wanted() is True
    assert gc_tuning_wanted(False) is False
    monkeypatch.setenv(GC_ENV, "yes")
    assert gc_tuning_wanted() is True
    assert gc_tuning_wanted(False) is False
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv(GC_ENV, off)
        assert gc_tuning_wanted() is False
        assert gc_tuning_wanted(True) is True


def test_tune_gc_freezes_and_raises_the_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

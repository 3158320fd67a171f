"""The A/B server: benchmarks/rtcore_server.py's app, on a chosen event loop.

Run as ``python benchmarks/ab/server.py PORT LOOP`` with LOOP one of
``asyncio`` (plain asyncio, uvloop off), ``uvloop`` or ``trio``; prints
``READY <port>``. ``AB_BACKEND`` names the backend (a URL, or ``sqlite`` for
a fresh file per server; default ``memory://``). It goes through :func:`rtcore.server.runner.run`, the same
entry point as ``rtcore serve``, so the uvloop switch measured is the shipped one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtcore_server import app

import rtcore
from rtcore.server.runner import run


def _dump_tasks(path: str) -> None:
    """Write how many asyncio tasks run now (nothing on trio), for tasks per connection."""
    import asyncio

    try:
        n = len(asyncio.all_tasks())
    except RuntimeError:  # not on asyncio
        return
    Path(path).write_text(f"{n}\n")


def main() -> None:
    if os.environ.get("AB_GC") == "off":  # experiment: is the garbage collector the per-connect growth?
        import gc

        gc.disable()
    if os.environ.get("AB_TRACEMALLOC"):  # SIGUSR1 dumps a tracemalloc snapshot to $AB_TRACEMALLOC-<n>
        import signal
        import tracemalloc

        tracemalloc.start(12)
        dumps = [0]

        def dump(*_: object) -> None:
            dumps[0] += 1
            tracemalloc.take_snapshot().dump(f"{os.environ['AB_TRACEMALLOC']}-{dumps[0]}")
            _dump_tasks(f"{os.environ['AB_TRACEMALLOC']}-{dumps[0]}.tasks")

        signal.signal(signal.SIGUSR1, dump)
    if os.environ.get("AB_TASKS"):  # SIGUSR2 writes the number of asyncio tasks to $AB_TASKS-<pid>-<n>
        import signal

        counts = [0]

        def tasks(*_: object) -> None:
            counts[0] += 1
            _dump_tasks(f"{os.environ['AB_TASKS']}-{os.getpid()}-{counts[0]}")

        signal.signal(signal.SIGUSR2, tasks)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop == "asyncio":
        os.environ["RTCORE_UVLOOP"] = "0"
    elif loop == "uvloop":
        os.environ["RTCORE_UVLOOP"] = "1"
    # AB_BACKEND: the backend URL (default memory://); "sqlite" means a fresh
    # file in a new temporary directory, so every server starts empty.
    backend = os.environ.get("AB_BACKEND") or "memory://"
    if backend == "sqlite":
        import tempfile

        backend = f"sqlite:///{tempfile.mkdtemp(prefix='ab-sqlite-')}/ab.db"
    run(
        app,
        port=port,
        backend=backend,
        grace=0.5,
        anyio_backend="trio" if loop == "trio" else "asyncio",
        on_ready=lambda bound: print("READY", bound, flush=True),
        session_limits=rtcore.Limits(command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000),
    )


if __name__ == "__main__":
    main()

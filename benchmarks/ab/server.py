"""The A/B server: benchmarks/rtcore_server.py's app, on a chosen event loop.

Run as ``python benchmarks/ab/server.py PORT LOOP`` with LOOP one of
``asyncio`` (plain asyncio, uvloop off), ``uvloop`` or ``trio``; prints
``READY <port>``. It goes through :func:`rtcore.server.runner.run`, the same
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

        signal.signal(signal.SIGUSR1, dump)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop == "asyncio":
        os.environ["RTCORE_UVLOOP"] = "0"
    elif loop == "uvloop":
        os.environ["RTCORE_UVLOOP"] = "1"
    run(
        app,
        port=port,
        backend="memory://",
        grace=0.5,
        anyio_backend="trio" if loop == "trio" else "asyncio",
        on_ready=lambda bound: print("READY", bound, flush=True),
        session_limits=rtcore.Limits(command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000),
    )


if __name__ == "__main__":
    main()

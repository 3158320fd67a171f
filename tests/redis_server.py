"""A private ``redis-server`` for tests: free port, temp dir, kill -9 and restart.

Tests own their Redis so they can crash it on purpose. The helper is plain
synchronous code (subprocess + a raw RESP socket) so it works from fixtures,
module scope and async tests alike, and needs no client library to check
that the server answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RedisServer", "redis_server_binary", "require_services"]


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` binary, or None when it is not installed."""
    return shutil.which("redis-server")


def require_services() -> bool:
    """True when missing services must fail the run instead of skipping (``RTCORE_REQUIRE_SERVICES=1``)."""
    return os.environ.get("RTCORE_REQUIRE_SERVICES") == "1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process bound to 127.0.0.1 on a free port.

    Args:
        persistent: ``True`` for ``appendonly yes`` + ``appendfsync always``
            (every acknowledged write survives kill -9), ``False`` for no
            persistence at all (a restart loses everything).
        directory: Working directory for AOF files; a fresh temp dir if None.
    """

    def __init__(self, *, persistent: bool = True, directory: Path | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.persistent = persistent
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="rtcore-redis-")) if directory is None else directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:{port}/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server (same port and dir as before on a restart) and wait for PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return self
            except (OSError, RuntimeError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (args {self._args()})")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """``kill -9`` the server (no shutdown, no final fsync beyond what it already did)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """``kill -9`` and start again on the same port and dir."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the server and remove its temp dir (if the helper created it)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> object:
        """Send one command over a fresh socket and return its (simply parsed) reply."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            f = sock.makefile("rb")
            return _read_reply(f)

    def flushall(self) -> None:
        """Empty every database."""
        if self.command("FLUSHALL") != b"OK":
            raise RuntimeError("FLUSHALL failed")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_reply(f: object) -> object:
    readline = f.readline  # type: ignore[attr-defined]
    line: bytes = readline()
    if not line:
        raise RuntimeError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data: bytes = f.read(n + 2)  # type: ignore[attr-defined]
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")

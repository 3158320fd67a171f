"""A private PostgreSQL cluster on a free port in a temp dir, for tests that pause or restart it.

The machine's shared cluster (127.0.0.1:5432) must never be stopped by a test;
this one belongs to the test alone. PostgreSQL refuses to run as root, so as
root the cluster runs as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "postgres_binaries"]


def postgres_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and Path(out, "initdb").exists():
            return Path(out)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()``, ``pause()``/``resume()`` (SIGSTOP/SIGCONT of every process of the
    cluster), ``restart()`` (fast shutdown, then start on the same port and data), ``stop()``."""

    def __init__(self) -> None:
        bindir = postgres_binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, postgres) are not installed")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="rtcore-pg-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*self._as, str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.dir / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*self._as, str(self.bin / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
                 "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1"],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    ready = subprocess.run(
                        [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True, check=False
                    )
                    if ready.returncode == 0:
                        return
            time.sleep(0.1)
        raise TimeoutError("the private PostgreSQL did not start")

    def _pids(self) -> list[int]:
        """The postmaster and every process below it (backends, checkpointer...)."""
        assert self.proc is not None
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def _signal_all(self, signum: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                # A backend can exit between the /proc listing and the signal
                # (a client disconnected); it needs no stopping or waking.
                pass

    def pause(self) -> None:
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def restart(self) -> None:
        self._shutdown()
        self.start()

    def _shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.resume()
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown: roll back, disconnect
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        finally:
            # Always reap the child: a Popen collected while its process runs
            # warns from __del__, and pytest pins that on whichever test runs next.
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()

    def stop(self) -> None:
        self._shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

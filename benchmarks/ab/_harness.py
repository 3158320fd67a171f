"""Shared pieces of the A/B scripts: a raw-frame WebSocket client and server control.

The client speaks just enough RFC 6455 to drive rtcore wire protocol v1 in
JSON: one HTTP upgrade, masked text frames out (mask key 0, so the payload is
sent as is), unmasked text frames in. No library on the client side, so the
client's own CPU per message stays small next to the server's (each script
reports the client's CPU too).
"""

from __future__ import annotations

import asyncio
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder().decode


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by servers started afterwards); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return max(new, soft)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def self_cpu() -> float:
    """This process's CPU seconds."""
    t = os.times()
    return t.user + t.system


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (the machine is shared)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Server:
    """A server subprocess: ``rtcore`` (benchmarks/ab/server.py on a loop), ``peer``, or
    ``base``: benchmarks/ab/server.py on another rtcore source tree (``$AB_BASE_SRC``, a
    ``src`` directory put first on PYTHONPATH, e.g. ``git archive <commit> src`` unpacked),
    for before/after runs side by side."""

    def __init__(self, kind: str, loop: str = "asyncio") -> None:
        self.kind = kind
        self.loop = loop
        env = dict(os.environ)
        if kind == "peer":
            cmd = [sys.executable, str(HERE.parent / "peer_websockets.py"), "0"]
        else:
            cmd = [sys.executable, str(HERE / "server.py"), "0", loop]
        if kind == "base":
            env["PYTHONPATH"] = os.environ["AB_BASE_SRC"]
        elif kind == "rtcore" and os.environ.get("AB_SRC"):
            # AB_SRC: the "after" tree imported the same way as the base tree
            # (an unpacked src on PYTHONPATH), not from the installed checkout.
            env["PYTHONPATH"] = os.environ["AB_SRC"]
        # AB_CALLGRIND=<dir>: run the server under callgrind with instrumentation off;
        # the scripts switch it on around what they measure (instructions, not time:
        # the same on a busy machine). The server is ~50x slower meanwhile.
        self.callgrind: Path | None = None
        if os.environ.get("AB_CALLGRIND"):
            Path(os.environ["AB_CALLGRIND"]).mkdir(parents=True, exist_ok=True)
            self.callgrind = Path(os.environ["AB_CALLGRIND"]) / f"{kind}-{loop}-{time.time_ns()}.out"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.callgrind}", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if self.callgrind else None, text=True, env=env)
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{kind} server exited before READY")
            if line.startswith("READY"):
                self.port = int(line.split()[1])
                break
        self.pid = self.proc.pid
        # AB_PROFILE=<dir>: sample the server with py-spy (raw collapsed stacks) while it runs.
        self.profiler: subprocess.Popen[bytes] | None = None
        prof_dir = os.environ.get("AB_PROFILE")
        if prof_dir:
            out = Path(prof_dir) / f"{self.label.replace('/', '-')}-{self.pid}.txt"
            self.profiler = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "250", "--nonblocking", "-o", str(out), "--pid", str(self.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)

    def instrument(self, on: bool) -> None:
        """Under ``AB_CALLGRIND``: switch callgrind's instrumentation on or off (else nothing)."""
        if self.callgrind is not None:
            subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(self.pid)], check=True, stdout=subprocess.DEVNULL)

    def instructions(self) -> int | None:
        """Under ``AB_CALLGRIND``, after :meth:`stop`: instructions executed while instrumented."""
        if self.callgrind is None:
            return None
        total = 0
        for path in self.callgrind.parent.glob(self.callgrind.name + "*"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return total

    @property
    def label(self) -> str:
        return "peer" if self.kind == "peer" else f"{self.kind}/{self.loop}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10 if self.callgrind is None else 300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.profiler is not None:
            self.profiler.wait(30)


_HANDSHAKE = (
    "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: rtcore.v1.json\r\n\r\n"
)


def frame(payload: bytes) -> bytes:
    """A masked text frame with mask key 0 (payload unchanged)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class Conn:
    """One raw WebSocket connection speaking protocol v1 JSON."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_HANDSHAKE.format(port=port).encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"upgrade refused: {head[:200]!r}")
        return cls(reader, writer)

    def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(frame(encode(msg)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self) -> dict[str, Any]:
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
            op = b0 & 0x0F
            if op == 0x9:  # ping -> pong
                self.writer.write(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + b"\0\0\0\0" + payload)
                continue
            if op == 0x8:
                raise ConnectionError(f"closed: {payload[:2]!r}")
            msg: dict[str, Any] = decode(payload)
            return msg

    async def expect(self, t: str, rid: Any = None) -> dict[str, Any]:
        while True:
            msg = await self.recv()
            if msg.get("t") == t and (rid is None or msg.get("id") == rid):
                return msg
            if msg.get("t") in ("err", "bye"):
                raise RuntimeError(f"unexpected {msg}")

    async def hello(self, token: str) -> None:
        self.send({"t": "hello", "v": 1, "token": token})
        await self.expect("welcome")

    async def subscribe(self, stream: str, rid: int = 1) -> None:
        self.send({"t": "sub", "id": rid, "stream": stream})
        await self.expect("subbed", rid)

    async def keepalive(self, every: float = 30.0) -> None:
        """Stay an idle but live client: answer pings, send a protocol ``ping`` every ``every`` s
        (rtcore closes a session that sends nothing for ``idle_timeout``, 45 s by default)."""
        while True:
            try:
                await asyncio.wait_for(self.recv(), every)
            except TimeoutError:
                self.send({"t": "ping", "id": 0})
            except (ConnectionError, asyncio.IncompleteReadError):
                return

    def close(self) -> None:
        self.writer.close()


def start(label: str) -> Server:
    """Start the server a command line names: ``peer``, ``rtcore/<loop>`` or ``base/<loop>``."""
    if label == "peer":
        return Server("peer")
    kind, _, loop = label.partition("/")
    return Server(kind, loop or "asyncio")


def now() -> float:
    return time.perf_counter()


def run_client(coro: Any) -> Any:
    """Run the client coroutine on uvloop when installed (keeps the client cheap)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def write_results(name: str, result: dict[str, Any]) -> Path:
    """Write ``results/<name>-<UTC time>.json`` next to this file and print it."""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out / f"{name}-{stamp}.json"
    path.write_bytes(msgspec.json.format(encode(result)))
    print(msgspec.json.format(encode(result)).decode())
    print("wrote", path)
    return path

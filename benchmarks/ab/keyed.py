"""A/B benchmark of keyed commands (idempotency key + append) on each backend.

Runs a tiny rtcore app (command ``pub``: append ``args.data`` to
``args.stream``, return the offset) in a subprocess on ``memory://``,
``sqlite://`` (a fresh file) and ``redis://`` (a private ``redis-server`` on a
free port, ``appendonly yes`` + ``appendfsync everysec``), and drives it from
a cheap client in another subprocess: raw WebSocket frames on plain asyncio
sockets (no client library), ``K`` connections with ``W`` keyed commands in
flight each, every command with a fresh idempotency key.

Reported per run: commands/s, p50/p99 latency, the rtcore server's CPU per
command (utime+stime from ``/proc/<pid>/stat`` over the measured window),
redis-server's CPU per command, and the client's CPU per command (to show the
client is not the bottleneck).

A/B: ``--tree A=/path/to/src`` ``--tree B=/path/to/src`` runs the server
with ``PYTHONPATH`` set to each tree in turn, alternating which goes first,
``--repeat`` times. Without ``--tree`` it runs this checkout only.

Usage::

    python benchmarks/ab/keyed.py --backends memory,sqlite,redis --repeat 3 \\
        --tree before=/work/main/src --tree after=src --out benchmarks/results/keyed.json

The results file (JSON) and the Markdown table printed at the end are written
by this script; the load average at start and end is recorded in them because
the machine may be shared.
"""

# No "from __future__ import annotations": the app defined inside serve() needs
# its annotations evaluated where the local classes are visible.
import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

# --------------------------------------------------------------------------------------
# server side (run as: keyed.py --serve URL)
# --------------------------------------------------------------------------------------


def serve(url: str) -> None:
    """Serve the benchmark app on ``url``; print ``READY <port> <pid>`` when listening."""
    import anyio
    import msgspec

    import rtcore
    from rtcore.server.runner import Server

    app = rtcore.App("keyed-bench")

    class Pub(msgspec.Struct):
        stream: str
        data: Any = None

    @app.authenticate
    async def authenticate(token: str | None) -> rtcore.Principal:
        return rtcore.Principal(token or "anon")

    @app.command("pub")
    async def pub(ctx: rtcore.Context, args: Pub) -> int:
        event = await ctx.publish(args.stream, "bench", args.data)
        return event.offset

    async def main() -> None:
        server = Server(app, port=0, backend=url, grace=0.5)
        server.node_options["limits"] = rtcore.Limits(
            command_rate=1e9, command_burst=1_000_000_000, max_inflight=10_000, max_subscriptions=1000
        )
        async with anyio.create_task_group() as tg:
            bound = await tg.start(server.serve)
            print("READY", bound, os.getpid(), flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    await server.stop(grace=0.2)
                    break

    anyio.run(main)


# --------------------------------------------------------------------------------------
# in-process mode (run as: keyed.py --inproc URL TASKS SECONDS WARMUP): the node alone
# --------------------------------------------------------------------------------------


def inproc(url: str, tasks: int, seconds: float, warmup: float) -> None:
    """Drive ``Node.dispatch`` of keyed ``pub`` commands from ``tasks`` tasks, no transport.

    Isolates what the backend adds to a keyed command (the idempotency claim,
    the append, the stored outcome) from the WebSocket path. Prints one
    ``RESULT`` JSON line with commands/s, p50/p99 and this process's CPU per
    command (the parent adds redis-server's from /proc).
    """
    import anyio
    import anyio.lowlevel
    import msgspec

    import rtcore

    app = rtcore.App("keyed-inproc")

    class Pub(msgspec.Struct):
        stream: str
        data: Any = None

    @app.command("pub")
    async def pub(ctx: rtcore.Context, args: Pub) -> int:
        event = await ctx.publish(args.stream, "bench", args.data)
        return event.offset

    async def main() -> dict[str, Any]:
        run = os.urandom(4).hex()
        latencies: list[float] = []
        state = {"recording": False, "stop": False, "done": 0, "errors": 0}
        async with rtcore.Node(app, url) as node:
            principal = rtcore.Principal("bench")

            async def worker(i: int) -> None:
                n = 0
                while not state["stop"]:
                    await anyio.lowlevel.checkpoint()  # the memory backend may never yield on its own
                    n += 1
                    t0 = time.perf_counter()
                    reply = await node.dispatch(principal, "pub", {"stream": f"k:{i % 50}", "data": {"n": n}}, key=f"{run}-{i}-{n}")
                    if not reply.ok:
                        state["errors"] += 1
                    elif state["recording"]:
                        latencies.append(time.perf_counter() - t0)
                        state["done"] += 1

            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(worker, i)
                await anyio.sleep(warmup)
                print("MEASURE", flush=True)
                t0, cpu0 = time.perf_counter(), time.process_time()
                state["recording"] = True
                await anyio.sleep(seconds)
                state["recording"] = False
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                print("STOP", flush=True)
                state["stop"] = True
        done = int(state["done"])
        return {
            "commands": done, "seconds": elapsed, "cmds_per_s": done / elapsed,
            "p50_ms": _pct(latencies, 0.5) * 1e3, "p99_ms": _pct(latencies, 0.99) * 1e3,
            "server_cpu_us": cpu / max(done, 1) * 1e6, "client_cpu_us": 0.0, "errors": state["errors"], "first_error": None,
        }

    print("RESULT", json.dumps(anyio.run(main)), flush=True)


# --------------------------------------------------------------------------------------
# client side (run as: keyed.py --client PORT K W SECONDS)
# --------------------------------------------------------------------------------------


class _Conn:
    """A raw WebSocket client connection speaking rtcore v1 JSON."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.buf = b""

    @classmethod
    async def open(cls, port: int, token: str) -> "_Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: rtcore.v1.json\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"upgrade refused: {head[:200]!r}")
        conn = cls(reader, writer)
        conn.send(b'{"t":"hello","v":1,"token":"%s"}' % token.encode())
        welcome = await conn.recv()
        if b'"welcome"' not in welcome:
            raise RuntimeError(f"no welcome: {welcome[:200]!r}")
        return conn

    def send(self, payload: bytes) -> None:
        # Masked text frame with an all-zero mask: valid per RFC 6455 and free to apply.
        n = len(payload)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        elif n < 65536:
            header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
        self.w.write(header + b"\0\0\0\0" + payload)

    async def recv(self) -> bytes:
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            chunk = await self.r.read(65536)
            if not chunk:
                raise ConnectionError("server closed")
            self.buf += chunk

    def _parse(self) -> bytes | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        n = buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < pos + n:
            return None
        payload = buf[pos : pos + n]
        self.buf = buf[pos + n :]
        return payload


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _drive(port: int, conns: int, window: int, seconds: float, warmup: float) -> dict[str, Any]:
    import msgspec

    decode = msgspec.json.Decoder().decode
    run = os.urandom(4).hex()
    clients = [await _Conn.open(port, f"u{i}") for i in range(conns)]
    latencies: list[float] = []
    errors: list[str] = []
    state = {"recording": False, "stop": False, "done": 0}

    async def worker(i: int, c: _Conn) -> None:
        sent: dict[int, float] = {}
        rid = 0
        stream = f"k:{i}"

        def fire() -> None:
            nonlocal rid
            rid += 1
            c.send(
                b'{"t":"cmd","id":%d,"name":"pub","args":{"stream":"%s","data":{"n":%d}},"key":"%s-%d-%d"}'
                % (rid, stream.encode(), rid, run.encode(), i, rid)
            )
            sent[rid] = time.perf_counter()

        for _ in range(window):
            fire()
        while sent:
            reply = decode(await c.recv())
            t0 = sent.pop(reply.get("id"), None)
            if t0 is None:
                continue
            if reply.get("t") != "ok":
                errors.append(str(reply)[:200])
            elif state["recording"]:
                latencies.append(time.perf_counter() - t0)
                state["done"] += 1
            if not state["stop"]:
                fire()

    tasks = [asyncio.ensure_future(worker(i, c)) for i, c in enumerate(clients)]
    await asyncio.sleep(warmup)
    print("MEASURE", flush=True)  # the parent samples /proc now
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    state["recording"] = True
    await asyncio.sleep(seconds)
    state["recording"] = False
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    done = state["done"]
    print("STOP", flush=True)
    state["stop"] = True
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for c in clients:
        c.w.close()
    return {
        "commands": done,
        "seconds": elapsed,
        "cmds_per_s": done / elapsed,
        "p50_ms": _pct(latencies, 0.5) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "client_cpu_us": cpu / max(done, 1) * 1e6,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def client_main(port: int, conns: int, window: int, seconds: float, warmup: float) -> None:
    result = asyncio.run(_drive(port, conns, window, seconds, warmup))
    print("RESULT", json.dumps(result), flush=True)
    if result["first_error"]:
        print(result["first_error"], file=sys.stderr)


# --------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the ")" : state(0) ... utime(11) stime(12) in that split
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Redis:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="keyed-redis-")
        self.port = _free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def one_run(tree: str | None, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="keyed-")
    redis = _Redis() if backend == "redis" else None
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/bench.db"}.get(backend) or (redis.url if redis else "")
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    if args.inproc:
        return _inproc_run(url, env, redis, args, tmp)
    cmd = [sys.executable, str(HERE), "--serve", url]
    if args.profile:
        # py-spy samples the server (subprocesses included) into collapsed stacks; the
        # top self-time frames are printed by --top.
        out = Path(args.profile) / f"{backend}-{Path(tree or 'this').parent.name or 'this'}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["py-spy", "record", "--format", "raw", "--rate", "250", "-o", str(out), "--", *cmd]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    pid = server.pid
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        while line and not line.startswith("READY"):  # py-spy prints a banner first
            line = server.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"server did not start: {line!r}")
        port, pid = int(line.split()[1]), int(line.split()[2])
        client = subprocess.Popen(
            [sys.executable, str(HERE), "--client", str(port), str(args.connections), str(args.window),
             str(args.seconds), str(args.warmup)],
            stdout=subprocess.PIPE, text=True,
        )
        assert client.stdout is not None
        marks: dict[str, tuple[float, float]] = {}
        result: dict[str, Any] = {}
        for line in client.stdout:
            tag = line.split(" ", 1)[0].strip()
            if tag in ("MEASURE", "STOP"):
                marks[tag] = (_cpu_seconds(pid), _cpu_seconds(redis.proc.pid) if redis else 0.0)
            elif tag == "RESULT":
                result = json.loads(line.split(" ", 1)[1])
        client.wait(60)
        done = max(result.get("commands", 0), 1)
        result["server_cpu_us"] = (marks["STOP"][0] - marks["MEASURE"][0]) / done * 1e6
        result["redis_cpu_us"] = (marks["STOP"][1] - marks["MEASURE"][1]) / done * 1e6 if redis else None
        return result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the server itself (py-spy, if any, then writes its profile)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if redis is not None:
            redis.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _inproc_run(url: str, env: dict[str, str], redis: _Redis | None, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    try:
        proc = subprocess.Popen(
            [sys.executable, str(HERE), "--inproc-child", url, str(args.connections * args.window), str(args.seconds), str(args.warmup)],
            stdout=subprocess.PIPE, env=env, text=True,
        )
        assert proc.stdout is not None
        marks: dict[str, float] = {}
        result: dict[str, Any] = {}
        for line in proc.stdout:
            tag = line.split(" ", 1)[0].strip()
            if tag in ("MEASURE", "STOP"):
                marks[tag] = _cpu_seconds(redis.proc.pid) if redis else 0.0
            elif tag == "RESULT":
                result = json.loads(line.split(" ", 1)[1])
        proc.wait(60)
        done = max(result.get("commands", 0), 1)
        result["redis_cpu_us"] = (marks["STOP"] - marks["MEASURE"]) / done * 1e6 if redis else None
        return result
    finally:
        if redis is not None:
            redis.close()
        shutil.rmtree(tmp, ignore_errors=True)


def print_top(path: Path, n: int = 25) -> None:
    """Print the ``n`` frames with the most self samples (and inclusive samples) in a py-spy raw file."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    print(f"{total} samples; top self:")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{100 * c / total:5.1f}% self {100 * incl[f] / total:5.1f}% incl  {f}")


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    if sys.argv[1:2] == ["--inproc-child"]:
        url, tasks, seconds, warmup = sys.argv[2:6]
        inproc(url, int(tasks), float(seconds), float(warmup))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve")
    p.add_argument("--client", nargs=5)
    p.add_argument("--inproc", action="store_true",
                   help="drive Node.dispatch in one process (no transport): connections*window tasks")
    p.add_argument("--backends", default="memory,sqlite,redis")
    p.add_argument("--tree", action="append", default=[], help="NAME=path/to/src (repeatable)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--window", type=int, default=4, help="commands in flight per connection")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--profile", default=None, help="run the server under py-spy, collapsed stacks into this dir")
    p.add_argument("--top", default=None, help="print the top self-time frames of a collapsed-stack file and exit")
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.top:
        print_top(Path(args.top))
        return
    if args.client:
        port, conns, window, seconds, warmup = args.client
        client_main(int(port), int(conns), int(window), float(seconds), float(warmup))
        return
    trees: list[tuple[str, str | None]] = [tuple(t.split("=", 1)) for t in args.tree] or [("this", None)]  # type: ignore[misc]
    backends = args.backends.split(",")
    load0 = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        order = trees if rep % 2 == 0 else list(reversed(trees))
        for backend in backends:
            for name, tree in order:
                r = one_run(tree, backend, args)
                r.update(tree=name, backend=backend, rep=rep)
                runs.append(r)
                print(
                    f"rep {rep} {backend:6} {name:8} {r['cmds_per_s']:8.0f}/s p50 {r['p50_ms']:6.1f} ms "
                    f"p99 {r['p99_ms']:6.1f} ms server {r['server_cpu_us']:6.0f} us/cmd"
                    + (f" redis {r['redis_cpu_us']:5.0f} us/cmd" if r["redis_cpu_us"] is not None else "")
                    + f" client {r['client_cpu_us']:4.0f} us/cmd errors {r['errors']}",
                    flush=True,
                )
    load1 = os.getloadavg()
    table = ["| backend | tree | cmds/s median (min-max) | p50 ms | p99 ms | server CPU µs/cmd | redis CPU µs/cmd | client CPU µs/cmd |",
             "|---|---|---|---|---|---|---|---|"]
    summary: list[dict[str, Any]] = []
    for backend in backends:
        for name, _ in trees:
            rs = [r for r in runs if r["backend"] == backend and r["tree"] == name]
            s = {k: _summary([r[k] for r in rs]) for k in ("cmds_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")}
            red = [r["redis_cpu_us"] for r in rs if r["redis_cpu_us"] is not None]
            s["redis_cpu_us"] = _summary(red) if red else None  # type: ignore[assignment]
            summary.append({"backend": backend, "tree": name, **s})
            table.append(
                f"| {backend} | {name} | {s['cmds_per_s']['median']:,.0f} ({s['cmds_per_s']['min']:,.0f}-{s['cmds_per_s']['max']:,.0f}) "
                f"| {s['p50_ms']['median']:.1f} | {s['p99_ms']['median']:.1f} | {s['server_cpu_us']['median']:.0f} "
                f"| {'' if not red else format(statistics.median(red), '.0f')} | {s['client_cpu_us']['median']:.0f} |"
            )
    note = (("in-process Node.dispatch, " if args.inproc else "WebSocket, ") + f"{args.connections} connections x {args.window} in flight, {args.seconds:g} s per run, {args.repeat} repetitions; "
            f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end (shared machine)")
    print()
    print("\n".join(table))
    print()
    print(note)
    if args.out:
        out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count(), "load_start": load0,
               "load_end": load1, "args": {k: v for k, v in vars(args).items() if k not in ("serve", "client")},
               "mode": "in-process Node.dispatch" if args.inproc else "WebSocket", "runs": runs, "summary": summary, "table": table, "note": note}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

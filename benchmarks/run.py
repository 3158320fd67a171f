"""Benchmark rtcore (on asyncio, asyncio + uvloop and trio) against a plain ``websockets`` peer.

One command runs everything (issue 10's workloads)::

    python benchmarks/run.py                 # full run (~30-40 min on 2 shared vCPU)
    python benchmarks/run.py --quick         # smoke run (< 2 min), small sizes, 1 repetition
    python benchmarks/run.py --only fanout   # one workload (echo keyed fanout conns storm)

Every server runs in its own process, fresh for every (workload, repetition,
server), on loopback; the load client (``loadclient.py``: hand-written RFC
6455 frames on uvloop, in worker processes) is the same for all. The order of
the servers rotates with the repetition, so none always goes first. For every
measured window the server's CPU (utime + stime from ``/proc/<pid>/stat``) and
each client process's own CPU are read; RSS from ``/proc/<pid>/statm``.

Writes ``benchmarks/results/<date>.json`` (every repetition, medians, min-max,
ratios rtcore/peer, load average at start and end, versions), PNG plots under
``benchmarks/results/`` and the table between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` in ``benchmarks/README.md`` (``report.py`` does the last
two from a JSON file without rerunning). ``--quick`` and ``--out`` runs do not
touch the README unless ``--readme`` is given.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadclient  # noqa: E402
import report  # noqa: E402

WORKLOADS = ["echo", "keyed", "fanout", "conns", "storm"]
RTCORE_LOOPS = ["asyncio", "uvloop", "trio"]
PEER = "peer"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- processes ---------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was
    full (``TcpExt ListenOverflows``, machine-wide: other processes' too)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenOverflows", -1))
    return -1


def proc_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A benchmark server (``rtcore-<loop>`` or ``peer``) in a child process."""

    def __init__(self, name: str, backend: str = "memory://", port: int = 0) -> None:
        self.name = name
        self.backend = backend
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop = ""
        self.start()

    def start(self) -> None:
        if self.name == PEER:
            cmd = [sys.executable, str(HERE / "peer_websockets.py"), str(self.port)]
        else:
            loop = self.name.split("-", 1)[1]
            cmd = [sys.executable, str(HERE / "rtcore_server.py"), "--port", str(self.port)]
            cmd += ["--backend", self.backend, "--loop", loop]
        env = None
        if self.name.startswith("base-"):
            # AB_BASE_SRC=<tree>/src: the "before" side of an A/B in one run (any workload).
            env = {**os.environ, "PYTHONPATH": os.environ["AB_BASE_SRC"]}
        # STORM_SERVER_LOG=<file>: the server's stderr (its log, at RTCORE_BENCH_LOG level) goes there.
        log_path = os.environ.get("STORM_SERVER_LOG")
        stderr: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115  (the child keeps it)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"{self.name} server did not start: {line!r}")
        parts = line.split()
        self.port = int(parts[1])
        self.loop = parts[2] if len(parts) > 2 else "?"
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return proc_rss(self.pid)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Pool:
    """Load-client worker processes (``loadclient.worker_main``) driven over pipes."""

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadclient.worker_main, args=(child, i, True), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        hello = [c.recv() for c in self.conns]
        self.loop = hello[0]["loop"]
        self.pids = [h["pid"] for h in hello]

    def send(self, i: int, op: str, **kw: Any) -> None:
        self.conns[i].send({"op": op, **kw})

    def recv(self, i: int, timeout: float = 600) -> dict[str, Any]:
        if not self.conns[i].poll(timeout):
            raise TimeoutError(f"load-client worker {i} did not answer")
        out: dict[str, Any] = self.conns[i].recv()
        if "error" in out:
            raise RuntimeError(f"load-client worker {i}: {out['error']}")
        return out

    def all(self, op: str, per_worker: list[dict[str, Any]] | None = None, **kw: Any) -> list[dict[str, Any]]:
        for i in range(len(self.conns)):
            self.send(i, op, **{**kw, **(per_worker[i] if per_worker else {})})
        return [self.recv(i) for i in range(len(self.conns))]

    def cpu(self) -> list[float]:
        return [proc_cpu(pid) for pid in self.pids]

    def close(self) -> None:
        for i, c in enumerate(self.conns):
            with contextlib.suppress(OSError):
                c.send({"op": "exit"})
            self.procs[i].join(5)
            if self.procs[i].is_alive():
                self.procs[i].kill()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lat(results: list[dict[str, Any]]) -> list[float]:
    out: list[float] = []
    for r in results:
        a = array.array("d")
        a.frombytes(r["latencies"])
        out.extend(a)
    return out


def client_info(cpu_before: list[float], cpu_after: list[float], ops: float, window: float) -> dict[str, float]:
    """The load client's CPU per op (all its processes) and its busiest process's share of a core."""
    deltas = [b - a for a, b in zip(cpu_before, cpu_after, strict=True)]
    return {
        "client_cpu_us_per_op": sum(deltas) / ops * 1e6 if ops else float("nan"),
        "client_max_core_pct": max(deltas) / window * 100 if window > 0 else float("nan"),
    }


@contextlib.contextmanager
def backend_for(kind: str) -> Iterator[tuple[str, Any]]:
    """A fresh backend URL: ``memory://``, a new SQLite file, or a private redis-server."""
    if kind == "memory":
        yield "memory://", None
    elif kind == "sqlite":
        d = tempfile.mkdtemp(prefix="rtcore-bench-")
        try:
            yield f"sqlite:///{d}/bench.db", None
        finally:
            shutil.rmtree(d, ignore_errors=True)
    elif kind == "redis":
        sys.path.insert(0, str(ROOT))
        from tests.redis_server import RedisServer

        redis = RedisServer(persistent=False).start()
        try:
            yield redis.url, redis
        finally:
            redis.stop()
    else:
        raise ValueError(kind)


# --- workloads ------------------------------------------------------------------------------
# Each takes (server name, settings, pool) and returns (metrics, client, series).


def run_commands(
    server: Server, cfg: dict[str, Any], pool: Pool, name: str, keyed: bool, prefix: str, extra_pid: int | None = None
) -> dict[str, Any]:
    """``cfg['connections']`` connections, one command in flight each, for a time window."""
    nw = len(pool.conns)
    pool.all(
        "open",
        [{"n": k} for k in split(cfg["connections"], nw)],
        url=server.url,
        prefix=prefix,
        stream=None,
        streams=1,
        concurrency=16,
    )
    warmup, window = cfg["warmup"], cfg["window"]
    start_at = time.time() + 0.3
    for i in range(nw):
        pool.send(i, "commands", name=name, keyed=keyed, start_at=start_at, warmup=warmup, duration=window)
    time.sleep(max(0.0, start_at + warmup - time.time()))
    s0, c0 = server.cpu(), pool.cpu()
    x0 = proc_cpu(extra_pid) if extra_pid else 0.0
    time.sleep(max(0.0, start_at + warmup + window - time.time()))
    s1, c1 = server.cpu(), pool.cpu()
    x1 = proc_cpu(extra_pid) if extra_pid else 0.0
    res = [pool.recv(i) for i in range(nw)]
    pool.all("close")
    latencies = lat(res)
    count = len(latencies)
    errors = sum(r["errors"] for r in res)
    out = {
        "rps": count / window,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "cpu_us": (s1 - s0) / count * 1e6 if count else float("nan"),
        "errors": errors,
        "server_core_pct": (s1 - s0) / window * 100,
    }
    if extra_pid:
        out["redis_cpu_us"] = (x1 - x0) / count * 1e6 if count else float("nan")
    out.update(client_info(c0, c1, count, window))
    return out


def wl_echo(server: Server, cfg: dict[str, Any], pool: Pool) -> dict[str, Any]:
    m = run_commands(server, cfg, pool, "echo", False, "e")
    return {"metrics": {f"echo_{k}": v for k, v in m.items()}}


def fanout_on(server: Server, pool: Pool, stream: str, subscribers: int, events: int) -> dict[str, Any]:
    """Publish ``events`` on ``stream`` (subscribed by every connection the workers hold) from the last worker."""
    nw = len(pool.conns)
    subs_workers = range(nw - 1)
    for i in subs_workers:
        pool.send(i, "arm", events=events)
    for i in subs_workers:
        pool.recv(i)
    s0, c0, w0 = server.cpu(), pool.cpu(), time.time()
    pub = nw - 1
    pool.send(pub, "publish", url=server.url, streams=[stream], per_stream=events, window=32)
    published = pool.recv(pub)
    for i in subs_workers:
        pool.send(i, "wait_fanout", limit_s=max(60.0, events * subscribers / 2000))
    res = [pool.recv(i) for i in subs_workers]
    s1, c1 = server.cpu(), pool.cpu()
    latencies = lat(res)
    deliveries = len(latencies)
    elapsed = max(r["last"] for r in res) - published["t_first"]
    out = {
        "dps": deliveries / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "cpu_us": (s1 - s0) / deliveries * 1e6 if deliveries else float("nan"),
        "missing": subscribers * events - deliveries,
        "lost_dup": sum(r["lost"] + r["dup"] for r in res),
    }
    out.update(client_info(c0, c1, deliveries, time.time() - w0))
    return out


def wl_fanout(server: Server, cfg: dict[str, Any], pool: Pool) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    nw = len(pool.conns)
    for subs, events in cfg["fanout"]:
        stream = f"bench:fan-{subs}-{time.monotonic_ns()}"
        per = [*split(subs, nw - 1), 0]
        pool.all(
            "open",
            [{"n": k} for k in per],
            url=server.url,
            prefix=f"f{subs}-",
            stream=stream,
            streams=1,
            concurrency=16,
        )
        m = fanout_on(server, pool, stream, subs, events)
        pool.all("close")
        metrics.update({f"fanout_{subs}_{k}": v for k, v in m.items()})
    return {"metrics": metrics}


def wl_conns(server: Server, cfg: dict[str, Any], pool: Pool) -> dict[str, Any]:
    """Connect + hello + subscribe in steps up to N open; RSS per step; then fan-out to all N."""
    nw = len(pool.conns)
    total, step = cfg["conns_total"], cfg["conns_step"]
    stream = f"bench:idle-{time.monotonic_ns()}"
    per_worker_conc = max(1, cfg["conns_concurrency"] // (nw - 1))
    # A first connection, so that one-time allocations (imports, caches, the stream) are not in the delta.
    pool.send(0, "open", url=server.url, n=1, prefix="warm-", stream=stream, streams=1, concurrency=1)
    pool.recv(0)
    time.sleep(0.5)
    rss0 = server.rss()
    rates, rss_steps, opened = [], [], [0]
    s_start = server.cpu()
    c_start = pool.cpu()
    ramp_t0 = time.time()
    for k in range(step, total + 1, step):
        per = [*split(step, nw - 1), 0]
        t0 = time.time()
        res = pool.all(
            "open",
            [{"n": n} for n in per],
            url=server.url,
            prefix=f"i{k}-",
            stream=stream,
            streams=1,
            concurrency=per_worker_conc,
        )
        dt = time.time() - t0
        errors = sum(r["errors"] for r in res)
        rates.append(step / dt)
        rss_steps.append(server.rss())
        opened.append(k - errors)
        print(f"    {server.name}: {k:,} open, {rates[-1]:.0f}/s, RSS {rss_steps[-1] / 2**20:.0f} MB", flush=True)
    ramp = time.time() - ramp_t0
    s_ramp, c_ramp = server.cpu(), pool.cpu()
    time.sleep(cfg["settle"])
    rss_n = server.rss()
    idle_kb = (rss_n - rss0) / total / 1024
    metrics: dict[str, Any] = {
        "conn_rate_first": rates[0],
        "conn_rate_last": rates[-1],
        "conn_rate_flat": rates[-1] / rates[0],
        "conn_cpu_us": (s_ramp - s_start) / total * 1e6,
        "conn_errors": total - opened[-1],
        "idle_kb_per_conn": idle_kb,
        "rss_mb_at_n": rss_n / 2**20,
    }
    metrics.update({f"conns_{k}": v for k, v in client_info(c_start, c_ramp, total, ramp).items()})
    fan = fanout_on(server, pool, stream, total + 1, cfg["fanout_big_events"])
    metrics.update({f"fanout_{total}_{k}": v for k, v in fan.items()})
    pool.all("close")
    return {
        "metrics": metrics,
        "series": {
            "open": list(range(step, total + 1, step)),
            "rate": rates,
            "rss_mb": [r / 2**20 for r in rss_steps],
            "rss0_mb": rss0 / 2**20,
        },
    }


def wl_keyed(server: Server, cfg: dict[str, Any], pool: Pool, backend: str, redis: Any) -> dict[str, Any]:
    pid = redis.proc.pid if redis is not None else None
    m = run_commands(server, cfg, pool, "append", True, f"k{time.monotonic_ns()}-", extra_pid=pid)
    return {"metrics": {f"keyed_{backend}_{k}": v for k, v in m.items()}}


def start_profile(server: Server, what: str) -> subprocess.Popen[bytes] | None:
    """``STORM_PROFILE=<dir>``: sample the server with py-spy (raw collapsed stacks, ``ab/top.py`` reads them)."""
    prof_dir = os.environ.get("STORM_PROFILE")
    if not prof_dir:
        return None
    Path(prof_dir).mkdir(parents=True, exist_ok=True)
    out = Path(prof_dir) / f"{what}-{server.name}-{server.pid}.txt"
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "250"]
    # STORM_PROFILE_OPTS: other py-spy options (default --nonblocking; "--gil" samples only the GIL holder).
    cmd += [*os.environ.get("STORM_PROFILE_OPTS", "--nonblocking").split(), "-o", str(out), "--pid", str(server.pid)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        profiler.wait(30)


def wl_storm(server: Server, cfg: dict[str, Any], pool: Pool) -> dict[str, Any]:
    """N clients on ``streams`` streams; SIGTERM, restart the sqlite server, all resume with ``since``."""
    nw = len(pool.conns)
    total, nstreams, before, after = cfg["storm_total"], cfg["storm_streams"], 2, 2
    prefix = "storm"
    streams = [f"{prefix}:{j}" for j in range(nstreams)]
    per = [*split(total, nw - 1), 0]
    t0 = time.time()
    # Worker i's client j subscribes to stream (j % nstreams); the same names for all workers.
    pool.all(
        "open",
        [{"n": n} for n in per],
        url=server.url,
        prefix="s-",
        stream=prefix,
        streams=nstreams,
        concurrency=max(1, cfg["conns_concurrency"] // (nw - 1)),
    )
    setup = time.time() - t0
    pub = nw - 1
    pool.send(pub, "publish", url=server.url, streams=streams, per_stream=before, window=32)
    pool.recv(pub)
    for i in range(nw - 1):
        pool.send(i, "wait_offset", offset=before, limit_s=120)
    waited = [pool.recv(i) for i in range(nw - 1)]
    if not all(w["ok"] for w in waited):
        raise RuntimeError(f"storm: clients did not receive the events before the restart: {waited}")
    pool.all("storm_arm", final=before + after)
    c0 = pool.cpu()
    # STORM_PROFILE also samples the old server's graceful shutdown (py-spy ends when it exits).
    down_profiler = start_profile(server, "shutdown")
    if down_profiler is not None:
        time.sleep(1.0)  # py-spy attaches
    t_stop = time.time()
    server.stop()
    t_down = time.time()
    stop_profile(down_profiler)
    server.start()
    t_ready = time.time()
    profiler = start_profile(server, "storm")
    u0, k0 = proc_cpu_split(server.pid)
    o0 = listen_overflows()
    pool.send(pub, "publish", url=server.url, streams=streams, per_stream=after, window=32)
    pool.recv(pub)
    for i in range(nw - 1):
        pool.send(i, "storm_wait", limit_s=cfg["storm_timeout"])
    res = [pool.recv(i) for i in range(nw - 1)]
    (u1, k1), c1 = proc_cpu_split(server.pid), pool.cpu()
    o1 = listen_overflows()
    stop_profile(profiler)
    last = max(r["last_done"] for r in res)
    complete = all(r["complete"] for r in res)
    pool.all("close")
    metrics = {
        "storm_resume_s": (last - t_ready) if complete else float("nan"),
        "storm_from_stop_s": (last - t_stop) if complete else float("nan"),
        "storm_restart_s": t_ready - t_down,
        # SIGTERM to the old server's exit: its graceful close of every connection.
        "storm_shutdown_s": t_down - t_stop,
        "storm_not_resumed": sum(r["pending"] for r in res),
        "storm_lost": sum(r["lost"] for r in res),
        "storm_dup": sum(r["dup"] for r in res),
        "storm_not_recovered": sum(r["not_recovered"] for r in res),
        "storm_reconnects": sum(r["reconnects"] for r in res),
        "storm_cpu_us": (u1 + k1 - u0 - k0) / total * 1e6,
        "storm_cpu_user_us": (u1 - u0) / total * 1e6,
        "storm_cpu_sys_us": (k1 - k0) / total * 1e6,
        "storm_setup_s": setup,
        # Connections the kernel dropped from a full accept queue while the
        # clients resumed (machine-wide: another job's count too).
        "storm_listen_overflows": float(o1 - o0),
    }
    metrics.update({f"storm_{k}": v for k, v in client_info(c0, c1, total, max(1e-9, time.time() - t_stop)).items()})
    return {"metrics": metrics}


# --- the run ------------------------------------------------------------------------------------


def measure(wl: str, name: str, be: str, cfg: dict[str, Any], pool: Pool) -> tuple[dict[str, Any], str]:
    """One workload on one fresh server (and fresh backend); returns its results and the server's loop."""
    with backend_for(be) as (url, redis):
        port = free_port() if wl == "storm" else 0
        server = Server(name, url, port)
        try:
            if wl == "echo":
                out = wl_echo(server, cfg, pool)
            elif wl == "keyed":
                out = wl_keyed(server, cfg, pool, be, redis)
            elif wl == "fanout":
                out = wl_fanout(server, cfg, pool)
            elif wl == "conns":
                out = wl_conns(server, cfg, pool)
            else:
                out = wl_storm(server, cfg, pool)
        finally:
            server.stop()
    return out, server.loop


def settings(quick: bool, tiny: bool) -> dict[str, Any]:
    if tiny:  # the pytest smoke test: a few connections, seconds per workload
        return {
            "reps": 1, "workers": 2, "connections": 4, "warmup": 0.2, "window": 0.5,
            "fanout": [[3, 20], [5, 10]], "conns_total": 20, "conns_step": 10, "conns_concurrency": 4,
            "settle": 0.2, "fanout_big_events": 3, "storm_total": 12, "storm_streams": 3, "storm_timeout": 30,
            "backends": ["memory", "sqlite"],
        }  # fmt: skip
    if quick:
        return {
            "reps": 1, "workers": 3, "connections": 50, "warmup": 0.3, "window": 1.0,
            "fanout": [[10, 200], [200, 100]], "conns_total": 400, "conns_step": 100, "conns_concurrency": 32,
            "settle": 0.5, "fanout_big_events": 5, "storm_total": 300, "storm_streams": 10, "storm_timeout": 60,
            "backends": ["memory", "sqlite", "redis"],
        }  # fmt: skip
    return {
        "reps": 3, "workers": 3, "connections": 50, "warmup": 1.0, "window": 4.0,
        "fanout": [[10, 1000], [200, 1000], [1000, 300]], "conns_total": 10_000, "conns_step": 1000,
        "conns_concurrency": 32, "settle": 2.0, "fanout_big_events": 20, "storm_total": 10_000, "storm_streams": 100,
        "storm_timeout": 180, "backends": ["memory", "sqlite", "redis"],
    }  # fmt: skip


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "rtcore",
        "anyio",
        "wsproto",
        "h11",
        "msgspec",
        "trio",
        "uvloop",
        "websockets",
        "coredis",
        "matplotlib",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["redis-server"] = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split()[2]
    except (OSError, IndexError, subprocess.SubprocessError):
        out["redis-server"] = "not found"
    try:
        out["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git"] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (< 2 minutes)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the pytest smoke test
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="run only this workload (repeatable)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument("--servers", help="comma list, default rtcore-asyncio,rtcore-uvloop,rtcore-trio,peer")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>.json)")
    parser.add_argument("--readme", type=Path, help="README to regenerate (default benchmarks/README.md on full runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument(
        "--conns", type=int, help="open connections of the conns workload (default 10,000; steps of 1/10)"
    )
    parser.add_argument("--storm", type=int, help="clients of the storm workload (default 10,000; 100 per stream)")
    opts = parser.parse_args(argv)
    cfg = settings(opts.quick, opts.tiny)
    if opts.reps:
        cfg["reps"] = opts.reps
    if opts.conns:
        cfg["conns_total"], cfg["conns_step"] = opts.conns, max(1, opts.conns // 10)
    if opts.storm:
        cfg["storm_total"], cfg["storm_streams"] = opts.storm, max(1, opts.storm // 100)
    loadclient.raise_nofile()  # inherited by the servers
    workloads = opts.only or WORKLOADS
    servers = opts.servers.split(",") if opts.servers else [f"rtcore-{loop}" for loop in RTCORE_LOOPS] + [PEER]
    if "rtcore-uvloop" in servers:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("uvloop is not installed: leaving out rtcore-uvloop (pip install -e '.[bench]')", file=sys.stderr)
            servers.remove("rtcore-uvloop")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    out_path = opts.out or HERE / "results" / f"{date}{'-quick' if opts.quick else ''}.json"
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": opts.quick or opts.tiny,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "load_start": list(os.getloadavg()),
        "settings": cfg,
        "servers": servers,
        "workloads": workloads,
        "client_microbench": __import__("client_cost").measure(5000 if opts.tiny else 20_000),
        "runs": [],
        "failures": [],
    }
    pool = Pool(cfg["workers"])
    result["client_loop"] = pool.loop
    t_run = time.time()
    try:
        for wl in workloads:
            names = [s for s in servers if wl not in ("keyed", "storm") or s != PEER]
            for rep in range(cfg["reps"]):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for pos, name in enumerate(order):
                    backends = cfg["backends"] if wl == "keyed" else ["sqlite"] if wl == "storm" else ["memory"]
                    for be in backends:
                        load = os.getloadavg()[0]
                        t0 = time.time()
                        try:
                            out, loop_used = measure(wl, name, be, cfg, pool)
                        except Exception as exc:  # recorded, not hidden; the run goes on
                            failure = {"workload": wl, "backend": be, "rep": rep, "server": name}
                            failure["error"] = f"{type(exc).__name__}: {exc}"
                            result["failures"].append(failure)
                            print(f"FAILED: {failure}", flush=True)
                            out_path.parent.mkdir(parents=True, exist_ok=True)
                            out_path.write_text(json.dumps({**result, "complete": False}, indent=1) + "\n")
                            pool.close()
                            pool = Pool(cfg["workers"])
                            continue
                        run = {
                            "workload": wl,
                            "backend": be,
                            "rep": rep,
                            "position": pos,
                            "server": name,
                            "server_loop": loop_used,
                            "load": load,
                            "seconds": time.time() - t0,
                            **out,
                        }
                        result["runs"].append(run)
                        # Saved after every measurement: an interrupted run keeps what it measured.
                        out_path.parent.mkdir(parents=True, exist_ok=True)
                        out_path.write_text(json.dumps({**result, "complete": False}, indent=1) + "\n")
                        brief = ", ".join(
                            f"{k}={v:.4g}"
                            for k, v in out["metrics"].items()
                            if isinstance(v, float | int) and not k.endswith("_pct")
                        )
                        print(
                            f"[{time.time() - t_run:6.0f}s] {wl} rep {rep + 1} #{pos + 1} {name} {be}: {brief}",
                            flush=True,
                        )
    finally:
        pool.close()
    result["load_end"] = list(os.getloadavg())
    result["complete"] = True
    result["seconds"] = time.time() - t_run
    result["summary"] = report.summarise(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    print(f"written to {out_path}")
    readme = opts.readme or (None if (opts.quick or opts.tiny or opts.out or opts.only) else HERE / "README.md")
    report.render(result, out_path, readme=readme, plots=not opts.no_plots)
    print(report.table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

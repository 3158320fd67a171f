"""The load client: worker processes that hold connections and run workload steps on command.

Independent of rtcore: the wire protocol (docs/protocol.md, JSON text
frames) is spoken by hand over ``wsclient.py`` (RFC 6455 written for this
benchmark) and msgspec. Each worker is its own process (``spawn``) on uvloop
when it is installed, with the open-files limit raised, and is driven by
``run.py`` through a pipe: ``open`` connections (hello → welcome, optionally
sub → subbed), run ``commands`` one in flight per connection for a time
window, ``publish`` events, wait for ``fanout`` deliveries, survive a server
restart (``storm``: reconnect with ``since`` and count lost/duplicated
events), ``close``. Every answer carries the worker's own CPU time
(``os.times``) so run.py can show that the client is not the bottleneck.

Protocol heartbeats are answered: WebSocket pings by ``wsclient`` (pong),
and an application ``ping`` frame goes out on a connection that sent nothing
for ``welcome.heartbeat`` / 2 seconds (the server's idle timeout would cut it
otherwise).
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import resource
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec
from wsclient import WSProtocol, open_ws

_enc = msgspec.json.Encoder().encode
PAYLOAD = "x" * 64  # ~100-byte command frames


class EvtData(msgspec.Struct):
    """What the benchmark puts in an event: the publisher's send time."""

    t0: float = 0.0


class Frame(msgspec.Struct):
    """The fields of server frames the client reads; the rest is skipped by the decoder."""

    t: str
    id: int | None = None
    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None
    data: EvtData | None = None
    code: str | None = None
    heartbeat: float | None = None


_dec = msgspec.json.Decoder(Frame).decode


def raise_nofile(want: int = 200_000) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, target)), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


class Client:
    """One logical client: survives reconnects (``ws`` changes), keeps its stream position."""

    __slots__ = (
        "done",
        "epoch",
        "evts",
        "inflight_t0",
        "key_prefix",
        "last",
        "last_sent",
        "name",
        "rid",
        "stream",
        "waiter",
        "ws",
    )

    def __init__(self, name: str, stream: str | None) -> None:
        self.name = name
        self.stream = stream
        self.ws: WSProtocol | None = None
        self.waiter: asyncio.Future[Frame] | None = None
        self.rid = 0
        self.inflight_t0 = 0.0
        self.last = 0  # last offset held of ``stream``
        self.epoch = ""
        self.evts = 0
        self.done = False
        self.last_sent = 0.0
        self.key_prefix = name


class Worker:
    """One load-client process's state; ``handle`` runs one command from run.py."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.clients: list[Client] = []
        self.heartbeat = 15.0
        # commands
        self.cmd_name = "echo"
        self.cmd_keyed = False
        self.cmd_until = 0.0
        self.cmd_from = 0.0
        self.cmd_lat = array.array("d")
        self.cmd_errors = 0
        self.cmd_active = 0
        self.cmd_done: asyncio.Future[None] | None = None
        # fan-out / storm delivery tracking
        self.fan_target = 0
        self.fan_lat = array.array("d")
        self.fan_last = 0.0
        self.fan_pending = 0
        self.fan_done: asyncio.Future[None] | None = None
        self.lost = 0
        self.dup = 0
        self.not_recovered = 0
        self.reconnects = 0
        # Close code of the server's close frame -> connections ("None": none came); "bye": bye frames.
        self.close_codes: dict[str, int] = {}
        self.storm = False
        self.storm_final = 0
        self.storm_pending = 0
        self.storm_last_done = 0.0
        self.storm_done: asyncio.Future[None] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # --- frames ---------------------------------------------------------------------

    def on_message(self, ws: WSProtocol, payload: bytes) -> None:
        c: Client = ws.state
        f = _dec(payload)
        t = f.t
        if t == "evt":
            now = time.time()
            off = f.offset or 0
            if off <= c.last:
                self.dup += 1
                return
            if off != c.last + 1:
                self.lost += off - c.last - 1
            c.last = off
            if self.fan_target and not c.done:
                c.evts += 1
                if f.data is not None:
                    self.fan_lat.append(now - f.data.t0)
                if now > self.fan_last:
                    self.fan_last = now
                if c.evts >= self.fan_target:
                    c.done = True
                    self.fan_pending -= 1
                    if self.fan_pending == 0 and self.fan_done is not None and not self.fan_done.done():
                        self.fan_done.set_result(None)
            if self.storm and not c.done and off >= self.storm_final:
                self._storm_client_done(c, now)
            return
        if (t == "ok" or t == "err") and c.inflight_t0 and f.id == c.rid:
            now = time.perf_counter()
            if t == "err":
                self.cmd_errors += 1
            elif c.inflight_t0 >= self.cmd_from and now <= self.cmd_until:
                self.cmd_lat.append(now - c.inflight_t0)
            c.inflight_t0 = 0.0
            if now < self.cmd_until:
                self._send_cmd(c, now)
            else:
                self.cmd_active -= 1
                if self.cmd_active == 0 and self.cmd_done is not None and not self.cmd_done.done():
                    self.cmd_done.set_result(None)
            return
        if t == "bye":
            self.close_codes["bye"] = self.close_codes.get("bye", 0) + 1
            return
        if t == "subbed":
            if f.epoch is not None:
                if c.epoch and f.epoch != c.epoch:
                    self.not_recovered += 1
                c.epoch = f.epoch
            if c.last and not f.recovered:
                self.not_recovered += 1
            if not c.last and f.offset is not None:
                c.last = f.offset
        if c.waiter is not None and not c.waiter.done() and t in ("welcome", "subbed", "err"):
            c.waiter.set_result(f)

    def _send_cmd(self, c: Client, now: float) -> None:
        c.rid += 1
        if self.cmd_keyed:
            frame = {
                "t": "cmd",
                "id": c.rid,
                "name": self.cmd_name,
                "key": f"{c.key_prefix}-{c.rid}",
                "args": {"stream": f"bench:k:{c.name}", "data": {"p": PAYLOAD}},
            }
        else:
            frame = {"t": "cmd", "id": c.rid, "name": self.cmd_name, "args": {"p": PAYLOAD}}
        c.inflight_t0 = now
        c.last_sent = now
        assert c.ws is not None
        c.ws.send(_enc(frame))

    # --- connecting -----------------------------------------------------------------

    async def _request(self, c: Client, frame: dict[str, Any], limit_s: float = 60.0) -> Frame:
        assert c.ws is not None
        c.waiter = asyncio.get_running_loop().create_future()
        c.ws.send(_enc(frame))
        c.last_sent = time.perf_counter()
        try:
            return await asyncio.wait_for(c.waiter, limit_s)
        finally:
            c.waiter = None

    async def _connect(self, c: Client, since: bool) -> None:
        ws = await open_ws(self.host, self.port)
        ws.state = c
        ws.on_message = self.on_message
        ws.on_close = self._on_close
        c.ws = ws
        welcome = await self._request(c, {"t": "hello", "v": 1, "token": c.name})
        if welcome.t != "welcome":
            raise ConnectionError(f"hello refused: {welcome}")
        if welcome.heartbeat:
            self.heartbeat = welcome.heartbeat
        if c.stream is not None:
            sub: dict[str, Any] = {"t": "sub", "id": 1, "stream": c.stream}
            if since and c.epoch:
                sub["since"] = {"epoch": c.epoch, "offset": c.last}
            subbed = await self._request(c, sub)
            if subbed.t != "subbed":
                raise ConnectionError(f"sub refused: {subbed}")

    def _on_close(self, ws: WSProtocol) -> None:
        c: Client = ws.state
        code = str(ws.close_code)
        self.close_codes[code] = self.close_codes.get(code, 0) + 1
        if c.ws is ws:
            c.ws = None
        if c.waiter is not None and not c.waiter.done():
            c.waiter.set_exception(ConnectionError("closed"))
        if self.storm and not c.done:
            asyncio.get_running_loop().create_task(self._reconnect(c))

    async def _reconnect(self, c: Client) -> None:
        delay = 0.05
        await asyncio.sleep(random.uniform(0, 0.05))
        while self.storm and not c.done:
            try:
                await self._connect(c, since=True)
                self.reconnects += 1
                return
            except (TimeoutError, OSError, ConnectionError):
                if c.ws is not None:
                    c.ws.abort()
                    c.ws = None
                await asyncio.sleep(random.uniform(0.5, 1.5) * delay)
                delay = min(delay * 2, 1.0)

    def _storm_client_done(self, c: Client, now: float) -> None:
        c.done = True
        self.storm_pending -= 1
        self.storm_last_done = max(self.storm_last_done, now)
        if self.storm_pending == 0 and self.storm_done is not None and not self.storm_done.done():
            self.storm_done.set_result(None)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            idle = self.heartbeat / 2
            for c in self.clients:
                if c.ws is not None and now - c.last_sent > idle and not c.inflight_t0 and c.waiter is None:
                    c.last_sent = now
                    c.ws.send(b'{"t":"ping","id":0}')

    # --- commands from run.py ----------------------------------------------------------

    async def op_open(
        self, url: str, n: int, prefix: str, stream: str | None, streams: int, concurrency: int
    ) -> dict[str, Any]:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        sem = asyncio.Semaphore(concurrency)
        base = len(self.clients)
        new = []
        for i in range(n):
            name = f"{prefix}{self.index}-{base + i}"
            s = None if stream is None else (stream if streams <= 1 else f"{stream}:{(base + i) % streams}")
            new.append(Client(name, s))
        errors = 0

        async def one(c: Client) -> None:
            nonlocal errors
            async with sem:
                try:
                    await self._connect(c, since=False)
                except (TimeoutError, OSError, ConnectionError):
                    errors += 1

        t0, cpu0 = time.time(), cpu_seconds()
        await asyncio.gather(*(one(c) for c in new))
        self.clients.extend(new)
        return {"elapsed": time.time() - t0, "cpu": cpu_seconds() - cpu0, "errors": errors, "t_end": time.time()}

    async def op_commands(
        self, name: str, keyed: bool, start_at: float, warmup: float, duration: float
    ) -> dict[str, Any]:
        self.cmd_name, self.cmd_keyed = name, keyed
        self.cmd_lat = array.array("d")
        self.cmd_errors = 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        now = time.perf_counter()
        self.cmd_from = now + warmup
        self.cmd_until = now + warmup + duration
        self.cmd_done = asyncio.get_running_loop().create_future()
        active = [c for c in self.clients if c.ws is not None]
        self.cmd_active = len(active)
        await asyncio.sleep(warmup)
        cpu0 = cpu_seconds()
        for c in active:
            self._send_cmd(c, now)
        await asyncio.sleep(max(0.0, self.cmd_until - time.perf_counter()))
        cpu1 = cpu_seconds()
        await asyncio.wait_for(self.cmd_done, 60)
        return {"latencies": self.cmd_lat.tobytes(), "errors": self.cmd_errors, "cpu": cpu1 - cpu0, "window": duration}

    async def op_arm(self, events: int, final: int = 0) -> dict[str, Any]:
        self.fan_target = events
        self.fan_lat = array.array("d")
        self.fan_last = 0.0
        self.lost = self.dup = 0
        for c in self.clients:
            c.done = False
            c.evts = 0
        self.fan_pending = len(self.clients)
        self.fan_done = asyncio.get_running_loop().create_future()
        if not self.clients:
            self.fan_done.set_result(None)
        return {"cpu": cpu_seconds()}

    async def op_wait_fanout(self, limit_s: float) -> dict[str, Any]:
        assert self.fan_done is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.fan_done), limit_s)
            complete = True
        except TimeoutError:
            complete = False
        self.fan_target = 0
        return {
            "latencies": self.fan_lat.tobytes(),
            "last": self.fan_last,
            "complete": complete,
            "lost": self.lost,
            "dup": self.dup,
            "cpu": cpu_seconds(),
        }

    async def op_publish(self, url: str, streams: list[str], per_stream: int, window: int) -> dict[str, Any]:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        ws = await open_ws(host, port)
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"welcome": loop.create_future(), "ok": 0, "err": 0}
        sem = asyncio.Semaphore(window)
        total = len(streams) * per_stream
        all_done: asyncio.Future[None] = loop.create_future()

        def on_message(_ws: WSProtocol, payload: bytes) -> None:
            f = _dec(payload)
            if f.t == "welcome":
                state["welcome"].set_result(f)
            elif f.t in ("ok", "err"):
                state[f.t] += 1
                sem.release()
                if state["ok"] + state["err"] == total and not all_done.done():
                    all_done.set_result(None)

        ws.on_message = on_message
        ws.send(_enc({"t": "hello", "v": 1, "token": "publisher"}))
        await asyncio.wait_for(state["welcome"], 30)
        t0 = time.time()
        rid = 0
        for _ in range(per_stream):
            for stream in streams:
                await sem.acquire()
                rid += 1
                args = {"stream": stream, "data": {"t0": time.time(), "p": PAYLOAD[:40]}}
                ws.send(_enc({"t": "cmd", "id": rid, "name": "pub", "args": args}))
        await asyncio.wait_for(all_done, 120)
        elapsed = time.time() - t0
        ws.close()
        return {"t_first": t0, "elapsed": elapsed, "errors": state["err"]}

    async def op_storm_arm(self, final: int) -> dict[str, Any]:
        """From now on a lost connection reconnects with ``since``; done when holding ``final``."""
        self.storm = True
        self.storm_final = final
        self.lost = self.dup = self.not_recovered = self.reconnects = 0
        self.storm_last_done = 0.0
        self.storm_done = asyncio.get_running_loop().create_future()
        self.storm_pending = 0
        for c in self.clients:
            c.done = c.last >= final
            if not c.done:
                self.storm_pending += 1
        if self.storm_pending == 0:
            self.storm_done.set_result(None)
        return {"cpu": cpu_seconds()}

    async def op_storm_wait(self, limit_s: float) -> dict[str, Any]:
        assert self.storm_done is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.storm_done), limit_s)
            complete = True
        except TimeoutError:
            complete = False
        self.storm = False
        return {
            "complete": complete,
            "last_done": self.storm_last_done,
            "pending": self.storm_pending,
            "lost": self.lost,
            "dup": self.dup,
            "not_recovered": self.not_recovered,
            "reconnects": self.reconnects,
            "connected": sum(1 for c in self.clients if c.ws is not None),
            "cpu": cpu_seconds(),
        }

    async def op_wait_offset(self, offset: int, limit_s: float) -> dict[str, Any]:
        deadline = time.time() + limit_s
        while time.time() < deadline:
            if all(c.last >= offset for c in self.clients):
                return {"ok": True}
            await asyncio.sleep(0.05)
        return {"ok": False, "behind": sum(1 for c in self.clients if c.last < offset)}

    async def op_close(self) -> dict[str, Any]:
        self.storm = False
        for c in self.clients:
            if c.ws is not None:
                c.ws.close()
        self.clients = []
        await asyncio.sleep(0.2)
        return {"cpu": cpu_seconds()}

    async def op_close_codes(self) -> dict[str, Any]:
        """How many connections ended with each close code (``"None"``: without a close frame) and got ``bye``; resets."""
        out, self.close_codes = self.close_codes, {}
        return out

    async def op_cpu(self) -> dict[str, Any]:
        return {"cpu": cpu_seconds()}


def worker_main(conn: Any, index: int, use_uvloop: bool) -> None:
    """Process entry point: serve commands from ``conn`` until ``{"op": "exit"}``."""
    raise_nofile()
    loop_name = "asyncio"
    if use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop_name = "uvloop"
        except ImportError:
            pass

    async def serve() -> None:
        worker = Worker(index)
        loop = asyncio.get_running_loop()
        hb = loop.create_task(worker.heartbeats())
        # The pipe is read and written from a thread: it stays a blocking file
        # descriptor (the loop's add_reader would make it non-blocking, and a
        # large answer, such as 200,000 latencies, would then fail to write).
        conn.send({"ready": True, "loop": loop_name, "pid": os.getpid()})
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            op = cmd.pop("op")
            if op == "exit":
                break
            try:
                result = await getattr(worker, f"op_{op}")(**cmd)
            except Exception as exc:  # report to run.py instead of dying silently
                result = {"error": f"{type(exc).__name__}: {exc}"}
            await loop.run_in_executor(None, conn.send, result)
        hb.cancel()

    asyncio.run(serve())

"""Logs people can read: named loggers, text and JSON formats, nothing secret.

The central test runs a full session against a real server (WebSocket with
the token in the upgrade query and in ``hello``, a refused token, a refresh,
HTTP commands and history with ``Authorization: Bearer``, SSE) with every
logger at DEBUG, captures the output in both formats and greps it for the
token. The other tests check that each promised line is there.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import rtcore
import rtcore.testing
from rtcore.engine.hub import OutboxLimits
from rtcore.logs import JsonFormatter, TextFormatter, configure
from tests.net.conftest import http_url, peer, serving

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-5ecret-9f8e7d6c5b4a"  # what must never appear in a log
TOKEN2 = "tok-5ecret-refresh-0a1b2c"


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, io.StringIO, list[logging.LogRecord]]]:
    """Every record of every logger at DEBUG, formatted as text and as JSON."""
    text, js = io.StringIO(), io.StringIO()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def server_side(record: logging.LogRecord) -> bool:
        # The test's own HTTP/WebSocket clients log the URLs they call (with ?token=):
        # that is the client's log, not the server's.
        return not record.name.startswith(("httpx", "httpcore", "websockets"))

    handlers: list[logging.Handler] = [logging.StreamHandler(text), logging.StreamHandler(js), Keep()]
    handlers[0].setFormatter(TextFormatter())
    handlers[1].setFormatter(JsonFormatter())
    for h in handlers:
        h.addFilter(server_side)
    root = logging.getLogger()
    old_level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield text, js, records
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(old_level)


def session_app() -> rtcore.App:
    app = rtcore.App("logs")

    @app.authenticate
    async def auth(token: str | None) -> rtcore.Principal | None:
        if token in (TOKEN, TOKEN2):
            return rtcore.Principal("ada")
        return None

    @app.command("bump")
    async def bump(ctx: rtcore.Context, args: dict[str, Any]) -> int:
        ev = await ctx.publish("room:1", "bumped", args)
        return ev.offset

    @app.command("fail")
    async def fail(ctx: rtcore.Context) -> None:
        raise rtcore.Rejected("nope", "refused")

    return app


def lines_of(buf: io.StringIO, name: str) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if f" {name}: " in line]


@pytest.mark.anyio
async def test_a_full_session_never_logs_the_token(captured: tuple[io.StringIO, io.StringIO, list[logging.LogRecord]]) -> None:
    """Mutation: log ``request.target`` (with its query) in the access line, or add
    ``token=action.token`` to the gateway's auth handling → the grep finds the token."""
    text, js, records = captured
    async with serving(session_app()) as server:
        # WebSocket: token in the upgrade query AND in hello; a command with a key; a refresh.
        async with peer(server, token=TOKEN, query=f"token={TOKEN}") as p:
            assert (await p.cmd("bump", {"x": 1}, key="k-1"))["t"] == "ok"
            assert (await p.cmd("fail"))["code"] == "nope"
            assert (await p.request({"t": "auth", "token": TOKEN2}))["t"] == "ok"
        # A refused token (logged as a refusal, never as the token).
        async with peer(server, hello=False, query=f"token={TOKEN}x") as bad:
            await bad.send({"t": "hello", "v": 1})
            code, _frames = await bad.closed()
            assert code == 1008
        async with httpx.AsyncClient() as http:
            auth = {"authorization": f"Bearer {TOKEN}", "idempotency-key": "k-2"}
            assert (await http.post(http_url(server, "/v1/cmd/bump"), json={"x": 2}, headers=auth)).status_code == 200
            assert (await http.get(http_url(server, f"/v1/streams/room:1?token={TOKEN}"))).status_code == 200
            assert (await http.post(http_url(server, "/v1/cmd/bump"), headers={"authorization": "Bearer wrong" + TOKEN})).status_code == 401
    every = text.getvalue() + js.getvalue() + "".join(repr(r.__dict__) for r in records)
    assert TOKEN not in every and TOKEN2 not in every and "5ecret" not in every

    # And the lines promised are there (text format), with their fields.
    conn = lines_of(text, "rtcore.connection")
    assert any("connection opened" in ln and "peer=127.0.0.1:" in ln for ln in conn), conn
    closed = [ln for ln in conn if "connection closed" in ln]
    assert any("principal=ada" in ln and "code=1000" in ln and "duration_s=" in ln for ln in closed), closed
    assert any("code=1008" in ln and "reason=unauthenticated" in ln for ln in closed), closed
    cmds = lines_of(text, "rtcore.command")
    assert any("name=bump key=k-1 via=ws principal=ada" in ln and "outcome=ok" in ln for ln in cmds), cmds
    assert any("name=fail" in ln and "outcome=nope" in ln for ln in cmds), cmds
    assert any("name=bump key=k-2 via=http" in ln for ln in cmds), cmds
    http_lines = lines_of(text, "rtcore.http")
    assert any("method=POST path=/v1/cmd/bump status=200" in ln for ln in http_lines), http_lines
    assert any("method=GET path=/v1/streams/room:1 status=200" in ln for ln in http_lines), http_lines
    assert any("status=401" in ln for ln in http_lines), http_lines
    assert any("path=/v1/ws status=101" in ln for ln in http_lines), http_lines
    # JSON: one object per line, fields as keys.
    objs = [json.loads(line) for line in js.getvalue().splitlines()]
    cmd = next(o for o in objs if o.get("event") == "command" and o.get("key") == "k-1")
    assert cmd["logger"] == "rtcore.command" and cmd["name"] == "bump" and cmd["outcome"] == "ok" and cmd["duration_ms"] >= 0


@pytest.mark.anyio
async def test_command_lines_cost_one_level_check_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """At INFO no command record is built at all.

    Mutation: drop the ``COMMAND.isEnabledFor(logging.DEBUG)`` guard in the gateway → ``emit`` runs and this fails.
    """
    import rtcore.server.gateway as gateway

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("emit called although rtcore.command is not enabled for DEBUG")

    monkeypatch.setattr(gateway, "emit", boom)
    logger = logging.getLogger("rtcore.command")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("rtcore.connection"), "level", logging.ERROR)
    logger.manager._clear_cache()
    try:
        app = session_app()
        async with rtcore.testing.connect(app, token=TOKEN) as c:
            assert await c.command("bump", {"x": 1}) == 1
    finally:
        logger.manager._clear_cache()


@pytest.mark.anyio
async def test_processor_retries_and_dead_letters_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Mutation: remove the ``_log_retry`` call in ``_run_local`` (or the log in ``_dead_letter``) → fails."""
    app = rtcore.App()

    @app.on("job:*", max_attempts=2)
    async def worker(ctx: rtcore.Context, event: rtcore.Event) -> None:
        raise RuntimeError("handler broke")

    caplog.set_level(logging.WARNING, logger="rtcore.processor")
    async with rtcore.testing.serve(app) as node:
        await node.publish("job:1", "run", {})
        with anyio.fail_after(10):
            while not any("dead letter" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.02)
    mine = [r for r in caplog.records if r.name == "rtcore.processor"]
    retry = next(r for r in mine if r.levelno == logging.WARNING)
    assert "processor retry processor=worker" in retry.getMessage() and "attempt=1 max_attempts=2" in retry.getMessage()
    dead = next(r for r in mine if r.levelno == logging.ERROR)
    assert "stream=job:1 offset=1 dlq=dlq:worker" in dead.getMessage() and "handler broke" in dead.getMessage()


@pytest.mark.anyio
async def test_a_slow_consumer_cut_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Mutation: drop the warning in the gateway's ``_slow`` → fails."""
    app = session_app()
    caplog.set_level(logging.WARNING, logger="rtcore.connection")
    async with rtcore.testing.serve(app, outbox=OutboxLimits(max_bytes=10_000, max_frames=20)) as node:
        async with rtcore.testing.connect(node, token=TOKEN, faults=rtcore.testing.Faults(delay=0.05)) as slow:
            await slow.subscribe("feed:1", rtcore.Position("", 0))
            for i in range(100):
                await node.publish("feed:1", "tick", {"i": i})
                await anyio.lowlevel.checkpoint()
            assert (await slow.wait_closed(timeout=10)).close_code == 4008
    cut = [r.getMessage() for r in caplog.records if r.name == "rtcore.connection" and r.levelno == logging.WARNING]
    assert len(cut) == 1 and "slow consumer cut" in cut[0] and "principal=ada" in cut[0], cut


def test_configure_replaces_handlers_so_nothing_is_logged_twice() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        first, second = io.StringIO(), io.StringIO()
        configure("info", "text", first)
        configure("info", "json", second)
        logging.getLogger("rtcore.server").info("hello %s", "there")
        assert first.getvalue() == ""
        (line,) = second.getvalue().splitlines()
        assert json.loads(line)["message"] == "hello there"
        with pytest.raises(ValueError, match="log format"):
            configure("info", "xml")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _serve(tmp_path: Path, *extra: str) -> tuple[int, list[str]]:
    """Run ``rtcore serve`` on port 0, make one HTTP request, SIGINT it; its exit code and stderr lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtcore.cli", "serve", "examples/counter/app.py:app", "--port", "0", *extra],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        while True:
            line = proc.stderr.readline()
            assert line, f"rtcore serve ended early: {lines}"
            lines.append(line.rstrip("\n"))
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                break
        r = httpx.get(f"http://127.0.0.1:{m.group(1)}/v1/health?token={TOKEN}", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, lines + rest.splitlines()


def test_serve_logs_the_start_once_in_text(tmp_path: Path) -> None:
    """Every start was logged twice (the runner's line and the CLI's own).

    Mutation: log "serving" again in ``rtcore.cli``'s ``ready`` callback → two lines.
    """
    code, lines = _serve(tmp_path, "--log-level", "debug")
    assert code == 0
    assert len([ln for ln in lines if "serving" in ln]) == 1, lines
    assert any("rtcore.http: http request" in ln and "path=/v1/health status=200" in ln for ln in lines), lines
    assert sum("rtcore: stopped" in ln for ln in lines) == 1
    assert not any(TOKEN in ln for ln in lines)


def test_serve_log_format_json_is_one_object_per_line(tmp_path: Path) -> None:
    """Mutation: use the text formatter for ``--log-format json`` → a line is not JSON."""
    code, lines = _serve(tmp_path, "--log-format", "json", "--log-level", "debug")
    assert code == 0
    objs = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "message"} <= o.keys() for o in objs)
    assert [o["logger"] for o in objs if "serving" in o["message"]] == ["rtcore.server"]
    access = next(o for o in objs if o.get("event") == "http request")
    assert access["path"] == "/v1/health" and access["status"] == 200 and access["method"] == "GET"
    assert not any(TOKEN in line for line in lines)


def test_no_access_log_drops_the_http_lines(tmp_path: Path) -> None:
    """Mutation: ignore ``--no-access-log`` in ``rtcore.cli.main`` → an access line appears."""
    code, lines = _serve(tmp_path, "--no-access-log")
    assert code == 0
    assert not any("rtcore.http" in ln for ln in lines), lines
    assert len([ln for ln in lines if "serving" in ln]) == 1


def test_json_lines_survive_tracebacks() -> None:
    """An exception's traceback stays inside its one JSON line (``exc``)."""
    record = logging.LogRecord("rtcore.transport", logging.ERROR, __file__, 1, "handler failed: %s", ("GET /",), None)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    (line,) = JsonFormatter().format(record).splitlines()
    obj = json.loads(line)
    assert obj["message"] == "handler failed: GET /" and "RuntimeError: boom" in obj["exc"]

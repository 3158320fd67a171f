"""``GET /metrics`` and the ``rtcore`` command line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rtcore
from rtcore.cli import CliError, build_parser, load_app, parse_roles
from rtcore.engine.metrics import Histogram

from .conftest import TIMEOUT, http_url, peer, serving
from .netapp import app

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.anyio
async def test_metrics_after_traffic() -> None:
    stream = f"room:{uuid.uuid4().hex[:8]}"
    async with serving(app) as server, serving(app) as other, httpx.AsyncClient(timeout=TIMEOUT) as http:
        async with peer(server, token="ada") as p:
            await p.sub(stream)
            await p.cmd("publish", {"stream": stream, "n": 3}, key="m-1")
            await p.cmd("publish", {"stream": stream, "n": 3}, key="m-1")  # replayed
            await p.cmd("nope")
            events = await p.events(stream, 3)
            await p.send({"t": "ack", "stream": stream, "offset": events[-1]["offset"]})
            await p.request({"t": "ping"})
            r = await http.get(http_url(server, "/metrics"))
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            m = samples(r.text)
        assert m[("rtcore_connections", ())] == 1
        assert m[("rtcore_subscriptions", ())] == 1
        assert m[("rtcore_idempotent_replays_total", ())] == 1
        assert m[("rtcore_bytes_received_total", ())] > 0 and m[("rtcore_bytes_sent_total", ())] > 0
        assert m[("rtcore_command_duration_seconds_count", (("command", "publish"), ("outcome", "ok")))] == 2
        assert m[("rtcore_command_duration_seconds_count", (("command", "_unknown"), ("outcome", "unknown_command")))] == 1
        assert m[("rtcore_message_latency_seconds_count", (("stage", "written"),))] >= 1
        assert m[("rtcore_message_latency_seconds_count", (("stage", "acked"),))] == 1
        assert m[("rtcore_event_dispatch_lag_seconds_count", ())] == 3
        assert ("rtcore_subscriber_lag_offsets_max", ()) in m
        # Each server has its own registry: the other one saw nothing.
        m2 = samples((await http.get(http_url(other, "/metrics"))).text)
        assert m2[("rtcore_connections_opened_total", ())] == 0
        assert m2[("rtcore_message_latency_seconds_count", (("stage", "written"),))] == 0


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0, -1.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 3.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert h.count == 5 and h.sum == pytest.approx(3.65)


def test_parse_roles() -> None:
    assert parse_roles(None) == frozenset({"gateway", "api", "processor"})
    assert parse_roles(["gateway", "api"]) == frozenset({"gateway", "api"})
    assert parse_roles(["gateway,processor"]) == frozenset({"gateway", "processor"})
    assert parse_roles(["all"]) == frozenset({"gateway", "api", "processor"})
    with pytest.raises(CliError):
        parse_roles(["web"])


def test_load_app_from_file_and_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert load_app("examples/counter/app.py:app").name == "counter"
    assert load_app("tests.net.netapp:app") is app
    assert load_app("tests.net.netapp") is app  # attribute defaults to "app"
    for bad in ("tests.net.netapp:nothing", "no_such_module_xyz:app", "missing/file.py:app", "tests.net.netapp:GATE"):
        with pytest.raises(CliError):
            load_app(bad)


def test_help_explains_every_option() -> None:
    top = subprocess.run([sys.executable, "-m", "rtcore.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in top and "wallet" in top
    serve = subprocess.run([sys.executable, "-m", "rtcore.cli", "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--host", "--port", "--backend", "--tls-cert", "--tls-key", "--allowed-origin", "--role", "--log-level", "--grace"):
        assert option in serve
    assert "SIGTERM" in serve


def test_bad_invocations_exit_2() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["serve"])
    assert info.value.code == 2
    r = subprocess.run(
        [sys.executable, "-m", "rtcore.cli", "serve", "nowhere.py:app"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "no such file" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "rtcore.cli", "serve", "tests/net/netapp.py:app", "--tls-cert", "x.pem"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "--tls-key" in r.stderr


def test_serve_hands_every_option_to_rtcore_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rtcore serve`` is :func:`rtcore.run` with the command line's options.

    Mutation: drop ``grace=args.grace`` (or any option, ``--no-uvloop`` → ``use_uvloop=False``
    included) from ``_serve``'s call → fails.
    """
    import rtcore.cli

    assert rtcore.run is rtcore.cli.run, "rtcore serve must run the public rtcore.run"
    calls: list[tuple[rtcore.App, dict[str, object]]] = []
    monkeypatch.setattr(rtcore.cli, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.chdir(ROOT)
    argv = ["serve", "tests/net/netapp.py:app", "--host", "0.0.0.0", "--port", "8123", "--backend", "events.db"]
    argv += ["--allowed-origin", "https://a.example", "--role", "gateway,api", "--grace", "2.5", "--loop", "trio"]
    argv += ["--admin-token", "t0k"]
    argv += ["--no-uvloop"]
    assert rtcore.cli.main(argv) == 0
    [(served, kw)] = calls
    assert served.name == "nettest"
    assert {k: v for k, v in kw.items() if k not in ("on_ready", "idempotency_ttl", "idempotency_lease", "cursor_ttl")} == {
        "host": "0.0.0.0",
        "port": 8123,
        "backend": "sqlite:///" + str(ROOT / "events.db"),
        "ssl_context": None,
        "allowed_origins": ["https://a.example"],
        "admin_token": "t0k",
        "roles": frozenset({"gateway", "api"}),
        "grace": 2.5,
        "anyio_backend": "trio",
        "use_uvloop": False,
    }
    assert callable(kw["on_ready"])

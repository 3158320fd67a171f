"""Smoke test of the benchmark harness (benchmarks/run.py): a tiny run, no timing assertions.

It runs every workload of issue 10 against every server (rtcore on asyncio,
on uvloop when installed, on trio, and the websockets peer) with a few
connections and one repetition, then checks that the results JSON holds every
metric for every server that should have it, that the load client lost or
duplicated nothing, and that the README generator rewrites only its own
section. Plots are skipped (``--no-plots``), so matplotlib is not needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from wsclient import encode_frame, parse_frames  # noqa: E402

pytestmark = pytest.mark.slow

ECHO = ["echo_rps", "echo_p50_ms", "echo_p99_ms", "echo_cpu_us"]
FANOUT = [f"fanout_{n}_{s}" for n in (3, 5, 20) for s in ("dps", "p50_ms", "p99_ms", "cpu_us", "missing", "lost_dup")]
CONNS = ["idle_kb_per_conn", "rss_mb_at_n", "conn_rate_first", "conn_rate_last", "conn_rate_flat", "conn_cpu_us"]
KEYED = [f"keyed_{b}_{s}" for b in ("memory", "sqlite") for s in ("rps", "p50_ms", "p99_ms", "cpu_us")]
STORM = ["storm_resume_s", "storm_lost", "storm_dup", "storm_not_resumed", "storm_not_recovered"]


def test_client_frames_round_trip() -> None:
    """The hand-written client's frames are masked and parse back (any length class).

    Mutation: send the payload unmasked in ``encode_frame`` (mask bit set, key
    not applied) -> the parsed payload differs and this test fails.
    """
    for n in (0, 5, 125, 126, 65535, 65536):
        payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        frame = encode_frame(payload)
        assert frame[1] & 0x80, "client frames must be masked"
        frames, used = parse_frames(bytearray(frame))
        assert used == len(frame)
        assert frames == [(True, 1, payload)]
        assert n < 8 or payload not in frame  # the payload does not appear in clear on the wire


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "tiny.json"
    readme = tmp / "README.md"
    readme.write_text(
        "# title\n\nprose naming `<!-- bench:begin -->` and `<!-- bench:end -->` inline\n\n<!-- rooms:begin -->\nrooms table\n<!-- rooms:end -->\n\n<!-- bench:begin -->\nSTALE-TABLE\n<!-- bench:end -->\n\ntail\n"
    )
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--tiny", "--no-plots", "--out", str(out), "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), readme


def test_every_metric_for_every_server(tiny_run: tuple[dict, Path]) -> None:
    """Every workload ran on every server it applies to and produced every metric.

    Mutation: drop ``wl_storm``'s ``storm_lost`` from its metrics -> this fails
    with the missing key named.
    """
    result, _ = tiny_run
    servers = result["servers"]
    assert "peer" in servers and "rtcore-asyncio" in servers and "rtcore-trio" in servers
    metrics = result["summary"]["metrics"]
    for key in ECHO + FANOUT + CONNS:
        for server in servers:
            assert metrics[key][server]["n"] == 1, (key, server)
    for key in KEYED + STORM:
        for server in (s for s in servers if s != "peer"):
            assert metrics[key][server]["n"] == 1, (key, server)
        assert "peer" not in metrics[key]
    assert metrics["echo_rps"]["ratio"]["rtcore-asyncio"]["n"] == 1
    assert result["summary"]["metrics"]["keyed_memory_rps"]["ratio_against"] == "peer echo_rps"
    for run in result["runs"]:
        m = run["metrics"]
        assert m.get("storm_lost", 0) == 0 and m.get("storm_dup", 0) == 0 and m.get("storm_not_resumed", 0) == 0, run
        for key, value in m.items():
            if key.endswith(("missing", "lost_dup", "errors")):
                assert value == 0, (run["server"], key)
    assert result["load_start"] and result["load_end"] and result["versions"]["rtcore"]
    assert {"hand_encode_us", "wsproto_encode_us"} <= set(result["client_microbench"])


def test_readme_section_regenerated(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    """run.py and report.py rewrite only the bench section and keep the rooms section.

    Mutations: make ``update_readme`` replace the whole file -> the rooms
    markers and the tail disappear; split on the first marker text instead of
    a marker line -> the prose naming the markers is eaten. Either fails here.
    """
    result, readme = tiny_run
    text = readme.read_text()
    assert "<!-- rooms:begin -->\nrooms table\n<!-- rooms:end -->" in text and text.endswith("tail\n")
    assert "prose naming `<!-- bench:begin -->` and `<!-- bench:end -->` inline\n" in text
    assert "STALE-TABLE" not in text
    assert "| echo, 4 conns x 1 in flight: commands/s |" in text
    # report.py regenerates the same table from the JSON alone.
    copy = tmp_path / "r.json"
    copy.write_text(json.dumps(result))
    second = tmp_path / "README.md"
    second.write_text(text)
    assert report.main([str(copy), "--readme", str(second), "--no-plots"]) == 0
    assert (
        second.read_text().split("\n<!-- bench:begin -->\n")[1].split("generated")[1].split("-->", 1)[1]
        == text.split("\n<!-- bench:begin -->\n")[1].split("generated")[1].split("-->", 1)[1]
    )

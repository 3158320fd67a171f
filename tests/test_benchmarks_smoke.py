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


def _rooms_report(colyseus: bool) -> dict:
    """A tiny fake rooms.py results dict (the shape of one ``--colyseus`` run); no server, no npm."""

    def s(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "reps": values}

    def moves(backend: str, mps: list[float], cpu: list[float]) -> dict:
        runs = [
            {
                "moves_per_s": m,
                "p50_ms": 10.0,
                "p99_ms": 20.0,
                "server_cpu_us_per_move": c,
                "server_cpu_pct": 90.0,
                "errors": 0,
            }
            for m, c in zip(mps, cpu, strict=True)
        ]
        out = {"backend": backend, "rooms": 200, "runs": runs, "client_cpu_pct_max": 30.0, "idle_server_cpu_pct": 1.0}
        for k in ("moves_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_move", "server_cpu_pct"):
            out[k] = s([r[k] for r in runs])
        return out

    def joins(rss: list[float]) -> dict:
        runs = [{"joins_per_s": 500.0, "rss_kb_per_player": x, "server_cpu_us_per_join": 1000.0} for x in rss]
        out = {"players": 2000, "rooms": 1000, "runs": runs, "client_cpu_pct_max": 40.0}
        for k in ("joins_per_s", "rss_kb_per_player", "server_cpu_us_per_join"):
            out[k] = s([r[k] for r in runs])
        return out

    def arena(tick: list[float]) -> dict:
        runs = [
            {
                "tick_p99_ms": t,
                "tick_cpu_p50_ms": 0.5,
                "tick_cpu_p99_ms": t,
                "server_cpu_pct": 15.0,
                "bytes_per_client_s": 12000.0,
                "ticks_per_s": 20.0,
            }
            for t in tick
        ]
        out = {"players": 100, "input_hz": 2.0, "runs": runs, "client_cpu_pct_max": 10.0}
        for k in (
            "tick_p99_ms",
            "tick_cpu_p50_ms",
            "tick_cpu_p99_ms",
            "server_cpu_pct",
            "bytes_per_client_s",
            "ticks_per_s",
        ):
            out[k] = s([r[k] for r in runs])
        return out

    report = {
        "date": "2026-12-01 10:00 UTC",
        "quick": False,
        "machine": {"cpus": 2, "platform": "Linux", "python": "3.11.7"},
        "settings": {"reps": 3, "workers": 2},
        "load_start": [1.0, 1.0, 1.0],
        "load_end": [1.0, 1.0, 1.0],
        "moves": [
            moves("memory", [3000.0, 2000.0, 4000.0], [300.0, 300.0, 300.0]),
            moves("sqlite", [1000.0] * 3, [500.0] * 3),
        ],
        "joins": joins([20.0, 20.0, 20.0]),
        "arena": arena([1.0, 1.2, 1.1]),
    }
    if colyseus:
        report["colyseus"] = {
            "versions": {
                "node": "v20.0.0",
                "colyseus": "0.18.8",
                "@colyseus/core": "0.18.17",
                "@colyseus/ws-transport": "0.18.4",
                "@colyseus/schema": "5.0.34",
                "@colyseus/sdk": "0.18.4",
            },
            # Per-repetition pairs: moves/s 3000/6000, 2000/1000, 4000/4000 -> ratios 0.5, 2, 1.
            "moves": [moves("memory", [6000.0, 1000.0, 4000.0], [100.0, 150.0, 100.0])],
            "joins": joins([40.0, 50.0, 80.0]),
            "arena": arena([2.0, 2.4, 1.1]),
            "seats": {
                "joiners": 50,
                "rtcore": {"seated": 2, "refused": {"room_locked": 48}},
                "colyseus": {"seated": 2, "refused": {"locked": 48}},
            },
        }
    return report


def _rooms_row(text: str, workload: str, figure: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == workload and cells[1] == figure:
            return cells
    raise AssertionError(f"no row {workload!r} / {figure!r} in\n{text}")


def test_rooms_table_with_colyseus_section() -> None:
    """rooms.py's table shows the measured Colyseus column and rtcore/Colyseus ratios per repetition pair.

    Mutations, each caught here: compute the ratio as Colyseus/rtcore (the
    CPU-per-move and RSS ratios invert); pair the repetitions after sorting
    each side (the moves/s ratio becomes 0.75 (0.67-2.00)); show the issue's
    quoted figure instead of the measured one (the moves/s cell reads
    7,400-7,750); put Colyseus beside ``sqlite://`` (that row's cells are no
    longer ``—``).
    """
    import rooms

    text = rooms.table(_rooms_report(colyseus=True), "benchmarks/results/fake.json")
    assert "| workload | figure | rtcore | goal | Colyseus 0.18.8 (measured) | rtcore / Colyseus |" in text
    mps = _rooms_row(text, "moves, 200 rooms, `memory://`", "moves/s")
    assert mps[2:] == ["3,000 (2,000-4,000)", "reported", "4,000 (1,000-6,000)", "1.00 (0.50-2.00)"]
    cpu = _rooms_row(text, "moves, 200 rooms, `memory://`", "server CPU µs per move")
    assert cpu[4:] == ["100 (100-150)", "3.00 (2.00-3.00)"]
    rss = _rooms_row(text, "2,000 players in 1,000 rooms", "server RSS kB per seated player")
    assert rss[4:] == ["50.0 (40.0-80.0)", "0.40 (0.25-0.50)"]
    sqlite = _rooms_row(text, "moves, 200 rooms, `sqlite://`", "moves/s")
    assert sqlite[4:] == ["—", "—"]
    tick = _rooms_row(text, "1 room, 20 Hz, 100 players x 2 inputs/s", "tick p99 ms (server-side)")
    assert tick[4:] == ["2.00 (1.10-2.40)", "0.50 (0.50-1.00)"]
    assert "rtcore seated 2" in text and "Colyseus seated 2" in text
    assert text.startswith(rooms.BEGIN) and text.endswith(rooms.END)


def test_rooms_table_without_colyseus_section() -> None:
    """A results file without a ``colyseus`` section renders as before: the issue's quoted Colyseus figures, no ratio column.

    Mutation: always add the ratio column (``cy`` taken as truthy) -> the
    header and the moves/s row here change and this fails.
    """
    import rooms

    text = rooms.table(_rooms_report(colyseus=False), "benchmarks/results/fake.json")
    assert "| workload | figure | rtcore | goal | Colyseus 0.18.8 |\n|---|---|---:|---:|---:|\n" in text
    assert _rooms_row(text, "moves, 200 rooms, `memory://`", "moves/s")[2:] == [
        "3,000 (2,000-4,000)",
        "reported",
        "7,400-7,750",
    ]
    assert "rtcore / Colyseus" not in text and "Seat check" not in text


def test_rooms_merge_reps_keeps_every_repetition_in_order() -> None:
    """``--colyseus`` runs each repetition apart; merge_reps keeps them all, in run order, and re-summarises.

    Mutation: build ``runs`` from ``parts[0]`` only -> the count and the
    summary fail here; reverse the parts -> the order (which the ratio
    column pairs by) fails here.
    """
    import rooms

    parts = [
        {"runs": [{"moves_per_s": v}], "client_cpu_pct_max": c, "idle_server_cpu_pct": i}
        for v, c, i in ((3.0, 10.0, 1.0), (1.0, 30.0, 5.0), (2.0, 20.0, 3.0))
    ]
    merged = rooms.merge_reps(parts, ("moves_per_s", "p99_ms"))
    assert [r["moves_per_s"] for r in merged["runs"]] == [3.0, 1.0, 2.0]
    assert merged["moves_per_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "reps": [3.0, 1.0, 2.0]}
    assert "p99_ms" not in merged  # a key no repetition has is not invented
    assert merged["client_cpu_pct_max"] == 30.0
    assert merged["idle_server_cpu_pct"] == 3.0 and merged["idle_server_cpu_pct_reps"] == [1.0, 5.0, 3.0]


def test_rooms_results_path_never_overwrites_an_earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full ``rooms.py`` run writes a results file of its own: ``rooms-DATE.json``, then ``-2``, ``-3``...

    Mutation: ``_fresh_results_path`` returns the dated name even when it
    exists (the old behaviour, which overwrote the day's first run) -> fails.
    """
    import rooms

    (tmp_path / "results").mkdir()
    monkeypatch.setattr(rooms, "HERE", tmp_path)
    first = rooms._fresh_results_path(quick=False)
    first.write_text("{}")
    second = rooms._fresh_results_path(quick=False)
    second.write_text("{}")
    third = rooms._fresh_results_path(quick=False)
    assert len({first, second, third}) == 3 and not third.exists()
    assert second.name == first.name.replace(".json", "-2.json") and third.name.endswith("-3.json")

"""Summaries, the README table and the plots, all from a run.py results JSON.

``python benchmarks/report.py benchmarks/results/<date>.json`` regenerates the
table between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
``benchmarks/README.md`` and the PNG plots next to the JSON, without running
anything (``--no-plots`` skips matplotlib, ``--readme PATH`` picks another
file). run.py calls the same functions at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER = "peer"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

#: metric suffix -> (label, higher is better)
_SUFFIX = {
    "rps": ("commands/s", True),
    "dps": ("deliveries/s", True),
    "p50_ms": ("p50 ms", False),
    "p99_ms": ("p99 ms", False),
    "cpu_us": ("server CPU µs per op", False),
    "redis_cpu_us": ("redis-server CPU µs per op", False),
}

#: issue 10's goals, next to the metric they are about
GOALS = {
    "echo_rps": "≥ 1.0x peer",
    "echo_p99_ms": "≤ peer",
    "keyed_memory_rps": "≥ 0.8x peer echo",
    "keyed_sqlite_rps": "≥ 3,000/s",
    "keyed_redis_rps": "≥ 5,000/s",
    "idle_kb_per_conn": "≤ 8 kB",
    "conn_rate_first": "≥ peer",
    "conn_rate_flat": "flat (≈ 1.0)",
    "storm_resume_s": "≤ 10 s",
    "storm_lost": "0",
    "storm_dup": "0",
}


def metric_keys(result: dict[str, Any]) -> list[str]:
    """The metrics in the order the table shows them (only those some run has)."""
    present: set[str] = set()
    for run in result["runs"]:
        present.update(k for k, v in run["metrics"].items() if isinstance(v, int | float))
    cfg = result["settings"]
    sizes = [s for s, _ in cfg["fanout"]] + [cfg["conns_total"]]
    order = [f"echo_{s}" for s in ("rps", "p50_ms", "p99_ms", "cpu_us")]
    for b in ("memory", "sqlite", "redis"):
        order += [f"keyed_{b}_{s}" for s in ("rps", "p50_ms", "p99_ms", "cpu_us", "redis_cpu_us")]
    for n in sizes:
        order += [f"fanout_{n}_{s}" for s in ("dps", "p50_ms", "p99_ms", "cpu_us", "missing", "lost_dup")]
    order += [
        "idle_kb_per_conn",
        "rss_mb_at_n",
        "conn_rate_first",
        "conn_rate_last",
        "conn_rate_flat",
        "conn_cpu_us",
        "conn_errors",
    ]
    order += [
        "storm_resume_s",
        "storm_from_stop_s",
        "storm_shutdown_s",
        "storm_restart_s",
        "storm_not_resumed",
        "storm_lost",
        "storm_dup",
        "storm_not_recovered",
        "storm_reconnects",
        "storm_cpu_us",
    ]
    return [k for k in order if k in present]


def label(key: str, cfg: dict[str, Any]) -> tuple[str, bool | None]:
    """Human label and direction (True: higher is better, None: a count that should be 0 or informative)."""
    conns = cfg["connections"]
    n = cfg["conns_total"]
    events = {s: e for s, e in cfg["fanout"]}
    events[n] = cfg["fanout_big_events"]
    fixed = {
        "idle_kb_per_conn": (f"idle authenticated connection + 1 subscription: kB RSS each ({n:,} open)", False),
        "rss_mb_at_n": (f"server RSS MB with {n:,} open", False),
        "conn_rate_first": (f"connect+hello+sub per s, first {cfg['conns_step']:,}", True),
        "conn_rate_last": (f"connect+hello+sub per s, last step (to {n:,})", True),
        "conn_rate_flat": ("connect rate last step / first step", True),
        "conn_cpu_us": ("server CPU µs per connect+hello+sub", False),
        "conn_errors": ("connections that failed to open", None),
        "storm_resume_s": (
            f"{cfg['storm_total']:,} clients resume after sqlite restart: s from READY until all hold the last event",
            False,
        ),
        "storm_from_stop_s": ("restart storm: s from SIGTERM until all resumed", False),
        "storm_shutdown_s": ("restart storm: s from SIGTERM until the old server exited", False),
        "storm_restart_s": ("restart storm: s for the server process to restart", False),
        "storm_not_resumed": ("restart storm: clients not resumed in time", None),
        "storm_lost": ("restart storm: events lost (gaps)", None),
        "storm_dup": ("restart storm: events duplicated", None),
        "storm_not_recovered": ("restart storm: resumes without recovered:true", None),
        "storm_reconnects": ("restart storm: successful reconnects", None),
        "storm_cpu_us": ("restart storm: server CPU µs per client resumed", False),
        "storm_listen_overflows": ("restart storm: connections dropped from a full accept queue (machine-wide count)", False),
    }
    if key in fixed:
        return fixed[key]
    m = re.match(r"(echo|keyed_(\w+?)|fanout_(\d+))_(rps|dps|p50_ms|p99_ms|cpu_us|redis_cpu_us|missing|lost_dup)$", key)
    if not m:
        return key, None
    suffix = m.group(4)
    if m.group(1) == "echo":
        head = f"echo, {conns} conns x 1 in flight"
    elif m.group(2):
        head = f"keyed append, `{m.group(2)}://`, {conns} conns"
    else:
        subs = int(m.group(3))
        head = f"fan-out {subs:,} subs x {events.get(subs, '?')} events"
    if suffix == "missing":
        return f"{head}: deliveries missing", None
    if suffix == "lost_dup":
        return f"{head}: lost+duplicated", None
    text, higher = _SUFFIX[suffix]
    if suffix == "cpu_us" and m.group(3):
        text = "server CPU µs per delivery"
    return f"{head}: {text}", higher


def _spread(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "all": values}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "all": values}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Median and min-max per metric and server, and the per-repetition ratios rtcore/peer."""
    by: dict[str, dict[str, dict[int, float]]] = {}
    client: dict[str, dict[str, list[float]]] = {}
    for run in result["runs"]:
        for k, v in run["metrics"].items():
            if isinstance(v, int | float):
                by.setdefault(k, {}).setdefault(run["server"], {})[run["rep"]] = v
        for k, v in run["metrics"].items():
            if "_client_" in k and isinstance(v, int | float) and not math.isnan(v):
                base, stat = k.split("_client_", 1)
                client.setdefault(f"{base}:{stat}", {}).setdefault(run["server"], []).append(v)
    summary: dict[str, Any] = {"metrics": {}, "client": {}}
    for key in metric_keys(result):
        servers = by.get(key, {})
        entry: dict[str, Any] = {s: _spread([v for _, v in sorted(reps.items())]) for s, reps in servers.items()}
        ratios: dict[str, Any] = {}
        ref_key = "echo_rps" if key == "keyed_memory_rps" else key
        peer = by.get(ref_key, {}).get(PEER)
        if peer:
            for s, reps in servers.items():
                if s == PEER:
                    continue
                rs = [reps[r] / peer[r] for r in reps if peer.get(r)]
                ratios[s] = _spread(rs)
        entry["ratio"] = ratios
        entry["ratio_against"] = "peer echo_rps" if ref_key != key else "peer"
        summary["metrics"][key] = entry
    for k, servers in client.items():
        summary["client"][k] = {s: {"max": max(v), "median": statistics.median(v)} for s, v in servers.items() if v}
    return summary


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a == int(a):
        return f"{int(v)}"
    return f"{v:.2f}"


def _cell(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"


def table(result: dict[str, Any]) -> str:
    """The Markdown results table and the notes under it."""
    summary = result.get("summary") or summarise(result)
    servers = result["servers"]
    rt = [s for s in servers if s != PEER]
    cfg = result["settings"]
    v = result["versions"]
    ls, le = result["load_start"], result.get("load_end") or [float("nan")] * 3
    lines = [
        f"{result['date']}, {result['machine']['cpus']} vCPU, {result['machine']['platform']}, Python {v['python']}, "
        f"rtcore {v['rtcore']} (git {v.get('git', '?')}), anyio {v['anyio']}, wsproto {v['wsproto']}, msgspec {v['msgspec']}, "
        f"trio {v['trio']}, uvloop {v['uvloop']}, websockets {v['websockets']} (peer), redis-server {v['redis-server']}. "
        f"`{result['command'].strip()}`: {cfg['reps']} repetition(s), server order rotated each repetition, "
        f"{cfg['workers']} load-client processes on {result.get('client_loop', '?')}. "
        f"Load average at start {', '.join(f'{x:.2f}' for x in ls)}, at end {', '.join(f'{x:.2f}' for x in le)} "
        f"(2 vCPU shared with other jobs: compare ratios and CPU per op within this run, not absolute numbers across runs). "
        f"Cells: median (min-max) over the repetitions; ratio = rtcore/peer per repetition (for keyed `memory://` "
        f"commands/s: against the peer's echo). Every repetition is in the JSON.",
        "",
        "| metric | "
        + " | ".join(f"{s}" for s in servers)
        + " | "
        + " | ".join(f"{s.split('-', 1)[1]}/peer" for s in rt)
        + " | goal |",
        "|---|" + "---:|" * (len(servers) + len(rt)) + "---|",
    ]
    for key, entry in summary["metrics"].items():
        text, _ = label(key, cfg)
        cells = [_cell(entry.get(s)) for s in servers]
        ratios = [_cell(entry["ratio"].get(s)) if entry["ratio"] else "—" for s in rt]
        lines.append(f"| {text} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {GOALS.get(key, '')} |")
    lines.append("")
    for f in result.get("failures", []):
        lines.append(
            f"**Failed measurement** (left out of the medians): {f['workload']} rep {f['rep'] + 1} {f['server']} {f['backend']}: {f['error']}"
        )
        lines.append("")
    if not result.get("complete", True):
        lines.append("**This run was interrupted**: only the measurements above were made.")
        lines.append("")
    mb = result["client_microbench"]
    lines.append(
        f"**Load client check.** Per ~100-byte message, the hand-written client costs {mb['hand_encode_us']:.2f} µs to build "
        f"a masked frame and {mb['hand_parse_us']:.2f} µs to parse one (wsproto: {mb['wsproto_encode_us']:.2f} / "
        f"{mb['wsproto_parse_us']:.2f} µs). Measured during the windows (highest of any client process, % of one core; "
        f"median client CPU µs per op over all client processes):"
    )
    lines.append("")
    lines.append("| window | " + " | ".join(servers) + " |")
    lines.append("|---|" + "---:|" * len(servers) + "")
    keys = sorted({k.rsplit(":", 1)[0] for k in summary["client"]})
    for base in keys:
        cells = []
        for s in servers:
            core = summary["client"].get(f"{base}:max_core_pct", {}).get(s)
            per = summary["client"].get(f"{base}:cpu_us_per_op", {}).get(s)
            cells.append("—" if not core else f"{core['max']:.0f} % / {_fmt(per['median'] if per else None)} µs")
        lines.append(f"| {base.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme: Path, text: str, source: str, section: str = "") -> None:
    """Replace what is between the bench markers (each on its own line) in ``readme``; append them if missing.

    ``section`` names a second table (markers ``bench-<section>:begin``/``:end``).
    """
    begin, end = (BEGIN, END) if not section else (f"<!-- bench-{section}:begin -->", f"<!-- bench-{section}:end -->")
    body = f"{begin}\n<!-- generated by benchmarks/run.py / report.py from {source}; do not edit by hand -->\n\n{text}\n{end}"
    old = readme.read_text() if readme.exists() else ""
    # Markers count only on a line of their own, so prose that names them is left alone.
    found = re.search(rf"^{re.escape(begin)}$.*?^{re.escape(end)}$", old, flags=re.M | re.S)
    new = old[: found.start()] + body + old[found.end() :] if found else old.rstrip("\n") + "\n\n" + body + "\n"
    readme.write_text(new)


def make_plots(result: dict[str, Any], outdir: Path, stem: str) -> list[Path]:
    """fan-out throughput/p99 against subscribers and connect rate/RSS against open connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.get("summary") or summarise(result)
    cfg = result["settings"]
    sizes = sorted({s for s, _ in cfg["fanout"]} | {cfg["conns_total"]})
    written = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in result["servers"]:
        for ax, suffix in ((ax1, "dps"), (ax2, "p99_ms")):
            xs, ys, lo, hi = [], [], [], []
            for n in sizes:
                e = summary["metrics"].get(f"fanout_{n}_{suffix}", {}).get(s)
                if e and e["median"] is not None:
                    xs.append(n)
                    ys.append(e["median"])
                    lo.append(e["median"] - e["min"])
                    hi.append(e["max"] - e["median"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=s)
    ax1.set(xscale="log", xlabel="subscribers", ylabel="deliveries/s", title="fan-out throughput")
    ax2.set(xscale="log", yscale="log", xlabel="subscribers", ylabel="publish → receive p99 (ms)", title="fan-out p99")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['date']} (median, min-max bars; load avg {result['load_start'][0]:.1f})", fontsize=9)
    fig.tight_layout()
    path = outdir / f"{stem}-fanout.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    series: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        if run["workload"] == "conns" and "series" in run:
            series.setdefault(run["server"], []).append(run["series"])
    if series:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for s, runs in series.items():
            xs = runs[0]["open"]
            rate = [statistics.median(r["rate"][i] for r in runs) for i in range(len(xs))]
            rss = [statistics.median(r["rss_mb"][i] - r["rss0_mb"] for r in runs) for i in range(len(xs))]
            ax1.plot(xs, rate, marker="o", label=s)
            ax2.plot(xs, rss, marker="o", label=s)
        ax1.set(
            xlabel="open connections",
            ylabel="connect+hello+sub per s (step)",
            title="connect rate against open connections",
        )
        ax2.set(xlabel="open connections", ylabel="server RSS growth (MB)", title="memory against open connections")
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=0)
        fig.suptitle(f"{result['date']} (median of repetitions per step)", fontsize=9)
        fig.tight_layout()
        path = outdir / f"{stem}-connections.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def render(
    result: dict[str, Any], json_path: Path, readme: Path | None, *, plots: bool = True, section: str = ""
) -> None:
    """Plots next to the JSON and the README table (when ``readme`` is given)."""
    json_path = json_path.resolve()
    if readme is not None:
        readme = readme.resolve()
    stem = json_path.stem
    images: list[Path] = []
    if plots:
        images = make_plots(result, json_path.parent, stem)
    if readme is not None:
        text = table(result)
        if images:
            rel = [p.relative_to(readme.parent) if p.is_relative_to(readme.parent) else p for p in images]
            text += "\n\n" + "\n".join(f"![{p.stem}]({p.as_posix()})" for p in rel)
        try:
            source = json_path.resolve().relative_to(HERE.parent).as_posix()
        except ValueError:
            source = json_path.name
        update_readme(readme, text, source, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--section", default="", help="write a second table between bench-SECTION:begin/end markers")
    opts = parser.parse_args(argv)
    result = json.loads(opts.json.read_text())
    result["summary"] = summarise(result)
    render(result, opts.json, opts.readme, plots=not opts.no_plots, section=opts.section)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

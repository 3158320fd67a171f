"""The read-only admin page: ``GET /admin`` and its data, ``GET /admin/api``.

Off unless the server has an admin token (``Server(admin_token=...)``,
``rtcore serve --admin-token`` or ``RTCORE_ADMIN_TOKEN``). The page itself
carries no data; its script asks ``/admin/api`` every second with the token in
an ``Authorization: Bearer`` header (taken from the URL fragment, which
browsers never send to the server, or typed in), so the token is not in any
request line or access log.

Why the numbers are what ``/metrics`` says: ``/admin/api`` renders the very
exposition text ``/metrics`` serves and parses it back with
prometheus-client's parser, instead of reading the recorders a second way.
The page draws the four measures from their cumulative counters: message
latency (publish → written), queue processing time (append → fanned out),
API response duration (commands) and synchronisation delay (the oldest event a
lagging subscriber is waiting for).
"""

from __future__ import annotations

import hmac
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..transport import HttpRequest, HttpResponse, error_response, json_response

if TYPE_CHECKING:
    from ..engine.node import Node
    from .registry import SessionRegistry

__all__ = ["ADMIN_PAGE", "admin_data", "authorized"]

#: Streams listed on the page at most (the busiest first).
MAX_STREAMS = 200


def authorized(request: HttpRequest, token: str) -> bool:
    """Whether ``request`` carries ``token`` as its bearer token (constant-time compare)."""
    given = request.token or ""
    return hmac.compare_digest(given.encode(), token.encode())


def _metrics(text: str) -> dict[str, Any]:
    """``/metrics`` text → ``{family: value}`` (labelled: a list; histograms: count and sum)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            series: dict[str, dict[str, float]] = {}
            for s in family.samples:
                if s.name.endswith(("_count", "_sum")):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    series.setdefault(labels, {})[s.name.rsplit("_", 1)[1]] = s.value
            out[family.name] = series
        elif all(not s.labels for s in family.samples) and len(family.samples) == 1:
            out[family.name] = family.samples[0].value
        else:
            out[family.name] = [{"labels": s.labels, "value": s.value} for s in family.samples]
    return out


async def admin_data(node: Node, sessions: SessionRegistry, roles: frozenset[str], metrics_text: str) -> dict[str, Any]:
    """Everything the admin page shows, as JSON-ready data."""
    per_stream: Counter[str] = Counter()
    connections = []
    for entry in sessions:
        info = entry.info()
        for sub in info.subscriptions:
            per_stream[sub.stream] += 1
        connections.append(
            {
                "id": info.id,
                "kind": info.kind,
                "principal": info.principal,
                "opened_at": info.opened_at,
                "subscriptions": len(info.subscriptions),
                "queued_bytes": info.queued_bytes,
            }
        )
    streams = []
    for stream, subscribers in per_stream.most_common(MAX_STREAMS):
        shape = await node.backend.events.info(stream)
        rule = node.app.retention_for(stream)
        streams.append(
            {
                "stream": stream,
                "head": shape.head,
                "first": shape.first,
                "epoch": shape.epoch,
                "subscribers": subscribers,
                "retention": None if rule is None else {"max_events": rule.max_events, "max_age": rule.max_age},
            }
        )
    sections: dict[str, Any] = {}
    for name, section in node.app.admin_sections.items():
        try:
            sections[name] = await section(node)
        except Exception as exc:  # a plugin's bug must not take the page down
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "node": {"id": node.id, "roles": sorted(roles), "backend": node.backend.url.split("@")[-1], "draining": node.draining},
        "connections": connections[:500],
        "connection_count": len(connections),
        "streams": streams,
        "processors": [
            {"pattern": p.pattern, "group": p.group, "handler": getattr(p.handler, "__name__", "?")} for p in node.app.processors
        ],
        "stats": dict(node.stats),
        "sections": sections,
        "metrics": _metrics(metrics_text),
    }


async def handle(
    request: HttpRequest, token: str | None, node: Node, sessions: SessionRegistry, roles: frozenset[str], metrics_text: str
) -> HttpResponse:
    """Answer ``/admin`` and ``/admin/api`` (404 when no token is configured)."""
    if token is None:
        return error_response(404, "not_found", f"no route for {request.method} {request.path}")
    if request.method not in ("GET", "HEAD"):
        return error_response(405, "method_not_allowed", "the admin page is read-only", [(b"allow", b"GET, HEAD")])
    if request.path in ("/admin", "/admin/"):
        return HttpResponse(
            200,
            [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")],
            ADMIN_PAGE,
        )
    if request.path == "/admin/api":
        if not authorized(request, token):
            return error_response(401, "unauthorized", "the admin API needs the admin token", [(b"www-authenticate", b'Bearer realm="rtcore-admin"')])
        data = await admin_data(node, sessions, roles, metrics_text)
        return json_response(200, data, [(b"cache-control", b"no-store")])
    return error_response(404, "not_found", f"no route for {request.method} {request.path}")


ADMIN_PAGE = rb"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtcore admin</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px} h2{font-size:15px;margin:16px 0 6px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(320px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
canvas{width:100%;height:120px} table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left;font-variant-numeric:tabular-nums}
#status{color:#666} .num{text-align:right}
</style></head><body>
<h1>rtcore admin <span id="status">connecting</span></h1>
<div id="node"></div>
<div class="grid">
 <div class="card"><b>Message latency</b> (publish &rarr; written, mean ms/s) <span id="m-latency"></span><canvas id="c-latency"></canvas></div>
 <div class="card"><b>Queue processing time</b> (append &rarr; fanned out, mean ms/s) <span id="m-queue"></span><canvas id="c-queue"></canvas></div>
 <div class="card"><b>API response duration</b> (commands, mean ms/s) <span id="m-api"></span><canvas id="c-api"></canvas></div>
 <div class="card"><b>Synchronisation delay</b> (oldest event a subscriber waits for, s) <span id="m-sync"></span><canvas id="c-sync"></canvas></div>
</div>
<h2>Totals</h2><table id="totals"></table>
<h2>Streams</h2><table id="streams"><tr><th>stream</th><th class="num">head</th><th class="num">subscribers</th></tr></table>
<h2>Processors</h2><div id="processors"></div>
<div>retries <span id="s-retries">0</span> &middot; dead letters <span id="s-dead">0</span></div>
<h2>Rooms on this node (<span id="rooms-count">0</span>)</h2><table id="rooms"></table>
<h2>Connections (<span id="conn-count">0</span>)</h2><table id="connections"></table>
<script>
"use strict";
const token = decodeURIComponent(location.hash.slice(1)) || sessionStorage.getItem("rtcore-admin") || prompt("admin token") || "";
sessionStorage.setItem("rtcore-admin", token);
const series = {latency: [], queue: [], api: [], sync: []};
let prev = null;
function hist(m, name, key) {
  const h = (m[name] || {})[key || ""] || Object.values(m[name] || {}).reduce(
    (a, b) => ({count: (a.count || 0) + (b.count || 0), sum: (a.sum || 0) + (b.sum || 0)}), {});
  return {count: h.count || 0, sum: h.sum || 0};
}
function meanMs(now, before) {
  const n = now.count - (before ? before.count : 0);
  return n > 0 ? 1000 * (now.sum - before.sum) / n : 0;
}
function draw(id, values) {
  const c = document.getElementById(id), ctx = c.getContext("2d");
  c.width = c.clientWidth; c.height = c.clientHeight;
  const max = Math.max(1e-9, ...values);
  ctx.strokeStyle = "#1f6feb"; ctx.lineWidth = 2; ctx.beginPath();
  values.forEach((v, i) => {
    const x = i * c.width / 59, y = c.height - 4 - (c.height - 8) * v / max;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke(); ctx.fillStyle = "#666"; ctx.fillText(max.toPrecision(3), 2, 10);
}
function push(name, value) {
  const s = series[name]; s.push(value); if (s.length > 60) s.shift();
  document.getElementById("m-" + name).textContent = value.toFixed(3);
  draw("c-" + name, s);
}
function rows(id, head, items) {
  document.getElementById(id).innerHTML = head + items.join("");
}
const total = (v) => Array.isArray(v) ? v.reduce((a, s) => a + s.value, 0) : v;
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
async function tick() {
  let data;
  try {
    const r = await fetch(location.pathname.replace(/\/?$/, "/") + "api", {headers: {Authorization: "Bearer " + token}});
    if (!r.ok) { document.getElementById("status").textContent = "HTTP " + r.status; return; }
    data = await r.json();
  } catch (e) { document.getElementById("status").textContent = "unreachable"; return; }
  const m = data.metrics;
  document.getElementById("status").textContent = "live";
  document.getElementById("node").textContent =
    `node ${data.node.id} \u00b7 roles ${data.node.roles.join(", ")} \u00b7 backend ${data.node.backend}` + (data.node.draining ? " \u00b7 draining" : "");
  const now = {latency: hist(m, "rtcore_message_latency_seconds", "stage=written"),
               queue: hist(m, "rtcore_event_dispatch_lag_seconds"),
               api: hist(m, "rtcore_command_duration_seconds")};
  for (const k of ["latency", "queue", "api"]) push(k, prev ? meanMs(now[k], prev[k]) : 0);
  push("sync", m.rtcore_subscriber_lag_seconds_max || 0);
  prev = now;
  const totals = [["connections", m.rtcore_connections], ["subscriptions", m.rtcore_subscriptions],
    ["deliveries", m.rtcore_deliveries], ["commands", now.api.count], ["slow-consumer cuts", m.rtcore_slow_consumer_disconnects],
    ["resumes", m.rtcore_resumes], ["replays", m.rtcore_replays]].map(([k, v]) => [k, total(v)]);
  rows("totals", "", totals.map(([k, v]) => `<tr><th>${k}</th><td class="num" id="t-${k.replace(/ /g, "-")}">${v === undefined ? "" : v}</td></tr>`));
  rows("streams", "<tr><th>stream</th><th class=num>head</th><th class=num>subscribers</th><th>retention</th></tr>",
    data.streams.map((s) => `<tr><td>${esc(s.stream)}</td><td class=num>${s.head}</td><td class=num>${s.subscribers}</td>` +
      `<td>${s.retention ? JSON.stringify(s.retention) : "all"}</td></tr>`));
  const depths = Array.isArray(m.rtcore_processor_queue_depth) ? m.rtcore_processor_queue_depth : [];
  document.getElementById("processors").textContent = data.processors.length
    ? data.processors.map((p) => `${p.handler} on ${p.pattern}` + (p.group ? ` (group ${p.group})` : "") +
        `: queue ${(depths.find((d) => d.labels.processor === p.handler) || {value: 0}).value}`).join(" \u00b7 ")
    : "none";
  document.getElementById("s-retries").textContent = data.stats.processor_retries || 0;
  document.getElementById("s-dead").textContent = data.stats.dead_letters || 0;
  const rooms = Array.isArray(data.sections.rooms) ? data.sections.rooms : [];
  document.getElementById("rooms-count").textContent = rooms.length;
  rows("rooms", "<tr><th>room</th><th>type</th><th class=num>members</th><th class=num>patches</th><th>locked</th></tr>",
    rooms.map((r) => `<tr><td>${esc(r.id)}</td><td>${esc(r.type)}</td><td class=num>${r.members}</td><td class=num>${r.head}</td><td>${r.locked}</td></tr>`));
  document.getElementById("conn-count").textContent = data.connection_count;
  rows("connections", "<tr><th>principal</th><th>kind</th><th class=num>subscriptions</th><th class=num>queued bytes</th></tr>",
    data.connections.map((c) => `<tr><td>${esc(c.principal)}</td><td>${c.kind}</td><td class=num>${c.subscriptions}</td><td class=num>${c.queued_bytes}</td></tr>`));
}
tick(); setInterval(tick, 1000);
</script></body></html>
"""

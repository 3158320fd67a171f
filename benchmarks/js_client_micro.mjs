// Micro-measurements of rtcore.js's CPU costs in Node (not an A/B benchmark):
// parsing an 8 KB room patch frame with floats (parseJSON vs JSON.parse), the
// checksum of a 100-player state, and BLAKE2b throughput. Prints one JSON line
// per repeat with the load average (the machine may be shared).
//   node benchmarks/js_client_micro.mjs [repeats]
import { readFileSync } from "node:fs";
import { parseJSON, checksum, blake2b } from "../clients/js/rtcore.js";

const players = {};
for (let i = 0; i < 100; i++) players["p" + i] = { x: 10.5 + i, y: 20.25 * i, vx: 1.0, vy: -0.5, hp: 100, name: "bot-" + i, seq: i * 7 };
const state = { tick: 1234, players, status: "playing" };
const frame = JSON.stringify({ t: "evt", stream: "room:x", epoch: "e", offset: 9, type: "patch", data: { ops: [["set", ["state", "players"], players]] }, ts: 1.5 });
const typed = parseJSON(JSON.stringify(state));
const per = (n, fn) => { const t = performance.now(); for (let i = 0; i < n; i++) fn(); return +(((performance.now() - t) * 1000) / n).toFixed(1); };
const buf = new Uint8Array(1 << 20);
for (let r = 0; r < Number(process.argv[2] || 3); r++) {
  const out = {
    frame_bytes: frame.length,
    parseJSON_us: per(2000, () => parseJSON(frame)),
    JSON_parse_us: per(2000, () => JSON.parse(frame)),
    checksum_100_players_us: per(500, () => checksum(typed)),
    blake2b_MB_per_s: +(1 / (per(5, () => blake2b(buf, 16)) / 1e6)).toFixed(1),
    loadavg: readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" "),
  };
  console.log(JSON.stringify(out));
}

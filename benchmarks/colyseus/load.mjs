// A load-client process of `benchmarks/rooms.py --colyseus` (the Colyseus SDK, @colyseus/sdk).
//
//   node load.mjs '{"mode": "moves" | "joins" | "arena" | "seats", ...}'
//
// The same workloads, in the same shape, as rooms.py's Python workers drive
// against rtcore. The parent steers it with lines on stdin ("go", "release")
// and reads JSON lines on stdout: {"ev": "ready"} once set up, then
// {"ev": "result", ...} per repetition (the parent's barrier is "every worker
// said ready / result"). Diagnostics go to stderr.
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import readline from "node:readline";
import { performance } from "node:perf_hooks";
import { Client } from "@colyseus/sdk";

const args = JSON.parse(process.argv[2]);
const client = new Client(args.url);
const lines = readline.createInterface({ input: process.stdin });
const waiting = [];
const early = [];
let eof = false;
lines.on("line", (line) => {
  const w = waiting.shift();
  if (w) w(line.trim());
  else early.push(line.trim());
});
lines.on("close", () => {
  // The parent went away (or gave no stdin): every wait ends.
  eof = true;
  for (const w of waiting.splice(0)) w("eof");
});
const nextLine = () => (early.length ? Promise.resolve(early.shift()) : eof ? Promise.resolve("eof") : new Promise((resolve) => waiting.push(resolve)));
// A result line with latency samples is hundreds of kB; one such line came
// through the pipe with a 64 KiB stretch in the wrong place (the parent's
// json.loads failed at char 458,752 = 7 x 65,536). Big messages go through a
// file instead, and the line on stdout names it.
let files = 0;
const say = (obj) => {
  let line = JSON.stringify({ ...obj, pid: process.pid });
  if (line.length > 16384) {
    const path = join(tmpdir(), `rtcore-colyseus-${process.pid}-${files++}.json`);
    writeFileSync(path, line);
    line = JSON.stringify({ ev: "file", path, pid: process.pid });
  }
  process.stdout.write(line + "\n");
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function limited(n, limit, fn) {
  // fn(0..n-1) with at most `limit` in flight.
  let next = 0;
  const out = new Array(n);
  async function lane() {
    while (next < n) {
      const i = next++;
      out[i] = await fn(i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, n) }, lane));
  return out;
}

function firstState(room) {
  // joinOrCreate resolves on the JOIN_ROOM handshake; the full state (ROOM_STATE)
  // comes after the client acknowledges it, so wait for the first state change.
  return new Promise((resolve) => room.onStateChange.once(() => resolve()));
}

async function moves() {
  // `rooms` duel rooms, both players in this process; one move in flight per room.
  const pairs = await limited(args.rooms, 32, async () => {
    const a = await client.create("duel");
    const b = await client.joinById(a.roomId);
    return [a, b];
  });
  const st = { playing: false, lat: [], done: 0, errors: 0, tEnd: 0 };
  let n = 0;
  const t0s = new Map();
  const move = (room) => {
    n += 1;
    t0s.set(room, performance.now());
    room.send("move", { n });
  };
  for (const pair of pairs) {
    for (const room of pair) {
      room.onMessage("rejected", () => { st.errors += 1; });
      room.onStateChange((state) => {
        const turn = state.turn;
        if (!turn) return;
        const t0 = t0s.get(room);
        if (t0 !== undefined && turn !== room.sessionId) {
          t0s.delete(room);
          const now = performance.now();
          if (now <= st.tEnd) {
            st.lat.push((now - t0) / 1e3);
            st.done += 1;
          }
        }
        if (turn === room.sessionId && st.playing && !t0s.has(room)) move(room);
      });
    }
  }
  // Wait until every room has its first turn set.
  while (pairs.some(([a]) => !a.state || !a.state.turn)) await sleep(50);
  say({ ev: "ready" });
  for (let rep = 0; rep < args.reps; rep++) {
    if ((await nextLine()) !== "go") break;
    Object.assign(st, { playing: true, lat: [], done: 0, errors: 0, tEnd: performance.now() + args.seconds * 1e3 });
    for (const [a, b] of pairs) move(a.state.turn === a.sessionId ? a : b);
    await sleep(args.seconds * 1e3);
    st.playing = false;
    await sleep(500); // moves in flight finish
    // Sanity: the rooms' move counters add up to what the clients saw.
    let counted = 0;
    for (const [a] of pairs) counted += a.state.moves;
    say({ ev: "result", lat: st.lat, moves: st.done, errors: st.errors, state_moves_total: counted });
  }
  await Promise.allSettled(pairs.flat().map((r) => r.leave()));
}

async function joins() {
  // `players` joinOrCreate("duel") + first state, `inflight` at a time; stay seated until "release".
  say({ ev: "ready" });
  if ((await nextLine()) !== "go") return;
  const t0 = performance.now();
  let failed = 0;
  const rooms = (await limited(args.players, args.inflight, async () => {
    try {
      const room = await client.joinOrCreate("duel");
      await firstState(room);
      return room;
    } catch (e) {
      failed += 1;
      if (failed === 1) process.stderr.write(`join failed: ${e}\n`);
      return null;
    }
  })).filter(Boolean);
  say({ ev: "result", seconds: (performance.now() - t0) / 1e3, joined: rooms.length, failed });
  await nextLine(); // "release": the parent has read the server's RSS
  await Promise.allSettled(rooms.map((r) => r.leave()));
}

async function arena() {
  // Each of `names` joins the arena room; per repetition every player sends an
  // input every 1/inputHz s (staggered) for `seconds`; bytes of state frames counted.
  const rooms = [];
  for (let i = 0; i < args.names.length; i++) rooms.push(await client.joinById(args.roomId));
  const counting = { on: false, bytes: 0, frames: 0, inputs: 0 };
  for (const room of rooms) {
    // Count the state frames (ROOM_STATE 14, ROOM_STATE_PATCH 15; the low bits carry the code).
    const events = room.connection.events;
    const deliver = events.onmessage;
    events.onmessage = (event) => {
      if (counting.on) {
        const buf = new Uint8Array(event.data);
        const code = buf[0] & 0x3f;
        if (code === 14 || code === 15) {
          counting.bytes += buf.byteLength;
          counting.frames += 1;
        }
      }
      deliver(event);
    };
    room.onStateChange(() => {});
  }
  say({ ev: "ready" });
  for (let rep = 0; rep < args.reps; rep++) {
    if ((await nextLine()) !== "go") break;
    Object.assign(counting, { on: true, bytes: 0, frames: 0, inputs: 0 });
    const t0 = performance.now();
    const until = t0 + args.seconds * 1e3;
    const period = 1e3 / args.inputHz;
    await Promise.all(rooms.map(async (room, i) => {
      await sleep((i / rooms.length) * period);
      let k = 0;
      while (performance.now() < until) {
        k += 1;
        room.send("input", { x: k * 0.5, y: -k * 0.25 });
        counting.inputs += 1;
        await sleep(period);
      }
    }));
    const elapsed = (performance.now() - t0) / 1e3;
    counting.on = false;
    say({ ev: "result", bytes: counting.bytes, frames: counting.frames, inputs: counting.inputs, clients: rooms.length, seconds: elapsed });
    await sleep(300);
  }
  await Promise.allSettled(rooms.map((r) => r.leave()));
}

async function seats() {
  // Sanity: `joiners` concurrent joinById on one empty 2-seat duel room; how many get a seat.
  const got = await Promise.allSettled(Array.from({ length: args.joiners }, () => client.joinById(args.roomId)));
  const ok = got.filter((g) => g.status === "fulfilled");
  const reasons = {};
  for (const g of got) if (g.status === "rejected") reasons[String(g.reason?.message ?? g.reason)] = (reasons[String(g.reason?.message ?? g.reason)] || 0) + 1;
  say({ ev: "result", joiners: args.joiners, seated: ok.length, refused: reasons });
  await Promise.allSettled(ok.map((g) => g.value.leave()));
}

const modes = { moves, joins, arena, seats };
// Exit once stdout is flushed (process.exit() does not wait for pending
// writes); the callback of this last, empty write runs after those before it.
let exitCode = 0;
try {
  await modes[args.mode]();
} catch (e) {
  process.stderr.write(`load.mjs ${args.mode}: ${e?.stack ?? e}\n`);
  say({ ev: "error", error: String(e) });
  exitCode = 1;
}
process.stdout.write("", () => process.exit(exitCode));

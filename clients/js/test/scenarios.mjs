// Scenarios run by Node (client.test.mjs) and by headless Chromium (tests/js/test_js_client.py):
// the same code, against a real `rtcore serve tests/js/jsapp.py:app`. No dependencies:
// a tiny assert below, because node:assert does not exist in a browser.

export function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

function same(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== "object") return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a).sort(), kb = Object.keys(b).sort();
  return ka.length === kb.length && ka.every((k, i) => k === kb[i] && same(a[k], b[k]));
}

const show = (v) => JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? `${x}n` : x));

export function checkSame(a, b, what) {
  if (!same(a, b)) throw new Error(`check failed: ${what}: ${show(a)} != ${show(b)}`);
}

const uniq = (prefix) => `${prefix}:${Math.random().toString(36).slice(2, 10)}`;

async function take(sub, n) {
  const out = [];
  for await (const item of sub) {
    out.push(item);
    if (out.length === n) break;
  }
  return out;
}

/** Subscribe, receive in order; a keyed command runs once (the replay returns the first result). */
export async function subscribeReceive(rt, { url, WebSocket }) {
  const opts = { WebSocket, backoffBase: 0.05, backoffMax: 0.5 };
  const reader = await rt.Client.connect(url, { ...opts, token: "reader" });
  const writer = await rt.Client.connect(url, { ...opts, token: "writer" });
  try {
    const stream = uniq("feed");
    const sub = await reader.subscribe(stream);
    for (let n = 0; n < 5; n++) await writer.command("pub", { stream, n });
    const items = await take(sub, 5);
    checkSame(items.map((i) => i.t), ["evt", "evt", "evt", "evt", "evt"], "items");
    checkSame(items.map((i) => i.offset), [1, 2, 3, 4, 5], "offsets");
    checkSame(items.map((i) => i.data.n), [0, 1, 2, 3, 4], "data");
    checkSame(sub.position, { epoch: items[0].epoch, offset: 5 }, "consumed position");
    const key = uniq("k");
    const first = await writer.command("pub", { stream, n: 5 }, { key });
    const again = await writer.command("pub", { stream, n: 5 }, { key });
    checkSame([first, again], [6, 6], "same key, same result");
    checkSame(await writer.command("pub", { stream, n: 6 }), 7, "the replay appended nothing");
    let error = null;
    try { await writer.command("nope"); } catch (e) { error = e; }
    check(error instanceof rt.RtcoreError && error.code === "unknown_command", `unknown command → RtcoreError(unknown_command), got ${error && error.code}`);
    return { ok: true };
  } finally {
    await reader.close();
    await writer.close();
  }
}

/** A transport that delivers every message twice: the client drops the copies by offset. */
export async function dedup(rt, { url, WebSocket }) {
  const Base = WebSocket || globalThis.WebSocket;
  class Twice extends Base {
    addEventListener(type, fn, ...rest) {
      if (type !== "message") return super.addEventListener(type, fn, ...rest);
      // Replies and events alike arrive twice; only events carry offsets to dedup by.
      return super.addEventListener("message", (e) => { fn(e); if (/"t":"evt"/.test(e.data)) fn(e); }, ...rest);
    }
  }
  const reader = await rt.Client.connect(url, { WebSocket: Twice, token: "reader" });
  const writer = await rt.Client.connect(url, { WebSocket, token: "writer" });
  try {
    const stream = uniq("dup");
    const sub = await reader.subscribe(stream);
    for (let n = 0; n < 5; n++) await writer.command("pub", { stream, n });
    const items = await take(sub, 5);
    checkSame(items.map((i) => i.offset), [1, 2, 3, 4, 5], "each event once");
    await writer.command("pub", { stream, n: 5 });
    const [next] = await take(sub, 1);
    checkSame(next.offset, 6, "the next item is the next event, not a copy");
    check(reader.duplicates >= 5, `duplicates counted: ${reader.duplicates}`);
    return { ok: true, duplicates: reader.duplicates };
  } finally {
    await reader.close();
    await writer.close();
  }
}

/** A stateful stream: a newcomer gets a snapshot as a `missed` notice with its state. */
export async function snapshotNotice(rt, { url, WebSocket }) {
  const c = await rt.Client.connect(url, { WebSocket, token: "snap" });
  try {
    const stream = uniq("score");
    for (let n = 1; n <= 3; n++) await c.command("pub", { stream, n });
    const sub = await c.subscribe(stream);
    const [first] = await take(sub, 1);
    check(first.t === "missed", `first item is a missed notice, got ${first.t}`);
    checkSame(first.state, { total: 6 }, "snapshot state");
    check(first.checksum === rt.checksum(first.state), "the snapshot checksum equals the JS checksum");
    checkSame(first.offset, 3, "snapshot offset");
    await c.command("pub", { stream, n: 4 });
    const [evt] = await take(sub, 1);
    checkSame([evt.t, evt.offset], ["evt", 4], "events continue after the snapshot");
    return { ok: true };
  } finally {
    await c.close();
  }
}

const stateOf = (s) => JSON.parse(JSON.stringify(s, (_k, x) => (typeof x === "bigint" ? `${x}n` : x)));

/** Two players in a room: both folds equal the server's state; syncs verified; broadcasts arrive. */
export async function rooms(rt, { url, WebSocket }) {
  const ada = await rt.Client.connect(url, { WebSocket, token: uniq("ada").replace(":", "-") });
  const bob = await rt.Client.connect(url, { WebSocket, token: uniq("bob").replace(":", "-") });
  try {
    const a = await ada.create("sandbox");
    const b = await bob.join(a.id);
    check(b.id === a.id, "same room");
    const kinds = [];
    b.onChange((c) => kinds.push(c.kind));
    const said = new Promise((resolve) => b.onMessage("said", resolve));
    const values = [1, -2, 2 ** 40, 0.25, "é𝄞", null, true, [1, "x", [2]], { z: 1, a: { "𝄞": 2, "\uffff": 3 } }, "", [], {}];
    for (let i = 0; i < values.length; i++) await a.send("set", { key: `k${i}${["é", "𝄞"][i % 2]}`, value: values[i] });
    await a.send("hand", "ace");
    await b.send("hand", "king");
    await a.send("say", "hello");
    checkSame(await said, { by: a.user, text: "hello" }, "broadcast");
    for (const [room, client] of [[a, ada], [b, bob]]) {
      await room.waitFor((s) => s.log.length === values.length && (s.hands[room.user] || []).length === 1);
      const server = await room.send("get");
      checkSame(stateOf(room.state), stateOf(server), `${client === ada ? "ada" : "bob"}'s fold equals the server state`);
      check(typeof room.state.values.big === "bigint", "an int beyond 2^53 stays exact");
      check(room.verified >= 1, `sync checksums verified: ${room.verified}`);
      checkSame(room.resyncs, 0, "no resync");
      check(Object.keys(room.members).length === 2, "two members");
    }
    check(kinds.includes("patch"), "patch changes reached onChange");
    await b.leave();
    await a.waitFor((s) => Object.keys(a.members).length === 1);
    return { ok: true, verified: a.verified };
  } finally {
    await ada.close();
    await bob.close();
  }
}

/**
 * Direct messages (`msg` frames, never stored): every tab of ada gets one, once; a room
 * message goes to the room where the tab follows it (room.onMessage) and to
 * client.onMessage (with its room id) where it does not; bob, the sender, gets only
 * the marker sent to him afterwards (frames to one connection keep their order).
 * Mutations seen caught: `_routeRooms` routes no `msg` to a room → the room note never
 * comes → fails; `_onFrame` drops `msg` frames → `hi` never comes → fails.
 */
export async function directMessages(rt, { url, WebSocket }) {
  const adaName = uniq("ada").replace(":", "-");
  const ada1 = await rt.Client.connect(url, { WebSocket, token: adaName });
  const ada2 = await rt.Client.connect(url, { WebSocket, token: adaName });
  const bob = await rt.Client.connect(url, { WebSocket, token: uniq("bob").replace(":", "-") });
  try {
    const inbox = (client) => {
      const got = [];
      const waiters = [];
      client.onMessage(null, (m) => { got.push(m); for (const w of waiters.splice(0)) w(); });
      got.until = async (n) => { while (got.length < n) await within(new Promise((r) => waiters.push(r)), `message ${n}`); };
      return got;
    };
    // A message that never comes fails here, and the clients are closed (no hanging test).
    const within = (promise, what) => {
      let timer;
      const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`no ${what} within 10 s`)), 10_000); });
      return Promise.race([promise, late]).finally(() => clearTimeout(timer));
    };
    const [got1, got2, gotBob] = [inbox(ada1), inbox(ada2), inbox(bob)];
    const waitLen = (list, n) => list.until(n);
    const hi = new Promise((resolve) => ada1.onMessage("hi", resolve));
    await bob.command("dm", { to: adaName, type: "hi", data: { x: 1 } });
    checkSame(await within(hi, "hi"), { x: 1 }, "onMessage(type) gets the data");
    await waitLen(got2, 1);
    checkSame(got2[0], { type: "hi", data: { x: 1 }, room: null }, "onMessage(null) gets the whole message");
    await bob.command("dm", { to: bob.principal, type: "marker" });
    await waitLen(gotBob, 1);
    checkSame([...gotBob], [{ type: "marker", data: null, room: null }], "bob got nothing before his marker");
    const room = await ada1.create("sandbox");
    const note = new Promise((resolve) => room.onMessage("note", resolve));
    await bob.join(room.id);
    await bob.rooms.get(room.id).send("tell", adaName);
    checkSame(await within(note, "room note"), { from: bob.principal }, "room.onMessage gets the room's direct message");
    await waitLen(got2, 2);
    checkSame(got2[1], { type: "note", data: { from: bob.principal }, room: room.id }, "not a followed room: client.onMessage");
    checkSame(got1.length, 1, "ada1 follows the room: the note went to the room, not to client.onMessage");
    return { ok: true };
  } finally {
    await ada1.close();
    await ada2.close();
    await bob.close();
  }
}

/** A fold that went wrong is caught by the next `sync` checksum and resynced from a snapshot. */
export async function resync(rt, { url, WebSocket }) {
  const c = await rt.Client.connect(url, { WebSocket, token: uniq("cy").replace(":", "-") });
  try {
    const room = await c.create("sandbox");
    const seen = [];
    room.onChange((ch) => seen.push(ch.kind));
    // Corrupt the checksum copy of the public document where no later patch writes
    // (as a lost patch would): only the next `sync` can notice.
    room.view.docs.get(room.view.stream).typed.state.values.bogus = 1;
    for (let i = 0; i < 12; i++) await room.send("set", { key: `k${i}`, value: i });
    await room.waitFor(() => seen.includes("resync") && seen.lastIndexOf("snapshot") > seen.indexOf("resync"));
    await room.waitFor((s) => s.log.length === 12);
    const server = await room.send("get");
    checkSame(stateOf(room.state), stateOf(server), "state after the resync");
    check(room.resyncs >= 1, "resync counted");
    return { ok: true };
  } finally {
    await c.close();
  }
}

/** A connection that stops delivering (half-open TCP shows no error) is found by the heartbeat and replaced. */
export async function heartbeat(rt, { url, WebSocket }) {
  const Base = WebSocket || globalThis.WebSocket;
  const sockets = [];
  class Stallable extends Base {
    constructor(...args) { super(...args); this.stalled = false; sockets.push(this); }
    addEventListener(type, fn, ...rest) {
      if (type !== "message") return super.addEventListener(type, fn, ...rest);
      return super.addEventListener("message", (e) => { if (!this.stalled) fn(e); }, ...rest);
    }
  }
  const c = await rt.Client.connect(url, { WebSocket: Stallable, token: uniq("hb").replace(":", "-"), heartbeat: 0.2, backoffBase: 0.01, backoffMax: 0.05 });
  const writer = await rt.Client.connect(url, { WebSocket, token: "writer" });
  try {
    const stream = uniq("hb");
    const sub = await c.subscribe(stream);
    const reconnected = new Promise((resolve) => c.on("connected", resolve));
    sockets[0].stalled = true; // from now on the first connection delivers nothing
    await writer.command("pub", { stream, n: 1 }); // published while stalled: replayed after the reconnect
    await reconnected;
    check(sockets.length >= 2 && c.reconnects >= 1, "a new connection replaced the stalled one");
    const [item] = await take(sub, 1);
    checkSame([item.t, item.offset, item.data.n], ["evt", 1, 1], "the event sent to the stalled connection arrives on the new one");
    return { ok: true };
  } finally {
    await c.close();
    await writer.close();
  }
}

export const CORE = { subscribeReceive, dedup, snapshotNotice, rooms, resync, heartbeat, directMessages };

/**
 * The kill -9 case, driven from outside (the browser test kills and restarts the server):
 * a reader and a writer; `killPoint` resolves once `killAt` items arrived (kill the server
 * then), `done` resolves with what the reader saw once it saw `n >= total - 1`.
 */
export function killedAndRestarted(rt, { url, WebSocket, total = 150, killAt = 60 }) {
  let reachedKill;
  const killPoint = new Promise((r) => { reachedKill = r; });
  const done = (async () => {
    const opts = { WebSocket, backoffBase: 0.05, backoffMax: 0.5 };
    const reader = await rt.Client.connect(url, { ...opts, token: "r" });
    const writer = await rt.Client.connect(url, { ...opts, token: "w" });
    try {
      const stream = uniq("feed");
      const sub = await reader.subscribe(stream);
      const publish = (async () => {
        for (let n = 0; n < total; n++) await writer.command("pub", { stream, n }, { timeout: 60 });
      })();
      const items = [];
      for await (const item of sub) {
        items.push(item);
        if (items.length === killAt) reachedKill();
        if (item.t === "evt" && item.data.n >= total - 1) break;
      }
      await publish;
      return { items: items.map((i) => ({ t: i.t, epoch: i.epoch, offset: i.offset, n: i.t === "evt" ? i.data.n : null })), reconnects: reader.reconnects };
    } finally {
      await reader.close();
      await writer.close();
    }
  })();
  return { killPoint, done };
}

// The sans-IO ClientSession of rtcore.js, rule by rule (the same rules as
// rtcore.protocol.client; tests/test_client_session.py checks the Python one).
// Frames in, frames and events out, time passed in: no server, no timers.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ClientSession, RoomView, backoffDelay, checksum, applyPatch, PatchError, parseJSON, Float } from "../rtcore.js";

const WELCOME = { t: "welcome", session: "s1", heartbeat: 15, limits: {} };
const evt = (offset, epoch = "e1", stream = "a:1") => ({ t: "evt", stream, epoch, offset, type: "x", data: { offset }, ts: 0 });

function open(opts) {
  const s = new ClientSession(opts);
  s.start("tok");
  assert.deepEqual(s.framesToSend(), [{ t: "hello", v: 1, token: "tok" }]);
  s.receiveFrame(WELCOME, 0);
  return s;
}

function subscribed(s, stream = "a:1", since = null) {
  const req = s.subscribe(stream, { since });
  const [sub] = s.framesToSend();
  s.receiveFrame({ t: "subbed", id: sub.id, stream, epoch: "e1", offset: since ? since.offset : 0, recovered: !!since }, 0);
  return req;
}

const kinds = (events) => events.map((e) => e.kind);

test("rule 3: duplicates are dropped by offset and counted", () => {
  // Mutation: deliver an evt at or below the cursor -> offsets [1, 2, 2, 1, 3].
  const s = open();
  subscribed(s);
  const got = [];
  for (const o of [1, 2, 2, 1, 3]) for (const e of s.receiveFrame(evt(o), 0)) if (e.kind === "evt") got.push(e.frame.offset);
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(s.duplicates, 2);
});

test("rule 4: a gap breaks the connection; the resubscription resumes from the cursor", () => {
  // Mutation: accept evt beyond cursor+1 -> offset 5 is delivered and since is 5.
  const s = open();
  subscribed(s);
  s.receiveFrame(evt(1), 0);
  const evs = s.receiveFrame(evt(5), 0);
  assert.deepEqual(kinds(evs), ["broken"]);
  assert.equal(s.state, "broken");
  assert.deepEqual(s.receiveFrame(evt(2), 0), []); // ignored until the driver drops it
  s.disconnected(1006);
  s.start("tok");
  s.framesToSend();
  s.receiveFrame(WELCOME, 1);
  const [sub] = s.framesToSend();
  assert.deepEqual(sub.since, { epoch: "e1", offset: 1 });
});

test("rule 5: subbed recovered=false after a position is a missed notice; snap carries the state", () => {
  // Mutation: no notice on recovered=false -> the stream jumps silently.
  const s = open();
  subscribed(s);
  s.receiveFrame(evt(1), 0);
  s.disconnected(1006);
  s.start(null); s.framesToSend(); s.receiveFrame(WELCOME, 0);
  const [sub] = s.framesToSend();
  const evs = s.receiveFrame({ t: "subbed", id: sub.id, stream: "a:1", epoch: "e2", offset: 7, recovered: false }, 0);
  assert.deepEqual(evs.map((e) => e.notice), [{ t: "missed", stream: "a:1", epoch: "e2", offset: 7, state: null, checksum: null }]);
  assert.deepEqual(s.cursor("a:1"), { epoch: "e2", offset: 7 });
  const snap = s.receiveFrame({ t: "snap", stream: "a:1", epoch: "e2", offset: 9, state: { n: 1 }, checksum: "c" }, 0);
  assert.equal(snap[0].notice.state.n, 1);
  assert.deepEqual(s.receiveFrame(evt(10, "e2"), 0).map((e) => e.frame.offset), [10]);
});

test("rules 7-8: a command keeps its key across reconnects; ids are never reused", () => {
  // Mutation: a fresh key on resend -> the server would run the command twice.
  const s = open();
  const req = s.command("pay", { amount: 1 });
  const [first] = s.framesToSend();
  assert.match(first.key, /^[0-9a-f]{32}$/);
  s.disconnected(1006);
  assert.equal(req.done, false);
  s.start(null); s.framesToSend(); s.receiveFrame(WELCOME, 0);
  const [again] = s.framesToSend();
  assert.equal(again.key, first.key);
  assert.ok(again.id > first.id);
  const evs = s.receiveFrame({ t: "ok", id: again.id, result: 42 }, 0);
  assert.deepEqual(kinds(evs), ["replied"]);
  assert.equal(req.result, 42);
});

test("rule 8: idempotency_in_progress is asked again after a backoff on the same connection", () => {
  const s = open({ random: () => 0 });
  s.command("slow");
  const [c1] = s.framesToSend();
  s.receiveFrame({ t: "err", id: c1.id, code: "idempotency_in_progress", message: "busy", retryable: true }, 10);
  assert.equal(s.nextDeadline(), 10 + backoffDelay(0, 0.2, 1, { random: () => 0 }));
  s.tick(10.05);
  assert.deepEqual(s.framesToSend(), []);
  s.tick(10.2);
  const [c2] = s.framesToSend();
  assert.equal(c2.key, c1.key);
});

test("rule 9: acks are cumulative, for what was consumed, batched", () => {
  // Mutation: ack on receipt -> an ack is queued before consumed() is called.
  const s = open();
  subscribed(s);
  for (const o of [1, 2, 3]) s.receiveFrame(evt(o), 0);
  s.tick(1);
  assert.deepEqual(s.framesToSend(), []);
  s.consumed("a:1", "e1", 2, 1);
  assert.equal(s.nextDeadline(), 1.05);
  s.consumed("a:1", "e1", 3, 1.01);
  s.tick(1.04);
  assert.deepEqual(s.framesToSend(), []);
  s.tick(1.05);
  assert.deepEqual(s.framesToSend(), [{ t: "ack", stream: "a:1", offset: 3 }]);
});

test("backoffDelay: the Python formula", () => {
  assert.equal(backoffDelay(0, 0.1, 10, { jitter: 0 }), 0.1);
  assert.equal(backoffDelay(3, 0.1, 10, { jitter: 0 }), 0.8);
  assert.equal(backoffDelay(20, 0.1, 10, { jitter: 0 }), 10);
  assert.equal(backoffDelay(2, 1, 10, { random: () => 0 }), 2);
  assert.equal(backoffDelay(2, 1, 10, { random: () => 0.999999 }) < 4, true);
});

test("rule 11: a room view folds patches and resyncs on a sync mismatch", () => {
  // Mutation: skip the checksum comparison -> no resync change.
  const v = new RoomView({ room_id: "r1", stream: "room:r1", user: "ada" });
  const doc = { state: { x: new Float(0) }, members: {} };
  assert.deepEqual(v.feed({ t: "missed", stream: "room:r1", epoch: "e", offset: 3, state: doc, checksum: checksum(doc) }).map((c) => c.kind), ["snapshot"]);
  assert.deepEqual(v.feed({ t: "evt", stream: "room:r1", epoch: "e", offset: 4, type: "patch", data: { ops: [["set", ["state", "x"], 1.5]] }, ts: 0 }).map((c) => c.kind), ["patch"]);
  assert.deepEqual(v.state, { x: 1.5 });
  const good = checksum({ state: { x: 1.5 }, members: {} });
  assert.deepEqual(v.feed({ t: "sync", stream: "room:r1", offset: 4, checksum: good }), []);
  assert.equal(v.verified, 1);
  assert.deepEqual(v.feed({ t: "sync", stream: "room:r1", offset: 4, checksum: "0".repeat(32) }).map((c) => c.kind), ["resync"]);
  assert.equal(v.state, null);
});

test("patches: set/del/push/trunc and errors", () => {
  const d = applyPatch({ a: [1, 2, 3], b: { c: 1 } }, [["push", ["a"], 4], ["trunc", ["a"], 2], ["del", ["b", "c"]], ["set", ["b", "d"], [5]]]);
  assert.deepEqual(d, { a: [1, 2], b: { d: [5] } });
  assert.throws(() => applyPatch({}, [["set", ["x", "y"], 1]]), PatchError);
  assert.throws(() => applyPatch({ a: [] }, [["set", ["a", 0], 1]]), PatchError);
});

test("parseJSON keeps integral floats and big ints apart", () => {
  const v = parseJSON('{"f":1.0,"i":1,"b":9007199254740993,"s":"1.0","n":-0.0,"e":1e3}');
  assert.ok(v.f instanceof Float && v.n instanceof Float && v.e instanceof Float);
  assert.equal(v.i, 1);
  assert.equal(v.b, 9007199254740993n);
  assert.equal(v.s, "1.0");
  assert.notEqual(checksum(v.f), checksum(v.i));
});

test("a __proto__ key is data, as in JSON.parse (found by the Hypothesis checksum test)", () => {
  // Mutation: obj[k] = v in parseJSON -> the key sets the prototype and vanishes from the checksum.
  const v = parseJSON('{"__proto__":{"a":1},"f":1.5}');
  assert.deepEqual(Object.keys(v), ["__proto__", "f"]);
  assert.equal(checksum(v), checksum(JSON.parse('{"__proto__":{"a":1},"f":1.5}')));
  const d = applyPatch({}, [["set", ["__proto__"], 1]]);
  assert.deepEqual(Object.keys(d), ["__proto__"]);
});

test("a command with a lone surrogate is refused with bad_args, not sent", () => {
  // Mutation: drop the check -> the frame is sent; the server cannot read its id and never answers it.
  const s = open();
  assert.throws(() => s.command("x", { a: ["ok", "\ud834"] }), (e) => e.code === "bad_args" && e.message.startsWith("args.a[1]"));
  assert.deepEqual(s.framesToSend(), []);
  s.command("x", { a: "𝄞" }); // a pair is fine
  assert.equal(s.framesToSend().length, 1);
});

test("rtcore.d.ts declares exactly the module's exports", async () => {
  // Mutation: export a new function without declaring it (or rename one) -> the sets differ.
  const { readFileSync } = await import("node:fs");
  const dts = readFileSync(new URL("../rtcore.d.ts", import.meta.url), "utf8");
  const declared = [...dts.matchAll(/^export declare (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  const mod = await import("../rtcore.js");
  assert.deepEqual(declared, Object.keys(mod).sort());
});

// THE must-hold, for rtcore.js: `rtcore serve` is killed (SIGKILL) mid-stream and started
// again on the same port. The same cases as tests/test_client.py::test_server_killed_and_restarted.
// Needs RTCORE_SERVE (argv prefix) and RTCORE_TMP (a directory), set by tests/js/test_js_client.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { join } from "node:path";
import * as rt from "../rtcore.js";
import { ServerProcess, TestWebSocket } from "./helpers.mjs";

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

async function killedAndRestarted(backend) {
  const port = await freePort();
  const url = backend === "sqlite" ? `sqlite:///${join(process.env.RTCORE_TMP, `rt-${port}.db`)}` : "memory://";
  const server = new ServerProcess(port, url);
  await server.start();
  const opts = { WebSocket: TestWebSocket, backoffBase: 0.05, backoffMax: 0.5 };
  const reader = await rt.Client.connect(server.url, { ...opts, token: "r" });
  const writer = await rt.Client.connect(server.url, { ...opts, token: "w" });
  try {
    const sub = await reader.subscribe("feed:k");
    const total = 150, killAt = 60;
    const items = [];
    let done = false;
    let restarted = null;
    const publish = (async () => {
      for (let n = 0; n < total; n++) await writer.command("pub", { stream: "feed:k", n }, { timeout: 30 });
      // memory://: events of the new epoch published before the reader resubscribed
      // are skipped (it is told so); keep publishing until it saw one at or past the last.
      for (let n = total; !done; n++) {
        await writer.command("pub", { stream: "feed:k", n }, { timeout: 30 });
        await new Promise((r) => setTimeout(r, 50)); // pacing the extra publishes, not a wait for a condition
      }
    })();
    for await (const item of sub) {
      items.push(item);
      if (items.length === killAt) restarted = server.kill().then(() => server.start()); // commands in flight are resent
      if (item.t === "evt" && item.data.n >= total - 1) { done = true; break; }
    }
    await restarted;
    await publish;
    const events = items.filter((i) => i.t === "evt");
    const notices = items.filter((i) => i.t === "missed");
    const numbers = events.map((e) => e.data.n);
    if (backend === "sqlite") {
      // Nothing lost, nothing twice, each command applied once (one event per command).
      assert.deepEqual(notices, []);
      assert.deepEqual(numbers, Array.from({ length: total }, (_, i) => i));
      assert.deepEqual(events.map((e) => e.offset), Array.from({ length: total }, (_, i) => i + 1));
      assert.equal(new Set(events.map((e) => e.epoch)).size, 1);
    } else {
      // The history is gone: the reader is told (a missed notice with the new epoch) in order.
      assert.equal(notices.length, 1);
      const [missed] = notices;
      const oldEpoch = events[0].epoch;
      assert.notEqual(missed.epoch, oldEpoch);
      const before = events.filter((e) => e.epoch === oldEpoch);
      const after = events.filter((e) => e.epoch === missed.epoch);
      assert.deepEqual([...before, ...after], events);
      assert.deepEqual(before.map((e) => e.data.n), Array.from({ length: before.length }, (_, i) => i));
      assert.deepEqual(after.map((e) => e.offset), Array.from({ length: after.length }, (_, i) => missed.offset + 1 + i));
      // A command in flight at the kill may have run on both servers (two epochs); within one, once.
      const ns = after.map((e) => e.data.n);
      assert.deepEqual(ns, [...new Set(ns)].sort((x, y) => x - y));
      assert.equal(items.indexOf(missed), before.length);
    }
    assert.ok(reader.reconnects >= 1, "the reader reconnected");
  } finally {
    await reader.close();
    await writer.close();
    await server.kill();
  }
}

test("server killed and restarted (sqlite): every event once, in order, each command applied once", { timeout: 120_000 }, () => killedAndRestarted("sqlite"));
test("server killed and restarted (memory): a missed notice with the new epoch, then in order", { timeout: 120_000 }, () => killedAndRestarted("memory"));

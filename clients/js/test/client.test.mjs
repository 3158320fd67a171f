// rtcore.js against a real `rtcore serve tests/js/jsapp.py:app` (RTCORE_URL), via Node's WebSocket.
import { test } from "node:test";
import * as rt from "../rtcore.js";
import { CORE } from "./scenarios.mjs";
import { serverUrl, TestWebSocket } from "./helpers.mjs";

for (const [name, scenario] of Object.entries(CORE)) {
  test(name, { timeout: 60_000 }, async () => {
    await scenario(rt, { url: serverUrl(), WebSocket: TestWebSocket });
  });
}

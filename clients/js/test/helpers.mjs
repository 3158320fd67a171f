// Test helpers for Node: where the server is, and a server process the test controls.
import { spawn } from "node:child_process";

/** ws:// URL of the server pytest started (RTCORE_URL). */
export function serverUrl() {
  const url = process.env.RTCORE_URL;
  if (!url) throw new Error("RTCORE_URL is not set: run these tests through tests/js/test_js_client.py");
  return url;
}

/**
 * An `rtcore serve` child process on a fixed port that a test kills (SIGKILL) and
 * restarts. RTCORE_SERVE is the JSON argv prefix (python -m rtcore.cli serve app).
 */
export class ServerProcess {
  constructor(port, backend) {
    this.port = port;
    this.backend = backend;
    this.proc = null;
  }
  get url() { return `ws://127.0.0.1:${this.port}/v1/ws`; }
  start() {
    const argv = JSON.parse(process.env.RTCORE_SERVE);
    const proc = spawn(argv[0], [...argv.slice(1), "--port", String(this.port), "--backend", this.backend, "--grace", "0.5", "--idempotency-lease", "1"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.proc = proc;
    return new Promise((resolve, reject) => {
      let seen = "";
      const onData = (chunk) => {
        seen += chunk;
        if (seen.includes("rtcore: serving")) { proc.stderr.off("data", onData); proc.stderr.resume(); resolve(); }
      };
      proc.stderr.setEncoding("utf8");
      proc.stderr.on("data", onData);
      proc.once("exit", (code) => reject(new Error(`rtcore serve exited (${code}) before serving:\n${seen}`)));
    });
  }
  kill() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return Promise.resolve();
    return new Promise((resolve) => { proc.once("exit", resolve); proc.kill("SIGKILL"); });
  }
}

/**
 * The WebSocket class for the tests: Node's global one (Node >= 22, or 20 with
 * --experimental-websocket), else a minimal RFC 6455 client over node:net
 * (Node 18), enough for rtcore.js: text messages, close, the four events.
 */
export const TestWebSocket = globalThis.WebSocket || (await import("./miniws.mjs")).MiniWebSocket;

// A minimal WebSocket client (RFC 6455) over node:net, for Node versions without a
// global WebSocket. Test helper only: ws:// URLs, text and binary messages, masking,
// ping -> pong, close; the browser API surface rtcore.js uses (addEventListener,
// send, close, readyState, protocol).
import { connect } from "node:net";
import { randomBytes, createHash } from "node:crypto";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

export class MiniWebSocket extends EventTarget {
  constructor(url, protocols = []) {
    super();
    const u = new URL(url);
    this.url = url;
    this.readyState = 0;
    this.protocol = "";
    const key = randomBytes(16).toString("base64");
    const protos = Array.isArray(protocols) ? protocols : [protocols];
    this._sock = connect(Number(u.port || 80), u.hostname);
    this._buf = Buffer.alloc(0);
    this._open = false;
    this._fragments = [];
    this._sock.on("connect", () => {
      this._sock.write(
        `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
          (protos.length ? `Sec-WebSocket-Protocol: ${protos.join(", ")}\r\n` : "") + "\r\n",
      );
    });
    this._sock.on("data", (chunk) => {
      this._buf = Buffer.concat([this._buf, chunk]);
      if (!this._open) {
        const end = this._buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = this._buf.subarray(0, end).toString();
        this._buf = this._buf.subarray(end + 4);
        const accept = createHash("sha1").update(key + GUID).digest("base64");
        if (!/^HTTP\/1\.1 101/.test(head) || !head.includes(accept)) { this._fail(1006); return; }
        this.protocol = (/sec-websocket-protocol:\s*(\S+)/i.exec(head) || [])[1] || "";
        this._open = true;
        this.readyState = 1;
        this.dispatchEvent(new Event("open"));
      }
      this._frames();
    });
    this._sock.on("error", () => this._fail(1006));
    this._sock.on("close", () => this._fail(1006));
  }

  _frames() {
    for (;;) {
      const b = this._buf;
      if (b.length < 2) return;
      let len = b[1] & 0x7f, off = 2;
      if (len === 126) { if (b.length < 4) return; len = b.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (b.length < 10) return; len = Number(b.readBigUInt64BE(2)); off = 10; }
      if (b.length < off + len) return;
      const fin = b[0] & 0x80, op = b[0] & 0x0f;
      const payload = b.subarray(off, off + len);
      this._buf = b.subarray(off + len);
      if (op === 0x8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this._write(0x8, payload.subarray(0, 2));
        this._fail(code, payload.subarray(2).toString());
        return;
      }
      if (op === 0x9) { this._write(0xa, payload); continue; }
      if (op === 0xa) continue;
      this._fragments.push(Buffer.from(payload));
      if (op !== 0) this._binary = op === 0x2;
      if (!fin) continue;
      const data = Buffer.concat(this._fragments);
      this._fragments = [];
      const ev = new Event("message");
      ev.data = this._binary ? data : data.toString("utf8");
      this.dispatchEvent(ev);
    }
  }

  _write(op, payload) {
    if (this._sock.destroyed) return;
    const mask = randomBytes(4);
    const len = payload.length;
    const head = len < 126 ? Buffer.from([0x80 | op, 0x80 | len]) : len < 65536 ? Buffer.from([0x80 | op, 0x80 | 126, len >> 8, len & 0xff]) : Buffer.concat([Buffer.from([0x80 | op, 0x80 | 127]), (() => { const x = Buffer.alloc(8); x.writeBigUInt64BE(BigInt(len)); return x; })()]);
    const body = Buffer.from(payload);
    for (let i = 0; i < body.length; i++) body[i] ^= mask[i & 3];
    this._sock.write(Buffer.concat([head, mask, body]));
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    typeof data === "string" ? this._write(0x1, Buffer.from(data, "utf8")) : this._write(0x2, Buffer.from(data));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    const p = Buffer.alloc(2 + Buffer.byteLength(reason));
    p.writeUInt16BE(code, 0);
    p.write(reason, 2);
    this._write(0x8, p);
    this._sock.end();
  }

  _fail(code, reason = "") {
    if (this.readyState === 3) return;
    const wasOpen = this._open;
    this.readyState = 3;
    this._sock.destroy();
    if (!wasOpen) this.dispatchEvent(new Event("error"));
    const ev = new Event("close");
    ev.code = code;
    ev.reason = reason;
    ev.wasClean = code !== 1006;
    this.dispatchEvent(ev);
  }
}

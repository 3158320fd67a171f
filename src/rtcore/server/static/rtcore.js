// rtcore.js — the rtcore client for browsers and Node.js, one dependency-free ES module.
//
// Served by every rtcore server at /v1/client.js (types at /v1/client.d.ts):
//
//     import { Client } from "/v1/client.js";
//     const client = await Client.connect("ws://host:8000/v1/ws", { token: "alice" });
//
// It follows the same contract as the Python client (docs/clients.md, the
// behaviour table; rtcore.protocol.client.ClientSession, its 12 rules): the
// sans-IO `ClientSession` below is a line-by-line port of that state machine
// and `Client` is its driver (WebSocket, timers, reconnects).
//
// PUBLIC API (stable; the .d.ts next to this file declares it)
// -------------------------------------------------------------
// class Client
//   static connect(url, options?) -> Promise<Client>   open the first connection (rejects if it fails)
//   new Client(url, options?) + client.connect()        the same in two steps
//     options: token, tokenProvider (() => string | Promise<string>), backoffBase (0.1 s),
//              backoffMax (10 s), maxAttempts (null = forever), heartbeat (s, server's by default),
//              connectTimeout (10 s), ackInterval (0.05 s; null = manual acks), WebSocket (an
//              implementation, default globalThis.WebSocket), random (() => [0,1), for jitter)
//   client.command(name, args?, {key?, timeout?}) -> Promise<result>      idempotency key always sent
//   client.subscribe(stream, {since?, cursor?, onItem?}) -> Promise<Subscription>
//   client.joinOrCreate(type, {options?, metadata?, key?, timeout?}) -> Promise<Room>
//   client.create(type, {options?, private?, metadata?, key?, timeout?}) -> Promise<Room>
//   client.join(roomId | {roomId} | {code}, {options?, key?, timeout?}) -> Promise<Room>
//   client.onMessage(type | null, fn) -> off   direct messages (`msg` frames, ctx.send_to on the server)
//                                     not for a room this client follows: fn(data) for `type`
//                                     (null: fn({type, data, room})); never stored, never replayed
//   client.on(event, fn) -> off()    events: "connected" (welcome), "disconnected" ({code, reason}),
//                                     "reconnecting" ({attempt, delay}), "closed" (error|null),
//                                     "error" (RtcoreError not answering a request / callback failure)
//   client.close() -> Promise<void>  flush acks, close 1000, fail waiting requests
//   client.connected, client.welcome, client.principal, client.reconnects, client.duplicates,
//   client.rooms (Map id -> Room), client.session (the ClientSession), client.positions()
// class Subscription
//   sub.stream, sub.position ({epoch, offset} | null), sub.on(fn) -> off (fn(item) per item, in order)
//   for await (const item of sub) ...   (items pulled count as consumed: acked after that)
//   sub.unsubscribe() -> Promise<void>
//   item: {t: "evt", stream, epoch, offset, type, data, ts} | {t: "missed", stream, epoch, offset, state, checksum}
// class Room
//   room.id, room.type, room.code, room.user, room.state (game state, plain values), room.document,
//   room.members, room.info, room.ready, room.verified (sync checksums that matched), room.resyncs, room.left
//   room.onChange(fn) -> off        fn(change): {roomId, stream, kind: "snapshot"|"patch"|"message"|"direct"|"resync",
//                                    offset, ops?, message?}; runs after the change is applied
//   room.onMessage(type | null, fn) -> off   fn(data) for messages of `type` (null: fn(whole message))
//   room.send(type, data?, {key?, timeout?}) -> Promise<result>
//   room.waitFor(predicate, {timeout?}) -> Promise<state>     resolves when predicate(room.state) holds
//   room.leave() -> Promise<void>
// class RtcoreError extends Error: .code, .retryable, .closeCode (connection errors)
// helpers: checksum(value) -> hex (blake2b-128 of canonical MessagePack, = the server's),
//   canonicalEncode(value) -> Uint8Array, blake2b(bytes, outlen=64) -> Uint8Array,
//   parseJSON(text) (keeps float-vs-int: integral floats come back as `Float`), toPlain(value),
//   applyPatch(doc, ops), backoffDelay(attempt, base, max, {jitter, random}), ClientSession, RoomView

export const PROTOCOL_VERSION = 1;
export const DEFAULT_ACK_INTERVAL = 0.05;
const IN_PROGRESS_RETRY = [0.2, 1.0];

// --- errors ---------------------------------------------------------------------------

export class RtcoreError extends Error {
  /**
   * @param {string} code machine-readable code (the server's `err.code`)
   * @param {string} message
   * @param {{retryable?: boolean, closeCode?: number}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "RtcoreError";
    this.code = code;
    this.retryable = !!extra.retryable;
    this.closeCode = extra.closeCode ?? null;
  }
}

function connectionClosed(closeCode, reason, code = "disconnected") {
  return new RtcoreError(code, reason || "connection lost", { retryable: true, closeCode });
}

// --- backoff (rtcore.protocol.backoff.backoff_delay) ------------------------------------

/** Seconds to wait before retry `attempt` (0-based): min(max, base*2^n) with the last `jitter` fraction random. */
export function backoffDelay(attempt, base, maximum, { jitter = 0.5, random = Math.random } = {}) {
  if (attempt < 0) throw new RangeError(`attempt must be >= 0, got ${attempt}`);
  if (!(jitter >= 0 && jitter <= 1)) throw new RangeError(`jitter must be within [0, 1], got ${jitter}`);
  const cap = Math.min(maximum, base * 2 ** Math.min(attempt, 62));
  return jitter ? cap * (1 - jitter + jitter * random()) : cap;
}

// --- values: float-preserving JSON, canonical MessagePack, BLAKE2b, checksums ------------

/**
 * A float whose value is integral (`1.0`, `-0.0`), as it came on the wire. JSON.parse
 * would make it the integer 1, whose canonical encoding (and so the state checksum)
 * differs; the room fold keeps these in its checksum copy. Applications see plain numbers.
 */
export class Float {
  constructor(value) { this.value = value; }
  valueOf() { return this.value; }
  toJSON() { return this.value; }
}

/** obj[k] = v as an own data property, also for k === "__proto__" (as JSON.parse does). */
function setKey(obj, k, v) {
  if (k === "__proto__") Object.defineProperty(obj, k, { value: v, writable: true, enumerable: true, configurable: true });
  else obj[k] = v;
}

// A message needs the slow parser only if it has a number with a fraction or an
// exponent, or an integer of 16+ digits (maybe beyond 2^53). Strings may match too: harmless.
const NEEDS_TYPED = /[0-9][.eE]|[0-9]{16}/;

/** JSON.parse that keeps what the checksum needs: integral floats as `Float`, big ints as BigInt. */
export function parseJSON(text) {
  if (!NEEDS_TYPED.test(text)) return JSON.parse(text);
  let i = 0;
  const ws = () => {
    for (let c = text.charCodeAt(i); c === 32 || c === 10 || c === 13 || c === 9; c = text.charCodeAt(++i));
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++; const obj = {}; ws();
      if (text[i] === "}") { i++; return obj; }
      for (;;) {
        ws(); const k = str(); ws();
        if (text[i++] !== ":") throw new SyntaxError(`expected ':' at ${i - 1}`);
        setKey(obj, k, value()); ws();
        const d = text[i++];
        if (d === "}") return obj;
        if (d !== ",") throw new SyntaxError(`expected ',' or '}' at ${i - 1}`);
      }
    }
    if (c === "[") {
      i++; const arr = []; ws();
      if (text[i] === "]") { i++; return arr; }
      for (;;) {
        arr.push(value()); ws();
        const d = text[i++];
        if (d === "]") return arr;
        if (d !== ",") throw new SyntaxError(`expected ',' or ']' at ${i - 1}`);
      }
    }
    if (c === '"') return str();
    if (text.startsWith("true", i)) { i += 4; return true; }
    if (text.startsWith("false", i)) { i += 5; return false; }
    if (text.startsWith("null", i)) { i += 4; return null; }
    // A number: -?digits(.digits)?([eE][+-]?digits)?
    const start = i;
    let fraction = false;
    if (text.charCodeAt(i) === 45) i++;
    const digits = () => { const d0 = i; for (let d = text.charCodeAt(i); d >= 48 && d <= 57; d = text.charCodeAt(++i)); return i > d0; };
    if (!digits()) throw new SyntaxError(`unexpected ${JSON.stringify(c)} at ${start}`);
    if (text.charCodeAt(i) === 46) { i++; fraction = true; if (!digits()) throw new SyntaxError(`bad number at ${start}`); }
    const e = text.charCodeAt(i);
    if (e === 101 || e === 69) {
      i++; fraction = true;
      const sign = text.charCodeAt(i);
      if (sign === 43 || sign === 45) i++;
      if (!digits()) throw new SyntaxError(`bad number at ${start}`);
    }
    const lit = text.slice(start, i);
    const v = Number(lit);
    if (fraction) return Number.isInteger(v) ? new Float(v) : v;
    return Number.isSafeInteger(v) ? v : BigInt(lit);
  };
  const str = () => {
    if (text[i] !== '"') throw new SyntaxError(`expected a string at ${i}`);
    let j = i + 1, escaped = false;
    for (; j < text.length; j++) {
      const ch = text.charCodeAt(j);
      if (ch === 92) { escaped = true; j++; } else if (ch === 34) break;
    }
    const s = escaped ? JSON.parse(text.slice(i, j + 1)) : text.slice(i + 1, j);
    i = j + 1;
    return s;
  };
  const out = value(); ws();
  if (i !== text.length) throw new SyntaxError(`trailing data at ${i}`);
  return out;
}

/** A deep copy with `Float` unwrapped to numbers (what applications see). BigInts stay. */
export function toPlain(v) {
  if (v instanceof Float) return v.value;
  if (Array.isArray(v)) return v.map(toPlain);
  if (v !== null && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v)) setKey(out, k, toPlain(v[k]));
    return out;
  }
  return v;
}

const utf8 = new TextEncoder();

const HIGH_UNITS = /[\ud800-\uffff]/;

function utf8Compare(a, b) {
  // Python sorts str by code point; UTF-16 order differs above U+FFFF. UTF-8 byte
  // order is code point order.
  if (a === b) return 0;
  const x = utf8.encode(a), y = utf8.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/** Canonical MessagePack (sorted map keys, smallest int forms, floats as float64): as msgspec `order="sorted"`. */
export function canonicalEncode(value) {
  let buf = new Uint8Array(256), view = new DataView(buf.buffer), n = 0;
  const room = (k) => {
    if (n + k <= buf.length) return;
    const bigger = new Uint8Array(Math.max(buf.length * 2, n + k));
    bigger.set(buf.subarray(0, n));
    buf = bigger; view = new DataView(buf.buffer);
  };
  const byte = (b) => { room(1); buf[n++] = b; };
  const u16 = (tag, x) => { room(3); buf[n] = tag; view.setUint16(n + 1, x); n += 3; };
  const u32 = (tag, x) => { room(5); buf[n] = tag; view.setUint32(n + 1, x); n += 5; };
  const int = (x) => {
    // x: a safe integer Number or a BigInt
    if (typeof x === "number") {
      if (x >= 0) {
        if (x < 128) byte(x);
        else if (x < 256) { room(2); buf[n] = 0xcc; buf[n + 1] = x; n += 2; }
        else if (x < 65536) u16(0xcd, x);
        else if (x < 4294967296) u32(0xce, x);
        else { room(9); buf[n] = 0xcf; view.setBigUint64(n + 1, BigInt(x)); n += 9; }
      } else if (x >= -32) byte(x & 0xff);
      else if (x >= -128) { room(2); buf[n] = 0xd0; buf[n + 1] = x & 0xff; n += 2; }
      else if (x >= -32768) u16(0xd1, x & 0xffff);
      else if (x >= -2147483648) u32(0xd2, x >>> 0);
      else { room(9); buf[n] = 0xd3; view.setBigInt64(n + 1, BigInt(x)); n += 9; }
    } else if (x >= -2147483648n && x < 4294967296n) int(Number(x));
    else if (x >= 0n) { room(9); buf[n] = 0xcf; view.setBigUint64(n + 1, x); n += 9; }
    else { room(9); buf[n] = 0xd3; view.setBigInt64(n + 1, x); n += 9; }
  };
  const float = (x) => { room(9); buf[n] = 0xcb; view.setFloat64(n + 1, x); n += 9; };
  const str = (x) => {
    let ascii = true;
    for (let i = 0; i < x.length; i++) if (x.charCodeAt(i) > 127) { ascii = false; break; }
    const b = ascii ? null : utf8.encode(x);
    const len = ascii ? x.length : b.length;
    if (len < 32) byte(0xa0 | len);
    else if (len < 256) { room(2); buf[n] = 0xd9; buf[n + 1] = len; n += 2; }
    else if (len < 65536) u16(0xda, len);
    else u32(0xdb, len);
    room(len);
    if (ascii) for (let i = 0; i < len; i++) buf[n + i] = x.charCodeAt(i);
    else buf.set(b, n);
    n += len;
  };
  const header = (len, fix, c16, c32) => {
    if (len < 16) byte(fix | len);
    else if (len < 65536) u16(c16, len);
    else u32(c32, len);
  };
  const enc = (v) => {
    if (v === null || v === undefined) byte(0xc0);
    else if (v === true) byte(0xc3);
    else if (v === false) byte(0xc2);
    else if (typeof v === "number") {
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) int(v);
      else float(v);
    } else if (typeof v === "string") str(v);
    else if (typeof v === "bigint") int(v);
    else if (v instanceof Float) float(v.value);
    else if (Array.isArray(v)) { header(v.length, 0x90, 0xdc, 0xdd); for (const x of v) enc(x); }
    else if (typeof v === "object") {
      const keys = Object.keys(v);
      // UTF-16 order is code point order unless a key has a unit in U+D800..U+FFFF.
      keys.sort(keys.some((k) => HIGH_UNITS.test(k)) ? utf8Compare : undefined);
      header(keys.length, 0x80, 0xde, 0xdf);
      for (const k of keys) { str(k); enc(v[k]); }
    } else throw new TypeError(`cannot encode ${typeof v}`);
  };
  enc(value);
  return buf.slice(0, n);
}

// BLAKE2b (RFC 7693), 64-bit words as pairs of 32-bit halves [low, high] in a Uint32Array.
const B2B_IV = new Uint32Array([
  0xf3bcc908, 0x6a09e667, 0x84caa73b, 0xbb67ae85, 0xfe94f82b, 0x3c6ef372, 0x5f1d36f1, 0xa54ff53a,
  0xade682d1, 0x510e527f, 0x2b3e6c1f, 0x9b05688c, 0xfb41bd6b, 0x1f83d9ab, 0x137e2179, 0x5be0cd19,
]);
const B2B_SIGMA = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
  [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
  [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
  [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
  [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
  [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
  [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
  [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
  [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
  [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
];
const B2B_SIGMA2 = B2B_SIGMA.map((row) => row.map((x) => 2 * x));


// Work arrays and helpers at module level: no allocation per block (this is the hot loop).
const B2B_V = new Uint32Array(32);
const B2B_M = new Uint32Array(32);

// v[a] += v[b] + (xl, xh)  (64-bit add on 32-bit halves)
function b2bAdd(v, a, b, xl, xh) {
  const lo = v[a] + v[b] + xl;
  const carry = lo >= 8589934592 ? 2 : lo >= 4294967296 ? 1 : 0;
  v[a] = lo; // Uint32Array stores mod 2^32
  v[a + 1] = v[a + 1] + v[b + 1] + xh + carry;
}

function b2bG(v, m, a, b, c, d, x, y) {
  b2bAdd(v, a, b, m[x], m[x + 1]);
  let lo = v[d] ^ v[a], hi = v[d + 1] ^ v[a + 1];
  v[d] = hi; v[d + 1] = lo; // rotr 32
  b2bAdd(v, c, d, 0, 0);
  lo = v[b] ^ v[c]; hi = v[b + 1] ^ v[c + 1];
  v[b] = (lo >>> 24) | (hi << 8); v[b + 1] = (hi >>> 24) | (lo << 8); // rotr 24
  b2bAdd(v, a, b, m[y], m[y + 1]);
  lo = v[d] ^ v[a]; hi = v[d + 1] ^ v[a + 1];
  v[d] = (lo >>> 16) | (hi << 16); v[d + 1] = (hi >>> 16) | (lo << 16); // rotr 16
  b2bAdd(v, c, d, 0, 0);
  lo = v[b] ^ v[c]; hi = v[b + 1] ^ v[c + 1];
  v[b] = (lo << 1) | (hi >>> 31); v[b + 1] = (hi << 1) | (lo >>> 31); // rotr 63
}

function b2bCompress(h, block, t, last) {
  const v = B2B_V, m = B2B_M;
  v.set(h); v.set(B2B_IV, 16);
  v[24] ^= t >>> 0; v[25] ^= Math.floor(t / 4294967296) >>> 0; // t < 2^53
  if (last) { v[28] = ~v[28]; v[29] = ~v[29]; }
  for (let i = 0; i < 32; i++) m[i] = block[4 * i] | (block[4 * i + 1] << 8) | (block[4 * i + 2] << 16) | (block[4 * i + 3] << 24);
  for (let r = 0; r < 12; r++) {
    const s = B2B_SIGMA2[r % 10];
    // word indexes doubled: v[2i] is the low half of word i, m likewise
    b2bG(v, m, 0, 8, 16, 24, s[0], s[1]); b2bG(v, m, 2, 10, 18, 26, s[2], s[3]);
    b2bG(v, m, 4, 12, 20, 28, s[4], s[5]); b2bG(v, m, 6, 14, 22, 30, s[6], s[7]);
    b2bG(v, m, 0, 10, 20, 30, s[8], s[9]); b2bG(v, m, 2, 12, 22, 24, s[10], s[11]);
    b2bG(v, m, 4, 14, 16, 26, s[12], s[13]); b2bG(v, m, 6, 8, 18, 28, s[14], s[15]);
  }
  for (let i = 0; i < 16; i++) h[i] ^= v[i] ^ v[i + 16];
}

/** BLAKE2b digest (unkeyed) of `data` (Uint8Array), `outlen` bytes (1..64). */
export function blake2b(data, outlen = 64) {
  if (!(outlen >= 1 && outlen <= 64)) throw new RangeError("outlen must be 1..64");
  const h = new Uint32Array(B2B_IV);
  h[0] ^= 0x01010000 ^ outlen;
  const block = new Uint8Array(128);
  let t = 0, off = 0;
  // Every block but the last is compressed as not-last; an empty input is one empty last block.
  while (data.length - off > 128) {
    t += 128;
    b2bCompress(h, data.subarray(off, off + 128), t, false);
    off += 128;
  }
  block.fill(0); block.set(data.subarray(off));
  t += data.length - off;
  b2bCompress(h, block, t, true);
  const out = new Uint8Array(outlen);
  for (let i = 0; i < outlen; i++) out[i] = h[i >> 2] >>> (8 * (i & 3));
  return out;
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

/** The state checksum the server sends in `sync`/`snap`: blake2b-128 hex of the canonical encoding. */
export function checksum(value) {
  return hex(blake2b(canonicalEncode(value), 16));
}

// --- generic patches (rtcore.protocol.patch.apply) --------------------------------------

export class PatchError extends Error {}

const isMap = (x) => x !== null && typeof x === "object" && !Array.isArray(x) && !(x instanceof Float);
const copy = (x) => (Array.isArray(x) ? x.map(copy) : isMap(x) ? Object.fromEntries(Object.entries(x).map(([k, v]) => [k, copy(v)])) : x);

function walk(doc, path, op) {
  let node = doc;
  for (const step of path) {
    const ok = Array.isArray(node) ? typeof step === "number" && step >= 0 && step < node.length : isMap(node) && typeof step === "string" && Object.hasOwn(node, step);
    if (!ok) throw new PatchError(`op ${JSON.stringify(op[0])}: path ${JSON.stringify(path)} does not exist`);
    node = node[step];
  }
  return node;
}

/** Apply generic patch ops (`set`, `del`, `push`, `trunc`) to `doc`; returns the new document. */
export function applyPatch(doc, ops) {
  for (const op of ops) {
    if (!Array.isArray(op) || op.length < 2 || !Array.isArray(op[1])) throw new PatchError(`malformed op ${JSON.stringify(op)}`);
    const [name, path] = op;
    if (name === "set") {
      if (op.length !== 3) throw new PatchError("op 'set' needs [name, path, value]");
      if (!path.length) { doc = copy(op[2]); continue; }
      const parent = walk(doc, path.slice(0, -1), op);
      const last = path[path.length - 1];
      if ((isMap(parent) && typeof last === "string") || (Array.isArray(parent) && Number.isInteger(last) && last >= 0 && last < parent.length)) setKey(parent, last, copy(op[2]));
      else throw new PatchError(`op 'set': cannot set ${JSON.stringify(last)}`);
    } else if (name === "del") {
      const parent = path.length ? walk(doc, path.slice(0, -1), op) : null;
      if (!isMap(parent) || !Object.hasOwn(parent, path[path.length - 1])) throw new PatchError(`op 'del': no key at ${JSON.stringify(path)}`);
      delete parent[path[path.length - 1]];
    } else if (name === "push" || name === "trunc") {
      if (op.length !== 3) throw new PatchError(`op '${name}' needs [name, path, arg]`);
      const target = walk(doc, path, op);
      if (!Array.isArray(target)) throw new PatchError(`op '${name}': ${JSON.stringify(path)} is not a list`);
      if (name === "push") target.push(copy(op[2]));
      else {
        const n = op[2];
        if (!Number.isInteger(n) || n < 0 || n > target.length) throw new PatchError(`op 'trunc': length ${n} out of range`);
        target.length = n;
      }
    } else throw new PatchError(`unknown op ${JSON.stringify(name)}`);
  }
  return doc;
}

// --- RoomView (rtcore.protocol.rooms.RoomView) --------------------------------------------

function mergePrivate(pub, priv, user) {
  if (!isMap(priv) || !Object.keys(priv).length || !isMap(pub)) return pub;
  const merged = { ...pub };
  for (const [k, v] of Object.entries(priv)) setKey(merged, k, { [user]: v });
  return merged;
}

/**
 * One room as this client sees it: the documents of its streams kept by folding
 * patches (no game code). Each stream has two copies: `typed` (wire types, for
 * checksums) and `plain` (what the application reads); every op goes to both.
 */
export class RoomView {
  constructor(joined, user) {
    if (!joined || joined.room_id == null || joined.stream == null) throw new TypeError("not a room join result (needs room_id and stream)");
    this.roomId = String(joined.room_id);
    this.stream = String(joined.stream);
    this.type = String(joined.type ?? "");
    this.code = String(joined.code ?? "");
    this.viewStream = joined.view ? String(joined.view) : null;
    // `user` (servers before ephemeral direct messages sent `dm: "roomdm:{user}"` instead)
    const dm = String(joined.dm ?? "");
    this.user = user ?? (joined.user != null ? String(joined.user) : dm.slice(dm.indexOf(":") + 1));
    this.docs = new Map(); // stream -> {typed, plain}
    this.offsets = new Map();
    this.verified = 0;
    this.resyncs = 0;
  }
  get streams() { return this.viewStream ? [this.stream, this.viewStream] : [this.stream]; }
  get document() { return this.docs.get(this.stream)?.plain ?? null; }
  get private() { return this.viewStream ? this.docs.get(this.viewStream)?.plain ?? null : null; }
  get ready() { return this.docs.has(this.stream) && (!this.viewStream || this.docs.has(this.viewStream)); }
  get state() {
    const doc = this.document;
    if (doc == null) return null;
    const priv = this.private;
    return priv == null ? doc.state : mergePrivate(doc.state, priv.state, this.user);
  }
  _lost(stream, offset) {
    this.docs.delete(stream); this.offsets.delete(stream); this.resyncs++;
    return [{ roomId: this.roomId, stream, kind: "resync", offset }];
  }
  /** Fold one item (`evt` frame, `missed` notice or `sync` frame) of a room stream; returns the changes. */
  feed(item) {
    const stream = item.stream;
    if (stream !== this.stream && stream !== this.viewStream) return [];
    if (item.t === "sync") {
      const doc = this.docs.get(stream);
      if (!doc || this.offsets.get(stream) !== item.offset) return [];
      if (checksum(doc.typed) !== item.checksum) return this._lost(stream, item.offset);
      this.verified++;
      return [];
    }
    if (item.t === "evt") return this._event(item);
    // a missed notice
    if (item.state == null) return this.docs.has(stream) ? this._lost(stream, item.offset) : [];
    if (item.checksum != null && checksum(item.state) !== item.checksum) return this._lost(stream, item.offset);
    this.docs.set(stream, { typed: copy(item.state), plain: toPlain(item.state) });
    this.offsets.set(stream, item.offset);
    return [{ roomId: this.roomId, stream, kind: "snapshot", offset: item.offset }];
  }
  /** A `msg` frame (a direct message, in no stream): a `direct` change if it comes from this room. */
  direct(frame) {
    if (frame.room == null || frame.room !== this.roomId) return [];
    return [{ roomId: this.roomId, stream: "", kind: "direct", offset: 0, message: { room: frame.room, type: frame.type, data: toPlain(frame.data ?? null) } }];
  }
  _event(evt) {
    const { stream, data } = evt;
    if (evt.type === "msg") {
      if (stream !== this.stream || !isMap(data) || (data.except != null && data.except === this.user)) return [];
      return [{ roomId: this.roomId, stream, kind: "message", offset: evt.offset, message: toPlain(data) }];
    }
    if (evt.type !== "patch") return [];
    const ops = isMap(data) ? data.ops : undefined;
    if (!Array.isArray(ops)) return this._lost(stream, evt.offset);
    const doc = this.docs.get(stream);
    if (!doc) {
      const whole = ops.length > 0 && Array.isArray(ops[0]) && ops[0].length >= 2 && ops[0][0] === "set" && Array.isArray(ops[0][1]) && ops[0][1].length === 0;
      if (!whole) return []; // before the snapshot of a (re)subscription
    }
    const plainOps = toPlain(ops);
    let typed, plain;
    try {
      typed = applyPatch(doc ? doc.typed : null, ops);
      plain = applyPatch(doc ? doc.plain : null, plainOps);
    } catch (e) {
      if (e instanceof PatchError) return this._lost(stream, evt.offset);
      throw e;
    }
    this.docs.set(stream, { typed, plain });
    this.offsets.set(stream, evt.offset);
    return [{ roomId: this.roomId, stream, kind: "patch", offset: evt.offset, ops: plainOps }];
  }
}

// --- ClientSession (rtcore.protocol.client.ClientSession, rules 1-12) ----------------------

/**
 * The client side of the protocol as a sans-IO state machine: frames in, events and
 * frames out, time passed in (seconds, any monotonic clock). A port of the Python
 * ClientSession: the same rules, in the same order (see its module docstring).
 * Events: {kind: "evt", frame} | {kind: "missed", notice} | {kind: "sync", frame} | {kind: "bye", frame}
 * | {kind: "connected", welcome} | {kind: "refused", error} | {kind: "replied", request}
 * | {kind: "ended", stream, error} | {kind: "broken", stream, reason} | {kind: "tokenExpired"}
 * | {kind: "serverError", error} | {kind: "room", view, change} | {kind: "msg", frame}
 */
export class ClientSession {
  constructor({ ackInterval = DEFAULT_ACK_INTERVAL, random = Math.random } = {}) {
    this.ackInterval = ackInterval;
    this.random = random;
    this.state = "idle"; // idle | hello | open | broken | closed
    this.welcome = null;
    this.duplicates = 0;
    this._nextId = 1;
    this._streams = new Map(); // stream -> {stream, epoch, offset, wantCursor, live, consumed, acked, request}
    this._sent = new Map(); // id -> request (current connection)
    this._kept = new Set(); // commands and first subscribes, in order
    this._out = [];
    this._events = [];
    this._ackAt = null;
    this._rooms = new Map(); // stream -> RoomView
  }

  get streams() { return [...this._streams.keys()]; }
  /** Position of the last event of `stream` handed to the application: {epoch, offset} | null. */
  cursor(stream) { const st = this._streams.get(stream); return st && st.epoch !== null ? { epoch: st.epoch, offset: st.offset } : null; }
  position(stream) { return this._streams.get(stream)?.consumed ?? null; }
  acked(stream) { return this._streams.get(stream)?.acked ?? null; }
  live(stream) { return !!this._streams.get(stream)?.live; }

  // rule 1: states
  start(token = null) {
    if (this.state === "closed") throw connectionClosed(1000, "the client is closed", "client_closed");
    if (this.state !== "idle") throw new RtcoreError("internal", `start() in state ${this.state}: call disconnected() first`);
    this.state = "hello";
    this._out.push(token == null ? { t: "hello", v: PROTOCOL_VERSION } : { t: "hello", v: PROTOCOL_VERSION, token });
  }

  disconnected(closeCode = 1006, reason = "") {
    if (this.state !== "closed") this.state = "idle";
    this.welcome = null;
    this._out = [];
    const gone = connectionClosed(closeCode, reason);
    for (const req of this._sent.values()) {
      req.id = null;
      if (!req.kept && !req.done && req.kind !== "sub") this._resolve(req, undefined, gone);
    }
    this._sent.clear();
    for (const req of this._kept) { req.id = null; req.retryAt = null; }
    for (const st of this._streams.values()) st.live = false;
    return this.events();
  }

  close(error = null) {
    const reason = error || connectionClosed(1000, "the client is closed", "client_closed");
    this.state = "closed";
    for (const req of [...this._kept, ...this._sent.values()]) if (!req.done) this._resolve(req, undefined, reason);
    this._kept.clear(); this._sent.clear(); this._out = [];
    return this.events();
  }

  // rules 6-7: requests
  subscribe(stream, { since = null, cursor = false } = {}) {
    this._checkOpen();
    if (this._streams.has(stream)) throw new RtcoreError("already_subscribed", `already subscribed to ${JSON.stringify(stream)}`);
    const st = {
      stream, epoch: since ? since.epoch : null, offset: since ? since.offset : 0,
      wantCursor: cursor && !since, live: false, consumed: since ? { ...since } : null, acked: null, request: null,
    };
    this._streams.set(stream, st);
    const req = this._subRequest(st, true);
    st.request = req;
    this._keep(req);
    return req;
  }

  unsubscribe(stream) {
    const st = this._streams.get(stream);
    if (!st) return null;
    this._streams.delete(stream);
    for (const req of [...this._kept]) {
      if (req.stream === stream) { this._forget(req); this._resolve(req, undefined, new RtcoreError("not_subscribed", "unsubscribed")); }
    }
    if (this.state !== "open" || !st.live) return null;
    const req = newRequest("unsub", (id) => ({ t: "unsub", id, stream }), { stream });
    this._send(req);
    return req;
  }

  command(name, args = null, { key = null, retry = true } = {}) {
    this._checkOpen();
    const where = loneSurrogate(args, "args");
    // The server cannot decode such a frame, nor read its id to answer it: refuse it here.
    if (where) throw new RtcoreError("bad_args", `${where}: a lone surrogate is not valid UTF-8`);
    key = key || randomKey();
    const a = args === undefined ? null : args;
    const req = newRequest("cmd", (id) => ({ t: "cmd", id, name, args: a, key }), { key, kept: true, retry });
    this._keep(req);
    return req;
  }

  ping() { const req = newRequest("ping", (id) => ({ t: "ping", id })); this._sendNowOrFail(req); return req; }
  auth(token) { const req = newRequest("auth", (id) => ({ t: "auth", id, token })); this._sendNowOrFail(req); return req; }
  forget(req) { this._forget(req); }

  // rule 11: rooms
  get rooms() { return [...new Set(this._rooms.values())]; }

  trackRoom(view) {
    const reqs = [];
    for (const stream of view.streams) {
      this._rooms.set(stream, view);
      if (!this._streams.has(stream)) reqs.push(this.subscribe(stream));
    }
    return reqs;
  }

  untrackRoom(view) {
    const reqs = [];
    for (const stream of view.streams) {
      if (this._rooms.get(stream) === view) {
        this._rooms.delete(stream);
        const r = this.unsubscribe(stream);
        if (r) reqs.push(r);
      }
    }
    return reqs;
  }

  _routeRooms(now) {
    const events = this._events; this._events = [];
    const out = [];
    for (const ev of events) {
      if (ev.kind === "msg") {
        // rule 11: a direct message naming a tracked room is that room's; any other is the application's
        const views = this.rooms.filter((v) => ev.frame.room != null && v.roomId === ev.frame.room);
        for (const v of views) for (const change of v.direct(ev.frame)) out.push({ kind: "room", view: v, change });
        if (!views.length) out.push(ev);
        continue;
      }
      const item = ev.kind === "evt" || ev.kind === "sync" ? ev.frame : ev.kind === "missed" ? ev.notice : null;
      if (!item || !this._rooms.has(item.stream)) { out.push(ev); continue; }
      const view = this._rooms.get(item.stream);
      if (ev.kind !== "sync") this.consumed(item.stream, item.epoch, item.offset, now);
      for (const change of view.feed(item)) {
        if (change.kind === "resync" && this._streams.has(change.stream)) {
          this.unsubscribe(change.stream);
          this.subscribe(change.stream);
        }
        out.push({ kind: "room", view, change });
      }
    }
    this._events = out.concat(this._events);
  }

  // rule 9: acks
  consumed(stream, epoch, offset, now) {
    const st = this._streams.get(stream);
    if (!st) return;
    st.consumed = { epoch, offset };
    if (this.ackInterval != null && this._ackAt === null) this._ackAt = now + this.ackInterval;
  }

  ack(stream, offset = null) {
    const st = this._streams.get(stream);
    if (offset === null) {
      if (!st) throw new RtcoreError("not_subscribed", `not subscribed to ${JSON.stringify(stream)}`);
      const pos = st.consumed || (st.epoch !== null ? { epoch: st.epoch, offset: st.offset } : null);
      if (!pos) return;
      offset = pos.offset;
    }
    this._out.push({ t: "ack", stream, offset });
    if (st && st.epoch !== null) st.acked = { epoch: st.epoch, offset };
  }

  flushAcks() {
    this._ackAt = null;
    if (this.state !== "open" || this.ackInterval == null) return;
    for (const st of this._streams.values()) {
      const pos = st.consumed;
      if (!pos || !st.live || pos.epoch !== st.epoch || pos.offset === 0 || (st.acked && st.acked.epoch === pos.epoch && st.acked.offset === pos.offset)) continue;
      this._out.push({ t: "ack", stream: st.stream, offset: pos.offset });
      st.acked = { ...pos };
    }
  }

  // rule 10: time
  nextDeadline() {
    let t = this._ackAt;
    for (const r of this._kept) if (r.retryAt !== null && (t === null || r.retryAt < t)) t = r.retryAt;
    return t;
  }

  tick(now) {
    if (this._ackAt !== null && now >= this._ackAt) this.flushAcks();
    if (this.state !== "open") return;
    for (const req of [...this._kept]) {
      if (req.retryAt !== null && now >= req.retryAt) {
        req.retryAt = null;
        if (req.id === null) this._send(req);
      }
    }
  }

  framesToSend() { const out = this._out; this._out = []; return out; }
  /** The frames to send, encoded as JSON text messages. */
  dataToSend() { return this.framesToSend().map((f) => JSON.stringify(f)); }

  receiveData(text, now) {
    let frame;
    try { frame = parseJSON(typeof text === "string" ? text : new TextDecoder().decode(text)); } catch (e) {
      throw new RtcoreError("bad_frame", `undecodable json frame: ${e.message}`);
    }
    if (frame === null || typeof frame !== "object" || typeof frame.t !== "string") throw new RtcoreError("bad_frame", "not a server frame");
    return this.receiveFrame(frame, now);
  }

  receiveFrame(frame, now) {
    if (this.state === "hello") this._onHelloAnswer(frame);
    else if (this.state === "open") {
      this._onFrame(frame, now);
      if (this._rooms.size) this._routeRooms(now);
    }
    return this.events();
  }

  events() { const out = this._events; this._events = []; return out; }

  // --- internals
  _checkOpen() { if (this.state === "closed") throw connectionClosed(1000, "the client is closed", "client_closed"); }

  _subRequest(st, kept) {
    // `since` is read at send time: a resubscription resumes from the cursor (rule 2).
    return newRequest("sub", (id) => {
      const f = { t: "sub", id, stream: st.stream };
      if (st.epoch !== null) f.since = { epoch: st.epoch, offset: st.offset };
      else if (st.wantCursor) f.cursor = true;
      return f;
    }, { stream: st.stream, kept });
  }

  _keep(req) { this._kept.add(req); if (this.state === "open") this._send(req); }

  _send(req) { const id = this._nextId++; req.id = id; this._sent.set(id, req); this._out.push(req.make(id)); }

  _sendNowOrFail(req) {
    if (this.state === "open") this._send(req);
    else this._resolve(req, undefined, connectionClosed(1006, "not connected"));
  }

  _forget(req) {
    this._kept.delete(req);
    if (req.id !== null && this._sent.get(req.id) === req) this._sent.delete(req.id);
    req.id = null; req.retryAt = null;
  }

  _resolve(req, result, error = null) {
    if (req.done) return;
    req.result = result; req.error = error; req.done = true;
    this._events.push({ kind: "replied", request: req });
  }

  _attach() {
    // welcome: resubscribe established streams (rule 2), then resend kept requests in order (rule 7)
    for (const st of this._streams.values()) if (!st.request || st.request.done) this._send(this._subRequest(st, false));
    for (const req of this._kept) this._send(req);
  }

  _onHelloAnswer(f) {
    if (f.t === "welcome") {
      this.state = "open"; this.welcome = f;
      this._events.push({ kind: "connected", welcome: f });
      this._attach();
    } else if (f.t === "err") {
      this.state = "idle";
      this._events.push({ kind: "refused", error: new RtcoreError(f.code, f.message, { retryable: f.retryable }) });
    } else if (f.t === "bye") {
      this.state = "idle";
      this._events.push({ kind: "refused", error: connectionClosed(f.reconnect ? 1001 : 1008, f.code, f.code) });
    }
  }

  _onFrame(f, now) {
    switch (f.t) {
      case "evt": return this._onEvt(f);
      case "subbed": return this._onSubbed(f);
      case "snap": {
        const st = this._streams.get(f.stream);
        if (st) {
          st.epoch = f.epoch; st.offset = f.offset; st.wantCursor = false;
          this._events.push({ kind: "missed", notice: { t: "missed", stream: f.stream, epoch: f.epoch, offset: f.offset, state: f.state, checksum: f.checksum } });
        }
        return;
      }
      case "sync": {
        const st = this._streams.get(f.stream);
        if (st && (f.epoch === undefined || f.epoch === "" || f.epoch === st.epoch)) this._events.push({ kind: "sync", frame: f });
        return;
      }
      case "ok": case "err": case "pong":
        if (f.id != null && this._sent.has(f.id)) {
          const req = this._sent.get(f.id); this._sent.delete(f.id);
          return this._onReply(req, f, now);
        }
        if (f.t === "err" && f.code === "token_expired" && f.id == null) this._events.push({ kind: "tokenExpired" });
        else if (f.t === "err") this._events.push({ kind: "serverError", error: new RtcoreError(f.code, f.message, { retryable: f.retryable }) });
        return;
      case "msg": this._events.push({ kind: "msg", frame: f }); return; // rule 12: nothing to track
      case "bye": this._events.push({ kind: "bye", frame: f }); return;
      default: return; // a late reply, a second welcome, a frame type from the future
    }
  }

  _onEvt(evt) {
    const st = this._streams.get(evt.stream);
    if (!st) return; // in flight when the application unsubscribed
    if (st.epoch !== null && (evt.epoch !== st.epoch || evt.offset > st.offset + 1)) {
      // rule 4: only a broken connection loses frames: resume from the cursor, never skip
      this.state = "broken";
      this._events.push({ kind: "broken", stream: evt.stream, reason: `gap in ${evt.stream}: ${evt.epoch}:${evt.offset} after ${st.epoch}:${st.offset}` });
      return;
    }
    if (evt.epoch === st.epoch && evt.offset <= st.offset) { this.duplicates++; return; } // rule 3
    st.epoch = evt.epoch; st.offset = evt.offset; st.wantCursor = false;
    this._events.push({ kind: "evt", frame: evt });
  }

  _onSubbed(f) {
    let req = this._sent.get(f.id);
    if (req && (req.kind !== "sub" || req.stream !== f.stream)) req = undefined; // an epoch change reusing an id
    if (req) this._sent.delete(f.id);
    const st = this._streams.get(f.stream);
    if (st) {
      st.live = true;
      if (f.recovered) {
        if (st.epoch !== null && st.offset === 0) st.epoch = f.epoch; // "from the very start"
      } else if (!f.snap) {
        const had = st.epoch !== null;
        st.epoch = f.epoch; st.offset = f.offset; st.wantCursor = false;
        if (had) this._events.push({ kind: "missed", notice: { t: "missed", stream: f.stream, epoch: f.epoch, offset: f.offset, state: null, checksum: null } });
      }
    }
    if (req) {
      this._kept.delete(req);
      req.id = null; req.reply = f;
      if (req.kept) this._resolve(req, f);
      else { req.done = true; req.result = f; }
    }
  }

  _onReply(req, f, now) {
    req.id = null; req.reply = f;
    if (f.t === "err") {
      const error = new RtcoreError(f.code, f.message, { retryable: f.retryable });
      if (req.kind === "cmd" && req.retry && f.code === "idempotency_in_progress") {
        req.retryAt = now + backoffDelay(req.attempts, ...IN_PROGRESS_RETRY, { random: this.random });
        req.attempts++;
        return;
      }
      if (req.kind === "cmd" && req.retry && f.code === "shutdown") return; // resent on the next connection
      if (req.kind === "sub" && !req.kept) {
        const st = this._streams.get(req.stream);
        if (st && (!st.request || st.request.done)) {
          this._streams.delete(req.stream);
          this._events.push({ kind: "ended", stream: req.stream, error });
        }
        return;
      }
      if (req.kind === "sub") {
        const st = this._streams.get(req.stream);
        if (st && st.request === req) this._streams.delete(req.stream);
      }
      this._kept.delete(req);
      this._resolve(req, undefined, error);
      return;
    }
    this._kept.delete(req);
    this._resolve(req, f.t === "ok" ? f.result : f);
  }
}

const LONE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** The path of the first string (or key) in `v` with a lone surrogate, else null. */
function loneSurrogate(v, path) {
  if (typeof v === "string") return LONE.test(v) ? path : null;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) { const w = loneSurrogate(v[i], `${path}[${i}]`); if (w) return w; }
  } else if (isMap(v)) {
    for (const [k, x] of Object.entries(v)) {
      if (LONE.test(k)) return `${path} key ${JSON.stringify(k)}`;
      const w = loneSurrogate(x, `${path}.${k}`);
      if (w) return w;
    }
  }
  return null;
}

function newRequest(kind, make, { stream = null, key = null, kept = false, retry = true } = {}) {
  return { kind, make, stream, key, kept, retry, id: null, done: false, result: undefined, error: null, reply: null, retryAt: null, attempts: 0, waiter: null };
}

function randomKey() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID().replace(/-/g, "");
  const b = new Uint8Array(16);
  if (c && c.getRandomValues) c.getRandomValues(b); else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  return hex(b);
}

// --- the driver: Client, Subscription, Room -------------------------------------------------

const now = () => (globalThis.performance ? performance.now() : Date.now()) / 1000;

export class Subscription {
  constructor(client, stream) {
    this.client = client;
    this.stream = stream;
    this.ended = null; // the error that ended it, once ended
    this._callbacks = [];
    this._queue = [];
    this._waiters = [];
  }
  /** Position of the last item the application consumed: {epoch, offset} | null. */
  get position() { return this.client.session.position(this.stream); }
  /** Call fn(item) for every item from now on (queued items first); items handed to callbacks count as consumed. */
  on(fn) {
    this._callbacks.push(fn);
    const queued = this._queue; this._queue = [];
    for (const item of queued) this._deliver(item);
    return () => { const i = this._callbacks.indexOf(fn); if (i >= 0) this._callbacks.splice(i, 1); };
  }
  _put(item) {
    if (this._waiters.length) { const w = this._waiters.shift(); this._consumed(item); w.resolve({ value: item, done: false }); }
    else if (this._callbacks.length) this._deliver(item);
    else this._queue.push(item);
  }
  _deliver(item) {
    for (const fn of [...this._callbacks]) this.client._run(fn, item);
    this._consumed(item);
  }
  _consumed(item) { this.client._consumed(this.stream, item); }
  _end(error = null) {
    this.ended = error || connectionClosed(1000, "unsubscribed", "unsubscribed");
    for (const w of this._waiters.splice(0)) error ? w.reject(error) : w.resolve({ value: undefined, done: true });
  }
  next() {
    if (this._queue.length) { const item = this._queue.shift(); this._consumed(item); return Promise.resolve({ value: item, done: false }); }
    if (this.ended) return this.ended.code === "unsubscribed" || this.ended.code === "client_closed" ? Promise.resolve({ value: undefined, done: true }) : Promise.reject(this.ended);
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }
  [Symbol.asyncIterator]() { return this; }
  async unsubscribe({ timeout = 10 } = {}) {
    if (this.client._subs.get(this.stream) === this) this.client._subs.delete(this.stream);
    const req = this.client.session.unsubscribe(this.stream);
    this._end(null);
    this.client._flush();
    if (req) await this.client._wait(req, timeout, "unsubscribe", false);
  }
}

export class Room {
  constructor(client, view, joined) {
    this.client = client;
    this.view = view;
    this.joined = joined;
    this.id = view.roomId; this.type = view.type; this.code = view.code; this.user = view.user;
    this.left = false;
    this._callbacks = [];
    this._onMessage = [];
    this._waiters = new Set();
  }
  get state() { return this.view.state; }
  get document() { return this.view.document; }
  get members() { return { ...(this.view.document?.members ?? {}) }; }
  get info() { return { ...(this.view.document?.room ?? {}) }; }
  get ready() { return this.view.ready; }
  get verified() { return this.view.verified; }
  get resyncs() { return this.view.resyncs; }
  onChange(fn) {
    this._callbacks.push(fn);
    return () => { const i = this._callbacks.indexOf(fn); if (i >= 0) this._callbacks.splice(i, 1); };
  }
  onMessage(type, fn) {
    const entry = [type, fn];
    this._onMessage.push(entry);
    return () => { const i = this._onMessage.indexOf(entry); if (i >= 0) this._onMessage.splice(i, 1); };
  }
  /** Resolve with the state once predicate(state) holds (checked now and after every change). */
  waitFor(predicate, { timeout = 10 } = {}) {
    return new Promise((resolve, reject) => {
      const w = { check: () => {
        const s = this.view.state;
        let ok = false;
        try { ok = s != null && predicate(s); } catch (e) { done(); reject(e); return; }
        if (ok) { done(); resolve(s); }
      }, fail: (e) => { done(); reject(e); } };
      const timer = setTimeout(() => w.fail(new RtcoreError("timeout", `room ${this.id}: condition not met within ${timeout} s`)), timeout * 1000);
      const done = () => { clearTimeout(timer); this._waiters.delete(w); };
      this._waiters.add(w);
      w.check();
    });
  }
  send(type, data = null, { key = null, timeout = 10 } = {}) {
    return this.client.command("room.send", { room_id: this.id, type, data }, { key, timeout });
  }
  async leave({ timeout = 10 } = {}) {
    if (this.left) return;
    try { await this.client.command("room.leave", { room_id: this.id }, { timeout }); }
    finally { await this.client._roomDetach(this, timeout); }
  }
  _deliver(change) {
    for (const fn of [...this._callbacks]) this.client._run(fn, change);
    if (change.kind === "message" || change.kind === "direct") {
      const msg = isMap(change.message) ? change.message : {};
      for (const [type, fn] of [...this._onMessage]) {
        if (type == null) this.client._run(fn, msg);
        else if (msg.type === type) this.client._run(fn, msg.data);
      }
    }
    for (const w of [...this._waiters]) w.check();
  }
  _end() {
    this.left = true;
    for (const w of [...this._waiters]) w.fail(new RtcoreError("room_left", `room ${this.id}: left`));
  }
}

export class Client {
  constructor(url, options = {}) {
    this.url = url;
    this.options = {
      token: null, tokenProvider: null, backoffBase: 0.1, backoffMax: 10, maxAttempts: null,
      heartbeat: null, connectTimeout: 10, ackInterval: DEFAULT_ACK_INTERVAL, WebSocket: null, random: Math.random, ...options,
    };
    this._WS = this.options.WebSocket || globalThis.WebSocket;
    if (!this._WS) throw new RtcoreError("bad_request", "no WebSocket implementation: pass options.WebSocket (Node < 22: run with --experimental-websocket)");
    this._token = this.options.token;
    this.session = new ClientSession({ ackInterval: this.options.ackInterval, random: this.options.random });
    this.welcome = null;
    this.reconnects = 0;
    this.closed = null; // the error that closed the client (or a client_closed one)
    this.rooms = new Map();
    this._subs = new Map();
    this._listeners = new Map();
    this._onMessage = [];
    this._ws = null;
    this._timer = null;
    this._hbTimer = null;
    this._ping = null;
    this._bye = null;
    this._closing = false;
  }

  static async connect(url, options = {}) {
    const c = new Client(url, options);
    await c.connect();
    return c;
  }

  get connected() { return this.session.state === "open"; }
  get principal() { return this.welcome ? this.welcome.principal ?? null : null; }
  get duplicates() { return this.session.duplicates; }
  positions() { const out = {}; for (const s of this.session.streams) { const p = this.session.position(s); if (p) out[s] = p; } return out; }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, []);
    this._listeners.get(event).push(fn);
    return () => { const l = this._listeners.get(event); const i = l.indexOf(fn); if (i >= 0) l.splice(i, 1); };
  }
  /** Direct messages not routed to a followed room: fn(data) for `type`, fn({type, data, room}) for null. */
  onMessage(type, fn) {
    const entry = [type, fn];
    this._onMessage.push(entry);
    return () => { const i = this._onMessage.indexOf(entry); if (i >= 0) this._onMessage.splice(i, 1); };
  }
  _emit(event, arg) { for (const fn of [...(this._listeners.get(event) || [])]) this._run(fn, arg); }
  _run(fn, arg) {
    try { fn(arg); } catch (e) {
      if (fn && this._listeners.get("error")?.includes(fn)) { console.error(e); return; }
      if ((this._listeners.get("error") || []).length) this._emit("error", e); else console.error("rtcore: callback failed", e);
    }
  }

  /** Open the first connection (hello → welcome). Rejects if it fails; later drops reconnect. */
  async connect() {
    if (this.session.state !== "idle" || this._ws) throw new RtcoreError("internal", "already connected");
    await this._open();
  }

  async command(name, args = null, { key = null, timeout = 10 } = {}) {
    this._checkOpen();
    const req = this.session.command(name, args, { key });
    this._flush();
    return this._wait(req, timeout, `command ${name}`);
  }

  async subscribe(stream, { since = null, cursor = false, onItem = null, timeout = 10 } = {}) {
    this._checkOpen();
    const sub = new Subscription(this, stream);
    if (onItem) sub.on(onItem);
    const req = this.session.subscribe(stream, { since, cursor });
    this._subs.set(stream, sub);
    this._flush();
    try { await this._wait(req, timeout, `subscribe ${stream}`); } catch (e) {
      if (this._subs.get(stream) === sub) this._subs.delete(stream);
      this.session.unsubscribe(stream); this._flush();
      throw e;
    }
    return sub;
  }

  joinOrCreate(type, { options = {}, metadata = null, key = null, timeout = 10 } = {}) {
    const args = { type, options };
    if (metadata != null) args.metadata = metadata;
    return this._openRoom("room.join_or_create", args, key, timeout);
  }
  create(type, { options = {}, private: priv = false, metadata = null, key = null, timeout = 10 } = {}) {
    const args = { type, options, private: priv };
    if (metadata != null) args.metadata = metadata;
    return this._openRoom("room.create", args, key, timeout);
  }
  join(target, { options = {}, key = null, timeout = 10 } = {}) {
    const t = typeof target === "string" ? { roomId: target } : target || {};
    if ((t.roomId == null) === (t.code == null)) throw new TypeError("join: give a room id or {code} (one of them)");
    const args = t.roomId != null ? { room_id: t.roomId } : { code: t.code };
    args.options = options;
    return this._openRoom("room.join", args, key, timeout);
  }

  async close() {
    if (this.closed) return;
    this._closing = true;
    this.session.flushAcks();
    this._flush();
    const ws = this._ws;
    this._shutdown(null);
    if (ws && ws.readyState <= 1) {
      await new Promise((resolve) => {
        const t = setTimeout(resolve, 1000);
        ws.addEventListener("close", () => { clearTimeout(t); resolve(); });
        ws.close(1000);
      });
    }
  }

  // --- internals
  _checkOpen() { if (this.closed) throw this.closed; }

  async _openRoom(name, args, key, timeout) {
    const joined = await this.command(name, args, { key, timeout });
    const view = new RoomView(joined);
    const existing = this.rooms.get(view.roomId);
    if (existing && !existing.left) return existing;
    const room = new Room(this, view, joined);
    this.rooms.set(room.id, room);
    try {
      const reqs = this.session.trackRoom(view);
      this._flush();
      await Promise.all(reqs.map((r) => this._wait(r, timeout, `subscribe ${r.stream}`)));
      await new Promise((resolve, reject) => {
        const until = setTimeout(() => reject(new RtcoreError("timeout", `room ${room.id}: no document within ${timeout} s`)), timeout * 1000);
        const check = () => { if (view.ready) { clearTimeout(until); off(); resolve(); } };
        const off = room.onChange(check);
        check();
      });
    } catch (e) {
      await this._roomDetach(room, timeout);
      throw e;
    }
    return room;
  }

  async _roomDetach(room, timeout) {
    if (this.rooms.get(room.id) === room) this.rooms.delete(room.id);
    room._end();
    const reqs = this.session.untrackRoom(room.view);
    this._flush();
    await Promise.all(reqs.map((r) => this._wait(r, timeout, "unsubscribe", false).catch(() => {})));
  }

  _wait(req, timeout, what, check = true) {
    return new Promise((resolve, reject) => {
      const settle = () => {
        clearTimeout(timer);
        if (req.error && check) reject(req.error);
        else resolve(req.kind === "cmd" ? toPlain(req.result) : req.result);
      };
      if (req.done) { settle(); return; }
      const timer = setTimeout(() => {
        this.session.forget(req);
        req.waiter = null;
        reject(new RtcoreError("timeout", `${what}: no answer within ${timeout} s`));
      }, timeout * 1000);
      req.waiter = settle;
    });
  }

  _consumed(stream, item) {
    this.session.consumed(stream, item.epoch, item.offset, now());
    this._schedule();
  }

  _flush() {
    const frames = this.session.dataToSend();
    const ws = this._ws;
    if (ws && ws.readyState === 1) for (const f of frames) ws.send(f);
    this._schedule();
  }

  _schedule() {
    const at = this.session.nextDeadline();
    if (this._timer) { clearTimeout(this._timer); this._timer = null; }
    if (at === null || this.closed) return;
    this._timer = setTimeout(() => { this._timer = null; this.session.tick(now()); this._flush(); }, Math.max(0, (at - now()) * 1000));
  }

  _dispatch(events) {
    for (const ev of events) {
      switch (ev.kind) {
        case "evt": {
          const sub = this._subs.get(ev.frame.stream);
          const f = ev.frame;
          if (sub) sub._put({ t: "evt", stream: f.stream, epoch: f.epoch, offset: f.offset, type: f.type, data: toPlain(f.data), ts: f.ts });
          break;
        }
        case "missed": {
          const sub = this._subs.get(ev.notice.stream);
          if (sub) sub._put({ ...ev.notice, state: toPlain(ev.notice.state) });
          break;
        }
        case "replied": if (ev.request.waiter) { const w = ev.request.waiter; ev.request.waiter = null; w(); } break;
        case "ended": {
          const sub = this._subs.get(ev.stream);
          if (sub) { this._subs.delete(ev.stream); sub._end(ev.error); }
          break;
        }
        case "broken": this._drop(4000, "gap"); break;
        case "tokenExpired": this._refreshToken(); break;
        case "serverError": this._emit("error", ev.error); break;
        case "bye": this._bye = ev.frame; break;
        case "msg": {
          const f = ev.frame;
          const whole = { type: f.type, data: toPlain(f.data ?? null), room: f.room ?? null };
          for (const [type, fn] of [...this._onMessage]) {
            if (type == null) this._run(fn, whole);
            else if (type === whole.type) this._run(fn, whole.data);
          }
          break;
        }
        case "room": {
          const room = this.rooms.get(ev.view.roomId);
          if (room && room.view === ev.view) room._deliver(ev.change);
          break;
        }
        default: break; // connected/refused are handled by _open; sync frames of plain streams: nothing folds them
      }
    }
  }

  async _provideToken() {
    const t = await this.options.tokenProvider();
    this._token = t;
    return t;
  }

  async _refreshToken() {
    if (!this.options.tokenProvider) return;
    try {
      const token = await this._provideToken();
      if (this.session.state === "open") { const req = this.session.auth(token); this._flush(); await this._wait(req, 10, "auth"); }
    } catch (e) { this._emit("error", e); }
  }

  _open(reconnect = false) {
    // One connection attempt: WebSocket open, hello, welcome. Resolves at welcome.
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (this._ws === ws) this._ws = null;
        this._dispatch(this.session.disconnected(err.closeCode ?? 1006, err.message));
        try { ws.close(); } catch { /* already closed */ }
        reject(err);
      };
      let ws;
      try { ws = new this._WS(this.url, "rtcore.v1.json"); } catch (e) { reject(connectionClosed(1006, String(e?.message || e))); return; }
      this._ws = ws;
      const timer = setTimeout(() => fail(new RtcoreError("timeout", `no welcome within ${this.options.connectTimeout} s`, { retryable: true })), this.options.connectTimeout * 1000);
      ws.addEventListener("open", async () => {
        if (this.closed) { fail(this.closed); return; } // close() ran while this attempt was under way
        try { if (this._token == null && this.options.tokenProvider) await this._provideToken(); } catch (e) { fail(e); return; }
        if (settled) return;
        if (this.closed) { fail(this.closed); return; }
        this.session.start(this._token);
        this._flush();
      });
      ws.addEventListener("message", (e) => {
        if (this._ws !== ws) return; // a connection we dropped
        let events;
        try { events = this.session.receiveData(e.data, now()); } catch (err) { this._drop(1002, err.message); return; }
        if (!settled) {
          const refused = events.find((x) => x.kind === "refused");
          if (refused) { fail(refused.error); return; }
          if (events.some((x) => x.kind === "connected")) {
            settled = true;
            clearTimeout(timer);
            this.welcome = this.session.welcome;
            if (reconnect) this.reconnects++; // before "connected" fires: its listeners see the count
            this._startHeartbeat();
            this._dispatch(events);
            this._flush();
            this._emit("connected", this.welcome);
            resolve();
            return;
          }
        }
        this._dispatch(events);
        this._flush();
      });
      ws.addEventListener("close", (e) => {
        if (!settled) { fail(connectionClosed(e.code, e.reason || "connection failed")); return; }
        if (this._ws === ws) this._lost(e.code, e.reason);
      });
      ws.addEventListener("error", () => { if (!settled) fail(connectionClosed(1006, "connection failed")); });
    });
  }

  _startHeartbeat() {
    clearInterval(this._hbTimer);
    const interval = this.options.heartbeat || (this.welcome && this.welcome.heartbeat) || 15;
    this._ping = null;
    this._hbTimer = setInterval(() => {
      if (this.session.state !== "open") return;
      if (this._ping && !this._ping.done) { this._drop(4001, "no pong"); return; } // half-open TCP shows no error
      this._ping = this.session.ping();
      this._flush();
    }, interval * 1000);
  }

  _drop(code, reason) {
    // Leave this connection now (a gap, a dead peer): ignore whatever else it says.
    const ws = this._ws;
    if (!ws) return;
    try { ws.close(code, reason); } catch { /* closing already */ }
    this._lost(code, reason);
  }

  _lost(code, reason) {
    this._ws = null;
    clearInterval(this._hbTimer);
    this.welcome = null;
    this._dispatch(this.session.disconnected(code, reason));
    this._emit("disconnected", { code, reason });
    if (this._closing || this.closed) return;
    const bye = this._bye; this._bye = null;
    if (bye && !bye.reconnect) { this._shutdown(new RtcoreError(bye.code, bye.message)); return; }
    this._reconnect();
  }

  async _reconnect() {
    for (let attempt = 0; ; ) {
      const delay = backoffDelay(attempt, this.options.backoffBase, this.options.backoffMax, { random: this.options.random });
      this._emit("reconnecting", { attempt, delay });
      await new Promise((r) => setTimeout(r, delay * 1000));
      if (this._closing || this.closed) return;
      try {
        await this._open(true);
        return;
      } catch (e) {
        const retryAuth = (e.code === "unauthenticated" || e.code === "token_expired") && this.options.tokenProvider;
        if (!(e.retryable || e.closeCode != null || retryAuth)) { this._shutdown(e); return; }
        if (retryAuth) { try { await this._provideToken(); } catch { /* try again next attempt */ } }
      }
      attempt++;
      if (this.options.maxAttempts != null && attempt >= this.options.maxAttempts) {
        this._shutdown(connectionClosed(1006, `gave up after ${attempt} reconnect attempts`));
        return;
      }
    }
  }

  _shutdown(error) {
    if (this.closed) return;
    this.closed = error || connectionClosed(1000, "the client is closed", "client_closed");
    clearInterval(this._hbTimer);
    clearTimeout(this._timer);
    this._ws = null;
    this._dispatch(this.session.close(error));
    for (const sub of this._subs.values()) sub._end(error);
    this._subs.clear();
    for (const room of this.rooms.values()) room._end();
    this._emit("closed", error);
  }
}

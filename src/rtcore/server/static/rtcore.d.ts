// Type declarations for rtcore.js (served at /v1/client.d.ts).
// The frame interfaces below are checked against the server's /v1/schema by
// tests/js/test_js_client.py (test_dts_frames_match_schema): every frame of the
// schema is declared here with the same fields, the same optional fields and the same tag.

export declare const PROTOCOL_VERSION: 1;
export declare const DEFAULT_ACK_INTERVAL: number;

// --- wire frames (JSON encoding) ----------------------------------------------------------

export interface Position { epoch: string; offset: number }
export interface Limits {
  max_message_size?: number; max_subscriptions?: number; max_inflight?: number;
  command_rate?: number; command_burst?: number; idle_timeout?: number;
}

// client -> server
export interface HelloFrame { t: "hello"; v?: number; token?: string | null }
export interface AuthFrame { t: "auth"; id: number; token: string }
export interface SubFrame { t: "sub"; id: number; stream: string; since?: Position | null; cursor?: boolean }
export interface UnsubFrame { t: "unsub"; id: number; stream: string }
export interface CmdFrame { t: "cmd"; id: number; name: string; args?: unknown; key?: string | null }
export interface AckFrame { t: "ack"; stream: string; offset: number }
export interface PingFrame { t: "ping"; id: number }
export type ClientFrame = HelloFrame | AuthFrame | SubFrame | UnsubFrame | CmdFrame | AckFrame | PingFrame;

// server -> client
export interface WelcomeFrame { t: "welcome"; session: string; heartbeat: number; limits: Limits; principal?: string | null }
export interface OkFrame { t: "ok"; id: number; result?: unknown; replayed?: boolean }
export interface ErrFrame { t: "err"; id: number | null; code: string; message: string; retryable?: boolean; replayed?: boolean }
export interface SubbedFrame { t: "subbed"; id: number; stream: string; epoch: string; offset: number; recovered: boolean; snap?: boolean }
export interface EvtFrame { t: "evt"; stream: string; epoch: string; offset: number; type: string; data: unknown; ts: number }
export interface SnapFrame { t: "snap"; stream: string; epoch: string; offset: number; state: unknown; checksum: string }
export interface SyncFrame { t: "sync"; stream: string; offset: number; checksum: string; epoch?: string }
export interface MsgFrame { t: "msg"; type: string; data?: unknown; room?: string | null }
export interface PongFrame { t: "pong"; id: number }
export interface ByeFrame { t: "bye"; code: string; message: string; reconnect: boolean }
export type ServerFrame = WelcomeFrame | OkFrame | ErrFrame | SubbedFrame | EvtFrame | SnapFrame | SyncFrame | MsgFrame | PongFrame | ByeFrame;

// --- what the application sees ------------------------------------------------------------

export interface EvtItem { t: "evt"; stream: string; epoch: string; offset: number; type: string; data: any; ts: number }
export interface MissedItem { t: "missed"; stream: string; epoch: string; offset: number; state: any; checksum: string | null }
export type Item = EvtItem | MissedItem;

/** A direct message (`msg` frame; `ctx.send_to` on the server): ephemeral, in no stream. */
export interface DirectMessage { type: string; data: any; room: string | null }

export interface RoomChange {
  roomId: string;
  stream: string;
  kind: "snapshot" | "patch" | "message" | "direct" | "resync";
  offset: number;
  ops?: any[];
  message?: any;
}

export declare class RtcoreError extends Error {
  constructor(code: string, message: string, extra?: { retryable?: boolean; closeCode?: number });
  code: string;
  retryable: boolean;
  closeCode: number | null;
}

export interface ClientOptions {
  token?: string | null;
  tokenProvider?: (() => string | Promise<string>) | null;
  backoffBase?: number;
  backoffMax?: number;
  maxAttempts?: number | null;
  heartbeat?: number | null;
  connectTimeout?: number;
  ackInterval?: number | null;
  WebSocket?: any;
  random?: () => number;
}

export type ClientEventName = "connected" | "disconnected" | "reconnecting" | "closed" | "error";

export declare class Client {
  constructor(url: string, options?: ClientOptions);
  static connect(url: string, options?: ClientOptions): Promise<Client>;
  connect(): Promise<void>;
  readonly url: string;
  readonly connected: boolean;
  readonly welcome: WelcomeFrame | null;
  readonly principal: string | null;
  readonly reconnects: number;
  readonly duplicates: number;
  readonly closed: RtcoreError | null;
  readonly rooms: Map<string, Room>;
  readonly session: ClientSession;
  positions(): Record<string, Position>;
  on(event: "connected", fn: (welcome: WelcomeFrame) => void): () => void;
  on(event: "disconnected", fn: (info: { code: number; reason: string }) => void): () => void;
  on(event: "reconnecting", fn: (info: { attempt: number; delay: number }) => void): () => void;
  on(event: "closed", fn: (error: RtcoreError | null) => void): () => void;
  on(event: "error", fn: (error: unknown) => void): () => void;
  command<T = any>(name: string, args?: unknown, opts?: { key?: string | null; timeout?: number }): Promise<T>;
  subscribe(stream: string, opts?: { since?: Position | null; cursor?: boolean; onItem?: ((item: Item) => void) | null; timeout?: number }): Promise<Subscription>;
  joinOrCreate(type: string, opts?: { options?: object; metadata?: object | null; key?: string | null; timeout?: number }): Promise<Room>;
  create(type: string, opts?: { options?: object; private?: boolean; metadata?: object | null; key?: string | null; timeout?: number }): Promise<Room>;
  join(target: string | { roomId: string } | { code: string }, opts?: { options?: object; key?: string | null; timeout?: number }): Promise<Room>;
  /** Direct messages not routed to a followed room: fn(data) for `type`, fn(whole message) for null. */
  onMessage(type: null, fn: (message: DirectMessage) => void): () => void;
  onMessage(type: string, fn: (data: any) => void): () => void;
  close(): Promise<void>;
}

export declare class Subscription implements AsyncIterableIterator<Item> {
  readonly stream: string;
  readonly position: Position | null;
  readonly ended: RtcoreError | null;
  on(fn: (item: Item) => void): () => void;
  next(): Promise<IteratorResult<Item>>;
  [Symbol.asyncIterator](): AsyncIterableIterator<Item>;
  unsubscribe(opts?: { timeout?: number }): Promise<void>;
}

export declare class Room<S = any> {
  readonly id: string;
  readonly type: string;
  readonly code: string;
  readonly user: string;
  readonly state: S | null;
  readonly document: { state: S; members: Record<string, any>; room: Record<string, any>; [k: string]: any } | null;
  readonly members: Record<string, { connected: boolean; grace_until?: number | null; [k: string]: any }>;
  readonly info: Record<string, any>;
  readonly ready: boolean;
  readonly verified: number;
  readonly resyncs: number;
  readonly left: boolean;
  onChange(fn: (change: RoomChange) => void): () => void;
  onMessage(type: string | null, fn: (data: any) => void): () => void;
  waitFor(predicate: (state: S) => boolean, opts?: { timeout?: number }): Promise<S>;
  send<T = any>(type: string, data?: unknown, opts?: { key?: string | null; timeout?: number }): Promise<T>;
  leave(opts?: { timeout?: number }): Promise<void>;
}

export declare class Float { constructor(value: number); value: number; valueOf(): number }
export declare class PatchError extends Error {}
export declare class RoomView {
  constructor(joined: Record<string, any>, user?: string);
  readonly roomId: string; readonly stream: string; readonly viewStream: string | null;
  readonly user: string; readonly ready: boolean; readonly state: any; readonly document: any;
  verified: number; resyncs: number;
  feed(item: any): RoomChange[];
  direct(frame: { type: string; data?: any; room?: string | null }): RoomChange[];
}
export declare class ClientSession {
  constructor(opts?: { ackInterval?: number | null; random?: () => number });
  state: "idle" | "hello" | "open" | "broken" | "closed";
  duplicates: number;
  [k: string]: any;
}

export declare function checksum(value: unknown): string;
export declare function canonicalEncode(value: unknown): Uint8Array;
export declare function blake2b(data: Uint8Array, outlen?: number): Uint8Array;
export declare function parseJSON(text: string): any;
export declare function toPlain(value: unknown): any;
export declare function applyPatch(doc: any, ops: any[]): any;
export declare function backoffDelay(attempt: number, base: number, maximum: number, opts?: { jitter?: number; random?: () => number }): number;

// The Colyseus 0.18 server of `benchmarks/rooms.py --colyseus`.
//
// Two room types shaped like the ones `rooms.py --serve` defines for rtcore:
//
// * `duel`: two seats; state {players, turn, moves, last}. A "move" from the
//   player whose turn it is bumps `moves`, sets `last`, passes the turn and
//   sends the patch at once (`broadcastPatch()` in the handler; the automatic
//   patch interval is off, `patchRate = null`). A move out of turn gets a
//   "rejected" message back (the load client counts those as errors). The room
//   locks itself when both seats are taken.
// * `arena`: no seat limit; state {tick, pos: {sessionId: Pos(x, y)}}. A
//   20 Hz simulation interval bumps `tick`; "input" sets the sender's
//   position; patches go out on Colyseus's default 50 ms patch interval.
//   `autoDispose = false` so it survives between the benchmark's clients.
//
// The simulation step and the patch broadcast are timed with
// performance.now() (wall) and process.cpuUsage() (CPU, the whole process:
// the JS thread plus whatever libuv / GC threads ran meanwhile) and handed out
// on a small side HTTP server, like rtcore's `bench.ticks` command:
//
//   GET /ticks        -> {"step": [[wall_s, cpu_s], ...], "patch": [[wall_s, cpu_s], ...]} (and clears)
//   POST /create/NAME -> {"roomId": ...}: a room created by the matchmaker with nobody seated
//
// Prints `READY <colyseus port> <bench port>` once both listen on 127.0.0.1.
import http from "node:http";
import { performance } from "node:perf_hooks";
import { Server, Room, matchMaker } from "@colyseus/core";
import { WebSocketTransport } from "@colyseus/ws-transport";
import { Schema, MapSchema, ArraySchema, defineTypes } from "@colyseus/schema";

class Duel extends Schema {
  constructor() {
    super();
    this.players = new ArraySchema();
    this.turn = "";
    this.moves = 0;
    this.last = -1;
  }
}
defineTypes(Duel, { players: ["string"], turn: "string", moves: "number", last: "number" });

class Pos extends Schema {
  constructor(x = 0, y = 0) {
    super();
    this.x = x;
    this.y = y;
  }
}
defineTypes(Pos, { x: "float64", y: "float64" });

class Arena extends Schema {
  constructor() {
    super();
    this.tick = 0;
    this.pos = new MapSchema();
  }
}
defineTypes(Arena, { tick: "number", pos: { map: Pos } });

class DuelRoom extends Room {
  maxClients = 2;

  onCreate() {
    this.state = new Duel();
    // Instant patches: no automatic interval, the handler sends each move's patch.
    this.patchRate = null;
    this.onMessage("move", (client, data) => {
      const s = this.state;
      if (s.turn !== client.sessionId) {
        client.send("rejected", "not_your_turn");
        return;
      }
      s.moves += 1;
      s.last = data.n;
      s.turn = s.players[0] === client.sessionId ? s.players[1] : s.players[0];
      this.broadcastPatch();
    });
  }

  onJoin(client) {
    this.state.players.push(client.sessionId);
    if (this.state.players.length === 2) {
      this.lock();
      this.state.turn = this.state.players[0];
      this.broadcastPatch();
    }
  }
}

const steps = [];
const patches = [];

function timed(list, fn) {
  const t0 = performance.now();
  const c0 = process.cpuUsage();
  const out = fn();
  const c = process.cpuUsage(c0);
  list.push([(performance.now() - t0) / 1e3, (c.user + c.system) / 1e6]);
  return out;
}

class ArenaRoom extends Room {
  maxClients = Infinity;
  autoDispose = false; // the bench's clients come and go; the room stays

  onCreate() {
    this.state = new Arena();
    // patchRate stays at Colyseus's default (50 ms).
    this.onMessage("input", (client, data) => {
      const p = this.state.pos.get(client.sessionId);
      if (p) {
        p.x = data.x;
        p.y = data.y;
      } else {
        this.state.pos.set(client.sessionId, new Pos(data.x, data.y));
      }
    });
    this.setSimulationInterval(() => timed(steps, () => { this.state.tick += 1; }), 50);
  }

  broadcastPatch() {
    return timed(patches, () => super.broadcastPatch());
  }

  onJoin(client) {
    this.state.pos.set(client.sessionId, new Pos(0, 0));
  }

  onLeave(client) {
    this.state.pos.delete(client.sessionId);
  }
}

const gameServer = new Server({ transport: new WebSocketTransport({ pingInterval: 0 }), greet: false });
gameServer.define("duel", DuelRoom);
gameServer.define("arena", ArenaRoom);
await gameServer.listen(0, "127.0.0.1");
const port = gameServer.transport.server.address().port;

const bench = http.createServer(async (req, res) => {
  try {
    let body;
    if (req.url === "/ticks") {
      body = { step: steps.splice(0), patch: patches.splice(0) };
    } else if (req.method === "POST" && req.url.startsWith("/create/")) {
      const room = await matchMaker.createRoom(req.url.slice("/create/".length), {});
      body = { roomId: room.roomId };
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(body));
  } catch (e) {
    res.writeHead(500).end(String(e));
  }
});
bench.listen(0, "127.0.0.1", () => {
  process.stdout.write(`READY ${port} ${bench.address().port}\n`);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => process.exit(0));
}

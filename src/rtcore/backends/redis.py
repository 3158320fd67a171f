"""The ``redis://host:port/db`` backend: shared by many nodes, through coredis.

Why it is shaped this way:

* **Every multi-step change is one Lua script.** Redis runs a script
  atomically, so reading the head, checking the idempotency key and
  ``expect``, bumping the head, ``XADD`` and trimming happen as one step even
  with many nodes appending to the same stream. No WATCH/MULTI retry loops.
* **Concurrent script calls share one round trip.** The calls queued while
  one batch is in flight go to Redis as the next batch: one ``EVALSHA`` of
  :data:`_BATCH`, a script holding every script body as a function, which
  runs the calls in order under ``pcall`` and returns one reply (or error)
  per call (see :class:`_Pipeliner`). The calls go as one MessagePack
  argument that the script decodes with ``cmsgpack``: the client's work per
  request argument is paid once per batch, not per key and argument. Each call stays atomic; a busy node
  pays one request and one round trip per batch instead of per call. On a
  plain ``redis://host:port/db`` URL the batches skip coredis: the node
  writes the ``EVALSHA`` as raw RESP on a connection of its own and parses
  the reply itself (see :class:`_RawLink`).
* **Keys of one stream** share a hash tag, so they would live in one cluster
  slot (a script may only touch keys of one slot)::

      rt:{<stream>}:m   hash   epoch, head
      rt:{<stream>}:l   stream entries with id "<offset>-0" and fields
                               e (epoch) t (type) d (msgpack data) ts (repr float) [k (key)]
      rt:{<stream>}:k   hash   idempotency key -> offset, for retained events only
      rt:streams        set    every stream name (for ``streams()`` and ``watch("*")``)
      rt:instance       string a random marker; when it vanishes Redis lost its data
      rt:all            stream every appended event again (fields s o e t d ts [k]),
                               auto ids, capped by MAXLEN ~ ``all_maxlen``

* **Consumer groups read ``rt:all``.** The append script also appends (``XADD``) the
  event (stream, offset and payload, so a processor still sees it after its
  stream's retention dropped it) to one global stream, and groups are
  ordinary Redis consumer groups on it: ``XREADGROUP`` hands each entry to
  one consumer (the node id), ``XACK`` finishes it, ``XAUTOCLAIM`` moves
  entries a dead consumer held to a live one. The global stream is one key
  outside the per-stream hash tag, so the append script is not
  cluster-compatible (one Redis or a primary with replicas); a cluster would
  shard ``rt:all``. Idle times are measured by Redis's clock, not ``now``.

* **Dense offsets are the entry ids.** Entry ``n`` has id ``n-0``, so
  ``read(after=n)`` is ``XRANGE (n+1)-0 +`` and trimming by count is
  ``XTRIM MINID``. Age retention cannot use ``MINID`` directly because ids are
  offsets, not times; the script walks the oldest entries (each carries its
  ``ts``) until it finds one young enough and then trims to that id. That
  costs one read per dropped event, which it pays once.
* **Epochs follow the meta hash.** The meta hash is written in the same script
  as every event, so it exists exactly as long as the data does (with AOF and
  ``appendfsync always`` both survive a crash together). Whenever a script
  finds no meta hash it starts a new life with a fresh random epoch and drops
  whatever log or key index was left, so an epoch is never reused and a client
  holding an old position is told its history is gone.
* **One blocking reader per feed.** A live feed is one ``XREAD BLOCK`` loop
  over every stream it watches, from the last offset it delivered, so there
  are no gaps or duplicates by construction. The block is short
  (:data:`BLOCK_MS`) so that ``watch``/``unwatch`` take effect quickly without
  a second connection. ``watch("*")`` rescans the ``rt:streams`` set when its
  size changes (names are only ever added). Each round also checks
  ``rt:instance``; when it changed, the feed re-reads the epoch of each stream
  and restarts streams that began a new life from offset 0. A newly watched
  stream's start is taken by the reader at its next round, but capped by the
  first head this process saw for it after ``watch`` (any append, read or
  info), so "watch, then read history" (the Hub's catch-up) never leaves a
  gap before live delivery starts.
* **No automatic retries.** The client is built with ``NoRetryPolicy``: an
  append whose reply was lost may have happened, so it must not be replayed
  blindly. Connection errors surface as :class:`~rtcore.errors.BackendError`
  (retryable); callers retry with the same ``key``.
* **Time is passed in.** Idempotency records, leases and cursors store their expiry
  and compare it with the caller's ``now`` (so fake clocks work); a real
  ``PEXPIRE`` of the same length (plus :data:`_GRACE_MS`) only collects garbage.

* **Signals ride on PUB/SUB.** :class:`RedisSignalBus` publishes every
  ephemeral message (direct messages to principals) on one channel,
  :data:`SIGNAL_CHANNEL`; each listening node holds one subscriber
  connection on it and filters what it receives itself, so the number of
  channels does not grow with principals. Redis stores nothing: a node whose
  subscriber connection is down misses what is published meanwhile
  (coredis reconnects and resubscribes with backoff).

``open_redis`` enters the coredis client (which owns an anyio task group) and
``aclose`` leaves it, so both must be called from the same task, nested like
an ``async with``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import math
import socket
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from typing import Any, cast

import anyio
import anyio.abc
import coredis
import coredis.exceptions
import msgspec
from anyio.abc import TaskStatus
from coredis.retry import NoRetryPolicy

from ..errors import BackendError, ConflictError
from ..protocol.idempotency import DEFAULT_TTL
from ._batch import UNSET, Batcher, Job
from .base import (
    AppendResult,
    Backend,
    Event,
    GroupMessage,
    IdempotencyRecord,
    Outcome,
    ReadResult,
    Retention,
    Snapshot,
    StreamInfo,
)
from .memory import new_epoch

__all__ = [
    "ALL_MAXLEN",
    "BLOCK_MS",
    "RedisBackend",
    "RedisCursorStore",
    "RedisEventLog",
    "RedisGroupLog",
    "RedisIdempotencyStore",
    "RedisLeaseStore",
    "RedisSnapshotStore",
    "open_redis",
]

#: How long one ``XREAD BLOCK`` waits; bounds how late a watch/unwatch takes effect.
BLOCK_MS = 100

#: A feed round (checks plus one XREAD) taking longer than this is abandoned as a dead connection.
_ROUND_TIMEOUT = 2.0 + BLOCK_MS / 1000

#: Entries one ``XREAD`` returns per stream at most.
_READ_COUNT = 500

#: Longest wait for the replies of one pipelined batch of script calls.
_CALL_TIMEOUT = 10.0

#: Most script calls one pipeline carries (the rest go in the next one).
_MAX_BATCH = 512

#: How often a call is sent again after ``NOSCRIPT`` (loading the script in between).
_NOSCRIPT_ATTEMPTS = 3

#: Added to every garbage-collecting PEXPIRE so real time never undercuts the caller's clock by a little.
_GRACE_MS = 1000
#: Seconds a Redis reply may take before the call fails with a retryable
#: BackendError. A paused or partitioned Redis keeps its connections open and
#: answers nothing; without a bound every command would hang with it. Longer
#: than any blocking read rtcore issues (BLOCK_MS, processors' 1 s).
COMMAND_TIMEOUT = 5.0

_REGISTRY = "rt:streams"
_INSTANCE = "rt:instance"
_ALL = "rt:all"

#: Default cap (approximate, ``MAXLEN ~``) of the global stream consumer groups read.
ALL_MAXLEN = 1_000_000

_encode = msgspec.msgpack.Encoder().encode
_decode_any = msgspec.msgpack.Decoder().decode
_decode_record = msgspec.msgpack.Decoder(IdempotencyRecord).decode
_decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode
#: Encodes a batch of script calls for :data:`_BATCH` (every argument a MessagePack str, see :func:`_lua_arg`).
_encode_calls = msgspec.msgpack.Encoder().encode


#: Byte-string argument types (a tuple: ``bytes | bytearray | memoryview`` in an
#: ``isinstance`` builds a union object on every call).
_BYTES_TYPES = (bytes, bytearray, memoryview)
#: The engine failures :class:`_EngineErrors` maps to BackendError (a tuple, as above).
_ENGINE_FAILURES = (coredis.exceptions.RedisError, OSError)

#: MessagePack str headers by length below 256 (fixstr, then str 8), for :func:`_lua_arg`.
_STR_HEADS = [bytes((0xA0 | n,)) for n in range(32)] + [bytes((0xD9, n)) for n in range(32, 0x100)]


def _lua_arg(value: Any) -> Any:
    """A script argument as the MessagePack *str* Lua's cmsgpack decodes into the Lua string Redis would pass.

    cmsgpack knows no *bin* type (msgspec's encoding of bytes), so bytes go as
    a pre-encoded str (Lua strings are byte strings); numbers become their
    decimal text, as Redis passes every argument as a string.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, _BYTES_TYPES):
        # bytes (fingerprints, records, payloads: every keyed command has
        # several) go without a copy; the others are copied to bytes.
        data = value if value.__class__ is bytes else bytes(value)
        n = len(data)
        if n < 0x100:
            head = _STR_HEADS[n]
        elif n < 0x10000:
            head = b"\xda" + n.to_bytes(2, "big")
        else:
            head = b"\xdb" + n.to_bytes(4, "big")
        return msgspec.Raw(head + data)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _stream_keys(stream: str) -> list[str]:
    return [f"rt:{{{stream}}}:m", f"rt:{{{stream}}}:l", f"rt:{{{stream}}}:k", _REGISTRY]


def _pair_key(kind: str, a: str, b: str) -> str:
    # Length-prefix the first part so ("a:b", "c") and ("a", "b:c") never collide.
    return f"rt:{kind}:{len(a)}:{a}:{b}"


def _px(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000)) + _GRACE_MS


#: ``str(_px(ttl))`` by ttl: a node's idempotency TTL and lease are the same
#: for every command, so their PEXPIRE argument is made once (bounded: a few
#: distinct values in practice, never more than 64 kept).
_PX_TEXT: dict[float, str] = {}


def _px_text(seconds: float) -> str:
    text = _PX_TEXT.get(seconds)
    if text is None:
        text = str(_px(seconds))
        if len(_PX_TEXT) < 64:
            _PX_TEXT[seconds] = text
    return text


# Shared Lua: create-or-load the meta hash, and trimming that keeps the key index in step.
_LUA_LIB = """
local function ensure(meta, log, idx, reg, name, fresh)
  local m = redis.call('HMGET', meta, 'epoch', 'head')
  if m[1] then return m[1], tonumber(m[2]) end
  -- no meta: a new stream, or Redis lost it. Start a new life; anything left
  -- of an older one would break dense offsets, so drop it.
  redis.call('DEL', log, idx)
  redis.call('HSET', meta, 'epoch', fresh, 'head', 0)
  redis.call('SADD', reg, name)
  return fresh, 0
end

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function offset_of(id)
  return string.match(id, '^(%d+)')
end

local function forget_key(idx, entry)
  local k = field(entry[2], 'k')
  if k and redis.call('HGET', idx, k) == offset_of(entry[1]) then
    redis.call('HDEL', idx, k)
  end
end

-- Drop every entry with offset < keep (keep >= 1); returns how many.
local function drop_before(log, idx, keep)
  local upto = '(' .. keep .. '-0'
  local start = '-'
  while true do
    local batch = redis.call('XRANGE', log, start, upto, 'COUNT', 256)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do forget_key(idx, e) end
    start = '(' .. batch[#batch][1]
  end
  return redis.call('XTRIM', log, 'MINID', keep .. '-0')
end

local function trim(log, idx, head, maxn, cutoff)
  local dropped = 0
  local keep = 1
  if maxn ~= '' then
    keep = head - tonumber(maxn) + 1
    if keep > 1 then dropped = dropped + drop_before(log, idx, keep) end
  end
  if cutoff ~= '' then
    -- same rule as the memory backend: from the oldest, drop while older
    -- than the cutoff, stop at the first young enough event
    local c = tonumber(cutoff)
    local start = '-'
    if keep > 1 then start = keep .. '-0' end
    local stop = head + 1
    while true do
      local batch = redis.call('XRANGE', log, start, '+', 'COUNT', 256)
      if #batch == 0 then break end
      local found = false
      for _, e in ipairs(batch) do
        if tonumber(field(e[2], 'ts')) >= c then
          stop = tonumber(offset_of(e[1]))
          found = true
          break
        end
      end
      if found then break end
      start = '(' .. batch[#batch][1]
    end
    if stop > 1 then dropped = dropped + drop_before(log, idx, stop) end
  end
  return dropped
end

local function first_offset(log, head)
  local e = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #e == 0 then return head + 1 end
  return tonumber(offset_of(e[1][1]))
end
"""

# KEYS: meta log idx registry all
# ARGV: name type data ts has_key key expect fresh_epoch maxlen cutoff all_maxlen
_APPEND = (
    """
local epoch, head = ensure(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[8])
local has_key = ARGV[5] == '1'
if has_key then
  local off = redis.call('HGET', KEYS[3], ARGV[6])
  if off then
    local e = redis.call('XRANGE', KEYS[2], off .. '-0', off .. '-0')
    if #e > 0 then return {'dup', off, e[1][2]} end
    redis.call('HDEL', KEYS[3], ARGV[6])
  end
end
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= head then
  return {'conflict', tostring(head)}
end
head = head + 1
redis.call('HSET', KEYS[1], 'head', head)
local fields = {'e', epoch, 't', ARGV[2], 'd', ARGV[3], 'ts', ARGV[4]}
if has_key then
  fields[#fields + 1] = 'k'
  fields[#fields + 1] = ARGV[6]
  redis.call('HSET', KEYS[3], ARGV[6], head)
end
redis.call('XADD', KEYS[2], head .. '-0', unpack(fields))
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[11], '*', 's', ARGV[1], 'o', head, unpack(fields))
trim(KEYS[2], KEYS[3], head, ARGV[9], ARGV[10])
return {'ok', tostring(head), epoch}
"""
)

# KEYS: meta log idx registry; ARGV: name fresh_epoch after limit
_READ = (
    """
local epoch, head = ensure(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2])
local entries = {}
local limit = tonumber(ARGV[4])
if limit > 0 then
  entries = redis.call('XRANGE', KEYS[2], (tonumber(ARGV[3]) + 1) .. '-0', '+', 'COUNT', limit)
end
return {epoch, tostring(head), tostring(first_offset(KEYS[2], head)), entries}
"""
)

# KEYS: meta log idx registry; ARGV: name fresh_epoch maxlen cutoff
_TRIM = (
    """
local epoch, head = ensure(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2])
return trim(KEYS[2], KEYS[3], head, ARGV[3], ARGV[4])
"""
)

# KEYS: all; ARGV: group consumer min_idle_ms count
# XAUTOCLAIM does not say how often an entry was delivered; XPENDING on each
# claimed id does, in the same atomic step. Entries trimmed from rt:all come
# back in the third reply element and are dropped from the pending list by Redis.
_GROUP_CLAIM = """
local out, counts = {}, {}
local cursor = '0-0'
local want = tonumber(ARGV[4])
for _ = 1, 16 do
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', want - #out)
  for _, e in ipairs(r[2]) do
    out[#out + 1] = e
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    counts[#counts + 1] = p[1] and p[1][4] or 1
  end
  cursor = r[1]
  if cursor == '0-0' or #out >= want then break end
end
return {out, counts}
"""

# KEYS: record; ARGV: now pending_blob expires px lease fingerprint
# The claim rule of rtcore.protocol.idempotency.claimable, atomically: a live
# record is returned unless it is released or its claim lapsed (field 'lease';
# records written without it use 'exp') and the fingerprint (field 'fp') matches.
_IDEM_BEGIN = """
local h = redis.call('HMGET', KEYS[1], 'exp', 'state', 'lease', 'fp')
if h[1] and tonumber(h[1]) > tonumber(ARGV[1]) then
  if h[2] == 'done' then
    return redis.call('HGET', KEYS[1], 'rec')
  end
  if h[2] == 'pending' and tonumber(h[3] or h[1]) > tonumber(ARGV[1]) then
    return redis.call('HGET', KEYS[1], 'rec')
  end
  if h[4] and h[4] ~= ARGV[6] then
    return redis.call('HGET', KEYS[1], 'rec')
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'exp', ARGV[3], 'state', 'pending', 'lease', ARGV[5], 'fp', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return false
"""

# KEYS: record meta log idx registry all; ARGV: the 6 of idem_begin, then the
# 11 of append, then optionally: done_head done_tail expires px.
# A keyed command's claim and first event in one atomic step: the event is
# appended only if the claim succeeded; otherwise the record that keeps the
# key comes back as {'idem', record}. With the optional four, the outcome
# (the event's offset) is stored as well, as idem_finish would: the record
# is done_head .. <the offset as MessagePack> .. done_tail (see _done_parts).
# F holds every body (see _BATCH).
_IDEM_BEGIN_APPEND = """
local rec = F['idem_begin']({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]})
if rec then return {'idem', rec} end
local r = F['append']({KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {unpack(ARGV, 7, 17)})
if ARGV[18] and (r[1] == 'ok' or r[1] == 'dup') then
  F['idem_finish']({KEYS[1]}, {ARGV[18] .. cmsgpack.pack(tonumber(r[2])) .. ARGV[19], ARGV[20], ARGV[21]})
end
return r
"""

# KEYS: record; ARGV: done_blob expires px
_IDEM_FINISH = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'exp', ARGV[2], 'state', 'done')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: record
# The key keeps its fingerprint and expiry: only the same command may claim it.
_IDEM_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'pending' then
  redis.call('HSET', KEYS[1], 'state', 'released')
  return 1
end
return 0
"""

# KEYS: cursor; ARGV: epoch offset now expires px
# An expired cursor (exp <= now) is absent: its position is replaced whatever
# it was. A hash without 'exp' (written before cursors expired) is live. Every
# advance refreshes the expiry and the garbage-collecting PEXPIRE.
_CURSOR_ADVANCE = """
local c = redis.call('HMGET', KEYS[1], 'epoch', 'off', 'exp')
local live = c[1] and ((not c[3]) or tonumber(c[3]) > tonumber(ARGV[3]))
local moved = 0
if (not live) or c[1] ~= ARGV[1] or tonumber(ARGV[2]) > tonumber(c[2]) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'off', ARGV[2])
  moved = 1
end
redis.call('HSET', KEYS[1], 'exp', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return moved
"""

# KEYS: snapshot; ARGV: epoch offset blob
_SNAPSHOT_PUT = """
local c = redis.call('HMGET', KEYS[1], 'epoch', 'off')
if (not c[1]) or c[1] ~= ARGV[1] or tonumber(ARGV[2]) >= tonumber(c[2]) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'off', ARGV[2], 'snap', ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease; ARGV: holder now expires px
_LEASE_ACQUIRE = """
local c = redis.call('HMGET', KEYS[1], 'holder', 'exp')
if c[1] and c[1] ~= ARGV[1] and tonumber(c[2]) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'exp', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_LEASE_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


#: Every script above, by the name :class:`_Script` calls it with.
_BODIES: dict[str, str] = {
    "append": _APPEND,
    "read": _READ,
    "trim": _TRIM,
    "group_claim": _GROUP_CLAIM,
    "idem_begin": _IDEM_BEGIN,
    "idem_begin_append": _IDEM_BEGIN_APPEND,
    "idem_finish": _IDEM_FINISH,
    "idem_release": _IDEM_RELEASE,
    "cursor_advance": _CURSOR_ADVANCE,
    "snapshot_put": _SNAPSHOT_PUT,
    "lease_acquire": _LEASE_ACQUIRE,
    "lease_release": _LEASE_RELEASE,
}

# One script runs a whole batch of calls: each body above becomes a function of
# (KEYS, ARGV), and the batch's one argument is a MessagePack array of the
# calls, each [name, [keys...], [args...]], which Lua's bundled cmsgpack
# decodes into tables. One argument rather than three plus the keys and
# arguments of every call: the client's per-argument work (coredis checks and
# converts each argument of a request) was the largest cost of a batch.
# Each call runs under pcall, so one call's error is its own reply and the
# others go on; the reply is one string of status bytes ("1" ok, "0" error), then each call's result or error message.
_BATCH = (
    _LUA_LIB
    + "local F = {}\n"
    + "".join(f"F[{name!r}] = function(KEYS, ARGV)\n{body}\nend\n" for name, body in _BODIES.items())
    + """
local calls = cmsgpack.unpack(ARGV[1])
local status = {}
local out = {''}
for i = 1, #calls do
  local c = calls[i]
  local ok, res = pcall(F[c[1]], c[2], c[3])
  if ok then
    status[i] = '1'
    -- a nil would end the reply array early (Redis stops at the first nil)
    if res == nil then res = false end
    out[i + 1] = res
  else
    status[i] = '0'
    if type(res) == 'table' then res = res.err or res.message end
    out[i + 1] = tostring(res)
  end
end
out[1] = table.concat(status)
return out
"""
)
_BATCH_SHA = hashlib.sha1(_BATCH.encode()).hexdigest()

def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    """Entry fields from a Lua reply (flat list) or from coredis (a mapping)."""
    if isinstance(raw, Mapping):
        return {bytes(k): bytes(v) for k, v in raw.items()}
    items = list(raw)
    return {bytes(items[i]): bytes(items[i + 1]) for i in range(0, len(items), 2)}


def _offset_of(entry_id: Any) -> int:
    return int(_s(entry_id).partition("-")[0])


def _event(stream: str, offset: int, fields: dict[bytes, bytes]) -> Event:
    key = fields.get(b"k")
    return Event(
        stream,
        fields[b"e"].decode(),
        offset,
        fields[b"t"].decode(),
        _decode_any(fields[b"d"]),
        float(fields[b"ts"]),
        None if key is None else key.decode(),
    )


class _EngineErrors:
    """Maps coredis failures to BackendError (ConflictError and cancellation pass through).

    A class rather than a ``contextlib.contextmanager``: it wraps every store
    call, and a generator per call costs more than the call's own Python work.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, _ENGINE_FAILURES):
            raise BackendError(f"redis: {exc}") from exc


_ENGINE_ERRORS = _EngineErrors()


def _engine_errors() -> _EngineErrors:
    """The context manager mapping coredis failures to BackendError (one shared instance)."""
    return _ENGINE_ERRORS


class _Call(Job):
    """One queued script call."""

    __slots__ = ("args", "keys", "name")

    def __init__(self, name: str, keys: list[str], args: list[Any]) -> None:
        # Job.__init__ inlined: one per script call.
        self.result = UNSET
        self.error = None
        self.name = name
        self.keys = keys
        self.args = args  # script-ready already (see _Pipeliner.call)


def _resp(*args: bytes) -> bytes:
    """One RESP request (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


#: A batch request without its argument: ``EVALSHA <sha> 0 <blob>`` up to the blob's length.
_EVALSHA_HEAD = b"*4\r\n$7\r\nEVALSHA\r\n$40\r\n" + _BATCH_SHA.encode() + b"\r\n$1\r\n0\r\n"
#: The same with the script itself (``EVAL``), sent after ``NOSCRIPT``: it runs the batch and caches the script.
_EVAL_HEAD = b"*4\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (len(_BATCH.encode()), _BATCH.encode())
#: What a lost or garbled connection raises on the raw link (mapped to ConnectionError).
_LINK_FAILURES = (OSError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ValueError)


class _RawLink:
    """One plain RESP2 connection that carries only the batch script's requests.

    coredis's per-request work (building the command, its pool, writer and
    reader tasks, RESP3 parsing of every element of the reply, futures) cost
    more server CPU than everything else of a keyed command on ``redis://``.
    A batch is one request that needs none of it: the :class:`_Pipeliner`
    runs one batch at a time, so requests and replies strictly alternate on
    this connection and no request ids or tasks are needed. The request is
    written as raw RESP and the reply parsed here (:meth:`_read`), resuming
    where it stopped when a reply spans several reads.

    * ``NOSCRIPT`` (Redis restarted or flushed its scripts) means the batch
      did not run; it is sent again as ``EVAL`` of the script, which runs it
      and caches the script for the next ``EVALSHA``.
    * Anything that interrupts a request (a lost connection, a garbled reply,
      the caller's timeout) closes the connection: a late reply must never be
      read as the next batch's. The next batch connects afresh. Nothing is
      sent again: a batch whose reply was lost may have run.

    Used for plain ``redis://host:port/db`` URLs (with optional user and
    password); other URLs (TLS, unix sockets, options) keep the coredis path.
    """

    __slots__ = (
        "_buf", "_db", "_host", "_password", "_port", "_pos", "_stack", "_stream", "_timeout", "_username", "requests"
    )

    def __init__(
        self, host: str, port: int, db: int, username: str | None, password: str | None, timeout: float = COMMAND_TIMEOUT
    ) -> None:
        self._host = host
        self._timeout = timeout
        self._port = port
        self._db = db
        self._username = username
        self._password = password
        self._stream: anyio.abc.ByteStream | None = None
        self._buf = bytearray()
        self._pos = 0  # where the reply being parsed continues in _buf
        self._stack: list[list[Any]] = []  # arrays being filled: [items, still missing]
        #: Requests sent (for tests).
        self.requests = 0

    @classmethod
    def from_url(cls, url: str, timeout: float = COMMAND_TIMEOUT) -> _RawLink | None:
        """A link for a plain ``redis://`` URL; None for anything else (coredis handles those)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis" or parts.query or parts.fragment:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        try:
            port = parts.port or 6379
        except ValueError:
            return None
        user = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password else None
        return cls(parts.hostname or "localhost", port, int(path or 0), user, password, timeout)

    async def run_batch(self, blob: bytes) -> list[Any]:
        """Run the batch script on ``blob``; return its reply (one ``[status, value]`` per call)."""
        size = b"$%d\r\n" % len(blob)
        reply = await self._request(_EVALSHA_HEAD + size, blob)
        if isinstance(reply, coredis.exceptions.NoScriptError):
            # Redis restarted or flushed its scripts: the batch did not run.
            reply = await self._request(_EVAL_HEAD + size, blob)
        if isinstance(reply, coredis.exceptions.ResponseError):
            raise reply
        return cast(list[Any], reply)

    async def aclose(self) -> None:
        """Close the connection (the next request would open a new one)."""
        await self._drop()

    async def _request(self, head: bytes, blob: bytes) -> Any:
        ok = False
        try:
            # A paused or partitioned Redis answers nothing: bounded like every coredis command.
            with anyio.fail_after(self._timeout):
                stream = self._stream
                if stream is not None and not _idle_link_alive(stream):
                    # Redis closed it while it sat idle (a restart): the
                    # request was not sent, so a fresh connection may carry it.
                    await self._drop()
                    stream = None
                if stream is None:
                    stream = await self._connect()
                self.requests += 1
                await stream.send(head + blob + b"\r\n")
                reply = await self._read(stream)
            ok = True
            return reply
        except _LINK_FAILURES as exc:
            raise coredis.exceptions.ConnectionError(f"connection lost ({exc!r})") from exc
        except TimeoutError as exc:
            raise _Stalled(f"redis: no reply within {self._timeout} s") from exc
        finally:
            if not ok:  # interrupted mid-request: what the connection holds now is unknown
                await self._drop()

    async def _connect(self) -> anyio.abc.ByteStream:
        stream = await anyio.connect_tcp(self._host, self._port)
        self._stream = stream
        self._buf.clear()
        self._pos = 0
        self._stack.clear()
        setup = []
        if self._password is not None:
            auth = [self._username.encode()] if self._username else []
            setup.append(_resp(b"AUTH", *auth, self._password.encode()))
        if self._db:
            setup.append(_resp(b"SELECT", str(self._db).encode()))
        for request in setup:
            await stream.send(request)
            reply = await self._read(stream)
            if isinstance(reply, coredis.exceptions.ResponseError):
                raise reply
        return stream

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.aclose_forcefully(stream)

    async def _read(self, stream: anyio.abc.ByteStream) -> Any:
        """Read one whole reply: bulk strings as bytes, integers, None for nil, errors as ResponseError values."""
        buf = self._buf
        while True:
            reply = self._parse(buf)
            if reply is not _MORE:
                del buf[: self._pos]
                self._pos = 0
                return reply
            buf += await stream.receive()

    def _parse(self, buf: bytearray) -> Any:
        """Continue parsing the reply in ``buf``; :data:`_MORE` when it is not all there yet."""
        pos = self._pos
        stack = self._stack
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return _MORE
            kind = buf[pos]
            if kind == 36:  # $ bulk string
                n = int(buf[pos + 1 : nl])
                if n < 0:
                    value: Any = None
                    pos = nl + 2
                else:
                    end = nl + 2 + n
                    if len(buf) < end + 2:
                        return _MORE
                    value = bytes(buf[nl + 2 : end])
                    pos = end + 2
            elif kind == 42:  # * array
                n = int(buf[pos + 1 : nl])
                pos = nl + 2
                if n > 0:
                    stack.append([[], n])
                    self._pos = pos
                    continue
                value = None if n < 0 else []
            elif kind == 58:  # : integer
                value = int(buf[pos + 1 : nl])
                pos = nl + 2
            elif kind == 43:  # + status
                value = bytes(buf[pos + 1 : nl])
                pos = nl + 2
            elif kind == 45:  # - error
                message = buf[pos + 1 : nl].decode(errors="replace")
                error = coredis.exceptions.NoScriptError if message.startswith("NOSCRIPT") else coredis.exceptions.ResponseError
                value = error(message)
                pos = nl + 2
            else:
                raise ValueError(f"not a RESP2 reply: {bytes(buf[pos : pos + 16])!r}")
            self._pos = pos  # a value is complete: never parsed again
            while stack:
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                value = stack.pop()[0]
            else:
                return value


def _idle_link_alive(stream: anyio.abc.ByteStream) -> bool:
    """Whether an idle :class:`_RawLink` connection is still open at the other end.

    Between batches nothing may arrive: a readable socket means Redis closed
    it (end of file, or a reset). Without this look the first batch after a
    Redis restart went out on the dead connection and failed, although a new
    connection would have carried it: a peek now, before anything is sent,
    tells the two apart (once it is sent, a lost reply may mean the batch ran).
    """
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    fd = -1 if raw is None else raw.fileno()
    if fd < 0:
        return raw is None  # not a socket we can look at: assume alive; closed: not
    # The event loops' socket wrappers refuse recv(); a socket object on the
    # same descriptor, detached after the look, does not close it.
    sock = socket.socket(fileno=fd)
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read: open
    except OSError:
        return False  # reset
    finally:
        sock.detach()
    return False  # end of file (or bytes nobody asked for)


#: :meth:`_RawLink._parse`'s "not all there yet".
_MORE: Any = object()


#: One pipeliner per client, shared by every store on it.
_PIPELINERS: weakref.WeakKeyDictionary[coredis.Redis[bytes], _Pipeliner] = weakref.WeakKeyDictionary()


def _pipeliner_for(client: coredis.Redis[bytes]) -> _Pipeliner:
    pipeliner = _PIPELINERS.get(client)
    if pipeliner is None:
        pipeliner = _PIPELINERS[client] = _Pipeliner(client)
    return pipeliner


class _Stalled(BackendError):
    """A batch got no reply in time: Redis is paused or the network is stuck (``backend_unavailable``)."""


def _is_stall(exc: BaseException) -> bool:
    # The calls queued behind a stalled batch would each wait out the same
    # timeout; failing them at once keeps a paused Redis from doubling the
    # time a command takes to get its retryable answer.
    return isinstance(exc, _Stalled)


class _Pipeliner:
    """Runs the script calls of concurrent tasks as one batch: one ``EVALSHA``, one round trip.

    Every call queued while a batch is in flight joins the next batch (see
    :mod:`rtcore.backends._batch`; at most :data:`_MAX_BATCH` calls), sent
    as one call of :data:`_BATCH`, the script that runs each queued script
    body in turn. Each call is still atomic (the whole batch is: Redis runs a
    script without interleaving anything), and each gets its own reply or
    error. One request per batch instead of one per call is what makes this
    cheap: the client's per-request work (building, sending, parsing, waking
    the caller) is paid once per batch.

    Once sent, a batch's reply is awaited (shielded, bounded by
    :data:`_CALL_TIMEOUT`). ``NOSCRIPT`` (Redis restarted or ran ``SCRIPT
    FLUSH``) means nothing ran, so the script is loaded again and the batch
    resent, up to :data:`_NOSCRIPT_ATTEMPTS` times. Any other failure of the
    batch (a lost connection) fails each of its calls: an append whose reply
    was lost may have happened, so nothing is replayed blindly.
    """

    def __init__(self, client: coredis.Redis[bytes], link: _RawLink | None = None) -> None:
        self._client = client
        #: The connection batches go on (None: through the coredis client).
        self.link = link
        #: The batcher (``batches.batches`` batches held ``batches.jobs`` calls).
        self.batches: Batcher[_Call] = Batcher(self._run, _MAX_BATCH, stalled=_is_stall)

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run script ``name`` in the next batch; return its reply (or raise its error).

        Every argument must be a str or what :func:`_lua_arg` made of a
        non-str value (the hot callers convert their few byte strings
        themselves rather than have every argument checked).
        """
        c = await self.batches.submit(_Call(name, keys, args))
        if c.error is not None:
            raise c.error
        return c.result

    async def _run(self, batch: list[_Call]) -> None:
        try:
            with anyio.fail_after(_CALL_TIMEOUT):
                await self._send(batch)
        except TimeoutError as exc:
            raise _Stalled(f"redis: no reply within {_CALL_TIMEOUT} s ({exc})") from exc

    async def _send(self, batch: list[_Call]) -> None:
        blob = _encode_calls([(c.name, c.keys, c.args) for c in batch])
        reply = await (self.link.run_batch(blob) if self.link is not None else self._send_coredis(blob))
        # One status byte per call (b"1" ok, b"0" error) in the first element,
        # then each call's reply or error message (a flat list: half the
        # elements to parse of a list of [status, reply] pairs).
        for c, status, value in zip(batch, reply[0], reply[1:], strict=True):
            if status == 49:  # b"1"
                c.result = value
            else:
                c.error = coredis.exceptions.ResponseError(f"{c.name}: {_s(value)}")

    async def _send_coredis(self, blob: bytes) -> list[Any]:
        for attempt in range(_NOSCRIPT_ATTEMPTS):
            try:
                return cast(list[Any], await self._client.evalsha(_BATCH_SHA, keys=[], args=[blob]))
            except coredis.exceptions.NoScriptError:
                # Redis restarted or flushed its scripts; the batch did not run.
                if attempt == _NOSCRIPT_ATTEMPTS - 1:
                    raise
            # A load on a connection that died with the old server fails once; the next one is fresh.
            with contextlib.suppress(coredis.exceptions.ConnectionError):
                await self._client.script_load(_BATCH)
        raise AssertionError("unreachable")  # pragma: no cover


class _Script:
    """One of the Lua scripts of :data:`_BODIES`, called through the client's :class:`_Pipeliner`.

    Redis forgets loaded scripts when it restarts (and on ``SCRIPT FLUSH``);
    the pipeliner loads the batch script again on ``NOSCRIPT`` (which means
    nothing ran, so sending again is always safe).
    """

    __slots__ = ("_pipeliner", "name")

    def __init__(self, client: coredis.Redis[bytes], name: str) -> None:
        if name not in _BODIES:
            raise ValueError(f"no script named {name!r}")
        self._pipeliner = _pipeliner_for(client)
        self.name = name

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        return await self._pipeliner.call(self.name, keys, [a if a.__class__ is str else _lua_arg(a) for a in args])


class _RedisFeed:
    """One ``XREAD BLOCK`` loop over the watched streams (see the module docstring)."""

    def __init__(self, log: RedisEventLog, deliver: Callable[[Event], None]) -> None:
        self._log = log
        self._deliver = deliver
        self._wanted: set[str] = set()
        self._all = False
        self._pos: dict[str, int] = {}  # stream -> last offset delivered (or skipped at watch time)
        self._epoch: dict[str, str | None] = {}  # epoch _pos refers to (None: stream had no meta)
        self._by_key: dict[bytes, str] = {}
        self._dirty = True
        self._all_known = False  # the registry was snapshotted for watch("*")
        self._registry_size = -1
        self._instance: bytes | None = None
        # stream -> first head this process observed after watch() (None: none yet)
        self._marks: dict[str, int | None] = {}

    def watch(self, stream: str) -> None:
        if stream == "*":
            self._all = True
        else:
            self._wanted.add(stream)
            if stream not in self._pos:
                self._marks.setdefault(stream, None)
        self._dirty = True

    def observe(self, stream: str, head: int) -> None:
        """Called by the log with the head of ``stream`` as seen by an append or read right now.

        The reader takes a new stream's starting position asynchronously, at
        its next round. A caller that watches and then reads history (the
        Hub's catch-up) must not lose events appended in between, so the
        first head observed after ``watch`` caps the starting position.
        """
        if stream in self._pos:
            return
        if (stream in self._marks and self._marks[stream] is None) or (self._all and not self._all_known):
            self._marks[stream] = head if self._marks.get(stream) is None else self._marks[stream]

    def _start(self, stream: str, head: int) -> int:
        mark = self._marks.pop(stream, None)
        return head if mark is None else min(head, mark)

    def unwatch(self, stream: str) -> None:
        if stream == "*":
            self._all = False
            self._all_known = False
            self._registry_size = -1
        else:
            self._wanted.discard(stream)
        self._dirty = True

    def _wants(self, stream: str) -> bool:
        return self._all or stream in self._wanted

    async def _heads(self, streams: list[str]) -> dict[str, tuple[str | None, int]]:
        client = self._log._client
        out: dict[str, tuple[str | None, int]] = {}
        for name in streams:
            epoch, head = await client.hmget(_stream_keys(name)[0], ["epoch", "head"])
            out[name] = (None if epoch is None else _s(epoch), 0 if head is None else int(head))
        return out

    def _track(self, stream: str, epoch: str | None, offset: int) -> None:
        self._pos[stream] = offset
        self._epoch[stream] = epoch
        self._by_key[_stream_keys(stream)[1].encode()] = stream

    async def _sync(self) -> None:
        client = self._log._client
        # 1. did Redis lose its data? Then streams may have started new lives.
        marker = await client.get(_INSTANCE)
        if marker is None:
            await client.set(_INSTANCE, new_epoch().encode(), condition=coredis.PureToken.NX)
            marker = await client.get(_INSTANCE)
        if marker != self._instance:
            if self._instance is not None:
                for name, (epoch, _head) in (await self._heads(list(self._pos))).items():
                    if epoch != self._epoch[name] and self._epoch[name] is not None:
                        self._track(name, epoch, 0)  # a new life: deliver it from its start
                self._registry_size = -1
            self._instance = marker
        # 2. streams watched by name
        if self._dirty:
            self._dirty = False
            new = [s for s in self._wanted if s not in self._pos]
            for name, (epoch, head) in (await self._heads(new)).items():
                self._track(name, epoch, self._start(name, head))
        # 3. watch("*"): the registry only grows, so a size change means new names
        if self._all:
            size = await client.scard(_REGISTRY)
            if size != self._registry_size:
                self._registry_size = size
                members = sorted(_s(m) for m in await client.smembers(_REGISTRY))
                new = [s for s in members if s not in self._pos]
                if self._all_known:
                    for name in new:  # registered after we looked: all of it is new
                        self._track(name, None, 0)
                else:
                    for name, (epoch, head) in (await self._heads(new)).items():
                        self._track(name, epoch, self._start(name, head))
                    self._all_known = True
                    self._marks = {k: v for k, v in self._marks.items() if k in self._wanted}
        # 4. forget streams nobody wants any more
        for name in [s for s in self._marks if not self._wants(s)]:
            del self._marks[name]
        for name in [s for s in self._pos if not self._wants(s)]:
            del self._pos[name], self._epoch[name]
            del self._by_key[_stream_keys(name)[1].encode()]

    async def run(self) -> None:
        client = self._log._client
        while True:
            try:
                # A request caught on a connection that died with the server
                # can wait forever; a round that takes far longer than its
                # BLOCK is treated as a lost connection (cancelling a blocking
                # command makes coredis drop that connection).
                with _engine_errors(), anyio.fail_after(_ROUND_TIMEOUT):
                    await self._sync()
                    if not self._pos:
                        await anyio.sleep(BLOCK_MS / 1000)
                        continue
                    reply = await client.xread(
                        {_stream_keys(s)[1]: f"{off}-0" for s, off in self._pos.items()},
                        count=_READ_COUNT,
                        block=BLOCK_MS,
                    )
            except (BackendError, TimeoutError):
                # Redis is down or restarting: keep positions, look again soon
                # (the next round's instance check notices lost data).
                await anyio.sleep(BLOCK_MS / 1000)
                continue
            for key, entries in (reply or {}).items():
                stream = self._by_key.get(bytes(key))
                if stream is None:
                    continue
                for entry in entries:
                    offset = _offset_of(entry.identifier)
                    if stream not in self._pos or offset <= self._pos[stream]:
                        continue  # unwatched meanwhile, or already delivered
                    event = _event(stream, offset, _fields(entry.field_values))
                    self._pos[stream] = offset
                    self._epoch[stream] = event.epoch
                    if self._wants(stream):
                        self._deliver(event)


class RedisEventLog:
    """:class:`~rtcore.backends.base.EventLog` on Redis Streams."""

    def __init__(self, client: coredis.Redis[bytes], *, all_maxlen: int = ALL_MAXLEN) -> None:
        self._client = client
        self._all_maxlen = all_maxlen
        self._append = _Script(client, "append")
        # The hot calls go to the pipeliner directly (one coroutine less per call).
        self._pipe = _pipeliner_for(client)
        self._read = _Script(client, "read")
        self._trim = _Script(client, "trim")
        # Weak references to the feeds (a dropped feed is forgotten): a plain
        # list, because every append walks it and a WeakSet's iterator (a
        # generator and an iteration guard) cost more than the walk itself.
        self._feeds: list[weakref.ref[_RedisFeed]] = []

    def _observe(self, stream: str, head: int) -> None:
        for ref in self._feeds:
            feed = ref()
            if feed is not None:
                feed.observe(stream, head)

    async def append(
        self,
        stream: str,
        type: str,
        data: Any,
        *,
        now: float,
        key: str | None = None,
        expect: int | None = None,
        retention: Retention | None = None,
    ) -> AppendResult:
        """Append one event atomically; see :meth:`rtcore.backends.base.EventLog.append`."""
        args = self._append_args(stream, type, data, now, key, expect, retention)
        with _ENGINE_ERRORS:
            reply = cast(list[Any], await self._pipe.call("append", [*_stream_keys(stream), _ALL], args))
        return self._appended(reply, stream, type, data, now, key, expect)

    def _append_args(
        self,
        stream: str,
        type: str,
        data: Any,
        now: float,
        key: str | None,
        expect: int | None,
        retention: Retention | None,
        now_text: str | None = None,
    ) -> list[Any]:
        """The append script's arguments (see :data:`_APPEND`); ``now_text``: ``repr(float(now))`` if made already."""
        return [
            stream,
            type,
            _lua_arg(_encode(data)),
            repr(float(now)) if now_text is None else now_text,
            "0" if key is None else "1",
            "" if key is None else key,
            "" if expect is None else str(expect),
            new_epoch(),
            *_retention_args(retention, now),
            str(self._all_maxlen),
        ]

    def _appended(
        self, reply: list[Any], stream: str, type: str, data: Any, now: float, key: str | None, expect: int | None
    ) -> AppendResult:
        """The result of the append script's ``reply`` (raises ConflictError on an ``expect`` mismatch)."""
        tag = _s(reply[0])
        if tag == "conflict":
            self._observe(stream, int(_s(reply[1])))
            raise ConflictError(f"stream {stream!r} head is {_s(reply[1])}, expected {expect}")
        if tag == "dup":
            return AppendResult(_event(stream, int(_s(reply[1])), _fields(reply[2])), duplicate=True)
        offset = int(_s(reply[1]))
        self._observe(stream, offset - 1)
        return AppendResult(Event(stream, _s(reply[2]), offset, type, data, float(now), key))

    async def read(self, stream: str, *, after: int, limit: int) -> ReadResult:
        """Read up to ``limit`` retained events with offset > ``after``."""
        args = [stream, new_epoch(), str(max(after, 0)), str(max(limit, 0))]
        with _engine_errors():
            epoch, head, first, entries = cast(list[Any], await self._read(keys=_stream_keys(stream), args=args))
        events = [_event(stream, _offset_of(e[0]), _fields(e[1])) for e in entries]
        self._observe(stream, int(_s(head)))
        return ReadResult(_s(epoch), int(_s(head)), int(_s(first)), events)

    async def info(self, stream: str) -> StreamInfo:
        """Return the stream's epoch, head and first retained offset."""
        page = await self.read(stream, after=0, limit=0)
        return StreamInfo(page.epoch, page.head, page.first)

    async def trim(self, stream: str, retention: Retention, *, now: float) -> int:
        """Drop events beyond ``retention``; return how many were dropped."""
        args = [stream, new_epoch(), *_retention_args(retention, now)]
        with _engine_errors():
            return int(cast(int, await self._trim(keys=_stream_keys(stream), args=args)))

    async def streams(self, pattern: str = "*") -> list[str]:
        """Names of the known streams matching the glob ``pattern``."""
        with _engine_errors():
            names = await self._client.smembers(_REGISTRY)
        # fnmatch rather than Redis MATCH so every backend agrees on the glob syntax.
        return sorted(n for n in map(_s, names) if fnmatch.fnmatchcase(n, pattern))

    def live(self, deliver: Callable[[Event], None]) -> _RedisFeed:
        """Create a live feed; see :class:`~rtcore.backends.base.LiveFeed`."""
        feed = _RedisFeed(self, deliver)
        self._feeds = [ref for ref in self._feeds if ref() is not None]
        self._feeds.append(weakref.ref(feed))
        return feed


def _retention_args(retention: Retention | None, now: float) -> list[str]:
    if retention is None:
        return ["", ""]
    maxn = "" if retention.max_events is None else str(retention.max_events)
    cutoff = "" if retention.max_age is None else repr(float(now - retention.max_age))
    return [maxn, cutoff]


def _begin_args(fingerprint: bytes, now: float, lease: float, ttl: float) -> list[Any]:
    """The claim script's arguments (see :data:`_IDEM_BEGIN`)."""
    keep = max(ttl, lease)
    rec = IdempotencyRecord(fingerprint, "pending", now + keep, lease=now + lease)
    return [repr(float(now)), _lua_arg(_encode(rec)), repr(rec.expires), _px_text(keep), repr(rec.lease), _lua_arg(fingerprint)]


#: An int no offset reaches, whose MessagePack encoding marks where the offset goes in a record (see _done_parts).
_OFFSET_MARK = 0x7E5E_7E5E_7E5E_7E5E
_OFFSET_MARK_BYTES = _encode(_OFFSET_MARK)


def _done_parts(fingerprint: bytes, expires: float) -> tuple[bytes, bytes]:
    """The finished record ``Outcome(True, <offset>)`` encoded around its offset: (head, tail).

    The script joins them with the offset it appended (Lua's cmsgpack packs
    an integer as a MessagePack integer, as msgspec does), so the stored
    record is the one :meth:`RedisIdempotencyStore.finish` would store.
    """
    blob = _encode(IdempotencyRecord(fingerprint, "done", expires, Outcome(True, _OFFSET_MARK)))
    head, mark, tail = blob.partition(_OFFSET_MARK_BYTES)
    assert mark and _OFFSET_MARK_BYTES not in tail
    return head, tail


class RedisIdempotencyStore:
    """:class:`~rtcore.backends.base.IdempotencyStore` on Redis (one hash per key)."""

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client
        self._begin = _Script(client, "idem_begin")
        self._finish = _Script(client, "idem_finish")
        # begin and finish go to the pipeliner directly (one coroutine less per call).
        self._pipe = _pipeliner_for(client)
        self._release = _Script(client, "idem_release")

    async def begin(
        self, scope: str, key: str, fingerprint: bytes, *, now: float, lease: float, ttl: float = DEFAULT_TTL
    ) -> IdempotencyRecord | None:
        """Claim ``key`` or return the live record (see the Protocol)."""
        with _ENGINE_ERRORS:
            raw: Any = await self._pipe.call(
                "idem_begin", [_pair_key("idem", scope, key)], _begin_args(fingerprint, now, lease, ttl)
            )
        return None if raw is None else _decode_record(cast(bytes, raw))

    async def finish(
        self, scope: str, key: str, outcome: Outcome, *, now: float, ttl: float, fingerprint: bytes | None = None
    ) -> None:
        """Store the final outcome for ``ttl`` seconds."""
        rkey = _pair_key("idem", scope, key)
        with _engine_errors():
            # Only the owner of a pending key finishes it, so reading the
            # fingerprint first cannot race with another writer.
            if fingerprint is not None:
                fp = fingerprint
            else:
                old = await self._client.hget(rkey, "rec")
                fp = _decode_record(old).fingerprint if old is not None else b""
            rec = IdempotencyRecord(fp, "done", now + ttl, outcome)
            await self._pipe.call("idem_finish", [rkey], [_lua_arg(_encode(rec)), repr(rec.expires), _px_text(ttl)])

    async def release(self, scope: str, key: str) -> None:
        """Mark a pending key released (bound to its fingerprint); a finished outcome is kept."""
        with _engine_errors():
            await self._release(keys=[_pair_key("idem", scope, key)], args=[])


class RedisCursorStore:
    """:class:`~rtcore.backends.base.CursorStore` on Redis (one hash per cursor).

    The hash holds the expiry (``exp``, compared with the caller's ``now``);
    every advance also sets a ``PEXPIRE`` of the TTL (plus :data:`_GRACE_MS`)
    that deletes the key. A hash without ``exp`` (written before cursors
    expired) reads as live and gets both at its next advance.
    """

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client
        self._advance = _Script(client, "cursor_advance")

    async def get(self, principal: str, stream: str, *, now: float) -> tuple[str, int] | None:
        """Return ``(epoch, offset)``, or ``None`` if absent or expired."""
        with _engine_errors():
            epoch, off, exp = await self._client.hmget(_pair_key("cur", principal, stream), ["epoch", "off", "exp"])
        if epoch is None or off is None or (exp is not None and float(exp) <= now):
            return None
        return _s(epoch), int(off)

    async def advance(self, principal: str, stream: str, epoch: str, offset: int, *, now: float, ttl: float) -> None:
        """Move forward within an epoch (another epoch replaces it) and expire at ``now + ttl``."""
        args = [epoch, str(offset), repr(float(now)), repr(float(now + ttl)), str(_px(ttl))]
        with _engine_errors():
            await self._advance(keys=[_pair_key("cur", principal, stream)], args=args)


class RedisSnapshotStore:
    """:class:`~rtcore.backends.base.SnapshotStore` on Redis."""

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client
        self._put = _Script(client, "snapshot_put")

    async def get(self, stream: str) -> Snapshot | None:
        """Return the newest snapshot of ``stream``."""
        with _engine_errors():
            raw = await self._client.hget(f"rt:{{{stream}}}:snap", "snap")
        return None if raw is None else _decode_snapshot(raw)

    async def put(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` unless a newer one of the same epoch exists."""
        args: list[str | bytes] = [snapshot.epoch, str(snapshot.offset), _encode(snapshot)]
        with _engine_errors():
            await self._put(keys=[f"rt:{{{snapshot.stream}}}:snap"], args=args)


class RedisLeaseStore:
    """:class:`~rtcore.backends.base.LeaseStore` on Redis (compare-and-set in Lua)."""

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client
        self._acquire = _Script(client, "lease_acquire")
        self._release = _Script(client, "lease_release")

    async def acquire(self, name: str, holder: str, *, now: float, ttl: float) -> bool:
        """Take or renew ``name`` for ``holder``; False if someone else holds it."""
        args = [holder, repr(float(now)), repr(float(now + ttl)), str(_px(ttl))]
        with _engine_errors():
            return bool(await self._acquire(keys=[f"rt:lease:{name}"], args=args))

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up if ``holder`` has it."""
        with _engine_errors():
            await self._release(keys=[f"rt:lease:{name}"], args=[holder])


class RedisGroupLog:
    """:class:`~rtcore.backends.base.GroupLog` as Redis consumer groups on ``rt:all``.

    A group that vanished (Redis lost its data, or someone deleted it) is
    created again from the start of whatever ``rt:all`` holds then, so events
    appended after the loss still reach the group.
    """

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client
        self._claim = _Script(client, "group_claim")

    async def _create(self, group: str, start: str) -> None:
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await self._client.xgroup_create(_ALL, group, start, mkstream=True)

    async def create(self, group: str) -> None:
        """Create ``group`` at the end of ``rt:all`` unless it exists."""
        with _engine_errors():
            await self._create(group, "$")

    @staticmethod
    def _message(entry_id: Any, raw: Any, deliveries: int) -> GroupMessage:
        fields = _fields(raw)
        event = _event(fields[b"s"].decode(), int(fields[b"o"]), fields)
        return GroupMessage(_s(entry_id), event, deliveries)

    async def read(self, group: str, consumer: str, *, now: float, count: int, block: float) -> list[GroupMessage]:
        """``XREADGROUP ... >``; ``now`` is unused (Redis keeps delivery times itself)."""
        ms = max(0, round(block * 1000))
        try:
            # A blocking read on a connection that died with the server could
            # wait forever; bound the round like the live feed does.
            with _engine_errors(), anyio.fail_after(_ROUND_TIMEOUT + block):
                try:
                    reply = await self._client.xreadgroup(
                        group, consumer, {_ALL: ">"}, count=count, block=ms if ms > 0 else None
                    )
                except coredis.exceptions.StreamConsumerGroupError:
                    await self._create(group, "0")
                    return []
        except TimeoutError as exc:
            raise BackendError("redis: XREADGROUP did not return in time") from exc
        return [self._message(e.identifier, e.field_values, 1) for entries in (reply or {}).values() for e in entries]

    async def ack(self, group: str, ids: list[str]) -> None:
        """``XACK`` the entries."""
        if ids:
            with _engine_errors():
                await self._client.xack(_ALL, group, ids)

    async def claim(self, group: str, consumer: str, *, min_idle: float, now: float, count: int) -> list[GroupMessage]:
        """``XAUTOCLAIM`` idle entries (idle as measured by Redis; ``now`` is unused)."""
        args = [group, consumer, str(max(0, round(min_idle * 1000))), str(count)]
        with _engine_errors():
            try:
                entries, counts = cast(list[Any], await self._claim(keys=[_ALL], args=args))
            except coredis.exceptions.StreamConsumerGroupError:
                # NOGROUP (coredis rewords it): Redis lost the group; the next read creates it again.
                return []
            except coredis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []  # the next read creates the group again
        return [self._message(e[0], e[1], int(n)) for e, n in zip(entries, counts, strict=True)]


log = logging.getLogger("rtcore.backends.redis")

#: The PUB/SUB channel of :class:`RedisSignalBus`.
SIGNAL_CHANNEL = b"rt:signal"


class _RedisSignalFeed:
    def __init__(self, client: coredis.Redis[bytes], deliver: Callable[[bytes], None]) -> None:
        self._client = client
        self._deliver = deliver

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # coredis's PubSub keeps one connection of its own, reconnects with
        # backoff and resubscribes; entering it returns once SUBSCRIBE is
        # acknowledged, so a message published after started() is received.
        started = False
        while True:
            failed: BaseException | None = None
            try:
                async with self._client.pubsub(channels=[SIGNAL_CHANNEL], ignore_subscribe_messages=True) as pubsub:
                    if not started:
                        started = True
                        task_status.started()
                    async for message in pubsub:
                        if message["type"] == "message":
                            data = message["data"]
                            self._deliver(data if isinstance(data, bytes) else str(data).encode())
            except* (anyio.ClosedResourceError, anyio.BrokenResourceError, coredis.exceptions.RedisError, OSError) as group:
                # When the node is cancelled together with the client that owns the
                # connection (a node that opened its own backend), coredis's cleanup
                # UNSUBSCRIBEs on a connection already closed: the cancellation must
                # win. Otherwise the connection failed past coredis's retries: start over.
                failed = group
            await anyio.lowlevel.checkpoint()  # cancelled: raises here
            if failed is not None:
                log.warning("signal subscriber lost its connection (%s); subscribing again", failed)
            await anyio.sleep(BLOCK_MS / 1000)  # the subscription ended either way: not in a tight loop


class RedisSignalBus:
    """:class:`~rtcore.backends.base.SignalBus` on Redis PUB/SUB (one channel, filtered by each node)."""

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._client = client

    async def publish(self, message: bytes) -> None:
        """``PUBLISH`` on :data:`SIGNAL_CHANNEL` (a retryable ``BackendError`` if Redis is unreachable)."""
        with _engine_errors():
            await self._client.publish(SIGNAL_CHANNEL, message)

    def listen(self, deliver: Callable[[bytes], None]) -> _RedisSignalFeed:
        """One subscriber connection for this node."""
        return _RedisSignalFeed(self._client, deliver)


class RedisBackend(Backend):
    """All stores on one Redis database (``redis://host:port/db``)."""

    events: RedisEventLog

    def __init__(
        self, url: str, client: coredis.Redis[bytes], stack: contextlib.AsyncExitStack, *, all_maxlen: int = ALL_MAXLEN
    ) -> None:
        super().__init__(
            url,
            events=RedisEventLog(client, all_maxlen=all_maxlen),
            idempotency=RedisIdempotencyStore(client),
            cursors=RedisCursorStore(client),
            snapshots=RedisSnapshotStore(client),
            leases=RedisLeaseStore(client),
            groups=RedisGroupLog(client),
            signals=RedisSignalBus(client),
        )
        self.client = client
        self._stack = stack

    async def begin_append(
        self,
        scope: str,
        key: str,
        fingerprint: bytes,
        *,
        now: float,
        lease: float,
        ttl: float,
        stream: str,
        type: str,
        data: Any,
        event_key: str,
        expect: int | None = None,
        retention: Retention | None = None,
        outcome_ttl: float | None = None,
    ) -> tuple[IdempotencyRecord | None, AppendResult | None]:
        """Claim, append (and finish) in one script call (see :meth:`Backend.begin_append`, :data:`_IDEM_BEGIN_APPEND`)."""
        log = self.events
        args = _begin_args(fingerprint, now, lease, ttl)
        # A float's repr is the dearest part of these arguments: the ones
        # _begin_args made (now, the claim's expiry) are reused when equal.
        args += log._append_args(stream, type, data, now, event_key, expect, retention, now_text=args[0])
        if outcome_ttl is not None:
            expires = now + outcome_ttl
            head, tail = _done_parts(fingerprint, expires)
            expires_text = args[2] if expires == now + max(ttl, lease) else repr(expires)
            args += [_lua_arg(head), _lua_arg(tail), expires_text, _px_text(outcome_ttl)]
        keys = [_pair_key("idem", scope, key), *_stream_keys(stream), _ALL]
        with _ENGINE_ERRORS:
            reply = cast(list[Any], await log._pipe.call("idem_begin_append", keys, args))
        if _s(reply[0]) == "idem":
            return _decode_record(cast(bytes, reply[1])), None
        return None, log._appended(reply, stream, type, data, now, event_key, expect)

    async def aclose(self) -> None:
        """Close the client's connections (call from the task that opened it)."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()


async def open_redis(url: str, *, all_maxlen: int = ALL_MAXLEN, command_timeout: float = COMMAND_TIMEOUT) -> Backend:
    """Connect to the Redis database named by ``url``.

    Args:
        url: ``redis://host:port/db`` (anything :meth:`coredis.Redis.from_url` accepts).
        all_maxlen: Approximate cap of ``rt:all``, the global stream consumer
            groups read; a group lagging further behind loses the oldest events.
        command_timeout: Seconds a reply may take before the call fails with
            a retryable :class:`~rtcore.errors.BackendError` (a paused Redis
            answers nothing and would otherwise hang every request).

    Returns:
        A :class:`RedisBackend`; call :meth:`~rtcore.backends.base.Backend.aclose`
        from the same task when done.

    Raises:
        BackendError: Redis cannot be reached.
    """
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url,
        decode_responses=False,
        retry_policy=NoRetryPolicy(),
        stream_timeout=command_timeout,
        connect_timeout=command_timeout,
    )
    stack = contextlib.AsyncExitStack()
    try:
        with _engine_errors():
            await stack.enter_async_context(client)
            await client.ping()
    except BaseException:
        await stack.aclose()
        raise
    link = _RawLink.from_url(url, command_timeout)
    if link is not None:  # batches go on their own connection (see _RawLink)
        _PIPELINERS[client] = _Pipeliner(client, link)
        stack.push_async_callback(link.aclose)
    return RedisBackend(url, client, stack, all_maxlen=all_maxlen)

"""Processors and loops: what a node runs in the background for its app.

Three kinds, one module, because they share the same concerns (retries,
dead letters, surviving a flaky backend, stopping cleanly) and none of them
belongs in the request path that :mod:`rtcore.engine.node` is about:

* **Local processors** (``@app.on(pattern)``) run on every node, fed by the
  node's live feed through a bounded queue. Cheap and best effort: events
  appended while no node ran are not replayed.
* **Group processors** (``@app.on(pattern, group="name")``) are members of a
  consumer group on the backend's :class:`~rtcore.backends.base.GroupLog`:
  each event goes to ONE member across all nodes, at least once. The member
  acknowledges an event only after its handler returned (or it was
  dead-lettered), so an event held by a member that crashed is claimed by
  another after ``idle_timeout``. A failing event waits for its retry out of
  line (a small heap of due times) while the member keeps handling the
  events behind it, so one poison event never stalls the group.
* **Loops** (``@app.loop(name, every)``) tick on whichever node holds the
  lease ``loop:{name}``; the holder renews it every ``lease / 3`` and stops
  ticking the moment a renewal fails, and a node that stops releases it so a
  successor starts at once.

Only nodes with the ``processor`` role run any of them (see
:class:`~rtcore.engine.node.Node`). Everything here tolerates backend errors: it
logs, waits a moment and goes on, because a processor that dies with a Redis
restart would silently stop the app's reactions.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..backends.base import Event, GroupLog, GroupMessage
from ..errors import RtcoreError
from ..logs import PROCESSOR, emit
from ..protocol.backoff import backoff_delay
from ..protocol.streams import matches
from .app import Context, LoopSpec, ProcessorSpec

if TYPE_CHECKING:
    from .node import Node

__all__ = ["Processors", "backoff"]

log = logging.getLogger("rtcore.engine.processors")

#: Streams whose matching local processors a node remembers (bounded, cleared when full).
TARGETS_KEPT = 8192

#: Events a group member takes per read (also what it may lose to others if it hangs).
BATCH = 16

#: Longest a group member waits in one read before looking at retries and claims again.
MAX_BLOCK = 1.0

#: Pause after a backend error before a processor or loop tries again.
BACKEND_PAUSE = 0.5

#: Events a local processor may lag behind the feed before new ones are dropped.
LOCAL_QUEUE = 10_000


def backoff(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1`` after try ``attempt`` failed (0.1, 0.2, ... 2.0)."""
    return backoff_delay(attempt, 0.05, 2.0, jitter=0.0)


async def _call(node: Node, spec: ProcessorSpec, event: Event) -> Exception | None:
    """Run the handler once; return what it raised (cancellation passes through)."""
    try:
        await spec.handler(Context(node, None), event)
    except Exception as exc:
        return exc
    return None


def _log_retry(node: Node, spec: ProcessorSpec, event: Event, attempt: int, exc: Exception) -> None:
    node.stats["processor_retries"] = node.stats.get("processor_retries", 0) + 1
    if PROCESSOR.isEnabledFor(logging.WARNING):
        emit(
            PROCESSOR, logging.WARNING, "processor retry", processor=_dlq_name(spec), group=spec.group,
            stream=event.stream, offset=event.offset, attempt=attempt, max_attempts=spec.max_attempts, error=repr(exc),
        )


def _dlq_name(spec: ProcessorSpec) -> str:
    return spec.group or spec.handler.__name__


async def _dead_letter(node: Node, spec: ProcessorSpec, event: Event, error: str) -> None:
    """Park ``event`` in ``dlq:{group or handler name}`` with ``error``.

    The append is keyed by the event's position, so a member that dies
    between dead-lettering and acknowledging and is then replaced does not
    park the same event twice.
    """
    node.stats["dead_letters"] = node.stats.get("dead_letters", 0) + 1
    if PROCESSOR.isEnabledFor(logging.ERROR):
        emit(
            PROCESSOR, logging.ERROR, "processor dead letter", processor=_dlq_name(spec), group=spec.group,
            stream=event.stream, offset=event.offset, dlq=f"dlq:{_dlq_name(spec)}", error=error,
        )
    await node.publish(
        f"dlq:{_dlq_name(spec)}",
        "failed",
        {"stream": event.stream, "offset": event.offset, "epoch": event.epoch, "error": error},
        key=f"{event.stream}:{event.epoch}:{event.offset}",
    )


class Processors:
    """Starts and feeds a node's processors and loops.

    Args:
        node: The node (its ``roles``, ``backend``, ``clock`` and ``id`` are read at :meth:`start`).
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self._queues: list[tuple[ProcessorSpec, MemoryObjectSendStream[Event]]] = []
        # The queues whose pattern matches a stream, per stream (a glob match
        # per processor per event was a measurable share of a room move).
        self._targets: dict[str, list[tuple[ProcessorSpec, MemoryObjectSendStream[Event]]]] = {}

    @property
    def enabled(self) -> bool:
        """Whether this node runs processors and loops (it has the ``processor`` role)."""
        return "processor" in self._node.roles

    @property
    def needs_feed(self) -> bool:
        """Whether local processors need every event of the node's live feed."""
        return self.enabled and any(spec.group is None for spec in self._node.app.processors)

    async def start(self, tg: TaskGroup) -> None:
        """Create the consumer groups, then start every processor and loop in ``tg``.

        Groups are created before this returns, so an event appended after
        the node started is delivered to them.

        Raises:
            RuntimeError: a group processor is registered but the backend has no consumer groups.
        """
        if not self.enabled:
            return
        node = self._node
        for spec in node.app.processors:
            if spec.group is None:
                send, recv = anyio.create_memory_object_stream[Event](max_buffer_size=LOCAL_QUEUE)
                self._queues.append((spec, send))
                self._targets.clear()  # an event seen before this queue existed cached a list without it
                tg.start_soon(self._run_local, spec, recv)
            else:
                groups = node.backend.groups
                if groups is None:
                    raise RuntimeError(
                        f"backend {node.backend.url!r} has no consumer groups (processor group {spec.group!r})"
                    )
                await groups.create(spec.group)
                tg.start_soon(_GroupMember(node, spec, groups).run)
        for loop in node.app.loops:
            tg.start_soon(_LoopRunner(node, loop).run)

    def stop(self) -> None:
        """Close the local processors' queues (their tasks end with the node's task group)."""
        for _spec, send in self._queues:
            send.close()
        self._queues.clear()
        self._targets.clear()

    def on_event(self, event: Event) -> None:
        """Hand a live event to the local processors whose pattern matches and that accept it (never blocks)."""
        targets = self._targets.get(event.stream)
        if targets is None:
            if len(self._targets) >= TARGETS_KEPT:
                self._targets.clear()
            targets = self._targets[event.stream] = [(s, q) for s, q in self._queues if matches(s.pattern, event.stream)]
        for spec, send in targets:
            if spec.accept is not None and not spec.accept(self._node, event):
                continue
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                log.error(
                    "processor %s is %d events behind; dropping %s:%d",
                    spec.handler.__qualname__,
                    LOCAL_QUEUE,
                    event.stream,
                    event.offset,
                )

    async def _run_local(self, spec: ProcessorSpec, recv: MemoryObjectReceiveStream[Event]) -> None:
        # In order, retried in place: a local processor sees its node's feed
        # and nothing else, so there is nobody to hand a slow event to.
        async with recv:
            async for event in recv:
                for attempt in range(1, spec.max_attempts + 1):
                    exc = await _call(self._node, spec, event)
                    if exc is None:
                        break
                    if attempt < spec.max_attempts:
                        _log_retry(self._node, spec, event, attempt, exc)
                        await anyio.sleep(backoff(attempt))
                        continue
                    try:
                        await _dead_letter(self._node, spec, event, repr(exc))
                    except RtcoreError:
                        log.exception("could not dead-letter %s:%d", event.stream, event.offset)


class _GroupMember:
    """This node's member of one consumer group (see the module docstring)."""

    def __init__(self, node: Node, spec: ProcessorSpec, groups: GroupLog) -> None:
        assert spec.group is not None
        self._node = node
        self._spec = spec
        self._group = spec.group
        self._groups = groups
        # Events this member holds unacknowledged between tries, by delivery id,
        # and when each is due again: (due, tie-breaker, id, next attempt).
        self._waiting: dict[str, GroupMessage] = {}
        self._retries: list[tuple[float, int, str, int]] = []
        self._ticket = 0
        self._claim_every = max(spec.idle_timeout / 2, 0.05)
        self._next_claim = 0.0

    async def run(self) -> None:
        """Handle the group's events until cancelled."""
        while True:
            try:
                await self._round()
            except RtcoreError as exc:  # the backend failed: unacked events stay pending
                log.warning("processor group %s: %s; retrying in %.1fs", self._group, exc, BACKEND_PAUSE)
                await anyio.sleep(BACKEND_PAUSE)

    async def _round(self) -> None:
        node, spec, groups = self._node, self._spec, self._groups
        while self._retries and self._retries[0][0] <= anyio.current_time():
            _due, _n, mid, attempt = heapq.heappop(self._retries)
            await self._handle(self._waiting.pop(mid), attempt)
        if anyio.current_time() >= self._next_claim:
            self._next_claim = anyio.current_time() + self._claim_every
            claimed = await groups.claim(
                self._group, node.id, min_idle=spec.idle_timeout, now=node.clock(), count=BATCH
            )
            await self._handle_batch([m for m in claimed if m.id not in self._waiting])
        wake = self._next_claim if not self._retries else min(self._next_claim, self._retries[0][0])
        block = min(MAX_BLOCK, max(0.0, wake - anyio.current_time()))
        await self._handle_batch(await groups.read(self._group, node.id, now=node.clock(), count=BATCH, block=block))

    async def _handle_batch(self, msgs: list[GroupMessage]) -> None:
        # Events of other streams are the group's too (it reads one global
        # log): acknowledge them in one call instead of one per event.
        skipped = []
        for m in msgs:
            if matches(self._spec.pattern, m.event.stream):
                await self._handle(m, 1)
            else:
                skipped.append(m.id)
        await self._groups.ack(self._group, skipped)

    async def _handle(self, m: GroupMessage, attempt: int) -> None:
        spec, ev = self._spec, m.event
        if attempt == 1 and m.deliveries > spec.max_attempts:
            # Handed out this often without an ack: its members died or hung on it.
            error = f"delivered {m.deliveries} times without being acknowledged (members crashed or timed out)"
            await _dead_letter(self._node, spec, ev, error)
            await self._groups.ack(self._group, [m.id])
            return
        exc = await _call(self._node, spec, ev)
        if exc is not None and attempt < spec.max_attempts:
            _log_retry(self._node, spec, ev, attempt, exc)
            self._ticket += 1
            self._waiting[m.id] = m
            heapq.heappush(self._retries, (anyio.current_time() + backoff(attempt), self._ticket, m.id, attempt + 1))
            return
        if exc is not None:
            await _dead_letter(self._node, spec, ev, repr(exc))
        await self._groups.ack(self._group, [m.id])


class _LoopRunner:
    """Runs one ``@app.loop`` while this node holds its lease."""

    def __init__(self, node: Node, spec: LoopSpec) -> None:
        self._node = node
        self._spec = spec
        self._lease = f"loop:{spec.name}"

    async def run(self) -> None:
        """Wait for the lease, tick while holding it, forever; release it when cancelled."""
        try:
            while True:
                if await self._acquire():
                    await self._lead()
                else:
                    await anyio.sleep(self._spec.lease / 3)
        finally:
            await self._release()

    async def _release(self) -> None:
        # Hand over at once instead of making the successor wait for expiry.
        # Best effort, during shutdown: a client may have just dropped the
        # connection a cancelled command was using (hence one more try and
        # any exception), and a lease we fail to release expires anyway.
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            for _ in range(2):
                try:
                    await self._node.backend.leases.release(self._lease, self._node.id)
                    return
                except Exception as exc:
                    log.debug("loop %s: releasing its lease failed: %r", self._spec.name, exc)

    async def _acquire(self) -> bool:
        # Bounded by a third of the lease, so a renewal that hangs is noticed
        # (and ticking stops) before the lease can have expired.
        try:
            with anyio.fail_after(self._spec.lease / 3):
                return await self._node.backend.leases.acquire(
                    self._lease, self._node.id, now=self._node.clock(), ttl=self._spec.lease
                )
        except (RtcoreError, TimeoutError) as exc:
            log.warning("loop %s: could not take or renew its lease: %r", self._spec.name, exc)
            return False

    async def _lead(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._tick)
            while True:
                await anyio.sleep(self._spec.lease / 3)
                if not await self._acquire():
                    log.warning("loop %s: lost its lease; stopping here", self._spec.name)
                    tg.cancel_scope.cancel()
                    return

    async def _tick(self) -> None:
        ctx = Context(self._node, None)
        due = anyio.current_time()
        while True:
            try:
                await self._spec.handler(ctx)
            except Exception:
                log.exception("loop %s: tick failed", self._spec.name)
            # Fixed rate; ticks that a slow one overran are skipped, not bunched up.
            due = max(due + self._spec.every, anyio.current_time())
            await anyio.sleep(max(0.0, due - anyio.current_time()))  # a slow tick must not go negative

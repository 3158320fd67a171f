"""Server-Sent Events: one subscription per HTTP response, through an :class:`~rtcore.server.outbox.Outbox`.

``GET /v1/streams/{stream}/sse`` subscribes like a WebSocket ``sub`` (without
server cursors) and streams the events as SSE. The response body is the
outbox read by the HTTP writer: each chunk is everything queued since the
last write (one socket write). The outbox bounds the stream like a
WebSocket session's: history is replayed at the client's pace, and a client
that stops reading while live events keep coming is cut once its outbox is
full — the queue is dropped, an ``rtcore.bye`` event is queued and the
response ends. ``EventSource`` then reconnects with ``Last-Event-ID`` (the
last event it received) and resumes without loss or duplicates while the
stream's retention covers that position.
"""

from __future__ import annotations

import logging
import secrets

import anyio

from ..engine.app import Principal
from ..engine.hub import EncodedEvent, OutboxLimits, Tail
from ..engine.node import Node
from ..logs import CONNECTION, emit
from ..protocol.codec import codec_for
from ..protocol.frames import Position
from ..transport import HttpRequest
from ..transport.http import format_peer
from .outbox import Outbox
from .registry import SessionInfo, SessionRegistry, SubscriptionInfo

__all__ = ["HEARTBEAT", "SseStream"]

#: Seconds without data after which a ``: ping`` comment is sent.
HEARTBEAT = 15.0

_JSON = codec_for("json")
_RESET = b'event: rtcore.reset\ndata: {"reason":"epoch_changed"}\n\n'
_BYE = b"event: rtcore.bye\ndata: " + _JSON.encode(
    {"reason": "slow_consumer", "message": "the stream could not keep up; reconnect and resume", "reconnect": True}
) + b"\n\n"


def _event_chunk(enc: EncodedEvent) -> bytes:
    e = enc.event
    return f"id: {e.epoch}:{e.offset}\nevent: {e.type}\n".encode() + b"data: " + enc.encoded("json") + b"\n\n"


class SseStream:
    """One SSE response: an async iterator of body chunks, listed in the session registry.

    Args:
        node: The running node.
        request: The HTTP request (its ``shutdown`` ends the stream).
        limits: Outbox bounds.
        registry: Where the stream is listed while open (None: nowhere).
    """

    kind = "sse"

    def __init__(self, node: Node, request: HttpRequest, limits: OutboxLimits, registry: SessionRegistry | None = None) -> None:
        self.node = node
        self.request = request
        self.id = "sse-" + secrets.token_hex(8)
        self.opened_at = node.clock()
        self.principal: Principal | None = None
        self.outbox = Outbox(limits, render=_event_chunk, spawn=node.spawn, on_slow=self._slow, on_stale=self._stale)
        self._registry = registry
        self._tail: Tail | None = None
        self._ended = False

    async def start(self, principal: Principal | None, stream: str, since: Position | None) -> None:
        """Subscribe and queue the preamble; live events are queued from here on."""
        self.principal = principal
        sub = await self.node.subscribe(principal, stream, since, self.outbox, use_cursor=False)
        self._tail = sub.tail
        info = {"stream": stream, "epoch": sub.epoch, "offset": sub.offset, "recovered": sub.recovered}
        self.outbox.push(b"retry: 1000\nevent: rtcore.subscribed\ndata: " + _JSON.encode(info) + b"\n\n")
        if sub.snap is not None:
            self.outbox.push(
                f"id: {sub.epoch}:{sub.offset}\nevent: rtcore.snapshot\n".encode() + b"data: " + _JSON.encode(sub.snap) + b"\n\n"
            )
        if self._registry is not None:
            self._registry.add(self)
        self.node.spawn(sub.tail.fill)

    # --- outbox callbacks --------------------------------------------------------

    def _slow(self) -> None:
        self.node.stats["slow_consumers"] += 1
        if CONNECTION.isEnabledFor(logging.WARNING):
            emit(
                CONNECTION, logging.WARNING, "slow consumer cut", id=self.id, peer=format_peer(self.request.peer),
                principal=self.principal.id if self.principal is not None else None, queued_bytes=self.outbox.queued_bytes,
            )
        if self._tail is not None:
            self.node.hub.remove(self._tail)  # the subscription ends here, even if nobody reads on
        self.outbox.push(_BYE)  # the outbox closes right after: the response ends

    def _stale(self, stream: str) -> None:
        self.outbox.push(_RESET)
        self.outbox.close()

    # --- registry ----------------------------------------------------------------

    def info(self) -> SessionInfo:
        """Read-only view for the session registry."""
        tail = self._tail
        subs: tuple[SubscriptionInfo, ...] = ()
        if tail is not None and not tail.closed:
            subs = (
                SubscriptionInfo(
                    stream=tail.stream,
                    epoch=tail.delivery.epoch,
                    delivered=tail.delivery.last,
                    last_sent=self.outbox.last_sent.get(tail.stream),
                ),
            )
        return SessionInfo(
            id=self.id,
            kind="sse",
            principal=self.principal.id if self.principal is not None else None,
            opened_at=self.opened_at,
            subscriptions=subs,
            queued_bytes=self.outbox.queued_bytes,
            queued_frames=self.outbox.queued_frames,
            bytes_out=self.outbox.bytes_out,
        )

    async def drain(self, deadline: float) -> None:
        """Shutdown: send what is queued, then end the response."""
        self.drain_now()

    def drain_now(self) -> bool:
        """:meth:`drain` without a task (the registry's fast path): always done."""
        self.outbox.close()
        return True

    # --- the response body -------------------------------------------------------

    def __aiter__(self) -> SseStream:
        return self

    async def __anext__(self) -> bytes:
        shutdown = self.request.shutdown
        while not self._ended and not shutdown.started:
            with anyio.move_on_after(min(HEARTBEAT, shutdown.remaining())) as scope:
                batch = await self.outbox.take()
            if scope.cancelled_caught:
                return b": ping\n\n"
            if batch is None:
                break
            return b"".join(batch)
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """End the stream: unsubscribe, drop the queue, leave the registry (idempotent)."""
        if self._ended:
            return
        self._ended = True
        if self._tail is not None:
            self.node.hub.remove(self._tail)
        self.outbox.abort()
        if self._registry is not None:
            self._registry.discard(self)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<SseStream {self.id} {self._tail.stream if self._tail else '?'}>"

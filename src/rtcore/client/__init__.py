"""A reconnecting rtcore client over WebSocket (anyio + wsproto).

Usage::

    async with rtcore.client.connect("ws://127.0.0.1:8000/v1/ws", token="alice") as client:
        sub = await client.subscribe("room:7")
        await client.command("room.move", {"x": 1})
        async for item in sub:
            if isinstance(item, rtcore.client.Missed):
                ...  # events were lost (or a snapshot starts the stream): resync
            else:
                ...  # an Evt, each exactly once, in offset order

Why the client is the other half of the delivery guarantee: the server
delivers *at least once* across reconnects (it replays from the position the
client asks for). The client turns that into *exactly once, in order, or
told*. The rules below live in one sans-IO state machine,
:class:`rtcore.protocol.client.ClientSession`, which this client and the
in-process :class:`rtcore.testing.Client` both drive; ``docs/clients.md`` is
the contract for any client:

1. **Positions.** Every subscription keeps a
   :class:`~rtcore.protocol.streams.ClientCursor`: the epoch and offset of the last
   event it queued for the application. After any reconnect it resubscribes
   with ``since`` = that position, so the server replays exactly what is
   missing.
2. **Duplicates** (an event at or below the cursor, same epoch) are dropped.
   A *gap* (an offset beyond cursor + 1 in the same epoch) can only come from
   a broken connection; the client drops the connection and resumes from its
   cursor instead of skipping.
3. **Missed events are never silent.** A ``subbed`` with ``recovered: false``
   for a subscription that had a position (history was trimmed, or the
   server's epoch changed: a backend reset, including the unsolicited
   ``subbed`` a server sends when an epoch changes under a live
   subscription) and every ``snap`` become a :class:`Missed` item in the
   subscription's iterator, in order with the events. The cursor jumps to
   the new position. With ``subbed.snap: true`` the cursor keeps its old
   position until the ``snap`` frame arrives, so a connection lost between
   the two frames resumes from where it was.
4. **Acks** are cumulative and sent for what the application has *pulled*
   from the iterator (not what was received), batched every
   ``ack_interval`` seconds, so the server cursor (used by a client that
   subscribes with ``cursor=True``) never runs ahead of the application.
   A subscribe without ``since`` or ``cursor=True`` gets the stream's
   *current* state (a snapshot :class:`Missed` on a stateful stream), even
   when the principal acked elsewhere.
5. **Commands** each carry an idempotency key (``uuid4().hex`` unless given).
   A command not answered when the connection drops is resent with the same
   key after the reconnect; the server's idempotency layer makes the action
   take effect once. ``idempotency_in_progress`` (the first attempt is still
   executing) is retried after a short wait; ``shutdown`` (the server is
   draining) waits for the next connection. A command that gets no answer in
   ``timeout`` seconds raises :class:`~rtcore.errors.RtcoreError` code
   ``timeout``; an ``err`` reply raises the class that owns its code
   (:func:`rtcore.errors.error_from_wire`: catch
   :class:`rtcore.IdempotencyError`, :class:`rtcore.AuthError`, ...).
6. **Reconnects** use exponential backoff with jitter
   (:func:`rtcore.protocol.backoff.backoff_delay`): attempt *n* (from 0)
   waits ``min(backoff_max, backoff_base * 2**n)`` times a random factor in
   [0.5, 1], so a restarted server is not hit by every client at once.
   ``max_attempts`` consecutive failures (``None``: never give up) close the
   client with code ``disconnected``. ``bye`` with ``reconnect: true``
   (shutdown, slow consumer, idle) reconnects; ``reconnect: false`` (e.g.
   ``token_expired`` not refreshed) closes the client with the bye's code.
   A handshake refused with a 4xx status (other than 408/429) or a ``hello``
   refused with a non-retryable error is final too.
7. **Heartbeats.** A ``ping`` every ``heartbeat`` seconds (the server's
   value from ``welcome`` unless given); no ``pong`` within the same time
   means the connection is dead (a half-open TCP connection shows no error)
   and the client reconnects.
8. **Token refresh.** When the server says ``token_expired`` the client asks
   ``token_provider`` for a fresh token and sends an ``auth`` frame; the new
   token is also used for every later ``hello``.
9. **Rooms.** ``room = await client.join_or_create("tictactoe")`` (or
   :meth:`~Client.create`, :meth:`~Client.join`) returns a
   :class:`~rtcore.client.rooms.Room` whose ``state`` is the server's, kept
   by folding the room's generic patches (no game code; ``sync`` checksums
   verified, resync on a mismatch); ``room.send``, ``room.leave``,
   ``room.on_change``, ``room.changes()``, ``room.wait_for``. See
   docs/rooms.md.

The first connection is made inside :func:`connect`: if it fails, the error
is raised there (``OSError`` for an unreachable server, ``RtcoreError`` for a
refused handshake or hello) rather than retried forever behind the
application's back.
"""

from __future__ import annotations

from ..errors import ConnectionClosed
from ..protocol.backoff import backoff_delay
from ..protocol.client import ClientSession, Missed
from ..protocol.rooms import RoomChange
from .client import Client, Subscription, TokenProvider, connect
from .rooms import Room

__all__ = [
    "Client",
    "ClientSession",
    "ConnectionClosed",
    "Missed",
    "Room",
    "RoomChange",
    "Subscription",
    "TokenProvider",
    "backoff_delay",
    "connect",
]

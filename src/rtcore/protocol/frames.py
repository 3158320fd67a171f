"""The wire protocol v1: one small immutable Struct per frame.

Rules (see docs/protocol.md for the prose):

1. Every frame is a msgspec Struct in one tagged union, tag field ``t``.
2. Unknown fields are ignored (forward compatibility); new fields are only ever
   added with a default, so old peers keep decoding new frames.
3. A request frame with an ``id`` gets exactly one reply carrying that ``id``.
4. Payloads the server does not interpret (command ``args``) stay
   :class:`msgspec.Raw` until the command's own type decodes them, so they are
   parsed once, against the handler's annotation.

This module is sans-IO: no sockets, no clock, no event loop.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Auth",
    "Bye",
    "ClientFrame",
    "Cmd",
    "Err",
    "Evt",
    "Hello",
    "Limits",
    "Msg",
    "Ok",
    "Ping",
    "Pong",
    "Position",
    "ServerFrame",
    "Snap",
    "Sub",
    "Subbed",
    "Sync",
    "Unsub",
    "Welcome",
]

PROTOCOL_VERSION: Final = 1

_NULL: Final = msgspec.Raw(b"null")

#: Request ids: non-negative and exact in a JavaScript number.
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]
#: Stream offsets: dense from 1, 0 means "before the first event".
Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Position(msgspec.Struct, frozen=True):
    """A point in a stream: ``offset`` within ``epoch`` (offset 0 = before the first event)."""

    epoch: str
    offset: Offset


class Limits(msgspec.Struct, frozen=True):
    """Limits the server announces in ``welcome`` (all sizes in bytes, times in seconds)."""

    max_message_size: int = 1 << 20
    max_subscriptions: int = 100
    max_inflight: int = 32
    command_rate: float = 100.0
    command_burst: int = 200
    idle_timeout: float = 45.0


# --- client -> server ------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag_field="t", tag="hello"):
    """First frame of a session; ``token`` is optional when auth came with the upgrade."""

    v: int = PROTOCOL_VERSION
    token: str | None = None


class Auth(msgspec.Struct, frozen=True, tag_field="t", tag="auth"):
    """Replace the session's token (answer to ``token_expired``)."""

    id: RequestId
    token: str


class Sub(msgspec.Struct, frozen=True, tag_field="t", tag="sub"):
    """Subscribe to a stream, optionally resuming after ``since``.

    Without ``since`` the subscriber gets the stream's current state (a
    snapshot on a stateful stream, live from the head otherwise). ``cursor``
    true asks instead to resume from the principal's server-side cursor (its
    last ``ack`` on any connection); ignored when ``since`` is given.
    """

    id: RequestId
    stream: str
    since: Position | None = None
    cursor: bool = False


class Unsub(msgspec.Struct, frozen=True, tag_field="t", tag="unsub"):
    """Stop receiving a stream; answered with ``ok``."""

    id: RequestId
    stream: str


class Cmd(msgspec.Struct, frozen=True, tag_field="t", tag="cmd"):
    """Run a command. ``key`` makes it idempotent for the session's principal."""

    id: RequestId
    name: str
    args: msgspec.Raw = _NULL
    key: str | None = None


class Ack(msgspec.Struct, frozen=True, tag_field="t", tag="ack"):
    """Cumulative acknowledgement: every event of ``stream`` up to ``offset`` was processed."""

    stream: str
    offset: Offset


class Ping(msgspec.Struct, frozen=True, tag_field="t", tag="ping"):
    """Liveness probe; answered with ``pong``."""

    id: RequestId


ClientFrame = Hello | Auth | Sub | Unsub | Cmd | Ack | Ping

# --- server -> client ------------------------------------------------------


class Welcome(msgspec.Struct, frozen=True, tag_field="t", tag="welcome"):
    """Answer to ``hello``: the session id, the heartbeat interval and the limits."""

    session: str
    heartbeat: float
    limits: Limits
    principal: str | None = None


class Ok(msgspec.Struct, frozen=True, tag_field="t", tag="ok"):
    """Successful reply to the request ``id``."""

    id: int
    result: Any = None
    replayed: bool = False


class Err(msgspec.Struct, frozen=True, tag_field="t", tag="err"):
    """Failed reply to ``id`` (``None`` when the request's id could not be read).

    ``replayed`` is true when the error is the stored outcome of an earlier
    execution with the same idempotency key.
    """

    id: int | None
    code: str
    message: str
    retryable: bool = False
    replayed: bool = False


class Subbed(msgspec.Struct, frozen=True, tag_field="t", tag="subbed"):
    """Answer to ``sub``: the position live delivery continues from.

    ``recovered`` is true when every event after the client's ``since`` will be
    delivered; false means the client missed events (or sent no position).
    ``snap`` true means a ``snap`` frame follows: the client keeps its position
    until that frame arrives (if the connection dies first, it resumes from
    where it was and gets a snapshot again).
    """

    id: int
    stream: str
    epoch: str
    offset: int
    recovered: bool
    snap: bool = False


class Evt(msgspec.Struct, frozen=True, tag_field="t", tag="evt"):
    """One event of a stream."""

    stream: str
    epoch: str
    offset: int
    type: str
    data: Any
    ts: float


class Snap(msgspec.Struct, frozen=True, tag_field="t", tag="snap"):
    """The folded state of a stateful stream at ``offset``; events continue after it."""

    stream: str
    epoch: str
    offset: int
    state: Any
    checksum: str


class Sync(msgspec.Struct, frozen=True, tag_field="t", tag="sync"):
    """Checksum of the folded state after ``offset`` so a folding client can verify it."""

    stream: str
    offset: int
    checksum: str
    epoch: str = ""


class Msg(msgspec.Struct, frozen=True, tag_field="t", tag="msg"):
    """A direct message to the session's principal: ephemeral, in no stream.

    It has no offset and is never acknowledged or replayed: a principal gets
    it on the connections it has open when it is sent, at most once. ``room``
    names the room it comes from (:mod:`rtcore.rooms`), ``None`` otherwise.
    """

    type: str
    data: Any = None
    room: str | None = None


class Pong(msgspec.Struct, frozen=True, tag_field="t", tag="pong"):
    """Answer to ``ping``."""

    id: int


class Bye(msgspec.Struct, frozen=True, tag_field="t", tag="bye"):
    """The server is closing the session; ``reconnect`` says whether to come back."""

    code: str
    message: str
    reconnect: bool


ServerFrame = Welcome | Ok | Err | Subbed | Evt | Snap | Sync | Msg | Pong | Bye

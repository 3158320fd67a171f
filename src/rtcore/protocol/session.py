"""The per-connection session state machine (sans-IO).

One :class:`Session` per connection. Bytes (or decoded frames) go in with the
current time; :class:`Action` objects come out: frames to send, requests for
the driver to carry out (authenticate, subscribe, run a command, store an
ack), and closes. The driver reports back with :meth:`Session.authenticated`,
:meth:`Session.reply` and friends. This is the websockets/h11 shape: the
state machine never awaits, never reads a clock, never touches a socket.

Rules (everything that changes session state lives in this module):

1. States: ``AWAIT_HELLO`` → ``AUTHENTICATING`` → ``OPEN`` → ``CLOSED``.
   The first frame must be ``hello``; anything else before it is answered
   ``protocol_violation`` and the connection closes (1002). A second
   ``hello`` is a ``protocol_violation`` answered with ``err``; the session
   stays open.
2. While ``AUTHENTICATING`` no other frame is accepted (the client must wait
   for ``welcome``): they are answered ``protocol_violation``.
3. A malformed frame is answered ``bad_frame`` (to its ``id`` when readable)
   and the session carries on; only before ``hello`` does it close.
4. A request ``id`` may not be reused while its request is still open
   (``protocol_violation``); ids of finished requests may be reused.
5. ``sub`` to a stream already subscribed is ``already_subscribed``;
   ``unsub`` of one not subscribed is ``not_subscribed``; more than
   ``max_subscriptions`` is ``too_many_subscriptions``.
6. More than ``max_inflight`` commands executing is ``too_many_inflight``;
   commands beyond the token bucket are ``rate_limited`` (both retryable).
7. Idle: no frame for ``idle_timeout`` seconds closes with 1001 after ``bye``.
   With a ``hello_timeout``, a client that has not sent ``hello`` that long
   after connecting gets ``bye`` ``timeout`` and close 1008 (a handshake
   deadline much shorter than the idle timeout, so a connection that never
   speaks the protocol does not hold a slot for long).
8. Token expiry: at ``expires_at`` the client gets ``err`` ``token_expired``
   (id null) and has ``token_grace`` seconds to send ``auth`` with a fresh
   token; otherwise ``bye`` and close 1008.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgspec

from ..errors import AuthError, BadFrame, BadRequest, LimitExceeded, ProtocolError, RtcoreError
from .codec import Codec
from .frames import (
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Bye,
    ClientFrame,
    Cmd,
    Err,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    Position,
    Sub,
    Unsub,
    Welcome,
)
from .streams import check_stream

__all__ = [
    "Action",
    "Close",
    "DoAck",
    "DoAuthenticate",
    "DoCommand",
    "DoSubscribe",
    "DoUnsubscribe",
    "Send",
    "Session",
    "SessionState",
    "TokenBucket",
]


class SessionState(Enum):
    """Where a session is in its life."""

    AWAIT_HELLO = "await_hello"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSED = "closed"


# --- actions -----------------------------------------------------------------


class Send(msgspec.Struct, frozen=True):
    """Send this frame to the client."""

    frame: Any


class Close(msgspec.Struct, frozen=True):
    """Close the connection with this WebSocket close code."""

    code: int
    reason: str = ""


class DoAuthenticate(msgspec.Struct, frozen=True):
    """Authenticate ``token``; answer with :meth:`Session.authenticated` or :meth:`Session.auth_failed`.

    ``refresh_id`` is set when this is an ``auth`` frame replacing the token
    of an open session (its reply goes to that id).
    """

    token: str | None
    refresh_id: int | None = None


class DoSubscribe(msgspec.Struct, frozen=True):
    """Start delivering ``stream`` from ``since``; then :meth:`Session.reply` to ``id``.

    ``cursor``: without ``since``, resume from the principal's server-side
    cursor (``sub.cursor``); otherwise a position-less subscriber gets the
    current state.
    """

    id: int
    stream: str
    since: Position | None
    cursor: bool = False


class DoUnsubscribe(msgspec.Struct, frozen=True):
    """Stop delivering ``stream`` (the session already answered ``ok``)."""

    id: int
    stream: str


class DoCommand(msgspec.Struct, frozen=True):
    """Run a command; then :meth:`Session.reply` to ``id``."""

    id: int
    name: str
    args: msgspec.Raw
    key: str | None


class DoAck(msgspec.Struct, frozen=True):
    """Store the client's cumulative ack as its cursor."""

    stream: str
    offset: int


Action = Send | Close | DoAuthenticate | DoSubscribe | DoUnsubscribe | DoCommand | DoAck


class TokenBucket:
    """Token bucket rate limiter with time passed in."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token; False if the bucket is empty."""
        # A clock stepping backwards must not drain the bucket.
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _err(rid: int | None, exc: RtcoreError) -> Send:
    return Send(Err(rid, exc.code, exc.message, exc.retryable))


def _violation(rid: int | None, message: str) -> Send:
    return _err(rid, ProtocolError(message))


#: The shared, never written, empty ``Session._pending``/``_pending_subs``.
_NONE_OPEN: dict[int, str] = {}


class Session:
    """The protocol state of one connection.

    Args:
        session_id: Id announced in ``welcome``.
        codec: The connection's codec.
        limits: Limits to enforce and announce.
        now: Current time.
        heartbeat: Interval the client should ping at (announced in ``welcome``).
        token_grace: Seconds a client has to refresh an expired token.
        hello_timeout: Seconds from ``now`` the client has to send ``hello``
            (``None``: only the idle timeout applies).
    """

    # One per connection: no per-instance __dict__.
    __slots__ = (
        "_bucket", "_commands", "_expired_notice_at", "_expires_at", "_hello_deadline", "_last_seen", "_pending",
        "_pending_subs", "codec", "heartbeat", "id", "limits", "principal", "principal_id", "state", "subscriptions",
        "token_grace",
    )

    def __init__(
        self,
        session_id: str,
        codec: Codec,
        limits: Limits,
        now: float,
        *,
        heartbeat: float = 15.0,
        token_grace: float = 10.0,
        hello_timeout: float | None = None,
    ) -> None:
        self.id = session_id
        self.codec = codec
        self.limits = limits
        self.heartbeat = heartbeat
        self.token_grace = token_grace
        self.state = SessionState.AWAIT_HELLO
        self.principal: Any = None
        self.principal_id: str | None = None
        self.subscriptions: set[str] = set()
        # Open request id -> kind ("sub", "cmd", "auth"), and the stream of each open sub.
        # Both are the shared empty _NONE_OPEN while nothing is open (an empty dict is
        # 64 bytes, times thousands of idle sessions): _open() makes one to write to.
        self._pending: dict[int, str] = _NONE_OPEN
        self._pending_subs: dict[int, str] = _NONE_OPEN
        self._commands = 0
        self._bucket = TokenBucket(limits.command_rate, limits.command_burst, now)
        self._last_seen = now
        self._expires_at: float | None = None
        self._expired_notice_at: float | None = None
        self._hello_deadline = now + hello_timeout if hello_timeout is not None else None

    # --- input -----------------------------------------------------------

    def receive_data(self, data: bytes | str, now: float) -> list[Action]:
        """Feed one WebSocket message; return the actions it causes."""
        if self.state is SessionState.CLOSED:
            return []
        self._last_seen = now
        try:
            frame = self.codec.decode_client(data)
        except BadFrame as exc:
            if self.state is SessionState.AWAIT_HELLO:
                self.state = SessionState.CLOSED
                return [_err(exc.request_id, exc), Close(1002, "bad first frame")]
            return [_err(exc.request_id, exc)]
        return self.receive_frame(frame, now)

    def receive_frame(self, frame: ClientFrame, now: float) -> list[Action]:
        """Feed one decoded frame; return the actions it causes."""
        if self.state is SessionState.CLOSED:
            return []
        self._last_seen = now
        st = self.state
        if st is SessionState.AWAIT_HELLO:
            if not isinstance(frame, Hello):
                self.state = SessionState.CLOSED
                return [_violation(getattr(frame, "id", None), "the first frame must be hello"), Close(1002, "expected hello")]
            if frame.v != PROTOCOL_VERSION:
                self.state = SessionState.CLOSED
                exc = ProtocolError(f"protocol version {frame.v} is not supported; this server speaks {PROTOCOL_VERSION}", code="unsupported_version")
                return [_err(None, exc), Close(1002, "unsupported version")]
            self.state = SessionState.AUTHENTICATING
            return [DoAuthenticate(frame.token)]
        if st is SessionState.AUTHENTICATING:
            return [_violation(getattr(frame, "id", None), "wait for welcome before sending frames")]
        match frame:
            case Ping(id=rid):
                if rid in self._pending:
                    return [_violation(rid, f"request id {rid} is still in use")]
                return [Send(Pong(rid))]
            case Ack(stream=stream, offset=offset):
                if stream not in self.subscriptions:
                    return [_err(None, BadRequest(f"ack for {stream!r}, which is not subscribed", code="not_subscribed"))]
                return [DoAck(stream, offset)]
            case Sub():
                return self._on_sub(frame)
            case Unsub(id=rid, stream=stream):
                if rid in self._pending:
                    return [_violation(rid, f"request id {rid} is still in use")]
                if stream not in self.subscriptions:
                    return [_err(rid, BadRequest(f"not subscribed to {stream!r}", code="not_subscribed"))]
                self.subscriptions.discard(stream)
                return [DoUnsubscribe(rid, stream), Send(Ok(rid))]
            case Cmd():
                return self._on_cmd(frame, now)
            case Auth(id=rid, token=token):
                if rid in self._pending:
                    return [_violation(rid, f"request id {rid} is still in use")]
                self._open()[rid] = "auth"
                return [DoAuthenticate(token, refresh_id=rid)]
            case Hello():
                return [_violation(None, "hello was already received")]
        return [_violation(None, f"unexpected frame {type(frame).__name__}")]  # pragma: no cover

    def _on_sub(self, frame: Sub) -> list[Action]:
        rid = frame.id
        if rid in self._pending:
            return [_violation(rid, f"request id {rid} is still in use")]
        try:
            check_stream(frame.stream)
        except RtcoreError as exc:
            return [_err(rid, exc)]
        if frame.stream in self.subscriptions or frame.stream in self._pending_subs.values():
            return [_err(rid, BadRequest(f"already subscribed to {frame.stream!r}", code="already_subscribed"))]
        if len(self.subscriptions) + len(self._pending_subs) >= self.limits.max_subscriptions:
            return [_err(rid, LimitExceeded(f"at most {self.limits.max_subscriptions} subscriptions per connection", code="too_many_subscriptions"))]
        self._open()[rid] = "sub"
        if self._pending_subs is _NONE_OPEN:
            self._pending_subs = {}
        self._pending_subs[rid] = frame.stream
        return [DoSubscribe(rid, frame.stream, frame.since, frame.cursor)]

    def _on_cmd(self, frame: Cmd, now: float) -> list[Action]:
        rid = frame.id
        if rid in self._pending:
            return [_violation(rid, f"request id {rid} is still in use")]
        if self._commands >= self.limits.max_inflight:
            return [_err(rid, LimitExceeded(f"at most {self.limits.max_inflight} commands may execute at once", code="too_many_inflight"))]
        if not self._bucket.take(now):
            return [_err(rid, LimitExceeded(f"more than {self.limits.command_rate:g} commands/s (burst {self.limits.command_burst})", code="rate_limited"))]
        self._open()[rid] = "cmd"
        self._commands += 1
        return [DoCommand(rid, frame.name, frame.args, frame.key)]

    # --- results from the driver ----------------------------------------------

    def authenticated(self, principal: Any, principal_id: str | None, expires_at: float | None, now: float, refresh_id: int | None = None) -> list[Action]:
        """The driver accepted the token."""
        if self.state is SessionState.CLOSED:  # closed meanwhile (idle, shutdown): stay closed
            if refresh_id is not None:
                self._pending.pop(refresh_id, None)
            return []
        self.principal, self.principal_id = principal, principal_id
        self._expires_at = expires_at
        self._expired_notice_at = None
        if refresh_id is not None:
            self._pending.pop(refresh_id, None)
            return [Send(Ok(refresh_id, {"principal": principal_id}))]
        self.state = SessionState.OPEN
        self._last_seen = now
        return [Send(Welcome(self.id, self.heartbeat, self.limits, principal_id))]

    def auth_failed(self, exc: RtcoreError, refresh_id: int | None = None) -> list[Action]:
        """The driver refused the token: answer and close with 1008."""
        if refresh_id is not None:
            self._pending.pop(refresh_id, None)
        if self.state is SessionState.CLOSED:
            return []
        self.state = SessionState.CLOSED
        return [_err(refresh_id, exc), Close(1008, exc.code)]

    def _open(self) -> dict[int, str]:
        """``_pending``, to write to (not the shared empty one)."""
        if self._pending is _NONE_OPEN:
            self._pending = {}
        return self._pending

    def reply(self, rid: int, frame: Any) -> list[Action]:
        """Answer the open request ``rid`` (a sub or a cmd) with ``frame`` (subbed/ok/err)."""
        kind = self._pending.pop(rid, None)
        if kind is None or kind == "auth":
            # Not an open sub/cmd: a second reply would break "one reply per id".
            if kind is not None:
                self._open()[rid] = kind
            return []
        if not self._pending:
            # A dict keeps its table after its last key is popped: an idle
            # session (thousands wait at once) holds none.
            self._pending = _NONE_OPEN
        if kind == "cmd":
            self._commands -= 1
        elif kind == "sub":
            stream = self._pending_subs.pop(rid)
            if not self._pending_subs:
                self._pending_subs = _NONE_OPEN
            if not isinstance(frame, Err):
                self.subscriptions.add(stream)
        if self.state is SessionState.CLOSED:
            return []
        return [Send(frame)]

    def unsubscribed(self, stream: str) -> None:
        """The server dropped a subscription on its own (e.g. permission revoked)."""
        self.subscriptions.discard(stream)

    # --- time ----------------------------------------------------------------

    def next_deadline(self) -> float:
        """The next time :meth:`tick` has something to do."""
        deadline = self._last_seen + self.limits.idle_timeout
        if self._hello_deadline is not None and self.state is SessionState.AWAIT_HELLO:
            deadline = min(deadline, self._hello_deadline)
        if self._expires_at is not None:
            grace_end = (self._expired_notice_at + self.token_grace) if self._expired_notice_at is not None else self._expires_at
            deadline = min(deadline, grace_end)
        return deadline

    def tick(self, now: float) -> list[Action]:
        """Advance time: idle timeouts and token expiry."""
        if self.state in (SessionState.CLOSED,):
            return []
        if self._hello_deadline is not None and self.state is SessionState.AWAIT_HELLO and now >= self._hello_deadline:
            return self.close("timeout", "no hello frame in time", reconnect=True, code=1008)
        if now >= self._last_seen + self.limits.idle_timeout:
            return self.close("idle_timeout", f"no frame for {self.limits.idle_timeout:g} s", reconnect=True, code=1001)
        if self.state is SessionState.OPEN and self._expires_at is not None and now >= self._expires_at:
            if self._expired_notice_at is None:
                self._expired_notice_at = now
                return [_err(None, AuthError(f"token expired; send an auth frame within {self.token_grace:g} s", code="token_expired"))]
            if now >= self._expired_notice_at + self.token_grace:
                return self.close("token_expired", "token expired and was not refreshed", reconnect=False, code=1008)
        return []

    def close(self, reason: str, message: str, *, reconnect: bool, code: int = 1000) -> list[Action]:
        """Say ``bye`` with ``reason`` and close with WebSocket ``code`` (idempotent).

        Args:
            reason: The ``bye`` code (``shutdown``, ``idle_timeout``, ``slow_consumer``...).
            message: Human-readable explanation.
            reconnect: Whether the client should come back.
            code: The WebSocket close code.
        """
        if self.state is SessionState.CLOSED:
            return []
        self.state = SessionState.CLOSED
        return [Send(Bye(reason, message, reconnect)), Close(code, reason)]

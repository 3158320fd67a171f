"""One error tree for all of rtcore.

Every error a client can see has a stable snake_case ``code``, a ``retryable``
flag and the HTTP status used when the same error is answered over HTTP. The
table :data:`ERROR_CODES` is the single source of truth for those facts:
docs/protocol.md is checked against it by a test, and the classes below only
pick defaults from it.

Each built-in code has exactly one *owner* class, given by :func:`error_class`
(the table ``_CODE_CLASSES``). The server raises a code with its owner, and a
client rebuilds the owner from an ``err`` frame or an HTTP error body with
:func:`error_from_wire`, so an application catches ``rtcore.LimitExceeded``
rather than comparing strings, on either side of the wire. A test
(tests/test_errors.py) parses src/rtcore and fails when a module builds a code
with anything but its owner.

The tree, split by what the caller does about it (as h11 and h2 split by who is
at fault)::

    RtcoreError              .code .message .retryable .http_status .headers
    │                        owns: internal (a bug on the server side)
    ├── ProtocolError        the peer broke the wire protocol; fix the client library
    │   │                    protocol_violation, unsupported_version
    │   └── BadFrame         bad_frame (.field, .request_id)
    ├── BadRequest           the request is wrong; fix the call, do not retry
    │                        bad_request, bad_args, bad_stream, unknown_command,
    │                        not_found, method_not_allowed, already_subscribed,
    │                        not_subscribed
    ├── AuthError            unauthenticated, token_expired, forbidden, token_* (JWT)
    ├── LimitExceeded        a per-connection or per-request limit was reached:
    │                        rate_limited, too_many_inflight, too_many_subscriptions,
    │                        message_too_big, slow_consumer
    ├── IdempotencyError     idempotency_key_reused, idempotency_in_progress
    ├── ConflictError        conflict (``expect`` did not match the stream head)
    ├── Unavailable          not now; retry later, with the same idempotency key:
    │   │                    timeout, idle_timeout, shutdown
    │   └── BackendError     backend_unavailable (a storage engine failed)
    ├── ConnectionClosed     the connection is gone: disconnected, client_closed
    │                        (.close_code, .reason)
    └── Rejected             an application handler refused a command; owns every
                             code that is not in ERROR_CODES (wallet codes too)

Errors carry the reply to send: ``code``, ``message``, ``retryable``,
``http_status`` and the extra HTTP ``headers`` (``Allow``, ``Upgrade``), so the
transports never invent codes of their own: the HTTP layer answers any
:class:`RtcoreError` it catches from these fields.

Not in the tree: ``rtcore.cli.CliError``, an operator's command-line mistake
that becomes exit status 2 and is never sent to a client (it has no code,
retry flag or HTTP status, and library code catching :class:`RtcoreError` must
not swallow it).
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "ERROR_CODES",
    "AuthError",
    "BackendError",
    "BadFrame",
    "BadRequest",
    "ConflictError",
    "ConnectionClosed",
    "ErrorInfo",
    "IdempotencyError",
    "LimitExceeded",
    "ProtocolError",
    "Rejected",
    "RtcoreError",
    "Unavailable",
    "error_class",
    "error_from_wire",
    "error_info",
]


class ErrorInfo(NamedTuple):
    """What rtcore promises about one error code."""

    retryable: bool
    http_status: int
    description: str


#: Every error code rtcore itself emits. Application codes raised through
#: :class:`Rejected` are not listed here; they are non-retryable and HTTP 400
#: unless the handler says otherwise.
ERROR_CODES: Final[dict[str, ErrorInfo]] = {
    "bad_frame": ErrorInfo(False, 400, "A frame could not be decoded; the message names the field."),
    "bad_request": ErrorInfo(False, 400, "An HTTP request is malformed (path, query or body)."),
    "bad_args": ErrorInfo(False, 400, "Command arguments failed validation; the message names the field path."),
    "unknown_command": ErrorInfo(False, 404, "No command is registered under that name."),
    "not_found": ErrorInfo(False, 404, "No such route or resource."),
    "method_not_allowed": ErrorInfo(False, 405, "The route exists but not for this HTTP method."),
    "unsupported_version": ErrorInfo(False, 400, "The hello frame asked for a protocol version this server does not speak."),
    "protocol_violation": ErrorInfo(False, 400, "A frame arrived that is not allowed in the session's current state."),
    "unauthenticated": ErrorInfo(False, 401, "The token is missing, invalid or was refused."),
    "token_expired": ErrorInfo(True, 401, "The session's token expired; send a fresh one with an auth frame."),
    "token_not_yet_valid": ErrorInfo(False, 401, "The token's nbf (not before) or iat is in the future (beyond the leeway)."),
    "token_wrong_audience": ErrorInfo(False, 401, "The token's aud does not name this service (or is missing when one is required)."),
    "token_wrong_issuer": ErrorInfo(False, 401, "The token's iss is not the expected issuer (or is missing when one is required)."),
    "token_bad_signature": ErrorInfo(False, 401, "The token's signature does not verify with the configured key or JWKS."),
    "token_bad_algorithm": ErrorInfo(False, 401, "The token's alg is not allowed (alg none, or one outside the configured list)."),
    "token_malformed": ErrorInfo(False, 401, "The token cannot be decoded, or a required claim is missing or of the wrong type."),
    "forbidden": ErrorInfo(False, 403, "The principal may not do this (authorize returned false, or Origin refused)."),
    "already_subscribed": ErrorInfo(False, 409, "The connection is already subscribed to this stream."),
    "not_subscribed": ErrorInfo(False, 409, "The connection is not subscribed to this stream."),
    "bad_stream": ErrorInfo(False, 400, "A stream name must be 'kind:id' of printable characters, at most 200 bytes."),
    "too_many_subscriptions": ErrorInfo(False, 429, "The connection reached its subscription limit."),
    "too_many_inflight": ErrorInfo(True, 429, "The connection has too many commands executing at once."),
    "rate_limited": ErrorInfo(True, 429, "The connection sends commands faster than its rate limit."),
    "message_too_big": ErrorInfo(False, 413, "A message or body exceeds the size limit."),
    "idempotency_key_reused": ErrorInfo(False, 422, "The idempotency key was used before with another command or other arguments."),
    "idempotency_in_progress": ErrorInfo(True, 409, "A command with this idempotency key is still executing."),
    "conflict": ErrorInfo(False, 409, "The stream head moved: the expected offset did not match."),
    "slow_consumer": ErrorInfo(True, 503, "The connection could not keep up with its subscriptions; reconnect and resume."),
    "timeout": ErrorInfo(True, 504, "The operation did not finish in time."),
    "idle_timeout": ErrorInfo(True, 408, "No frame arrived within the idle timeout; the session was closed (reconnect and resume)."),
    "shutdown": ErrorInfo(True, 503, "The server is shutting down; reconnect to another or later."),
    "backend_unavailable": ErrorInfo(True, 503, "The storage backend failed; the command may be retried with the same key."),
    "internal": ErrorInfo(True, 500, "The handler raised an unexpected exception; nothing was stored for its key."),
    # Raised by rtcore.client on the caller's side, never sent by a server:
    "disconnected": ErrorInfo(True, 503, "Client side: the connection is gone and reconnecting gave up (max_attempts)."),
    "client_closed": ErrorInfo(False, 503, "Client side: the application closed the client; the request was not sent or not answered."),
}


def error_info(code: str) -> ErrorInfo:
    """Return the documented facts for ``code`` (application codes get the defaults).

    Args:
        code: An error code.

    Returns:
        The :class:`ErrorInfo` of a built-in code, or a non-retryable HTTP 400
        entry for an application-defined code.
    """
    return ERROR_CODES.get(code, ErrorInfo(False, 400, "Application-defined error."))


#: Extra HTTP response headers an error asks for, as (lower-case name, value).
Headers = tuple[tuple[bytes, bytes], ...]


class RtcoreError(Exception):
    """Base of every error rtcore raises on purpose; owns the code ``internal``.

    Attributes:
        code: Stable snake_case error code sent to clients.
        message: Human-readable explanation (safe to show to the client).
        retryable: Whether the same request may succeed if sent again.
        http_status: The HTTP status used for this error over HTTP.
        headers: Extra HTTP response headers sent with this error over HTTP
            (``Allow`` for a 405, ``Upgrade`` for a 426); empty otherwise.
    """

    default_code: str = "internal"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        retryable: bool | None = None,
        http_status: int | None = None,
        headers: Headers = (),
    ) -> None:
        self.code: str = code or self.default_code
        info = error_info(self.code)
        self.message: str = message or info.description
        self.retryable: bool = info.retryable if retryable is None else retryable
        self.http_status: int = info.http_status if http_status is None else http_status
        self.headers: Headers = tuple(headers)
        super().__init__(f"{self.code}: {self.message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling (multiprocessing, pytest-xdist) must keep the class and every
        # field, including a subclass's own (BadFrame.field, ConnectionClosed.close_code).
        return (_rebuild, (type(self), self.message, self.code, self.retryable, self.http_status), self.__dict__)


def _rebuild(
    cls: type[RtcoreError], message: str, code: str, retryable: bool | None, http_status: int | None
) -> RtcoreError:
    # Subclasses have their own __init__ signatures (Rejected takes the code
    # first, ConnectionClosed the close code): bypass them and set the common
    # fields; the class attributes below give the subclass fields their defaults.
    err = cls.__new__(cls)
    RtcoreError.__init__(err, message, code=code, retryable=retryable, http_status=http_status)
    return err


class ProtocolError(RtcoreError):
    """The peer broke the wire protocol (a frame out of place, an unknown version).

    Owns ``protocol_violation`` and ``unsupported_version``; its subclass
    :class:`BadFrame` owns ``bad_frame``. The client library, not the
    application, has to be fixed.
    """

    default_code = "protocol_violation"


class BadFrame(ProtocolError):
    """A frame that could not be decoded (code ``bad_frame``).

    Attributes:
        field: The JSON path of the offending field (``$.stream``), or ``None``
            when the frame as a whole is unreadable (or the error came over
            the wire, which does not carry the path apart from the message).
        request_id: The frame's ``id`` when it could still be read, so the
            error can be answered to the right request.
    """

    default_code = "bad_frame"
    field: str | None = None
    request_id: int | None = None

    def __init__(self, message: str, *, field: str | None = None, request_id: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.request_id = request_id


class BadRequest(RtcoreError):
    """The request itself is wrong: fix the call, sending it again cannot help.

    Owns ``bad_request``, ``bad_args``, ``bad_stream``, ``unknown_command``,
    ``not_found``, ``method_not_allowed``, ``already_subscribed`` and
    ``not_subscribed``. The message names the field or the value at fault.
    """

    default_code = "bad_request"


class Rejected(RtcoreError):
    """Raise from a command handler to refuse the command with a stable code.

    A rejection is a final answer: it is stored under the command's idempotency
    key and replayed to retries, unless ``retryable=True``. Use your own codes:
    the built-in ones of :data:`ERROR_CODES` belong to the other classes.

    Example::

        raise rtcore.Rejected("insufficient_funds", "balance is 3, bet is 5")
    """

    default_code = "rejected"

    def __init__(self, code: str, message: str = "", *, retryable: bool = False, http_status: int | None = None) -> None:
        super().__init__(message or code.replace("_", " "), code=code, retryable=retryable, http_status=http_status)


class AuthError(RtcoreError):
    """Authentication or authorization failed.

    Owns ``unauthenticated``, ``token_expired`` (retryable: send a fresh token),
    ``forbidden``, and the JWT refusals of :func:`rtcore.auth.jwt`:
    ``token_not_yet_valid``, ``token_wrong_audience``, ``token_wrong_issuer``,
    ``token_bad_signature``, ``token_bad_algorithm`` and ``token_malformed``.
    """

    default_code = "unauthenticated"


class LimitExceeded(RtcoreError):
    """A per-connection or per-request limit was reached.

    Owns ``rate_limited`` and ``too_many_inflight`` (retryable: slow down),
    ``too_many_subscriptions``, ``message_too_big`` and ``slow_consumer`` (the
    connection's send queue overflowed; reconnect and resume).
    """

    default_code = "rate_limited"


class IdempotencyError(RtcoreError):
    """An idempotency key cannot be used for this request.

    Owns ``idempotency_key_reused`` (other command or arguments under the same
    key) and ``idempotency_in_progress`` (retryable: the first is still running).
    A malformed key is a :class:`BadRequest` (``bad_args``).
    """

    default_code = "idempotency_key_reused"


class ConflictError(RtcoreError):
    """Optimistic concurrency failed: the stream head is not what ``expect`` said (``conflict``)."""

    default_code = "conflict"


class Unavailable(RtcoreError):
    """The server cannot answer now; retry later (with the same idempotency key).

    Owns ``timeout``, ``idle_timeout`` and ``shutdown``; its subclass
    :class:`BackendError` owns ``backend_unavailable``.
    """

    default_code = "shutdown"


class BackendError(Unavailable):
    """A storage engine failed; the operation may be retried (``backend_unavailable``)."""

    default_code = "backend_unavailable"


class ConnectionClosed(RtcoreError):
    """A WebSocket connection is closed or died (raised by transports and clients).

    Owns ``disconnected`` (the default: the connection is gone) and
    ``client_closed`` (the application closed its client).

    Attributes:
        close_code: The WebSocket close code: the peer's (1000, 1001, ...), ours
            when we closed first (1009 too big, 1011 ping timeout, ...), or 1006
            when the TCP connection was lost without a close frame (also when
            the error was rebuilt from a code, which carries no close code).
        reason: The close reason text (may be empty).
    """

    default_code = "disconnected"
    close_code: int = 1006
    reason: str = ""

    def __init__(self, close_code: int, reason: str = "", *, code: str | None = None) -> None:
        super().__init__(f"connection closed with code {close_code}" + (f": {reason}" if reason else ""), code=code)
        self.close_code = close_code
        self.reason = reason


#: The owner of every built-in code: the server raises the code with this
#: class, and a client turns an ``err`` frame into an instance of it, so
#: callers catch ``rtcore.IdempotencyError`` instead of comparing strings.
#: Codes not listed (application codes) belong to :class:`Rejected`.
_CODE_CLASSES: Final[dict[str, type[RtcoreError]]] = {
    "internal": RtcoreError,
    "bad_frame": BadFrame,
    "unsupported_version": ProtocolError,
    "protocol_violation": ProtocolError,
    "bad_request": BadRequest,
    "bad_args": BadRequest,
    "bad_stream": BadRequest,
    "unknown_command": BadRequest,
    "not_found": BadRequest,
    "method_not_allowed": BadRequest,
    "already_subscribed": BadRequest,
    "not_subscribed": BadRequest,
    "unauthenticated": AuthError,
    "token_expired": AuthError,
    "token_not_yet_valid": AuthError,
    "token_wrong_audience": AuthError,
    "token_wrong_issuer": AuthError,
    "token_bad_signature": AuthError,
    "token_bad_algorithm": AuthError,
    "token_malformed": AuthError,
    "forbidden": AuthError,
    "too_many_subscriptions": LimitExceeded,
    "too_many_inflight": LimitExceeded,
    "rate_limited": LimitExceeded,
    "message_too_big": LimitExceeded,
    "slow_consumer": LimitExceeded,
    "idempotency_key_reused": IdempotencyError,
    "idempotency_in_progress": IdempotencyError,
    "conflict": ConflictError,
    "timeout": Unavailable,
    "idle_timeout": Unavailable,
    "shutdown": Unavailable,
    "backend_unavailable": BackendError,
    "disconnected": ConnectionClosed,
    "client_closed": ConnectionClosed,
}


def error_class(code: str) -> type[RtcoreError]:
    """The exception class that owns ``code``.

    Args:
        code: An error code (built-in or application-defined).

    Returns:
        The owner from the table above for a built-in code, :class:`Rejected`
        for any other (application) code.
    """
    return _CODE_CLASSES.get(code, Rejected)


def error_from_wire(code: str, message: str, retryable: bool | None = None, http_status: int | None = None) -> RtcoreError:
    """Rebuild the exception a server sent as an ``err`` frame or HTTP error body.

    Args:
        code: The ``code`` field.
        message: The ``message`` field.
        retryable: The ``retryable`` field (``None``: the code's default).
        http_status: The HTTP status, when the error came over HTTP
            (``None``: the code's default).

    Returns:
        An instance of :func:`error_class` ``(code)`` carrying every field;
        fields the wire does not carry (``BadFrame.field``,
        ``ConnectionClosed.close_code``) keep their class defaults.
    """
    return _rebuild(error_class(code), message, code, retryable, http_status)

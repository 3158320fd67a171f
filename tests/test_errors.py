"""The error tree: one owner class per code, on the server and on the client.

* every code of :data:`rtcore.errors.ERROR_CODES` has an owner class, and
  :func:`rtcore.errors.error_from_wire` rebuilds that class with every field;
* a static check (:mod:`ast`) over src/rtcore: no module builds a built-in code
  with a class other than its owner (``RtcoreError(code="rate_limited")``,
  ``IdempotencyError(code="bad_args")``), nor a bare ``RtcoreError`` from a code
  read at run time (that is :func:`~rtcore.errors.error_from_wire`'s job);
* round trips: a server-side raise → :class:`~rtcore.engine.node.Reply` /
  ``err`` frame (JSON and MessagePack) → :func:`error_from_wire` gives back the
  same class, code and retry flag; driven through the real raise sites too
  (session limits, idempotency, stream names, dispatch, the HTTP head parser);
* docs/protocol.md's error table names the owner class of each code.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

import rtcore
from rtcore import errors
from rtcore.engine.node import Node, Reply
from rtcore.errors import (
    ERROR_CODES,
    AuthError,
    BackendError,
    BadFrame,
    BadRequest,
    ConflictError,
    ConnectionClosed,
    IdempotencyError,
    LimitExceeded,
    ProtocolError,
    Rejected,
    RtcoreError,
    Unavailable,
    error_class,
    error_from_wire,
)
from rtcore.protocol.codec import Codec, codec_for
from rtcore.protocol.frames import Cmd, Err, Hello, Limits, Sub
from rtcore.protocol.idempotency import check_key, decide, fingerprint
from rtcore.protocol.session import DoAuthenticate, Send, Session
from rtcore.protocol.streams import check_stream
from rtcore.protocol.types import IdempotencyRecord, Outcome
from rtcore.transport.config import ServerLimits, WebSocketPolicy
from rtcore.transport.handshake import negotiate
from rtcore.transport.head import HeadScanner
from rtcore.transport.http import render_error

PACKAGE_DIR = Path(rtcore.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
CODECS = [codec_for("json"), codec_for("msgpack")]

#: The owner of each built-in code, written out here on purpose (not read from
#: ``rtcore.errors._CODE_CLASSES``): moving a code to another class is an API
#: change that must show up in this test, in docs/protocol.md and in the
#: CHANGELOG, not slip through a one-line edit of the table.
OWNERS: dict[str, type[RtcoreError]] = {
    "internal": RtcoreError,
    "bad_frame": BadFrame,
    "protocol_violation": ProtocolError,
    "unsupported_version": ProtocolError,
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
    "rate_limited": LimitExceeded,
    "too_many_inflight": LimitExceeded,
    "too_many_subscriptions": LimitExceeded,
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


# --- owners -----------------------------------------------------------------------


def test_every_code_has_its_owner() -> None:
    """Mutation: add a code to ERROR_CODES without an owner (it would fall to
    ``Rejected``), or map ``idempotency_key_reused`` to ``RtcoreError`` in
    ``_CODE_CLASSES`` → fails."""
    assert set(OWNERS) == set(ERROR_CODES)
    for code in ERROR_CODES:
        assert error_class(code) is OWNERS[code], code


def test_application_codes_belong_to_rejected() -> None:
    """Mutation: make ``error_class`` return ``RtcoreError`` for unknown codes → fails."""
    assert error_class("insufficient_funds") is Rejected
    err = error_from_wire("insufficient_funds", "balance is 3", False, 422)
    assert type(err) is Rejected
    assert (err.code, err.message, err.retryable, err.http_status) == ("insufficient_funds", "balance is 3", False, 422)


def test_each_owner_defaults_to_one_of_its_own_codes() -> None:
    """``raise LimitExceeded("...")`` must not send a code another class owns.

    Mutation: set ``Unavailable.default_code = "backend_unavailable"`` → fails.
    """
    for cls in {*OWNERS.values()}:
        assert OWNERS[cls.default_code] is cls, cls


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_error_from_wire_builds_the_owner_with_every_field(code: str) -> None:
    """Mutation: let ``error_from_wire`` drop ``retryable`` or ``http_status``
    (use the code's defaults), or build ``RtcoreError`` → fails."""
    info = ERROR_CODES[code]
    err = error_from_wire(code, "the message", not info.retryable, 599)
    assert type(err) is OWNERS[code]
    assert (err.code, err.message, err.retryable, err.http_status, err.headers) == (
        code,
        "the message",
        not info.retryable,
        599,
        (),
    )
    defaulted = error_from_wire(code, "")
    assert (defaulted.retryable, defaulted.http_status, defaulted.message) == (
        info.retryable,
        info.http_status,
        info.description,
    )
    # The class's own fields exist too (the wire does not carry them).
    if isinstance(err, BadFrame):
        assert (err.field, err.request_id) == (None, None)
    if isinstance(err, ConnectionClosed):
        assert (err.close_code, err.reason) == (1006, "")


@pytest.mark.parametrize(
    "exc",
    [
        BadFrame("bad stream", field="$.stream", request_id=7),
        ConnectionClosed(1009, "too big"),
        ConnectionClosed(1000, code="client_closed"),
        Rejected("insufficient_funds", "no", http_status=422),
        BadRequest("allow", code="method_not_allowed", headers=((b"allow", b"GET"),)),
        IdempotencyError("running", code="idempotency_in_progress"),
    ],
    ids=repr,
)
def test_pickle_keeps_class_and_every_field(exc: RtcoreError) -> None:
    """Errors cross process boundaries (multiprocessing, pytest-xdist).

    Mutation: return ``__reduce__`` without ``self.__dict__`` → ``BadFrame.field``
    and ``ConnectionClosed.close_code`` are lost → fails.
    """
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert vars(clone) == vars(exc)


def test_transport_connection_closed_is_the_tree_class() -> None:
    """Mutation: define a second ``ConnectionClosed`` in rtcore.transport.errors → fails."""
    from rtcore.server import gateway
    from rtcore.transport import errors as transport_errors

    assert transport_errors.ConnectionClosed is ConnectionClosed
    assert gateway.ConnectionClosed is ConnectionClosed
    assert rtcore.ConnectionClosed is ConnectionClosed
    assert issubclass(ConnectionClosed, RtcoreError)


# --- static check: every code built with its owner ----------------------------------

_TREE: dict[str, type[RtcoreError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, RtcoreError)
}


def _called_class(call: ast.Call) -> str | None:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name if name in _TREE else None


def violations(source: str) -> list[str]:
    """Every place in ``source`` that builds a built-in code with the wrong class.

    * ``Cls(..., code="c")`` where ``c`` is a built-in code owned by another
      class (``RtcoreError(code="rate_limited")``, ``IdempotencyError(code="bad_args")``);
    * ``RtcoreError(..., code=<expression>)``: a code known only at run time
      must be rebuilt with :func:`error_from_wire`, which picks the owner;
    * ``Rejected("c", ...)`` with a built-in code ``c``.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or (name := _called_class(node)) is None:
            continue
        where = f"line {node.lineno}: {ast.unparse(node)[:100]}"
        if name == "Rejected" or issubclass(_TREE[name], Rejected):
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "code"), None)
            if isinstance(first, ast.Constant) and first.value in ERROR_CODES:
                found.append(f"{where} (built-in code {first.value!r} belongs to {error_class(first.value).__name__})")
            continue
        code = next((k.value for k in node.keywords if k.arg == "code"), None)
        if code is None:
            continue
        if isinstance(code, ast.Constant) and isinstance(code.value, str):
            owner = error_class(code.value)
            if code.value in ERROR_CODES and owner is not _TREE[name]:
                found.append(f"{where} (code {code.value!r} belongs to {owner.__name__})")
        elif name == "RtcoreError":
            found.append(f"{where} (a run-time code: use error_from_wire)")
    return found


@pytest.mark.parametrize(
    "source",
    [
        'raise RtcoreError("slow down", code="rate_limited")',
        'raise IdempotencyError("key", code="bad_args")',
        'raise errors.RtcoreError("x", code="not_subscribed")',
        'exc = ProtocolError("x", code="bad_frame")',
        'raise BackendError("x", code="shutdown")',
        'raise AuthError("x", code="conflict")',
        'raise Rejected("conflict", "stream moved")',
        "raise RtcoreError(frame.message, code=frame.code, retryable=frame.retryable)",
        'return [_err(rid, RtcoreError(f"at most {n}", code="too_many_subscriptions"))]',
    ],
)
def test_checker_catches_a_planted_violation(source: str) -> None:
    """The checker itself: each planted line must be reported."""
    assert violations(source), source


def test_checker_accepts_owners() -> None:
    source = "\n".join(
        [
            'raise LimitExceeded("slow down", code="rate_limited")',
            'raise BadRequest("key", code="bad_args")',
            'raise RtcoreError("bug", code="internal")',
            'raise Unavailable("bye", code="shutdown")',
            'raise BackendError("db down")',
            'raise Rejected("insufficient_funds")',
            "raise error_from_wire(frame.code, frame.message, frame.retryable)",
            "raise ConnectionClosed(1006, 'lost')",
            "RtcoreError.__init__(err, message, code=code)",
        ]
    )
    assert violations(source) == []


_MODULES = sorted(str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*.py"))


@pytest.mark.parametrize(
    "module",
    _MODULES,
)
def test_every_code_is_built_by_its_owner(module: str) -> None:
    """Mutation: put back ``IdempotencyError(..., code="bad_args")`` in
    protocol/idempotency.py, or ``RtcoreError(..., code="rate_limited")`` in
    protocol/session.py → the test for that module fails."""
    assert violations((PACKAGE_DIR / module).read_text(encoding="utf-8")) == []


def test_the_scan_covers_the_raise_sites() -> None:
    """Guard against an empty or wrong module list (the check would pass vacuously)."""
    assert {"protocol/session.py", "protocol/idempotency.py", "engine/node.py", "transport/http.py"} <= set(_MODULES)


# --- round trips ----------------------------------------------------------------------


def _server_raise(code: str) -> RtcoreError:
    """Raise ``code`` as server code does: with the owner class named in OWNERS."""
    cls = OWNERS[code]
    try:
        if cls is BadFrame:
            raise BadFrame("frame is not a map", field="$", request_id=3)
        if cls is ConnectionClosed:
            raise ConnectionClosed(1006, "lost", code=code)
        raise cls(f"{code} happened", code=code)
    except RtcoreError as exc:
        return exc


def _over_the_wire(reply: Reply, codec: Codec) -> RtcoreError:
    """What a client does with an ``err`` frame: decode it and rebuild the error."""
    frame = codec.decode_server(codec.encode(Err(7, reply.code, reply.message, reply.retryable)))
    assert isinstance(frame, Err)
    return error_from_wire(frame.code, frame.message, frame.retryable)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.encoding)
@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_round_trip_server_raise_reply_frame_client(code: str, codec: Codec) -> None:
    """Mutation: let ``Reply.error`` drop ``retryable``, or ``error_from_wire``
    build ``RtcoreError``, or map a code to another class in ``_CODE_CLASSES``
    → fails."""
    raised = _server_raise(code)
    reply = Reply.error(raised)
    assert (reply.ok, reply.code, reply.retryable, reply.http_status) == (
        False,
        code,
        ERROR_CODES[code].retryable,
        ERROR_CODES[code].http_status,
    )
    for rebuilt in (_over_the_wire(reply, codec), reply.exception()):
        assert type(rebuilt) is type(raised)
        assert (rebuilt.code, rebuilt.message, rebuilt.retryable) == (raised.code, raised.message, raised.retryable)


@pytest.mark.parametrize(
    ("code", "cls"),
    [("conflict", ConflictError), ("bad_args", BadRequest), ("insufficient_funds", Rejected), (None, RtcoreError)],
)
def test_replayed_outcome_is_rebuilt_as_the_owner(code: str | None, cls: type[RtcoreError]) -> None:
    """A stored failure replayed to a retry keeps its class and status (final: not retryable).

    Mutation: let ``Reply.from_outcome`` drop the stored ``http_status`` or mark
    the replay retryable, or map ``conflict`` to ``RtcoreError`` → fails. (Building
    a bare ``RtcoreError`` there again is caught by the static check above.)
    """
    reply = Reply.from_outcome(Outcome(ok=False, code=code, message="stored", http_status=418), replayed=True)
    err = reply.exception()
    assert type(err) is cls
    assert (reply.replayed, err.code, err.message, err.retryable, err.http_status) == (
        True,
        code or "internal",
        "stored",
        False,
        418,
    )
    with pytest.raises(ValueError, match="successful"):
        Reply(True, 1).exception()


# --- the real raise sites ----------------------------------------------------------------


def _open(limits: Limits) -> Session:
    codec = codec_for("json")
    s = Session("s-1", codec, limits, 0.0, heartbeat=15.0)
    assert s.receive_data(codec.encode(Hello(token="t")), 0.0) == [DoAuthenticate("t")]
    s.authenticated({"user": "a"}, "a", None, 0.0)
    return s


def _errs(s: Session, frames: list[Any]) -> list[RtcoreError]:
    out: list[RtcoreError] = []
    for frame in frames:
        for action in s.receive_data(s.codec.encode(frame), 0.0):
            if isinstance(action, Send) and isinstance(action.frame, Err):
                out.append(error_from_wire(action.frame.code, action.frame.message, action.frame.retryable))
    return out


def test_session_limits_arrive_as_limit_exceeded() -> None:
    """Mutation: raise ``too_many_subscriptions``/``too_many_inflight``/``rate_limited``
    with ``RtcoreError`` in session.py and map them to ``RtcoreError`` → fails."""
    subs = _errs(_open(Limits(max_subscriptions=1)), [Sub(1, "room:a"), Sub(2, "room:b")])
    inflight = _errs(_open(Limits(max_inflight=1)), [Cmd(1, "x"), Cmd(2, "x")])
    rate = _errs(_open(Limits(max_inflight=100, command_rate=0.001, command_burst=1)), [Cmd(1, "x"), Cmd(2, "x")])
    dup = _errs(_open(Limits()), [Sub(1, "room:a"), Sub(2, "room:a")])
    for errs, code in [(subs, "too_many_subscriptions"), (inflight, "too_many_inflight"), (rate, "rate_limited")]:
        assert [(type(e), e.code) for e in errs] == [(LimitExceeded, code)]
    assert [(type(e), e.code) for e in dup] == [(BadRequest, "already_subscribed")]


def test_session_protocol_errors_arrive_as_protocol_error() -> None:
    """Mutation: build ``unsupported_version`` with ``RtcoreError`` → fails."""
    codec = codec_for("json")
    wrong_first = _errs(Session("s", codec, Limits(), 0.0, heartbeat=15.0), [Sub(1, "room:a")])
    version = _errs(Session("s", codec, Limits(), 0.0, heartbeat=15.0), [Hello(v=99)])
    garbage = Session("s", codec, Limits(), 0.0, heartbeat=15.0).receive_data(b"[1]", 0.0)
    assert [(type(e), e.code) for e in wrong_first] == [(ProtocolError, "protocol_violation")]
    assert [(type(e), e.code) for e in version] == [(ProtocolError, "unsupported_version")]
    frame = next(a.frame for a in garbage if isinstance(a, Send) and isinstance(a.frame, Err))
    assert type(error_from_wire(frame.code, frame.message)) is BadFrame


def test_idempotency_and_stream_checks_raise_their_owners() -> None:
    """Mutation: ``check_key`` raising ``IdempotencyError(code="bad_args")`` again → fails."""
    with pytest.raises(BadRequest) as bad_key:
        check_key("")
    assert bad_key.value.code == "bad_args"
    fp = fingerprint("x", 1)
    with pytest.raises(IdempotencyError) as reused:
        decide(IdempotencyRecord(fingerprint("other", 2), "done", 1.0, Outcome(True)), fp)
    assert reused.value.code == "idempotency_key_reused"
    with pytest.raises(IdempotencyError) as running:
        decide(IdempotencyRecord(fp, "pending", 1.0), fp)
    assert (running.value.code, running.value.retryable) == ("idempotency_in_progress", True)
    with pytest.raises(BadRequest) as stream:
        check_stream("no-colon")
    assert stream.value.code == "bad_stream"


def test_http_refusals_carry_status_and_headers() -> None:
    """Mutation: drop ``error.headers`` from ``render_error`` (the 405 loses
    ``Allow``), or raise an HTTP head limit as ``BadRequest`` → fails."""
    with pytest.raises(BadRequest) as info:
        negotiate(b"POST", b"1.1", [], WebSocketPolicy(), ServerLimits())
    err = info.value
    assert (err.code, err.http_status, err.headers) == ("method_not_allowed", 405, ((b"allow", b"GET"),))
    raw = render_error(err)
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nallow: GET\r\n" in raw
    assert msgspec.json.decode(raw.split(b"\r\n\r\n", 1)[1])["code"] == "method_not_allowed"
    with pytest.raises(LimitExceeded) as big:
        HeadScanner(ServerLimits()).scan(bytearray(b"GET /" + b"a" * 9000))
    assert (big.value.code, big.value.http_status) == ("message_too_big", 414)


@pytest.mark.anyio
async def test_dispatch_errors_arrive_as_their_owners() -> None:
    """Through Node.dispatch (the path WebSocket and HTTP commands share).

    Mutation: raise ``unknown_command``/``bad_args`` with ``RtcoreError`` and map
    them to it, or map ``idempotency_key_reused`` to ``RtcoreError`` → fails.
    """
    app = rtcore.App()

    @app.command("echo")
    async def echo(ctx: rtcore.Context, args: int) -> int:
        return args

    @app.command("refuse")
    async def refuse(ctx: rtcore.Context, args: None) -> None:
        raise Rejected("insufficient_funds", "no")

    @app.command("crash")
    async def crash(ctx: rtcore.Context, args: None) -> None:
        raise ZeroDivisionError

    async with Node(app, "memory://") as node:
        assert (await node.dispatch(None, "echo", b"1", key="k")).ok
        cases = [
            (await node.dispatch(None, "nope", b"null"), BadRequest, "unknown_command"),
            (await node.dispatch(None, "echo", b'"x"'), BadRequest, "bad_args"),
            (await node.dispatch(None, "echo", b"2", key="k"), IdempotencyError, "idempotency_key_reused"),
            (await node.dispatch(None, "echo", b"1", key=""), BadRequest, "bad_args"),
            (await node.dispatch(None, "refuse", b"null"), Rejected, "insufficient_funds"),
            (await node.dispatch(None, "crash", b"null"), RtcoreError, "internal"),
        ]
    for reply, cls, code in cases:
        for err in (reply.exception(), *(_over_the_wire(reply, c) for c in CODECS)):
            assert (type(err), err.code, err.retryable) == (cls, code, reply.retryable), reply


# --- docs ------------------------------------------------------------------------------

_ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|\s*(?:yes|no)\s*\|\s*\d{3}\s*\|\s*`([A-Za-z]+)`\s*\|", re.MULTILINE)


def test_protocol_doc_names_the_owner_of_each_code() -> None:
    """Mutation: write ``RtcoreError`` for ``rate_limited`` in docs/protocol.md's
    error table, or move a code to another class in errors.py only → fails."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 12. Error codes") : text.index("## 13.")]
    rows = dict(_ROW.findall(section))
    assert rows == {code: cls.__name__ for code, cls in OWNERS.items()}


@pytest.mark.anyio
async def test_an_error_after_the_response_head_is_not_answered_twice() -> None:
    """The HTTP loop answers an escaping ``RtcoreError`` with an error response,
    but only while nothing of the current response went out: a streaming body
    (SSE) that fails half-way must end the connection, not get a second status
    line glued into its chunked body.

    Mutation: in ``HttpConnection._pump`` iterate the chunks outside the task
    group (so the error escapes bare, not in an exception group) and drop the
    ``self._committed`` check in ``HttpConnection.run`` → fails.
    """
    from collections.abc import AsyncIterator
    from functools import partial

    import anyio.to_thread

    from rtcore.transport import HttpRequest, HttpResponse, StreamingResponse

    from .server.helpers import Recorder, echo_handler, raw_exchange, running_server, split_response

    async def failing() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        raise BackendError("the log went away")

    async def on_http(request: HttpRequest) -> HttpResponse | StreamingResponse:
        return StreamingResponse(200, [(b"content-type", b"text/event-stream")], failing())

    async with running_server(echo_handler(Recorder()), on_http) as srv:
        raw = await anyio.to_thread.run_sync(
            partial(raw_exchange, srv.port, b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
        )
    status, _, body = split_response(raw)
    assert status == 200
    assert b"data: one" in body
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert b"backend_unavailable" not in raw

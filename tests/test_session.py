"""The per-connection session state machine (rtcore.protocol.session), rule by rule."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rtcore.errors import ERROR_CODES, AuthError, RtcoreError
from rtcore.protocol.codec import Codec, codec_for
from rtcore.protocol.frames import (
    Ack,
    Auth,
    Bye,
    Cmd,
    Err,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    Position,
    Sub,
    Subbed,
    Unsub,
    Welcome,
)
from rtcore.protocol.session import (
    Action,
    Close,
    DoAck,
    DoAuthenticate,
    DoCommand,
    DoSubscribe,
    DoUnsubscribe,
    Send,
    Session,
    SessionState,
    TokenBucket,
)
from rtcore.testing.strategies import client_frames, frame_like_values, request_ids

JSON = codec_for("json")
LIMITS = Limits(max_subscriptions=3, max_inflight=2, command_rate=1.0, command_burst=3, idle_timeout=30.0)
CLOSE_CODES = {1000, 1001, 1002, 1008, 1009, 4008}


def new_session(limits: Limits = LIMITS, now: float = 0.0, codec: Codec = JSON, **kw: Any) -> Session:
    return Session("s-1", codec, limits, now, heartbeat=15.0, **kw)


def send(s: Session, frame: Any, now: float = 0.0) -> list[Action]:
    return s.receive_data(s.codec.encode(frame), now)


def open_session(limits: Limits = LIMITS, now: float = 0.0, expires_at: float | None = None, **kw: Any) -> Session:
    s = new_session(limits, now, **kw)
    assert send(s, Hello(token="tok"), now) == [DoAuthenticate("tok")]
    actions = s.authenticated({"user": "alice"}, "alice", expires_at, now)
    assert actions == [Send(Welcome("s-1", 15.0, limits, "alice"))]
    assert s.state is SessionState.OPEN
    return s


def err_of(actions: list[Action]) -> tuple[int | None, str]:
    """The (id, code) of the single err frame in ``actions``."""
    errs = [a.frame for a in actions if isinstance(a, Send) and isinstance(a.frame, Err)]
    assert len(errs) == 1, actions
    return errs[0].id, errs[0].code


def assert_pong(s: Session, rid: int = 999, now: float = 0.0) -> None:
    assert send(s, Ping(rid), now) == [Send(Pong(rid))]


# --- rule 1: hello first, version, duplicate hello ---------------------------------------


def test_hello_starts_authentication() -> None:
    s = new_session()
    assert s.state is SessionState.AWAIT_HELLO
    assert send(s, Hello()) == [DoAuthenticate(None)]
    assert s.state is SessionState.AUTHENTICATING


@pytest.mark.parametrize("frame", [Ping(5), Sub(5, "room:1"), Cmd(5, "x"), Auth(5, "t"), Unsub(5, "a:b")], ids=repr)
def test_a_request_before_hello_is_a_violation_and_closes(frame: Any) -> None:
    s = new_session()
    actions = send(s, frame)
    assert err_of(actions) == (5, "protocol_violation")
    assert actions[-1] == Close(1002, "expected hello")
    assert s.state is SessionState.CLOSED
    assert send(s, Hello()) == []


def test_ack_before_hello_closes() -> None:
    s = new_session()
    actions = send(s, Ack("room:1", 3))
    assert err_of(actions) == (None, "protocol_violation")
    assert isinstance(actions[-1], Close) and actions[-1].code == 1002


@pytest.mark.parametrize("data", [b"garbage", b'{"t":"sub","id":4}', b"[]"], ids=repr)
def test_a_bad_first_frame_closes(data: bytes) -> None:
    s = new_session()
    actions = s.receive_data(data, 0.0)
    assert err_of(actions)[1] == "bad_frame"
    assert actions[-1] == Close(1002, "bad first frame")
    # Regression: the session used to stay in AWAIT_HELLO and accept a hello afterwards.
    assert s.state is SessionState.CLOSED
    assert send(s, Hello()) == []


def test_bad_first_frame_is_answered_to_its_id() -> None:
    s = new_session()
    assert err_of(s.receive_data(b'{"t":"sub","id":4}', 0.0)) == (4, "bad_frame")


@pytest.mark.parametrize("v", [0, 2, 99])
def test_unsupported_version(v: int) -> None:
    s = new_session()
    actions = send(s, Hello(v=v))
    assert err_of(actions) == (None, "unsupported_version")
    assert actions[-1] == Close(1002, "unsupported version")
    assert s.state is SessionState.CLOSED


def test_duplicate_hello_is_a_violation_but_the_session_stays_open() -> None:
    s = open_session()
    actions = send(s, Hello(token="other"))
    assert err_of(actions) == (None, "protocol_violation")
    assert len(actions) == 1
    assert s.state is SessionState.OPEN
    assert s.principal_id == "alice"
    assert_pong(s)


# --- rule 2: nothing but waiting while authenticating -----------------------------------


@pytest.mark.parametrize("frame", [Ping(7), Sub(7, "room:1"), Cmd(7, "x"), Auth(7, "t"), Hello()], ids=repr)
def test_frames_while_authenticating_are_violations(frame: Any) -> None:
    s = new_session()
    send(s, Hello())
    actions = send(s, frame)
    assert err_of(actions) == (getattr(frame, "id", None), "protocol_violation")
    assert len(actions) == 1  # no close
    assert s.state is SessionState.AUTHENTICATING
    assert s.authenticated(None, None, None, 0.0)[0] == Send(Welcome("s-1", 15.0, LIMITS, None))
    assert_pong(s, 7)


def test_bad_frame_while_authenticating_does_not_close() -> None:
    s = new_session()
    send(s, Hello())
    assert err_of(s.receive_data(b"{", 0.0)) == (None, "bad_frame")
    assert s.state is SessionState.AUTHENTICATING


def test_auth_failed_closes_with_1008() -> None:
    s = new_session()
    send(s, Hello(token="bad"))
    actions = s.auth_failed(AuthError("token refused"))
    assert actions == [Send(Err(None, "unauthenticated", "token refused", False)), Close(1008, "unauthenticated")]
    assert s.state is SessionState.CLOSED


# --- rule 3: bad frames ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "rid"),
    [
        (b'{"t":"sub","id":12,"stream":5}', 12),
        (b'{"t":"cmd","id":13}', 13),
        (b'{"t":"bogus","id":14}', 14),
        (b'{"t":"ping","id":"x"}', None),
        (b"\xff\xfe", None),
        ("not json", None),
    ],
    ids=repr,
)
def test_bad_frame_is_answered_with_its_id_and_the_session_carries_on(data: bytes | str, rid: int | None) -> None:
    s = open_session()
    actions = s.receive_data(data, 0.0)
    assert err_of(actions) == (rid, "bad_frame")
    assert len(actions) == 1
    assert s.state is SessionState.OPEN
    assert_pong(s)


def test_msgpack_session_rejects_text_messages() -> None:
    s = new_session(codec=codec_for("msgpack"))
    send(s, Hello())
    s.authenticated(None, None, None, 0.0)
    assert err_of(s.receive_data('{"t":"ping","id":1}', 0.0)) == (None, "bad_frame")
    assert_pong(s)


# --- rule 4: request ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    "reuse",
    [Sub(1, "room:9"), Cmd(1, "other"), Unsub(1, "room:1"), Auth(1, "t"), Ping(1)],
    ids=repr,
)
@pytest.mark.parametrize("first", [Sub(1, "room:1"), Cmd(1, "x"), Auth(1, "tok2")], ids=repr)
def test_request_id_reuse_while_pending_is_a_violation(first: Any, reuse: Any) -> None:
    s = open_session()
    actions = send(s, first)
    assert len(actions) == 1 and not isinstance(actions[0], Send)
    assert err_of(send(s, reuse)) == (1, "protocol_violation")
    assert s.state is SessionState.OPEN


def test_request_id_is_free_again_after_the_reply() -> None:
    s = open_session()
    send(s, Cmd(1, "x"))
    assert s.reply(1, Ok(1, "done")) == [Send(Ok(1, "done"))]
    assert send(s, Cmd(1, "x")) == [DoCommand(1, "x", msgspec.Raw(b"null"), None)]
    assert s.reply(1, Err(1, "nope", "no")) == [Send(Err(1, "nope", "no"))]
    assert_pong(s, 1)


def test_auth_refresh_frees_its_id() -> None:
    s = open_session()
    assert send(s, Auth(3, "tok2")) == [DoAuthenticate("tok2", refresh_id=3)]
    assert s.authenticated({"u": 1}, "alice", None, 0.0, refresh_id=3) == [Send(Ok(3, {"principal": "alice"}))]
    assert_pong(s, 3)


def test_reply_to_an_id_that_is_not_open_sends_nothing() -> None:
    # Regression: a second (or stray) reply used to be sent, breaking "one reply per id".
    s = open_session()
    assert s.reply(42, Ok(42)) == []
    send(s, Cmd(1, "x"))
    assert s.reply(1, Ok(1)) == [Send(Ok(1))]
    assert s.reply(1, Ok(1)) == []
    send(s, Auth(2, "t"))
    assert s.reply(2, Ok(2)) == []  # an auth is answered through authenticated()
    assert err_of(send(s, Ping(2))) == (2, "protocol_violation")


# --- rule 5: subscriptions --------------------------------------------------------------------


def test_subscribe_and_unsubscribe() -> None:
    s = open_session()
    since = Position("e1", 4)
    assert send(s, Sub(1, "room:1", since)) == [DoSubscribe(1, "room:1", since)]
    assert s.subscriptions == set()
    subbed = Subbed(1, "room:1", "e1", 9, True)
    assert s.reply(1, subbed) == [Send(subbed)]
    assert s.subscriptions == {"room:1"}
    assert send(s, Ack("room:1", 9)) == [DoAck("room:1", 9)]
    assert send(s, Unsub(2, "room:1")) == [DoUnsubscribe(2, "room:1"), Send(Ok(2))]
    assert s.subscriptions == set()


def test_answered_requests_leave_no_table_behind() -> None:
    """Once its sub and cmd are answered, an idle session's request maps are
    fresh empty dicts (a dict keeps its table after its last key is popped:
    ~0.3 kB per idle connection, thousands of them), and they still work.

    Mutation seen caught: ``reply`` not replacing ``_pending_subs`` with a
    new dict when it empties → its size stays above an empty dict's → fails.
    """
    import sys

    s = open_session()
    send(s, Sub(1, "room:1"))
    send(s, Cmd(2, "echo", None))
    s.reply(1, Subbed(1, "room:1", "e1", 0, False))
    s.reply(2, Ok(2))
    assert sys.getsizeof(s._pending) == sys.getsizeof(s._pending_subs) == sys.getsizeof({})
    assert s.subscriptions == {"room:1"}
    assert send(s, Sub(3, "room:2")) == [DoSubscribe(3, "room:2", None)]
    assert s.reply(3, Subbed(3, "room:2", "e1", 0, False)) == [Send(Subbed(3, "room:2", "e1", 0, False))]
    assert s.subscriptions == {"room:1", "room:2"}


def test_already_subscribed_while_pending_and_after() -> None:
    s = open_session()
    send(s, Sub(1, "room:1"))
    assert err_of(send(s, Sub(2, "room:1"))) == (2, "already_subscribed")
    s.reply(1, Subbed(1, "room:1", "e1", 0, False))
    assert err_of(send(s, Sub(3, "room:1"))) == (3, "already_subscribed")
    assert ERROR_CODES["already_subscribed"].retryable is False


def test_failed_subscription_is_not_subscribed() -> None:
    s = open_session()
    send(s, Sub(1, "room:1"))
    s.reply(1, Err(1, "forbidden", "no"))
    assert s.subscriptions == set()
    assert send(s, Sub(2, "room:1")) == [DoSubscribe(2, "room:1", None)]


def test_not_subscribed() -> None:
    s = open_session()
    assert err_of(send(s, Unsub(1, "room:1"))) == (1, "not_subscribed")
    assert err_of(send(s, Ack("room:1", 3))) == (None, "not_subscribed")
    send(s, Sub(2, "room:1"))  # still pending: not subscribed yet
    assert err_of(send(s, Unsub(3, "room:1"))) == (3, "not_subscribed")


def test_server_side_unsubscribe() -> None:
    s = open_session()
    send(s, Sub(1, "room:1"))
    s.reply(1, Subbed(1, "room:1", "e1", 0, False))
    s.unsubscribed("room:1")
    assert err_of(send(s, Unsub(2, "room:1"))) == (2, "not_subscribed")


def test_too_many_subscriptions_counts_pending_ones() -> None:
    s = open_session()  # max 3
    send(s, Sub(1, "room:1"))
    s.reply(1, Subbed(1, "room:1", "e1", 0, False))
    send(s, Sub(2, "room:2"))
    send(s, Sub(3, "room:3"))  # pending
    actions = send(s, Sub(4, "room:4"))
    assert err_of(actions) == (4, "too_many_subscriptions")
    send(s, Unsub(5, "room:1"))
    assert send(s, Sub(4, "room:4")) == [DoSubscribe(4, "room:4", None)]


@pytest.mark.parametrize("stream", ["room", "room:*", "a b:c", ""])
def test_bad_stream_name(stream: str) -> None:
    s = open_session()
    assert err_of(send(s, Sub(1, stream))) == (1, "bad_stream")
    assert send(s, Sub(1, "room:1")) == [DoSubscribe(1, "room:1", None)]  # the id was not taken


# --- rule 6: inflight and rate ---------------------------------------------------------------


def test_command_is_handed_to_the_driver() -> None:
    s = open_session()
    args = msgspec.Raw(b'{"x":1}')
    assert send(s, Cmd(1, "room.move", args, "k-1")) == [DoCommand(1, "room.move", args, "k-1")]


def test_too_many_inflight() -> None:
    s = open_session()  # max_inflight 2, burst 3
    send(s, Cmd(1, "x"))
    send(s, Cmd(2, "x"))
    actions = send(s, Cmd(3, "x"))
    assert err_of(actions) == (3, "too_many_inflight")
    assert actions[0].frame.retryable is True  # type: ignore[union-attr]
    s.reply(1, Ok(1))
    assert send(s, Cmd(3, "x")) == [DoCommand(3, "x", msgspec.Raw(b"null"), None)]


def test_rate_limited_by_the_token_bucket() -> None:
    s = open_session()  # 1 command/s, burst 3
    for i in range(3):
        assert isinstance(send(s, Cmd(i, "x"), 0.0)[0], DoCommand)
        s.reply(i, Ok(i))
    actions = send(s, Cmd(10, "x"), 0.5)
    assert err_of(actions) == (10, "rate_limited")
    assert actions[0].frame.retryable is True  # type: ignore[union-attr]
    assert isinstance(send(s, Cmd(10, "x"), 1.0)[0], DoCommand)  # one token back
    s.reply(10, Ok(10))
    assert err_of(send(s, Cmd(11, "x"), 1.0)) == (11, "rate_limited")
    # A long pause refills to the burst, not beyond.
    for i in range(3):
        assert isinstance(send(s, Cmd(20 + i, "x"), 100.0)[0], DoCommand)
        s.reply(20 + i, Ok(20 + i))
    assert err_of(send(s, Cmd(30, "x"), 100.0)) == (30, "rate_limited")


def test_token_bucket() -> None:
    b = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert b.take(0.5)  # 2/s: one token after 0.5 s
    assert not b.take(0.5)
    assert b.take(10.0) and b.take(10.0) and not b.take(10.0)


def test_token_bucket_survives_a_clock_stepping_back() -> None:
    # Regression: now - last < 0 used to drain the bucket far below zero.
    b = TokenBucket(rate=1.0, burst=2, now=1000.0)
    assert b.take(1000.0)
    assert b.take(0.0)  # the clock jumped back 1000 s: the last token is still there
    assert not b.take(0.0)
    assert b.take(1.0)


# --- rule 7: idle ------------------------------------------------------------------------------


def test_idle_timeout_closes_with_1001() -> None:
    s = open_session(now=0.0)  # idle_timeout 30
    assert s.next_deadline() == 30.0
    assert s.tick(29.9) == []
    assert_pong(s, now=20.0)  # activity moves the deadline
    assert s.next_deadline() == 50.0
    assert s.tick(49.0) == []
    actions = s.tick(50.0)
    assert actions[0] == Send(Bye("idle_timeout", "no frame for 30 s", True))
    assert actions[1] == Close(1001, "idle_timeout")
    assert s.state is SessionState.CLOSED
    assert s.tick(100.0) == []
    assert send(s, Ping(1), 100.0) == []


def test_bad_frames_count_as_activity() -> None:
    s = open_session(now=0.0)
    s.receive_data(b"junk", 25.0)
    assert s.tick(50.0) == []


def test_idle_before_hello() -> None:
    s = new_session(now=0.0)
    actions = s.tick(30.0)
    assert isinstance(actions[-1], Close) and actions[-1].code == 1001


def test_close_is_idempotent() -> None:
    s = open_session()
    actions = s.close("shutdown", "bye", reconnect=True, code=1001)
    assert actions == [Send(Bye("shutdown", "bye", True)), Close(1001, "shutdown")]
    assert s.close("shutdown", "bye", reconnect=True) == []
    assert s.tick(1000.0) == []


def test_a_late_driver_answer_does_not_reopen_a_closed_session() -> None:
    # Regression: authenticated() after the session closed (idle, shutdown) used
    # to set OPEN again and send welcome after the close.
    s = new_session(now=0.0)
    send(s, Hello(token="t"))
    s.tick(30.0)
    assert s.state is SessionState.CLOSED
    assert s.authenticated({"u": 1}, "alice", None, 31.0) == []
    assert s.state is SessionState.CLOSED
    assert s.auth_failed(AuthError()) == []


def test_replies_after_close_are_dropped_but_accounted() -> None:
    s = open_session()
    send(s, Cmd(1, "x"))
    send(s, Sub(2, "room:1"))
    s.close("shutdown", "bye", reconnect=True)
    assert s.reply(1, Ok(1)) == []
    assert s.reply(2, Subbed(2, "room:1", "e1", 0, False)) == []


# --- rule 8: token expiry ----------------------------------------------------------------------


def test_token_expiry_warns_then_closes_after_grace() -> None:
    s = open_session(now=0.0, expires_at=20.0, token_grace=5.0, limits=Limits(idle_timeout=1000.0))
    assert s.next_deadline() == 20.0
    assert s.tick(19.9) == []
    actions = s.tick(20.0)
    assert len(actions) == 1
    assert err_of(actions) == (None, "token_expired")
    assert actions[0].frame.retryable is True  # type: ignore[union-attr]
    assert s.next_deadline() == 25.0
    assert s.tick(24.0) == []  # warned once only
    assert_pong(s, now=24.0)  # the session still works during the grace period
    actions = s.tick(25.0)
    assert actions == [
        Send(Bye("token_expired", "token expired and was not refreshed", False)),
        Close(1008, "token_expired"),
    ]
    assert s.state is SessionState.CLOSED


def test_auth_frame_refreshes_an_expired_token() -> None:
    s = open_session(now=0.0, expires_at=20.0, token_grace=5.0, limits=Limits(idle_timeout=1000.0))
    s.tick(20.0)
    assert send(s, Auth(7, "fresh"), 22.0) == [DoAuthenticate("fresh", refresh_id=7)]
    assert s.authenticated({"u": 1}, "alice", 100.0, 22.0, refresh_id=7) == [Send(Ok(7, {"principal": "alice"}))]
    assert s.state is SessionState.OPEN
    assert s.tick(25.0) == []
    assert s.tick(99.0) == []
    assert s.next_deadline() == 100.0
    assert err_of(s.tick(100.0)) == (None, "token_expired")


def test_refresh_before_expiry_moves_the_deadline() -> None:
    s = open_session(now=0.0, expires_at=20.0, limits=Limits(idle_timeout=1000.0))
    send(s, Auth(1, "fresh"), 10.0)
    s.authenticated({"u": 1}, "alice", None, 10.0, refresh_id=1)
    assert s.tick(500.0) == []
    assert s.next_deadline() == 1010.0  # only the idle timeout is left


def test_refused_refresh_closes() -> None:
    s = open_session(now=0.0, expires_at=20.0)
    send(s, Auth(7, "bad"), 5.0)
    actions = s.auth_failed(AuthError("nope"), refresh_id=7)
    assert actions == [Send(Err(7, "unauthenticated", "nope", False)), Close(1008, "unauthenticated")]
    assert s.state is SessionState.CLOSED


# --- property: arbitrary input -----------------------------------------------------------------

DOCUMENTED_ACTIONS = (Send, Close, DoAuthenticate, DoSubscribe, DoUnsubscribe, DoCommand, DoAck)
SERVER_FRAMES_FROM_SESSION = (Welcome, Ok, Err, Subbed, Pong, Bye)


class Harness:
    """A session plus a simulated driver that answers requests, sometimes late."""

    def __init__(self, limits: Limits, encoding: str = "json") -> None:
        self.codec = codec_for(encoding)
        self.now = 0.0
        self.s = Session("s-1", self.codec, limits, self.now, token_grace=5.0)
        self.waiting: list[DoAuthenticate | DoSubscribe | DoCommand] = []
        self.out: list[Action] = []

    def check(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            assert isinstance(a, DOCUMENTED_ACTIONS), a
            if isinstance(a, Send):
                assert isinstance(a.frame, SERVER_FRAMES_FROM_SESSION), a
                if isinstance(a.frame, Err | Bye):
                    assert a.frame.code in ERROR_CODES, a.frame
                self.codec.encode(a.frame)  # every frame it emits can be sent
            elif isinstance(a, Close):
                assert a.code in CLOSE_CODES, a
            elif not isinstance(a, DoUnsubscribe | DoAck):
                self.waiting.append(a)
        self.out += actions
        return actions

    def feed(self, data: bytes | str) -> list[Action]:
        return self.check(self.s.receive_data(data, self.now))

    def answer(self, index: int, ok: bool) -> None:
        a = self.waiting.pop(index % len(self.waiting))
        if isinstance(a, DoAuthenticate):
            if ok:
                self.check(self.s.authenticated({"u": 1}, "alice", self.now + 50.0, self.now, a.refresh_id))
            else:
                self.check(self.s.auth_failed(AuthError("refused"), a.refresh_id))
        elif isinstance(a, DoSubscribe):
            frame: Any = Subbed(a.id, a.stream, "e1", 0, False) if ok else Err(a.id, "forbidden", "no")
            self.check(self.s.reply(a.id, frame))
        else:
            self.check(self.s.reply(a.id, Ok(a.id) if ok else Err(a.id, "bad_args", "no")))


def _encoded(codec: Codec, value: Any) -> bytes:
    try:
        return codec.encode(value)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"


def inputs(encoding: str) -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("bytes"), st.binary(max_size=40)),
        st.tuples(st.just("like"), frame_like_values()),
        st.tuples(st.just("frame"), client_frames(encoding)),  # type: ignore[arg-type]
        st.tuples(st.just("answer"), st.tuples(st.integers(0, 10), st.booleans())),
        st.tuples(st.just("time"), st.floats(0, 20)),
    )


@given(st.data(), st.sampled_from(["json", "msgpack"]), st.booleans())
def test_arbitrary_input_gives_only_documented_output(data: st.DataObject, encoding: str, start_open: bool) -> None:
    h = Harness(
        Limits(max_subscriptions=3, max_inflight=2, command_rate=5.0, command_burst=4, idle_timeout=60.0), encoding
    )
    if start_open:
        h.feed(h.codec.encode(Hello()))
        h.answer(0, True)
        assert h.s.state is SessionState.OPEN
    for kind, value in data.draw(st.lists(inputs(encoding), max_size=25), label="steps"):
        opened = h.s.state is SessionState.OPEN
        if kind == "bytes":
            actions = h.feed(value)
        elif kind == "like":
            actions = h.feed(_encoded(h.codec, value))
        elif kind == "frame":
            actions = h.feed(h.codec.encode(value))
        elif kind == "answer":
            if h.waiting:
                h.answer(*value)
            continue
        else:
            h.now += value
            h.check(h.s.tick(h.now))
            continue
        bad = [a for a in actions if isinstance(a, Send) and isinstance(a.frame, Err) and a.frame.code == "bad_frame"]
        if opened and bad:
            # A bad frame never breaks an open session: ping still gets pong.
            assert h.s.state is SessionState.OPEN
            in_flight = {a.id for a in h.waiting if isinstance(a, DoSubscribe | DoCommand)}
            in_flight |= {a.refresh_id for a in h.waiting if isinstance(a, DoAuthenticate)}
            pong_id = next(i for i in range(100) if i not in in_flight)
            assert h.feed(h.codec.encode(Ping(pong_id))) == [Send(Pong(pong_id))]
    # A close is the last thing a session ever emits.
    closes = [i for i, a in enumerate(h.out) if isinstance(a, Close)]
    if closes:
        assert closes == [len(h.out) - 1]
        assert h.s.state is SessionState.CLOSED


@given(st.lists(st.tuples(request_ids(), st.booleans()), max_size=30))
def test_every_request_gets_exactly_one_reply(requests: list[tuple[int, bool]]) -> None:
    """Whatever ids a client picks, each request it sends is answered once (by session or driver)."""
    h = Harness(Limits(max_subscriptions=100, max_inflight=100, command_rate=1e9, command_burst=10**6))
    h.feed(JSON.encode(Hello()))
    h.answer(0, True)
    sent: list[int] = []
    for i, (rid, is_sub) in enumerate(requests):
        frame: Any = Sub(rid, f"room:{i}") if is_sub else Cmd(rid, "x")
        sent.append(rid)
        h.feed(JSON.encode(frame))
    while h.waiting:
        h.answer(0, True)
    replies = [a.frame.id for a in h.out if isinstance(a, Send) and isinstance(a.frame, Ok | Err | Subbed)]
    assert sorted(replies) == sorted(sent)


class SessionMachine(RuleBasedStateMachine):
    """Model-based: an OPEN session against a model of its subscriptions and pending requests."""

    @initialize()
    def start(self) -> None:
        self.h = Harness(Limits(max_subscriptions=3, max_inflight=2, command_rate=1e9, command_burst=10**6))
        self.h.feed(JSON.encode(Hello()))
        self.h.answer(0, True)
        self.subs: set[str] = set()
        self.pending_subs: dict[int, str] = {}
        self.pending_cmds: set[int] = set()

    def _pending(self) -> set[int]:
        return set(self.pending_subs) | self.pending_cmds

    @rule(rid=st.integers(0, 5), stream=st.sampled_from(["room:1", "room:2", "room:3", "room:4"]))
    def sub(self, rid: int, stream: str) -> None:
        actions = self.h.feed(JSON.encode(Sub(rid, stream)))
        if rid in self._pending():
            assert err_of(actions) == (rid, "protocol_violation")
        elif stream in self.subs or stream in self.pending_subs.values():
            assert err_of(actions) == (rid, "already_subscribed")
        elif len(self.subs) + len(self.pending_subs) >= 3:
            assert err_of(actions) == (rid, "too_many_subscriptions")
        else:
            assert actions == [DoSubscribe(rid, stream, None)]
            self.pending_subs[rid] = stream

    @rule(rid=st.integers(0, 5), stream=st.sampled_from(["room:1", "room:2", "room:3"]))
    def unsub(self, rid: int, stream: str) -> None:
        actions = self.h.feed(JSON.encode(Unsub(rid, stream)))
        if rid in self._pending():
            assert err_of(actions) == (rid, "protocol_violation")
        elif stream not in self.subs:
            assert err_of(actions) == (rid, "not_subscribed")
        else:
            assert actions == [DoUnsubscribe(rid, stream), Send(Ok(rid))]
            self.subs.discard(stream)

    @rule(rid=st.integers(0, 5))
    def cmd(self, rid: int) -> None:
        actions = self.h.feed(JSON.encode(Cmd(rid, "x")))
        if rid in self._pending():
            assert err_of(actions) == (rid, "protocol_violation")
        elif len(self.pending_cmds) >= 2:
            assert err_of(actions) == (rid, "too_many_inflight")
        else:
            assert isinstance(actions[0], DoCommand)
            self.pending_cmds.add(rid)

    @rule(rid=st.integers(0, 5))
    def ping(self, rid: int) -> None:
        actions = self.h.feed(JSON.encode(Ping(rid)))
        if rid in self._pending():
            assert err_of(actions) == (rid, "protocol_violation")
        else:
            assert actions == [Send(Pong(rid))]

    @rule(data=st.binary(max_size=10))
    def junk(self, data: bytes) -> None:
        actions = self.h.feed(data)
        assert err_of(actions)[1] == "bad_frame"

    @precondition(lambda self: bool(self.h.waiting))
    @rule(index=st.integers(0, 10), ok=st.booleans())
    def driver_answers(self, index: int, ok: bool) -> None:
        a = self.h.waiting[index % len(self.h.waiting)]
        self.h.answer(index, ok)
        if isinstance(a, DoSubscribe):
            stream = self.pending_subs.pop(a.id)
            if ok:
                self.subs.add(stream)
        elif isinstance(a, DoCommand):
            self.pending_cmds.discard(a.id)

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.h.s.state is SessionState.OPEN
        assert self.h.s.subscriptions == self.subs


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=100, stateful_step_count=30)


def test_every_emitted_code_is_documented() -> None:
    # Codes the session itself can produce (not via the driver).
    for code in (
        "protocol_violation",
        "unsupported_version",
        "bad_frame",
        "bad_stream",
        "already_subscribed",
        "not_subscribed",
        "too_many_subscriptions",
        "too_many_inflight",
        "rate_limited",
        "token_expired",
        "idle_timeout",
    ):
        assert code in ERROR_CODES, code
    assert RtcoreError("x", code="rate_limited").retryable is True


def test_idle_sessions_share_one_empty_table_of_open_requests_and_never_write_it() -> None:
    """A session with no open request holds the shared empty ``_NONE_OPEN``
    (no dict per idle session), and what one session opens is never seen by
    another.

    Mutations seen caught: ``_on_cmd`` writing ``self._pending[rid] = "cmd"``
    directly (into the shared dict) → the other session answers request 1 →
    fails; ``reply`` keeping its emptied dict → ``_pending`` is not the shared
    one → fails.
    """
    from rtcore.protocol.session import _NONE_OPEN

    a, b = open_session(), open_session()
    assert a._pending is _NONE_OPEN and a._pending_subs is _NONE_OPEN
    [cmd] = send(a, Cmd(1, "x"))
    assert isinstance(cmd, DoCommand)
    [sub] = send(a, Sub(2, "room:1"))
    assert isinstance(sub, DoSubscribe)
    assert _NONE_OPEN == {}
    assert b.reply(1, Ok(1, None)) == []  # not b's request
    assert a.reply(1, Ok(1, None)) == [Send(Ok(1, None))]
    subbed = Subbed(2, "room:1", "e", 0, False, False)
    assert a.reply(2, subbed) == [Send(subbed)]
    assert a._pending is _NONE_OPEN and a._pending_subs is _NONE_OPEN
    assert a.subscriptions == {"room:1"}

"""Hypothesis strategies for rtcore's wire protocol (public API).

Use them to property-test your own code against rtcore frames, or to fuzz a
server::

    from hypothesis import given
    from rtcore.testing.strategies import client_frames

    @given(client_frames())
    def test_roundtrip(frame):
        codec = codec_for("json")
        assert codec.decode_client(codec.encode(frame)) == frame

Every strategy produces values that both encodings can carry: strings have no
lone surrogates, integers fit in 64 bits and floats are finite, so a JSON or
MessagePack round trip gives back an equal value.

This is the only module of rtcore that imports Hypothesis: ``rtcore.testing``
itself works without it.
"""

from __future__ import annotations

import string
from typing import Any

import msgspec

try:
    from hypothesis import strategies as st
except ImportError as exc:  # only this module needs Hypothesis, not rtcore.testing
    raise ImportError(
        f"rtcore.testing.strategies needs Hypothesis: pip install hypothesis (or 'rtcore[test]') ({exc})", name=exc.name
    ) from exc

from ..protocol.codec import Encoding, codec_for
from ..protocol.frames import (
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Bye,
    ClientFrame,
    Cmd,
    Err,
    Evt,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    Position,
    ServerFrame,
    Snap,
    Sub,
    Subbed,
    Sync,
    Unsub,
    Welcome,
)

__all__ = [
    "CLIENT_TAGS",
    "SERVER_TAGS",
    "client_frames",
    "frame_like_values",
    "json_values",
    "positions",
    "request_ids",
    "server_frames",
    "stream_names",
    "texts",
]

#: The ``t`` tag of every client frame.
CLIENT_TAGS: tuple[str, ...] = ("hello", "auth", "sub", "unsub", "cmd", "ack", "ping")
#: The ``t`` tag of every server frame.
SERVER_TAGS: tuple[str, ...] = ("welcome", "ok", "err", "subbed", "evt", "snap", "sync", "pong", "bye")

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_MAX_REQUEST_ID = 2**53 - 1
_NAME_ALPHABET = string.ascii_letters + string.digits + "-_.@#"


def texts(*, max_size: int = 20) -> st.SearchStrategy[str]:
    """Unicode text that every encoding can carry (no lone surrogates)."""
    return st.text(st.characters(codec="utf-8"), max_size=max_size)


def request_ids() -> st.SearchStrategy[int]:
    """Valid request ids: 0..2**53-1, biased towards small values that collide."""
    return st.one_of(st.integers(0, 10), st.integers(0, _MAX_REQUEST_ID))


def stream_names() -> st.SearchStrategy[str]:
    """Valid stream names (``kind:id``) accepted by :func:`rtcore.protocol.streams.check_stream`."""
    part = st.text(_NAME_ALPHABET, min_size=1, max_size=12)
    return st.builds(lambda kind, ident: f"{kind}:{ident}", part, part)


def positions() -> st.SearchStrategy[Position]:
    """Stream positions (an epoch and an offset >= 0)."""
    return st.builds(Position, st.sampled_from(["e1", "e2", "epoch-x"]), st.integers(0, 2**63 - 1))


def json_values(*, max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """JSON-compatible builtins that survive a round trip through both encodings.

    ``None``, bools, 64-bit ints, finite floats, text, lists and str-keyed
    dicts, nested.
    """
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        _INT64,
        st.floats(allow_nan=False, allow_infinity=False),
        texts(),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(texts(max_size=8), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def _raw(encoding: Encoding) -> st.SearchStrategy[msgspec.Raw]:
    codec = codec_for(encoding)
    return json_values().map(lambda value: msgspec.Raw(codec.encode(value)))


def client_frames(encoding: Encoding = "json") -> st.SearchStrategy[ClientFrame]:
    """Every kind of valid client frame.

    Args:
        encoding: The encoding ``cmd`` args are pre-encoded in (they travel as
            :class:`msgspec.Raw`), so that a round trip through that encoding
            gives back an equal frame.
    """
    optional_text = st.none() | texts()
    return st.one_of(
        st.builds(Hello, v=st.just(PROTOCOL_VERSION) | st.integers(0, 5), token=optional_text),
        st.builds(Auth, id=request_ids(), token=texts()),
        st.builds(Sub, id=request_ids(), stream=stream_names(), since=st.none() | positions()),
        st.builds(Unsub, id=request_ids(), stream=stream_names()),
        st.builds(Cmd, id=request_ids(), name=texts(), args=_raw(encoding), key=optional_text),
        st.builds(Ack, stream=stream_names(), offset=st.integers(0, 2**63 - 1)),
        st.builds(Ping, id=request_ids()),
    )


def _limits() -> st.SearchStrategy[Limits]:
    small = st.integers(0, 1 << 30)
    pos = st.floats(0, 1e9, allow_nan=False)
    return st.builds(
        Limits,
        max_message_size=small,
        max_subscriptions=small,
        max_inflight=small,
        command_rate=pos,
        command_burst=small,
        idle_timeout=pos,
    )


def server_frames() -> st.SearchStrategy[ServerFrame]:
    """Every kind of valid server frame (payloads are :func:`json_values`)."""
    finite = st.floats(allow_nan=False, allow_infinity=False)
    offsets = st.integers(0, 2**63 - 1)
    return st.one_of(
        st.builds(Welcome, session=texts(), heartbeat=finite, limits=_limits(), principal=st.none() | texts()),
        st.builds(Ok, id=request_ids(), result=json_values(), replayed=st.booleans()),
        st.builds(Err, id=st.none() | request_ids(), code=texts(), message=texts(), retryable=st.booleans()),
        st.builds(
            Subbed, id=request_ids(), stream=stream_names(), epoch=texts(), offset=offsets, recovered=st.booleans()
        ),
        st.builds(
            Evt,
            stream=stream_names(),
            epoch=texts(),
            offset=offsets,
            type=texts(),
            data=json_values(),
            ts=finite,
        ),
        st.builds(Snap, stream=stream_names(), epoch=texts(), offset=offsets, state=json_values(), checksum=texts()),
        st.builds(Sync, stream=stream_names(), offset=offsets, checksum=texts(), epoch=texts()),
        st.builds(Pong, id=request_ids()),
        st.builds(Bye, code=texts(), message=texts(), reconnect=st.booleans()),
    )


#: Field names that occur in client frames, plus a few that do not.
_FIELDS = ("id", "v", "token", "stream", "since", "name", "args", "key", "offset", "epoch", "extra")


def _field_values() -> st.SearchStrategy[Any]:
    """A value for any field: sometimes of the right type, often not."""
    return st.one_of(
        request_ids(),
        st.integers(-(2**63), 2**64 - 1),
        stream_names(),
        texts(),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.builds(lambda p: {"epoch": p.epoch, "offset": p.offset}, positions()),
        st.dictionaries(st.sampled_from(["epoch", "offset", "x"]), st.none() | _INT64 | texts(), max_size=3),
        json_values(max_leaves=4),
    )


def frame_like_values() -> st.SearchStrategy[Any]:
    """Values that look like client frames but often are not valid ones.

    Mostly dicts with a ``t`` that is a real tag, an unknown tag, a wrong type
    or missing, and a random selection of frame fields holding values of the
    right or a wrong type (plus unknown fields); sometimes a valid frame as a
    dict, sometimes not a dict at all. Encode them with
    :meth:`rtcore.protocol.codec.Codec.encode` to fuzz a decoder or a session.
    """
    tag = st.one_of(st.sampled_from(CLIENT_TAGS), texts(max_size=6), _INT64, st.none())
    fields = st.dictionaries(st.sampled_from(_FIELDS), _field_values(), max_size=6)

    @st.composite
    def dicts(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = draw(fields)
        if draw(st.booleans()) or not value:
            value["t"] = draw(tag)
        return value

    valid = client_frames().map(lambda frame: msgspec.json.decode(codec_for("json").encode(frame)))
    return st.one_of(dicts(), valid, json_values(max_leaves=5))

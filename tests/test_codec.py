"""The codec: round trips, and decoding that never raises anything but BadFrame."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcore.errors import BadFrame, ProtocolError
from rtcore.protocol.codec import ENCODINGS, Codec, canonical, codec_for
from rtcore.protocol.frames import (
    Ack,
    Auth,
    Bye,
    Cmd,
    Err,
    Evt,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    Position,
    Snap,
    Sub,
    Subbed,
    Sync,
    Unsub,
    Welcome,
)
from rtcore.testing.strategies import (
    CLIENT_TAGS,
    SERVER_TAGS,
    client_frames,
    frame_like_values,
    json_values,
    server_frames,
)

encodings = pytest.mark.parametrize("encoding", ENCODINGS)


def raw_encode(encoding: str, value: Any) -> bytes:
    """Encode any value (not just frames) in ``encoding``."""
    return msgspec.json.encode(value) if encoding == "json" else msgspec.msgpack.encode(value)


def raw_decode(encoding: str, data: bytes) -> Any:
    return msgspec.json.decode(data) if encoding == "json" else msgspec.msgpack.decode(data)


def decode_err(codec: Codec, value: Any) -> BadFrame:
    with pytest.raises(BadFrame) as info:
        codec.decode_client(raw_encode(codec.encoding, value))
    return info.value


# --- shared instances and encoding facts ------------------------------------------


def test_codec_for_returns_shared_instances() -> None:
    assert codec_for("json") is codec_for("json")
    assert codec_for("json").text is True
    assert codec_for("msgpack").text is False
    assert codec_for("msgpack").encoding == "msgpack"


def test_unknown_encoding_is_value_error() -> None:
    with pytest.raises(ValueError, match="cbor"):
        codec_for("cbor")
    with pytest.raises(ValueError, match="cbor"):
        Codec("cbor")  # type: ignore[arg-type]


# --- round trips ------------------------------------------------------------------


ALL_CLIENT = [
    Hello(),
    Hello(1, "tok"),
    Auth(1, "tok"),
    Sub(2, "room:7"),
    Sub(2, "room:7", Position("e1", 41)),
    Unsub(3, "room:7"),
    Ack("room:7", 45),
    Ping(5),
]
ALL_SERVER = [
    Welcome("s1", 15.0, Limits(), "alice"),
    Welcome("s1", 15.0, Limits(max_inflight=3)),
    Ok(4, {"x": [1, 2.5, None]}, replayed=True),
    Err(4, "insufficient_funds", "balance is 3", False),
    Err(None, "token_expired", "refresh", True),
    Subbed(2, "room:7", "e1", 45, True),
    Evt("room:7", "e1", 42, "moved", {"x": 1}, 1700000000.5),
    Snap("room:7", "e1", 45, {"players": {"a": 1}}, "ab" * 16),
    Sync("room:7", 50, "cd" * 16, "e1"),
    Sync("room:7", 50, "cd" * 16),
    Pong(5),
    Bye("shutdown", "bye", True),
]


def test_examples_cover_every_tag() -> None:
    tags = {msgspec.json.decode(codec_for("json").encode(f))["t"] for f in ALL_CLIENT}
    assert tags | {"cmd"} == set(CLIENT_TAGS)
    assert {msgspec.json.decode(codec_for("json").encode(f))["t"] for f in ALL_SERVER} == set(SERVER_TAGS)


@encodings
@pytest.mark.parametrize("frame", ALL_CLIENT, ids=repr)
def test_client_frame_examples_round_trip(encoding: str, frame: Any) -> None:
    codec = codec_for(encoding)
    assert codec.decode_client(codec.encode(frame)) == frame


@encodings
@pytest.mark.parametrize("frame", ALL_SERVER, ids=repr)
def test_server_frame_examples_round_trip(encoding: str, frame: Any) -> None:
    codec = codec_for(encoding)
    assert codec.decode_server(codec.encode(frame)) == frame


@encodings
def test_cmd_args_stay_raw_in_the_connection_encoding(encoding: str) -> None:
    codec = codec_for(encoding)
    args = {"x": 1, "deep": {"y": [1, 2]}}
    frame = Cmd(4, "room.move", msgspec.Raw(codec.encode(args)), "k-1")
    decoded = codec.decode_client(codec.encode(frame))
    assert isinstance(decoded, Cmd)
    assert decoded == frame
    assert codec.decode_value(decoded.args) == args
    # Missing args decode as null, in the connection's encoding.
    bare = codec.decode_client(raw_encode(encoding, {"t": "cmd", "id": 1, "name": "n"}))
    assert isinstance(bare, Cmd)
    assert codec.decode_value(bare.args) is None
    assert bare.key is None


@encodings
def test_cmd_with_default_args_encodes_to_a_valid_message(encoding: str) -> None:
    # Regression: the JSON-null default of Cmd.args was copied verbatim into
    # MessagePack messages, which then failed to decode.
    codec = codec_for(encoding)
    wire = codec.encode(Cmd(1, "room.leave"))
    assert raw_decode(encoding, wire) == {"t": "cmd", "id": 1, "name": "room.leave", "args": None, "key": None}
    decoded = codec.decode_client(wire)
    assert isinstance(decoded, Cmd)
    assert (decoded.id, decoded.name, decoded.key) == (1, "room.leave", None)
    assert codec.decode_value(decoded.args) is None


def test_json_wire_format_matches_the_protocol() -> None:
    codec = codec_for("json")
    assert msgspec.json.decode(codec.encode(Sub(2, "room:7", Position("e1", 41)))) == {
        "t": "sub",
        "id": 2,
        "stream": "room:7",
        "since": {"epoch": "e1", "offset": 41},
        "cursor": False,  # added with a default (resume from the server cursor only on request)
    }
    assert msgspec.json.decode(codec.encode(Err(None, "x", "m"))) == {
        "t": "err",
        "id": None,
        "code": "x",
        "message": "m",
        "retryable": False,
        "replayed": False,
    }


@given(st.data())
def test_every_client_frame_round_trips(data: st.DataObject) -> None:
    for encoding in ENCODINGS:
        frame = data.draw(client_frames(encoding), label=encoding)
        codec = codec_for(encoding)
        assert codec.decode_client(codec.encode(frame)) == frame


@given(server_frames())
def test_every_server_frame_round_trips(frame: Any) -> None:
    for encoding in ENCODINGS:
        codec = codec_for(encoding)
        assert codec.decode_server(codec.encode(frame)) == frame


@given(client_frames())
def test_json_client_frames_decode_from_text_too(frame: Any) -> None:
    codec = codec_for("json")
    assert codec.decode_client(codec.encode(frame).decode()) == frame


# --- decoding never raises anything but BadFrame -------------------------------------


def _decode_or_bad_frame(codec: Codec, data: bytes | str) -> None:
    try:
        codec.decode_client(data)
    except BadFrame as exc:
        assert exc.code == "bad_frame"
        assert exc.retryable is False
        assert isinstance(exc.message, str) and exc.message
        assert exc.request_id is None or 0 <= exc.request_id < 2**53
        assert exc.field is None or exc.field.startswith("$")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_bad_frame(data: bytes) -> None:
    for encoding in ENCODINGS:
        _decode_or_bad_frame(codec_for(encoding), data)
        _decode_or_bad_frame(codec_for(encoding), b"\x81\xa1t" + data)  # a msgpack map starting with "t"
        _decode_or_bad_frame(codec_for(encoding), b'{"t":' + data)


@given(st.text(max_size=100))
def test_arbitrary_text_raises_only_bad_frame(data: str) -> None:
    for encoding in ENCODINGS:
        _decode_or_bad_frame(codec_for(encoding), data)
        _decode_or_bad_frame(codec_for(encoding), '{"t":"sub","id":1,"stream":' + data)


@given(frame_like_values())
def test_frame_like_values_raise_only_bad_frame(value: Any) -> None:
    for encoding in ENCODINGS:
        _decode_or_bad_frame(codec_for(encoding), raw_encode(encoding, value))


@given(frame_like_values())
def test_server_decoder_raises_only_bad_frame(value: Any) -> None:
    for encoding in ENCODINGS:
        codec = codec_for(encoding)
        try:
            codec.decode_server(raw_encode(encoding, value))
        except BadFrame as exc:
            assert exc.code == "bad_frame"


@given(frame_like_values(), st.sampled_from(ENCODINGS))
def test_decoded_request_id_is_the_frames_id(value: Any, encoding: str) -> None:
    codec = codec_for(encoding)
    try:
        codec.decode_client(raw_encode(encoding, value))
    except BadFrame as exc:
        if exc.request_id is not None:
            assert isinstance(value, dict)
            assert value.get("id") == exc.request_id


def test_bad_frame_is_a_protocol_error() -> None:
    exc = decode_err(codec_for("json"), [1, 2])
    assert isinstance(exc, ProtocolError)
    assert exc.http_status == 400


# --- naming the field ---------------------------------------------------------------


FIELD_CASES = [
    ({"t": "sub", "id": 2}, "$.stream"),
    ({"t": "sub", "id": 2, "stream": 7}, "$.stream"),
    ({"t": "sub", "id": 2, "stream": "a:b", "since": {"epoch": "e1"}}, "$.since.offset"),
    ({"t": "sub", "id": 2, "stream": "a:b", "since": {"offset": 3}}, "$.since.epoch"),
    ({"t": "sub", "id": 2, "stream": "a:b", "since": {"epoch": "e1", "offset": "3"}}, "$.since.offset"),
    ({"t": "sub", "id": 2, "stream": "a:b", "since": {"epoch": "e1", "offset": -1}}, "$.since.offset"),
    ({"t": "sub", "id": 2, "stream": "a:b", "since": 5}, "$.since"),
    ({"t": "sub", "stream": "a:b"}, "$.id"),
    ({"t": "ping", "id": "x"}, "$.id"),
    ({"t": "ping", "id": -1}, "$.id"),
    ({"t": "ping", "id": 2**53}, "$.id"),
    ({"t": "ping", "id": 1.5}, "$.id"),
    ({"t": "cmd", "id": 4}, "$.name"),
    ({"t": "cmd", "id": 4, "name": "n", "key": 5}, "$.key"),
    ({"t": "ack", "stream": "a:b"}, "$.offset"),
    ({"t": "ack", "stream": "a:b", "offset": None}, "$.offset"),
    ({"t": "hello", "v": "1"}, "$.v"),
    ({"t": "hello", "token": 5}, "$.token"),
    ({"t": "auth", "id": 1}, "$.token"),
    ({"t": "unsub", "id": 1}, "$.stream"),
    ({"t": "nope", "id": 3}, "$.t"),
    ({"t": "welcome", "id": 3}, "$.t"),  # a server frame is not a client frame
    ({"t": 5, "id": 3}, "$.t"),
    ({"t": None}, "$.t"),
    ({"id": 4}, "$.t"),
    ({}, "$.t"),
]


@encodings
@pytest.mark.parametrize(("value", "field"), FIELD_CASES, ids=repr)
def test_bad_field_is_named(encoding: str, value: dict[str, Any], field: str) -> None:
    exc = decode_err(codec_for(encoding), value)
    assert exc.code == "bad_frame"
    assert exc.field == field
    leaf = field.rsplit(".", 1)[1]
    assert f"`{leaf}`" in exc.message or f"`{field}`" in exc.message, exc.message


@encodings
@pytest.mark.parametrize(
    ("value", "rid"),
    [
        ({"t": "sub", "id": 2}, 2),
        ({"t": "sub", "id": 7, "stream": "a:b", "since": {"epoch": 1, "offset": 0}}, 7),
        ({"t": "nope", "id": 3}, 3),
        ({"id": 4}, 4),
        ({"t": "cmd", "id": 2**53 - 1}, 2**53 - 1),
        ({"t": "sub", "id": "x", "stream": "a:b"}, None),
        ({"t": "ping", "id": -1}, None),
        ({"t": "ping", "id": 2**53}, None),
        ({"t": "ack", "stream": 1}, None),
    ],
    ids=repr,
)
def test_request_id_is_recovered_when_readable(encoding: str, value: dict[str, Any], rid: int | None) -> None:
    assert decode_err(codec_for(encoding), value).request_id == rid


@encodings
@pytest.mark.parametrize("value", [[1, 2], "sub", 5, None, 1.5, True], ids=repr)
def test_non_object_frame_is_bad_frame(encoding: str, value: Any) -> None:
    exc = decode_err(codec_for(encoding), value)
    assert exc.field is None
    assert exc.request_id is None
    assert "object" in exc.message


@encodings
def test_undecodable_bytes_are_bad_frame_without_field(encoding: str) -> None:
    codec = codec_for(encoding)
    truncated = {
        "json": [b"", b"{", b'{"t":"ping","id":1', b"\xc1"],
        "msgpack": [b"", b"\xc1", b"\x81", b"\x82\xa1t\xa4ping"],
    }
    for data in truncated[encoding]:
        with pytest.raises(BadFrame) as info:
            codec.decode_client(data)
        assert info.value.field is None
        assert info.value.request_id is None
        assert encoding in info.value.message


def test_msgpack_text_message_is_bad_frame() -> None:
    codec = codec_for("msgpack")
    with pytest.raises(BadFrame) as info:
        codec.decode_client('{"t":"ping","id":1}')
    assert info.value.code == "bad_frame"
    assert "binary" in info.value.message
    with pytest.raises(BadFrame):
        codec.decode_server('{"t":"pong","id":1}')


@encodings
def test_unknown_fields_are_ignored(encoding: str) -> None:
    codec = codec_for(encoding)
    value = {
        "t": "sub",
        "id": 2,
        "stream": "room:7",
        "since": {"epoch": "e1", "offset": 3, "future": [1, {"x": None}]},
        "priority": "high",
        "nested": {"a": {"b": [1, 2, 3]}},
    }
    assert codec.decode_client(raw_encode(encoding, value)) == Sub(2, "room:7", Position("e1", 3))
    server = {"t": "pong", "id": 5, "server_time": 1.5}
    assert codec.decode_server(raw_encode(encoding, server)) == Pong(5)


@given(client_frames(), st.dictionaries(st.text(min_size=1).map(lambda s: "x_" + s), json_values(), max_size=4))
def test_unknown_fields_are_ignored_property(frame: Any, extra: dict[str, Any]) -> None:
    codec = codec_for("json")
    value = msgspec.json.decode(codec.encode(frame))
    value.update(extra)
    assert codec.decode_client(msgspec.json.encode(value)) == frame


# --- decode_value ---------------------------------------------------------------------


@encodings
def test_decode_value_validates_against_a_type(encoding: str) -> None:
    codec = codec_for(encoding)

    class Move(msgspec.Struct):
        x: int

    assert codec.decode_value(codec.encode({"x": 3}), Move) == Move(3)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.x"):
        codec.decode_value(codec.encode({"x": "3"}), Move)


# --- canonical ------------------------------------------------------------------------


def _shuffled(value: Any, rnd: random.Random) -> Any:
    """The same value with every dict's insertion order shuffled."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@given(json_values(max_leaves=30), st.randoms(use_true_random=False))
def test_canonical_ignores_dict_key_order(value: Any, rnd: random.Random) -> None:
    assert canonical(_shuffled(value, rnd)) == canonical(value)
    assert msgspec.msgpack.decode(canonical(value)) == value


def test_canonical_sorts_keys() -> None:
    assert canonical({"b": 1, "a": {"d": 2, "c": 3}}) == msgspec.msgpack.encode({"a": {"c": 3, "d": 2}, "b": 1})
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})


def test_fingerprint_of_args_with_int_keys_and_sets() -> None:
    # Regression: canonical() needs str keys, and a set's order depends on the hash seed.
    from rtcore.protocol.idempotency import fingerprint

    class Args(msgspec.Struct):
        seats: dict[int, str]
        tags: set[str]

    a = fingerprint("table.seat", Args({2: "b", 1: "a"}, {"x", "y", "z"}))
    b = fingerprint("table.seat", Args({1: "a", 2: "b"}, {"z", "y", "x"}))
    assert a == b and len(a) == 32
    assert fingerprint("table.seat", {"a": 1}) != fingerprint("table.sit", {"a": 1})
    assert fingerprint("x", {"a": 1, "b": 2}) == fingerprint("x", {"b": 2, "a": 1})


def test_fingerprint_bytes_are_pinned() -> None:
    """Fingerprints are stored with idempotency records for their TTL, so they never change.

    A retry that crosses an upgrade must match the record its first attempt
    stored; a changed fingerprint would answer it ``idempotency_key_reused``.
    Mutation caught: hashing without the zero byte between name and
    arguments (or any change of the canonical encoding) changes every digest.
    """
    from rtcore.protocol.idempotency import fingerprint

    class Pub(msgspec.Struct):
        stream: str
        data: Any = None

    assert fingerprint("pub", Pub("k:1", {"n": 5})).hex() == (
        "877840a633ab6d90ce47f5946194f2f244d5b2f2a9e37eaf989f3b4a3182bf6e"
    )
    assert fingerprint("table.seat", {"b": [1, 2.5, None, True], "a": {3: "x"}}).hex() == (
        "18490ed6b245620a61de927bc00b6ce4e1e6c2f4055e34dce4a4f696261a1a8b"
    )
    assert fingerprint("", None).hex() == "326f8d72a7bc9355799838815418452a65e8cf14e001fd4656f9bab3ba34dd58"


def test_decode_value_of_text_in_msgpack_is_a_decode_error() -> None:
    # Regression: a str payload raised TypeError, which no caller catches.
    with pytest.raises(msgspec.DecodeError, match="binary"):
        codec_for("msgpack").decode_value('{"x":1}')


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\uDBFFx"])
def test_lone_surrogate_escape_is_answered_to_its_request_id(escape: str) -> None:
    """A JSON frame whose only fault is a lone surrogate escape in a string is
    a ``BadFrame`` that names the fault and still carries the frame's ``id``,
    so the session answers that request instead of leaving it open.

    Mutation: drop the surrogate-cleaning probe in ``Codec._decode`` → the
    BadFrame has no request id (the session answers ``err`` with ``id: null``)
    → fails.
    """
    frame = '{"t":"cmd","id":3,"name":"echo","args":"a' + escape + '"}'
    with pytest.raises(BadFrame) as info:
        codec_for("json").decode_client(frame)
    assert info.value.request_id == 3
    assert "surrogate" in info.value.message
    # A valid pair is fine.
    assert codec_for("json").decode_client('{"t":"cmd","id":4,"name":"echo","args":"\\ud83d\\ude00"}').id == 4

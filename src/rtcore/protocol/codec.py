"""Encoding frames to bytes and back, for both encodings (sans-IO).

Encoders and decoders are built once per encoding and reused: msgspec's cost
is in building them, not in using them. Decoding never raises anything but
:class:`~rtcore.errors.BadFrame`; its message and ``field`` name the first
offending field as a JSON path (``$.since.offset``), and ``request_id`` carries
the frame's ``id`` whenever it could still be read, so the error goes back to
the right request.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Final, Literal

import msgspec

from ..errors import BadFrame
from .frames import ClientFrame, Cmd, ServerFrame

__all__ = ["ENCODINGS", "Codec", "Encoding", "canonical", "codec_for"]

Encoding = Literal["json", "msgpack"]
ENCODINGS: Final[tuple[Encoding, ...]] = ("json", "msgpack")

#: ``Cmd.args`` defaults to JSON ``null``; in MessagePack that must be nil.
_JSON_NULL: Final = b"null"
_MSGPACK_NIL: Final = msgspec.Raw(b"\xc0")

_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
#: A JSON ``\uD800``-``\uDFFF`` escape: a lone one makes the whole frame
#: undecodable, id included; the id probe reads the frame with them replaced.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_MISSING = re.compile(r"missing required field `([^`]+)`(?: - at `(\$[^`]*)`)?")


class _IdProbe(msgspec.Struct):
    """Reads only ``id`` from a frame that failed to decode as a whole."""

    id: int | None = None


def _field_of(message: str) -> str | None:
    missing = _MISSING.search(message)
    if missing:
        base = missing.group(2) or "$"
        return f"{base}.{missing.group(1)}"
    at = _AT_PATH.search(message)
    return at.group(1) if at else None


class Codec:
    """Frame encoder/decoder for one encoding.

    Use :func:`codec_for` to get the shared instance of an encoding.

    Attributes:
        encoding: ``"json"`` (text WebSocket frames) or ``"msgpack"`` (binary).
        text: Whether frames of this encoding travel as WebSocket text frames.
    """

    def __init__(self, encoding: Encoding) -> None:
        self.encoding: Encoding = encoding
        self.text: bool = encoding == "json"
        self._encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder
        if encoding == "json":
            self._encoder = msgspec.json.Encoder()
            self._client: Any = msgspec.json.Decoder(ClientFrame)
            self._server: Any = msgspec.json.Decoder(ServerFrame)
            self._probe: Any = msgspec.json.Decoder(_IdProbe)
            self._any: Any = msgspec.json.Decoder()
        elif encoding == "msgpack":
            self._encoder = msgspec.msgpack.Encoder()
            self._client = msgspec.msgpack.Decoder(ClientFrame)
            self._server = msgspec.msgpack.Decoder(ServerFrame)
            self._probe = msgspec.msgpack.Decoder(_IdProbe)
            self._any = msgspec.msgpack.Decoder()
        else:
            raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")

    def encode(self, frame: Any) -> bytes:
        """Encode a frame (or any msgspec-encodable value) to bytes."""
        if type(frame) is Cmd and not self.text and bytes(frame.args) == _JSON_NULL:
            # The default args are JSON null; raw bytes are copied verbatim, so
            # they would corrupt a MessagePack message.
            frame = msgspec.structs.replace(frame, args=_MSGPACK_NIL)
        return self._encoder.encode(frame)

    def decode_client(self, data: bytes | str) -> ClientFrame:
        """Decode one client frame.

        Raises:
            BadFrame: the frame is malformed; nothing else is ever raised.
        """
        frame = self._decode(self._client, data)
        if type(frame) is Cmd and not self.text and bytes(frame.args) == _JSON_NULL:
            # Missing args got the (JSON) default; give the handler MessagePack nil.
            frame = msgspec.structs.replace(frame, args=_MSGPACK_NIL)
        return frame  # type: ignore[no-any-return]

    def decode_server(self, data: bytes | str) -> ServerFrame:
        """Decode one server frame (used by clients).

        Raises:
            BadFrame: the frame is malformed; nothing else is ever raised.
        """
        return self._decode(self._server, data)  # type: ignore[no-any-return]

    def decode_value(self, data: bytes | str | msgspec.Raw, type: Any = Any) -> Any:
        """Decode a payload (command args, event data) into ``type``.

        Raises:
            msgspec.ValidationError: the payload does not match ``type``.
            msgspec.DecodeError: the payload is not valid in this encoding.
        """
        if self.encoding == "json":
            return msgspec.json.decode(data, type=type)
        if isinstance(data, str):  # would be a TypeError, which callers do not expect
            raise msgspec.DecodeError("MessagePack payloads must be binary, got text")
        return msgspec.msgpack.decode(data, type=type)

    def _decode(self, decoder: Any, data: bytes | str) -> Any:
        if self.encoding == "msgpack" and isinstance(data, str):
            raise BadFrame("msgpack frames must be binary, got a text message")
        try:
            return decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise BadFrame(str(exc), field=_field_of(str(exc)), request_id=self._request_id(data)) from None
        except msgspec.DecodeError as exc:
            rid, why = None, str(exc)
            if self.encoding == "json":
                # Still answer the request by its id when only a string in it is bad
                # (a lone surrogate escape), so the client's request is not left open.
                raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
                cleaned = _SURROGATE_ESCAPE.sub(rb"\\ufffd", raw)
                if cleaned != raw:
                    rid = self._request_id(cleaned)
                    with contextlib.suppress(msgspec.DecodeError):
                        msgspec.json.decode(cleaned)  # was that escape the only fault?
                        why = "a string holds a \\uD800-\\uDFFF escape that is not a valid surrogate pair"
            raise BadFrame(f"undecodable {self.encoding} frame: {why}", request_id=rid) from None
        except Exception as exc:  # pragma: no cover - msgspec documents only the two above
            # Belt and braces: the session promises BadFrame and nothing else.
            raise BadFrame(f"undecodable {self.encoding} frame: {type(exc).__name__}") from None

    def _request_id(self, data: bytes | str) -> int | None:
        try:
            rid = self._probe.decode(data).id
        except Exception:
            return None
        return rid if isinstance(rid, int) and 0 <= rid < 2**53 else None


_CODECS: Final[dict[str, Codec]] = {name: Codec(name) for name in ENCODINGS}


def codec_for(encoding: str) -> Codec:
    """Return the shared :class:`Codec` for ``encoding``.

    Raises:
        ValueError: unknown encoding.
    """
    try:
        return _CODECS[encoding]
    except KeyError:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}") from None


_CANONICAL: Final = msgspec.msgpack.Encoder(order="sorted")


def canonical(value: Any) -> bytes:
    """Deterministic MessagePack bytes of ``value`` (map keys sorted).

    Used for idempotency fingerprints and state checksums, so the same value
    gives the same bytes whichever encoding or transport it arrived by.
    """
    return _CANONICAL.encode(value)

"""Direct messages: ephemeral frames to every live connection of a principal, on any node.

``node.send_to(principal, type, data)`` encodes one small envelope and
publishes it on the backend's :class:`~rtcore.backends.base.SignalBus`
(in-process for ``memory://`` and ``sqlite://``, Redis PUB/SUB for
``redis://``). Every node with the ``gateway`` role listens and looks the
principal up in its own :class:`~rtcore.engine.presence.Presence`: the
connections that registered a receiver for it get a ``msg`` frame, encoded
at most once per encoding. Nothing is stored anywhere, so:

* delivery is **at most once**: a principal with no live connection at that
  moment, a connection that opens a moment later, a node whose bus
  connection is down, all miss the message, and nothing replays it;
* there is **no order** with stream events (a message may overtake an event
  published before it) and **no offset**: clients cannot ack or resume it;
* a message goes through the connection's outbox as a live frame, so a
  subscriber too slow to take it is cut like for any live event.

Anything that must not be missed belongs in a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import BadRequest
from ..protocol.frames import Msg

__all__ = ["DirectMessage", "Receiver", "decode_envelope", "encode_envelope"]

log = logging.getLogger("rtcore.engine.direct")


class _Envelope(msgspec.Struct, array_like=True, frozen=True):
    to: str
    type: str
    room: str | None
    data: Any


class _RawEnvelope(msgspec.Struct, array_like=True, frozen=True):
    to: str
    type: str
    room: str | None
    data: msgspec.Raw  # MessagePack of the payload: decoded only where a connection wants JSON


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_RawEnvelope)
_JSON = msgspec.json.Encoder()


def encode_envelope(principal_id: str, type: str, data: Any, room: str | None) -> bytes:
    """The bus message for one direct message (MessagePack ``[to, type, room, data]``).

    Raises:
        BadRequest: an empty principal or type, or data msgspec cannot encode.
    """
    if not isinstance(principal_id, str) or not principal_id:
        raise BadRequest(f"send_to: principal_id must be a non-empty str, got {principal_id!r}")
    if not isinstance(type, str) or not type:
        raise BadRequest(f"send_to: type must be a non-empty str, got {type!r}")
    if room is not None and not isinstance(room, str):
        raise BadRequest(f"send_to: room must be a str or None, got {room!r}")
    try:
        return _ENCODER.encode(_Envelope(principal_id, type, room, msgspec.to_builtins(data)))
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise BadRequest(f"send_to: data cannot be encoded: {exc}") from None


class DirectMessage:
    """One received direct message, rendered as a ``msg`` frame once per encoding.

    Attributes:
        principal_id: Whom it is for.
        type: The application's message type.
        room: The room it comes from (set by :mod:`rtcore.rooms`), or None.
    """

    __slots__ = ("_data", "_frames", "principal_id", "room", "type")

    def __init__(self, envelope: _RawEnvelope) -> None:
        self.principal_id = envelope.to
        self.type = envelope.type
        self.room = envelope.room
        self._data = envelope.data
        self._frames: dict[str, bytes] = {}

    @property
    def data(self) -> Any:
        """The payload (builtins)."""
        return msgspec.msgpack.decode(self._data)

    def encoded(self, encoding: str) -> bytes:
        """The ``msg`` frame in ``encoding`` (``"json"`` or ``"msgpack"``), built once."""
        frame = self._frames.get(encoding)
        if frame is None:
            if encoding == "msgpack":
                # The payload is already MessagePack: embedded as it is.
                frame = _ENCODER.encode(Msg(self.type, self._data, self.room))
            else:
                frame = _JSON.encode(Msg(self.type, self.data, self.room))
            self._frames[encoding] = frame
        return frame


#: What a connection registers with :class:`~rtcore.engine.presence.Presence`
#: to receive its principal's direct messages; called synchronously, must not block.
Receiver = Callable[[DirectMessage], None]


def decode_envelope(message: bytes) -> DirectMessage | None:
    """The direct message in a bus message, or None (logged) when it is not one."""
    try:
        return DirectMessage(_DECODER.decode(message))
    except msgspec.DecodeError:
        # Another program on the same Redis channel, or a newer envelope: not ours to fail on.
        log.warning("ignored an undecodable signal (%d bytes)", len(message))
        return None

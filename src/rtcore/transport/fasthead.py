"""Parse a plain ``GET`` request head without h11 (sans-IO).

A WebSocket connect is one ``GET`` with a dozen header fields, and building
an ``h11.Connection`` for it (its state machine, ``Request`` and ``Headers``
objects, the re-validation of its own parse) was about a quarter of the
server's CPU per connect. :func:`parse_get` reads the common head directly.

It never refuses anything: it either returns what h11 would have parsed
(the same target and the same ``(lower-case name, value)`` list, for a
request ``_check_request`` lets through) or ``None``, and then the caller
parses the head with h11 exactly as before. So every odd request (any other
method or version, a body, a missing or repeated ``Host``, a byte h11 would
refuse or might accept) gets h11's answer, by construction. The grammar
here is RFC 9110/9112's and stricter than h11's (it takes only VCHAR and
obs-text in field values, where h11 also takes most control bytes), which
only sends more heads to h11.

The head must already have passed :class:`~rtcore.transport.head.HeadScanner`
(CRLF line endings, no obs-fold, size limits): this module only sees complete
heads.
"""

from __future__ import annotations

import re
from typing import Final

from .messages import Headers

__all__ = ["parse_get"]

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# A field line's value with the optional whitespace around it: any run of
# VCHAR, obs-text, SP and HTAB (RFC 9110 §5.5: the value is that run with the
# leading and trailing SP/HTAB stripped, its interior whitespace kept).
_VALUE_OWS: Final = rb"[\x21-\x7e\x80-\xff \t]*"
# Only what the WebSocket route needs: GET, an origin-form target, HTTP/1.1.
_REQUEST_LINE: Final = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n")
# The whole field block, each line a field (no space before the colon), then
# the empty line.
_BLOCK: Final = re.compile(rb"(?:" + _TOKEN + rb":" + _VALUE_OWS + rb"\r\n)*\r\n")
# Request framing h11 normalises (and _serve and _check_request police):
# heads with them go to h11.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


def parse_get(buf: bytes | bytearray, start: int, end: int) -> tuple[bytes, Headers] | None:
    """The target and headers of the ``GET`` head ``buf[start:end]``, or ``None``.

    Args:
        buf: The connection's buffer.
        start: First byte of the request line.
        end: First byte after the empty line that ends the head.

    Returns:
        ``(target, headers)`` with lower-case header names, in order, as h11
        would give them; ``None`` when the head is anything but an HTTP/1.1
        ``GET`` with an origin-form target, exactly one ``Host``, no
        ``Content-Length`` or ``Transfer-Encoding`` and well-formed fields
        (the caller then parses it with h11).
    """
    line = _REQUEST_LINE.match(buf, start, end)
    if line is None:
        return None
    pos = line.end()
    if _BLOCK.fullmatch(buf, pos, end) is None:
        return None
    # Validated: every line is name ":" value-with-whitespace, the name has no colon.
    lines = bytes(buf[pos : end - 4]).split(b"\r\n") if end - pos > 2 else []
    headers = [(name.lower(), value.strip(b" \t")) for name, _, value in [line.partition(b":") for line in lines]]
    hosts = 0
    for name, _ in headers:
        if name == b"host":
            hosts += 1
        elif name in _FRAMING:
            return None
    if hosts != 1:
        return None
    return line.group(1), headers

"""Validate an HTTP request head before h11 parses it (sans-IO).

h11 0.16 leaves three holes that a public server must close:

* ``max_incomplete_event_size`` only bounds a head that is still incomplete:
  a 70 KB head that arrives in one read is parsed and accepted;
* it accepts bare ``LF`` line endings, which lets a request be read
  differently by a proxy in front of us (request smuggling);
* it has no per-line or header-count limit.

So the server keeps the bytes of a request head to itself until
:class:`HeadScanner` has seen the blank line that ends it, counting bytes,
lines and header fields as they arrive (every read, however large), and only
then hands the head to a fresh ``h11.Connection``. The scan is incremental:
each byte is looked at once, however the head is split across reads.
"""

from __future__ import annotations

from ..errors import BadRequest, LimitExceeded
from .config import ServerLimits

__all__ = ["HeadScanner"]

_CR = 0x0D
#: A header line that starts with one of these continues the previous one
#: (obs-fold, RFC 9112 §5.2).
_FOLD = (0x20, 0x09)


class HeadScanner:
    """Find the end of one request head in a growing buffer, enforcing limits.

    Usage: after every read append to the buffer and call :meth:`scan`; it
    returns ``None`` until the head is complete, then ``(start, end)``: the
    head is ``buf[start:end]`` (leading empty lines, which RFC 9112 §2.2 lets
    a server ignore, are before ``start``) and body bytes start at ``end``.

    Raises:
        BadRequest: 400 for a bare LF or an obs-fold continuation line.
        LimitExceeded: ``message_too_big``: 414 for a request line over
            ``max_header_line``, 431 for a header line over
            ``max_header_line``, more than ``max_headers`` fields or a head
            over ``max_header_bytes``.
    """

    __slots__ = ("_limits", "_line_start", "_lines", "_pos", "_start")

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self._start = 0  # first byte of the request line
        self._line_start = 0
        self._pos = 0  # next byte to look at
        self._lines = 0  # complete lines seen, request line included

    def scan(self, buf: bytes | bytearray) -> tuple[int, int] | None:
        """Scan the bytes added to ``buf`` since the last call."""
        limits = self._limits
        while True:
            nl = buf.find(b"\n", self._pos)
            if nl < 0:
                self._pos = len(buf)
                self._check_open_line(len(buf))
                return None
            bare = nl == 0 or buf[nl - 1] != _CR
            length = nl - self._line_start - (0 if bare else 1)
            # The limits come first, in the order _check_open_line applies
            # them, so the answer does not depend on how the bytes were split
            # into reads (found by tests/hardening fuzzing: 400 in one read,
            # 431 in several).
            if length:
                self._check_line(length)
            if nl + 1 - self._start > limits.max_header_bytes:
                raise self._too_big()
            if bare:
                raise BadRequest("line endings must be CRLF, bare LF is refused")
            self._pos = nl + 1
            if length == 0:
                if self._lines == 0:
                    # An empty line before the request line: skip it.
                    self._start = self._line_start = self._pos
                    continue
                return self._start, self._pos
            if self._lines and buf[self._line_start] in _FOLD:
                # h11 would unfold it; a front proxy may not, and then the two
                # disagree on what the headers say (RFC 9112 §5.2 allows 400).
                raise BadRequest("obsolete line folding (a header line starting with whitespace) is refused")
            self._lines += 1
            if self._lines - 1 > limits.max_headers:
                raise LimitExceeded(f"more than {limits.max_headers} header fields", code="message_too_big", http_status=431)
            self._line_start = self._pos

    def _check_open_line(self, buffered: int) -> None:
        # The line being received may end with a CR whose LF is still to come.
        open_length = buffered - self._line_start
        if open_length > self._limits.max_header_line + 1:
            self._check_line(open_length)
        if buffered - self._start > self._limits.max_header_bytes:
            raise self._too_big()

    def _check_line(self, length: int) -> None:
        if length <= self._limits.max_header_line:
            return
        if self._lines == 0:
            raise LimitExceeded(f"request line longer than {self._limits.max_header_line} bytes", code="message_too_big", http_status=414)
        raise LimitExceeded(f"header line longer than {self._limits.max_header_line} bytes", code="message_too_big", http_status=431)

    def _too_big(self) -> LimitExceeded:
        return LimitExceeded(f"request head larger than {self._limits.max_header_bytes} bytes", code="message_too_big", http_status=431)

"""Stream rules (sans-IO): names, resume plans and gap-free delivery.

Three pieces, each a pure function or a small state machine:

* :func:`check_stream` — what a stream name may look like.
* :func:`plan_resume` — given where a subscriber says it is (or its server
  cursor) and what the log still holds, decide between replaying history,
  sending a snapshot, or telling the subscriber it missed events. Never a
  silent gap.
* :class:`Delivery` — per (connection, stream): the catch-up → live handoff.
  Register for live events *first* and buffer them, read history, then drain
  the buffer skipping offsets already sent. Live events that arrive with a gap
  (a node's feed lagging behind a read) switch it back to catch-up, so the gap
  is filled from the log instead of skipped. The same machine is used by the
  server-side state folder.
* :class:`ClientCursor` — the client side: drop offsets already seen, notice
  epoch changes. Used by :class:`rtcore.protocol.client.ClientSession`.

No I/O, no clock: callers pass events and positions in.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from enum import Enum
from typing import Final

import msgspec

from ..errors import BadRequest
from .frames import Position
from .types import Event, StreamInfo

__all__ = [
    "DEFAULT_CURSOR_TTL",
    "MAX_STREAM_NAME",
    "ClientCursor",
    "Delivery",
    "Phase",
    "Plan",
    "check_stream",
    "matches",
    "plan_resume",
]

MAX_STREAM_NAME: Final = 200

#: Seconds a server cursor (a principal's last ack on a stream) is kept after
#: its last advance: 7 days. Long enough to resume after a week away; after
#: that a ``sub`` with ``cursor: true`` is treated as a newcomer's. Without a
#: TTL the cursors would grow with every (principal, stream) ever acked.
DEFAULT_CURSOR_TTL: Final = 7 * 24 * 3600.0


#: Names :func:`check_stream` accepted recently. Every publish checks its
#: stream's name and a room appends to the same few streams on every move, so
#: the checks were a measurable share of a move (py-spy); bounded, cleared
#: when full. Only valid names are kept: a bad one is checked (and refused) every time.
_VALID_NAMES: dict[str, None] = {}
_VALID_NAMES_KEPT: Final = 8192


def check_stream(name: str) -> None:
    """Validate a stream name: ``kind:id``, printable, at most 200 bytes.

    Raises:
        BadRequest: code ``bad_stream`` naming what is wrong.
    """
    if type(name) is str and name in _VALID_NAMES:
        return
    _check_stream(name)
    if type(name) is str:  # not a subclass: its __hash__/__eq__ could make another name look cached
        if len(_VALID_NAMES) >= _VALID_NAMES_KEPT:
            _VALID_NAMES.clear()
        _VALID_NAMES[name] = None


def _check_stream(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise BadRequest("stream name is empty", code="bad_stream")
    # surrogatepass: a lone surrogate must be a bad_stream (below), not a UnicodeEncodeError.
    if len(name.encode("utf-8", "surrogatepass")) > MAX_STREAM_NAME:
        raise BadRequest(f"stream name is longer than {MAX_STREAM_NAME} bytes", code="bad_stream")
    kind, sep, ident = name.partition(":")
    if not sep or not kind or not ident:
        raise BadRequest(f"stream name {name!r} must look like 'kind:id'", code="bad_stream")
    if not name.isprintable() or any(c in name for c in " *?[]"):
        raise BadRequest(f"stream name {name!r} has a space, wildcard or unprintable character", code="bad_stream")


def matches(pattern: str, stream: str) -> bool:
    """Whether ``stream`` matches a glob ``pattern`` such as ``room:*``."""
    return fnmatch.fnmatchcase(stream, pattern)


class Plan(msgspec.Struct, frozen=True):
    """How to start a subscription.

    Attributes:
        mode: ``"replay"`` (send events after ``after``), ``"snapshot"`` (send
            the folded state, then events after it) or ``"live"`` (only new
            events after the current head).
        after: For ``replay``: the last offset the subscriber has.
        recovered: The value of ``subbed.recovered``: true only when every
            event after the subscriber's position will be delivered.
    """

    mode: str
    after: int
    recovered: bool


def plan_resume(start: Position | None, info: StreamInfo, *, stateful: bool) -> Plan:
    """Decide how a subscription starts.

    Args:
        start: The client's ``since``, else its server cursor, else ``None``.
        info: The stream's epoch, head and first retained offset right now.
        stateful: Whether the stream has server-side state (``app.state``).

    Returns:
        The :class:`Plan`. Rules, in order:

        1. ``since.offset == 0``: the client has nothing; replay from the start
           if offset 1 is still retained (any epoch), else as rule 4.
        2. Same epoch and ``first - 1 <= offset <= head``: replay ``(offset, head]``,
           ``recovered=True``.
        3. No position at all: a fresh subscriber. Stateful streams start with a
           snapshot; others go live from the head. ``recovered=False`` since
           nothing was asked to be recovered.
        4. Another epoch (the history the client knew is gone) on a stateless
           stream whose new history is complete (offset 1 retained): the
           client missed the end of the old history, but gets all of the new
           one — replay from 0 with ``recovered=False``.
        5. Anything else (trimmed history, an offset beyond the head): the
           client missed events. Stateful streams send a snapshot; others go
           live with ``recovered=False``.
    """
    if start is not None:
        if start.offset == 0 and info.first == 1:
            return Plan("replay", 0, True)
        if start.epoch == info.epoch and info.first - 1 <= start.offset <= info.head:
            return Plan("replay", start.offset, True)
        if start.epoch != info.epoch and info.first == 1 and not stateful:
            return Plan("replay", 0, False)
    if stateful:
        return Plan("snapshot", info.head, False)
    return Plan("live", info.head, False)


class Phase(Enum):
    """Where a :class:`Delivery` is."""

    CATCHUP = "catchup"
    LIVE = "live"
    STALE = "stale"  # the stream's epoch changed under it: must be re-planned


class Delivery:
    """Gap-free, duplicate-free ordering of one stream for one consumer.

    Usage by a driver::

        d = Delivery(epoch, after)        # in CATCHUP: live events are buffered
        hub.add(stream, d)                # register for live before reading
        page = await log.read(after=d.last, ...)  # repeat until empty
        out = d.history(page.events)      # events to send
        out += d.go_live()                # drain the buffer; LIVE if no gap
        ...
        out = d.live(event)               # each live event afterwards

    ``needs_fill`` tells the driver that a gap was seen and it must read
    history after ``last`` again, then call :meth:`go_live`.
    """

    __slots__ = ("_buffer", "epoch", "last", "phase")

    def __init__(self, epoch: str, after: int) -> None:
        self.epoch = epoch
        self.last = after
        self.phase = Phase.CATCHUP
        self._buffer: list[Event] = []

    @property
    def stale(self) -> bool:
        """Whether the stream's epoch changed under this delivery."""
        return self.phase is Phase.STALE

    @property
    def needs_fill(self) -> bool:
        """Whether history must be read after :attr:`last` before going live."""
        return self.phase is Phase.CATCHUP

    def _take(self, events: Iterable[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            if ev.epoch != self.epoch:
                self.phase = Phase.STALE
                self._buffer.clear()
                break
            if ev.offset <= self.last:
                continue  # duplicate: already sent
            if ev.offset != self.last + 1:
                break  # gap: stop here, the rest needs a fill
            out.append(ev)
            self.last = ev.offset
        return out

    def history(self, events: Iterable[Event]) -> list[Event]:
        """Accept a page of history read after :attr:`last`; return what to send."""
        if self.phase is Phase.STALE:
            return []
        return self._take(events)

    def go_live(self) -> list[Event]:
        """Drain buffered live events after history is exhausted.

        Returns the events to send. Stays in CATCHUP (``needs_fill``) if the
        buffer starts beyond ``last + 1`` (events exist that history did not
        return yet); otherwise switches to LIVE.
        """
        if self.phase is Phase.STALE:
            return []
        buf = sorted(self._buffer, key=lambda e: e.offset)
        self._buffer.clear()
        out = self._take(buf)
        rest = [e for e in buf if e.offset > self.last and e.epoch == self.epoch]
        if rest or self.stale:  # _take may have found an epoch change
            self._buffer = rest
            return out
        self.phase = Phase.LIVE
        return out

    def live(self, event: Event) -> list[Event]:
        """Accept one live event; return the events to send now (zero or one)."""
        if self.phase is Phase.STALE:
            return []
        if event.epoch != self.epoch:
            self.phase = Phase.STALE
            self._buffer.clear()
            return []
        if self.phase is Phase.CATCHUP:
            if event.offset > self.last:
                self._buffer.append(event)
            return []
        if event.offset <= self.last:
            return []
        if event.offset == self.last + 1:
            self.last = event.offset
            return [event]
        # A gap: the feed is ahead of what we sent; fill from history.
        self.phase = Phase.CATCHUP
        self._buffer.append(event)
        return []


class ClientCursor:
    """Client-side view of one stream: last epoch and offset seen.

    :meth:`accept` says whether an incoming event is new (deliver it to the
    application) or a duplicate of one already delivered (drop it).
    """

    __slots__ = ("epoch", "offset")

    def __init__(self, epoch: str | None = None, offset: int = 0) -> None:
        self.epoch = epoch
        self.offset = offset

    @property
    def position(self) -> Position | None:
        """The ``since`` to send on resubscribe, or ``None`` before any event."""
        return Position(self.epoch, self.offset) if self.epoch is not None else None

    def reset(self, epoch: str, offset: int) -> None:
        """Jump to a position (after ``subbed`` with ``recovered=False`` or a ``snap``)."""
        self.epoch, self.offset = epoch, offset

    def accept(self, epoch: str, offset: int) -> bool:
        """Return True if the event at (epoch, offset) is new, and record it."""
        if epoch == self.epoch and offset <= self.offset:
            return False
        self.epoch, self.offset = epoch, offset
        return True

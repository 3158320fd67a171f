"""The user-facing side of rooms: :class:`Room`, :class:`Player`, timers.

A room type is a subclass of :class:`Room` parameterised by a msgspec state
type. Its hooks and message handlers run one at a time on the room's owner
(see :mod:`rtcore.rooms.runtime`), so they read and change ``self.state``
directly, with no locks, no ``expect`` and no retries.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import msgspec

from ..errors import Rejected

if TYPE_CHECKING:
    from .runtime import _Actor

__all__ = ["Player", "Room", "RoomClock", "Timer", "message"]

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])

#: Attribute set on a function by :func:`message`.
_MARK = "__rtcore_room_message__"


class Player(msgspec.Struct, frozen=True):
    """A member of a room, keyed by user: every connection of one principal is one player.

    Attributes:
        id: The principal's id.
    """

    id: str


def message(type: str) -> Callable[[F], F]:
    """Mark a room method as the handler of messages of ``type``.

    The handler is ``async def handler(self, player, data: T)`` (or a plain
    ``def``); ``data`` is converted to ``T`` when it is annotated, so a bad
    payload is refused with ``bad_args`` naming the field before the handler
    runs. Its return value is the result of the sender's ``room.send``.

    Example::

        @rtcore.rooms.message("move")
        async def move(self, player: Player, data: Move) -> None:
            self.state.cells[data.cell] = player.id
    """

    def mark(fn: F) -> F:
        setattr(fn, _MARK, type)
        return fn

    return mark


class Timer:
    """A pending timeout or interval of a room (returned by :class:`RoomClock`)."""

    __slots__ = ("args", "cancelled", "due", "every", "fn")

    def __init__(self, due: float, every: float | None, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.due = due
        self.every = every
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Stop it (an interval stops repeating)."""
        self.cancelled = True

    @property
    def active(self) -> bool:
        """Whether it will still fire."""
        return not self.cancelled


class RoomClock:
    """Time and timers of one room; callbacks run on the room's serial executor."""

    __slots__ = ("_now", "_schedule")  # one per room

    def __init__(self, now: Callable[[], float], schedule: Callable[[Timer], None]) -> None:
        self._now = now
        self._schedule = schedule

    @property
    def now(self) -> float:
        """The node's clock (a fake one under :class:`rtcore.testing.FakeClock`)."""
        return self._now()

    def set_timeout(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Call ``fn(*args)`` once, ``seconds`` from now (sync or async)."""
        if seconds < 0:
            raise ValueError(f"set_timeout: seconds must be >= 0, got {seconds}")
        timer = Timer(self._now() + seconds, None, fn, args)
        self._schedule(timer)
        return timer

    def set_interval(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Call ``fn(*args)`` every ``seconds`` until the timer is cancelled."""
        if seconds <= 0:
            raise ValueError(f"set_interval: seconds must be > 0, got {seconds}")
        timer = Timer(self._now() + seconds, seconds, fn, args)
        self._schedule(timer)
        return timer


class Room(Generic[S]):
    """Base class of a room type; subclass it as ``Room[MyState]``.

    A subclass overrides the class attributes ``max_clients``, ``tick_rate``,
    ``patch_rate`` and ``auto_dispose``; rtcore sets the instance attributes ``id``,
    ``code``, ``state``, ``clock`` and ``metadata`` before ``on_create``.

    Attributes:
        max_clients: Class attribute: seats (players, counted by user); 0
            means unlimited.
        tick_rate: Class attribute: ``on_tick`` calls per second (1-60), or
            ``None`` for no ticks.
        patch_rate: Class attribute: patches per second for messages, or
            ``None`` for one patch per message (see the attribute).
        auto_dispose: Class attribute: seconds the room may stay empty before
            it is disposed.
        id: The room id (its stream is ``room:{id}``).
        code: Short code to join a private room by.
        state: The authoritative state, an instance of the state type. Read
            and change it in any hook; the change is sent to every member as
            one patch after the hook returns.
        clock: Time and timers (:class:`RoomClock`).
        metadata: Free-form listing data (filtered by ``join_or_create`` and
            ``room.list``); assign or update it in a hook.

    Everything that must survive a change of owner lives in ``state``; timers
    survive it when their arguments are builtins and their callback is a
    method of the room, or a closure or lambda defined in a method of the
    room type that captures only the room, players and builtins (see
    docs/rooms.md).
    """

    max_clients: ClassVar[int] = 0
    #: Top-level state fields that are maps keyed by player id, each entry
    #: visible to that player only (a hand of cards); see docs/rooms.md.
    private_fields: ClassVar[tuple[str, ...]] = ()
    tick_rate: ClassVar[float | None] = None
    auto_dispose: ClassVar[float] = 0.0
    #: Patches per second for messages (``room.send``): ``None`` writes one
    #: patch after every message (turn-based rooms: the mover sees the turn
    #: pass at once); a rate (e.g. the ``tick_rate``, or 20 like Colyseus's
    #: 50 ms default) coalesces the changes of the messages in between into
    #: one patch, written at the next tick or timer or after ``1 / patch_rate``
    #: s, whichever comes first; each sender's ``room.send`` returns once that
    #: patch is written.
    patch_rate: ClassVar[float | None] = None
    #: Resolved from ``Room[MyState]`` when the subclass is defined.
    state_type: ClassVar[Any] = None
    _handlers: ClassVar[dict[str, str]] = {}

    id: str
    code: str
    state: S
    clock: RoomClock
    metadata: dict[str, Any]
    _actor: _Actor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Room:
                (arg,) = typing.get_args(base)
                if not isinstance(arg, TypeVar):
                    cls.state_type = arg
        handlers = dict(cls._handlers)
        for name, fn in vars(cls).items():
            kind = getattr(fn, _MARK, None)
            if kind is not None:
                handlers[kind] = name
        cls._handlers = handlers
        if cls.tick_rate is not None and not 1 <= cls.tick_rate <= 60:
            raise ValueError(f"{cls.__name__}.tick_rate must be 1..60 Hz or None, got {cls.tick_rate}")
        if cls.patch_rate is not None and not 1 <= cls.patch_rate <= 60:
            raise ValueError(f"{cls.__name__}.patch_rate must be 1..60 per second or None, got {cls.patch_rate}")
        if cls.max_clients < 0 or cls.auto_dispose < 0:
            raise ValueError(f"{cls.__name__}: max_clients and auto_dispose must be >= 0")

    # --- hooks (override) ------------------------------------------------------

    async def on_create(self, options: dict[str, Any]) -> None:
        """The room was created with the creator's ``options``."""

    async def on_join_attempt(self, player: Player, options: dict[str, Any]) -> None:
        """Accept ``player`` (return) or refuse (``raise Rejected(code)``) before a seat is given."""

    async def on_join(self, player: Player, options: dict[str, Any]) -> None:
        """``player`` took a seat."""

    async def on_drop(self, player: Player) -> None:
        """The last connection of ``player`` closed without ``room.leave``.

        Call :meth:`allow_reconnection` here to keep the seat for a while;
        otherwise :meth:`on_leave` follows at once.
        """

    async def on_reconnect(self, player: Player) -> None:
        """A dropped ``player`` joined again within the grace."""

    async def on_leave(self, player: Player, consented: bool) -> None:
        """``player`` lost the seat: ``room.leave`` (consented) or the drop grace ran out."""

    async def on_dispose(self) -> None:
        """The room stayed empty for ``auto_dispose`` seconds (or :meth:`dispose` was called)."""

    async def on_tick(self, dt: float) -> None:
        """Called ``tick_rate`` times a second with the seconds since the last tick."""

    async def on_message(self, player: Player, type: str, data: Any) -> Any:
        """Messages without a :func:`message` handler land here (default: refuse them)."""
        raise Rejected("unknown_message", f"room type has no handler for message {type!r}")

    # --- actions ---------------------------------------------------------------

    @property
    def players(self) -> list[Player]:
        """Members holding a seat (connected or within their drop grace), in join order."""
        return [Player(uid) for uid in self._actor.members]

    def connected(self, player: Player | str) -> bool:
        """Whether the player holds a seat and has not dropped."""
        m = self._actor.members.get(player if isinstance(player, str) else player.id)
        return m is not None and m.connected

    @property
    def locked(self) -> bool:
        """Whether joins are refused (``room_locked``)."""
        return self._actor.locked

    def lock(self) -> None:
        """Refuse further joins (reconnections within the grace still work)."""
        self._actor.locked = True

    def unlock(self) -> None:
        """Accept joins again."""
        self._actor.locked = False

    def allow_reconnection(self, player: Player, seconds: float) -> None:
        """Keep the dropped ``player``'s seat for ``seconds`` (call it in :meth:`on_drop`)."""
        self._actor.allow_reconnection(player.id, seconds)

    def send(self, player: Player | str, type: str, data: Any = None) -> None:
        """Send a message to every live connection of one player (not part of the room state).

        Sent after this hook's patch as an ephemeral ``msg`` frame
        (``node.send_to``) to the connections the player has open then, on
        any node: never stored, so a player with none never gets it (see
        docs/rooms.md, "Direct messages").
        """
        self._actor.outgoing.append(("dm", player if isinstance(player, str) else player.id, type, data))

    def broadcast(self, type: str, data: Any = None, *, exclude: Player | str | None = None) -> None:
        """Send a message to every member, in order with the patches, except ``exclude``."""
        ex = exclude.id if isinstance(exclude, Player) else exclude
        self._actor.outgoing.append(("bc", ex, type, data))

    def dispose(self) -> None:
        """Dispose of the room after this hook (``on_dispose`` runs, members are dropped)."""
        self._actor.dispose_requested = True


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async hook."""
    result = fn(*args)
    # A coroutine (an ``async def`` hook) or ``None`` (a plain one) is told
    # apart without ``inspect.isawaitable``, whose ABC check for a ``None``
    # result runs on every step of a room with plain hooks.
    if type(result) is _Coroutine:
        return await result
    if result is not None and inspect.isawaitable(result):
        result = await result
    return result


_Coroutine = types.CoroutineType

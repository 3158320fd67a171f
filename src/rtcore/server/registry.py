"""The server's list of open sessions (WebSocket connections and SSE streams).

A :class:`SessionRegistry` is owned by the :class:`~rtcore.server.runner.Server`;
each session driver adds itself while it runs. Everything outside the driver
(health, ``/metrics``, graceful shutdown, tests) goes through the registry's
public API and the read-only :class:`SessionInfo` snapshots, never through a
driver's own fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
from anyio.abc import TaskGroup

from .outbox import Outbox

__all__ = ["RegisteredSession", "SessionInfo", "SessionRegistry", "SubscriptionInfo"]


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """One subscription of a session, at the moment it was read.

    Attributes:
        stream: The stream.
        epoch: Epoch it is delivered in.
        delivered: Last offset queued to the subscriber.
        acked: Last offset the client acknowledged (None: never).
        last_sent: ``(offset, publish ts)`` of the newest live event queued
            and not yet acknowledged, or None.
    """

    stream: str
    epoch: str
    delivered: int
    acked: int | None = None
    last_sent: tuple[int, float] | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A read-only snapshot of one open session.

    Attributes:
        id: Session id.
        kind: ``"websocket"`` or ``"sse"``.
        principal: Authenticated principal id, or None.
        opened_at: Unix time the session started (node clock).
        subscriptions: Its subscriptions.
        queued_bytes: Bytes in its outbox now.
        queued_frames: Frames in its outbox now.
        bytes_out: Bytes its writer took so far.
        commands_in_flight: Commands running for it now.
    """

    id: str
    kind: Literal["websocket", "sse"]
    principal: str | None
    opened_at: float
    subscriptions: tuple[SubscriptionInfo, ...]
    queued_bytes: int
    queued_frames: int
    bytes_out: int
    commands_in_flight: int = 0

    def lag(self, heads: dict[str, int]) -> int:
        """Most events any of its subscriptions is behind, given each stream's head offset."""
        return max((heads[s.stream] - s.delivered for s in self.subscriptions if s.stream in heads), default=0)


class RegisteredSession(Protocol):
    """What a session driver gives the registry."""

    @property
    def id(self) -> str:
        """Session id."""
        ...

    @property
    def outbox(self) -> Outbox:
        """Its send queue (read-only use: counters)."""
        ...

    def info(self) -> SessionInfo:
        """A snapshot of its state."""
        ...

    async def drain(self, deadline: float) -> None:
        """Shutdown: finish in-flight work (up to ``deadline`` s), say goodbye, close.

        A session may also have ``drain_now() -> bool``: the same without a
        task when nothing needs waiting for (False: the registry awaits
        :meth:`drain` instead).
        """
        ...


class SessionRegistry:
    """The open sessions of one server.

    Iterating yields the registered session objects (for their :meth:`info`
    and outbox counters); :meth:`infos` yields snapshots.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, RegisteredSession] = {}
        # Created by the first changed() waiting for it: every connect and every
        # close notifies, and an event per notification nobody waits for cost
        # an allocation (an asyncio.Event with its deque, on asyncio) each.
        self._changed: anyio.Event | None = None
        self._draining: tuple[TaskGroup, float] | None = None
        #: Sessions ever registered.
        self.opened = 0

    def add(self, session: RegisteredSession) -> None:
        """List a session (its driver calls this when it starts)."""
        if session.id in self._sessions:
            raise ValueError(f"session id {session.id!r} is already registered")
        self._sessions[session.id] = session
        self.opened += 1
        self._notify()
        if self._draining is not None:
            tg, grace = self._draining
            _drain(session, tg, grace)

    def discard(self, session: RegisteredSession) -> None:
        """Unlist a session (its driver calls this when it ends); unknown ones are ignored."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            self._notify()

    def _notify(self) -> None:
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()

    async def changed(self) -> None:
        """Return at the next session added or removed."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[RegisteredSession]:
        return iter(list(self._sessions.values()))

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> RegisteredSession | None:
        """The session with this id, if open."""
        return self._sessions.get(session_id)

    def infos(self) -> list[SessionInfo]:
        """A snapshot of every open session."""
        return [s.info() for s in list(self._sessions.values())]

    async def drain(self, grace: float) -> None:
        """Shutdown: drain every session concurrently, including ones registered meanwhile.

        Returns when each session's :meth:`RegisteredSession.drain` returned.

        Args:
            grace: Seconds in-flight commands get to finish.
        """
        # A connection accepted just before the listener closed registers its
        # session a moment later: while this task group is open, add() hands
        # every new session to it at once (polling for newcomers missed those
        # that registered after the poll's last look — seen on trio).
        try:
            async with anyio.create_task_group() as tg:
                self._draining = (tg, grace)
                for session in list(self._sessions.values()):
                    _drain(session, tg, grace)
        finally:
            self._draining = None


def _drain(session: RegisteredSession, tg: TaskGroup, grace: float) -> None:
    """Drain one session: at once if it can (an optional ``drain_now() -> bool``,
    True when done), else in a task of ``tg``.

    Most sessions have nothing in flight at shutdown: a task each (with
    anyio's per-task bookkeeping) was a large part of the CPU of a shutdown
    with 10,000 connections.
    """
    drain_now = getattr(session, "drain_now", None)
    if drain_now is not None and drain_now():
        return
    tg.start_soon(session.drain, grace)

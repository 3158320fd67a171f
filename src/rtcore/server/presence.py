"""Stream presence: who is subscribed to a stream, on this server, and join/leave events.

``app.presence("chat:*", events=True)`` declares it (see
:meth:`rtcore.engine.app.App.presence`). The server reads its own
:class:`~rtcore.server.registry.SessionRegistry` (WebSocket and SSE sessions
with their subscriptions): a principal is present on a stream while at least
one of its sessions is subscribed, so three tabs of one user count once.

Events are coalesced: a :class:`PresenceAnnouncer` compares the subscribers
of each declared stream every ``interval`` seconds with what it announced
last and appends at most one ``presence`` event per stream and interval,
``{"joined": [ids], "left": [ids]}`` (sorted ids; a principal who left and came
back within one interval is in neither list).

The limit, by design: presence is **per server process**. Each server knows
only its own sessions; two servers behind a load balancer each answer
``GET /v1/streams/{s}/presence`` with their own subscribers (the answer names
the node) and each announces its own joins and leaves, so a user subscribed
through two servers who leaves one of them is announced as having left.
Anonymous subscribers are counted (``anonymous``), never named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import anyio

from ..engine.app import PresenceSpec
from ..engine.node import Node
from ..errors import RtcoreError
from .registry import SessionInfo, SessionRegistry

__all__ = ["PresenceAnnouncer", "stream_presence"]

log = logging.getLogger("rtcore.server.presence")

#: Type of the events a :class:`PresenceAnnouncer` appends.
EVENT_TYPE = "presence"


def stream_presence(infos: Iterable[SessionInfo], stream: str) -> tuple[dict[str, int], int]:
    """Who is subscribed to ``stream`` among ``infos``.

    Returns:
        ``({principal: connections}, anonymous connections)``.
    """
    named: dict[str, int] = {}
    anonymous = 0
    for info in infos:
        if not any(s.stream == stream for s in info.subscriptions):
            continue
        if info.principal is None:
            anonymous += 1
        else:
            named[info.principal] = named.get(info.principal, 0) + 1
    return named, anonymous


def _present(infos: Iterable[SessionInfo], specs: list[PresenceSpec], app: Any) -> dict[str, set[str]]:
    """Per stream with presence events, the named principals subscribed now."""
    out: dict[str, set[str]] = {}
    for info in infos:
        if info.principal is None:
            continue
        for sub in info.subscriptions:
            spec = app.presence_for(sub.stream)
            if spec is not None and spec.events:
                out.setdefault(sub.stream, set()).add(info.principal)
    return out


class PresenceAnnouncer:
    """Appends coalesced ``presence`` events to streams declared with ``events=True``.

    Args:
        node: The server's node (events are appended with ``node.publish``).
        sessions: The server's sessions.
    """

    def __init__(self, node: Node, sessions: SessionRegistry) -> None:
        self.node = node
        self.sessions = sessions
        self.specs = [s for s in node.app.presences if s.events]
        self._announced: dict[str, set[str]] = {}

    @property
    def interval(self) -> float:
        """Seconds between two looks (the smallest declared interval)."""
        return min((s.interval for s in self.specs), default=1.0)

    async def step(self) -> list[tuple[str, dict[str, list[str]]]]:
        """Compare the subscribers with the last announcement; append one event per changed stream.

        Returns:
            ``(stream, data)`` of each event appended.
        """
        now = _present(self.sessions.infos(), self.specs, self.node.app)
        sent: list[tuple[str, dict[str, list[str]]]] = []
        for stream in sorted(set(now) | set(self._announced)):
            before, after = self._announced.get(stream, set()), now.get(stream, set())
            if before == after:
                continue
            data = {"joined": sorted(after - before), "left": sorted(before - after)}
            try:
                await self.node.publish(stream, EVENT_TYPE, data)
            except RtcoreError as exc:
                # Not announced: the next step compares with the old set and tries again.
                log.warning("presence event for %s not appended: %s", stream, exc)
                continue
            sent.append((stream, data))
            if after:
                self._announced[stream] = after
            else:
                self._announced.pop(stream, None)
        return sent

    async def run(self) -> None:
        """Step every :attr:`interval` seconds until cancelled."""
        if not self.specs:
            return
        while True:
            await anyio.sleep(self.interval)
            await self.step()

"""Which principals have live connections on this node, and who wants to know.

The server's session driver reports every authenticated connection that
opens and closes; the node keeps a count per principal, so three tabs of one
user make one presence and the user goes offline only when the last tab
closes. Plugins (rooms) and applications watch the transitions instead of
reaching into the server's connection objects, which keeps the engine below
the server in the layers.

A connection may also register a :data:`~rtcore.engine.direct.Receiver`
with its principal: direct messages (``node.send_to``) that reach this node
for that principal are handed to every receiver registered for it.

Transitions are reported synchronously, from the driver's own task: a
watcher must not block (spawn a task with ``node.spawn`` for any I/O).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .direct import Receiver

__all__ = ["Presence", "PresenceWatcher"]

log = logging.getLogger("rtcore.engine.presence")

#: ``watcher(principal_id, online)``: called when a principal's first
#: connection on this node opens (``True``) and when its last one closes (``False``).
PresenceWatcher = Callable[[str, bool], None]


class Presence:
    """Connection counts per principal on one node."""

    def __init__(self) -> None:
        self._connections: dict[str, int] = {}
        self._watchers: list[PresenceWatcher] = []
        self._receivers: dict[str, list[Receiver]] = {}

    def connected(self, principal_id: str, receiver: Receiver | None = None) -> None:
        """A connection of ``principal_id`` authenticated.

        Args:
            principal_id: The principal.
            receiver: Where this connection takes the principal's direct
                messages (pass the same one to :meth:`disconnected`).
        """
        if receiver is not None:
            self._receivers.setdefault(principal_id, []).append(receiver)
        n = self._connections.get(principal_id, 0) + 1
        self._connections[principal_id] = n
        if n == 1:
            self._notify(principal_id, True)

    def disconnected(self, principal_id: str, receiver: Receiver | None = None) -> None:
        """A connection of ``principal_id`` closed (one that :meth:`connected` reported, with its receiver)."""
        if receiver is not None:
            receivers = self._receivers.get(principal_id)
            if receivers is not None and receiver in receivers:
                receivers.remove(receiver)
                if not receivers:
                    del self._receivers[principal_id]
        n = self._connections.get(principal_id, 0) - 1
        if n > 0:
            self._connections[principal_id] = n
            return
        self._connections.pop(principal_id, None)
        if n == 0:
            self._notify(principal_id, False)

    def online(self, principal_id: str) -> bool:
        """Whether ``principal_id`` has at least one live connection here."""
        return principal_id in self._connections

    def connections(self, principal_id: str) -> int:
        """How many live connections ``principal_id`` has here."""
        return self._connections.get(principal_id, 0)

    def receivers(self, principal_id: str) -> tuple[Receiver, ...]:
        """The direct-message receivers of ``principal_id``'s live connections here."""
        return tuple(self._receivers.get(principal_id, ()))

    def watch(self, watcher: PresenceWatcher) -> Callable[[], None]:
        """Call ``watcher`` on every online/offline transition; returns the unwatch function."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def _notify(self, principal_id: str, online: bool) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(principal_id, online)
            except Exception:
                # One faulty watcher must not break a connection's close for the others.
                log.exception("presence watcher %r failed", watcher)

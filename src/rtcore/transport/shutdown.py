"""Shared shutdown signal between the listener and every connection.

A graceful stop has three phases, and every connection needs to see them:

1. *started*: the listener stops accepting; idle keep-alive HTTP connections
   close at once; in-flight HTTP requests finish with ``Connection: close``;
   SSE streams end; WebSocket handlers are expected to send their ``bye``
   frame and close with 1001 (the session layer decides what to say).
2. *deadline*: whatever WebSocket is still open is closed by the transport
   itself with 1001 and a close handshake bounded by ``close_timeout``.
3. *hard stop*: the listener cancels every connection task still running.

:class:`Shutdown` carries phase 1 as an event and phase 2 as an absolute
deadline on anyio's clock, so a node can compute how long it may still wait
for in-flight commands (:meth:`Shutdown.remaining`).
"""

from __future__ import annotations

import math

import anyio

__all__ = ["Shutdown"]


class Shutdown:
    """A one-shot, server-wide "we are stopping" signal with a deadline.

    Create it inside a running event loop (it holds anyio events).
    """

    def __init__(self) -> None:
        self._started = anyio.Event()
        self._deadline = math.inf
        self._reason = ""

    @property
    def started(self) -> bool:
        """Whether the shutdown began."""
        return self._started.is_set()

    @property
    def deadline(self) -> float:
        """Absolute time (``anyio.current_time()`` clock) after which open
        connections are closed by force; ``inf`` until the shutdown starts."""
        return self._deadline

    @property
    def reason(self) -> str:
        """Why the server stops (sent as the close reason by the transport)."""
        return self._reason

    def remaining(self) -> float:
        """Seconds left before the deadline (``inf`` when not shutting down, never negative)."""
        return max(0.0, self._deadline - anyio.current_time())

    def begin(self, grace: float, reason: str = "server shutdown") -> None:
        """Start the shutdown; later calls only shorten the deadline.

        Args:
            grace: Seconds the application gets to finish in-flight work and
                close its connections itself.
            reason: Close reason used when the transport closes by force.
        """
        deadline = anyio.current_time() + max(0.0, grace)
        if not self._started.is_set():
            self._reason = reason
            self._deadline = deadline
            self._started.set()
        else:
            self._deadline = min(self._deadline, deadline)

    async def wait(self) -> None:
        """Return once the shutdown started."""
        await self._started.wait()

"""Direct messages in the Python clients: ``client.on_message(type, callback)``.

A direct message is an ephemeral ``msg`` frame (``ctx.send_to`` on the
server): it reaches the connections the principal has open when it is sent,
at most once, and is never replayed after a reconnect. Messages from a room
the client follows go to that room (``room.on_message``, ``direct``
changes); every other one goes to the callbacks registered here. Both
:class:`rtcore.client.Client` and :class:`rtcore.testing.TestClient` mix in
:class:`MessageClient`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from ..protocol.frames import Msg

__all__ = ["MessageClient"]

log = logging.getLogger("rtcore.client")

MessageCallback = Callable[[Any], Any]


class MessageClient:
    """The direct-message half of a client (a mixin)."""

    _message_callbacks: list[tuple[str | None, MessageCallback]]  # the client's __init__ sets it

    def on_message(self, type: str | None, callback: MessageCallback | None = None) -> Any:
        """Call ``callback(data)`` for each direct message of ``type`` not routed to a room
        (``None``: every one, called with the whole ``{"type", "data", "room"}``).

        Callbacks run synchronously in the client's reader, in arrival order;
        an exception is logged. Usable as a decorator: ``@client.on_message("invite")``.
        """

        def register(fn: MessageCallback) -> MessageCallback:
            self._message_callbacks.append((type, fn))
            return fn

        return register(callback) if callback is not None else register

    def _message(self, msg: Msg) -> None:
        for type_, fn in list(self._message_callbacks):
            if type_ is None:
                arg: Any = {"type": msg.type, "data": msg.data, "room": msg.room}
            elif type_ == msg.type:
                arg = msg.data
            else:
                continue
            try:
                result = fn(arg)
                if inspect.iscoroutine(result):
                    result.close()
                    raise TypeError("message callbacks must be plain functions")
            except Exception:
                log.exception("message callback %r failed", fn)

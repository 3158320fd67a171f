"""Rooms: authoritative game rooms on rtcore's streams (layer 5).

Declare a room type as a :class:`Room` subclass with a msgspec state type
and hooks, register it on an app with :func:`install` and
:meth:`Rooms.define`, and clients use the ``room.*`` commands. See
docs/rooms.md.

Example::

    import msgspec, rtcore
    from rtcore import rooms

    class Board(msgspec.Struct):
        clicks: int = 0

    app = rtcore.App("clicker")
    registry = rooms.install(app)

    @registry.define("clicker")
    class Clicker(rooms.Room[Board]):
        max_clients = 8

        @rooms.message("click")
        async def click(self, player: rooms.Player, data: None) -> int:
            self.state.clicks += 1
            return self.state.clicks
"""

from __future__ import annotations

from .room import Player, Room, RoomClock, Timer, message
from .runtime import RoomDoc, RoomIndex, Rooms, allowed, install

__all__ = ["Player", "Room", "RoomClock", "RoomDoc", "RoomIndex", "Rooms", "Timer", "allowed", "install", "message"]

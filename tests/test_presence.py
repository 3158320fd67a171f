"""``node.presence``: live connections per principal, as the session driver reports them."""

from __future__ import annotations

import anyio
import pytest

import rtcore
from rtcore.engine.presence import Presence
from rtcore.testing import connect, serve

pytestmark = pytest.mark.anyio


def test_three_tabs_are_one_presence() -> None:
    """Mutation: notify offline on every ``disconnected`` (not only the last) → fails."""
    p = Presence()
    seen: list[tuple[str, bool]] = []
    p.watch(lambda uid, online: seen.append((uid, online)))
    for _ in range(3):
        p.connected("ada")
    assert seen == [("ada", True)] and p.connections("ada") == 3
    p.disconnected("ada")
    p.disconnected("ada")
    assert seen == [("ada", True)] and p.online("ada")
    p.disconnected("ada")
    assert seen == [("ada", True), ("ada", False)] and not p.online("ada")


def test_a_failing_watcher_does_not_stop_the_others() -> None:
    """Mutation: let a watcher's exception propagate → the second watcher is never called → fails."""
    p = Presence()
    seen: list[str] = []

    def broken(uid: str, online: bool) -> None:
        raise RuntimeError("boom")

    p.watch(broken)
    unwatch = p.watch(lambda uid, online: seen.append(uid))
    p.connected("bob")
    assert seen == ["bob"]
    unwatch()
    p.disconnected("bob")
    assert seen == ["bob"]


def test_an_unknown_disconnect_is_ignored() -> None:
    p = Presence()
    seen: list[bool] = []
    p.watch(lambda uid, online: seen.append(online))
    p.disconnected("nobody")
    assert seen == [] and p.connections("nobody") == 0


async def test_the_session_driver_reports_authenticated_connections() -> None:
    """Mutation: drop ``node.presence.disconnected`` from the gateway's session end → fails."""
    app = rtcore.App()

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    async with serve(app) as node:
        async with connect(node, token="ada"), connect(node, token="ada"):
            assert node.presence.connections("ada") == 2
        with anyio.fail_after(5):
            while node.presence.online("ada"):
                await anyio.sleep(0.01)
        assert node.presence.connections("ada") == 0


async def test_anonymous_connections_are_not_counted() -> None:
    app = rtcore.App()
    seen: list[tuple[str, bool]] = []
    async with serve(app) as node:
        node.presence.watch(lambda uid, online: seen.append((uid, online)))
        async with connect(node):
            assert await connect_ping(node)
    assert seen == []


async def connect_ping(node: rtcore.Node) -> bool:
    async with connect(node) as client:
        await client.ping()
    return True

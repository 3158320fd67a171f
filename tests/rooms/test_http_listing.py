"""``GET /v1/rooms`` through a real :class:`rtcore.Server` and httpx: the rooms
plugin registers it with ``app.route`` at install (the server imports no rooms
code); filters by type and metadata; private rooms are never listed;
authorized as ``("list", "rooms")``; app routes are read-only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import rtcore
import rtcore.client
from rtcore import rooms
from tests.net.conftest import http_url, serving, ws_url

from .roomapp import make_app

pytestmark = pytest.mark.anyio


async def test_rooms_are_listed_over_http_filtered_by_type_and_metadata() -> None:
    """Two public rooms and one private: the listing shows the public ones; query
    parameters other than ``type`` filter on metadata (strings as is, other values
    by their JSON text); an unknown type is a 400 naming it; eve, whom the app's
    ``authorize`` refuses ``list`` on ``rooms``, gets 403; POST is 405.

    Mutation: drop the ``authorize`` call in ``Routes._app_route`` → eve gets 200
    → fails; ignore the metadata filters in the rooms route → ``?mode=ranked``
    lists the casual room too → fails.
    """
    app, _ = make_app(tick_rate=None)

    @app.authorize
    async def authz(principal: Any, action: str, resource: str) -> bool:
        if action == "list" and resource == "rooms":
            return getattr(principal, "id", None) != "eve"
        return rooms.allowed(principal, action, resource)

    async with serving(app) as server:
        async with (
            rtcore.client.connect(ws_url(server), token="alice") as alice,
            rtcore.client.connect(ws_url(server), token="bob") as bob,
            rtcore.client.connect(ws_url(server), token="carol") as carol,
        ):
            ranked = await alice.create("game", metadata={"mode": "ranked", "level": 2})
            casual = await bob.create("game", metadata={"mode": "casual", "level": 1})
            hidden = await carol.create("game", private=True, metadata={"mode": "ranked"})
            async with httpx.AsyncClient(headers={"authorization": "Bearer alice"}) as http:

                async def ids(query: str) -> list[str]:
                    r = await http.get(http_url(server, f"/v1/rooms{query}"))
                    assert r.status_code == 200, r.text
                    return [e["room_id"] for e in r.json()["rooms"]]

                assert await ids("?type=game") == sorted([ranked.id, casual.id])
                assert hidden.id not in await ids("")
                assert await ids("?type=game&mode=ranked") == [ranked.id]
                assert await ids("?level=1") == [casual.id]
                assert await ids("?mode=ranked&level=1") == []
                r = await http.get(http_url(server, "/v1/rooms?type=game&mode=casual"))
                entry = r.json()["rooms"][0]
                assert entry == {
                    "room_id": casual.id,
                    "type": "game",
                    "clients": 1,
                    "max_clients": 3,
                    "locked": False,
                    "metadata": {"mode": "casual", "level": 1},
                }
                r = await http.get(http_url(server, "/v1/rooms?type=chess"))
                assert r.status_code == 400 and r.json()["code"] == "unknown_room_type"
                assert "chess" in r.json()["message"]
                r = await http.post(http_url(server, "/v1/rooms"))
                assert r.status_code == 405
                r = await http.get(http_url(server, "/v1/rooms"), headers={"authorization": "Bearer eve"})
                assert r.status_code == 403 and r.json()["code"] == "forbidden"


async def test_app_routes_are_read_only_and_cannot_take_rtcore_paths() -> None:
    """``app.route`` accepts GET under ``/v1/`` only, outside the server's own routes."""
    app = rtcore.App("routes")

    async def handler(ctx: rtcore.Context, query: Any) -> Any:
        return {}

    for method, path in [("POST", "/v1/things"), ("GET", "/things"), ("GET", "/v1/streams/x"), ("GET", "/v1/cmd/x"), ("GET", "/v1/health")]:
        with pytest.raises(ValueError, match=r"read-only|clash"):
            app.route(method, path, handler)
    app.route("GET", "/v1/things", handler)
    with pytest.raises(ValueError, match="already registered"):
        app.route("GET", "/v1/things", handler)

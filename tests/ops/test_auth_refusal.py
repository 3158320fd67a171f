"""A refusal raised inside ``@app.authenticate`` is a 401 / close 1008 with the app's own code.

Before: ``Rejected("bad_token")`` in the hook escaped as a Rejected, whose HTTP
status for an application code is 400; the client saw "bad request" for a
refused credential.
"""

from __future__ import annotations

import json

import httpx
import pytest

import rtcore
from tests.net.conftest import http_url, serving, ws_url
from tests.ws_client import connect


def refusing_app(exc: rtcore.RtcoreError) -> rtcore.App:
    app = rtcore.App("refusing")

    @app.authenticate
    async def auth(token: str | None) -> rtcore.Principal:
        if token == "good":
            return rtcore.Principal("ada")
        raise exc

    @app.command("ping")
    async def ping(ctx: rtcore.Context) -> str:
        return "pong"

    return app


CASES = [
    (rtcore.Rejected("bad_token", "that token is revoked"), "bad_token", 401),
    (rtcore.AuthError("account locked", code="account_locked"), "account_locked", 401),
    (rtcore.AuthError("not here", code="forbidden"), "forbidden", 403),  # an explicit status is kept
]


@pytest.mark.parametrize(("exc", "code", "status"), CASES, ids=[c[1] for c in CASES])
@pytest.mark.anyio
async def test_http_answers_401_with_the_apps_code(exc: rtcore.RtcoreError, code: str, status: int) -> None:
    """Mutation: drop the ``except (AuthError, Rejected)`` clause in ``Node.authenticate`` → 400."""
    async with serving(refusing_app(exc)) as server:
        async with httpx.AsyncClient() as http:
            ok = await http.post(http_url(server, "/v1/cmd/ping"), headers={"authorization": "Bearer good"})
            assert ok.status_code == 200
            r = await http.post(http_url(server, "/v1/cmd/ping"), headers={"authorization": "Bearer bad"})
    assert (r.status_code, r.json()["code"]) == (status, code)
    if status == 401:
        assert r.headers["www-authenticate"] == 'Bearer realm="rtcore"'


@pytest.mark.anyio
async def test_websocket_answers_err_and_closes_1008_with_the_apps_code() -> None:
    """Mutation: close with 1002 in ``Session.auth_failed`` (or answer another code) → fails."""
    async with serving(refusing_app(rtcore.Rejected("bad_token", "that token is revoked"))) as server:
        async with connect(ws_url(server), subprotocols=["rtcore.v1.json"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"t": "hello", "v": 1, "token": "bad"}))
            err = json.loads(await ws.recv())
            with pytest.raises(Exception) as closed:
                await ws.recv()
    assert err["t"] == "err" and err["id"] is None and err["code"] == "bad_token"
    assert err["message"] == "that token is revoked" and err["retryable"] is False
    rcvd = getattr(closed.value, "rcvd", None)
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (1008, "bad_token")


@pytest.mark.anyio
async def test_a_hook_that_crashes_is_unauthenticated_not_internal() -> None:
    app = rtcore.App()

    @app.authenticate
    async def auth(token: str | None) -> rtcore.Principal:
        raise RuntimeError("bug in the hook")

    async with serving(app) as server:
        async with httpx.AsyncClient() as http:
            r = await http.get(http_url(server, "/v1/streams/room:1"), headers={"authorization": "Bearer x"})
    assert (r.status_code, r.json()["code"]) == (401, "unauthenticated")

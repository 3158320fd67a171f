"""``rtcore.auth.jwt``: every refusal has its documented code, claims become a Principal,
refusals reach clients as 401 / close 1008, and a token is refreshed over the live
connection before the session would close.

Tokens are made with PyJWT itself (HS256 secrets, RSA and EC keys from
``cryptography``), so these tests check the mapping rtcore adds, not a
hand-written JWT encoder.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import rtcore
import rtcore.auth
import rtcore.testing
from rtcore.errors import ERROR_CODES, AuthError, BackendError
from rtcore.protocol.frames import Err, Ok
from tests.net.conftest import http_url, serving, ws_url
from tests.ws_client import connect

SECRET = "s3cret-key-for-tests-only-" + "0123456789abcdef" * 4  # 64+ bytes: HS512 needs them
AUD = "game"
ISS = "https://auth.example"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "aud": AUD, "iss": ISS, "iat": now, "exp": now + 3600, "roles": ["player"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs(**over: Any) -> str:
    return pyjwt.encode(claims(**over), SECRET, algorithm="HS256")


def verifier(**kw: Any) -> rtcore.auth.JwtAuth:
    kw.setdefault("key", SECRET)
    return rtcore.auth.jwt(audience=AUD, issuer=ISS, **kw)


def unsigned(payload: dict[str, Any]) -> str:
    """An ``alg: none`` token (no signature), as an attacker would send it."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


# Each bad token and the code it must be refused with (the mutation to try: map
# that PyJWT error to another code, or drop its except clause, in jwt_auth.py).
REFUSALS = {
    "expired": (lambda: hs(exp=int(time.time()) - 120), "token_expired"),
    "not yet valid (nbf)": (lambda: hs(nbf=int(time.time()) + 600), "token_not_yet_valid"),
    "not yet valid (iat)": (lambda: hs(iat=int(time.time()) + 600), "token_not_yet_valid"),
    "wrong audience": (lambda: hs(aud="other-service"), "token_wrong_audience"),
    "no audience": (lambda: hs(aud=None), "token_wrong_audience"),
    "wrong issuer": (lambda: hs(iss="https://evil.example"), "token_wrong_issuer"),
    "wrong signature": (lambda: pyjwt.encode(claims(), "another-secret-" + "x" * 64, algorithm="HS256"), "token_bad_signature"),
    "alg none": (lambda: unsigned(claims()), "token_bad_algorithm"),
    "alg not allowed": (lambda: pyjwt.encode(claims(), SECRET, algorithm="HS512"), "token_bad_algorithm"),
    "garbage": (lambda: "not.a.jwt", "token_malformed"),
    "no exp": (lambda: hs(exp=None), "token_malformed"),
    "no sub": (lambda: hs(sub=None), "token_malformed"),
    "roles not strings": (lambda: hs(roles=[1, 2]), "token_malformed"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.anyio
async def test_each_bad_token_is_refused_with_its_documented_code(case: str) -> None:
    """Mutation: in ``JwtAuth.decode`` map ``InvalidAudienceError`` to ``token_malformed``
    → the "wrong audience" cases fail (any other except clause: its own case)."""
    make, code = REFUSALS[case]
    with pytest.raises(AuthError) as err:
        await verifier()(make())
    assert err.value.code == code
    assert code in ERROR_CODES and err.value.http_status == 401
    assert err.value.retryable is (code == "token_expired")


@pytest.mark.anyio
async def test_no_token_is_unauthenticated() -> None:
    with pytest.raises(AuthError) as err:
        await verifier()(None)
    assert err.value.code == "unauthenticated"


@pytest.mark.anyio
async def test_claims_become_the_principal() -> None:
    """Mutation: drop ``expires_at`` from ``JwtAuth.principal`` → fails (no refresh deadline)."""
    exp = int(time.time()) + 600
    p = await verifier()(hs(sub="bob", exp=exp, roles=["admin", "player"], team="red"))
    assert p == rtcore.Principal("bob", frozenset({"admin", "player"}), float(exp), p.claims)
    assert p.claims["team"] == "red"
    # OAuth style: one space-separated string.
    p2 = await verifier(roles_claim="scope")(hs(scope="read write"))
    assert p2.roles == frozenset({"read", "write"})


@pytest.mark.anyio
async def test_leeway_accepts_a_token_just_expired() -> None:
    token = hs(exp=int(time.time()) - 30)
    with pytest.raises(AuthError):
        await verifier()(token)
    assert (await verifier(leeway=300)(token)).id == "alice"


def _rsa() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


@pytest.mark.anyio
async def test_rs256_and_es256_keys() -> None:
    rsa_key, rsa_pem = _rsa()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    rs = verifier(key=rsa_pem, algorithms=["RS256"])
    es = verifier(key=ec_pem, algorithms=["ES256"])
    assert (await rs(pyjwt.encode(claims(), rsa_key, algorithm="RS256"))).id == "alice"
    assert (await es(pyjwt.encode(claims(), ec_key, algorithm="ES256"))).id == "alice"
    # A token signed by another key of the same kind.
    other, _ = _rsa()
    with pytest.raises(AuthError) as err:
        await rs(pyjwt.encode(claims(), other, algorithm="RS256"))
    assert err.value.code == "token_bad_signature"
    # Algorithm confusion: an HS256 token "signed" with the public key as secret.
    with pytest.raises(AuthError) as err:
        await rs(pyjwt.encode(claims(), "x" * 40, algorithm="HS256"))
    assert err.value.code == "token_bad_algorithm"


def test_configuration_mistakes_are_refused_at_once(tmp_path: Path) -> None:
    """Mutation: drop the family check in ``JwtAuth.__init__`` → the mixed-algorithms case passes silently."""
    with pytest.raises(ValueError, match="exactly one"):
        rtcore.auth.jwt()
    with pytest.raises(ValueError, match="none"):
        rtcore.auth.jwt(SECRET, algorithms=["none"])
    with pytest.raises(ValueError, match="mix key types"):
        rtcore.auth.jwt(SECRET, algorithms=["HS256", "RS256"])
    with pytest.raises(ValueError, match="does not exist"):
        rtcore.auth.jwt(jwks=tmp_path / "missing.json", algorithms=["RS256"])


def _jwks(public: Any, kid: str) -> dict[str, Any]:
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(public))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return {"keys": [jwk]}


@pytest.mark.anyio
async def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    key, _ = _rsa()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(key.public_key(), "k1")))
    auth = rtcore.auth.jwt(jwks=path, algorithms=["RS256"], audience=AUD, issuer=ISS)
    good = pyjwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
    assert (await auth(good)).id == "alice"
    unknown_kid = pyjwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k9"})
    with pytest.raises(AuthError) as err:
        await auth(unknown_kid)
    assert err.value.code == "token_bad_signature"
    with pytest.raises(AuthError) as err:
        await auth(unsigned(claims()))
    assert err.value.code == "token_bad_algorithm"


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, list[int], Any]]:
    """A JWKS over HTTP on loopback (a thread: PyJWKClient fetches with urllib)."""
    key, _ = _rsa()
    body = json.dumps(_jwks(key.public_key(), "k1")).encode()
    hits: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(1)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json", hits, key
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.anyio
async def test_jwks_url_is_fetched_once_and_cached(jwks_server: tuple[str, list[int], Any]) -> None:
    """Mutation: ``cache_keys=False, cache_jwk_set=False`` in ``JwtAuth.__init__`` → 3 fetches."""
    url, hits, key = jwks_server
    auth = rtcore.auth.jwt(jwks=url, algorithms=["RS256"], audience=AUD, issuer=ISS)
    for _ in range(3):
        token = pyjwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
        assert (await auth(token)).id == "alice"
    assert len(hits) == 1


@pytest.mark.anyio
async def test_an_unreachable_jwks_is_backend_unavailable_not_the_clients_fault() -> None:
    """Mutation: drop the ``PyJWKClientConnectionError`` clause → ``token_bad_signature`` (401) instead of 503."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    auth = rtcore.auth.jwt(jwks=f"http://127.0.0.1:{port}/jwks.json", algorithms=["RS256"], jwks_timeout=2)
    key, _ = _rsa()
    with pytest.raises(BackendError) as err:
        await auth(pyjwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"}))
    assert err.value.code == "backend_unavailable" and err.value.http_status == 503


def jwt_app() -> rtcore.App:
    app = rtcore.App("jwt")
    app.authenticate(verifier())

    @app.command("whoami")
    async def whoami(ctx: rtcore.Context) -> dict[str, Any]:
        assert ctx.principal is not None
        return {"id": ctx.principal.id, "roles": sorted(ctx.principal.roles)}

    return app


@pytest.mark.anyio
async def test_refusals_reach_clients_as_401_and_close_1008() -> None:
    """Over HTTP: 401 with the code and ``WWW-Authenticate``; over WebSocket: ``err`` + close 1008."""
    app = jwt_app()
    async with serving(app) as server:
        async with httpx.AsyncClient() as http:
            ok = await http.post(http_url(server, "/v1/cmd/whoami"), headers={"authorization": f"Bearer {hs()}"})
            assert ok.status_code == 200 and ok.json()["result"] == {"id": "alice", "roles": ["player"]}
            bad = await http.post(http_url(server, "/v1/cmd/whoami"), headers={"authorization": f"Bearer {hs(aud='x')}"})
            assert bad.status_code == 401 and bad.json()["code"] == "token_wrong_audience"
            assert bad.headers["www-authenticate"].startswith("Bearer")
        async with connect(ws_url(server), subprotocols=["rtcore.v1.json"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"t": "hello", "v": 1, "token": unsigned(claims())}))
            err = json.loads(await ws.recv())
            assert err["t"] == "err" and err["code"] == "token_bad_algorithm"
            with pytest.raises(Exception) as closed:
                await ws.recv()
            rcvd = getattr(closed.value, "rcvd", None)
            assert rcvd is not None and rcvd.code == 1008 and rcvd.reason == "token_bad_algorithm"


async def reply_to(client: rtcore.testing.TestClient, rid: int) -> Any:
    """The ``ok``/``err`` frame answering request ``rid`` (earlier replies are skipped)."""
    while True:
        frame = await client.next_frame(types=(Ok, Err))
        if frame.id == rid:
            return frame


@pytest.mark.anyio
async def test_token_refresh_over_the_live_connection() -> None:
    """A session whose JWT expires gets ``token_expired``; an ``auth`` frame with a fresh
    JWT of the same subject keeps it open; a fresh JWT of another subject closes it (1008).

    Mutation: in the gateway's ``_authenticate`` drop the same-principal check → the
    last part fails (the session stays open as ``mallory``).
    """
    app = jwt_app()
    clock = rtcore.testing.FakeClock(start=time.time())
    # A long idle timeout: the fake clock jumps minutes without pings.
    async with rtcore.testing.serve(app, clock=clock, limits=rtcore.Limits(idle_timeout=86_400)):
        async with rtcore.testing.connect(app, token=hs(exp=int(time.time()) + 60)) as client:
            assert (await client.command("whoami"))["id"] == "alice"
            # Before expiry: refresh ahead of time (the server accepts auth at any time).
            await client.send_raw(json.dumps({"t": "auth", "id": 900, "token": hs(exp=int(time.time()) + 600)}))
            reply = await reply_to(client, 900)
            assert isinstance(reply, Ok) and reply.result == {"principal": "alice"}
            # Past the first token's exp: the refreshed expiry holds, nothing is sent.
            clock.advance(120)
            assert (await client.command("whoami"))["id"] == "alice"
            # Past the refreshed one: token_expired, then a refresh within the grace.
            clock.advance(600)
            notice = await client.next_frame(types=(Err,))
            assert (notice.id, notice.code, notice.retryable) == (None, "token_expired", True)
            await client.send_raw(json.dumps({"t": "auth", "id": 901, "token": hs(exp=int(time.time()) + 3600)}))
            reply = await reply_to(client, 901)
            assert isinstance(reply, Ok)
            clock.advance(60)  # beyond token_grace: still open, the new exp counts
            assert (await client.command("whoami"))["id"] == "alice"
            await client.send_raw(json.dumps({"t": "auth", "id": 902, "token": hs(sub="mallory")}))
            closed = await client.wait_closed()
            assert closed.close_code == 1008

"""JWT authentication: an ``@app.authenticate`` hook on PyJWT.

Why PyJWT: it is the maintained reference implementation for Python, refuses
``alg: none`` unless asked, guards against algorithm confusion (a public key
used as an HMAC secret), and ships a JWKS client with key caching. rtcore only
maps its verdicts to documented error codes and its claims to a
:class:`~rtcore.engine.app.Principal`.

Refusals (all :class:`~rtcore.errors.AuthError`, HTTP 401, WebSocket close
1008 at ``hello``/``auth``):

=========================  ===================================================
code                       when
=========================  ===================================================
``unauthenticated``        no token at all
``token_expired``          ``exp`` is past (beyond ``leeway``); retryable: a
                           client with a token provider fetches a fresh one
``token_not_yet_valid``    ``nbf`` or ``iat`` is in the future
``token_wrong_audience``   ``aud`` does not match (or is missing)
``token_wrong_issuer``     ``iss`` does not match (or is missing)
``token_bad_signature``    the signature does not verify / no JWKS key matches
``token_bad_algorithm``    ``alg`` is ``none`` or not in ``algorithms``
``token_malformed``        undecodable, or a required claim missing or mistyped
=========================  ===================================================

A JWKS that cannot be fetched is not the client's fault: that is
``backend_unavailable`` (503, retryable).

Refresh: the hook returns the token's ``exp`` as ``Principal.expires_at``; the
session sends ``err token_expired`` at that time and the client sends an
``auth`` frame with a fresh token for the same principal (see
docs/protocol.md, rule 10). Send it a little *before* expiry to avoid the
notice at all: the server accepts ``auth`` at any time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from ..engine.app import Principal
from ..errors import AuthError, BackendError

__all__ = ["JwtAuth", "jwt"]

_FAMILIES = {"HS": "HMAC", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "EdDSA"}


def _family(alg: str) -> str:
    return _FAMILIES.get(alg[:2], alg)


def _import_pyjwt() -> Any:
    try:
        import jwt as pyjwt
    except ImportError as exc:
        raise ImportError(f"rtcore.auth.jwt needs an extra: pip install 'rtcore[jwt]' ({exc})", name=exc.name) from exc
    return pyjwt


class _FileJwks:
    """A JWKS file, with PyJWKClient's ``get_signing_key_from_jwt``.

    Read at construction and again when a token names a ``kid`` the file did
    not have (keys were rotated), so a rotation needs no restart.
    """

    def __init__(self, pyjwt: Any, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"JWKS file {str(path)!r} does not exist")
        self._pyjwt = pyjwt
        self._path = path
        self._keys = self._load()

    def _load(self) -> dict[str | None, Any]:
        try:
            jwk_set = self._pyjwt.PyJWKSet.from_json(self._path.read_text(encoding="utf-8"))
        except (OSError, self._pyjwt.PyJWTError) as exc:
            raise ValueError(f"cannot read the JWKS file {str(self._path)!r}: {exc}") from None
        return {k.key_id: k for k in jwk_set.keys}

    def get_signing_key_from_jwt(self, token: str) -> Any:
        kid = self._pyjwt.get_unverified_header(token).get("kid")
        if kid not in self._keys:
            try:
                self._keys = self._load()
            except ValueError as exc:
                raise self._pyjwt.PyJWKClientError(str(exc)) from None
        if kid not in self._keys:
            if kid is None and len(self._keys) == 1:
                return next(iter(self._keys.values()))
            raise self._pyjwt.PyJWKClientError(f"no key with kid {kid!r} in {str(self._path)!r}")
        return self._keys[kid]


class JwtAuth:
    """A configured JWT verifier; call it with a token (it is the authenticate hook).

    Made by :func:`jwt`; see there for the arguments.
    """

    def __init__(
        self,
        *,
        key: str | bytes | None,
        jwks: str | os.PathLike[str] | None,
        algorithms: Sequence[str],
        audience: str | Sequence[str] | None,
        issuer: str | Sequence[str] | None,
        leeway: float,
        subject_claim: str,
        roles_claim: str | None,
        require: Sequence[str],
        jwks_cache_seconds: float,
        jwks_timeout: float,
    ) -> None:
        self._pyjwt = _import_pyjwt()
        if (key is None) == (jwks is None):
            raise ValueError("give exactly one of key= (a secret or PEM key) and jwks= (a JWKS URL or file)")
        algs = list(algorithms)
        if not algs:
            raise ValueError("algorithms must name at least one algorithm, e.g. ['HS256']")
        if any(a.lower() == "none" for a in algs):
            raise ValueError("the 'none' algorithm accepts unsigned tokens and is never allowed")
        if len({_family(a) for a in algs}) > 1:
            # One key for HS256 and RS256 is the algorithm-confusion attack.
            raise ValueError(f"algorithms {algs} mix key types; use one family (HS*, RS*/PS*, ES* or EdDSA)")
        self.algorithms = algs
        self.audience = audience if audience is None or isinstance(audience, str) else list(audience)
        self.issuer = issuer if issuer is None or isinstance(issuer, str) else list(issuer)
        self.leeway = float(leeway)
        self.subject_claim = subject_claim
        self.roles_claim = roles_claim
        self.require = list(require)
        self._key = key
        self._jwks_client: Any = None
        if jwks is not None:
            uri = str(jwks)
            self.jwks_uri = uri
            if "://" in uri:
                self._jwks_client = self._pyjwt.PyJWKClient(
                    uri, cache_keys=True, lifespan=jwks_cache_seconds, timeout=jwks_timeout
                )
            else:
                # PyJWKClient fetches http(s) only (on purpose): a file is read here.
                self._jwks_client = _FileJwks(self._pyjwt, Path(uri))

    async def __call__(self, token: str | None) -> Principal:
        """Verify ``token`` and return its principal.

        Raises:
            AuthError: The token is missing or refused (codes in the module docstring).
            BackendError: The JWKS could not be fetched.
        """
        if not token:
            raise AuthError("a token is required")
        key: Any = self._key
        if self._jwks_client is not None:
            self._check_header(token)  # before any fetch: alg none never costs a request
            key = await anyio.to_thread.run_sync(self._jwks_key, token)
        return self.decode(token, key)

    def _check_header(self, token: str) -> dict[str, Any]:
        pyjwt = self._pyjwt
        try:
            header: dict[str, Any] = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            raise AuthError(f"the token cannot be decoded: {exc}", code="token_malformed") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"token algorithm {alg!r} is not allowed (allowed: {', '.join(self.algorithms)})", code="token_bad_algorithm")
        return header

    def _jwks_key(self, token: str) -> Any:
        pyjwt = self._pyjwt
        try:
            return self._jwks_client.get_signing_key_from_jwt(token).key
        except pyjwt.PyJWKClientConnectionError as exc:
            raise BackendError(f"the JWKS at {self.jwks_uri} could not be fetched: {exc}") from None
        except pyjwt.PyJWKClientError as exc:
            raise AuthError(f"no key of the JWKS verifies this token: {exc}", code="token_bad_signature") from None
        except pyjwt.PyJWTError as exc:
            raise AuthError(f"the token cannot be decoded: {exc}", code="token_malformed") from None

    def decode(self, token: str, key: Any = None) -> Principal:
        """Verify ``token`` synchronously with ``key`` (default: the configured key).

        Raises:
            AuthError: The token is refused.
        """
        pyjwt = self._pyjwt
        self._check_header(token)
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token,
                key=self._key if key is None else key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": self.require},
            )
        except pyjwt.ExpiredSignatureError:
            raise AuthError("the token expired; get a fresh one", code="token_expired") from None
        except pyjwt.ImmatureSignatureError:
            raise AuthError("the token is not valid yet (nbf/iat in the future)", code="token_not_yet_valid") from None
        except pyjwt.InvalidAudienceError:
            raise AuthError("the token is not for this audience", code="token_wrong_audience") from None
        except pyjwt.InvalidIssuerError:
            raise AuthError("the token has the wrong issuer", code="token_wrong_issuer") from None
        except pyjwt.MissingRequiredClaimError as exc:
            code = {"aud": "token_wrong_audience", "iss": "token_wrong_issuer"}.get(exc.claim, "token_malformed")
            raise AuthError(f"the token has no {exc.claim!r} claim", code=code) from None
        except pyjwt.InvalidAlgorithmError:
            raise AuthError("the token's algorithm is not allowed", code="token_bad_algorithm") from None
        except pyjwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify", code="token_bad_signature") from None
        except pyjwt.PyJWTError as exc:
            raise AuthError(f"the token cannot be decoded: {exc}", code="token_malformed") from None
        return self.principal(claims)

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        """Map verified claims to a :class:`Principal` (``sub`` → id, ``roles``, ``exp``).

        Raises:
            AuthError: ``token_malformed``: no subject, or roles that are not strings.
        """
        subject = claims.get(self.subject_claim)
        if not isinstance(subject, str | int) or isinstance(subject, bool) or subject == "":
            raise AuthError(f"the token has no usable {self.subject_claim!r} claim", code="token_malformed")
        roles: frozenset[str] = frozenset()
        if self.roles_claim is not None and self.roles_claim in claims:
            raw = claims[self.roles_claim]
            if isinstance(raw, str):  # OAuth "scope" style: space-separated
                roles = frozenset(raw.split())
            elif isinstance(raw, list) and all(isinstance(r, str) for r in raw):
                roles = frozenset(raw)
            else:
                raise AuthError(f"the token's {self.roles_claim!r} claim must be a list of strings", code="token_malformed")
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        return Principal(str(subject), roles, expires_at, dict(claims))


def jwt(
    key: str | bytes | None = None,
    *,
    algorithms: Sequence[str] = ("HS256",),
    jwks: str | os.PathLike[str] | None = None,
    audience: str | Sequence[str] | None = None,
    issuer: str | Sequence[str] | None = None,
    leeway: float = 0.0,
    subject_claim: str = "sub",
    roles_claim: str | None = "roles",
    require: Sequence[str] = ("exp",),
    jwks_cache_seconds: float = 300.0,
    jwks_timeout: float = 10.0,
) -> JwtAuth:
    """An ``@app.authenticate`` hook that accepts signed JWTs.

    Example::

        app.authenticate(rtcore.auth.jwt(key=os.environ["JWT_SECRET"], audience="game", issuer="https://auth.example"))
        app.authenticate(rtcore.auth.jwt(jwks="https://auth.example/.well-known/jwks.json", algorithms=["RS256"]))

    Args:
        key: The HMAC secret (HS*) or the PEM public key (RS*, PS*, ES*, EdDSA).
        algorithms: Accepted ``alg`` values, all of one key type (never ``none``).
        jwks: Instead of ``key``: a JWKS URL (``https://...``) or file; the key
            is picked by the token's ``kid`` and cached for ``jwks_cache_seconds``.
            The fetch runs in a worker thread, never on the event loop.
        audience: Required ``aud`` (one value or any of several).
        issuer: Required ``iss`` (one value or any of several).
        leeway: Seconds of clock skew allowed for ``exp``, ``nbf`` and ``iat``.
        subject_claim: The claim that becomes ``Principal.id``.
        roles_claim: The claim that becomes ``Principal.roles`` (a list of
            strings, or one space-separated string); ``None``: no roles.
        require: Claims that must be present (``exp`` by default: a token
            that never expires cannot be refreshed or revoked by time).
        jwks_cache_seconds: How long a fetched JWKS is kept.
        jwks_timeout: Seconds one JWKS fetch may take.

    Returns:
        The hook; ``Principal.expires_at`` is the token's ``exp`` and
        ``Principal.claims`` all of its claims.

    Raises:
        ImportError: PyJWT is not installed (``pip install 'rtcore[jwt]'``).
        ValueError: Neither or both of ``key`` and ``jwks``; no algorithm,
            ``none``, or algorithms of different key types; a JWKS file that
            does not exist.
    """
    return JwtAuth(
        key=key,
        jwks=jwks,
        algorithms=algorithms,
        audience=audience,
        issuer=issuer,
        leeway=leeway,
        subject_claim=subject_claim,
        roles_claim=roles_claim,
        require=require,
        jwks_cache_seconds=jwks_cache_seconds,
        jwks_timeout=jwks_timeout,
    )


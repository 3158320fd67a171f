"""The WebSocket opening handshake, server side (sans-IO).

The HTTP layer parses the upgrade request with h11; this module decides, from
the request's method and headers alone, whether to accept it and with what:
RFC 6455 §4.2 checks, the ``Origin`` allowlist, subprotocol negotiation and
(optionally) permessage-deflate. It returns either a :class:`Handshake` (the
101 headers and the negotiated options) or raises
the owner class of its code (:class:`~rtcore.errors.BadRequest`, ...) with the status to answer, before
anything is upgraded. Keeping it free of I/O makes every refusal testable
without sockets.

Subprotocols: ``rtcore.v1.json`` (text frames) and ``rtcore.v1.msgpack``
(binary frames). A client that offers none gets JSON and no
``Sec-WebSocket-Protocol`` header (answering one it did not offer would fail
its handshake); a client that offers only unknown ones is refused with 400
rather than silently spoken to in a protocol it did not ask for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final, Literal

from wsproto.extensions import Extension

from ..errors import AuthError, BadRequest
from .config import ServerLimits, WebSocketPolicy
from .deflate import BoundedPerMessageDeflate
from .messages import Headers

__all__ = ["SUBPROTOCOLS", "Handshake", "accept_key", "negotiate"]

#: Subprotocol name → encoding, in our order of preference.
SUBPROTOCOLS: Final[dict[str, Literal["json", "msgpack"]]] = {
    "rtcore.v1.json": "json",
    "rtcore.v1.msgpack": "msgpack",
}
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True, slots=True)
class Handshake:
    """An accepted upgrade.

    Attributes:
        encoding: ``"json"`` or ``"msgpack"``.
        subprotocol: The subprotocol we answer with, or ``None``.
        headers: Headers of the 101 response.
        extensions: Negotiated wsproto extensions (empty unless deflate).
    """

    encoding: Literal["json", "msgpack"]
    subprotocol: str | None
    headers: Headers
    extensions: list[Extension]


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


def _tokens(headers: Headers, name: bytes) -> list[str]:
    """Comma-separated list values of a header that may repeat (RFC 9110 §5.6.1)."""
    out: list[str] = []
    for key, value in headers:
        if key != name:
            continue
        if b"," not in value:  # one token: the common case, without the split
            token = value.decode("latin-1").strip()
            if token:
                out.append(token)
            continue
        out.extend(t.strip() for t in value.decode("latin-1").split(",") if t.strip())
    return out


def is_websocket_upgrade(headers: Headers) -> bool:
    """Whether the request asks to upgrade to WebSocket."""
    return any(t.lower() == "websocket" for t in _tokens(headers, b"upgrade"))


def negotiate(
    method: bytes,
    http_version: bytes,
    headers: Headers,
    policy: WebSocketPolicy,
    limits: ServerLimits,
) -> Handshake:
    """Validate an upgrade request and choose its options.

    Args:
        method: Request method.
        http_version: ``b"1.1"`` (anything else is refused).
        headers: Request headers (lower-case names).
        policy: Origins, deflate.
        limits: For the deflate inflate cap.

    Returns:
        The accepted handshake.

    Raises:
        BadRequest: 400 malformed upgrade or no known subprotocol, 405 not
            GET, 426 unsupported WebSocket version.
        AuthError: 403 origin refused.
    """
    if method != b"GET":
        raise BadRequest("a WebSocket upgrade must be a GET", code="method_not_allowed", headers=((b"allow", b"GET"),))
    if http_version != b"1.1":
        raise BadRequest("a WebSocket upgrade needs HTTP/1.1")
    if not any(t.lower() == "upgrade" for t in _tokens(headers, b"connection")):
        raise BadRequest("missing 'Connection: Upgrade'")
    versions = _values(headers, b"sec-websocket-version")
    if versions != [b"13"]:
        raise BadRequest("unsupported WebSocket version, only 13 is spoken", http_status=426, headers=((b"sec-websocket-version", b"13"),))
    keys = _values(headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise BadRequest("missing or invalid Sec-WebSocket-Key")

    origin_values = _values(headers, b"origin")
    if policy.allowed_origins is not None:
        origin = origin_values[0].decode("latin-1") if len(origin_values) == 1 else None
        if origin is None or origin not in policy.allowed_origins:
            raise AuthError(f"origin {origin!r} is not allowed", code="forbidden")

    offered = _tokens(headers, b"sec-websocket-protocol")
    subprotocol: str | None = None
    encoding: Literal["json", "msgpack"] = "json"
    if offered:
        subprotocol = next((p for p in offered if p in SUBPROTOCOLS), None)
        if subprotocol is None:
            supported = ", ".join(SUBPROTOCOLS)
            raise BadRequest(f"no supported subprotocol offered (supported: {supported})")
        encoding = SUBPROTOCOLS[subprotocol]

    response: Headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_key(keys[0].strip())),
    ]
    if subprotocol is not None:
        response.append((b"sec-websocket-protocol", subprotocol.encode("ascii")))

    extensions: list[Extension] = []
    if policy.permessage_deflate:
        for offer in _tokens(headers, b"sec-websocket-extensions"):
            if offer.split(";", 1)[0].strip().lower() != "permessage-deflate":
                continue
            deflate = BoundedPerMessageDeflate(limits.max_message_bytes)
            try:
                accepted = deflate.accept(offer)
            except ValueError:  # a malformed parameter value: decline this offer
                continue
            if accepted is None or accepted is False:
                continue
            params = accepted if isinstance(accepted, str) else ""
            value = "permessage-deflate" + (f"; {params}" if params else "")
            response.append((b"sec-websocket-extensions", value.encode("ascii")))
            extensions.append(deflate)
            break
    return Handshake(encoding, subprotocol, response, extensions)


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False

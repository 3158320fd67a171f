"""Idempotency rules (sans-IO), one layer for WebSocket and HTTP.

Modeled on Stripe and the IETF Idempotency-Key draft:

* the scope is (principal, key); the fingerprint is the command name plus the
  canonical (sorted-map msgpack) encoding of its validated arguments, so JSON
  and MessagePack, WebSocket and HTTP all produce the same fingerprint;
* same key, same fingerprint, finished: the stored outcome is replayed;
* same key, other fingerprint: ``idempotency_key_reused`` (HTTP 422);
* same key, still executing: ``idempotency_in_progress`` (HTTP 409, retryable);
* results and non-retryable errors are kept for a TTL (24 h by default);
  retryable errors release the key so the retry runs again;
* a key stays bound to the fingerprint of its first request for the TTL,
  whatever happened to that request: a released key (retryable failure) or a
  lapsed claim (the node died, or the command outlived its lease) can be taken
  again only by the same command with the same arguments. Otherwise a retryable
  failure whose effect did land (a database commit whose answer was lost) would
  let another request under the same key run as well: two effects, one key.

Stores only do the atomic claim (:meth:`IdempotencyStore.begin`); the decision
below is the same for every engine.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from ..errors import BadRequest, IdempotencyError
from .codec import canonical
from .types import IdempotencyRecord, Outcome

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "MAX_KEY_LENGTH",
    "Execute",
    "Replay",
    "claimable",
    "decide",
    "fingerprint",
    "scope_of",
]

#: How long results are kept (seconds).
DEFAULT_TTL: Final = 24 * 3600.0
#: How long a pending claim lasts before another node may take the key over.
DEFAULT_LEASE: Final = 60.0
#: Longest accepted idempotency key.
MAX_KEY_LENGTH: Final = 255


def fingerprint(name: str, args: Any) -> bytes:
    """Fingerprint of a command: its name and canonical arguments (32 bytes).

    BLAKE2b-256 of the UTF-8 name, a zero byte and the canonical MessagePack
    of the arguments. Stored records keep it for their TTL, so these bytes
    must not change between versions (a retry after an upgrade would get
    ``idempotency_key_reused``); ``tests/test_codec.py`` pins them.
    """
    # str_keys: sorted MessagePack needs str keys (dict[int, ...] args would
    # raise); order: sets become sorted lists, independent of hash order.
    # One hash call over the joined input: the same digest as updating it
    # piece by piece, with fewer calls per keyed command.
    body = canonical(msgspec.to_builtins(args, str_keys=True, order="sorted"))
    return hashlib.blake2b(b"%s\x00%s" % (name.encode(), body), digest_size=32).digest()


def scope_of(principal: str | None) -> str:
    """Scope string for a principal (anonymous callers share one scope)."""
    return f"p:{principal}" if principal is not None else "anon"


class Execute(msgspec.Struct, frozen=True):
    """Decision: the caller owns the key and must run the command."""


class Replay(msgspec.Struct, frozen=True):
    """Decision: return the stored outcome without running anything."""

    outcome: Outcome


def claimable(record: IdempotencyRecord, fp: bytes, now: float) -> bool:
    """Whether a request with fingerprint ``fp`` may claim a key that has ``record``.

    Every store's ``begin`` applies this rule, atomically with its write.

    Args:
        record: The key's stored record (expired or not).
        fp: Fingerprint of the incoming command.
        now: Current time (same clock as the record's times).

    Returns:
        ``True`` when the record is forgotten (past ``expires``), or when it is
        released or its claim lapsed *and* ``fp`` is the fingerprint the key is
        bound to. A finished or a live pending record is never claimable.
    """
    if record.expires <= now:
        return True
    if record.state == "done":
        return False
    if record.state == "pending" and (record.lease or record.expires) > now:
        return False
    return record.fingerprint == fp


def decide(existing: IdempotencyRecord | None, fp: bytes) -> Execute | Replay:
    """Turn the result of :meth:`IdempotencyStore.begin` into an action.

    Args:
        existing: ``None`` if the caller claimed the key, else the live record.
        fp: Fingerprint of the incoming command.

    Returns:
        :class:`Execute` or :class:`Replay`.

    Raises:
        IdempotencyError: ``idempotency_key_reused`` or ``idempotency_in_progress``.
    """
    if existing is None:
        return Execute()
    if existing.fingerprint != fp:
        raise IdempotencyError(
            "this idempotency key was already used with another command or other arguments",
            code="idempotency_key_reused",
        )
    if existing.state == "pending" or existing.outcome is None:
        raise IdempotencyError(
            "a command with this idempotency key is still executing; retry later",
            code="idempotency_in_progress",
        )
    return Replay(existing.outcome)


def check_key(key: str) -> None:
    """Validate an idempotency key's shape.

    Raises:
        BadRequest: empty or longer than :data:`MAX_KEY_LENGTH` (code ``bad_args``).
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(
            f"idempotency key must be 1..{MAX_KEY_LENGTH} characters, got {len(key)}",
            code="bad_args",
        )

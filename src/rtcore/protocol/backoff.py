"""The one retry-delay rule of the package (sans-IO: it returns seconds, never sleeps).

Clients reconnecting, a command retried after ``idempotency_in_progress``,
processors retrying a failed handler and the PostgreSQL wallet store retrying a
serialisation failure all wait :func:`backoff_delay` seconds, so a fleet of
retriers spreads out the same way everywhere.
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(
    attempt: int,
    base: float,
    maximum: float,
    *,
    jitter: float = 0.5,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based).

    Exponential and capped: ``cap = min(maximum, base * 2**attempt)``; then
    the last ``jitter`` fraction of ``cap`` is random. With the default 0.5
    ("equal jitter") half the delay is fixed, so nobody retries in a tight
    loop, and half random, so clients restarted together do not come back
    together. ``jitter=0`` is plain exponential backoff; ``jitter=1`` is "full
    jitter" (anywhere in ``[0, cap]``).

    Args:
        attempt: How many tries failed before this one (0 for the first retry).
        base: The delay of attempt 0 before jitter, seconds.
        maximum: The largest delay, seconds.
        jitter: Random fraction of the delay, in ``[0, 1]``.
        rng: Random source (tests pass a seeded one); the module's by default.

    Raises:
        ValueError: ``attempt`` is negative or ``jitter`` is outside ``[0, 1]``.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter}")
    cap = min(maximum, base * 2 ** min(attempt, 62))
    if not jitter:
        return float(cap)
    return float(cap * (1.0 - jitter + jitter * (rng or random).random()))

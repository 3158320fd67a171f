"""Storage backends, selected by URL.

``memory://`` is built in; ``sqlite:///path.db`` and ``redis://host:port/db``
register themselves in :data:`SCHEMES` when their modules exist. Third-party
engines may add a scheme with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from .base import (
    AppendResult,
    Backend,
    CursorStore,
    Event,
    EventLog,
    GroupLog,
    GroupMessage,
    IdempotencyRecord,
    IdempotencyStore,
    LeaseStore,
    LiveFeed,
    LocalSignalBus,
    Outcome,
    ReadResult,
    Retention,
    SignalBus,
    SignalFeed,
    Snapshot,
    SnapshotStore,
    StreamInfo,
)
from .memory import MemoryBackend

__all__ = [
    "SCHEMES",
    "AppendResult",
    "Backend",
    "CursorStore",
    "Event",
    "EventLog",
    "GroupLog",
    "GroupMessage",
    "IdempotencyRecord",
    "IdempotencyStore",
    "LeaseStore",
    "LiveFeed",
    "LocalSignalBus",
    "MemoryBackend",
    "Outcome",
    "ReadResult",
    "Retention",
    "SignalBus",
    "SignalFeed",
    "Snapshot",
    "SnapshotStore",
    "StreamInfo",
    "open_backend",
    "register",
]

Opener = Callable[[str], Awaitable[Backend]]


async def _open_memory(url: str) -> Backend:
    return MemoryBackend(url)


#: scheme -> "module:function" (imported lazily so extras stay optional) or an opener.
SCHEMES: dict[str, str | Opener] = {
    "memory": _open_memory,
    "sqlite": "rtcore.backends.sqlite:open_sqlite",
    "redis": "rtcore.backends.redis:open_redis",
}


def register(scheme: str, opener: Opener) -> None:
    """Make ``scheme://`` URLs open with ``opener``."""
    SCHEMES[scheme] = opener


async def open_backend(url: str) -> Backend:
    """Open the backend named by ``url`` (``memory://``, ``sqlite:///x.db``, ``redis://...``).

    Raises:
        ValueError: unknown scheme.
        ImportError: the scheme's extra is not installed (the message says which).
    """
    scheme = urlsplit(url).scheme
    opener = SCHEMES.get(scheme)
    if opener is None:
        raise ValueError(f"unknown backend URL scheme {scheme!r} in {url!r}; known: {sorted(SCHEMES)}")
    if isinstance(opener, str):
        mod_name, _, func = opener.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ImportError(f"backend {scheme!r} needs an extra: pip install 'rtcore[{scheme}]' ({exc})") from exc
        opener = getattr(mod, func)
        SCHEMES[scheme] = opener
    return await opener(url)

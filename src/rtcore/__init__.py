"""rtcore: event-driven real-time servers.

Ordered event streams with offsets and epochs, acknowledgements, idempotent
commands and state reconciliation, served over WebSocket and HTTP. The public
API is what ``__all__`` lists; everything else may change without notice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthError,
    BackendError,
    BadFrame,
    BadRequest,
    ConflictError,
    ConnectionClosed,
    IdempotencyError,
    LimitExceeded,
    ProtocolError,
    Rejected,
    RtcoreError,
    Unavailable,
)

if TYPE_CHECKING:
    from .backends import Backend, open_backend
    from .engine.app import App, Context, Principal, Router
    from .engine.dispatch import Reply
    from .engine.node import Node
    from .protocol.frames import Limits, Position
    from .protocol.types import Event, Retention
    from .server.runner import Server, run

__version__ = "0.1.0.dev0"

__all__ = [
    "App",
    "AuthError",
    "Backend",
    "BackendError",
    "BadFrame",
    "BadRequest",
    "ConflictError",
    "ConnectionClosed",
    "Context",
    "Event",
    "IdempotencyError",
    "LimitExceeded",
    "Limits",
    "Node",
    "Position",
    "Principal",
    "ProtocolError",
    "Rejected",
    "Reply",
    "Retention",
    "Router",
    "RtcoreError",
    "Server",
    "Unavailable",
    "__version__",
    "open_backend",
    "run",
]


# Public names are imported on first use (as websockets does), so that
# importing a sans-IO submodule such as ``rtcore.protocol.frames`` does not load
# the engine, the server and anyio through this package's ``__init__``.
_LAZY: dict[str, str] = {
    "App": ".engine.app",
    "Backend": ".backends",
    "Context": ".engine.app",
    "Event": ".protocol.types",
    "Limits": ".protocol.frames",
    "Node": ".engine.node",
    "open_backend": ".backends",
    "Position": ".protocol.frames",
    "Principal": ".engine.app",
    "Reply": ".engine.dispatch",
    "Retention": ".protocol.types",
    "Router": ".engine.app",
    "run": ".server.runner",
    "Server": ".server.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

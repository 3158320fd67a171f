"""rtcore: event-driven real-time servers.

Ordered event streams with offsets and epochs, acknowledgements, idempotent
commands and state reconciliation, served over WebSocket and HTTP. The public
API is what ``__all__`` lists; everything else may change without notice.
"""

from __future__ import annotations

from .app import App, Context, Principal, Router
from .backends import Backend, Event, Retention, open_backend
from .errors import (
    AuthError,
    BackendError,
    BadFrame,
    ConflictError,
    IdempotencyError,
    LimitExceeded,
    ProtocolError,
    Rejected,
    RtcoreError,
)
from .frames import Limits, Position
from .node import Node, Reply
from .runner import Server, run

__version__ = "0.1.0.dev0"

__all__ = [
    "App",
    "AuthError",
    "Backend",
    "BackendError",
    "BadFrame",
    "ConflictError",
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
    "__version__",
    "open_backend",
    "run",
]

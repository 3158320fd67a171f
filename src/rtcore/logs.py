"""rtcore's loggers and the two log formats of ``rtcore serve``.

rtcore logs through the standard :mod:`logging` module, on named loggers an
operator can turn up or down one by one:

=======================  ======  ==================================================
logger                   level   what
=======================  ======  ==================================================
``rtcore.connection``    INFO    WebSocket connection opened / closed (peer,
                                 principal, duration, close code and reason)
``rtcore.connection``    WARNING a slow consumer was cut (close 4008)
``rtcore.command``       DEBUG   every command (name, idempotency key, transport,
                                 duration, outcome code)
``rtcore.http``          INFO    one access line per HTTP request (peer, method,
                                 path without the query, status, bytes, duration)
``rtcore.processor``     WARNING a processor failed on an event and will retry
``rtcore.processor``     ERROR   a processor gave up: the event was dead-lettered
``rtcore.server``        INFO    serving / stopped / signals (once per start)
=======================  ======  ==================================================

Each record carries its fields twice: rendered into the message as
``key=value`` (so any handler shows them) and as ``record.rtcore`` (a dict),
which :class:`JsonFormatter` writes as top-level keys, one JSON object per
line. Nothing secret is ever a field: tokens, ``Authorization`` headers and
query strings (``?token=``) are never logged, only principal ids.

Why no structured-logging library: the stdlib covers it with one small
formatter, and applications keep whatever logging setup they already have.
This module imports nothing but the standard library (layer 0).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

__all__ = [
    "COMMAND",
    "CONNECTION",
    "HTTP",
    "LOG_FORMATS",
    "PROCESSOR",
    "SERVER",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "emit",
]

CONNECTION: Final = logging.getLogger("rtcore.connection")
COMMAND: Final = logging.getLogger("rtcore.command")
HTTP: Final = logging.getLogger("rtcore.http")
PROCESSOR: Final = logging.getLogger("rtcore.processor")
SERVER: Final = logging.getLogger("rtcore.server")

#: The values of ``rtcore serve --log-format``.
LOG_FORMATS: Final = ("text", "json")


class _Fields:
    """``key=value ...`` rendered only when a handler formats the record."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.fields.items())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    s = str(value)
    # Quote values a reader could not split on spaces (close reasons, errors).
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n\t')) else s


def emit(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` (call it after ``logger.isEnabledFor(level)``).

    Args:
        logger: One of this module's loggers.
        level: The :mod:`logging` level.
        event: What happened, a short fixed phrase (``"connection closed"``).
        **fields: Values of the record; never pass a token or a header.
    """
    logger.log(level, "%s %s", event, _Fields(fields), extra={"rtcore": fields, "rtcore_event": event})


class TextFormatter(logging.Formatter):
    """``2026-11-30T05:00:00.123Z INFO rtcore.http: http request method=GET ...``."""

    converter = staticmethod(time.gmtime)

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the fields.

    Records from :func:`emit` add ``event`` and their fields as top-level keys
    (a field never replaces ``ts``/``level``/``logger``/``message``); an
    exception adds ``exc`` (the formatted traceback).
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "rtcore", None)
        if isinstance(fields, dict):
            out["event"] = getattr(record, "rtcore_event", None)
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send rtcore's (and every other) log records to ``stream`` in format ``fmt``.

    What ``rtcore serve`` calls. It replaces the root logger's handlers, so
    calling it twice never logs a record twice.

    Args:
        level: Root level name (``"debug"``, ``"INFO"``...) or number.
        fmt: ``"text"`` or ``"json"`` (one object per line).
        stream: Where to write (default: ``sys.stderr``).

    Returns:
        The installed handler.

    Raises:
        ValueError: An unknown format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

"""The ``rtcore`` command line: ``rtcore serve MODULE:APP`` and friends.

Why argparse with subcommands: it ships with Python (no extra dependency for
a tool every deployment runs), and other parts of rtcore register their own
subcommands on the same parser (``rtcore wallet reconcile ...`` comes from
:mod:`rtcore.wallet.cli`), so ``rtcore --help`` lists everything.

``rtcore serve`` loads an :class:`~rtcore.App` the way uvicorn does
(``package.module:attribute``, the current directory importable) and also
from a file (``path/to/app.py:app``), so an example runs from a checkout
without being installed. It then calls :func:`rtcore.run`, which serves until
SIGINT/SIGTERM and shuts down gracefully (exit status 0).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import math
import os
import socket
import ssl
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine.app import App
from .logs import LOG_FORMATS
from .logs import configure as configure_logging
from .protocol.streams import DEFAULT_CURSOR_TTL
from .server.runner import ROLES, run

__all__ = ["build_parser", "load_app", "main", "parse_roles"]

log = logging.getLogger("rtcore.cli")

_SERVE_EPILOG = """\
examples:
  rtcore serve examples/counter/app.py:app
  rtcore serve myproject.game:app --port 9000 --backend redis://127.0.0.1:6379/0
  rtcore serve myproject.game:app --role gateway --role api     # no processors here
  rtcore serve myproject.game:app --role processor               # workers only
  rtcore serve myproject.game:app --loop trio                    # on trio instead of asyncio
  rtcore serve myproject.game:app --log-format json --log-level debug   # JSON lines, one per command too

A bad invocation (port in use, unknown backend, unreachable service, missing
extra, bad TLS files or MODULE:APP) prints one line and exits with status 2.

Shutdown: SIGINT (Ctrl-C) or SIGTERM stops accepting, lets in-flight commands
finish for --grace seconds, sends every client bye (reconnect: true) and closes
with 1001, then exits 0. A second signal stops at once.
"""


class CliError(Exception):
    """A user error to print without a traceback (exit status 2).

    Deliberately outside the :mod:`rtcore.errors` tree: it is an operator's
    command-line mistake, never sent to a client, so it has no error code,
    retry flag or HTTP status, and library code that catches
    :class:`~rtcore.errors.RtcoreError` must not swallow it.
    """


def load_app(spec: str) -> App:
    """Import the :class:`App` named by ``spec``.

    Args:
        spec: ``package.module:attribute`` or ``path/to/file.py:attribute``;
            the attribute defaults to ``app``. The attribute may also be a
            function without arguments that returns the app (a factory).

    Returns:
        The app.

    Raises:
        CliError: The module, file or attribute does not exist, or is not an App.
    """
    target, _, attr = spec.partition(":")
    attr = attr or "app"
    if not target:
        raise CliError(f"expected MODULE:APP or path/to/file.py:APP, got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _load_file(Path(target))
    else:
        # As uvicorn does: modules of the current project are importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise CliError(f"cannot import module {target!r}: {exc}") from None
            raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{target!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App) and callable(obj) and not isinstance(obj, type):  # a factory, not a class
        obj = obj()
    if not isinstance(obj, App):
        raise CliError(f"{spec!r} is a {type(obj).__name__}, not an rtcore.App")
    return obj


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise CliError(f"no such file: {str(path)!r}")
    path = path.resolve()
    # The file's directory is importable, so the app can import its neighbours.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = path.stem if path.stem not in sys.modules else f"_rtcore_app_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise CliError(f"cannot load {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec/pickle find classes through sys.modules
    spec.loader.exec_module(module)
    return module


def parse_roles(values: Sequence[str] | None) -> frozenset[str]:
    """``--role`` values (repeatable, comma lists, ``all``) → a set of roles.

    Raises:
        CliError: An unknown role.
    """
    roles: set[str] = set()
    for value in values or ["all"]:
        for role in (r.strip() for r in value.split(",")):
            if not role:
                continue
            if role == "all":
                roles |= ROLES
            elif role in ROLES:
                roles.add(role)
            else:
                raise CliError(f"unknown role {role!r}; choose from {', '.join(sorted(ROLES))} or all")
    return frozenset(roles) or ROLES


def _ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise CliError("--tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise CliError(f"{option}: no such file: {path!r}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Python's defaults today, pinned so a future default cannot weaken them:
    # TLS 1.2 or newer, and no TLS compression (CRIME).
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificate {cert!r} with key {key!r} (PEM files expected): {exc}") from None
    return context


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rtcore serve: error: ... (see rtcore serve --help)``.

    argparse prints the whole usage before its error; an operator reading a
    failed start (or a log collector) gets one line naming the problem, like
    every other bad invocation. Subcommand parsers are of this class too.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``rtcore`` argument parser with every subcommand registered."""
    parser = _Parser(
        prog="rtcore",
        description="rtcore: event-driven real-time servers (WebSocket + HTTP on one port).",
    )
    parser.add_argument("--version", action="version", version=f"rtcore {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve an app over WebSocket and HTTP",
        description="Serve an rtcore App: WebSocket at /v1/ws, HTTP commands at /v1/cmd/{name}, "
        "history and SSE at /v1/streams/{stream}, /v1/health, /metrics, /v1/schema.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "app", metavar="MODULE:APP", help="the App to serve: package.module:app or path/to/file.py:app (default attribute: app)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 for all IPv4)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: %(default)s)")
    serve.add_argument(
        "--backend",
        default="memory://",
        metavar="URL",
        help="storage backend: memory://, sqlite:///path.db (or just a file name: events.db) "
        "or redis://host:port/db (default: %(default)s)",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS (wss://, https://) with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    serve.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="browser Origin allowed to open WebSockets, e.g. https://game.example (repeatable; "
        "default: no Origin check). Others get 403 before the upgrade",
    )
    serve.add_argument(
        "--admin-token",
        metavar="TOKEN",
        default=os.environ.get("RTCORE_ADMIN_TOKEN"),
        help="turn on the read-only admin page at /admin; its data needs this bearer token "
        "(default: $RTCORE_ADMIN_TOKEN; no admin page without one). Open it as /admin#TOKEN",
    )
    serve.add_argument(
        "--role",
        action="append",
        metavar="ROLE",
        help="what this process runs: gateway (WebSocket, SSE), api (HTTP commands, history), "
        "processor (@app.on, @app.loop), or all (default). Repeatable or comma-separated",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="logging level (default: %(default)s); debug adds one line per command",
    )
    serve.add_argument(
        "--no-access-log",
        action="store_true",
        help="no HTTP access lines (sets the rtcore.http logger to warning; see benchmarks/log_overhead.py for their cost)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=list(LOG_FORMATS),
        help="log lines as text or as one JSON object per line (default: %(default)s)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long in-flight commands may run before clients are closed (default: %(default)s)",
    )
    serve.add_argument(
        "--idempotency-ttl",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="how long command outcomes are kept for retries with the same key (default: %(default)s)",
    )
    serve.add_argument(
        "--idempotency-lease",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a running command holds its key before another node may run it again "
        "(a crashed node's commands become retryable after this; default: %(default)s)",
    )
    serve.add_argument(
        "--cursor-ttl",
        type=float,
        default=DEFAULT_CURSOR_TTL,
        metavar="SECONDS",
        help="how long a principal's server cursor on a stream (its last ack) is kept after its last "
        "advance; then sub with cursor:true gets the current state (default: %(default)s, 7 days)",
    )
    serve.add_argument(
        "--loop",
        default="asyncio",
        choices=["asyncio", "trio"],
        help="event loop (anyio backend) to run on; asyncio has the WebSocket write fast path (default: %(default)s)",
    )
    serve.add_argument(
        "--no-uvloop",
        dest="uvloop",
        action="store_false",
        help="on asyncio, do not use uvloop even when it is installed (rtcore[fast]); also RTCORE_UVLOOP=0",
    )
    serve.set_defaults(handler=_serve)

    _add_schema_command(sub)
    _add_plugin_commands(sub)
    return parser


def _add_schema_command(sub: Any) -> None:
    schema = sub.add_parser(
        "schema",
        help="write the app's AsyncAPI document, JSON Schema or TypeScript declarations",
        description="Describe an app's protocol for client authors: the AsyncAPI 3.0 document "
        "(as served at /v1/asyncapi.json), the JSON Schema bundle (/v1/schema) or TypeScript "
        "declarations of the frames and of each command's args and result.",
    )
    schema.add_argument("app", metavar="MODULE:APP", help="the App: package.module:app or path/to/file.py:app")
    schema.add_argument("--format", default="asyncapi", choices=["asyncapi", "jsonschema", "typescript"])
    schema.add_argument("-o", "--output", metavar="FILE", help="write here instead of to stdout")
    schema.set_defaults(handler=_schema)


def _schema(args: argparse.Namespace) -> int:
    import json

    from .server import asyncapi

    app = load_app(args.app)
    if args.format == "typescript":
        text = asyncapi.typescript(app)
    else:
        doc = asyncapi.asyncapi(app) if args.format == "asyncapi" else asyncapi.schema(app)
        text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _add_plugin_commands(sub: Any) -> None:
    # The wallet registers ``rtcore wallet ...`` itself. Only a missing module is
    # tolerated; an error inside it must surface.
    if importlib.util.find_spec("rtcore.wallet.cli") is None:
        return
    from .wallet import cli as wallet_cli

    wallet_cli.add_wallet_commands(sub)


def _version() -> str:
    from . import __version__

    return __version__


def _serve(args: argparse.Namespace) -> int:
    _check_port(args.port)
    _check_cursor_ttl(args.cursor_ttl)
    roles = parse_roles(args.role)
    context = _ssl_context(args.tls_cert, args.tls_key)
    backend = _check_backend(backend_url(args.backend))
    app = load_app(args.app)

    started = False

    def ready(port: int) -> None:
        # rtcore.run logs the one "serving" line; here we only note the start.
        nonlocal started
        started = True

    try:
        run(
            app,
            host=args.host,
            port=args.port,
            backend=backend,
            ssl_context=context,
            allowed_origins=args.allowed_origin,
            admin_token=args.admin_token,
            roles=roles,
            grace=args.grace,
            idempotency_ttl=args.idempotency_ttl,
            idempotency_lease=args.idempotency_lease,
            cursor_ttl=args.cursor_ttl,
            on_ready=ready,
            anyio_backend=args.loop,
            use_uvloop=None if args.uvloop else False,
        )
    except Exception as exc:
        if started:
            raise
        # The node did not start (port taken, backend down, a lifespan failed):
        # one line naming the problem; the traceback only at --log-level debug.
        log.debug("startup failed", exc_info=exc)
        raise CliError(startup_error(exc, host=args.host, port=args.port, backend=backend)) from None
    return 0


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise CliError(f"invalid port {port}: must be 0..65535 (0 picks a free one)")


def _check_cursor_ttl(seconds: float) -> None:
    if not 0 < seconds < math.inf:
        raise CliError(f"invalid --cursor-ttl {seconds}: must be a positive, finite number of seconds")


def _check_backend(url: str) -> str:
    from .backends import SCHEMES

    scheme = url.partition("://")[0]
    if scheme not in SCHEMES:
        raise CliError(f"unknown backend URL scheme {scheme!r} in {url!r}; use one of: {', '.join(f'{s}://' for s in sorted(SCHEMES))}")
    return url


#: Optional dependencies → the extra that installs them.
_EXTRAS = {"coredis": "redis", "psycopg": "postgres", "jwt": "jwt", "cryptography": "jwt"}


def startup_error(exc: BaseException, *, host: str, port: int, backend: str) -> str:
    """The one line ``rtcore serve`` prints when the server could not start.

    Args:
        exc: What the start raised (an exception group is unwrapped).
        host: The ``--host`` asked for.
        port: The ``--port`` asked for.
        backend: The backend URL (its password is not printed).

    Returns:
        The message, without the ``rtcore: error:`` prefix.
    """
    from .errors import BackendError

    cause = _leaf(exc)
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: the address is already in use (another server? pick another --port)"
    if isinstance(cause, socket.gaierror) or (isinstance(cause, OSError) and cause.errno in (errno.EADDRNOTAVAIL, errno.EACCES)):
        assert isinstance(cause, OSError)
        return f"cannot listen on {host}:{port}: {cause.strerror or cause}"
    if isinstance(cause, ImportError):
        if "pip install" in str(cause):
            return f"{_first_line(str(cause))}"
        top = (cause.name or "").split(".")[0]
        if top in _EXTRAS:
            return f"a required package is missing ({top}): pip install 'rtcore[{_EXTRAS[top]}]'"
    if isinstance(cause, BackendError):
        # The event backend or a service a lifespan opens (the wallet's PostgreSQL).
        where = f" (--backend {_redact(backend)})" if not backend.startswith("memory:") else ""
        return f"startup failed: a service is unreachable{where}: {_first_line(cause.message)}"
    return f"startup failed: {type(cause).__name__}: {_first_line(str(cause))}"


def _leaf(exc: BaseException) -> BaseException:
    # anyio wraps a failing start in exception groups: report the first real error.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _redact(url: str) -> str:
    # redis://:password@host → redis://:***@host (never print a secret).
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def backend_url(value: str) -> str:
    """A backend URL from ``--backend``: a plain file name means SQLite.

    ``events.db`` becomes ``sqlite:////abs/path/events.db``, so naming a file
    is all it takes to keep events across restarts.
    """
    if "://" in value:
        return value
    return "sqlite:///" + os.path.abspath(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rtcore`` command; returns the exit status.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if getattr(args, "no_access_log", False):
        logging.getLogger("rtcore.http").setLevel(logging.WARNING)
    # Subcommands set ``handler`` (ours) or ``func`` (argparse's usual name).
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:  # pragma: no cover - every subcommand sets one
        parser.error(f"{args.command!r} has no handler")
    try:
        status = handler(args)
    except CliError as exc:
        parser.exit(2, f"rtcore: error: {exc}\n")
    except OSError as exc:  # e.g. an unreadable file named on the command line
        parser.exit(2, f"rtcore: error: {exc}\n")
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())

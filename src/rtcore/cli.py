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
import asyncio
import importlib
import importlib.util
import logging
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine.app import App
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
    if not isinstance(obj, App) and callable(obj):
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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificate/key: {exc}") from None
    return context


def build_parser() -> argparse.ArgumentParser:
    """The ``rtcore`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
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
        help="logging level (default: %(default)s)",
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

    _add_plugin_commands(sub)
    return parser


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
    roles = parse_roles(args.role)
    context = _ssl_context(args.tls_cert, args.tls_key)
    app = load_app(args.app)
    scheme = "https" if context else "http"
    ws_scheme = "wss" if context else "ws"

    started = False

    def ready(port: int) -> None:
        nonlocal started
        started = True
        host = args.host if ":" not in args.host else f"[{args.host}]"
        log.info(
            "rtcore: serving %r on %s://%s:%d (WebSocket %s://%s:%d/v1/ws; event loop: %s)",
            app.name, scheme, host, port, ws_scheme, host, port, _event_loop(),
        )

    try:
        run(
            app,
            host=args.host,
            port=args.port,
            backend=backend_url(args.backend),
            ssl_context=context,
            allowed_origins=args.allowed_origin,
            roles=roles,
            grace=args.grace,
            idempotency_ttl=args.idempotency_ttl,
            idempotency_lease=args.idempotency_lease,
            on_ready=ready,
            anyio_backend=args.loop,
            use_uvloop=None if args.uvloop else False,
        )
    except Exception as exc:
        if started:
            raise
        # The node did not start (a lifespan startup failed, the backend is
        # down): one line naming the error, the traceback in the log.
        log.error("rtcore: startup failed", exc_info=exc)
        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        print(f"rtcore: error: startup failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    log.info("rtcore: stopped")
    return 0


def _event_loop() -> str:
    """The event loop running now (asyncio or trio, the two anyio backends), for the log."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


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
    level = getattr(args, "log_level", "info")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Subcommands set ``handler`` (ours) or ``func`` (argparse's usual name).
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:  # pragma: no cover - every subcommand sets one
        parser.error(f"{args.command!r} has no handler")
    try:
        status = handler(args)
    except CliError as exc:
        parser.exit(2, f"rtcore: error: {exc}\n")
    except OSError as exc:  # e.g. the port is taken
        parser.exit(1, f"rtcore: error: {exc}\n")
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())

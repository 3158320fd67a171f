"""``rtcore wallet ...``: the wallet's operator commands.

Reconciliation has to be runnable by an operator against a production
database without starting the application, from a cron job or after an
incident, and its answer has to be usable by a script: so it is a command
whose *exit status* is the verdict (0 clean, 1 mismatch, 2 could not run) and
whose output is a short human report (or JSON with ``--json``).

The top-level ``rtcore`` command (:mod:`rtcore.cli`) owns the argument parser
and mounts this module's subcommands with :func:`add_wallet_commands`; every
parser it adds sets ``func`` to a callable taking the parsed
:class:`argparse.Namespace` and returning the exit status. :func:`main` runs
the same parser standalone (``python -m rtcore.wallet.cli reconcile ...``).

Reconciliation only reads: it never re-publishes, expires or repairs
anything, so running it against a live system is safe. Streams that are only
behind by records still in the outbox are reported as lagging, not as
mismatches (the running app's flush will publish them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec

from ..errors import RtcoreError
from .engines import open_wallet_store
from .reconciliation import ReconcileReport, reconcile
from .router import last_balance_event

__all__ = ["EXIT_ERROR", "EXIT_MISMATCH", "EXIT_OK", "add_wallet_commands", "main", "run_reconcile"]

#: The ledger (and the streams, when checked) agree.
EXIT_OK = 0
#: Reconciliation found at least one mismatch.
EXIT_MISMATCH = 1
#: Reconciliation could not run (bad URL, unreachable database); argparse also uses 2.
EXIT_ERROR = 2

#: Mismatches printed in the text report before "... and N more".
_SHOWN = 50


def add_wallet_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``wallet`` (with ``reconcile``) on an argparse subparsers object.

    Each leaf parser sets ``func``: call ``args.func(args)`` and exit with the
    integer it returns.

    Args:
        subparsers: What :meth:`argparse.ArgumentParser.add_subparsers` returned.

    Returns:
        The ``wallet`` parser (to add more subcommands to).
    """
    wallet = subparsers.add_parser(
        "wallet",
        help="wallet operations (reconcile)",
        description="Operate on an rtcore wallet store.",
    )
    commands = wallet.add_subparsers(dest="wallet_command", metavar="COMMAND")
    commands.required = True
    rec = commands.add_parser(
        "reconcile",
        help="recompute every balance from the ledger and compare (exit 1 on any mismatch)",
        description=(
            "Recompute every balance from the ledger entries, check that each currency sums to zero, "
            "and (with --events) that every wallet:{account} stream's last balance_changed matches the "
            "store. Read-only. Exit status: 0 clean, 1 mismatch, 2 could not run."
        ),
    )
    rec.add_argument(
        "--store", required=True, metavar="URL", help="wallet store: sqlite:///path.db or postgresql://..."
    )
    rec.add_argument(
        "--events",
        metavar="URL",
        help="event log backend to check the wallet streams against (sqlite:///events.db, redis://...)",
    )
    rec.add_argument("--json", action="store_true", help="print the report as JSON")
    rec.set_defaults(func=_reconcile_command)
    return wallet  # type: ignore[no-any-return]


def _reconcile_command(args: argparse.Namespace) -> int:
    return run_reconcile(args.store, args.events, as_json=args.json)


def run_reconcile(
    store_url: str, events_url: str | None = None, *, as_json: bool = False, out: TextIO | None = None
) -> int:
    """Reconcile the store at ``store_url`` (and its streams in ``events_url``) and print a report.

    Args:
        store_url: Wallet store URL.
        events_url: Backend URL of the event log holding ``wallet:*``; ``None``
            skips the stream check.
        as_json: Print the report as one JSON object instead of text.
        out: Where to print (stdout by default); errors go to stderr.

    Returns:
        :data:`EXIT_OK`, :data:`EXIT_MISMATCH` or :data:`EXIT_ERROR`.
    """
    out = out or sys.stdout
    try:
        report = anyio.run(_reconcile, store_url, events_url)
    except (RtcoreError, ValueError, ImportError, OSError) as exc:
        # Only the ways opening a store or backend fail: a bug should still
        # show its traceback rather than hide behind exit status 2.
        print(f"rtcore wallet reconcile: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        payload = msgspec.to_builtins(report)
        payload["ok"] = report.ok
        payload["store"] = _redact(store_url)
        payload["events"] = _redact(events_url) if events_url else None
        out.write(msgspec.json.encode(payload).decode() + "\n")
    else:
        out.write(format_report(report, store_url, events_url))
    return EXIT_OK if report.ok else EXIT_MISMATCH


def _require_sqlite_file(url: str, what: str) -> None:
    """Refuse a SQLite URL whose file does not exist.

    Opening a SQLite store creates the file, so a mistyped path would
    otherwise reconcile an empty ledger and report it clean.
    """
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if str(path) != ":memory:" and not path.is_file():
            raise FileNotFoundError(f"{what} {url!r}: no such file {str(path)!r}")


async def _reconcile(store_url: str, events_url: str | None) -> ReconcileReport:
    _require_sqlite_file(store_url, "wallet store")
    if events_url is not None:
        _require_sqlite_file(events_url, "event log")
    store = await open_wallet_store(store_url)
    try:
        if events_url is None:
            return await reconcile(store)
        from ..backends import open_backend

        backend = await open_backend(events_url)
        try:
            return await reconcile(store, last_balance_event(backend.events))
        finally:
            await backend.aclose()
    finally:
        await store.aclose()


def _redact(url: str) -> str:
    """``url`` without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def format_report(report: ReconcileReport, store_url: str, events_url: str | None = None) -> str:
    """The text report: a summary, the totals, then every mismatch.

    Args:
        report: What :func:`~rtcore.wallet.reconciliation` returned.
        store_url: Shown in the header (password removed).
        events_url: Shown in the header when streams were checked.

    Returns:
        The report, ending with a newline.
    """
    lines = [f"wallet store: {_redact(store_url)}"]
    if events_url:
        lines.append(f"event log:    {_redact(events_url)} ({report.streams_checked} streams checked)")
    else:
        lines.append("event log:    not checked (no --events)")
    lines.append(f"accounts: {report.accounts}, entries replayed: {report.entries}")
    for currency, total in report.totals.items():
        lines.append(f"  {currency}: entries sum to {total}")
    if report.lagging:
        shown = ", ".join(report.lagging[:10]) + (" ..." if len(report.lagging) > 10 else "")
        lines.append(f"lagging streams (entries still in the outbox, not an error): {len(report.lagging)}: {shown}")
    if report.ok:
        lines.append("OK: balances, entries and streams agree" if events_url else "OK: balances and entries agree")
    else:
        lines.append(f"MISMATCH: {len(report.mismatches)} found")
        for m in report.mismatches[:_SHOWN]:
            lines.append(f"  [{m.kind}] {m.subject}: {m.message}")
        if len(report.mismatches) > _SHOWN:
            lines.append(f"  ... and {len(report.mismatches) - _SHOWN} more (use --json for all)")
    return "\n".join(lines) + "\n"


def build_parser(prog: str = "rtcore") -> argparse.ArgumentParser:
    """A parser with only the wallet commands (what :func:`main` uses)."""
    parser = argparse.ArgumentParser(prog=prog, description="rtcore wallet operator commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_wallet_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a wallet command; returns the exit status.

    Accepts both ``wallet reconcile ...`` (as under ``rtcore``) and the
    shorter ``reconcile ...`` of ``python -m rtcore.wallet.cli``.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != "wallet":
        args_list = ["wallet", *args_list]
    args = build_parser("python -m rtcore.wallet.cli").parse_args(args_list)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    sys.exit(main())

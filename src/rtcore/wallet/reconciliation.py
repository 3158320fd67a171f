"""Reconciliation: prove that balances, entries and streams tell one story.

The stores keep each account's balance in two places, on purpose: the balance
columns (fast reads, overdraft checks) and the append-only entries (the
ledger). Clients keep a third copy: the last ``balance_changed`` event of the
stream ``wallet:{account}``. :func:`check_ledger` recomputes everything from
the entries alone and reports every place the copies disagree:

* ``entry_chain``: an entry's balance-after is not the running sum of the
  deltas before it (a lost or reordered write);
* ``unknown_account`` / ``currency``: an entry for an account that does not
  exist, or in another currency than its account;
* ``balance``: a stored balance differs from the recomputed one;
* ``zero_sum``: a currency's balances do not sum to zero (money created or
  destroyed outside double entry) - checked on both copies;
* ``floor``: an account's available balance is below its floor;
* ``stream``: a stream's last ``balance_changed`` does not match the last
  entry of its account. A stream that is behind *only* by entries still in
  the outbox is not a mismatch - the publisher has not caught up yet - and is
  listed in :attr:`ReconcileReport.lagging` so the caller can re-publish.

:func:`check_ledger` is pure (a snapshot and the last events in, a report
out); :func:`reconcile` reads them from a store and a callable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import msgspec

from .ledger import Entry
from .store import LedgerSnapshot, WalletStore

__all__ = ["LastEvent", "Mismatch", "MismatchKind", "ReconcileReport", "check_ledger", "reconcile"]

MismatchKind = Literal["entry_chain", "unknown_account", "currency", "balance", "zero_sum", "floor", "stream"]

#: Returns the ``data`` of the newest ``balance_changed`` event in
#: ``wallet:{account}`` (a mapping with at least ``entry_id``, ``available``
#: and ``held``), or ``None`` when the stream has none.
LastEvent = Callable[[str], Awaitable[Mapping[str, Any] | None]]


class Mismatch(msgspec.Struct, frozen=True):
    """One disagreement found by reconciliation.

    Attributes:
        kind: What disagrees (see the module docstring).
        subject: The account id, or the currency for ``zero_sum``.
        message: Human-readable explanation.
        expected: What the entries say.
        found: What was stored or published instead.
    """

    kind: MismatchKind
    subject: str
    message: str
    expected: Any = None
    found: Any = None


class ReconcileReport(msgspec.Struct, frozen=True):
    """The result of a reconciliation.

    Attributes:
        accounts: Number of accounts checked.
        entries: Number of entries replayed.
        totals: Sum of the recomputed posted balances per currency (all zero
            when the ledger is sound).
        mismatches: Every disagreement found; empty means the ledger is sound.
        lagging: Accounts whose stream is behind only by unpublished outbox
            entries (re-publish them; not an error).
        streams_checked: Number of streams compared.
    """

    accounts: int
    entries: int
    totals: dict[str, int]
    mismatches: tuple[Mismatch, ...]
    lagging: tuple[str, ...] = ()
    streams_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no mismatch was found."""
        return not self.mismatches


def check_ledger(
    snapshot: LedgerSnapshot, last_events: Mapping[str, Mapping[str, Any] | None] | None = None
) -> ReconcileReport:
    """Recompute every balance from the entries and compare all copies.

    Args:
        snapshot: Accounts, balances, entries and outbox from one transaction.
        last_events: Per account id, the data of the last ``balance_changed``
            event of its stream (``None`` for an empty stream). Accounts
            missing from the mapping, or no mapping at all, skip the stream
            check. Events newer than the snapshot cannot be judged and are
            skipped too.

    Returns:
        The report.
    """
    accounts = {a.id: a for a in snapshot.accounts}
    mismatches: list[Mismatch] = []
    running: dict[str, tuple[int, int]] = {}
    last_entry: dict[str, Entry] = {}
    broken: set[str] = set()
    totals: dict[str, int] = defaultdict(int)

    for entry in snapshot.entries:
        account = accounts.get(entry.account)
        if account is None:
            mismatches.append(Mismatch("unknown_account", entry.account, f"entry {entry.id} is for an unknown account"))
            continue
        if entry.currency != account.currency:
            mismatches.append(
                Mismatch(
                    "currency",
                    entry.account,
                    f"entry {entry.id} is in {entry.currency}, the account in {account.currency}",
                    account.currency,
                    entry.currency,
                )
            )
        available, held = running.get(entry.account, (0, 0))
        available, held = available + entry.delta, held + entry.held_delta
        running[entry.account] = (available, held)
        last_entry[entry.account] = entry
        totals[account.currency] += entry.delta + entry.held_delta
        if (entry.available, entry.held) != (available, held) and entry.account not in broken:
            broken.add(entry.account)  # one report per account: later entries inherit the error
            mismatches.append(
                Mismatch(
                    "entry_chain",
                    entry.account,
                    f"entry {entry.id} says available/held {entry.available}/{entry.held}, "
                    f"the deltas before it sum to {available}/{held}",
                    [available, held],
                    [entry.available, entry.held],
                )
            )

    stored_totals: dict[str, int] = defaultdict(int)
    for balance in snapshot.balances:
        account = accounts.get(balance.account)
        stored_totals[balance.currency] += balance.available + balance.held
        expected = running.get(balance.account, (0, 0))
        if (balance.available, balance.held) != expected:
            mismatches.append(
                Mismatch(
                    "balance",
                    balance.account,
                    f"stored available/held {balance.available}/{balance.held}, entries say {expected[0]}/{expected[1]}",
                    list(expected),
                    [balance.available, balance.held],
                )
            )
        if account is not None and account.floor is not None and balance.available < account.floor:
            mismatches.append(
                Mismatch(
                    "floor",
                    balance.account,
                    f"available {balance.available} is below the floor {account.floor}",
                    account.floor,
                    balance.available,
                )
            )

    for currency in sorted(set(totals) | set(stored_totals)):
        for label, sums in (("entries", totals), ("stored balances", stored_totals)):
            if sums.get(currency, 0) != 0:
                mismatches.append(
                    Mismatch(
                        "zero_sum", currency, f"{label} of {currency} sum to {sums[currency]}, not 0", 0, sums[currency]
                    )
                )

    lagging: list[str] = []
    checked = 0
    if last_events is not None:
        newest = snapshot.entries[-1].id if snapshot.entries else 0
        per_account: dict[str, list[int]] = defaultdict(list)
        for entry in snapshot.entries:
            per_account[entry.account].append(entry.id)
        for account_id in sorted(accounts):
            if account_id not in last_events:
                continue
            checked += 1
            event = last_events[account_id]
            verdict = _judge_stream(
                account_id, event, last_entry.get(account_id), per_account[account_id], snapshot, newest
            )
            if verdict == "lagging":
                lagging.append(account_id)
            elif isinstance(verdict, Mismatch):
                mismatches.append(verdict)

    return ReconcileReport(
        accounts=len(accounts),
        entries=len(snapshot.entries),
        totals={c: totals.get(c, 0) for c in sorted(set(totals) | {a.currency for a in snapshot.accounts})},
        mismatches=tuple(mismatches),
        lagging=tuple(lagging),
        streams_checked=checked,
    )


def _judge_stream(
    account_id: str,
    event: Mapping[str, Any] | None,
    last: Entry | None,
    entry_ids: list[int],
    snapshot: LedgerSnapshot,
    newest: int,
) -> Mismatch | Literal["ok", "lagging"]:
    seen = 0 if event is None else event.get("entry_id")
    if not isinstance(seen, int) or isinstance(seen, bool):
        return Mismatch("stream", account_id, f"the last balance_changed has no entry_id: {event!r}", None, event)
    if seen > newest:
        return "ok"  # published after the snapshot was read: cannot be judged here
    if last is None:
        if event is None:
            return "ok"
        return Mismatch("stream", account_id, f"the stream has entry {seen} but the account has no entries", None, seen)
    if seen == last.id:
        assert event is not None
        found = [event.get("available"), event.get("held")]
        if found != [last.available, last.held]:
            return Mismatch(
                "stream",
                account_id,
                f"the stream says available/held {found[0]}/{found[1]} at entry {seen}, the ledger {last.available}/{last.held}",
                [last.available, last.held],
                found,
            )
        return "ok"
    missing = [i for i in entry_ids if i > seen]
    if seen in entry_ids or seen == 0:
        if missing and all(i in snapshot.unpublished for i in missing):
            return "lagging"
        return Mismatch(
            "stream",
            account_id,
            f"the stream stops at entry {seen} but entries {missing[:5]} are marked published",
            last.id,
            seen,
        )
    return Mismatch(
        "stream", account_id, f"the stream's last entry {seen} is not an entry of this account", last.id, seen
    )


async def reconcile(store: WalletStore, last_event: LastEvent | None = None) -> ReconcileReport:
    """Reconcile a store (and optionally its streams).

    The ledger is read in one transaction first; the streams are read after
    it, so an event published in between is newer than the snapshot and is
    skipped rather than reported.

    Args:
        store: The wallet store.
        last_event: Returns the last ``balance_changed`` data of an account's
            stream; ``None`` skips the stream check.

    Returns:
        The report (``report.ok`` is True when nothing disagrees).
    """
    snapshot = await store.snapshot()
    events: dict[str, Mapping[str, Any] | None] | None = None
    if last_event is not None:
        events = {account.id: await last_event(account.id) for account in snapshot.accounts}
    return check_ledger(snapshot, events)

"""Hypothesis state machine: random wallet traffic against a tiny model.

The model below re-states the ledger rules in the plainest possible way
(dicts of ints, no plans, no postings) so that a bug in
:mod:`rtcore.wallet.ledger` or in a store cannot hide behind itself. Each
step sends one random operation - transfers, holds, captures, voids, clock
advances with expiry sweeps, and retries with the same id (same or other
fields) - to a real store and to the model, and checks they agree on the
outcome or on the exact error code. After every step the invariants hold:

* every stored balance equals the model's;
* every currency sums to zero;
* no account is below its floor;
* every transfer and hold id was applied exactly once (counted in the entries);
* the pure reconciliation finds nothing wrong.

The async store is driven from the synchronous state machine through an
anyio blocking portal (an event loop in a helper thread).
"""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from rtcore.wallet import HoldRequest, TransferRequest, WalletError, WalletStore
from rtcore.wallet.reconciliation import check_ledger
from tests.wallet.stores import STORE_KINDS, fresh_store, require_store

T0 = 1_700_000_000.0

# account id -> (currency, floor or None for unbounded, initial funding)
ACCOUNTS: dict[str, tuple[str, int | None, int]] = {
    "house": ("EUR", None, 0),
    "a": ("EUR", 0, 100),
    "b": ("EUR", 0, 50),
    "c": ("EUR", -30, 0),
    "usys": ("USD", None, 0),
    "u": ("USD", 0, 40),
}
SYSTEM = {"EUR": "house", "USD": "usys"}
NAMES = sorted(ACCOUNTS)

amounts = st.one_of(st.integers(min_value=1, max_value=120), st.sampled_from([0, -1, -50]))
currencies = st.sampled_from(["EUR", "EUR", "EUR", "USD"])


class WalletMachine(RuleBasedStateMachine):
    """One store, one model, random traffic."""

    def __init__(self, kind: str, tmp_dir: Path) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal = self._exit.enter_context(anyio.from_thread.start_blocking_portal("asyncio"))
        self.store: WalletStore = self._exit.enter_context(
            self.portal.wrap_async_context_manager(fresh_store(kind, tmp_dir))
        )
        self.now = T0
        self.ids = itertools.count()
        self.bal: dict[str, list[int]] = {name: [0, 0] for name in ACCOUNTS}  # [available, held]
        self.transfers: dict[str, tuple[TransferRequest, Any]] = {}
        self.holds: dict[str, dict[str, Any]] = {}
        for name, (currency, floor, _) in ACCOUNTS.items():
            kind_ = "system" if name in SYSTEM.values() else "player"
            self.call(self.store.create_account, name, currency, kind=kind_, floor=floor if floor else None)
        for name, (currency, _, funding) in ACCOUNTS.items():
            if funding:
                self.do_transfer(TransferRequest(f"fund-{name}", SYSTEM[currency], name, funding, currency))

    def teardown(self) -> None:
        self._exit.close()

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(lambda: fn(*args, **kwargs))

    def expect(self, code: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a store call; it must fail with ``code``, or succeed when ``code`` is None."""
        try:
            result = self.call(fn, *args, **kwargs)
        except WalletError as exc:
            assert exc.code == code, f"store said {exc.code}, model says {code}: {exc.message}"
            return None
        assert code is None, f"store accepted, model says {code}"
        return result

    # -- the model's rules -------------------------------------------------------------

    def debit_error(self, debit: str, credit: str, amount: int, currency: str) -> str | None:
        if amount <= 0:
            return "invalid_amount"
        if debit == credit:
            return "same_account"
        if ACCOUNTS[debit][0] != ACCOUNTS[credit][0] or currency != ACCOUNTS[debit][0]:
            return "currency_mismatch"
        floor = ACCOUNTS[debit][1]
        if floor is not None and self.bal[debit][0] - amount < floor:
            return "insufficient_funds"
        return None

    def hold_error(self, hold_id: str, amount: int | None) -> str | None:
        if amount is not None and amount <= 0:
            return "invalid_amount"
        hold = self.holds.get(hold_id)
        if hold is None:
            return "hold_not_found"
        if hold["status"] != "pending" or self.now >= hold["expires_at"]:
            return "hold_not_pending"
        if amount is not None and amount > hold["amount"]:
            return "capture_exceeds_hold"
        return None

    def do_transfer(self, req: TransferRequest) -> None:
        code = self.debit_error(req.debit, req.credit, req.amount, req.currency)
        result = self.expect(code, self.store.transfer, req, now=self.now)
        if code is None:
            self.bal[req.debit][0] -= req.amount
            self.bal[req.credit][0] += req.amount
            self.transfers[req.id] = (req, result)

    def release(self, hold: dict[str, Any], status: str, captured: int = 0) -> None:
        self.bal[hold["debit"]][0] += hold["amount"] - captured
        self.bal[hold["debit"]][1] -= hold["amount"]
        self.bal[hold["credit"]][0] += captured
        hold["status"] = status

    # -- rules ----------------------------------------------------------------------------

    @rule(debit=st.sampled_from(NAMES), credit=st.sampled_from(NAMES), amount=amounts, currency=currencies)
    def transfer(self, debit: str, credit: str, amount: int, currency: str) -> None:
        self.do_transfer(TransferRequest(f"t{next(self.ids)}", debit, credit, amount, currency))

    @rule(
        debit=st.sampled_from(NAMES),
        credit=st.sampled_from(NAMES),
        amount=amounts,
        currency=currencies,
        ttl=st.sampled_from([1.0, 5.0, 30.0]),
    )
    def hold(self, debit: str, credit: str, amount: int, currency: str, ttl: float) -> None:
        req = HoldRequest(f"h{next(self.ids)}", debit, credit, amount, currency, expires_at=self.now + ttl)
        code = self.debit_error(debit, credit, amount, currency)
        result = self.expect(code, self.store.hold, req, now=self.now)
        if code is None:
            assert result.hold.status == "pending"
            self.bal[debit][0] -= amount
            self.bal[debit][1] += amount
            self.holds[req.id] = {
                "req": req,
                "debit": debit,
                "credit": credit,
                "amount": amount,
                "expires_at": req.expires_at,
                "status": "pending",
                "changes": result.changes,
            }

    @rule(data=st.data(), amount=st.one_of(st.none(), amounts))
    def capture(self, data: st.DataObject, amount: int | None) -> None:
        hold_id = data.draw(st.sampled_from([*sorted(self.holds), "no-such-hold", "fund-a"]))
        code = self.hold_error(hold_id, amount)
        result = self.expect(code, self.store.capture, hold_id, amount, now=self.now)
        if code is None:
            hold = self.holds[hold_id]
            captured = hold["amount"] if amount is None else amount
            assert (result.hold.status, result.hold.captured) == ("captured", captured)
            self.release(hold, "captured", captured)

    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from([*sorted(self.holds), "no-such-hold"]))
        code = self.hold_error(hold_id, None)
        result = self.expect(code, self.store.void, hold_id, now=self.now)
        if code is None:
            assert result.hold.status == "voided"
            self.release(self.holds[hold_id], "voided")

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]), sweep=st.booleans())
    def advance_time(self, seconds: float, sweep: bool) -> None:
        self.now += seconds
        if not sweep:
            return  # leave expired-but-unswept holds around: captures must still refuse them
        results = self.call(self.store.expire_holds, self.now)
        due = sorted(i for i, h in self.holds.items() if h["status"] == "pending" and h["expires_at"] <= self.now)
        assert sorted(r.hold.id for r in results) == due
        for hold_id in due:
            self.release(self.holds[hold_id], "expired")

    @precondition(lambda self: bool(self.transfers))
    @rule(data=st.data())
    def retry_transfer_same_fields(self, data: st.DataObject) -> None:
        req, first = self.transfers[data.draw(st.sampled_from(sorted(self.transfers)))]
        again = self.call(self.store.transfer, req, now=self.now)
        assert again.replayed
        assert (again.transfer, again.changes) == (first.transfer, first.changes)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def retry_hold_same_fields(self, data: st.DataObject) -> None:
        hold = self.holds[data.draw(st.sampled_from(sorted(self.holds)))]
        again = self.call(self.store.hold, hold["req"], now=self.now)
        assert again.replayed
        assert again.hold.status == hold["status"]
        assert again.changes == hold["changes"]

    @precondition(lambda self: bool(self.transfers) or bool(self.holds))
    @rule(data=st.data(), as_hold=st.booleans(), bump=st.integers(min_value=1, max_value=5))
    def retry_with_other_fields(self, data: st.DataObject, as_hold: bool, bump: int) -> None:
        used = sorted([*self.transfers, *self.holds])
        original_id = data.draw(st.sampled_from(used))
        if original_id in self.transfers:
            base = self.transfers[original_id][0]
            debit, credit, amount, currency = base.debit, base.credit, base.amount, base.currency
        else:
            h = self.holds[original_id]["req"]
            debit, credit, amount, currency = h.debit, h.credit, h.amount, h.currency
        if as_hold:
            self.expect(
                "transfer_exists_with_different_fields",
                self.store.hold,
                HoldRequest(original_id, debit, credit, amount + bump, currency, self.now + 60),
                now=self.now,
            )
        else:
            self.expect(
                "transfer_exists_with_different_fields",
                self.store.transfer,
                TransferRequest(original_id, debit, credit, amount + bump, currency),
                now=self.now,
            )

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        snapshot = self.call(self.store.snapshot)
        stored = {b.account: [b.available, b.held] for b in snapshot.balances}
        assert stored == self.bal

        for currency in ("EUR", "USD"):
            assert sum(sum(v) for k, v in stored.items() if ACCOUNTS[k][0] == currency) == 0
        for name, (_, floor, _) in ACCOUNTS.items():
            assert floor is None or stored[name][0] >= floor, name
            assert stored[name][1] >= 0

        counts = Counter((e.transfer_id, e.reason) for e in snapshot.entries)
        expected: Counter[tuple[str, str]] = Counter()
        for transfer_id in self.transfers:
            expected[(transfer_id, "transfer")] = 2
        settle = {"pending": None, "captured": ("capture", 2), "voided": ("void", 1), "expired": ("expire", 1)}
        for hold_id, hold in self.holds.items():
            expected[(hold_id, "hold")] = 1
            step = settle[hold["status"]]
            if step is not None:
                expected[(hold_id, step[0])] = step[1]
        assert counts == expected

        report = check_ledger(snapshot)
        assert report.ok, report.mismatches


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_random_traffic_matches_the_model(kind: str, tmp_path: Path) -> None:
    require_store(kind)
    run_state_machine_as_test(
        lambda: WalletMachine(kind, tmp_path),
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )

"""Unit tests of the pure ledger rules (rtcore.wallet.ledger): no store, no clock."""

from __future__ import annotations

import ast
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rtcore.errors import Rejected, RtcoreError
from rtcore.wallet import ledger
from rtcore.wallet.errors import WALLET_ERROR_CODES, WalletError
from rtcore.wallet.ledger import (
    MAX_AMOUNT,
    MAX_BALANCE,
    Account,
    Balance,
    Hold,
    HoldRequest,
    Plan,
    Replay,
    Transfer,
    TransferRequest,
    check_account_reuse,
    new_account,
    plan_capture,
    plan_expire,
    plan_hold,
    plan_transfer,
    plan_void,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_000.0

HOUSE = new_account("house", "EUR", kind="system")
ALICE = new_account("alice", "EUR", owner="alice")
BOB = new_account("bob", "EUR", floor=-50)
CARL = new_account("carl", "USD")
ACCOUNTS = {a.id: a for a in (HOUSE, ALICE, BOB, CARL)}


def balances(**amounts: int | tuple[int, int]) -> dict[str, Balance]:
    """Balances by account id: ``alice=100`` or ``alice=(available, held)``."""
    out = {}
    for account_id, value in amounts.items():
        available, held = value if isinstance(value, tuple) else (value, 0)
        out[account_id] = Balance(account_id, ACCOUNTS[account_id].currency, available, held)
    return out


def transfer(
    req: TransferRequest, bal: Mapping[str, Balance], existing: Transfer | Hold | None = None
) -> Plan | Replay:
    known = {k: ACCOUNTS[k] for k in bal}
    return plan_transfer(req, existing=existing, accounts=known, balances=bal, now=NOW)


def hold(req: HoldRequest, bal: Mapping[str, Balance], existing: Transfer | Hold | None = None) -> Plan | Replay:
    known = {k: ACCOUNTS[k] for k in bal}
    return plan_hold(req, existing=existing, accounts=known, balances=bal, now=NOW)


def expect_error(code: str, fn: Any, *args: Any, **kwargs: Any) -> WalletError:
    with pytest.raises(WalletError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def posted_sum(plan: Plan) -> int:
    return sum(p.delta + p.held_delta for p in plan.postings)


def a_hold(**changes: Any) -> Hold:
    base = Hold("h1", "alice", "house", 30, "EUR", expires_at=NOW + 60, metadata={}, created_at=NOW - 1)
    return msgspec.structs.replace(base, **changes)


# -- accounts ---------------------------------------------------------------------


def test_new_account_defaults_floor_by_kind() -> None:
    assert new_account("p", "EUR").floor == 0
    assert new_account("s", "EUR", kind="system").floor is None
    assert new_account("s", "EUR", kind="system", floor=-10).floor == -10
    assert new_account("p", "EUR", floor=-500, owner="u1") == Account("p", "EUR", "player", -500, "u1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": "", "currency": "EUR"},
        {"id": "has space", "currency": "EUR"},
        {"id": "x" * 129, "currency": "EUR"},
        {"id": "ok", "currency": "eur"},
        {"id": "ok", "currency": ""},
        {"id": "ok", "currency": "EUR", "kind": "bank"},
        {"id": "ok", "currency": "EUR", "floor": 1},
        {"id": "ok", "currency": "EUR", "floor": 1.5},
        {"id": "ok", "currency": "EUR", "owner": ""},
    ],
)
def test_new_account_rejects_bad_definitions(kwargs: dict[str, Any]) -> None:
    expect_error("invalid_account", new_account, **kwargs)


def test_account_reuse_same_fields_is_idempotent_other_fields_conflict() -> None:
    assert check_account_reuse(ALICE, new_account("alice", "EUR", owner="alice")) is ALICE
    expect_error("account_exists_with_different_fields", check_account_reuse, ALICE, new_account("alice", "USD"))


# -- transfers ----------------------------------------------------------------------


def test_transfer_moves_money_between_two_accounts_and_sums_to_zero() -> None:
    plan = transfer(TransferRequest("t1", "house", "alice", 100, "EUR", {"game": "dice"}), balances(house=0, alice=5))
    assert isinstance(plan, Plan)
    assert plan.insert
    assert plan.record == Transfer("t1", "house", "alice", 100, "EUR", {"game": "dice"}, NOW)
    assert [(p.account, p.delta, p.held_delta, p.available, p.reason) for p in plan.postings] == [
        ("house", -100, 0, -100, "transfer"),
        ("alice", 100, 0, 105, "transfer"),
    ]
    assert plan.balances == (Balance("house", "EUR", -100, 0), Balance("alice", "EUR", 105, 0))
    assert posted_sum(plan) == 0


@pytest.mark.parametrize("amount", [0, -1, -100, True, 1.5, "5", MAX_AMOUNT + 1])
def test_transfer_rejects_non_positive_or_non_integer_amounts(amount: Any) -> None:
    expect_error(
        "invalid_amount", transfer, TransferRequest("t1", "house", "alice", amount, "EUR"), balances(house=0, alice=0)
    )


@pytest.mark.parametrize("bad_id", ["", "a b", "tab\t", "x" * 129, "é" * 65])
def test_transfer_rejects_bad_ids(bad_id: str) -> None:
    expect_error(
        "invalid_id", transfer, TransferRequest(bad_id, "house", "alice", 1, "EUR"), balances(house=0, alice=0)
    )


def test_transfer_to_the_same_account_is_refused() -> None:
    expect_error("same_account", transfer, TransferRequest("t1", "alice", "alice", 1, "EUR"), balances(alice=10))


@pytest.mark.parametrize(("debit", "credit"), [("nobody", "alice"), ("alice", "nobody"), ("", "alice")])
def test_transfer_with_an_unknown_account_is_refused(debit: str, credit: str) -> None:
    known = balances(alice=10)
    expect_error("account_not_found", transfer, TransferRequest("t1", debit, credit, 1, "EUR"), known)


def test_transfer_between_currencies_is_refused() -> None:
    expect_error(
        "currency_mismatch", transfer, TransferRequest("t1", "alice", "carl", 1, "EUR"), balances(alice=10, carl=0)
    )


def test_transfer_in_another_currency_than_the_accounts_is_refused() -> None:
    expect_error(
        "currency_mismatch", transfer, TransferRequest("t1", "house", "alice", 1, "USD"), balances(house=0, alice=0)
    )


def test_player_cannot_go_below_zero() -> None:
    err = expect_error(
        "insufficient_funds", transfer, TransferRequest("t1", "alice", "house", 11, "EUR"), balances(alice=10, house=0)
    )
    assert "alice" in err.message
    plan = transfer(TransferRequest("t1", "alice", "house", 10, "EUR"), balances(alice=10, house=0))
    assert isinstance(plan, Plan)
    assert plan.balances[0].available == 0


def test_player_overdraft_floor_is_the_limit() -> None:
    plan = transfer(TransferRequest("t1", "bob", "house", 50, "EUR"), balances(bob=0, house=0))
    assert isinstance(plan, Plan)
    assert plan.balances[0].available == -50
    expect_error(
        "insufficient_funds", transfer, TransferRequest("t1", "bob", "house", 51, "EUR"), balances(bob=0, house=0)
    )


def test_held_funds_cannot_be_spent() -> None:
    expect_error(
        "insufficient_funds",
        transfer,
        TransferRequest("t1", "alice", "house", 5, "EUR"),
        balances(alice=(4, 96), house=0),
    )


def test_system_account_without_floor_may_go_negative_but_not_overflow() -> None:
    plan = transfer(TransferRequest("t1", "house", "alice", MAX_AMOUNT, "EUR"), balances(house=-(10**17), alice=0))
    assert isinstance(plan, Plan)
    expect_error(
        "balance_overflow",
        transfer,
        TransferRequest("t1", "house", "alice", 1, "EUR"),
        balances(house=-MAX_BALANCE, alice=0),
    )


def test_system_account_with_a_floor_is_limited() -> None:
    limited = new_account("fees", "EUR", kind="system", floor=-10)
    bal = {"fees": Balance("fees", "EUR", 0, 0), "alice": Balance("alice", "EUR", 0, 0)}
    accounts = {"fees": limited, "alice": ALICE}
    with pytest.raises(WalletError) as info:
        plan_transfer(
            TransferRequest("t1", "fees", "alice", 11, "EUR"), existing=None, accounts=accounts, balances=bal, now=NOW
        )
    assert info.value.code == "insufficient_funds"


@pytest.mark.parametrize(
    "metadata", [{"k": 1}, {"": "v"}, {"k" * 65: "v"}, {"k": "v" * 513}, {str(i): "v" for i in range(33)}]
)
def test_transfer_rejects_bad_metadata(metadata: Any) -> None:
    expect_error(
        "invalid_metadata",
        transfer,
        TransferRequest("t1", "house", "alice", 1, "EUR", metadata),
        balances(house=0, alice=0),
    )


def test_same_id_same_fields_replays_even_if_funds_changed() -> None:
    first = transfer(TransferRequest("t1", "alice", "house", 10, "EUR", {"r": "1"}), balances(alice=10, house=0))
    assert isinstance(first, Plan)
    # The same request again, after the money is gone: the first result, not an error.
    again = transfer(
        TransferRequest("t1", "alice", "house", 10, "EUR", {"r": "1"}), balances(alice=0, house=10), first.record
    )
    assert again == Replay(first.record)


@pytest.mark.parametrize(
    "changed",
    [
        {"amount": 11},
        {"credit": "bob"},
        {"debit": "bob"},
        {"metadata": {"r": "2"}},
        {"metadata": {}},
        {"currency": "USD"},
    ],
)
def test_same_id_other_fields_is_refused(changed: dict[str, Any]) -> None:
    stored = Transfer("t1", "alice", "house", 10, "EUR", {"r": "1"}, NOW - 5)
    req = msgspec.structs.replace(TransferRequest("t1", "alice", "house", 10, "EUR", {"r": "1"}), **changed)
    expect_error("transfer_exists_with_different_fields", transfer, req, balances(alice=10, house=0, bob=0), stored)


def test_transfer_id_used_by_a_hold_is_refused_and_vice_versa() -> None:
    stored_hold = a_hold(id="x")
    expect_error(
        "transfer_exists_with_different_fields",
        transfer,
        TransferRequest("x", "alice", "house", 30, "EUR"),
        balances(alice=100, house=0),
        stored_hold,
    )
    stored_transfer = Transfer("y", "alice", "house", 30, "EUR", {}, NOW)
    expect_error(
        "transfer_exists_with_different_fields",
        hold,
        HoldRequest("y", "alice", "house", 30, "EUR", NOW + 60),
        balances(alice=100, house=0),
        stored_transfer,
    )


def test_malformed_request_is_refused_before_the_id_lookup() -> None:
    stored = Transfer("t1", "alice", "house", 10, "EUR", {}, NOW)
    expect_error(
        "invalid_amount",
        transfer,
        TransferRequest("t1", "alice", "house", 0, "EUR"),
        balances(alice=10, house=0),
        stored,
    )


# -- holds ------------------------------------------------------------------------------


def test_hold_reserves_available_funds_without_touching_the_credit_account() -> None:
    plan = hold(HoldRequest("h1", "alice", "house", 30, "EUR", NOW + 60, {"bet": "7"}), balances(alice=100, house=0))
    assert isinstance(plan, Plan)
    assert isinstance(plan.record, Hold)
    assert plan.record.status == "pending"
    assert plan.record.metadata == {"bet": "7"}
    assert [(p.account, p.delta, p.held_delta, p.reason) for p in plan.postings] == [("alice", -30, 30, "hold")]
    assert plan.balances == (Balance("alice", "EUR", 70, 30),)
    assert posted_sum(plan) == 0


@pytest.mark.parametrize("expires_at", [NOW, NOW - 1, float("nan"), True])
def test_hold_must_expire_in_the_future(expires_at: Any) -> None:
    expect_error(
        "invalid_expiry", hold, HoldRequest("h1", "alice", "house", 1, "EUR", expires_at), balances(alice=10, house=0)
    )


def test_hold_checks_funds_and_currency_like_a_transfer() -> None:
    expect_error(
        "insufficient_funds", hold, HoldRequest("h1", "alice", "house", 11, "EUR", NOW + 1), balances(alice=10, house=0)
    )
    expect_error(
        "currency_mismatch", hold, HoldRequest("h1", "alice", "carl", 1, "EUR", NOW + 1), balances(alice=10, carl=0)
    )
    expect_error(
        "invalid_amount", hold, HoldRequest("h1", "alice", "house", -5, "EUR", NOW + 1), balances(alice=10, house=0)
    )
    expect_error("account_not_found", hold, HoldRequest("h1", "alice", "nobody", 1, "EUR", NOW + 1), balances(alice=10))


def test_hold_replay_returns_the_hold_in_its_current_status_even_after_expiry() -> None:
    captured = a_hold(status="captured", captured=30, settled_at=NOW)
    req = HoldRequest("h1", "alice", "house", 30, "EUR", captured.expires_at)
    later = plan_hold(req, existing=captured, accounts={}, balances={}, now=captured.expires_at + 100)
    assert later == Replay(captured)
    expect_error(
        "transfer_exists_with_different_fields",
        hold,
        msgspec.structs.replace(req, expires_at=req.expires_at + 1),
        balances(alice=100, house=0),
        captured,
    )


# -- capture, void, expiry ------------------------------------------------------------------


def test_full_capture_moves_the_hold_to_the_credit_account() -> None:
    plan = plan_capture("h1", None, hold=a_hold(), balances=balances(alice=(70, 30), house=0), now=NOW)
    assert isinstance(plan.record, Hold)
    assert (plan.record.status, plan.record.captured, plan.record.settled_at) == ("captured", 30, NOW)
    assert not plan.insert
    assert [(p.account, p.delta, p.held_delta, p.reason) for p in plan.postings] == [
        ("alice", 0, -30, "capture"),
        ("house", 30, 0, "capture"),
    ]
    assert plan.balances == (Balance("alice", "EUR", 70, 0), Balance("house", "EUR", 30, 0))
    assert posted_sum(plan) == 0


def test_partial_capture_releases_the_rest() -> None:
    plan = plan_capture("h1", 12, hold=a_hold(), balances=balances(alice=(70, 30), house=0), now=NOW)
    assert isinstance(plan.record, Hold)
    assert plan.record.captured == 12
    assert plan.balances == (Balance("alice", "EUR", 88, 0), Balance("house", "EUR", 12, 0))
    assert posted_sum(plan) == 0


def test_capture_above_the_hold_is_refused() -> None:
    expect_error(
        "capture_exceeds_hold",
        plan_capture,
        "h1",
        31,
        hold=a_hold(),
        balances=balances(alice=(70, 30), house=0),
        now=NOW,
    )


@pytest.mark.parametrize("amount", [0, -1, True])
def test_capture_of_a_non_positive_amount_is_refused(amount: Any) -> None:
    expect_error(
        "invalid_amount", plan_capture, "h1", amount, hold=a_hold(), balances=balances(alice=(70, 30), house=0), now=NOW
    )


@pytest.mark.parametrize("status", ["captured", "voided", "expired"])
def test_capture_or_void_of_a_settled_hold_is_refused(status: str) -> None:
    settled = a_hold(status=status, settled_at=NOW)
    bal = balances(alice=(100, 0), house=0)
    err = expect_error("hold_not_pending", plan_capture, "h1", None, hold=settled, balances=bal, now=NOW)
    assert status in err.message
    expect_error("hold_not_pending", plan_void, "h1", hold=settled, balances=bal, now=NOW)


def test_capture_or_void_after_the_deadline_is_refused_before_the_sweep() -> None:
    pending = a_hold()
    bal = balances(alice=(70, 30), house=0)
    expect_error("hold_not_pending", plan_capture, "h1", None, hold=pending, balances=bal, now=pending.expires_at)
    expect_error("hold_not_pending", plan_void, "h1", hold=pending, balances=bal, now=pending.expires_at + 1)


def test_capture_or_void_of_an_unknown_hold_or_a_transfer_is_hold_not_found() -> None:
    bal = balances(alice=100, house=0)
    expect_error("hold_not_found", plan_capture, "nope", None, hold=None, balances=bal, now=NOW)
    expect_error("hold_not_found", plan_void, "nope", hold=None, balances=bal, now=NOW)
    a_transfer = Transfer("t1", "alice", "house", 5, "EUR", {}, NOW)
    expect_error("hold_not_found", plan_capture, "t1", None, hold=a_transfer, balances=bal, now=NOW)


def test_void_releases_everything() -> None:
    plan = plan_void("h1", hold=a_hold(), balances=balances(alice=(70, 30)), now=NOW)
    assert isinstance(plan.record, Hold)
    assert plan.record.status == "voided"
    assert [(p.delta, p.held_delta, p.reason) for p in plan.postings] == [(30, -30, "void")]
    assert plan.balances == (Balance("alice", "EUR", 100, 0),)


def test_expire_only_pending_holds_past_their_deadline() -> None:
    pending = a_hold()
    bal = balances(alice=(70, 30))
    assert plan_expire(pending, balances=bal, now=pending.expires_at - 0.001) is None
    plan = plan_expire(pending, balances=bal, now=pending.expires_at)
    assert plan is not None
    assert isinstance(plan.record, Hold)
    assert plan.record.status == "expired"
    assert [(p.delta, p.held_delta, p.reason) for p in plan.postings] == [(30, -30, "expire")]
    assert plan_expire(a_hold(status="voided"), balances=bal, now=pending.expires_at + 5) is None


def test_rules_do_not_mutate_their_inputs() -> None:
    bal = balances(alice=(70, 30), house=0)
    before = dict(bal)
    pending = a_hold()
    with pytest.raises(WalletError):
        plan_capture("h1", 31, hold=pending, balances=bal, now=NOW)
    plan_capture("h1", 5, hold=pending, balances=bal, now=NOW)
    assert bal == before
    assert pending == a_hold()


# -- errors and purity -----------------------------------------------------------------------


def test_wallet_errors_are_rejections_with_documented_status() -> None:
    for code, info in WALLET_ERROR_CODES.items():
        err = WalletError(code, "why")
        assert isinstance(err, Rejected)
        assert isinstance(err, RtcoreError)
        assert (err.code, err.retryable, err.http_status, err.message) == (
            code,
            info.retryable,
            info.http_status,
            "why",
        )
        clone = pickle.loads(pickle.dumps(err))
        assert (type(clone), clone.code, clone.http_status) == (WalletError, code, info.http_status)
    assert WalletError("hold_not_found").message == WALLET_ERROR_CODES["hold_not_found"].description
    with pytest.raises(KeyError):
        WalletError("made_up_code")


def test_error_table_is_documented_in_docs_wallet_md() -> None:
    text = (ROOT / "docs" / "wallet.md").read_text()
    rows = {
        m.group(1): (m.group(2) == "yes", int(m.group(3)))
        for m in re.finditer(r"^\|\s*`(\w+)`\s*\|\s*(yes|no)\s*\|\s*(\d{3})\s*\|", text, re.MULTILINE)
    }
    assert rows == {code: (info.retryable, info.http_status) for code, info in WALLET_ERROR_CODES.items()}


FORBIDDEN_IMPORTS = {"anyio", "asyncio", "trio", "socket", "time", "datetime", "threading", "sqlite3", "psycopg", "os"}


def test_ledger_is_sans_io() -> None:
    tree = ast.parse(Path(ledger.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "the parser found no imports at all"
    assert not imported & FORBIDDEN_IMPORTS, imported & FORBIDDEN_IMPORTS

"""The wallet.* commands end to end: in-process client -> node -> store -> streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import rtcore.wallet
from rtcore import App, Node, Principal, RtcoreError
from rtcore.testing import FakeClock, connect, serve
from rtcore.wallet import TransferRequest, WalletRouter, WalletStore, last_balance_event, reconcile

pytestmark = pytest.mark.anyio

PRINCIPALS = {
    "alice": Principal("alice"),
    "bob": Principal("bob"),
    "game": Principal("game", roles=frozenset({"game"})),
    "root": Principal("root", roles=frozenset({"admin"})),
}


class Env:
    def __init__(self, app: App, wallet: WalletRouter, node: Node, clock: FakeClock, store: WalletStore) -> None:
        self.app, self.wallet, self.node, self.clock, self.store = app, wallet, node, clock, store
        self.denied: set[tuple[str, str]] = set()

    async def events(self, account: str) -> list[dict[str, Any]]:
        page = await self.node.backend.events.read(f"wallet:{account}", after=0, limit=1000)
        assert all(e.type == "balance_changed" for e in page.events)
        return [e.data for e in page.events]


@pytest.fixture
async def env(store: WalletStore) -> AsyncIterator[Env]:
    app = App()
    wallet = rtcore.wallet.commands(store)
    app.include(wallet)
    denied: set[tuple[str, str]] = set()

    @app.authenticate
    async def authenticate(token: str | None) -> Principal | None:
        return PRINCIPALS.get(token or "")

    @app.authorize
    async def authorize(principal: Principal | None, action: str, resource: str) -> bool:
        return (action, resource) not in denied

    await store.create_account("house:EUR", "EUR", kind="system", owner="game")
    await store.create_account("alice", "EUR", owner="alice")
    await store.create_account("bob", "EUR", owner="bob")
    clock = FakeClock()
    async with serve(app, clock=clock) as node:
        e = Env(app, wallet, node, clock, store)
        e.denied = denied
        yield e


async def command(env: Env, token: str, name: str, args: Any, key: str | None = None) -> Any:
    async with connect(env.node, token=token) as client:
        return await client.command(name, args, key=key)


async def refused(env: Env, token: str, name: str, args: Any) -> RtcoreError:
    async with connect(env.node, token=token) as client:
        with pytest.raises(RtcoreError) as info:
            await client.command(name, args)
    return info.value


async def fund(env: Env, account: str, amount: int, id: str = "deposit") -> Any:
    return await command(env, "root", "wallet.credit", {"id": f"{id}-{account}", "account": account, "amount": amount})


async def test_admin_credit_is_published_live_to_the_owner(env: Env) -> None:
    async with connect(env.node, token="alice") as alice:
        await alice.subscribe("wallet:alice")
        result = await fund(env, "alice", 500)
        assert result["replayed"] is False
        assert result["transfer"]["debit"] == "house:EUR"
        # An admin sees both sides.
        assert result["balances"] == [
            {"account": "house:EUR", "currency": "EUR", "available": -500, "held": 0},
            {"account": "alice", "currency": "EUR", "available": 500, "held": 0},
        ]
        evt = await alice.next_event("wallet:alice")
        assert evt.type == "balance_changed"
        assert (evt.data["available"], evt.data["held"], evt.data["delta"], evt.data["reason"]) == (
            500,
            0,
            500,
            "transfer",
        )
        assert await alice.command("wallet.balance", {"account": "alice"}) == {
            "account": "alice",
            "currency": "EUR",
            "available": 500,
            "held": 0,
        }
    assert await env.store.unpublished() == []


async def test_admin_commands_need_the_admin_role(env: Env) -> None:
    for name in ("wallet.credit", "wallet.debit"):
        err = await refused(env, "alice", name, {"id": "x", "account": "alice", "amount": 5})
        assert err.code == "forbidden"
    await fund(env, "alice", 100)
    result = await command(env, "root", "wallet.debit", {"id": "w1", "account": "alice", "amount": 30})
    assert (result["transfer"]["debit"], result["transfer"]["credit"]) == ("alice", "house:EUR")
    assert (await env.store.get_balance("alice")).available == 70
    err = await refused(env, "root", "wallet.debit", {"id": "w2", "account": "alice", "amount": 71})
    assert (err.code, err.retryable) == ("insufficient_funds", False)


async def test_players_move_only_their_own_money(env: Env) -> None:
    await fund(env, "alice", 100)
    result = await command(
        env,
        "alice",
        "wallet.transfer",
        {"id": "t1", "debit": "alice", "credit": "bob", "amount": 40, "currency": "EUR"},
    )
    # alice sees her own balance after the transfer, not bob's.
    assert result["balances"] == [{"account": "alice", "currency": "EUR", "available": 60, "held": 0}]
    err = await refused(
        env, "alice", "wallet.transfer", {"id": "t2", "debit": "bob", "credit": "alice", "amount": 1, "currency": "EUR"}
    )
    assert err.code == "forbidden"
    err = await refused(env, "alice", "wallet.balance", {"account": "bob"})
    assert err.code == "forbidden"
    # An unknown account is forbidden to players (no probing) but not found for admins.
    assert (await refused(env, "alice", "wallet.balance", {"account": "ghost"})).code == "forbidden"
    assert (await refused(env, "root", "wallet.balance", {"account": "ghost"})).code == "account_not_found"
    assert [e["available"] for e in await env.events("bob")] == [40]


async def test_wallet_errors_reach_the_client_with_their_code(env: Env) -> None:
    await fund(env, "alice", 10)
    base = {"id": "t", "debit": "alice", "credit": "bob", "currency": "EUR"}
    assert (await refused(env, "alice", "wallet.transfer", {**base, "amount": 11})).code == "insufficient_funds"
    assert (await refused(env, "alice", "wallet.transfer", {**base, "amount": 0})).code == "invalid_amount"
    assert (await refused(env, "alice", "wallet.transfer", {**base, "amount": -4})).code == "invalid_amount"
    assert (await refused(env, "alice", "wallet.transfer", {**base, "amount": "7"})).code == "bad_args"
    assert (await env.store.get_balance("alice")).available == 10


async def test_retries_apply_once_and_publish_once(env: Env) -> None:
    await fund(env, "alice", 100)
    args = {"id": "t1", "debit": "alice", "credit": "bob", "amount": 25, "currency": "EUR"}
    first = await command(env, "alice", "wallet.transfer", args, key="k1")
    same_key = await command(env, "alice", "wallet.transfer", args, key="k1")
    other_key = await command(env, "alice", "wallet.transfer", args, key="k2")
    assert first["replayed"] is False
    assert same_key == first  # answered by the idempotency layer
    assert other_key["replayed"] is True  # answered by the ledger
    assert other_key["transfer"] == first["transfer"]
    assert (await env.store.get_balance("alice")).available == 75
    assert [e["available"] for e in await env.events("alice")] == [100, 75]
    err = await refused(env, "alice", "wallet.transfer", {**args, "amount": 26})
    assert err.code == "transfer_exists_with_different_fields"


async def test_bet_is_held_by_the_player_and_settled_by_the_game(env: Env) -> None:
    await fund(env, "alice", 100)
    bet = {"id": "bet:r1:alice", "debit": "alice", "credit": "house:EUR", "amount": 30, "currency": "EUR", "ttl": 60}
    placed = await command(env, "alice", "wallet.hold", bet)
    assert placed["hold"]["status"] == "pending"
    assert placed["hold"]["expires_at"] == env.clock.now + 60
    assert placed["balances"] == [{"account": "alice", "currency": "EUR", "available": 70, "held": 30}]

    # The player cannot settle (void would cancel a losing bet); the game can.
    assert (await refused(env, "alice", "wallet.void", {"hold": "bet:r1:alice"})).code == "forbidden"
    assert (await refused(env, "alice", "wallet.capture", {"hold": "bet:r1:alice"})).code == "forbidden"
    assert (await refused(env, "bob", "wallet.capture", {"hold": "nope"})).code == "forbidden"
    assert (await refused(env, "game", "wallet.capture", {"hold": "bet:r1:alice", "amount": 31})).code == (
        "capture_exceeds_hold"
    )

    # A retry of a ttl hold later, with another key, replays the first hold.
    env.clock.advance(5)
    again = await command(env, "alice", "wallet.hold", bet, key="other")
    assert again["replayed"] is True
    assert again["hold"]["expires_at"] == placed["hold"]["expires_at"]

    settled = await command(env, "game", "wallet.capture", {"hold": "bet:r1:alice", "amount": 10})
    assert (settled["hold"]["status"], settled["hold"]["captured"]) == ("captured", 10)
    assert settled["balances"] == [{"account": "house:EUR", "currency": "EUR", "available": -90, "held": 0}]
    assert (await refused(env, "game", "wallet.void", {"hold": "bet:r1:alice"})).code == "hold_not_pending"

    history = [(e["reason"], e["available"], e["held"]) for e in await env.events("alice")]
    assert history == [("transfer", 100, 0), ("hold", 70, 30), ("capture", 90, 0)]


async def test_void_and_sweep_release_holds_and_publish(env: Env) -> None:
    await fund(env, "alice", 100)
    hold = {"debit": "alice", "credit": "house:EUR", "amount": 10, "currency": "EUR"}
    await command(env, "alice", "wallet.hold", {**hold, "id": "h1", "ttl": 10})
    await command(env, "alice", "wallet.hold", {**hold, "id": "h2", "expires_at": env.clock.now + 20})
    voided = await command(env, "game", "wallet.void", {"hold": "h1"})
    assert voided["hold"]["status"] == "voided"
    assert (await refused(env, "alice", "wallet.hold", {**hold, "id": "h3", "ttl": -1})).code == "invalid_expiry"

    env.clock.advance(20)
    assert await env.wallet.sweep(env.node.publish, now=env.clock.now) == 1
    assert [(e["reason"], e["available"]) for e in await env.events("alice")][-2:] == [("void", 90), ("expire", 100)]


async def test_history_pages(env: Env) -> None:
    await fund(env, "alice", 100)
    for i in range(4):
        args = {"id": f"t{i}", "debit": "alice", "credit": "bob", "amount": 1, "currency": "EUR"}
        await command(env, "alice", "wallet.transfer", args)
    page = await command(env, "alice", "wallet.history", {"account": "alice", "limit": 3})
    assert [e["available"] for e in page["entries"]] == [100, 99, 98]
    rest = await command(env, "alice", "wallet.history", {"account": "alice", "after": page["next_after"]})
    assert [e["available"] for e in rest["entries"]] == [97, 96]
    assert rest["next_after"] is None
    assert (await refused(env, "bob", "wallet.history", {"account": "alice"})).code == "forbidden"


async def test_the_apps_authorize_hook_has_the_last_word(env: Env) -> None:
    await fund(env, "alice", 100)
    env.denied.add(("wallet.transfer", "wallet:alice"))
    args = {"id": "t1", "debit": "alice", "credit": "bob", "amount": 1, "currency": "EUR"}
    assert (await refused(env, "alice", "wallet.transfer", args)).code == "forbidden"
    assert (await env.store.get_balance("alice")).available == 100


async def test_outbox_records_left_behind_are_flushed_and_reconcile(env: Env) -> None:
    await fund(env, "alice", 100)
    # As if the process died between the commit and the publish:
    await env.store.transfer(TransferRequest("lost", "alice", "bob", 7, "EUR"))
    assert len(await env.store.unpublished()) == 2
    last = last_balance_event(env.node.backend.events)
    report = await reconcile(env.store, last)
    assert report.ok
    assert report.lagging == ("alice", "bob")

    # The next command's flush publishes them first, in entry order.
    await command(
        env, "alice", "wallet.transfer", {"id": "t2", "debit": "alice", "credit": "bob", "amount": 3, "currency": "EUR"}
    )
    assert [e["available"] for e in await env.events("alice")] == [100, 93, 90]
    assert [e["available"] for e in await env.events("bob")] == [7, 10]
    assert await env.wallet.flush(env.node.publish) == 0
    report = await reconcile(env.store, last)
    assert report.ok
    assert report.lagging == ()
    assert report.streams_checked == 3

"""``rtcore.wallet.install``: commands plus the scheduled sweep, and the store its lifespan opens.

The sweep closes the two gaps a command-driven wallet has: a hold past its
deadline keeps the player's money reserved until someone sweeps, and records
left in the outbox (by a crash or an event-log outage) wait for the next
command. These tests run a node with the ``processor`` role and check that
the loop alone, with no command sent, releases the hold and publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import rtcore.wallet
from rtcore import App, Node, Principal
from rtcore.testing import FakeClock, connect, serve
from rtcore.wallet import HoldRequest, TransferRequest, WalletStore, last_balance_event, reconcile
from rtcore.wallet.router import SWEEP_LOOP

pytestmark = pytest.mark.anyio


async def _events(node: Node, account: str) -> list[dict[str, Any]]:
    page = await node.backend.events.read(f"wallet:{account}", after=0, limit=1000)
    return [e.data for e in page.events]


async def _eventually(check: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.01)


def _app(store: WalletStore | str, **options: Any) -> tuple[App, rtcore.wallet.WalletRouter]:
    app = App()
    router = rtcore.wallet.install(app, store, sweep_every=0.25, sweep_lease=1.0, **options)

    @app.authenticate
    async def authenticate(token: str | None) -> Principal | None:
        return Principal("root", roles=frozenset({"admin"})) if token == "root" else None

    return app, router


async def test_install_mounts_the_commands_and_one_sweep_loop(store: WalletStore) -> None:
    app, router = _app(store)
    assert {name for name in app.commands if name.startswith("wallet.")} == set(router.commands)
    assert [loop.name for loop in app.loops] == [SWEEP_LOOP]
    with pytest.raises(ValueError, match="already registered"):
        rtcore.wallet.install(app, store)


async def test_the_loop_expires_due_holds_without_any_command(store: WalletStore) -> None:
    app, _ = _app(store)
    await store.create_account("house:EUR", "EUR", kind="system")
    await store.create_account("alice", "EUR", owner="alice")
    clock = FakeClock()
    await store.transfer(TransferRequest("d", "house:EUR", "alice", 100, "EUR"), now=clock.now)
    await store.hold(HoldRequest("bet", "alice", "house:EUR", 40, "EUR", expires_at=clock.now + 30), now=clock.now)
    async with serve(app, clock=clock) as node:
        # The first tick (at startup) drains what the direct store calls left in the outbox.
        async def published() -> bool:
            return [e["available"] for e in await _events(node, "alice")] == [100, 60]

        await _eventually(published)
        assert (await store.get_balance("alice")).held == 40  # not due yet

        clock.advance(31)

        async def released() -> bool:
            return (await store.get_balance("alice")).held == 0

        await _eventually(released)
        await _eventually(lambda: _has_reason(node, "alice", "expire"))
        assert (await store.get_transfer("bet")).status == "expired"  # type: ignore[union-attr]
        report = await reconcile(store, last_balance_event(node.backend.events))
        assert report.ok, report.mismatches
        assert report.lagging == ()


async def _has_reason(node: Node, account: str, reason: str) -> bool:
    return any(e["reason"] == reason for e in await _events(node, account))


async def test_a_node_without_the_processor_role_does_not_sweep(store: WalletStore) -> None:
    app, _ = _app(store)
    await store.create_account("house:EUR", "EUR", kind="system")
    await store.create_account("alice", "EUR")
    await store.transfer(TransferRequest("d", "house:EUR", "alice", 5, "EUR"))
    async with serve(app, roles=frozenset({"api", "gateway"})) as node:
        await anyio.sleep(0.2)
        assert await _events(node, "alice") == []
        assert len(await store.unpublished()) == 2


async def test_a_failing_sweep_is_retried_on_the_next_tick(store: WalletStore) -> None:
    app, router = _app(store)
    await store.create_account("house:EUR", "EUR", kind="system")
    await store.create_account("alice", "EUR")
    await store.transfer(TransferRequest("d", "house:EUR", "alice", 5, "EUR"))
    real_expire, failures = store.expire_holds, [2]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise rtcore.BackendError("database restarting")
        return await real_expire(*args, **kwargs)

    router.store = _Patched(store, expire_holds=flaky)  # type: ignore[assignment]
    async with serve(app) as node:
        await _eventually(lambda: _has_reason(node, "alice", "transfer"))
    assert failures == [0]


class _Patched:
    """``store`` with some methods replaced."""

    def __init__(self, store: WalletStore, **methods: Any) -> None:
        self._store, self._methods = store, methods

    def __getattr__(self, name: str) -> Any:
        return self._methods.get(name) or getattr(self._store, name)


class _Tracked:
    """Opens real stores and records each open and close (wraps ``aclose``)."""

    def __init__(self) -> None:
        self.opened: list[WalletStore] = []
        self.closed: list[WalletStore] = []

    async def open(self, url: str) -> WalletStore:
        store = await rtcore.wallet.open_wallet_store(url)
        real_close = store.aclose

        async def aclose() -> None:
            self.closed.append(store)
            await real_close()

        store.aclose = aclose  # type: ignore[method-assign]
        self.opened.append(store)
        return store


async def test_a_url_is_opened_at_startup_and_closed_when_the_node_stops(tmp_path: Path) -> None:
    """The store of a URL exists exactly while a node runs: open for handlers and the sweep, closed after.

    Mutations: the router does not register its lifespan for a URL → fails
    (``router.store`` raises in the handler: the credit is refused);
    ``Node.__aexit__`` skips the lifespan shutdown → fails (the store is
    never closed); ``router.store`` keeps the closed store after the
    shutdown → fails (no RuntimeError after the block).
    """
    url = f"sqlite:///{tmp_path / 'w.db'}"
    tracked = _Tracked()
    app, router = _app(url, opener=tracked.open)
    assert router.url == url
    with pytest.raises(RuntimeError, match="is not open"):
        router.store  # noqa: B018 - the property raises
    assert not (tmp_path / "w.db").exists()  # nothing opened at declaration time
    async with serve(app) as node:
        assert tracked.opened == [router.store] and tracked.closed == []
        await router.store.create_account("house:EUR", "EUR", kind="system")
        await router.store.create_account("bob", "EUR", owner="bob")
        async with connect(node, token="root") as root:
            reply = await root.command("wallet.credit", {"id": "c1", "account": "bob", "amount": 9})
        assert reply["balances"][-1] == {"account": "bob", "currency": "EUR", "available": 9, "held": 0}
        assert [e["available"] for e in await _events(node, "bob")] == [9]
    assert tracked.closed == tracked.opened
    with pytest.raises(RuntimeError, match="is not open"):
        router.store  # noqa: B018
    # A new node opens the same file again.
    async with serve(app):
        assert (await router.store.get_balance("bob")).available == 9
    assert len(tracked.opened) == 2 and tracked.closed == tracked.opened


async def test_the_store_is_closed_even_when_the_node_stops_on_an_error(tmp_path: Path) -> None:
    """Mutation: run the lifespan shutdown only on a clean exit → fails (the store stays open)."""
    tracked = _Tracked()
    app, _ = _app(f"sqlite:///{tmp_path / 'w.db'}", opener=tracked.open)
    with pytest.raises(ZeroDivisionError):
        async with serve(app):
            1 / 0  # noqa: B018
    assert len(tracked.opened) == 1 and tracked.closed == tracked.opened


async def test_a_store_that_cannot_open_fails_the_node_start(tmp_path: Path) -> None:
    """The opener's error comes out of the node's start; nothing is served.

    Mutation: swallow lifespan startup errors in ``Node.__aenter__`` → fails.
    """
    app, _ = _app(f"sqlite:///{tmp_path / 'missing-dir' / 'w.db'}")
    with pytest.raises(rtcore.BackendError):
        async with serve(app):
            pytest.fail("the node must not start without its store")  # pragma: no cover


async def test_nodes_of_one_app_share_the_store_until_the_last_stops(tmp_path: Path) -> None:
    """Two nodes running the same app in one process: one store, closed when the second stops.

    Mutation: close the store at every node's shutdown (no user count) →
    fails (the inner node's exit closes the store the outer one still uses).
    """
    tracked = _Tracked()
    app, router = _app(f"sqlite:///{tmp_path / 'w.db'}", opener=tracked.open)
    async with serve(app):
        async with serve(app):
            await router.store.create_account("carol", "EUR")
        assert tracked.closed == []
        assert (await router.store.get_balance("carol")).available == 0
    assert len(tracked.opened) == 1 and tracked.closed == tracked.opened


async def test_an_open_store_is_left_to_its_owner(store: WalletStore) -> None:
    """Given an open store, the router registers no lifespan and never closes it.

    Mutation: register the closing lifespan for open stores too → fails
    (the store is closed after the node stops).
    """
    app, router = _app(store)
    assert router.lifespans == [] and app.lifespans == []
    async with serve(app):
        pass
    assert router.store is store
    await store.create_account("dave", "EUR")  # still open

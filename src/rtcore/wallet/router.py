"""The ``wallet.*`` commands: the wallet as part of an rtcore :class:`~rtcore.App`.

Mount with::

    wallet = rtcore.wallet.install(app, "sqlite:///wallet.db")

which also schedules the sweep; or ``app.include(rtcore.wallet.commands(url))``
for the commands alone. Given a URL, the router carries a lifespan (see
:meth:`rtcore.App.lifespan`): a node opens the store when it starts, before
serving, and closes it when it stops; ``wallet.store`` is the open store
while a node runs. Nodes of the same app in one process share one store,
opened by the first to start and closed by the last to stop. Given an open
store instead, the caller opens and closes it.

Commands (arguments are the msgspec Structs below):

====================  =========================================  ==========================
command               who may call it                            result
====================  =========================================  ==========================
``wallet.balance``    the account's owner, or ``admin``          :class:`~rtcore.wallet.Balance`
``wallet.history``    the account's owner, or ``admin``          :class:`HistoryReply`
``wallet.transfer``   the owner of the *debit* account, admin    :class:`TransferReply`
``wallet.hold``       the owner of the *debit* account, admin    :class:`HoldReply`
``wallet.capture``    the owner of the hold's *credit* account   :class:`HoldReply`
``wallet.void``       the owner of the hold's *credit* account   :class:`HoldReply`
``wallet.credit``     ``admin`` only (system -> account)         :class:`TransferReply`
``wallet.debit``      ``admin`` only (account -> system)         :class:`TransferReply`
====================  =========================================  ==========================

Capture and void belong to the side that *receives* the money (the house,
i.e. the game server's principal owning the house account), never to the
player: a player who could void could cancel every losing bet. After that
built-in ownership rule, every command also asks the app's
``@app.authorize`` hook with action = the command name and resource =
``wallet:{account}``, so an application can narrow it further (pass
``ownership=False`` to let the hook alone decide).

Publishing. Every balance change must reach ``wallet:{account}`` in ledger
order, exactly once, even if the process dies right after the commit. So
handlers never publish the records they got back directly; they *flush the
outbox*: one drain at a time per router reads the store's unpublished
records in entry order, appends each with ``key=f"entry:{entry_id}"`` (an
idempotent append), then calls ``mark_published``; commands that finish
while a drain runs wait for the next one instead of draining again. Entry ids increase in commit order per
account, so two commands racing on one account cannot publish out of order,
and a record left behind by a crash (or by an event-log outage) goes out with
the next flush. If publishing fails the command still succeeds (the money
moved) and the records wait in the outbox; call :meth:`WalletRouter.flush`
from a timer or at startup to drain it, and :meth:`WalletRouter.sweep` to
expire holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import msgspec

from ..backends.base import EventLog
from ..engine.app import App, Context, Principal, Router
from ..errors import AuthError
from .engines import open_wallet_store
from .errors import WalletError
from .ledger import Account, Balance, BalanceChanged, Entry, Hold, HoldRequest, Transfer, TransferRequest
from .reconciliation import LastEvent
from .store import WalletStore

if TYPE_CHECKING:
    from ..engine.node import Node

__all__ = [
    "BalanceArgs",
    "CaptureArgs",
    "CreditArgs",
    "HistoryArgs",
    "HistoryReply",
    "HoldArgs",
    "HoldReply",
    "TransferArgs",
    "TransferReply",
    "VoidArgs",
    "WalletRouter",
    "commands",
    "install",
    "last_balance_event",
]

log = logging.getLogger("rtcore.wallet")

#: Event type of every wallet stream event.
BALANCE_CHANGED: Final = "balance_changed"
#: Records read from the outbox per round of a flush.
FLUSH_BATCH: Final = 500
#: Accounts a router keeps in memory (the whole cache is dropped when full).
ACCOUNT_CACHE: Final = 100_000
#: Holds expired per store call of a sweep.
SWEEP_BATCH: Final = 1000
#: Name of the loop :func:`install` registers (and of its lease, ``loop:wallet.sweep``).
SWEEP_LOOP: Final = "wallet.sweep"
ADMIN: Final = "admin"


class Publish(Protocol):
    """Append one event (``Context.publish`` and ``Node.publish`` both fit)."""

    def __call__(self, stream: str, type: str, data: Any = None, *, key: str | None = None) -> Awaitable[Any]: ...


# -- arguments and replies ------------------------------------------------------------


class BalanceArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.balance``."""

    account: str


class HistoryArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.history``: entries with id > ``after``, oldest first."""

    account: str
    after: int = 0
    limit: int = 50


class HistoryReply(msgspec.Struct, frozen=True):
    """A page of an account's ledger entries; ``next_after`` is None on the last page."""

    entries: list[Entry]
    next_after: int | None


class TransferArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.transfer`` (see :class:`~rtcore.wallet.TransferRequest`)."""

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    metadata: dict[str, str] = {}


class HoldArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.hold``.

    Give either ``expires_at`` (Unix time) or ``ttl`` (seconds from now,
    default 300). With ``ttl`` the deadline is fixed by the first request: a
    retry with the same id and other fields equal replays the first hold.
    """

    id: str
    debit: str
    credit: str
    amount: int
    currency: str
    ttl: float | None = None
    expires_at: float | None = None
    metadata: dict[str, str] = {}


class CaptureArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.capture``; ``amount=None`` captures the whole hold."""

    hold: str
    amount: int | None = None


class VoidArgs(msgspec.Struct, frozen=True):
    """Arguments of ``wallet.void``."""

    hold: str


class CreditArgs(msgspec.Struct, frozen=True):
    """Arguments of the admin commands ``wallet.credit`` and ``wallet.debit``.

    ``system`` names the other side (default: the router's system account for
    the account's currency).
    """

    id: str
    account: str
    amount: int
    system: str | None = None
    metadata: dict[str, str] = {}


class TransferReply(msgspec.Struct, frozen=True):
    """Result of the transfer commands.

    Attributes:
        transfer: The stored transfer.
        replayed: True if the id existed with the same fields (nothing moved now).
        balances: Balances after the transfer of the accounts the caller may see.
    """

    transfer: Transfer
    replayed: bool
    balances: list[Balance]


class HoldReply(msgspec.Struct, frozen=True):
    """Result of the hold commands.

    Attributes:
        hold: The hold after the command.
        replayed: True for a repeated ``wallet.hold``.
        balances: Balances after the command of the accounts the caller may see.
    """

    hold: Hold
    replayed: bool
    balances: list[Balance]


# -- the router -------------------------------------------------------------------------


def _is_admin(principal: Principal | None) -> bool:
    return principal is not None and ADMIN in principal.roles


class WalletRouter(Router):
    """The ``wallet.*`` commands bound to one store, plus outbox maintenance.

    Args:
        store: An open wallet store (the caller closes it), or a store URL
            for :func:`~rtcore.wallet.open_wallet_store`, which the router's
            lifespan opens when a node starts and closes when it stops.
        system_account: Maps a currency to the system account that admin
            credits come from and debits go to.
        default_ttl: Hold lifetime when ``wallet.hold`` gives neither ``ttl``
            nor ``expires_at`` (seconds).
        max_ttl: Longest hold lifetime accepted.
        ownership: Apply the built-in ownership rules (see the module
            docstring) before asking the app's authorize hook.
        max_history: Largest page ``wallet.history`` returns.
        opener: Opens a store URL (default :func:`~rtcore.wallet.open_wallet_store`).

    Attributes:
        url: The store URL, or ``None`` when given an open store.
    """

    def __init__(
        self,
        store: WalletStore | str,
        *,
        system_account: Callable[[str], str] = lambda currency: f"house:{currency}",
        default_ttl: float = 300.0,
        max_ttl: float = 7 * 24 * 3600.0,
        ownership: bool = True,
        max_history: int = 500,
        opener: Callable[[str], Awaitable[WalletStore]] = open_wallet_store,
    ) -> None:
        super().__init__()
        self.url: str | None = store if isinstance(store, str) else None
        self._store: WalletStore | None = None if isinstance(store, str) else store
        self._opener = opener
        self._users = 0  # running nodes sharing the store the lifespan opened
        self._store_lock: anyio.Lock | None = None
        if self.url is not None:
            self.lifespan(self._store_lifespan)
        self.system_account = system_account
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.ownership = ownership
        self.max_history = max_history
        # Flush coalescing (see flush): tickets handed out, tickets covered
        # by a finished drain, whether a drain runs, and its completion event.
        self._flush_wanted = 0
        self._flush_done_upto = 0
        self._draining = False
        self._drained: anyio.Event | None = None
        # Accounts are immutable once created (the stores refuse to change
        # one), so a cached Account can never be stale; caching them takes
        # the ownership checks (two or three reads per command) off the
        # store, whose single SQLite writer thread or small PostgreSQL pool
        # is the wallet's bottleneck under load. Unknown ids are not cached:
        # the account may be created later. Bounded so an attacker probing
        # ids cannot grow it (only existing accounts enter it anyway).
        self._accounts: dict[str, Account] = {}
        self._register()

    @property
    def store(self) -> WalletStore:
        """The wallet store (with a URL: open only while a node of the app runs).

        Raises:
            RuntimeError: the router was given a URL and no node runs it.
        """
        if self._store is None:
            raise RuntimeError(
                f"the wallet store {self.url!r} is not open: a node running the app opens it "
                "when it starts (the wallet router's lifespan)"
            )
        return self._store

    @store.setter
    def store(self, store: WalletStore) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def _store_lifespan(self, node: Node) -> AsyncIterator[None]:
        """Open the store URL for ``node``; close it when the last node using it stops."""
        assert self.url is not None
        if self._store_lock is None:
            self._store_lock = anyio.Lock()
        lock = self._store_lock
        async with lock:
            if self._users == 0:
                self._store = await self._opener(self.url)
            self._users += 1
        try:
            yield None
        finally:
            async with lock:
                self._users -= 1
                if self._users == 0:
                    store, self._store = self._store, None
                    self._store_lock = None  # a later start may be in another event loop
                    if store is not None:
                        await store.aclose()

    async def account(self, account_id: str) -> Account:
        """The account (cached: accounts never change), or ``account_not_found``."""
        cached = self._accounts.get(account_id)
        if cached is not None:
            return cached
        account = await self.store.get_account(account_id)
        if len(self._accounts) >= ACCOUNT_CACHE:
            self._accounts.clear()
        self._accounts[account_id] = account
        return account

    # -- outbox ------------------------------------------------------------------------

    async def flush(self, publish: Publish) -> int:
        """Publish every ``balance_changed`` record committed before this call, in entry order.

        Concurrent calls are coalesced: one caller at a time drains the
        outbox, and a caller that arrives while a drain is running waits for
        the *next* drain (which starts after its commit, so it covers its
        records) instead of reading the outbox again itself. Under load that
        turns one outbox read and one ``mark_published`` per command into one
        per drain, and no command waits behind a queue of other commands'
        flushes. Within a drain, different accounts' streams are appended
        concurrently and each stream in entry order.

        Safe from several nodes too: appends are keyed by entry id, so a
        record published twice is stored once.

        Args:
            publish: Appends an event, e.g. ``ctx.publish`` or ``node.publish``.

        Returns:
            How many records this call's own drains published (0 when another
            caller's drain covered it).

        Raises:
            Exception: Whatever ``publish`` or the store raised in this call's
                own drain; the records stay in the outbox for the next flush.
        """
        self._flush_wanted += 1
        ticket = self._flush_wanted
        published = 0
        while self._flush_done_upto < ticket:
            if self._draining:
                if self._drained is None:
                    self._drained = anyio.Event()
                await self._drained.wait()
                continue
            self._draining = True
            try:
                target = self._flush_wanted  # every caller so far committed before this drain starts
                published += await self._drain(publish)
                self._flush_done_upto = max(self._flush_done_upto, target)
            finally:
                self._draining = False
                drained, self._drained = self._drained, None
                if drained is not None:
                    drained.set()
        return published

    async def _drain(self, publish: Publish) -> int:
        """Publish the whole outbox in batches; return how many records went out."""
        published = 0
        while True:
            batch = await self.store.unpublished(limit=FLUSH_BATCH)
            streams: dict[str, list[BalanceChanged]] = {}
            for change in batch:
                streams.setdefault(change.account, []).append(change)

            async def publish_stream(changes: list[BalanceChanged]) -> None:
                for change in changes:  # one stream: strictly in entry order
                    await publish(f"wallet:{change.account}", BALANCE_CHANGED, change, key=f"entry:{change.entry_id}")

            async with anyio.create_task_group() as tg:
                for changes in streams.values():
                    tg.start_soon(publish_stream, changes)
            if batch:
                await self.store.mark_published(c.entry_id for c in batch)
            published += len(batch)
            if len(batch) < FLUSH_BATCH:
                return published

    async def sweep(self, publish: Publish, now: float | None = None) -> int:
        """Expire every due hold, then publish whatever is in the outbox.

        Holds are expired in batches of :data:`SWEEP_BATCH` (each hold in its
        own transaction) until a batch comes back short, so a backlog after
        downtime is cleared in one sweep. The flush runs even when nothing
        expired: it is also what drains records a crash or an event-log
        outage left in the outbox.

        Args:
            publish: Appends an event, e.g. ``ctx.publish`` or ``node.publish``.
            now: Expire holds due at this time (default: the store's clock).

        Returns:
            The number of holds expired.
        """
        expired = 0
        while True:
            batch = await self.store.expire_holds(now, limit=SWEEP_BATCH)
            expired += len(batch)
            if len(batch) < SWEEP_BATCH:
                break
        await self.flush(publish)
        return expired

    async def _after_write(self, ctx: Context) -> None:
        try:
            await self.flush(ctx.publish)
        except Exception:
            # The ledger already committed; the records stay in the outbox
            # and go out with the next flush. Failing the command would make
            # the client believe no money moved.
            log.warning("could not publish wallet changes; they stay in the outbox", exc_info=True)

    # -- authorization -----------------------------------------------------------------------

    async def _account_for(self, ctx: Context, account_id: str) -> Account:
        """The account, or ``forbidden`` for a non-admin asking about an unknown one."""
        try:
            return await self.account(account_id)
        except WalletError as exc:
            if exc.code == "account_not_found" and self.ownership and not _is_admin(ctx.principal):
                # Do not reveal which account ids exist to callers who own none of them.
                raise AuthError(f"{ctx.command} on wallet:{account_id} is not allowed", code="forbidden") from None
            raise

    async def _check_owner(self, ctx: Context, account_id: str) -> None:
        if self.ownership and not _is_admin(ctx.principal):
            account = await self._account_for(ctx, account_id)
            principal = ctx.principal
            if principal is None or account.owner != principal.id:
                raise AuthError(f"{ctx.command} on wallet:{account_id} is not allowed", code="forbidden")
        await ctx.authorize(ctx.command, f"wallet:{account_id}")

    async def _check_admin(self, ctx: Context, account_id: str) -> None:
        if not _is_admin(ctx.principal):
            raise AuthError(f"{ctx.command} needs the {ADMIN!r} role", code="forbidden")
        await ctx.authorize(ctx.command, f"wallet:{account_id}")

    async def _visible(self, ctx: Context, changes: Iterable[BalanceChanged], accounts: Iterable[str]) -> list[Balance]:
        """Balances after the operation of the accounts the caller may read."""
        after: dict[str, Balance] = {}
        for change in changes:
            after[change.account] = Balance(change.account, change.currency, change.available, change.held)
        out = []
        for account_id in accounts:
            if self.ownership and not _is_admin(ctx.principal):
                account = await self.account(account_id)
                if ctx.principal is None or account.owner != ctx.principal.id:
                    continue
            out.append(after.get(account_id) or await self.store.get_balance(account_id))
        return out

    # -- commands ----------------------------------------------------------------------------

    def _register(self) -> None:
        # Handlers read ``self.store`` on every call: with a URL it exists
        # only while a node runs.

        @self.command("wallet.balance")
        async def balance(ctx: Context, args: BalanceArgs) -> Balance:
            await self._check_owner(ctx, args.account)
            return await self.store.get_balance(args.account)

        @self.command("wallet.history")
        async def history(ctx: Context, args: HistoryArgs) -> HistoryReply:
            await self._check_owner(ctx, args.account)
            limit = min(max(1, args.limit), self.max_history)
            page = await self.store.history(args.account, after_entry_id=max(0, args.after), limit=limit)
            return HistoryReply(entries=list(page.entries), next_after=page.next_after)

        @self.command("wallet.transfer")
        async def transfer(ctx: Context, args: TransferArgs) -> TransferReply:
            await self._check_owner(ctx, args.debit)
            request = TransferRequest(args.id, args.debit, args.credit, args.amount, args.currency, args.metadata)
            return await self._transfer(ctx, request)

        @self.command("wallet.hold")
        async def hold(ctx: Context, args: HoldArgs) -> HoldReply:
            await self._check_owner(ctx, args.debit)
            now = ctx.now()
            expires_at = await self._deadline(args, now)
            request = HoldRequest(
                args.id, args.debit, args.credit, args.amount, args.currency, expires_at, args.metadata
            )
            result = await self.store.hold(request, now=now)
            await self._after_write(ctx)
            balances = await self._visible(ctx, result.changes, [args.debit])
            return HoldReply(hold=result.hold, replayed=result.replayed, balances=balances)

        @self.command("wallet.capture")
        async def capture(ctx: Context, args: CaptureArgs) -> HoldReply:
            pending = await self._hold_for(ctx, args.hold)
            result = await self.store.capture(args.hold, args.amount, now=ctx.now())
            await self._after_write(ctx)
            balances = await self._visible(ctx, result.changes, [pending.debit, pending.credit])
            return HoldReply(hold=result.hold, replayed=False, balances=balances)

        @self.command("wallet.void")
        async def void(ctx: Context, args: VoidArgs) -> HoldReply:
            pending = await self._hold_for(ctx, args.hold)
            result = await self.store.void(args.hold, now=ctx.now())
            await self._after_write(ctx)
            balances = await self._visible(ctx, result.changes, [pending.debit, pending.credit])
            return HoldReply(hold=result.hold, replayed=False, balances=balances)

        @self.command("wallet.credit")
        async def credit(ctx: Context, args: CreditArgs) -> TransferReply:
            await self._check_admin(ctx, args.account)
            account = await self.account(args.account)
            system = args.system or self.system_account(account.currency)
            request = TransferRequest(args.id, system, args.account, args.amount, account.currency, args.metadata)
            return await self._transfer(ctx, request)

        @self.command("wallet.debit")
        async def debit(ctx: Context, args: CreditArgs) -> TransferReply:
            await self._check_admin(ctx, args.account)
            account = await self.account(args.account)
            system = args.system or self.system_account(account.currency)
            request = TransferRequest(args.id, args.account, system, args.amount, account.currency, args.metadata)
            return await self._transfer(ctx, request)

    async def _transfer(self, ctx: Context, request: TransferRequest) -> TransferReply:
        result = await self.store.transfer(request, now=ctx.now())
        # A replay may still have records in the outbox (the first attempt
        # died before publishing): flushing covers both cases.
        await self._after_write(ctx)
        balances = await self._visible(ctx, () if result.replayed else result.changes, [request.debit, request.credit])
        return TransferReply(transfer=result.transfer, replayed=result.replayed, balances=balances)

    async def _hold_for(self, ctx: Context, hold_id: str) -> Hold:
        """Find the hold and check the caller owns its credit side."""
        record = await self.store.get_transfer(hold_id)
        if not isinstance(record, Hold):
            if self.ownership and not _is_admin(ctx.principal):
                raise AuthError(f"{ctx.command} on hold {hold_id!r} is not allowed", code="forbidden")
            raise WalletError("hold_not_found", f"no hold {hold_id!r}")
        await self._check_owner(ctx, record.credit)
        return record

    async def _deadline(self, args: HoldArgs, now: float) -> float:
        if args.expires_at is not None:
            return args.expires_at
        ttl = self.default_ttl if args.ttl is None else args.ttl
        if not 0 < ttl <= self.max_ttl:
            raise WalletError("invalid_expiry", f"ttl must be in (0, {self.max_ttl}] seconds, got {ttl}")
        existing = await self.store.get_transfer(args.id)
        if isinstance(existing, Hold) and (
            existing.debit,
            existing.credit,
            existing.amount,
            existing.currency,
            existing.metadata,
        ) == (args.debit, args.credit, args.amount, args.currency, args.metadata):
            # A retry of a ttl-based hold: its deadline was fixed the first time.
            return existing.expires_at
        return now + ttl


def commands(store: WalletStore | str, **options: Any) -> WalletRouter:
    """Build the ``wallet.*`` commands for ``store`` (mount with ``app.include``).

    Args:
        store: An open wallet store, or a URL the router's lifespan opens
            while a node runs (see :class:`WalletRouter`).
        **options: Keyword arguments of :class:`WalletRouter`.

    Returns:
        The router; keep it to call :meth:`WalletRouter.flush` and
        :meth:`WalletRouter.sweep` from the application's timers.
    """
    return WalletRouter(store, **options)


def install(
    app: App,
    store: WalletStore | str,
    *,
    sweep_every: float = 5.0,
    sweep_lease: float = 10.0,
    **options: Any,
) -> WalletRouter:
    """Mount the ``wallet.*`` commands on ``app`` and schedule the sweep.

    The sweep is an ``@app.loop`` named :data:`SWEEP_LOOP`: every
    ``sweep_every`` seconds, on the one node holding its lease, it expires
    the holds that are due and flushes the outbox. Its first tick runs as
    soon as a node takes the lease, so records a crashed process left in the
    outbox are published at startup. Only nodes with the ``processor`` role
    run loops; give at least one node that role.

    Args:
        app: The application.
        store: An open store (the caller closes it), or a store URL: the
            router's lifespan opens it when a node starts, in the node's
            event loop, before the node serves or sweeps, and closes it when
            the node stops (which is what a module served by ``rtcore.run``
            or ``rtcore serve`` needs).
        sweep_every: Seconds between sweeps. A hold may stay reserved this
            long after its deadline (it can no longer be captured or voided
            from the deadline on, so this only delays the release).
        sweep_lease: Lease period of the loop (how fast another node takes
            over when the sweeping one dies).
        **options: Keyword arguments of :class:`WalletRouter`.

    Returns:
        The router (its ``store``, :meth:`~WalletRouter.flush`, :meth:`~WalletRouter.sweep`).

    Raises:
        ValueError: the app already has ``wallet.*`` commands or the sweep loop.
    """
    router = WalletRouter(store, **options)
    app.include(router)

    @app.loop(SWEEP_LOOP, every=sweep_every, lease=sweep_lease)
    async def wallet_sweep(ctx: Context) -> None:
        expired = await router.sweep(ctx.publish, now=ctx.now())
        if expired:
            log.info("wallet sweep: expired %d holds", expired)

    return router


def last_balance_event(events: EventLog) -> LastEvent:
    """A ``last_event`` callable for :func:`~rtcore.wallet.reconciliation` reading an event log.

    Args:
        events: The backend's event log (``node.backend.events``).

    Returns:
        A callable giving the data of the newest ``balance_changed`` of
        ``wallet:{account}`` (``None`` if the stream has none retained).
    """

    async def last(account: str) -> dict[str, Any] | None:
        stream = f"wallet:{account}"
        head = (await events.info(stream)).head
        while head > 0:
            page = await events.read(stream, after=max(0, head - 20), limit=20)
            for event in reversed(page.events):
                if event.type == BALANCE_CHANGED and isinstance(event.data, dict):
                    return event.data
            if not page.events or page.events[0].offset <= page.first:
                return None
            head = page.events[0].offset - 1
        return None

    return last

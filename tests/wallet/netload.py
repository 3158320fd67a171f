"""A wallet server app and a load generator that speaks the documented protocol over real sockets.

Shared by :mod:`tests.wallet.test_network` (in-process server, and a server
subprocess that is killed with SIGKILL mid-load). The clients are
deliberately *not* :mod:`rtcore.testing` nor :mod:`rtcore.client`: they are
httpx and the ``websockets`` library speaking ``POST /v1/cmd/{name}`` and the
``rtcore.v1.json`` frames by hand, so the test checks the wire contract a
third-party client relies on, not our own client's interpretation of it.

What a load client does, per transfer: send it with a fresh idempotency key;
if the answer is a retryable error or never comes (connection dropped, server
killed), send it again *with the same key* until a final answer arrives.
About 10% of transfers are also sent twice on purpose: half race the
original, half repeat it after its answer. Every answer for one key must be
the same. The final answers define what the ledger must contain: every
accepted transfer exactly once, nothing else.

Those duplicates carry the same transfer id, so the wallet store's own dedup
(by transfer id) would stop a double transfer even if rtcore's idempotency
layer let the duplicate run. To test rtcore's guarantee and not the
store's, about 6% of transfers are also *reused*: the same idempotency key is
sent with a transfer id the wallet has never seen (``{id}-reuse``), either
racing the original or after its answer. Only rtcore's idempotency layer
(same key, other arguments: ``idempotency_key_reused``) stands between that
request and a second transfer; exactly one of the two may execute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import websockets
from websockets.asyncio.client import ClientConnection

import rtcore.wallet
from rtcore import App, Principal
from rtcore.wallet import WalletStore

CURRENCY = "EUR"
HOUSE = f"house:{CURRENCY}"
ADMIN_TOKEN = "admin-token"


def account(i: int) -> str:
    """Id of player account ``i`` (owned by ``user-{i}``)."""
    return f"acct-{i:02d}"


def build_app(store: WalletStore | str) -> App:
    """The server under test: the wallet mounted with its sweep, bearer tokens ``user-N`` and ``admin-token``.

    Given a store URL, the wallet's lifespan opens the store when the node
    starts. The sweep runs at its default period (its first tick at startup);
    a tick that overruns its period under load waits for the next one.
    """
    app = App("wallet-load")
    rtcore.wallet.install(app, store)

    @app.authenticate
    async def authenticate(token: str | None) -> Principal | None:
        if token == ADMIN_TOKEN:
            return Principal("admin", roles=frozenset({"admin"}))
        if token and token.startswith("user-"):
            return Principal(token)
        return None

    return app


async def create_accounts(store: WalletStore, accounts: int) -> None:
    """The house and ``accounts`` player accounts (accounts are not a command: the operator makes them)."""
    await store.create_account(HOUSE, CURRENCY, kind="system")
    for i in range(accounts):
        await store.create_account(account(i), CURRENCY, owner=f"user-{i}")


# --- answers -------------------------------------------------------------------


class Unanswered(Exception):
    """The request was sent (maybe) but no reply came back: the connection died."""


@dataclass(frozen=True)
class Answer:
    """A reply to one command, transport-independent."""

    ok: bool
    result: Any = None
    code: str | None = None
    retryable: bool = False
    replayed: bool = False

    def same_outcome(self, other: Answer) -> bool:
        """Whether two answers for one key report the same outcome."""
        if self.ok != other.ok:
            return False
        if self.ok:
            return bool(self.result["transfer"] == other.result["transfer"])
        return self.code == other.code


class Conn:
    """One client's connection(s) to the server."""

    async def command(self, name: str, args: dict[str, Any], key: str) -> Answer:
        """Send one command; raise :class:`Unanswered` if no reply can come."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connection(s)."""


class HttpConn(Conn):
    """``POST /v1/cmd/{name}`` with a Bearer token and an ``Idempotency-Key``; keep-alive pool."""

    def __init__(self, base: str, token: str, width: int) -> None:
        self._client = httpx.AsyncClient(
            base_url=base,
            headers={"authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=width, max_keepalive_connections=width),
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    async def command(self, name: str, args: dict[str, Any], key: str) -> Answer:
        try:
            response = await self._client.post(f"/v1/cmd/{name}", json=args, headers={"idempotency-key": key})
        except httpx.TransportError as exc:
            raise Unanswered(repr(exc)) from exc
        body = response.json()
        if response.status_code == 200:
            return Answer(True, body["result"], replayed=body["replayed"])
        return Answer(False, code=body["code"], retryable=body["retryable"])

    async def aclose(self) -> None:
        await self._client.aclose()


class WsConn(Conn):
    """One WebSocket session (``rtcore.v1.json``); commands are pipelined, matched to replies by id.

    A dropped connection fails every request in flight with
    :class:`Unanswered`; the next command reconnects (a new session, a new
    ``hello``) - the idempotency keys are scoped by the principal, not the
    session, so a retry on the new session replays the old one's outcome.
    """

    def __init__(self, url: str, token: str) -> None:
        self._url = url
        self._token = token
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._next_id = 0
        self._connecting = asyncio.Lock()

    async def _connection(self) -> ClientConnection:
        async with self._connecting:
            if self._ws is not None:
                return self._ws
            try:
                ws = await websockets.connect(
                    self._url, subprotocols=[websockets.Subprotocol("rtcore.v1.json")], open_timeout=5
                )
                await ws.send(json.dumps({"t": "hello", "v": 1, "token": self._token}))
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                raise Unanswered(f"connect: {exc!r}") from exc
            if welcome.get("t") != "welcome":
                await ws.close()
                raise AssertionError(f"expected welcome, got {welcome}")
            self._ws = ws
            self._reader = asyncio.create_task(self._read(ws))
            return ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = json.loads(message)
                t = frame.get("t")
                if t in ("ok", "err"):
                    future = self._pending.pop(frame["id"], None)
                    if future is None or future.done():
                        continue
                    if t == "ok":
                        future.set_result(Answer(True, frame.get("result"), replayed=frame.get("replayed", False)))
                    else:
                        future.set_result(Answer(False, code=frame["code"], retryable=frame.get("retryable", False)))
        except (websockets.WebSocketException, OSError):
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(Unanswered("connection closed"))

    async def command(self, name: str, args: dict[str, Any], key: str) -> Answer:
        ws = await self._connection()
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await ws.send(json.dumps({"t": "cmd", "id": rid, "name": name, "args": args, "key": key}))
        except (websockets.WebSocketException, OSError) as exc:
            self._pending.pop(rid, None)
            if future.done() and not future.cancelled():
                future.exception()  # the reader failed it already; mark it retrieved
            raise Unanswered(repr(exc)) from exc
        try:
            return await asyncio.wait_for(future, 30)
        except TimeoutError as exc:
            self._pending.pop(rid, None)
            raise Unanswered("no reply in 30 s") from exc

    async def aclose(self) -> None:
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --- the load ------------------------------------------------------------------


@dataclass
class Stats:
    """What the load generator saw."""

    sent: int = 0
    unanswered: int = 0
    retried_retryable: int = 0
    duplicates: int = 0
    accepted: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> (debit, credit, amount)
    refused: dict[str, str] = field(default_factory=dict)  # id -> code
    reused: int = 0  # transfers whose key was also sent with a new transfer id
    mismatched: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Shape of the load."""

    clients: int = 50
    per_client: int = 200
    accounts: int = 20
    width: int = 8  # requests in flight per client
    duplicate_rate: float = 0.10
    reuse_rate: float = 0.06  # same key, unseen transfer id (half racing when reuse_race)
    reuse_race: bool = True
    max_amount: int = 1_000
    seed: int = 1


async def send_until_answered(conn: Conn, name: str, args: dict[str, Any], key: str, stats: Stats) -> Answer:
    """Send with ``key`` until a final answer (ok or a non-retryable error) arrives."""
    delay = 0.02
    while True:
        stats.sent += 1
        try:
            answer = await conn.command(name, args, key)
        except Unanswered:
            stats.unanswered += 1
        else:
            if answer.ok or not answer.retryable:
                stats.answered_at.append(time.monotonic())
                return answer
            stats.retried_retryable += 1
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def run_client(
    c: int, conn: Conn, plan: Plan, stats: Stats, on_progress: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Client ``c``: ``plan.per_client`` transfers from its own account, ``plan.width`` at a time."""
    rng = random.Random(plan.seed * 1_000_003 + c)
    me = c % plan.accounts
    ops = []
    for j in range(plan.per_client):
        other = rng.choice([i for i in range(plan.accounts) if i != me])
        ops.append((f"c{c}-t{j}", f"c{c}-k{j}", other, rng.randint(1, plan.max_amount), rng.random(), rng.random()))

    def record(tid: str, answer: Answer, other: int, amount: int) -> None:
        if answer.ok:
            stats.accepted[tid] = (account(me), account(other), amount)
        else:
            stats.refused[tid] = answer.code or "?"

    async def one(tid: str, key: str, other: int, amount: int, dice: float, reuse_dice: float) -> None:
        args = {"id": tid, "debit": account(me), "credit": account(other), "amount": amount, "currency": CURRENCY}
        # Same key and command, a transfer id the wallet has never seen: the
        # store cannot tell it from a new transfer, rtcore's idempotency must.
        reuse = {**args, "id": f"{tid}-reuse"}
        answers: list[Answer] = []

        async def attempt() -> None:
            answers.append(await send_until_answered(conn, "wallet.transfer", args, key, stats))

        if plan.reuse_race and reuse_dice < plan.reuse_rate / 2:  # the reuse races the original
            stats.reused += 1
            raced: dict[str, Answer] = {}

            async def send(transfer: dict[str, Any]) -> None:
                raced[transfer["id"]] = await send_until_answered(conn, "wallet.transfer", transfer, key, stats)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send, args)
                tg.start_soon(send, reuse)
            ran = {t: a for t, a in raced.items() if a.ok or a.code != "idempotency_key_reused"}
            if len(ran) != 1:
                stats.mismatched.append(f"{tid}: one key, two transfer ids, {len(ran)} executed: {raced}")
            for executed, answer in ran.items():
                record(executed, answer, other, amount)
        else:
            if dice < plan.duplicate_rate / 2:  # a duplicate racing the original
                stats.duplicates += 1
                async with anyio.create_task_group() as tg:
                    tg.start_soon(attempt)
                    tg.start_soon(attempt)
            else:
                await attempt()
                if dice < plan.duplicate_rate:  # a retry after the answer
                    stats.duplicates += 1
                    await attempt()
                    if answers[1].ok and not answers[1].replayed:
                        stats.mismatched.append(f"{tid}: a retry after the answer was not a replay")
            first = answers[0]
            if any(not a.same_outcome(first) for a in answers[1:]):
                stats.mismatched.append(f"{tid}: answers differ: {answers}")
            record(tid, first, other, amount)
            if reuse_dice < plan.reuse_rate:  # the reuse after the original's final answer
                stats.reused += 1
                late = await send_until_answered(conn, "wallet.transfer", reuse, key, stats)
                if late.ok or late.code != "idempotency_key_reused":
                    stats.mismatched.append(f"{tid}: its key with a new transfer id was not refused: {late}")
                    record(reuse["id"], late, other, amount)
        if on_progress is not None:
            await on_progress()

    queue = iter(ops)

    async def worker() -> None:
        for op in queue:
            await one(*op)

    async with anyio.create_task_group() as tg:
        for _ in range(plan.width):
            tg.start_soon(worker)


async def fund_accounts(conn: Conn, plan: Plan, amount: int, stats: Stats) -> dict[str, int]:
    """Admin credits every account over the wire; returns the expected opening balances."""
    opening = {HOUSE: 0}
    for i in range(plan.accounts):
        args = {"id": f"fund-{i}", "account": account(i), "amount": amount}
        answer = await send_until_answered(conn, "wallet.credit", args, f"fund-{i}", stats)
        assert answer.ok, answer
        opening[account(i)] = amount
        opening[HOUSE] -= amount
    return opening


def expected_balances(opening: dict[str, int], stats: Stats) -> dict[str, int]:
    """Opening balances plus every accepted transfer, each counted once."""
    balances = dict(opening)
    for debit, credit, amount in stats.accepted.values():
        balances[debit] -= amount
        balances[credit] += amount
    return balances


async def run_load(
    base_http: str,
    base_ws: str,
    plan: Plan,
    stats: Stats,
    on_progress: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """All clients at once; even-numbered ones over HTTP, odd ones over one WebSocket each."""
    conns: list[Conn] = []
    for c in range(plan.clients):
        token = f"user-{c % plan.accounts}"
        conns.append(HttpConn(base_http, token, plan.width) if c % 2 == 0 else WsConn(base_ws, token))
    try:
        async with anyio.create_task_group() as tg:
            for c, conn in enumerate(conns):
                tg.start_soon(run_client, c, conn, plan, stats, on_progress)
    finally:
        for conn in conns:
            await conn.aclose()

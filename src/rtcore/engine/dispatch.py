"""Command dispatch: arguments, authorization, the idempotency rules, the handler.

Every transport (WebSocket, HTTP, in-process) answers a command through
:func:`dispatch`, which is why a command retried over HTTP after being sent
over WebSocket sees the same idempotency record. The rules themselves (what a
stored record means for a retry) are sans-IO, in
:mod:`rtcore.protocol.idempotency`; this module applies them against the
backend's :class:`~rtcore.backends.base.IdempotencyStore`.
"""

from __future__ import annotations

import dis
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import msgspec

from ..errors import AuthError, BadRequest, RtcoreError, Unavailable, error_from_wire
from ..protocol.codec import codec_for
from ..protocol.idempotency import Replay, check_key, decide, fingerprint, scope_of
from ..protocol.types import Event, Outcome
from .app import Context, Principal

if TYPE_CHECKING:
    from .node import Node

__all__ = ["CommandContext", "Reply", "dispatch", "dispatch_now"]

#: Longest wait for the release of a failed command's claim before answering (see :func:`_release`).
RELEASE_WAIT = 0.5

log = logging.getLogger("rtcore.engine.dispatch")

#: Argument types decoded from their encoding (a tuple: ``msgspec.Raw | bytes |
#: str`` in an ``isinstance`` builds a union object on every command).
_RAW_TYPES = (msgspec.Raw, bytes, str)


class Reply(msgspec.Struct, frozen=True):
    """The answer to a command, whichever transport asked.

    Attributes:
        ok: Whether it succeeded.
        result: The handler's result as builtins (when ``ok``).
        code: Error code (when not ``ok``).
        message: Error message.
        retryable: Whether retrying may succeed.
        http_status: Status for the HTTP transport.
        replayed: The outcome came from the idempotency store.
    """

    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""
    retryable: bool = False
    http_status: int = 200
    replayed: bool = False

    @classmethod
    def error(cls, exc: RtcoreError, replayed: bool = False) -> Reply:
        """A failed reply from an error (every field of the reply comes from ``exc``)."""
        return cls(False, None, exc.code, exc.message, exc.retryable, exc.http_status, replayed)

    @classmethod
    def from_outcome(cls, outcome: Outcome, replayed: bool) -> Reply:
        """A reply from a stored outcome.

        A stored failure is rebuilt as its code's owner class (see
        :func:`~rtcore.errors.error_class`); it is final, so not retryable.
        """
        if outcome.ok:
            return cls(True, outcome.result, replayed=replayed)
        exc = error_from_wire(outcome.code or "internal", outcome.message or "", retryable=False, http_status=outcome.http_status)
        return cls.error(exc, replayed)

    def exception(self) -> RtcoreError:
        """The failed reply as an instance of its code's owner class.

        Raises:
            ValueError: The reply is a success.
        """
        if self.ok:
            raise ValueError("a successful reply is not an error")
        return error_from_wire(self.code, self.message, self.retryable, self.http_status)


async def dispatch(
    node: Node,
    principal: Principal | None,
    name: str,
    args: Any,
    *,
    key: str | None = None,
    encoding: Literal["json", "msgpack"] = "json",
) -> Reply:
    """Run command ``name`` on ``node`` exactly once per idempotency key.

    Args:
        node: The running node (its app, backend, clock and idempotency settings).
        principal: Caller.
        name: Command name.
        args: Raw encoded arguments (``msgspec.Raw``/bytes in ``encoding``)
            or already-decoded builtins.
        key: Idempotency key (scope: the principal).
        encoding: Encoding of raw ``args``.

    Returns:
        The :class:`Reply`; this function does not raise for command errors.
    """
    try:
        spec = node.app.commands.get(name)
        if spec is None:
            raise BadRequest(f"no command named {name!r}", code="unknown_command")
        # Always awaited, also without an authorize hook: skipping the await when
        # there is none measured ~20 µs *more* server CPU per echo command in
        # benchmarks/ab/cmdcpu.py (reproduced in both A/B slots; cause not found).
        if not await node.allowed(principal, "command", name):
            raise AuthError(f"command {name!r} is not allowed", code="forbidden")
        value = _decode_args(spec.args_type, args, encoding)
        if key is not None:
            check_key(key)
    except RtcoreError as exc:
        return Reply.error(exc)
    if key is None:
        return await _execute(node, spec.handler, spec.args_type, principal, name, value, None)
    scope = scope_of(principal.id if principal else None)
    fp = fingerprint(name, value)
    now = node.clock()
    try:
        existing = await node.backend.idempotency.begin(
            scope, key, fp, now=now, lease=node.idempotency_lease, ttl=node.idempotency_ttl
        )
        decision = decide(existing, fp)
    except RtcoreError as exc:
        return Reply.error(exc)
    if isinstance(decision, Replay):
        node.stats["idempotent_replays"] += 1
        return Reply.from_outcome(decision.outcome, replayed=True)
    reply: Reply | None = None
    try:
        reply = await _execute(node, spec.handler, spec.args_type, principal, name, value, f"{scope}:{key}")
    finally:
        if reply is None:  # cancelled (or a BaseException) while the handler ran
            reply = Reply.error(Unavailable("the command was cancelled", code="shutdown"))
        try:
            if reply.ok or not reply.retryable:
                outcome = Outcome(True, reply.result) if reply.ok else Outcome(False, None, reply.code, reply.message, reply.http_status)
                store = node.backend.idempotency
                try:
                    # _finish's first, unshielded write inlined: one coroutine
                    # less per keyed command; a cancellation goes to _finish,
                    # which writes again under a shield (see there).
                    await store.finish(scope, key, outcome, now=node.clock(), ttl=node.idempotency_ttl, fingerprint=fp)
                except anyio.get_cancelled_exc_class():
                    await _finish(node, scope, key, outcome, fp, retry=True)
                    raise
            else:
                with anyio.CancelScope(shield=True):
                    await _release(node, scope, key)
        except RtcoreError:
            # The command ran; only its record could not be stored. Answer it:
            # the pending claim expires after its lease and a retry re-executes,
            # which appends nothing twice (publishes are keyed by the command key).
            log.exception("could not store the outcome of %r under key %r", name, key)
    return reply


#: Instructions with which a coroutine may suspend (``await``, ``async for``, ``async with``).
_SUSPENDING = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "END_ASYNC_FOR"})

#: handler -> whether it never suspends (see _never_suspends). A plain dict (a weak
#: one makes a weak reference per lookup): it holds one entry per command handler
#: ever dispatched, which are few and usually live as long as the process anyway.
_NEVER_SUSPENDS: dict[Any, bool] = {}


def _never_suspends(handler: Any) -> bool:
    """Whether ``handler`` is an ``async def`` whose body has no ``await``,
    ``async for`` or ``async with``: its coroutine then always finishes at its
    first step (only an await in its own body could suspend it)."""
    known = _NEVER_SUSPENDS.get(handler)
    if known is not None:
        return known
    code = getattr(handler, "__code__", None)
    never = (
        code is not None
        and inspect.iscoroutinefunction(handler)
        and not any(ins.opname in _SUSPENDING for ins in dis.get_instructions(code))
    )
    _NEVER_SUSPENDS[handler] = never
    return never


def dispatch_now(
    node: Node, principal: Principal | None, name: str, args: Any, *, encoding: Literal["json", "msgpack"] = "json"
) -> Reply | None:
    """:func:`dispatch` without an await, for the commands that never need one.

    Those are the commands without an idempotency key (the caller checks)
    whose handler never suspends (an ``async def`` with no ``await``,
    ``async for`` or ``async with`` in its body, like an echo), on an app
    without an ``authorize`` hook: their whole :func:`dispatch` runs in one
    step, so the session answers them in the task that read them, with no
    hand-over to a command worker (a task wake-up and an event-loop pass per
    command). The reply is the one :func:`dispatch` would give.

    Returns:
        The :class:`Reply`, or None when the command does not qualify (an
        unknown name too): then :func:`dispatch` it.
    """
    spec = node.app.commands.get(name)
    if spec is None or node.app.hooks.authorize is not None or not _never_suspends(spec.handler):
        return None
    try:
        value = _decode_args(spec.args_type, args, encoding)
    except RtcoreError as exc:
        return Reply.error(exc)
    ctx = CommandContext(node, principal, name, None)
    coro = cast(Coroutine[Any, Any, Any], spec.handler(ctx) if spec.args_type is None else spec.handler(ctx, value))
    try:
        coro.send(None)
    except StopIteration as done:
        try:
            return Reply(True, msgspec.to_builtins(done.value))
        except Exception:
            log.exception("command %r raised", name)
            return Reply.error(RtcoreError(f"command {name!r} failed unexpectedly", code="internal"))
    except RtcoreError as exc:
        return Reply.error(exc)
    except Exception:
        log.exception("command %r raised", name)
        return Reply.error(RtcoreError(f"command {name!r} failed unexpectedly", code="internal"))
    coro.close()  # pragma: no cover - _never_suspends rules this out
    raise RuntimeError(f"command {name!r} suspended although its handler has no await")  # pragma: no cover


async def _finish(node: Node, scope: str, key: str, outcome: Outcome, fp: bytes, *, retry: bool = False) -> None:
    """Store ``outcome`` under the claimed key, even when the command is being cancelled.

    The write must happen (a claim left pending lapses after its lease and a
    retry would run the handler again), so a cancellation must not cut it
    off. A shielded cancel scope per command costs more than the rest of the
    idempotency bookkeeping on asyncio, so the write runs unshielded first;
    only if a cancellation interrupts it is it repeated under a shield. That
    repeat is safe because every store's ``finish`` overwrites the key's
    record with the same outcome (an interrupted first write may or may not
    have landed). :func:`dispatch` makes the first write itself and calls
    this with ``retry=True`` (the shielded write only) when it was cancelled.
    """
    store = node.backend.idempotency
    if retry:
        with anyio.CancelScope(shield=True):
            await store.finish(scope, key, outcome, now=node.clock(), ttl=node.idempotency_ttl, fingerprint=fp)
        return
    try:
        await store.finish(scope, key, outcome, now=node.clock(), ttl=node.idempotency_ttl, fingerprint=fp)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await store.finish(scope, key, outcome, now=node.clock(), ttl=node.idempotency_ttl, fingerprint=fp)
        raise


async def _release(node: Node, scope: str, key: str) -> None:
    """Release the claim of a retryable failure, waiting for it at most :data:`RELEASE_WAIT` seconds.

    A retryable failure is often the storage engine failing (a paused Redis
    answered nothing for its 5 s timeout); a release sent to it now would most
    likely wait out the same timeout and hold the retryable answer back until
    the client gave up. So the release runs in the node's task group and the
    answer waits for it only briefly: a healthy engine has released by then
    (an immediate retry re-executes); otherwise the release goes on behind the
    answer, and if it fails the claim lapses after its lease (a retry
    meanwhile gets ``in_progress``, retryable too).
    """
    done = anyio.Event()

    async def release() -> None:
        try:
            await node.backend.idempotency.release(scope, key)
        except RtcoreError as exc:
            log.warning("could not release the claim of key %r (it lapses after its lease): %s", key, exc)
        finally:
            done.set()

    try:
        node.spawn(release)
    except RuntimeError:  # the node is not running (a direct call in a test): no task group
        await release()
        return
    with anyio.move_on_after(RELEASE_WAIT):
        await done.wait()


def _decode_args(args_type: Any, args: Any, encoding: str) -> Any:
    target = Any if args_type is None else args_type
    try:
        if isinstance(args, _RAW_TYPES):
            return codec_for(encoding).decode_value(args, target)
        return msgspec.convert(args, target)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid args: {exc}", code="bad_args") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"args are not valid {encoding}: {exc}", code="bad_args") from None


async def _execute(
    node: Node,
    handler: Callable[..., Awaitable[Any]],
    args_type: Any,
    principal: Principal | None,
    name: str,
    value: Any,
    publish_scope: str | None,
) -> Reply:
    ctx = CommandContext(node, principal, name, publish_scope)
    try:
        result = await (handler(ctx) if args_type is None else handler(ctx, value))
        return Reply(True, msgspec.to_builtins(result))
    except RtcoreError as exc:
        return Reply.error(exc)
    except Exception:
        log.exception("command %r raised", name)
        return Reply.error(RtcoreError(f"command {name!r} failed unexpectedly", code="internal"))


class CommandContext(Context):
    """Context whose publishes are idempotent per command key.

    When the command has an idempotency key and a publish has none, the
    publish gets ``{scope}:{key}:{n}`` (n = its index in this execution). A
    command re-executed after a crash therefore appends nothing twice.
    """

    __slots__ = ("_n", "_scope")

    def __init__(self, node: Node, principal: Principal | None, command: str, scope: str | None) -> None:
        super().__init__(node, principal, command, scope)
        self._scope = scope
        self._n = 0

    async def publish(
        self, stream: str, type: str, data: Any = None, *, key: str | None = None, expect: int | None = None
    ) -> Event:
        if key is None and self._scope is not None:
            self._n += 1
            key = f"cmd:{self._scope}:{self._n}"
        return await self.node.publish(stream, type, data, key=key, expect=expect)

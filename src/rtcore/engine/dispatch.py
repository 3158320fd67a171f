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
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import msgspec

from ..errors import AuthError, BadRequest, ConflictError, RtcoreError, Unavailable, error_from_wire
from ..protocol.codec import codec_for
from ..protocol.idempotency import Replay, check_key, decide, fingerprint, scope_of
from ..protocol.streams import check_stream
from ..protocol.types import Event, IdempotencyRecord, Outcome
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
    shape = _publish_first(spec.handler, spec.args_type)
    if shape:
        return await _dispatch_publish_first(
            node, spec.handler, spec.args_type, principal, name, value, scope, key, fp, now, shape == _ONLY
        )
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


#: What a publish-first handler's claim is: not tried yet, made, refused, unknown (the attempt
#: failed), or made and finished in the same operation (the outcome is the event's offset).
_UNTRIED, _CLAIMED, _REFUSED, _UNKNOWN, _DONE = range(5)

#: What :func:`_publish_first` found: not publish-first; publish-first; and also returning the event's offset.
_GENERAL, _FIRST, _ONLY = range(3)


class _NotClaimed(BaseException):
    """Unwinds a publish-first handler whose key another execution holds (see :func:`_dispatch_publish_first`).

    A BaseException so that the handler's own ``except Exception`` cannot
    swallow it (:func:`_publish_first` admits only handlers with no
    exception handlers at all, so nothing of the handler runs after it).
    """

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__()
        self.record = record


async def _dispatch_publish_first(
    node: Node,
    handler: Callable[..., Awaitable[Any]],
    args_type: Any,
    principal: Principal | None,
    name: str,
    value: Any,
    scope: str,
    key: str,
    fp: bytes,
    now: float,
    only: bool,
) -> Reply:
    """A keyed command whose handler's first step is its first publish: claim and append as one operation.

    :func:`_publish_first` has proven that the handler does nothing before
    it awaits ``ctx.publish`` (no call, no store, no branch, no exception
    handler), so running it before the key is claimed does nothing a
    retried key could do twice. That publish goes to
    :meth:`~rtcore.backends.base.Backend.begin_append`: the claim and the
    event in one backend operation (one group commit on SQLite, one script
    on Redis) instead of two. If the key is not claimable, nothing was
    appended and the handler is unwound (:class:`_NotClaimed`) before it
    resumes; the stored record then decides the reply, as in
    :func:`dispatch`. Everything after the claim (finish, release, the ack
    after the outcome is stored) is as in :func:`dispatch`.

    ``only``: the handler does nothing after the publish but return the
    event's offset (``_ONLY``), so the outcome is known inside the backend
    operation, which then also stores it: claim, event and outcome in one
    operation, and nothing is left to store after the handler returns.
    """
    ctx = CommandContext(node, principal, name, f"{scope}:{key}")
    ctx._claim = (scope, key, fp, now)
    ctx._only = only
    try:
        reply = await _execute(node, handler, args_type, principal, name, value, None, ctx)
    except _NotClaimed as refused:
        return _replay(node, refused.record, fp)
    except BaseException:
        # Cancelled while the handler ran: as in dispatch, a claim it holds is
        # released (shielded); an unknown one is left to lapse after its lease
        # (releasing it could free another execution's live claim).
        if ctx._claim_state == _CLAIMED:
            with anyio.CancelScope(shield=True):
                await _release(node, scope, key)
        raise
    state = ctx._claim_state
    if state == _DONE and reply.ok and reply.result == ctx._offset:
        return reply  # the operation that appended the event stored this outcome
    if state == _UNKNOWN and not reply.ok and reply.retryable:
        # The claim-and-append failed in the engine and the handler passed the
        # retryable error on: whether the claim landed is unknown, so it is
        # not released (a retry gets in_progress until the lease lapses).
        return reply
    if state == _DONE:
        # Not the offset the operation stored (the proof rules this out):
        # the handler's own reply is the outcome, stored over the other.
        state = _CLAIMED
    if state != _CLAIMED:
        # The handler failed before its publish reached the backend (a bad
        # stream name, unencodable data): claim now, as dispatch does first.
        try:
            existing = await node.backend.idempotency.begin(
                scope, key, fp, now=node.clock(), lease=node.idempotency_lease, ttl=node.idempotency_ttl
            )
            if existing is not None:
                return _replay(node, existing, fp)
        except RtcoreError as exc:
            return Reply.error(exc)
    await _settle(node, name, scope, key, fp, reply)
    return reply


def _replay(node: Node, record: IdempotencyRecord, fp: bytes) -> Reply:
    """The reply for a key that ``record`` keeps (see :func:`~rtcore.protocol.idempotency.decide`)."""
    try:
        decision = decide(record, fp)
    except RtcoreError as exc:
        return Reply.error(exc)
    assert isinstance(decision, Replay)
    node.stats["idempotent_replays"] += 1
    return Reply.from_outcome(decision.outcome, replayed=True)


async def _settle(node: Node, name: str, scope: str, key: str, fp: bytes, reply: Reply) -> None:
    """Store ``reply`` as the claimed key's outcome, or release the key (retryable failure); as :func:`dispatch`."""
    try:
        if reply.ok or not reply.retryable:
            outcome = Outcome(True, reply.result) if reply.ok else Outcome(False, None, reply.code, reply.message, reply.http_status)
            await _finish(node, scope, key, outcome, fp)
        else:
            with anyio.CancelScope(shield=True):
                await _release(node, scope, key)
    except RtcoreError:
        log.exception("could not store the outcome of %r under key %r", name, key)


#: Instructions without any effect on the value stack or the application (see :func:`_publish_first`).
_NO_EFFECT = frozenset({"RESUME", "NOP", "CACHE", "PRECALL", "KW_NAMES", "COPY_FREE_VARS"})

#: Constant types a dict literal's keys may have before the publish (hashing them runs no application code).
_PLAIN_KEYS = (str, int, float, bytes, bool, type(None))

#: (handler, args type) -> what _publish_first found (a plain dict, as _NEVER_SUSPENDS).
_PUBLISH_FIRST: dict[tuple[Any, Any], int] = {}


def _publish_first(handler: Any, args_type: Any) -> int:
    """Whether ``handler``'s first step is ``await ctx.publish(...)`` with nothing of the application before it.

    Returns :data:`_GENERAL` (no), :data:`_FIRST` (yes) or :data:`_ONLY`
    (yes, and after the publish it only returns the event's ``offset``,
    see :func:`_returns_offset`).

    Proven from the bytecode, conservatively (anything not recognised is
    "no", and the command then takes the general path): a plain ``async
    def`` with no exception handlers of its own (a ``try``, ``with`` or
    ``async with`` anywhere rules it out, so an unwinding
    :class:`_NotClaimed` runs none of its code; see
    :func:`_only_implicit_handlers`) whose instructions up to the first await, followed on a model
    of the value stack, do only this: load ``ctx.publish``; build its
    arguments from constants, the args parameter itself and its fields
    (``args.x`` on a ``msgspec.Struct`` is a slot read, no code), tuples,
    lists and dict literals with constant keys; call that publish (the only
    call) and await its coroutine. No global name, no other call, no store,
    no branch: nothing the application could see happens before the
    publish, so it may run before the key is claimed.
    """
    known = _PUBLISH_FIRST.get((handler, args_type))
    if known is not None:
        return known
    shape = _check_publish_first(handler, args_type)
    _PUBLISH_FIRST[(handler, args_type)] = shape
    return shape


#: Instructions of an ``await``'s wait loop (after GET_AWAITABLE), which run nothing of the application.
_AWAIT_LOOP = frozenset({"LOAD_CONST", "SEND", "YIELD_VALUE", "RESUME", "JUMP_BACKWARD_NO_INTERRUPT", "END_SEND", "CACHE", "NOP"})


def _returns_offset(rest: list[dis.Instruction]) -> bool:
    """Whether the instructions after a publish's GET_AWAITABLE only await it and return the event's ``offset``.

    Either ``return (await ctx.publish(...)).offset`` or ``event = await
    ctx.publish(...)`` then ``return event.offset``, and nothing else.
    """
    i = 0
    while i < len(rest) and rest[i].opname in _AWAIT_LOOP:
        i += 1
    tail = [(ins.opname, ins.argval) for ins in rest[i:] if ins.opname != "CACHE"]
    if len(tail) >= 4 and tail[0][0] == "STORE_FAST" and tail[1] == ("LOAD_FAST", tail[0][1]):
        tail = tail[2:]
    return len(tail) >= 2 and tail[0] == ("LOAD_ATTR", "offset") and tail[1][0] == "RETURN_VALUE"


#: What the exception handlers Python itself adds to a coroutine (3.12+) run: the
#: end of an ``await`` thrown into, and StopIteration turned into RuntimeError.
_IMPLICIT_HANDLER = frozenset(
    {"CLEANUP_THROW", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "CALL_INTRINSIC_1", "RERAISE", "CACHE", "NOP"}
)


def _only_implicit_handlers(code: Any, instructions: list[dis.Instruction]) -> bool:
    """Whether every exception handler of ``code`` is one Python adds itself, none the application wrote.

    From each handler's first instruction to its ``RERAISE`` or jump back,
    only :data:`_IMPLICIT_HANDLER` instructions (``CALL_INTRINSIC_1`` only
    as the StopIteration conversion); a ``try`` or ``with`` of the
    application starts with ``PUSH_EXC_INFO`` and is refused.
    """
    entries = getattr(dis.Bytecode(code), "exception_entries", None)  # 3.11+, not in typeshed
    if entries is None:
        return False
    at = {ins.offset: i for i, ins in enumerate(instructions)}
    for entry in entries:
        i = at.get(entry.target)
        if i is None:
            return False
        for ins in instructions[i:]:
            if ins.opname not in _IMPLICIT_HANDLER:
                return False
            if ins.opname == "CALL_INTRINSIC_1" and ins.argrepr != "INTRINSIC_STOPITERATION_ERROR":
                return False
            if ins.opname in ("RERAISE", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT"):
                break
        else:
            return False
    return True


def _check_publish_first(handler: Any, args_type: Any) -> int:
    if not (inspect.isfunction(handler) and inspect.iscoroutinefunction(handler)):
        return _GENERAL
    code = handler.__code__
    params = 1 if args_type is None else 2
    if code.co_argcount != params or code.co_kwonlyargcount or code.co_cellvars:
        return _GENERAL
    instructions = list(dis.get_instructions(code))
    if code.co_exceptiontable and not _only_implicit_handlers(code, instructions):
        return _GENERAL
    ctx_name = code.co_varnames[0]
    args_name = code.co_varnames[1] if params == 2 else None
    fields: frozenset[str] = frozenset()
    if isinstance(args_type, type) and issubclass(args_type, msgspec.Struct):
        fields = frozenset(
            f
            for f in args_type.__struct_fields__
            if type(inspect.getattr_static(args_type, f, None)).__name__ == "member_descriptor"
        )
    # The value stack, modelled: ("const", value), "ctx", "args", "value"
    # (a field, or something built of inert values), "publish" + "self" (the
    # bound method, as LOAD_METHOD / a method LOAD_ATTR push it), "null",
    # "awaitable" (what the publish call returned).
    stack: list[Any] = []
    called = False
    try:
        for n, ins in enumerate(instructions):
            op, arg = ins.opname, ins.arg or 0
            if op in _NO_EFFECT:
                continue
            if op == "RETURN_GENERATOR":
                stack.append("generator")
            elif op == "POP_TOP":
                stack.pop()
            elif op == "LOAD_CONST":
                stack.append(("const", ins.argval))
            elif op == "PUSH_NULL":
                stack.append("null")
            elif op == "LOAD_FAST":
                if ins.argval == ctx_name:
                    stack.append("ctx")
                elif args_name is not None and ins.argval == args_name:
                    stack.append("args")
                else:
                    return _GENERAL
            elif op in ("LOAD_METHOD", "LOAD_ATTR"):
                owner = stack.pop()
                method = op == "LOAD_METHOD" or (sys.version_info >= (3, 12) and arg & 1)
                if owner == "ctx" and ins.argval == "publish" and method and not called:
                    stack += ["publish", "self"]
                elif owner == "args" and ins.argval in fields and not method:
                    stack.append("value")
                else:
                    return _GENERAL
            elif op in ("BUILD_TUPLE", "BUILD_LIST"):
                del stack[len(stack) - arg :]
                stack.append("value")
            elif op == "BUILD_CONST_KEY_MAP":
                del stack[len(stack) - arg - 1 :]
                stack.append("value")
            elif op == "BUILD_MAP":
                items = stack[len(stack) - 2 * arg :]
                if any(not (isinstance(k, tuple) and isinstance(k[1], _PLAIN_KEYS)) for k in items[0::2]):
                    return _GENERAL
                del stack[len(stack) - 2 * arg :]
                stack.append("value")
            elif op == "CALL":
                del stack[len(stack) - arg :]
                if called or stack[-2:] != ["publish", "self"]:
                    return _GENERAL
                del stack[-2:]
                stack.append("awaitable")
                called = True
            elif op == "GET_AWAITABLE":
                if not (called and stack[-1] == "awaitable"):
                    return _GENERAL
                return _ONLY if _returns_offset(instructions[n + 1 :]) else _FIRST
            else:
                return _GENERAL
    except (IndexError, TypeError):  # a stack shape this model does not know
        return _GENERAL
    return _GENERAL


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
    ctx: CommandContext | None = None,
) -> Reply:
    if ctx is None:
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

    __slots__ = ("_claim", "_claim_state", "_n", "_offset", "_only", "_scope")

    def __init__(self, node: Node, principal: Principal | None, command: str, scope: str | None) -> None:
        super().__init__(node, principal, command, scope)
        self._scope = scope
        self._n = 0
        #: (scope, key, fingerprint, now) of a claim the first publish makes (see _dispatch_publish_first).
        self._claim: tuple[str, str, bytes, float] | None = None
        self._claim_state = _UNTRIED
        self._only = False  # the claim's operation also stores the outcome, the event's offset
        self._offset = 0  # the offset it stored

    async def publish(
        self, stream: str, type: str, data: Any = None, *, key: str | None = None, expect: int | None = None
    ) -> Event:
        if key is None and self._scope is not None:
            self._n += 1
            key = f"cmd:{self._scope}:{self._n}"
        if self._claim is not None:
            return await self._claim_and_publish(stream, type, data, key, expect)
        return await self.node.publish(stream, type, data, key=key, expect=expect)

    async def _claim_and_publish(self, stream: str, type: str, data: Any, key: str | None, expect: int | None) -> Event:
        """The first publish of a publish-first handler: the command's claim and this event in one operation."""
        assert self._claim is not None and key is not None
        scope, ikey, fp, now = self._claim
        self._claim = None
        node = self.node
        check_stream(stream)  # as Node.publish; failing here, nothing was tried
        payload = msgspec.to_builtins(data)
        self._claim_state = _UNKNOWN
        try:
            existing, result = await node.backend.begin_append(
                scope, ikey, fp, now=now, lease=node.idempotency_lease, ttl=node.idempotency_ttl,
                stream=stream, type=type, data=payload, event_key=key, expect=expect,
                retention=node.app.retention_for(stream), outcome_ttl=node.idempotency_ttl if self._only else None,
            )
        except ConflictError:
            self._claim_state = _CLAIMED  # claimed; only the append's ``expect`` failed
            raise
        if existing is not None:
            self._claim_state = _REFUSED
            raise _NotClaimed(existing)
        assert result is not None
        if self._only:
            self._claim_state, self._offset = _DONE, result.event.offset
        else:
            self._claim_state = _CLAIMED
        return result.event

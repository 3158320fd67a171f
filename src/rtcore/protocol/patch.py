"""Generic state patches (sans-IO): ``diff(old, new) -> ops`` and ``apply(doc, ops)``.

Rooms sync their state as a stream of small patches instead of game events,
so a client in any language can hold the exact state with no game code: it
applies each patch to the document it has. Documents are msgspec *builtins*
(``dict`` with ``str`` keys, ``list``, ``str``, ``int``, ``float``, ``bool``,
``None``), i.e. what :func:`rtcore.protocol.state.state_builtins` produces and
what JSON or MessagePack decoding gives.

An op is a short list (cheap in JSON and MessagePack, easy to apply in
JavaScript), its path a list of map keys (``str``) and list indexes (``int``):

* ``["set", path, value]`` — put ``value`` at ``path`` (a map key is added or
  replaced; a list index must exist; the empty path replaces the document);
* ``["del", path]`` — remove a map key;
* ``["push", path, value]`` — append ``value`` to the list at ``path``;
* ``["trunc", path, n]`` — cut the list at ``path`` to its first ``n`` items.

The guarantee, checked by a property test: ``apply(copy(old), diff(old, new))
== new`` for any builtins, with the same canonical checksum.
"""

from __future__ import annotations

import operator
from itertools import compress
from typing import Any, TypeAlias

import msgspec

__all__ = ["Op", "PatchError", "apply", "diff", "diff_into"]

#: One operation (see the module docstring).
Op: TypeAlias = list[Any]


class PatchError(ValueError):
    """An op does not fit the document (a client that missed a patch, or a bad op)."""


def _same(a: Any, b: Any) -> bool:
    # ``1 == 1.0 == True`` in Python, but they encode differently: a patch must
    # turn an int into a float even when they compare equal.
    return type(a) is type(b) and bool(a == b)


def diff(old: Any, new: Any, path: list[Any] | None = None) -> list[Op]:
    """The ops that turn ``old`` into ``new`` (both builtins).

    Maps are compared key by key and lists index by index (then items are
    pushed or the list is truncated), so a change deep in a large state costs
    one small op; a short list (up to 4 items, a position ``[x, y]``) with
    two changes or more is set whole, in one op.

    Args:
        old: The document before.
        new: The document after.
        path: Where ``old`` and ``new`` sit in a larger document: every op's
            path starts with it (default: they are the whole document).

    Returns:
        The ops, in the order they must be applied (empty: nothing changed).
    """
    ops: list[Op] = []
    _diff(old, new, list(path) if path else [], ops)
    return ops


def diff_into(old: Any, new: Any, path: list[Any], ops: list[Op]) -> None:
    """:func:`diff` appending to ``ops``, for a caller that diffs a document section by section.

    A room diffs its document on every move: :func:`diff`'s own list and
    path copy per section, and the concatenation of their results, were a
    measurable share of it (py-spy).

    Args:
        old: The section before.
        new: The section after.
        path: Where the section sits in the document (a fresh list: ops may
            hold it, the caller must not change it afterwards).
        ops: Where the ops are appended, in the order they must be applied.
    """
    _diff(old, new, path, ops)


_SCALARS = (str, int, float, bool, type(None))
# Exact equality of two builtins trees: MessagePack tells 1 from 1.0 and
# True, which ``==`` does not (see _same).
_pack = msgspec.msgpack.Encoder().encode


def _diff(old: Any, new: Any, path: list[Any], ops: list[Op]) -> None:
    # An item needs no op when old and new are equal, of the same types all
    # the way down: ``o is v`` (the same object); else ``==`` (in C) rules out
    # most changed subtrees and an equal container is confirmed by its
    # MessagePack bytes (when they differ, e.g. ``1`` vs ``1.0`` inside, it is
    # walked). A room diffs its whole state on every tick and most of it did
    # not change: walking each unchanged item in Python was most of the diff
    # (py-spy); the test is inlined (a call per key was a good part of a
    # small room's diff).
    if type(old) is dict and type(new) is dict:
        if len(new) >= _BULK and old.keys() == new.keys():
            _diff_same_keys(old, new, path, ops)
            return
        for k in old:
            if k not in new:
                ops.append(["del", [*path, k]])
        for k, v in new.items():
            if k in old:
                o = old[k]
                if o is v:
                    continue
                t = type(o)
                if t is type(v) and o == v and (t in _SCALARS or _pack(o) == _pack(v)):
                    continue
                if t in _SCALARS or type(v) in _SCALARS:
                    ops.append(["set", [*path, k], v])  # what _diff would append, without the call
                else:
                    _diff(o, v, [*path, k], ops)
            else:
                ops.append(["set", [*path, k], v])
    elif type(old) is list and type(new) is list:
        n = len(new)
        if n <= _VECTOR and n == len(old) and sum(map(operator.ne, old, new)) > 1:
            # The short-list rule below, decided in C: setting a list whole is
            # right whatever changed in it (a position ``[x, y]`` that moved).
            ops.append(["set", path, new])
            return
        start = len(ops)
        common = min(len(old), len(new))
        for i in range(common):
            o, v = old[i], new[i]
            if o is v:
                continue
            t = type(o)
            if t is type(v) and o == v and (t in _SCALARS or _pack(o) == _pack(v)):
                continue
            if t in _SCALARS or type(v) in _SCALARS:
                ops.append(["set", [*path, i], v])  # what _diff would append, without the call
            else:
                _diff(o, v, [*path, i], ops)
        if len(new) < len(old):
            ops.append(["trunc", path, len(new)])
        for i in range(common, len(new)):
            ops.append(["push", path, new[i]])
        if len(ops) - start > 1 and len(new) <= _VECTOR:
            # A short list with two changes or more (a position ``[x, y]``
            # moved): one op setting it is smaller on the wire and cheaper to
            # fold than an op per item.
            del ops[start:]
            ops.append(["set", path, new])
    elif not _same(old, new):
        ops.append(["set", path, new])


#: Lists of at most this many items are set whole when two or more of their items changed.
_VECTOR = 4
#: Maps of at least this many keys are compared in bulk (:func:`_diff_same_keys`).
_BULK = 8


def _diff_same_keys(old: dict[str, Any], new: dict[str, Any], path: list[Any], ops: list[Op]) -> None:
    """:func:`_diff` of two maps with the same keys, the unchanged items compared in C.

    A large map where a few items changed (a 100-player room's positions on
    every tick) spent most of its diff looping over the unchanged items in
    Python. Here ``==`` runs over all items at once (``map``), the equal
    ones are confirmed together by one MessagePack encoding of each side
    (which tells ``1`` from ``1.0`` and ``True``; the encoding is
    self-delimiting, so equal bytes mean each item's bytes are equal), and
    only the items that differ are walked, in the map's order.
    """
    keys = list(new)
    olds = list(map(old.__getitem__, keys))
    news = list(new.values())
    eqs = list(map(operator.eq, olds, news))
    if _pack(list(compress(olds, eqs))) != _pack(list(compress(news, eqs))):
        # Some equal items differ in type (``1`` vs ``1.0``, deep inside): the item-by-item test.
        for i, o in enumerate(olds):
            v = news[i]
            eqs[i] = bool(eqs[i]) and type(o) is type(v) and (type(o) in _SCALARS or _pack(o) == _pack(v))
    for k in compress(keys, map(operator.not_, eqs)):
        _diff(old[k], new[k], [*path, k], ops)


def _copy(value: Any) -> Any:
    # Values inside ops may be shared with the sender's document (in-process):
    # never alias them into the receiver's.
    # Scalars are taken as they are, without a call each (a position
    # ``[x, y]`` set whole on every move: the calls were most of its copy).
    if type(value) is dict:
        return {k: _copy(v) if type(v) is dict or type(v) is list else v for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) if type(v) is dict or type(v) is list else v for v in value]
    return value


def _walk(doc: Any, path: list[Any], op: Op, upto: int | None = None) -> Any:
    """The node at ``path[:upto]`` (all of ``path`` by default), without slicing the path."""
    node = doc
    for i in range(len(path) if upto is None else upto):
        try:
            node = node[path[i]]
        except (KeyError, IndexError, TypeError):
            raise PatchError(f"op {op[0]!r}: path {path[:upto]!r} does not exist") from None
    return node


def apply(doc: Any, ops: list[Op]) -> Any:
    """Apply ``ops`` to ``doc`` and return the new document.

    Maps and lists are changed in place; the return value matters when an op
    replaces the whole document (empty path).

    Args:
        doc: A builtins document.
        ops: Ops made by :func:`diff` (from JSON or MessagePack).

    Returns:
        The patched document.

    Raises:
        PatchError: an op is malformed or its path does not exist.
    """
    for op in ops:
        if not isinstance(op, list) or len(op) < 2 or not isinstance(op[1], list):
            raise PatchError(f"malformed op {op!r}: expected [name, path, ...]")
        name, path = op[0], op[1]
        if name == "set":
            # The common op: kept to a few checks (a follower folds every patch of every room).
            if len(op) != 3:
                raise PatchError(f"op 'set' needs [name, path, value], got {op!r}")
            value = op[2]
            if type(value) is dict or type(value) is list:
                value = _copy(value)
            n = len(path)
            if not n:
                doc = value
                continue
            parent = doc
            if n > 1:
                # _walk inlined (a call per op was a fifth of a small patch's fold).
                try:
                    for i in range(n - 1):
                        parent = parent[path[i]]
                except (KeyError, IndexError, TypeError):
                    raise PatchError(f"op 'set': path {path[: n - 1]!r} does not exist") from None
            last = path[-1]
            tp = type(parent)
            if (tp is dict and isinstance(last, str)) or (tp is list and type(last) is int and 0 <= last < len(parent)):
                parent[last] = value
            else:
                raise PatchError(f"op 'set': cannot set {last!r} at {path[:-1]!r}")
        elif name == "del":
            parent = _walk(doc, path, op, len(path) - 1) if path else None
            if type(parent) is not dict or path[-1] not in parent:
                raise PatchError(f"op 'del': no key at {path!r}")
            del parent[path[-1]]
        elif name in ("push", "trunc"):
            if len(op) != 3:
                raise PatchError(f"op {name!r} needs [name, path, arg], got {op!r}")
            target = _walk(doc, path, op)
            if type(target) is not list:
                raise PatchError(f"op {name!r}: {path!r} is not a list")
            if name == "push":
                target.append(_copy(op[2]))
            else:
                n = op[2]
                if type(n) is not int or not 0 <= n <= len(target):
                    raise PatchError(f"op 'trunc': length {n!r} out of range 0..{len(target)}")
                del target[n:]
        else:
            raise PatchError(f"unknown op {name!r} (expected set, del, push or trunc)")
    return doc

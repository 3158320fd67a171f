"""Generic state patches: ``apply(old, diff(old, new)) == new`` for any builtins."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rtcore.protocol.patch import PatchError, apply, diff, diff_into
from rtcore.protocol.state import checksum

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
docs = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=5),
    max_leaves=30,
)


@given(docs, docs)
@example({"a": 1}, {"a": 1.0})
@example([True], [1])
@example({"p": {"x": [1, 2]}, "q": 0}, {"p": {"x": [1.0, 2]}, "q": 1})
@example([[{"b": True}], 3], [[{"b": 1}], 4])
def test_apply_of_diff_gives_new(old: Any, new: Any) -> None:
    """The patch of any two documents turns the first into the second, byte for byte.

    Mutation: drop the ``trunc`` op for shorter lists → fails; compare with ``==``
    only (so ``1`` → ``1.0`` or ``True`` → ``1`` produce no op) → fails on the
    checksum.
    Mutation seen caught: ``_diff``'s unchanged-item test skips an equal container without comparing
    its MessagePack bytes (``[1, 2]`` vs ``[1.0, 2]`` deep inside) → fails; or
    without the type check (``1`` vs ``1.0``) → fails.
    """
    ops = diff(old, new)
    got = apply(copy.deepcopy(old), ops)
    assert got == new
    assert checksum(got) == checksum(new)


@given(docs, docs, st.lists(st.text(max_size=3), min_size=1, max_size=3))
def test_diff_at_a_path_patches_the_part_of_a_larger_document(old: Any, new: Any, path: list[str]) -> None:
    """``diff(old, new, path)``: the ops turn a document holding ``old`` at ``path`` into the
    same document holding ``new`` there (rooms diff each section of the document this way).

    Mutation seen caught: ignore ``path`` in ``diff`` (start ``_diff`` at ``[]``) → the
    ops land at the root → fails.
    """
    def nest(value: Any) -> Any:
        doc: Any = value
        for key in reversed(path):
            doc = {key: doc, "other": 1}
        return doc

    ops = diff(old, new, path)
    assert all(op[1][: len(path)] == path for op in ops)
    got = apply(nest(copy.deepcopy(old)), ops)
    assert got == nest(new)
    assert checksum(got) == checksum(nest(new))


@given(docs, docs)
def test_patch_survives_the_wire(old: Any, new: Any) -> None:
    """A client that receives the ops over JSON and MessagePack gets the same document and checksum."""
    ops = diff(old, new)
    for enc, dec in ((msgspec.json.encode, msgspec.json.decode), (msgspec.msgpack.encode, msgspec.msgpack.decode)):
        mine = dec(enc(old))
        got = apply(mine, dec(enc(ops)))
        assert checksum(got) == checksum(new)


@given(docs)
def test_no_change_no_ops(doc: Any) -> None:
    """An unchanged document costs no patch (rooms publish nothing then)."""
    assert diff(doc, copy.deepcopy(doc)) == []


def test_ops_are_small_and_do_not_alias() -> None:
    """A change deep in a large document is one op; applied values are copies, not shared."""
    old = {"state": {"cells": [""] * 9, "log": [1, 2]}, "inbox": 3}
    new = copy.deepcopy(old)
    new["state"]["cells"][4] = "x"
    new["state"]["log"].append({"a": 1})
    ops = diff(old, new)
    assert ops == [["set", ["state", "cells", 4], "x"], ["push", ["state", "log"], {"a": 1}]]
    mine = copy.deepcopy(old)
    apply(mine, ops)
    new["state"]["log"][2]["a"] = 99
    assert mine["state"]["log"][2] == {"a": 1}


@pytest.mark.parametrize(
    ("doc", "ops", "message"),
    [
        ({}, [["del", ["x"]]], "no key"),
        ({"a": []}, [["push", ["a", "b"], 1]], "does not exist"),
        ({"a": 1}, [["push", ["a"], 1]], "not a list"),
        ({"a": [1]}, [["trunc", ["a"], 5]], "out of range"),
        ({}, [["zap", []]], "unknown op"),
        ({}, ["set"], "malformed"),
        ({"a": [1]}, [["set", ["a", 3], 1]], "cannot set"),
    ],
)
def test_bad_ops_name_the_problem(doc: Any, ops: Any, message: str) -> None:
    """An op that does not fit (a client that missed a patch) raises PatchError naming it."""
    with pytest.raises(PatchError, match=message):
        apply(doc, ops)


@given(docs, docs, docs, docs)
def test_diff_into_appends_the_ops_of_each_section(old_a: Any, new_a: Any, old_b: Any, new_b: Any) -> None:
    """``diff_into`` (how a room diffs its document section by section) appends to one list
    exactly the ops ``diff`` gives for each section at its path, in order, and they patch
    the whole document.

    Mutation seen caught: ``diff_into`` starts ``_diff`` at ``[]`` instead of ``path`` →
    the ops land at the root → fails; it replaces ``ops`` instead of appending (diffs
    into a fresh list) → the first section's ops are lost → fails.
    """
    ops: list[Any] = []
    diff_into(old_a, new_a, ["a"], ops)
    diff_into(old_b, new_b, ["b"], ops)
    assert ops == diff(old_a, new_a, ["a"]) + diff(old_b, new_b, ["b"])
    got = apply(copy.deepcopy({"a": old_a, "b": old_b}), ops)
    assert checksum(got) == checksum({"a": new_a, "b": new_b})


def _retype(value: Any) -> Any:
    """``value`` with every int as a float and every bool as an int: equal by ``==``, not on the wire."""
    if type(value) is dict:
        return {k: _retype(v) for k, v in value.items()}
    if type(value) is list:
        return [_retype(v) for v in value]
    if type(value) is bool:
        return int(value)
    if type(value) is int:
        return float(value)
    return value


big_maps = st.dictionaries(st.text(max_size=3), docs, min_size=8, max_size=12)


@given(big_maps, st.data())
@example({f"k{i}": [1, 2] for i in range(10)}, None)
def test_large_maps_with_the_same_keys_are_patched_exactly(old: dict[str, Any], data: Any) -> None:
    """A map of 8 keys or more diffed against one with the same keys (the bulk path, where
    the unchanged items are compared all at once) patches every changed item, including
    items equal by ``==`` that differ in type deep inside (``1`` → ``1.0``, ``True`` → ``1``).

    Mutation seen caught: in ``_diff_same_keys`` take the bulk ``==`` as the answer (skip
    the MessagePack confirmation) → ``[1, 2]`` → ``[1.0, 2]`` gives no op → fails; on a
    confirmation mismatch mark every equal item unchanged → fails; walk the items in a
    different order than ``keys`` → the ops still apply (disjoint paths), not caught, and
    need not be.
    """
    if data is None:  # the example: one item retyped inside
        new = dict(old)
        new["k3"] = [1.0, 2]
    else:
        new = {
            k: data.draw(st.sampled_from(["same", "copy", "retype", "other"]).flatmap(
                lambda how, v=v: st.just(v if how == "same" else copy.deepcopy(v) if how == "copy" else _retype(v))
                if how != "other" else docs
            ))
            for k, v in old.items()
        }
    ops = diff(old, new)
    got = apply(copy.deepcopy(old), ops)
    assert got == new
    assert checksum(got) == checksum(new)


def test_a_short_list_with_several_changes_is_set_whole() -> None:
    """A list of up to 4 items with two or more changed items is one ``set`` of the list
    (a position ``[x, y]`` that moved: one op instead of one per coordinate); one changed
    item, or a longer list, keeps an op per item.

    Mutation seen caught: drop the short-list rule in ``_diff`` → two ops for ``[x, y]`` →
    fails; apply it to lists of any length → the 5-item list is set whole → fails.
    """
    assert diff({"p": [0.0, 0.0]}, {"p": [1.0, 2.0]}) == [["set", ["p"], [1.0, 2.0]]]
    assert diff({"p": [0.0, 0.0]}, {"p": [0.0, 2.0]}) == [["set", ["p", 1], 2.0]]
    assert diff([1, 2, 3, 4, 5], [9, 2, 3, 4, 8]) == [["set", [0], 9], ["set", [4], 8]]
    assert diff({"p": [0, 0]}, {"p": [1, 2, 3]}) == [["set", ["p"], [1, 2, 3]]]


def test_applied_values_are_copied_all_the_way_down() -> None:
    """A value set or pushed by a patch shares no container with the op at any depth (an
    in-process follower folds the very ops the owner wrote, whose values are the owner's).

    Mutation seen caught: ``_copy`` takes the items of a list or map as they are (a
    shallow copy) → the nested list and map are shared → fails.
    """
    value = {"grid": [[1, 2], [3, {"k": [4]}]], "m": {"n": {"o": 1}}}
    ops = [["set", ["v"], value], ["push", ["l"], [value["m"]]]]
    mine = apply({"l": []}, ops)
    value["grid"][0].append(9)
    value["grid"][1][1]["k"].append(5)
    value["m"]["n"]["o"] = 2
    assert mine == {"v": {"grid": [[1, 2], [3, {"k": [4]}]], "m": {"n": {"o": 1}}}, "l": [[{"n": {"o": 1}}]]}

"""Stateful streams: folding, snapshots, checksums (rtcore.protocol.state)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcore.backends.base import Event, Snapshot
from rtcore.protocol.state import StateSpec, StreamState, checksum, encode_state, state_builtins
from rtcore.testing.strategies import json_values


def ev(offset: int, type: str = "add", data: Any = None, *, epoch: str = "e1", stream: str = "room:1") -> Event:
    return Event(stream, epoch, offset, type, data, ts=0.0)


class Room(msgspec.Struct):
    """Mutates in place, returns None."""

    players: dict[str, int] = {}
    log: list[str] = []

    def apply(self, event: Event) -> None:
        if event.type == "join":
            self.players[event.data["name"]] = 0
        elif event.type == "score":
            self.players[event.data["name"]] += event.data["points"]
        self.log.append(event.type)


class Counter(msgspec.Struct, frozen=True):
    """Immutable: returns the new state."""

    n: int = 0
    total: int = 0

    def apply(self, event: Event) -> Counter:
        return Counter(self.n + 1, self.total + (event.data or 0))


class Seats(msgspec.Struct):
    """Int keys and a set: both must still checksum deterministically."""

    seats: dict[int, str] = {}
    tags: set[str] = set()

    def apply(self, event: Event) -> None:
        self.seats[event.data["seat"]] = event.data["name"]
        self.tags.add(event.data["name"])


class Bag(msgspec.Struct):
    """Arbitrary JSON-like content (for property tests)."""

    items: dict[str, Any] = {}

    def apply(self, event: Event) -> None:
        self.items[str(event.offset)] = event.data


ROOM = StateSpec("room:*", Room, snapshot_every=4, sync_every=2)
COUNTER = StateSpec("count:*", Counter, snapshot_every=3, sync_every=0)


def reference_checksum(state: Any) -> str:
    """The documented checksum: blake2b-128 of sorted msgpack of the builtins."""
    data = msgspec.msgpack.encode(msgspec.to_builtins(state), order="sorted")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --- folding ---------------------------------------------------------------------


def test_initial_state_is_the_types_default() -> None:
    s = StreamState(ROOM, "e1")
    assert s.offset == 0
    assert s.state == Room()
    assert s.epoch == "e1"


def test_apply_in_place() -> None:
    s = StreamState(ROOM, "e1")
    before = s.state
    s.apply(ev(1, "join", {"name": "a"}))
    s.apply(ev(2, "score", {"name": "a", "points": 3}))
    assert s.state is before  # mutated, not replaced
    assert s.state == Room({"a": 3}, ["join", "score"])
    assert s.offset == 2


def test_apply_returning_new_state() -> None:
    s = StreamState(COUNTER, "e1")
    first = s.state
    for i in range(1, 6):
        s.apply(ev(i, data=i))
    assert s.state == Counter(5, 15)
    assert s.state is not first
    assert first == Counter()  # the old state was not touched
    assert s.offset == 5


@pytest.mark.parametrize(
    "event",
    [ev(1), ev(3), ev(2, epoch="e2"), ev(0)],
    ids=["same offset", "gap", "other epoch", "before"],
)
def test_apply_of_a_non_next_event_raises(event: Event) -> None:
    s = StreamState(COUNTER, "e1", 1, Counter(1, 0))
    with pytest.raises(ValueError, match="cannot fold"):
        s.apply(event)
    assert s.offset == 1
    assert s.state == Counter(1, 0)


def test_start_at_an_offset_with_a_given_state() -> None:
    s = StreamState(COUNTER, "e1", 10, Counter(10, 100))
    s.apply(ev(11, data=1))
    assert (s.offset, s.state) == (11, Counter(11, 101))


# --- snapshot and sync points ----------------------------------------------------


def test_snapshot_and_sync_points() -> None:
    s = StreamState(ROOM, "e1")
    assert not s.snapshot_due and not s.sync_due  # offset 0 is never a point
    due = []
    for i in range(1, 13):
        s.apply(ev(i, "noop"))
        due.append((i, s.snapshot_due, s.sync_due))
    assert [i for i, snap, _ in due if snap] == [4, 8, 12]
    assert [i for i, _, sync in due if sync] == [2, 4, 6, 8, 10, 12]


def test_sync_every_zero_disables_sync() -> None:
    s = StreamState(COUNTER, "e1")
    for i in range(1, 10):
        s.apply(ev(i, data=0))
        assert not s.sync_due
        assert s.snapshot_due == (i % 3 == 0)


# --- snapshots ------------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    s = StreamState(ROOM, "e1")
    s.apply(ev(1, "join", {"name": "bob"}))
    s.apply(ev(2, "join", {"name": "al"}))
    s.apply(ev(3, "score", {"name": "al", "points": 7}))
    snap = s.snapshot("room:1")
    assert isinstance(snap, Snapshot)
    assert (snap.stream, snap.epoch, snap.offset) == ("room:1", "e1", 3)
    assert snap.state == encode_state(s.state)
    assert snap.checksum == s.checksum()
    back = StreamState.from_snapshot(ROOM, snap)
    assert back.state == s.state
    assert (back.epoch, back.offset) == ("e1", 3)
    assert back.checksum() == s.checksum()
    # and it keeps folding from there exactly like the original
    s.apply(ev(4, "score", {"name": "bob", "points": 1}))
    back.apply(ev(4, "score", {"name": "bob", "points": 1}))
    assert back.state == s.state and back.checksum() == s.checksum()


def test_snapshot_round_trip_of_frozen_state() -> None:
    s = StreamState(COUNTER, "e1", 2, Counter(2, 5))
    back = StreamState.from_snapshot(COUNTER, s.snapshot("count:1"))
    assert back.state == Counter(2, 5)
    assert back.checksum() == s.checksum()


def test_int_keys_and_sets_snapshot_and_checksum() -> None:
    # Regression: sorted msgpack refuses non-str keys (TypeError), and a set's
    # iteration order depends on the process's hash seed.
    spec = StateSpec("table:*", Seats)
    s = StreamState(spec, "e1")
    for i, name in enumerate(["zed", "amy", "kim", "bo"], start=1):
        s.apply(ev(i, data={"seat": 10 - i, "name": name}))
    assert s.builtins() == {
        "seats": {"6": "bo", "7": "kim", "8": "amy", "9": "zed"},
        "tags": ["amy", "bo", "kim", "zed"],
    }
    back = StreamState.from_snapshot(spec, s.snapshot("table:1"))
    assert back.state == s.state
    assert back.checksum() == s.checksum()


def test_set_checksum_is_the_same_in_every_process() -> None:
    code = (
        "import msgspec\n"
        "from rtcore.protocol.state import checksum\n"
        "class S(msgspec.Struct):\n"
        "    tags: set[str]\n"
        "print(checksum(S({'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta'})))\n"
    )
    sums = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(sums) == 1


# --- checksums ------------------------------------------------------------------


def test_checksum_is_blake2b_128_of_sorted_msgpack_builtins() -> None:
    s = StreamState(ROOM, "e1")
    s.apply(ev(1, "join", {"name": "b"}))
    s.apply(ev(2, "join", {"name": "a"}))
    assert s.checksum() == checksum(s.state) == reference_checksum(s.state)
    assert len(s.checksum()) == 32
    assert int(s.checksum(), 16) >= 0  # hex
    assert encode_state(s.state) == msgspec.msgpack.encode(msgspec.to_builtins(s.state), order="sorted")
    assert state_builtins(s.state) == msgspec.to_builtins(s.state)


def _shuffled(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@given(st.dictionaries(st.text(max_size=5), json_values(), max_size=8), st.randoms(use_true_random=False))
def test_checksum_matches_reference_and_ignores_insertion_order(items: dict[str, Any], rnd: random.Random) -> None:
    state = Bag(items)
    assert checksum(state) == reference_checksum(state)
    assert checksum(Bag(_shuffled(items, rnd))) == checksum(state)


@given(st.lists(json_values(max_leaves=5), max_size=10))
def test_fold_snapshot_fold_equals_fold(datas: list[Any]) -> None:
    spec = StateSpec("bag:*", Bag, snapshot_every=3)
    whole = StreamState(spec, "e1")
    for i, data in enumerate(datas, start=1):
        whole.apply(ev(i, data=data))
    half = len(datas) // 2
    part = StreamState(spec, "e1")
    for i, data in enumerate(datas[:half], start=1):
        part.apply(ev(i, data=data))
    resumed = StreamState.from_snapshot(spec, part.snapshot("bag:1"))
    assert resumed.checksum() == part.checksum()
    for i, data in enumerate(datas[half:], start=half + 1):
        resumed.apply(ev(i, data=data))
    assert resumed.state == whole.state
    assert resumed.offset == whole.offset == len(datas)
    assert resumed.checksum() == whole.checksum()


def test_different_states_have_different_checksums() -> None:
    assert checksum(Counter(1, 2)) != checksum(Counter(2, 1))
    assert checksum(Room()) != checksum(Room({"a": 0}))

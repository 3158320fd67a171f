"""Stream rules: names, resume plans, gap-free delivery, client dedup (rtcore.protocol.streams)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcore.backends.base import Event, StreamInfo
from rtcore.errors import RtcoreError
from rtcore.protocol.frames import Position
from rtcore.protocol.streams import (
    MAX_STREAM_NAME,
    ClientCursor,
    Delivery,
    Phase,
    Plan,
    check_stream,
    matches,
    plan_resume,
)
from rtcore.testing.strategies import stream_names


def ev(offset: int, epoch: str = "e1", stream: str = "room:1") -> Event:
    return Event(stream, epoch, offset, "t", {"n": offset}, ts=0.0)


def offsets(events: list[Event]) -> list[int]:
    return [e.offset for e in events]


# --- check_stream -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "room:7",
        "wallet:alice",
        "a:b",
        "room:7:extra",
        "kind:ünïcødé",
        "k:" + "x" * (MAX_STREAM_NAME - 2),
        "a:b-c_d.e@f",
    ],
)
def test_valid_stream_names(name: str) -> None:
    check_stream(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "room",
        ":7",
        "room:",
        ":",
        "room 7:x",
        "room:7 ",
        "room:*",
        "room:?",
        "room:[a]",
        "room:\n",
        "room:\x00",
        "room:\u200b",  # zero width space: not printable
        "a:\ud800",  # lone surrogate: bad_stream, not UnicodeEncodeError
        "k:" + "x" * (MAX_STREAM_NAME - 1),
        "k:" + "é" * 100,  # 100 characters but 202 bytes
    ],
    ids=repr,
)
def test_invalid_stream_names(name: str) -> None:
    with pytest.raises(RtcoreError) as info:
        check_stream(name)
    assert info.value.code == "bad_stream"
    assert info.value.retryable is False


def test_non_str_stream_name_is_bad_stream() -> None:
    with pytest.raises(RtcoreError) as info:
        check_stream(None)  # type: ignore[arg-type]
    assert info.value.code == "bad_stream"


@given(st.text(max_size=30))
def test_check_stream_raises_only_bad_stream(name: str) -> None:
    try:
        check_stream(name)
    except RtcoreError as exc:
        assert exc.code == "bad_stream"
    else:
        assert ":" in name and len(name.encode()) <= MAX_STREAM_NAME


@given(st.text(max_size=30))
def test_check_stream_answers_the_same_every_time(name: str) -> None:
    """``check_stream`` remembers the names it accepted (a publish checks its stream's name
    every time): asking again answers as the first time, and a refused name is refused
    every time, never remembered.

    Mutation seen caught: remember the name before validating it (``_VALID_NAMES[name] =
    None`` ahead of ``_check_stream``) → the second check of a bad name passes → fails.
    """
    answers = []
    for _ in range(2):
        try:
            check_stream(name)
        except RtcoreError as exc:
            answers.append(exc.code)
        else:
            answers.append("ok")
    assert answers[0] == answers[1]


@given(stream_names())
def test_strategy_stream_names_are_valid(name: str) -> None:
    check_stream(name)


def test_matches_glob() -> None:
    assert matches("room:*", "room:7")
    assert not matches("room:*", "wallet:7")
    assert matches("room:?", "room:7")
    assert not matches("Room:*", "room:7")  # case sensitive


# --- plan_resume ------------------------------------------------------------------


INFO = StreamInfo(epoch="e1", head=50, first=1)
TRIMMED = StreamInfo(epoch="e1", head=50, first=21)
EMPTY = StreamInfo(epoch="e1", head=0, first=1)
ALL_TRIMMED = StreamInfo(epoch="e1", head=50, first=51)


@pytest.mark.parametrize("stateful", [False, True])
def test_rule1_offset_zero_replays_from_the_start_in_any_epoch(stateful: bool) -> None:
    assert plan_resume(Position("e1", 0), INFO, stateful=stateful) == Plan("replay", 0, True)
    assert plan_resume(Position("other", 0), INFO, stateful=stateful) == Plan("replay", 0, True)
    assert plan_resume(Position("other", 0), EMPTY, stateful=stateful) == Plan("replay", 0, True)


def test_rule1_offset_zero_with_trimmed_history_falls_to_rule4() -> None:
    assert plan_resume(Position("e1", 0), TRIMMED, stateful=False) == Plan("live", 50, False)
    assert plan_resume(Position("e1", 0), TRIMMED, stateful=True) == Plan("snapshot", 50, False)
    assert plan_resume(Position("e9", 0), TRIMMED, stateful=True) == Plan("snapshot", 50, False)


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("offset", [20, 21, 35, 49, 50])
def test_rule2_same_epoch_retained_replays(stateful: bool, offset: int) -> None:
    assert plan_resume(Position("e1", offset), TRIMMED, stateful=stateful) == Plan("replay", offset, True)


def test_rule2_boundaries() -> None:
    # first - 1 is fine (the next event is the first retained one) ...
    assert plan_resume(Position("e1", 20), TRIMMED, stateful=False).recovered
    # ... first - 2 is not: event 20 is gone.
    assert plan_resume(Position("e1", 19), TRIMMED, stateful=False) == Plan("live", 50, False)
    # Fully trimmed but caught up: nothing to replay, nothing missed.
    assert plan_resume(Position("e1", 50), ALL_TRIMMED, stateful=False) == Plan("replay", 50, True)
    assert plan_resume(Position("e1", 49), ALL_TRIMMED, stateful=False) == Plan("live", 50, False)


def test_rule3_no_position() -> None:
    assert plan_resume(None, INFO, stateful=False) == Plan("live", 50, False)
    assert plan_resume(None, INFO, stateful=True) == Plan("snapshot", 50, False)
    assert plan_resume(None, EMPTY, stateful=False) == Plan("live", 0, False)


@pytest.mark.parametrize(
    "start",
    [Position("e0", 10), Position("e0", 50), Position("e1", 51), Position("e1", 10**9), Position("e1", 5)],
    ids=["other epoch", "other epoch at head", "beyond head", "far beyond head", "trimmed"],
)
def test_rule5_missed_events(start: Position) -> None:
    assert plan_resume(start, TRIMMED, stateful=False) == Plan("live", 50, False)
    assert plan_resume(start, TRIMMED, stateful=True) == Plan("snapshot", 50, False)


def test_rule4_other_epoch_with_complete_new_history_replays_it_all() -> None:
    full = StreamInfo("e1", 50, 1)
    assert plan_resume(Position("e0", 10), full, stateful=False) == Plan("replay", 0, False)
    assert plan_resume(Position("e0", 99), full, stateful=False) == Plan("replay", 0, False)
    # stateful streams answer with a snapshot instead
    assert plan_resume(Position("e0", 10), full, stateful=True) == Plan("snapshot", 50, False)


@given(
    st.none() | st.builds(Position, st.sampled_from(["e1", "e2"]), st.integers(0, 120)),
    st.integers(0, 100),
    st.integers(0, 101),
    st.booleans(),
)
def test_plan_never_leaves_a_silent_gap(start: Position | None, head: int, first_raw: int, stateful: bool) -> None:
    first = min(first_raw, head + 1) or 1
    info = StreamInfo("e1", head, first)
    plan = plan_resume(start, info, stateful=stateful)
    assert plan.mode in ("replay", "snapshot", "live")
    if plan.mode == "replay" and not plan.recovered:
        # Rule 4: the client's epoch is gone; the whole new history follows.
        assert start is not None and start.epoch != "e1" and not stateful
        assert first == 1 and plan.after == 0
    elif plan.mode == "replay":
        # Everything after `after` is still in the log.
        assert first - 1 <= plan.after <= head
        assert start is not None and plan.after == start.offset
    else:
        assert not plan.recovered
        assert plan.after == head
        assert plan.mode == ("snapshot" if stateful else "live")
    # recovered=True only if the client's position is exactly continued.
    if plan.recovered:
        assert start is not None and (start.epoch == "e1" or start.offset == 0)


# --- Delivery: unit ------------------------------------------------------------------


def test_delivery_catchup_then_live() -> None:
    d = Delivery("e1", 2)
    assert d.phase is Phase.CATCHUP and d.needs_fill
    assert d.live(ev(5)) == []  # buffered while reading history
    assert d.live(ev(6)) == []
    assert offsets(d.history([ev(3), ev(4), ev(5)])) == [3, 4, 5]
    assert offsets(d.history([])) == []
    assert offsets(d.go_live()) == [6]  # 5 was already sent from history
    assert d.phase is Phase.LIVE and not d.needs_fill
    assert offsets(d.live(ev(7))) == [7]
    assert d.live(ev(7)) == []  # duplicate
    assert d.live(ev(3)) == []  # old
    assert d.last == 7


def test_delivery_go_live_with_a_gap_stays_in_catchup() -> None:
    d = Delivery("e1", 0)
    d.live(ev(4))
    assert offsets(d.history([ev(1), ev(2)])) == [1, 2]
    assert d.go_live() == []
    assert d.phase is Phase.CATCHUP and d.needs_fill
    assert offsets(d.history([ev(3)])) == [3]
    assert offsets(d.go_live()) == [4]
    assert d.phase is Phase.LIVE


def test_delivery_live_gap_switches_back_to_catchup() -> None:
    d = Delivery("e1", 0)
    d.go_live()
    assert d.phase is Phase.LIVE
    assert offsets(d.live(ev(1))) == [1]
    assert d.live(ev(3)) == []  # 2 is missing: fill from history
    assert d.needs_fill
    assert d.live(ev(4)) == []
    assert offsets(d.history([ev(2), ev(3), ev(4)])) == [2, 3, 4]
    assert d.go_live() == []
    assert d.phase is Phase.LIVE
    assert offsets(d.live(ev(5))) == [5]


def test_delivery_epoch_change_is_stale() -> None:
    d = Delivery("e1", 0)
    d.go_live()
    d.live(ev(1))
    assert d.live(ev(2, epoch="e2")) == []
    assert d.phase is Phase.STALE
    assert not d.needs_fill
    assert d.live(ev(2)) == []
    assert d.history([ev(2)]) == []
    assert d.go_live() == []
    assert d.phase is Phase.STALE


def test_delivery_epoch_change_in_history_is_stale() -> None:
    d = Delivery("e1", 0)
    d.live(ev(3))
    assert offsets(d.history([ev(1), ev(2, epoch="e2"), ev(3)])) == [1]
    assert d.phase is Phase.STALE
    assert d.go_live() == []


# --- Delivery: property --------------------------------------------------------------


PAGE_SIZES = st.integers(1, 4)


@given(st.data())
def test_delivery_emits_every_offset_once_in_order(data: st.DataObject) -> None:
    """Drive a Delivery the way hub.Tail does, against a lagging, duplicating feed.

    The log grows to ``n`` events. The live feed delivers a subsequence of the
    log in order (it may skip events, as a lagging feed does, and repeat
    them), plus stray re-deliveries of old events. History reads happen after
    ``d.last`` whenever the delivery needs a fill; the read's result is
    applied later, so live events can arrive while it is "in flight".
    """
    n = data.draw(st.integers(0, 25), label="n")
    head = data.draw(st.integers(0, n), label="head at subscribe")
    after = data.draw(st.integers(0, head), label="after")
    feed = data.draw(st.integers(0, head), label="feed position")  # the feed may lag behind the log
    page_size = data.draw(PAGE_SIZES, label="page size")
    log = [ev(i) for i in range(1, n + 1)]
    d = Delivery("e1", after)
    emitted: list[int] = []
    pending: list[Event] | None = None  # a history read in flight

    def finish_read() -> None:
        nonlocal pending
        assert pending is not None
        page, pending = pending, None
        emitted.extend(offsets(d.history(page)))
        if len(page) < page_size:
            emitted.extend(offsets(d.go_live()))

    for _ in range(data.draw(st.integers(0, 80), label="steps")):
        op = data.draw(st.sampled_from(["append", "live", "dup", "stray", "read", "finish"]))
        if op == "append" and head < n:
            head += 1
        elif op == "live" and feed < head:
            feed = data.draw(st.integers(feed + 1, head), label="next live")  # may skip (lag)
            emitted.extend(offsets(d.live(log[feed - 1])))
        elif op == "dup" and feed > 0:
            emitted.extend(offsets(d.live(log[feed - 1])))
        elif op == "stray" and feed > 0:
            old = data.draw(st.integers(1, feed), label="stray")
            emitted.extend(offsets(d.live(log[old - 1])))
        elif op == "read" and d.needs_fill and pending is None:
            pending = log[d.last : min(head, d.last + page_size)]
        elif op == "finish" and pending is not None:
            finish_read()
        assert emitted == list(range(after + 1, after + 1 + len(emitted)))
        assert d.last == after + len(emitted)

    # Eventually the log is complete, the feed delivers the head and fills finish.
    if pending is not None:
        finish_read()
    if n > feed:
        emitted.extend(offsets(d.live(log[n - 1])))
    rounds = 0
    while d.needs_fill:
        pending = log[d.last : min(n, d.last + page_size)]
        finish_read()
        rounds += 1
        assert rounds <= n + 2, "fill made no progress"
    assert d.phase is Phase.LIVE
    assert emitted == list(range(after + 1, n + 1))
    # Nothing more comes out: every further live event is a duplicate.
    for e in log:
        assert d.live(e) == []


@given(st.data())
def test_delivery_stops_after_an_epoch_change(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 15))
    log = [ev(i) for i in range(1, n + 1)]
    new_epoch = [ev(i, epoch="e2") for i in range(1, n + 1)]
    d = Delivery("e1", 0)
    emitted: list[int] = []
    stale_at = data.draw(st.integers(0, 30), label="epoch changes at step")
    fed_new_epoch = False
    for step in range(30):
        source = new_epoch if step >= stale_at else log
        op = data.draw(st.sampled_from(["live", "history", "go_live"]))
        i = data.draw(st.integers(1, n))
        if op == "live":
            fed_new_epoch |= source is new_epoch
            out = d.live(source[i - 1])
        elif op == "history" and d.needs_fill:
            page = source[d.last : d.last + i]
            fed_new_epoch |= source is new_epoch and bool(page)
            out = d.history(page)
        elif op == "go_live" and d.needs_fill:
            out = d.go_live()
        else:
            out = []
        assert (d.phase is Phase.STALE) == fed_new_epoch
        assert all(e.epoch == "e1" for e in out)
        emitted.extend(offsets(out))
        if d.phase is Phase.STALE:
            # Once stale, nothing more is ever emitted.
            for e in log + new_epoch:
                assert d.live(e) == []
            assert d.history(log) == [] and d.go_live() == []
            assert not d.needs_fill
    assert emitted == list(range(1, len(emitted) + 1))


# --- ClientCursor ---------------------------------------------------------------------


def test_client_cursor_dedups() -> None:
    c = ClientCursor()
    assert c.position is None
    assert c.accept("e1", 1)
    assert c.accept("e1", 2)
    assert not c.accept("e1", 2)
    assert not c.accept("e1", 1)
    assert c.accept("e1", 5)  # a gap is not the cursor's business: it is new
    assert c.position == Position("e1", 5)
    assert not c.accept("e1", 3)


def test_client_cursor_new_epoch_is_new() -> None:
    c = ClientCursor("e1", 10)
    assert c.position == Position("e1", 10)
    assert c.accept("e2", 1)
    assert c.position == Position("e2", 1)
    assert not c.accept("e2", 1)


def test_client_cursor_reset() -> None:
    c = ClientCursor("e1", 3)
    c.reset("e1", 40)  # e.g. after a snap at 40
    assert not c.accept("e1", 40)
    assert c.accept("e1", 41)


@given(st.lists(st.tuples(st.sampled_from(["e1", "e2"]), st.integers(1, 20)), max_size=50))
def test_client_cursor_delivers_increasing_offsets_per_epoch(seen: list[tuple[str, int]]) -> None:
    c = ClientCursor()
    delivered: list[tuple[str, int]] = []
    for epoch, offset in seen:
        if c.accept(epoch, offset):
            delivered.append((epoch, offset))
    # Within each run of one epoch, delivered offsets strictly increase.
    for (e1, o1), (e2, o2) in itertools.pairwise(delivered):
        if e1 == e2:
            assert o2 > o1

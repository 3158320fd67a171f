"""Property: every subscriber's application sees every event exactly once, in
offset order, or is told explicitly that it missed events (DESIGN §5, §10).

Hypothesis generates interleavings of publishes to several streams (one plain,
one with short retention, one stateful with short retention), client
disconnects and reconnects — resuming with ``since`` (the client's own
cursor), with no position (a new device: the server cursor of its principal),
or after history was trimmed (so a ``snap`` or ``recovered: false`` is the
only honest answer) — history resets (new epoch), and acks.

Each "application" is a principal whose memory survives reconnects: it folds
what its clients deliver. The check walks its timeline: an event must be the
next offset of the current epoch; a notice (``subbed`` with
``recovered: false`` or a ``snap``) may move it forward (never backwards).
At the end every application must have reached the head of every stream.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from hypothesis import given
from hypothesis import strategies as st

import rtcore
from rtcore.protocol.frames import Position, Snap, Subbed
from rtcore.testing import Client, connect, serve

STREAMS = ["p:1", "t:1", "s:1"]


class Counter(msgspec.Struct):
    """Folds the ``s:*`` streams: the sum and count of published values."""

    total: int = 0
    count: int = 0

    def apply(self, event: rtcore.Event) -> None:
        self.total += event.data["v"]
        self.count += 1


def make_app() -> rtcore.App:
    app = rtcore.App()
    app.retention("t:*", max_events=3)
    app.retention("s:*", max_events=3)
    app.state("s:*", Counter, snapshot_every=2, sync_every=2)

    @app.authenticate
    async def auth(token: str | None) -> str | None:
        return token

    return app


class Application:
    """What one principal's application has seen, across client incarnations."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pos: dict[str, tuple[str, int]] = {}  # stream -> (epoch, last processed offset)
        self.folds: dict[str, Counter] = {}
        self.client: Client | None = None
        self.consumed: dict[int, int] = {}  # id(client) -> frames consumed
        self.errors: list[str] = []

    def consume(self, client: Client) -> None:
        """Process the frames the client delivered since last time."""
        start = self.consumed.get(id(client), 0)
        frames = client.frames[start:]
        self.consumed[id(client)] = len(client.frames)
        for f in frames:
            self._one(f)

    def _one(self, f: Any) -> None:
        if isinstance(f, Subbed) and f.recovered:
            epoch, last = self.pos.get(f.stream, ("", 0))
            if last == 0:  # "from the start": continuity from offset 0 of this epoch
                self.pos[f.stream] = (f.epoch, 0)
        elif isinstance(f, Subbed) and not f.snap:
            self._jump(f.stream, f.epoch, f.offset, None)
        elif isinstance(f, Snap):
            self._jump(f.stream, f.epoch, f.offset, msgspec.convert(f.state, Counter))
        elif isinstance(f, rtcore.protocol.frames.Evt):
            epoch, last = self.pos.get(f.stream, ("", 0))
            if f.epoch == epoch and f.offset <= last:
                return  # the client library's duplicate drop (at-least-once wire)
            if f.epoch != epoch or f.offset != last + 1:
                self.errors.append(f"{self.name} {f.stream}: got {f.epoch}:{f.offset} after {epoch}:{last} without a notice")
                return
            self.pos[f.stream] = (epoch, f.offset)
            if f.stream.startswith("s:"):
                self.folds.setdefault(f.stream, Counter()).apply(
                    rtcore.Event(f.stream, f.epoch, f.offset, f.type, f.data, f.ts)
                )

    def _jump(self, stream: str, epoch: str, offset: int, state: Counter | None) -> None:
        cur_epoch, last = self.pos.get(stream, ("", 0))
        if epoch == cur_epoch and offset < last:
            self.errors.append(f"{self.name} {stream}: notice moved back from {last} to {offset}")
            return
        self.pos[stream] = (epoch, offset)
        if stream.startswith("s:"):
            if state is not None:
                self.folds[stream] = state
            else:
                # recovered:false on a stateful stream would leave the fold unknown.
                self.folds.pop(stream, None)

    def since(self, stream: str) -> Position:
        epoch, last = self.pos.get(stream, ("", 0))
        return Position(epoch, last)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(STREAMS), st.integers(1, 4)),
        st.tuples(st.just("drop"), st.integers(0, 1)),
        st.tuples(st.just("resume_since"), st.integers(0, 1)),
        st.tuples(st.just("resume_cursor"), st.integers(0, 1)),
        st.tuples(st.just("ack"), st.integers(0, 1)),
        st.tuples(st.just("settle")),
        st.tuples(st.just("reset")),
    ),
    max_size=25,
)


async def _caught_up(node: rtcore.Node, apps: list[Application]) -> None:
    with anyio.fail_after(5):
        while True:
            done = True
            for a in apps:
                if a.client is None or a.client.closed is not None:
                    continue
                a.consume(a.client)
                for s in STREAMS:
                    info = await node.backend.events.info(s)
                    # an empty new epoch (after a reset) is invisible until its first event
                    if a.pos.get(s, ("", 0)) != (info.epoch, info.head) and info.head > 0:
                        done = False
            if done:
                return
            await anyio.sleep(0.001)


async def _run(program: list[tuple[Any, ...]], encoding: str) -> None:
    app = make_app()
    async with serve(app) as node:
        apps = [Application("alice"), Application("bob")]
        values: dict[str, int] = {}
        stack: list[Any] = []

        async def open_client(a: Application, use_since: bool) -> None:
            cm = connect(node, token=a.name, encoding=encoding)
            client = await cm.__aenter__()
            stack.append(cm)
            a.client = client
            for s in STREAMS:
                await client.subscribe(s, a.since(s) if use_since else None)

        for a in apps:
            await open_client(a, use_since=True)
        try:
            for op in program:
                match op:
                    case ("publish", stream, n):
                        for _ in range(n):
                            values[stream] = values.get(stream, 0) + 1
                            await node.publish(stream, "v", {"v": values[stream]})
                    case ("drop", i):
                        a = apps[i]
                        if a.client is not None:
                            a.consume(a.client)
                            await a.client.disconnect()
                            a.client = None
                    case ("resume_since", i):
                        a = apps[i]
                        if a.client is None:
                            await open_client(a, use_since=True)
                    case ("resume_cursor", i):
                        a = apps[i]
                        if a.client is None:
                            await open_client(a, use_since=False)
                    case ("ack", i):
                        a = apps[i]
                        if a.client is not None:
                            # ack exactly what the application processed; the pong
                            # proves the server stored it (acks are stored in order)
                            a.consume(a.client)
                            for s in STREAMS:
                                epoch, off = a.pos.get(s, ("", 0))
                                cur = a.client.cursors.get(s)
                                if off and cur is not None and cur.epoch == epoch:
                                    await a.client.ack(s, off)
                            await a.client.ping()
                    case ("settle",):
                        await _caught_up(node, apps)
                    case ("reset",):
                        node.backend.events.reset()  # type: ignore[attr-defined]
                        values.clear()
            # the end: everyone comes back (with their own positions) and catches up
            for a in apps:
                if a.client is None:
                    await open_client(a, use_since=True)
            # a publish after a reset makes the new epoch visible to live tails
            for s in STREAMS:
                values[s] = values.get(s, 0) + 1
                await node.publish(s, "v", {"v": values[s]})
            await _caught_up(node, apps)
            for a in apps:
                assert a.errors == [], a.errors
                for s in STREAMS:
                    info = await node.backend.events.info(s)
                    assert a.pos[s] == (info.epoch, info.head)
                fold = a.folds.get("s:1")
                if fold is not None:
                    server = await node.state_of("s:1")
                    assert (fold.total, fold.count) == (server.state.total, server.state.count)
        finally:
            for cm in reversed(stack):
                await cm.__aexit__(None, None, None)


@given(program=ops, encoding=st.sampled_from(["json", "msgpack"]))
def test_every_event_exactly_once_or_told(program: list[tuple[Any, ...]], encoding: str) -> None:
    anyio.run(_run, program, encoding)


def test_resume_after_trim_gets_snapshot_for_stateful_and_notice_for_plain() -> None:
    """A deterministic walk through the trimmed-history cases."""

    async def main() -> None:
        app = make_app()
        async with serve(app) as node:
            async with connect(node, token="alice") as c:
                sub = await c.subscribe("s:1", Position("", 0))
                await c.subscribe("t:1", Position("", 0))
                assert sub.recovered
                for i in range(2):
                    await node.publish("s:1", "v", {"v": i + 1})
                    await node.publish("t:1", "v", {"v": i + 1})
                for _ in range(4):
                    await c.next_event()
                since_s, since_t = c.cursors["s:1"].position, c.cursors["t:1"].position
            for i in range(2, 10):
                await node.publish("s:1", "v", {"v": i + 1})
                await node.publish("t:1", "v", {"v": i + 1})
            async with connect(node, token="alice") as c2:
                s_sub = await c2.subscribe("s:1", since_s)
                t_sub = await c2.subscribe("t:1", since_t)
                assert not s_sub.recovered and not t_sub.recovered
                snap = await c2.next_frame(types=(Snap,))
                assert snap.offset == 10 and snap.state == {"total": 55, "count": 10}
                assert t_sub.offset == 10
                assert snap.checksum == (await node.state_of("s:1")).checksum()

    anyio.run(main)

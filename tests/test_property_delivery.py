"""Property: every application sees every event exactly once, in offset order,
or is told explicitly that it missed events — through the SHIPPED client.

The clients are :class:`rtcore.testing.TestClient`, thin drivers of
:class:`rtcore.protocol.client.ClientSession` (the same session
:mod:`rtcore.client` drives), talking to a real node through the real gateway
(:func:`rtcore.server.gateway.serve_session`). Nothing in this test filters
duplicates: what an application sees is exactly the session's output
(``TestClient.timeline``).

Hypothesis generates interleavings of publishes to three streams (plain;
short retention; stateful with short retention), reconnects of a client
(the session resumes every stream from its position) over a connection with
faults (cut / drop / duplicate / delay frames, :class:`rtcore.testing.Faults`),
a device going away and a new one resuming from the application's own
positions (``since``), a brand-new device (no position: it must get the
current state), and history resets (new epoch).

Two checks:

(a) Application: walking its timeline, an event is always the next offset of
    the current epoch; a ``Missed`` notice may move it forward, never back. At
    the end every application is at the head of every stream, and its fold of
    the stateful stream equals the server's.
(b) Wire: within one connection the server never sends an offset of a stream
    twice or out of order, and never skips one (recorded before fault
    injection, so a server bug is not hidden by the client's dedup).

Mutations verified (each makes ``test_every_event_exactly_once_or_told`` fail):

- server/gateway.py ``emit`` pushes every live event twice → (b) "sent twice".
- ``emit`` skips one event (offset 3) → (b) "4 when 3 was next (skipped)".
- ``emit`` swaps two consecutive events (holds 2, sends it after 3) → (b)
  "3 when 2 was next".
- ClientSession drops no duplicates (``ClientCursor.accept`` → always True in
  ``_on_evt``) → (a) with the ``duplicate`` fault.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

import rtcore
from rtcore.protocol.client import Missed
from rtcore.protocol.codec import codec_for
from rtcore.protocol.frames import Evt, Position, Snap, Subbed
from rtcore.testing import Faults, TestClient, connect, serve

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
        self.client: TestClient | None = None
        self.taken = 0  # items of client.timeline processed
        self.errors: list[str] = []

    def attach(self, client: TestClient) -> None:
        self.client, self.taken = client, 0

    def consume(self) -> None:
        """Process what the client handed out since last time (its timeline, as is)."""
        if self.client is None:
            return
        items = self.client.timeline[self.taken :]
        self.taken += len(items)
        for item in items:
            if isinstance(item, Missed):
                self._missed(item)
            else:
                self._event(item)

    def _event(self, e: Evt) -> None:
        if e.stream not in self.pos:
            # A device with no position that got no notice: a stateless stream,
            # live from the head (the wire check covers the server's side).
            self.pos[e.stream] = (e.epoch, e.offset - 1)
        epoch, last = self.pos[e.stream]
        if last == 0 and e.offset == 1:
            epoch = e.epoch  # "I have nothing": offset 1 of any epoch continues it (protocol §7 rule 1)
        if e.epoch != epoch or e.offset != last + 1:
            self.errors.append(f"{self.name} {e.stream}: got {e.epoch}:{e.offset} after {epoch}:{last} without a notice")
            return
        self.pos[e.stream] = (epoch, e.offset)
        if e.stream.startswith("s:"):
            fold = self.folds.get(e.stream)
            if fold is None:
                self.errors.append(f"{self.name} {e.stream}: an event of a stateful stream before its state")
                return
            fold.apply(rtcore.Event(e.stream, e.epoch, e.offset, e.type, e.data, e.ts))

    def _missed(self, m: Missed) -> None:
        epoch, last = self.pos.get(m.stream, ("", 0))
        if m.epoch == epoch and m.offset < last:
            self.errors.append(f"{self.name} {m.stream}: notice moved back from {last} to {m.offset}")
            return
        self.pos[m.stream] = (m.epoch, m.offset)
        if m.stream.startswith("s:"):
            if m.state is not None:
                self.folds[m.stream] = msgspec.convert(m.state, Counter)
            else:
                self.errors.append(f"{self.name} {m.stream}: a stateful stream jumped without its state")

    def since(self, stream: str) -> Position | None:
        if stream not in self.pos:
            return None
        return Position(*self.pos[stream])

    def forget(self) -> None:
        """A brand-new device: nothing of the old application survives."""
        self.pos.clear()
        self.folds.clear()


def check_wire(client: TestClient, encoding: str) -> list[str]:
    """(b): per connection and stream, offsets strictly increasing, none skipped."""
    codec = codec_for(encoding)
    errors: list[str] = []
    for n, sent in enumerate(client.wire):
        nxt: dict[str, tuple[str, int | None]] = {}  # stream -> (epoch, next offset or None: unknown)
        seen: set[tuple[str, str, int]] = set()
        for data in sent:
            f = codec.decode_server(data)
            if isinstance(f, Subbed):
                # recovered: a replay from the client's since follows; else events after offset
                nxt[f.stream] = (f.epoch, None if f.recovered or f.snap else f.offset + 1)
            elif isinstance(f, Snap):
                nxt[f.stream] = (f.epoch, f.offset + 1)
            elif isinstance(f, Evt):
                key = (f.stream, f.epoch, f.offset)
                if key in seen:
                    errors.append(f"connection {n}: {f.stream} {f.epoch}:{f.offset} sent twice")
                seen.add(key)
                epoch, want = nxt.get(f.stream, (f.epoch, None))
                if epoch == f.epoch and want is not None and f.offset != want:
                    kind = "skipped" if f.offset > want else "out of order"
                    errors.append(f"connection {n}: {f.stream} {f.epoch}:{f.offset} when {want} was next ({kind})")
                nxt[f.stream] = (f.epoch, f.offset + 1)
    return errors


faults = st.one_of(
    st.builds(Faults, cut_after=st.integers(1, 12)),
    st.builds(Faults, drop=st.frozensets(st.integers(1, 12), min_size=1, max_size=3)),
    st.builds(
        Faults,
        duplicate=st.one_of(st.frozensets(st.integers(0, 12), min_size=1, max_size=4), st.just(frozenset(range(40)))),
    ),
    st.builds(Faults, delay=st.just(0.001)),
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(STREAMS), st.integers(1, 4)),
        # events flow over a connection with faults (publishes while it is up)
        st.tuples(st.just("reconnect"), st.integers(0, 1), faults, st.integers(1, 4)),
        st.tuples(st.just("away"), st.integers(0, 1)),
        # a device resumes; the replay may be duplicated on the wire
        st.tuples(st.just("resume"), st.integers(0, 1), st.sampled_from([None, Faults(duplicate=frozenset(range(12)))])),
        st.tuples(st.just("new_device"), st.integers(0, 1)),
        st.tuples(st.just("settle")),
        st.tuples(st.just("reset")),
    ),
    max_size=20,
)


async def _heal(a: Application) -> None:
    """Reconnect a's client without faults if its connection ended or a ``subbed`` was lost."""
    c = a.client
    if c is None:
        return
    if c.closed is not None or not all(c.session.live(s) for s in c.session.streams):
        c.faults = None
        await c.reconnect()


async def _caught_up(node: rtcore.Node, apps: list[Application]) -> None:
    for a in apps:
        await _heal(a)
    with anyio.fail_after(10):
        while True:
            done = True
            for a in apps:
                if a.client is None:
                    continue
                await _heal(a)
                a.consume()
                assert a.errors == [], a.errors  # (a) fails here, not as a timeout
                for s in STREAMS:
                    if s not in a.pos:
                        continue  # a new device, live from the head of a plain stream: nothing to catch up yet
                    info = await node.backend.events.info(s)
                    # an empty new epoch (after a reset) is invisible until its first event
                    if a.pos[s] != (info.epoch, info.head) and info.head > 0:
                        done = False
            if done:
                return
            # A ping round trip lets the gateway, the tails and the client run.
            for a in apps:
                if a.client is not None and a.client.closed is None:
                    await a.client.ping()
            await anyio.lowlevel.checkpoint()  # progress even when every client is away


async def _run(program: list[tuple[Any, ...]], encoding: str) -> None:
    app = make_app()
    async with serve(app) as node:
        apps = [Application("alice"), Application("bob")]
        values: dict[str, int] = {}
        clients: list[TestClient] = []
        stack: list[Any] = []
        faulted: set[int] = set()

        async def open_client(a: Application, fault: Faults | None = None) -> None:
            cm = connect(node, token=a.name, encoding=encoding, faults=fault)
            client = await cm.__aenter__()
            client.faults = None  # only the first connection is faulty
            stack.append(cm)
            clients.append(client)
            a.attach(client)
            for s in STREAMS:
                await client.subscribe(s, a.since(s))

        async def away(a: Application) -> None:
            if a.client is not None:
                a.consume()
                await a.client.disconnect()
                a.client = None

        for a in apps:
            await open_client(a)
        try:
            for op in program:
                match op:
                    case ("publish", stream, n):
                        for _ in range(n):
                            values[stream] = values.get(stream, 0) + 1
                            await node.publish(stream, "v", {"v": values[stream]})
                    case ("reconnect", i, fault, n):
                        a = apps[i]
                        if a.client is not None:
                            a.client.faults = fault
                            await a.client.reconnect(wait=False)
                            a.client.faults = None  # only this connection is faulty
                            faulted.add(id(a.client))
                            for _ in range(n):
                                for stream in STREAMS:
                                    values[stream] = values.get(stream, 0) + 1
                                    await node.publish(stream, "v", {"v": values[stream]})
                    case ("away", i):
                        await away(apps[i])
                    case ("resume", i, fault):
                        if apps[i].client is None:
                            await open_client(apps[i], fault)
                    case ("new_device", i):
                        await away(apps[i])
                        apps[i].forget()
                        await open_client(apps[i])
                    case ("settle",):
                        for a in apps:
                            if a.client is not None and id(a.client) in faulted:
                                a.client.faults = None
                                await a.client.reconnect()
                                faulted.discard(id(a.client))
                        await _caught_up(node, apps)
                    case ("reset",):
                        node.backend.events.reset()  # type: ignore[attr-defined]
                        values.clear()
            # the end: everyone comes back (with their own positions) over a clean
            # connection, and catches up
            for a in apps:
                if a.client is None:
                    await open_client(a)
                elif id(a.client) in faulted:
                    await a.client.reconnect()
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
                fold = a.folds["s:1"]
                server = await node.state_of("s:1")
                assert (fold.total, fold.count) == (server.state.total, server.state.count)
            for c in clients:
                assert check_wire(c, encoding) == []
        finally:
            for cm in reversed(stack):
                await cm.__aexit__(None, None, None)


@settings(max_examples=100, deadline=None)
@given(program=ops, encoding=st.sampled_from(["json", "msgpack"]))
def test_every_event_exactly_once_or_told(program: list[tuple[Any, ...]], encoding: str) -> None:
    anyio.run(_run, program, encoding)


def test_duplicate_fault_is_absorbed_by_the_session_not_hidden_from_the_wire_check() -> None:
    """Deterministic: a connection that duplicates frames still gives each event once.

    Mutation: ClientSession._on_evt delivers without ``cursor.accept`` → the
    timeline has offset 2 twice → fails.
    """

    async def main() -> None:
        async with serve(make_app()) as node, connect(node, token="alice") as c:
            await c.subscribe("p:1", Position("", 0))
            c.faults = Faults(duplicate=frozenset(range(1, 8)))
            await c.reconnect()
            c.faults = None
            for v in range(1, 5):
                await node.publish("p:1", "v", {"v": v})
            with anyio.fail_after(5):
                while len(c.seen["p:1"]) < 4:
                    await c.next_frame()
            assert [e.offset for e in c.timeline if isinstance(e, Evt)] == [1, 2, 3, 4]
            assert len([f for f in c.frames if isinstance(f, Evt)]) > 4  # the wire did duplicate
            assert check_wire(c, "json") == []  # the server did not

    anyio.run(main)


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
                assert sorted((m.stream, m.offset, m.state is not None) for m in c2.notices) == [
                    ("s:1", 10, True),
                    ("t:1", 10, False),
                ]

    anyio.run(main)

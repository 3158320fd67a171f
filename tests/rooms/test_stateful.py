"""A Hypothesis state machine drives one room through random creates, joins,
leaves, drops, reconnects (within and past the grace), messages, ticks and
timer fires, on a :class:`~rtcore.testing.FakeClock`, against a model.

After every step: every connected client's document (snapshot + patches
folded with the generic patch code) equals the owner's document, whose
checksum equals the node's fold of ``room:{id}``; presence (members, seats,
who is connected) and the hook log match the model.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtcore.protocol.frames import Ok, Position
from rtcore.protocol.state import checksum
from rtcore.testing import FakeClock, TestClient, connect, serve

from .roomapp import DISPOSE, GRACE, caught_up, make_app

USERS = ["u0", "u1", "u2", "u3"]
SEATS = 3


class RoomMachine(RuleBasedStateMachine):
    """Mutations this catches (each tried by hand): never record drops (presence
    wrong → fails); let the grace keep a seat forever (members wrong after
    ``advance`` → fails); diff every patch against the first document instead of
    the last published one (the folded checksum differs → fails); let
    ``_Actor._members_doc`` keep the first members map it built (seats change,
    the patch does not say so → fails)."""

    def __init__(self) -> None:
        super().__init__()
        self._stack = contextlib.ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self.clock = FakeClock()
        self.app, self.reg = make_app(tick_rate=1.0, max_clients=SEATS)
        self.node = self._stack.enter_context(self.portal.wrap_async_context_manager(serve(self.app, clock=self.clock)))
        self.clients: dict[str, TestClient] = {}
        self._client_cms: dict[str, Any] = {}
        # the model
        self.room: str | None = None
        self.members: dict[str, bool] = {}  # user -> connected
        self.grace: dict[str, tuple[float, int]] = {}  # user -> (deadline, order)
        self.dispose_at: float | None = None
        self.counter = 0
        self.log: list[str] = []
        self.seq = 0

    def teardown(self) -> None:
        for uid in list(self._client_cms):
            self._close(uid)
        self._stack.close()

    # --- helpers ---------------------------------------------------------------------

    def _client(self, uid: str) -> TestClient:
        if uid not in self.clients:
            cm = self.portal.wrap_async_context_manager(connect(self.node, uid))
            self.clients[uid] = cm.__enter__()
            self._client_cms[uid] = cm
        return self.clients[uid]

    def _close(self, uid: str) -> None:
        cm = self._client_cms.pop(uid)
        self.clients.pop(uid)
        cm.__exit__(None, None, None)

    def _cmd(self, uid: str, name: str, args: Any) -> Any:
        client = self._client(uid)
        return self.portal.call(lambda: client.command_reply(name, args))

    def _settle(self) -> None:
        if self.room is not None:
            self.portal.call(self.reg.settle, self.node, self.room)

    def _subscribe(self, uid: str) -> None:
        client = self.clients[uid]
        stream = f"room:{self.room}"
        if stream not in client.session.streams:
            self.portal.call(lambda: client.subscribe(stream, Position("", 0)))

    def _now(self) -> float:
        return self.clock.now

    def _emptied(self) -> None:
        if not self.members:
            self.dispose_at = self._now() + DISPOSE

    # --- rules --------------------------------------------------------------------------

    @precondition(lambda self: self.room is None)
    @rule(uid=st.sampled_from(USERS), interval=st.sampled_from([None, 2.5]))
    def create(self, uid: str, interval: float | None) -> None:
        reply = self._cmd(uid, "room.create", {"type": "game", "options": {"interval": interval}})
        assert isinstance(reply, Ok), reply
        self.room = reply.result["room_id"]
        self.members = {uid: True}
        self.grace, self.dispose_at, self.counter = {}, None, 0
        self.log = ["create", f"join:{uid}"]
        self._subscribe(uid)

    @precondition(lambda self: self.room is not None)
    @rule(uid=st.sampled_from(USERS))
    def join(self, uid: str) -> None:
        reply = self._cmd(uid, "room.join", {"room_id": self.room})
        if uid in self.members:
            assert isinstance(reply, Ok), reply
            assert reply.result["reconnected"] is (not self.members[uid])
            if not self.members[uid]:
                self.members[uid] = True
                del self.grace[uid]
                self.log.append(f"reconnect:{uid}")
        elif len(self.members) >= SEATS:
            assert reply.code == "room_full", reply
            return
        else:
            assert isinstance(reply, Ok), reply
            self.members[uid] = True
            self.dispose_at = None
            self.log.append(f"join:{uid}")
        self._subscribe(uid)

    @precondition(lambda self: self.room is not None)
    @rule(uid=st.sampled_from(USERS))
    def leave(self, uid: str) -> None:
        reply = self._cmd(uid, "room.leave", {"room_id": self.room})
        if uid not in self.members:
            assert reply.code == "not_in_room", reply
            return
        assert isinstance(reply, Ok), reply
        del self.members[uid]
        self.grace.pop(uid, None)
        self.log.append(f"leave:{uid}:True")
        self._emptied()

    @precondition(lambda self: self.room is not None)
    @rule(uid=st.sampled_from(USERS), by=st.integers(-3, 3))
    def add(self, uid: str, by: int) -> None:
        reply = self._cmd(uid, "room.send", {"room_id": self.room, "type": "add", "data": {"by": by}})
        if uid not in self.members:
            assert reply.code == "not_in_room", reply
            return
        if not self.members[uid]:
            self.members[uid] = True
            del self.grace[uid]
            self.log.append(f"reconnect:{uid}")
        self.counter += by
        assert isinstance(reply, Ok) and reply.result == self.counter, reply
        self._subscribe(uid)

    @precondition(lambda self: bool(self.clients))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.clients)))
        self._close(uid)
        if self.members.get(uid):
            self.members[uid] = False
            self.seq += 1
            self.grace[uid] = (self._now() + GRACE, self.seq)
            self.log.append(f"drop:{uid}")
            actor = self.reg.runtime(self.node).actors[self.room]

            async def dropped() -> None:
                with anyio.fail_after(5):
                    while actor.members[uid].connected:
                        await anyio.sleep(0.005)

            self.portal.call(dropped)

    @precondition(lambda self: self.room is not None)
    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 7.0, 11.0]))
    def advance(self, seconds: float) -> None:
        # Keep the sessions alive (the server's idle timeout runs on this clock too):
        # a client that goes quiet for 45 s is closed, which is a real drop.
        for client in self.clients.values():
            self.portal.call(client.ping)
        self.clock.advance(seconds)
        now = self._now()
        if self.dispose_at is not None and self.dispose_at <= now:
            self._disposed()
            return
        for uid, _ in sorted(self.grace.items(), key=lambda kv: kv[1]):
            if self.grace[uid][0] <= now:
                del self.grace[uid]
                del self.members[uid]
                self.log.append(f"leave:{uid}:False")
                self._emptied()

    def _disposed(self) -> None:
        self._settle()
        assert self.room not in self.reg.runtime(self.node).actors
        for uid in list(self.clients):
            reply = self._cmd(uid, "room.join", {"room_id": self.room})
            assert reply.code == "room_not_found", reply
            break
        self.room = None
        self.members, self.grace, self.dispose_at = {}, {}, None

    # --- checks -------------------------------------------------------------------------

    @invariant()
    def clients_hold_the_servers_document(self) -> None:
        if self.room is None:
            return
        self._settle()
        actor = self.reg.runtime(self.node).actors[self.room]
        server = actor.prev
        assert {u: m["connected"] for u, m in server["members"].items()} == self.members
        assert len(server["members"]) <= SEATS
        assert server["state"]["log"] == self.log
        assert server["state"]["counter"] == self.counter
        stream = f"room:{self.room}"

        async def folded() -> str:
            st_ = await self.node.state_of(stream)
            with anyio.fail_after(5):
                while st_.offset < actor.head:
                    await anyio.sleep(0.005)
            return st_.checksum()

        assert self.portal.call(folded) == checksum(server)
        for uid, client in self.clients.items():
            if stream in client.session.streams:
                doc = self.portal.call(caught_up, client, stream, actor.head)
                assert doc == server, uid


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_room_state_machine() -> None:
    RoomMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
    RoomMachine.TestCase().runTest()

"""Autobahn echo server: :class:`rtcore.Server` as ``rtcore serve`` runs it, echoing.

Run by ``tests/autobahn/test_autobahn.py`` (kosoku, the Autobahn TestSuite's
fuzzing client, drives it); it can also be started by hand to run a subset::

    python tests/autobahn/echo_server.py --port 9001 &
    kosoku -i '9.*' ws://127.0.0.1:9001/v1/ws

What runs is the shipped server, unchanged: the listener, the HTTP layer and
handshake at ``/v1/ws`` with the default :class:`~rtcore.transport.WebSocketPolicy`
(no permessage-deflate), :class:`~rtcore.transport.WebSocketTransport`, and the
gateway's session driver (:func:`rtcore.server.gateway.serve_session`) whose
outbox and writer write every frame: the asyncio fast path that batches a
loop tick's frames into one ``send_nowait`` and the writer task's ``send``,
and the gateway's close.

The one test-only hook, and why: rtcore speaks its JSON protocol over the
socket, while Autobahn needs every message echoed byte for byte with its own
opcode. :class:`EchoAdapter` sits between the WebSocket transport and the
gateway and turns each Autobahn message into an rtcore ``ping`` frame (the
session answers each ``ping`` at once with a ``pong``, in order, unthrottled),
then, on the way out, puts the message back in place of its ``pong`` and hands
the batch, exactly as the gateway batched it, to the transport's own
``send_nowait``/``send``. It also says ``hello`` for the client and drops the
``welcome``. A binary message is written by the same ``send`` with the binary
opcode (the transport's opcode is per connection: text for a JSON session).
Anything else the session would send (``err``, ``bye``) is a bug here and
fails the connection with a logged traceback, which the test reports.

Two private names are touched, both checked at start so a rename fails
loudly rather than silently testing something else: ``Server._on_websocket``
(overridden to wrap the transport; the override is the same ``serve_session``
call) and ``WebSocketTransport._opcode`` (set per write).

Limits differ from :class:`~rtcore.transport.ServerLimits`' defaults only
where Autobahn's cases need it:

* ``max_message_bytes`` = 16 MiB: cases 9.1.6/9.2.6 send 16 MiB messages.
* ``max_fragments`` = 65,536: cases 9.3.1/9.4.1 send 4 MiB in 64-byte fragments.
* ``ping_interval=None``: Autobahn counts an unsolicited ping as an unexpected
  event (tried: server pings every 20 ms fail 1.x/5.x/9.x cases).

And one session limit, ``Limits.idle_timeout`` = 1 h instead of 45 s: the
client sends no rtcore ``ping`` frames (an rtcore client must, every
``heartbeat`` seconds), and a compression case that waits longer than 45 s for
its echoes (it happened under CPU load: the server's deflate is slow) was cut
with ``bye idle_timeout``.

permessage-deflate is off by default, so cases 12.x/13.x (compression) find
it declined; ``--deflate`` switches on ``WebSocketPolicy.permessage_deflate``
and nothing else, for those cases.

The outbox counts the ``pong`` frames, not the echoed payloads, so the slow
consumer cut (4 MiB queued) cannot trigger here; it has its own tests.

Usage: ``python tests/autobahn/echo_server.py [--host H] [--port P] [--deflate]``; prints
``LISTENING <port>`` once bound, stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

import rtcore
from rtcore.server.gateway import serve_session
from rtcore.transport import ConnectionClosed, FrameTransport, ServerLimits, UpgradeRequest, WebSocketTransport
from rtcore.transport.wsframes import OP_BINARY, OP_TEXT

MiB = 1024 * 1024

AUTOBAHN_LIMITS = ServerLimits(max_message_bytes=16 * MiB, max_fragments=65_536, ping_interval=None)
#: Autobahn's client sends no rtcore heartbeat: the session must not call it idle.
AUTOBAHN_SESSION = rtcore.Limits(idle_timeout=3600.0)

_HELLO = '{"t":"hello","v":1}'

#: Batches of echoes written by each path: the gateway's asyncio fast path
#: (``send_nowait`` from its end-of-tick flush) and its writer task (``send``).
#: Printed at exit (``WRITES nowait=N send=M``) so the test can check both ran.
WRITES = {"nowait": 0, "send": 0}
_decode = msgspec.json.Decoder(dict[str, Any]).decode


class EchoAdapter:
    """A :class:`FrameTransport` that turns an echo into rtcore ``ping``/``pong``.

    Args:
        ws: The connection's real WebSocket transport (JSON encoding: Autobahn
            offers no subprotocol).
    """

    def __init__(self, ws: WebSocketTransport) -> None:
        if ws.encoding != "json" or not isinstance(getattr(ws, "_opcode", None), int):
            raise RuntimeError("EchoAdapter expects a JSON WebSocketTransport with a per-connection _opcode")
        self._ws = ws
        self.encoding = "json"
        self._said_hello = False
        self._welcomed = anyio.Event()
        self._messages: dict[int, bytes | str] = {}
        self._ids = 0
        # The gateway uses its asyncio fast path exactly when the transport offers it.
        self.call_soon: Callable[..., Any] | None = ws.call_soon

    async def receive(self) -> bytes | str:
        if not self._said_hello:
            self._said_hello = True
            return _HELLO
        await self._welcomed.wait()  # frames before welcome would be protocol violations
        message = await self._ws.receive()
        self._ids += 1
        self._messages[self._ids] = message
        return f'{{"t":"ping","id":{self._ids}}}'

    def _echoes(self, frames: list[bytes]) -> list[bytes | str]:
        """The Autobahn messages the session's frames stand for, in order."""
        out: list[bytes | str] = []
        for data in frames:
            frame = _decode(data)
            if frame["t"] == "welcome":
                self._welcomed.set()
            elif frame["t"] == "pong":
                out.append(self._messages.pop(frame["id"]))
            else:
                raise AssertionError(f"the session sent {data!r} to an echo client")
        return out

    def _runs(self, messages: list[bytes | str]) -> list[tuple[int, list[bytes]]]:
        """Consecutive messages of one kind: (opcode, payloads)."""
        runs: list[tuple[int, list[bytes]]] = []
        for m in messages:
            opcode, payload = (OP_TEXT, m.encode("utf-8")) if isinstance(m, str) else (OP_BINARY, m)
            if runs and runs[-1][0] == opcode:
                runs[-1][1].append(payload)
            else:
                runs.append((opcode, [payload]))
        return runs

    def send_nowait(self, frames: list[bytes]) -> bool:
        runs = self._runs(self._peek(frames))
        if len(runs) > 1:
            return False  # mixed kinds need two writes: the writer task's job
        if runs:
            self._ws._opcode = runs[0][0]
            if not self._ws.send_nowait(runs[0][1]):
                return False
            WRITES["nowait"] += 1
        self._echoes(frames)  # sent: now consume the messages
        return True

    def _peek(self, frames: list[bytes]) -> list[bytes | str]:
        out: list[bytes | str] = []
        for data in frames:
            frame = _decode(data)
            if frame["t"] == "pong":
                out.append(self._messages[frame["id"]])
            elif frame["t"] != "welcome":
                raise AssertionError(f"the session sent {data!r} to an echo client")
        return out

    async def send(self, frames: list[bytes]) -> None:
        for opcode, payloads in self._runs(self._echoes(frames)):
            self._ws._opcode = opcode
            WRITES["send"] += 1
            await self._ws.send(payloads)

    async def close(self, code: int, reason: str = "") -> None:
        await self._ws.close(code, reason)


if not callable(getattr(rtcore.Server, "_on_websocket", None)):
    raise RuntimeError("rtcore.Server._on_websocket is gone: update AutobahnServer to wrap the transport again")


class AutobahnServer(rtcore.Server):
    """:class:`rtcore.Server` whose WebSocket sessions talk to an :class:`EchoAdapter`."""

    async def _on_websocket(self, transport: FrameTransport, request: UpgradeRequest) -> None:
        assert self.node is not None and isinstance(transport, WebSocketTransport)
        with contextlib.suppress(ConnectionClosed):
            await serve_session(
                self.node, EchoAdapter(transport), token=request.token, hello_timeout=self.limits.handshake_timeout
            )


async def main(host: str, port: int, deflate: bool) -> None:
    server = AutobahnServer(
        rtcore.App("autobahn-echo"), host=host, port=port, limits=AUTOBAHN_LIMITS, session_limits=AUTOBAHN_SESSION
    )
    if deflate:
        server.policy = dataclasses.replace(server.policy, permessage_deflate=True)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(server.serve)
            print(f"LISTENING {bound}", flush=True)
            async for _ in signals:
                await server.stop(grace=0.0)
                break
    print(f"WRITES nowait={WRITES['nowait']} send={WRITES['send']}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--deflate", action="store_true", help="negotiate permessage-deflate (cases 12.x/13.x)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    anyio.run(main, args.host, args.port, args.deflate)

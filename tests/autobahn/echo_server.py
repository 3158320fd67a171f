"""Echo server for the Autobahn TestSuite (run by ``tests/autobahn/run.sh``).

It serves the *same* code as ``/v1/ws`` (:func:`rtcore.transport.serve`, the same
HTTP layer, handshake, :class:`~rtcore.transport.WebSocketTransport`, reader,
limits machinery) with an echo handler: every message goes back with its own
opcode (text as text, binary as binary), through the transport's one-write
fast path.

What differs from the defaults, and why (Autobahn's needs, nothing else):

* ``max_message_bytes`` = 32 MiB: cases 9.1.x/9.2.x send messages up to 16 MiB.
* ``max_fragments`` = 2**20: cases 9.3.x/9.4.x send 4 MiB in 64-byte fragments
  (65,536 of them).
* ``WebSocketPolicy(paths=None)``: the fuzzing client connects to ``/`` and
  other paths; it offers no subprotocol, so the transport speaks the default.
* ``permessage_deflate=True`` unless ``--no-deflate``: exercises the bounded
  inflater in cases 12.x/13.x (cases 1-10 offer no extension, so they run on
  the uncompressed fast path either way).
* pings disabled: Autobahn does not expect unsolicited pings.

Usage: ``python tests/autobahn/echo_server.py [--host H] [--port P] [--no-deflate]``;
it prints ``LISTENING <port>`` once bound.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import anyio

from rtcore.transport import (
    ConnectionClosed,
    FrameTransport,
    HttpRequest,
    HttpResponse,
    ServerControl,
    ServerLimits,
    StreamingResponse,
    UpgradeRequest,
    WebSocketPolicy,
    WebSocketTransport,
    error_response,
    serve,
)

AUTOBAHN_LIMITS = ServerLimits(
    max_message_bytes=32 * 1024 * 1024,
    max_fragments=2**20,
    ping_interval=None,
    close_timeout=5.0,
)


async def echo(transport: FrameTransport, request: UpgradeRequest) -> None:
    """Echo every message back with its own opcode until the peer closes."""
    assert isinstance(transport, WebSocketTransport)
    try:
        while True:
            message = await transport.receive()
            await transport.send_messages([message])
    except ConnectionClosed:
        pass


async def not_found(request: HttpRequest) -> HttpResponse | StreamingResponse:
    return error_response(404, "not_found", f"no route for {request.path}")


async def main(host: str, port: int, deflate: bool) -> None:
    control = ServerControl()
    policy = WebSocketPolicy(paths=None, permessage_deflate=deflate)
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            partial(
                serve, echo, not_found, host=host, port=port, limits=AUTOBAHN_LIMITS, policy=policy, control=control
            )
        )
        print(f"LISTENING {bound}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--no-deflate", action="store_true")
    args = parser.parse_args()
    try:
        anyio.run(main, args.host, args.port, not args.no_deflate)
    except KeyboardInterrupt:
        sys.exit(0)

"""What one message costs the load client: the hand-written RFC 6455 client vs wsproto.

``python benchmarks/client_cost.py`` prints µs per message for the two
things the client does per message: build a masked client text frame of
~100 bytes, and parse an unmasked ~100-byte server frame (a batch of 64 in
one read, as a busy connection gets them). run.py stores the same figures in
its JSON (``client_microbench``): the choice of the hand-written client over
wsproto rests on them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from wsclient import encode_frame, parse_frames

MESSAGE = '{"t":"cmd","id":123456,"name":"echo","args":{"p":"' + "x" * 64 + '"}}'


def _best(fn: Any, n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def measure(n: int = 20_000) -> dict[str, float]:
    """µs per message for encoding and parsing, hand-written and wsproto."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    payload = MESSAGE.encode()
    server_frame = bytes((0x81, len(payload))) + payload
    batch = server_frame * 64

    def hand_encode(k: int) -> None:
        for _ in range(k):
            encode_frame(payload)

    def hand_parse(k: int) -> None:
        for _ in range(k // 64):
            buf = bytearray(batch)
            frames, used = parse_frames(buf)
            for _fin, _op, p in frames:
                p.decode()
            del buf[:used]

    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="bench", target="/v1/ws")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    server_batch = server.send(TextMessage(data=MESSAGE)) * 64

    def wsproto_encode(k: int) -> None:
        for _ in range(k):
            client.send(TextMessage(data=MESSAGE))

    def wsproto_parse(k: int) -> None:
        for _ in range(k // 64):
            client.receive_data(server_batch)
            for _event in client.events():
                pass

    return {
        "hand_encode_us": _best(hand_encode, n),
        "hand_parse_us": _best(hand_parse, n),
        "wsproto_encode_us": _best(wsproto_encode, n),
        "wsproto_parse_us": _best(wsproto_parse, n),
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))

"""The rooms transcript in docs/protocol.md (section 17) is what a server sends.

The transcript is captured, never typed: :func:`capture` plays a scripted
exchange (two players meet by matchmaking, play eight moves of
``examples/tictactoe/app.py``) against a real :class:`rtcore.Server` on a free
port with the ``websockets`` library, and ::

    python tests/rooms/test_transcript.py

rewrites the block between ``<!-- rooms-transcript:begin -->`` and
``<!-- rooms-transcript:end -->`` from it. The test captures the exchange again
and compares it with the block, frame by frame, after replacing what differs
between runs (session ids, epochs, room ids, room codes, checksums, floats such
as ``ts`` and the turn deadline) with placeholders.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(ROOT))

from rtcore.cli import load_app  # noqa: E402
from tests.net.conftest import TIMEOUT, serving  # noqa: E402
from tests.ws_client import WebSocket, connect  # noqa: E402

pytestmark = pytest.mark.anyio
EXAMPLE = ROOT / "examples" / "tictactoe" / "app.py"
DOC = ROOT / "docs" / "protocol.md"
BEGIN, END = "<!-- rooms-transcript:begin -->", "<!-- rooms-transcript:end -->"
#: X (ada) and O (bob) alternate; no line before the 8th move, so the room's
#: stream reaches offset 10 and the server sends a ``sync`` after it.
MOVES = [4, 0, 2, 6, 3, 5, 1, 7]
#: Steps (moves 3..7) left out of the doc's block, marked by an "omitted" comment.
OMIT = range(7, 12)

Line = tuple[str, str]  # ("C1>" | "S1<" | "C2>" | "S2<" | "#", text)


class Tap:
    """One connection whose frames are written to the transcript as they are sent and read."""

    def __init__(self, ws: WebSocket, n: int, name: str, log: list[Line]) -> None:
        self.ws, self.n, self.name, self.log = ws, n, name, log

    async def send(self, frame: dict[str, Any]) -> None:
        raw = json.dumps(frame, separators=(",", ":"))
        self.log.append((f"C{self.n}>", raw))
        await self.ws.send(raw)

    async def read(self, count: int) -> list[dict[str, Any]]:
        frames = []
        for _ in range(count):
            with anyio.fail_after(TIMEOUT):
                raw = await self.ws.recv()
            assert isinstance(raw, str)
            self.log.append((f"S{self.n}<", raw))
            frames.append(json.loads(raw))
        return frames


async def capture() -> list[Line]:
    """Play the scripted exchange on a fresh server; return the transcript lines."""
    app = load_app(f"{EXAMPLE}:app")
    log: list[Line] = []
    async with serving(app) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        async with (
            connect(url, subprotocols=["rtcore.v1.json"]) as ws1,
            connect(url, subprotocols=["rtcore.v1.json"]) as ws2,
        ):
            ada, bob = Tap(ws1, 1, "ada", log), Tap(ws2, 2, "bob", log)
            log.append(("#", "ada connects (connection 1) and finds a room by matchmaking"))
            await ada.send({"t": "hello", "v": 1, "token": "ada"})
            await ada.read(1)
            await ada.send(
                {"t": "cmd", "id": 1, "name": "room.join_or_create", "args": {"type": "tictactoe"}, "key": "ada-1"}
            )
            (joined,) = await ada.read(1)
            stream, room_id = joined["result"]["stream"], joined["result"]["room_id"]
            log.append(
                ("#", "she holds no document: subscribe from the start; the first patch sets the whole document")
            )
            await ada.send({"t": "sub", "id": 2, "stream": stream, "since": {"epoch": "", "offset": 0}})
            await ada.read(2)
            log.append(
                (
                    "#",
                    "bob connects (connection 2, not subscribed), is matched into ada's room; ada gets one patch with all his join changed",
                )
            )
            await bob.send({"t": "hello", "v": 1, "token": "bob"})
            await bob.read(1)
            await bob.send(
                {"t": "cmd", "id": 1, "name": "room.join_or_create", "args": {"type": "tictactoe"}, "key": "bob-1"}
            )
            await bob.read(1)
            await ada.read(1)
            for i, cell in enumerate(MOVES):
                mover, rid = (ada, 3 + i // 2) if i % 2 == 0 else (bob, 2 + i // 2)
                offset = 3 + i
                if i == 0:
                    log.append(("#", "ada's move: her patch and her ok (bob's moves: the patch to ada, the ok to bob)"))
                if i == len(MOVES) - 1:
                    log.append(("#", "offset 10: a sync (checksum of the document, section 9) follows the patch"))
                args = {"room_id": room_id, "type": "move", "data": {"cell": cell}}
                await mover.send(
                    {"t": "cmd", "id": rid, "name": "room.send", "args": args, "key": f"{mover.name}-mv{i}"}
                )
                # ada reads the patch (+ sync at offset 10) and, for her own move, the ok.
                await ada.read(1 + (offset % 10 == 0) + (mover is ada))
                if mover is bob:
                    await bob.read(1)
    return log


def normalize(lines: list[Line | None]) -> list[list[str] | None]:
    """Steps (a client frame and the server frames after it) with run-specific values
    replaced; ``None`` (an omitted step) stays ``None``."""
    frames = [
        (item[0], json.loads(item[1])) if item is not None else None for item in lines if item is None or item[0] != "#"
    ]
    names: dict[str, str] = {}
    for item in frames:
        if item is None:
            continue
        f = item[1]
        if f.get("t") == "welcome":
            names.setdefault(f["session"], f"<session-{f['principal']}>")
        if f.get("t") in ("subbed", "evt", "sync", "snap"):
            names.setdefault(f["epoch"], "<epoch>")
        result = f.get("result")
        if f.get("t") == "ok" and isinstance(result, dict) and "room_id" in result:
            names.setdefault(result["room_id"], "<room>")
            names.setdefault(result["code"], "<code>")

    def sub(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: sub(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, float):
            return "<float>"
        if isinstance(v, str):
            if key == "checksum":
                return "<checksum>"
            for old, new in names.items():
                v = v.replace(old, new)
        return v

    steps: list[list[str] | None] = []
    for item in frames:
        if item is None:
            steps.append(None)
            continue
        tag, f = item
        if tag.startswith("C"):
            steps.append([])
        step = steps[-1]
        assert step is not None, "server frames after an omitted step belong to it"
        step.append(f"{tag} {json.dumps(sub(f), sort_keys=True)}")
    # Frames of one step on two connections have no order between them.
    return [sorted(step) if step is not None else None for step in steps]


def render(lines: list[Line]) -> str:
    """The doc block: the transcript with the steps in :data:`OMIT` left out."""
    out, step, comments = [BEGIN, "```"], -1, []
    for tag, text in lines:
        if tag == "#":
            comments.append(f"# {text}")  # belongs to the next step
            continue
        if tag.startswith("C"):
            step += 1
            if step == OMIT.start:
                moves, offsets = f"{OMIT.start - 4}-{OMIT.stop - 5}", f"{OMIT.start - 2}-{OMIT.stop - 3}"
                out.append(f"# … {len(OMIT)} steps omitted (moves {moves}, offsets {offsets}) …")
            if step not in OMIT:
                out += comments
            comments = []
        if step not in OMIT:
            out.append(f"{tag} {text}")
    return "\n".join([*out, "```", END])


def parse_doc() -> list[Line | None]:
    """The doc block's lines (``None`` for each omitted step)."""
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} has no rooms transcript block"
    block = text.partition(BEGIN)[2].partition(END)[0]
    lines: list[Line | None] = []
    for line in block.splitlines():
        omitted = re.match(r"# … (\d+) steps omitted", line)
        if omitted:
            lines += [None] * int(omitted.group(1))
        elif re.match(r"[CS][12][<>] ", line):
            tag, _, rest = line.partition(" ")
            lines.append((tag, rest))
    return lines


async def test_protocol_doc_transcript_matches_the_server() -> None:
    """Every frame of the rooms transcript in docs/protocol.md is what the server
    sends today, up to run-specific values.

    Mutation: add a field to the join result (``_Actor._join_result``) or drop the
    ``inbox`` from patch data (``_Actor.commit``) → the captured frames differ from
    the doc → fails.
    """
    captured = normalize(list(await capture()))
    doc_steps = normalize(parse_doc())
    assert len(doc_steps) == len(captured), f"the doc has {len(doc_steps)} steps, the server played {len(captured)}"
    for i, (doc_step, got) in enumerate(zip(doc_steps, captured, strict=True)):
        if doc_step is not None:
            assert doc_step == got, f"step {i} of the transcript differs from what the server sends"


async def write() -> None:
    """Capture the exchange and rewrite the block in docs/protocol.md."""
    block = render(await capture())
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    tail = rest.partition(END)[2]
    DOC.write_text(head + block + tail)
    print(f"rewrote the rooms transcript in {DOC}")


if __name__ == "__main__":
    anyio.run(write)

"""The AsyncAPI document, the JSON Schema bundle and the TypeScript declarations.

How the AsyncAPI document is checked: the official AsyncAPI 3.0.0 JSON Schema
cannot be fetched here (no network) and is not vendored, so these tests check
with the ``jsonschema`` package what can be checked without it -- every schema
in the document is a valid JSON Schema, and frames captured from a real
session validate against their messages' payloads -- and check the
specification's required fields and references by hand.

The TypeScript output is type-checked with ``tsc --strict`` (``RTCORE_TSC``, or
``typescript`` installed under ``~/.cache/rtcore-tsc`` as ``.ci/run`` does);
without it these tests skip with one line, unless ``RTCORE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

import rtcore
from rtcore.cli import load_app, main
from rtcore.server import asyncapi as gen
from tests.net import conftest
from tests.net.conftest import http_url, serving, ws_url
from tests.ws_client import connect

ROOT = Path(__file__).resolve().parents[2]
APP_SPEC = str(ROOT / "tests/ops/schema_app.py") + ":app"
APP = load_app(APP_SPEC)
REQUIRED = os.environ.get("RTCORE_REQUIRE_SERVICES") == "1"
_KEY = re.compile(r"^[\w\d.\-_]+$")  # AsyncAPI 3.0: keys of channels, operations, messages


def _tsc() -> str | None:
    explicit = os.environ.get("RTCORE_TSC")
    if explicit:
        return explicit
    cached = Path.home() / ".cache/rtcore-tsc/node_modules/.bin/tsc"
    if cached.exists() and shutil.which("node"):
        return str(cached)
    return shutil.which("tsc")


TSC = _tsc()
needs_tsc = pytest.mark.skipif(
    TSC is None and not REQUIRED, reason="no tsc (set RTCORE_TSC or npm install --prefix ~/.cache/rtcore-tsc typescript@5)"
)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items() for r in ([v] if k == "$ref" else _refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _payload_validator(doc: dict[str, Any], message: str) -> jsonschema.Draft7Validator:
    payload = _resolve(doc, f"#/channels/ws/messages/{message}")["payload"]
    # The components ride along so the payload's "#/components/schemas/..." refs resolve.
    return jsonschema.Draft7Validator({**payload, "components": doc["components"]})


# --- the AsyncAPI document ---------------------------------------------------------------


def test_asyncapi_required_fields_and_references() -> None:
    """The AsyncAPI 3.0.0 fields the spec requires are there, every ``$ref`` resolves,
    keys match the spec's pattern, every schema is a valid JSON Schema.

    Mutation: key the messages by raw command name (``game:move`` keeps its colon) →
    the key pattern fails; write msgspec's discriminator object unchanged → the
    discriminator check fails; drop ``reply`` from command operations → fails.
    """
    doc = gen.asyncapi(APP)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "shapes" and isinstance(doc["info"]["version"], str)
    (server,) = doc["servers"].values()
    assert server["protocol"] == "ws" and server["host"] == "{host}" and server["variables"]["host"]["default"]
    assert "rtcore.v1.json" in server["description"] and "rtcore.v1.msgpack" in server["description"]
    channel = doc["channels"]["ws"]
    assert channel["address"] == "/v1/ws"
    assert channel["bindings"]["ws"]["headers"]["properties"]["Sec-WebSocket-Protocol"]["enum"] == list(gen.SUBPROTOCOLS)
    for mapping in (doc["channels"], doc["operations"], channel["messages"], doc["components"]["schemas"]):
        assert all(_KEY.match(k) for k in mapping), sorted(mapping)
    for ref in _refs(doc):
        _resolve(doc, ref)
    for op in doc["operations"].values():
        assert op["action"] in ("send", "receive") and op["channel"] == {"$ref": "#/channels/ws"}
        assert op["messages"]
    tags = {"hello", "auth", "sub", "unsub", "cmd", "ack", "ping"}
    server_tags = {"welcome", "ok", "err", "subbed", "evt", "snap", "sync", "msg", "pong", "bye"}
    assert {op["messages"][0]["$ref"].rsplit("/", 1)[-1] for op in doc["operations"].values() if op["action"] == "send"} == server_tags
    received = {op["messages"][0]["$ref"].rsplit("/", 1)[-1] for op in doc["operations"].values() if op["action"] == "receive"}
    assert received == tags | {f"cmd.{gen._ID_RE.sub('_', n)}" for n in APP.commands}
    for name in APP.commands:
        op = doc["operations"][f"command_{gen._ID_RE.sub('_', name)}"]
        assert [m["$ref"].rsplit("/", 1)[-1] for m in op["reply"]["messages"]] == [f"ok.{gen._ID_RE.sub('_', name)}", "err"]
    schemas = [m["payload"] for m in channel["messages"].values()] + list(doc["components"]["schemas"].values())
    for s in schemas:
        jsonschema.Draft7Validator.check_schema(s)
    # AsyncAPI's Schema Object: ``discriminator`` is a property name, not OpenAPI's object.
    discriminators = [v for s in schemas for v in _values(s, "discriminator")]
    assert all(isinstance(v, str) for v in discriminators), discriminators


def _values(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values(v, key)]
    return []


def test_results_follow_the_handlers_annotations() -> None:
    """A command returning a Struct documents its fields; ``None`` is null; ``Any`` or no
    annotation is ``{}``; args and results are not confused.

    Mutation: drop the results (``results[name] = {}`` in ``_components``/``schema``) →
    ``game:move``'s result has no ``cells``; take the result from the args → fails.
    """
    doc = gen.asyncapi(APP)
    comps = doc["components"]["schemas"]
    ok = doc["channels"]["ws"]["messages"]["ok.game_move"]["payload"]["properties"]["result"]
    board = _resolve(doc, ok["$ref"])
    assert set(board["properties"]) == {"game", "cells", "turn", "winner"}
    assert set(board["required"]) == {"game", "cells", "turn"}
    assert board["properties"]["cells"]["items"]["items"]["enum"] == ["", "o", "x"]
    cmd = doc["channels"]["ws"]["messages"]["cmd.game_move"]["payload"]
    assert cmd["properties"]["name"] == {"const": "game:move"} and "args" in cmd["required"]
    assert set(_resolve(doc, cmd["properties"]["args"]["$ref"])["properties"]) == {"game", "x", "y", "note"}
    teams = doc["channels"]["ws"]["messages"]["ok.teams"]["payload"]["properties"]["result"]
    assert teams["type"] == "array" and set(_resolve(doc, teams["items"]["$ref"])["properties"]) == {"name", "colour", "scores"}
    assert comps["Colour"]["enum"] == ["blue", "red"]
    shape = doc["channels"]["ws"]["messages"]["ok.shape"]["payload"]["properties"]["result"]
    assert shape["discriminator"] == "type" and len(shape["anyOf"]) == 2

    bundle = gen.schema(APP)
    assert bundle["results"]["forget"] == {"type": "null"}
    assert bundle["results"]["anything"] == {} and bundle["results"]["unannotated"] == {}
    assert bundle["results"]["pair"]["prefixItems"] == [{"type": "string"}, {"type": "integer"}]
    assert bundle["commands"]["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert bundle["commands"]["teams"] == {"type": "null"}
    assert set(bundle["results"]["game:move"]["$defs"]["Board"]["properties"]) == {"game", "cells", "turn", "winner"}


@pytest.fixture(params=["rtcore", "uvicorn"])
def server_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """``rtcore.Server`` and the ASGI adapter under uvicorn serve the same document."""
    conftest.SERVER_KIND = request.param
    try:
        yield request.param
    finally:
        conftest.SERVER_KIND = "rtcore"


@pytest.mark.anyio
async def test_real_frames_validate_against_the_served_document(server_kind: str) -> None:
    """Frames a real session sends and receives validate against the payloads of
    ``GET /v1/asyncapi.json`` (its ``host`` is the request's Host); POST is 405.
    Served by ``rtcore.Server`` and by the ASGI adapter.

    Mutation: document ``ok``'s result with the args schema (``results[name] =
    args[name]``) → the real ``ok`` of ``game:move`` fails validation; drop the route →
    404.
    """
    async with serving(APP) as server:
        async with httpx.AsyncClient() as http:
            r = await http.get(http_url(server, "/v1/asyncapi.json"))
            post = await http.post(http_url(server, "/v1/asyncapi.json"))
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert post.status_code == 405
        doc = r.json()
        assert doc["servers"]["rtcore"]["variables"]["host"]["default"] == f"127.0.0.1:{server.port}"
        assert doc == gen.asyncapi(APP, host=f"127.0.0.1:{server.port}")
        sent = [
            {"t": "hello", "token": "ada"},
            {"t": "cmd", "id": 1, "name": "game:move", "args": {"game": "g1", "x": 1, "y": 2}},
            {"t": "cmd", "id": 2, "name": "teams"},
            {"t": "cmd", "id": 3, "name": "pair", "args": [7, "seven"]},
            {"t": "cmd", "id": 4, "name": "nope"},
            {"t": "ping", "id": 5},
        ]
        async with connect(ws_url(server), subprotocols=["rtcore.v1.json"]) as ws:
            got = []
            for frame in sent:
                await ws.send(json.dumps(frame))
                got.append(json.loads(await ws.recv()))
    assert [f["t"] for f in got] == ["welcome", "ok", "ok", "ok", "err", "pong"]
    assert got[1]["result"]["cells"][2][1] == "x"
    names = {1: "ok.game_move", 2: "ok.teams", 3: "ok.pair"}
    for i, frame in enumerate(sent):
        key = f"cmd.{gen._ID_RE.sub('_', frame['name'])}" if frame["t"] == "cmd" and frame["name"] != "nope" else frame["t"]
        _payload_validator(doc, key).validate(frame)
        reply = got[i]
        _payload_validator(doc, names.get(i, reply["t"])).validate(reply)
    # The check has teeth: a wrong result is refused by the command's ok message.
    bad = {**got[1], "result": {"game": "g1"}}
    assert list(_payload_validator(doc, "ok.game_move").iter_errors(bad))


# --- the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["asyncapi", "jsonschema", "typescript"])
def test_cli_writes_each_format(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rtcore schema APP --format F -o FILE`` writes what the library builds; without
    ``-o`` it goes to stdout.

    Mutation: write the asyncapi document for every format → the jsonschema and
    typescript cases fail.
    """
    out = tmp_path / "out"
    assert main(["schema", APP_SPEC, "--format", fmt, "-o", str(out)]) == 0
    text = out.read_text()
    if fmt == "typescript":
        assert text == gen.typescript(APP)
        assert '"game:move": { args: Move; result: Board };' in text
    else:
        assert json.loads(text) == (gen.asyncapi(APP) if fmt == "asyncapi" else gen.schema(APP))
    capsys.readouterr()
    assert main(["schema", APP_SPEC, "--format", fmt]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize(
    ("spec", "fmt", "needle"),
    [
        ("tests/ops/no_such_app.py:app", "typescript", "no such file"),
        ("tests.ops.schema_app:missing", "typescript", "has no attribute"),
        ("tests.ops.schema_app:Move", "asyncapi", "not an rtcore.App"),
        ("tests.ops.schema_app:app", "yaml", "invalid choice: 'yaml'"),
    ],
)
def test_cli_bad_invocation_is_one_line_and_exit_2(spec: str, fmt: str, needle: str) -> None:
    """Mutation: call ``load_app`` outside ``main``'s ``except CliError`` (e.g. catch nothing in
    ``main``) → a traceback on stderr, not one line → fails."""
    p = subprocess.run(
        [sys.executable, "-m", "rtcore.cli", "schema", spec, "--format", fmt],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and needle in p.stderr, p.stderr


# --- TypeScript -----------------------------------------------------------------------------

_GOOD = """\
import type { Commands, CommandArgs, CommandResult, TypedCommands, ServerFrame, Board } from "./commands";
import type { Client } from "./rtcore";

export async function play(client: Client): Promise<string> {
  const typed = client as unknown as TypedCommands;
  const args: CommandArgs<"game:move"> = { game: "g1", x: 1, y: 2 };
  const board: Board = await typed.command("game:move", args);
  const cell: "x" | "o" | "" = board.cells[0][0];
  const teams = await typed.command("teams", null);
  const colour: "red" | "blue" = teams[0].colour;
  const pair: CommandResult<"pair"> = await typed.command("pair", [1, "one"]);
  const nothing: null = await typed.command("forget", { a: 1 });
  const shape = await typed.command("shape", 3);
  const area: number = shape.type === "circle" ? 3.14 * shape.r ** 2 : shape.side ** 2;
  const loose: Commands["anything"]["result"] = 42;
  const frame = JSON.parse("{}") as ServerFrame;
  if (frame.t === "subbed") { const r: boolean = frame.recovered; void r; }
  const boards = await typed.command("boards", null);
  const turn: number | undefined = boards[0]?.turn;
  void nothing; void loose; void area; void turn;
  return `${board.turn}${cell}${colour}${pair[0].toUpperCase()}${pair[1].toFixed()}`;
}
"""

# Each line is wrong in one way; tsc must reject every one (so the types are not ``any``).
_BAD = [
    'typed.command("game:move", { game: "g1", x: "1", y: 2 });',  # x is a number
    'typed.command("game:move", { game: "g1", x: 1 });',  # y is required
    'typed.command("no-such-command", null);',  # not a command
    'const b: string = (await typed.command("game:move", { game: "g", x: 1, y: 1 })).turn;',  # turn is a number
    'const c: "x" = (await typed.command("teams", null))[0].colour;',  # colour is red|blue
    'const p: [number, string] = await typed.command("pair", [1, "one"]);',  # result is [string, number]
    'const r: number = (await typed.command("shape", 1)).r;',  # a square has no r
    'const t: number = (await typed.command("boards", null))[0].turn;',  # a board may be null
]


def _write_project(tmp_path: Path, body: str) -> list[str]:
    (tmp_path / "commands.ts").write_text(gen.typescript(APP))
    shutil.copy(ROOT / "src/rtcore/server/static/rtcore.d.ts", tmp_path / "rtcore.d.ts")
    (tmp_path / "use.ts").write_text(body)
    assert TSC is not None, "RTCORE_REQUIRE_SERVICES=1 but no tsc (RTCORE_TSC or ~/.cache/rtcore-tsc)"
    return [TSC, "--noEmit", "--strict", "--target", "es2020", "--module", "es2020", "--moduleResolution", "node"]


@needs_tsc
def test_typescript_declarations_type_check(tmp_path: Path) -> None:
    """The generated declarations and a file using them correctly (through the JavaScript
    client's own ``Client`` type) pass ``tsc --strict``.

    Mutation: mark every property required in ``_ts_object`` (drop the ``?``) → the
    ``game:move`` args without ``note`` no longer type-check → tsc fails.
    """
    cmd = _write_project(tmp_path, _GOOD)
    p = subprocess.run([*cmd, "commands.ts", "use.ts"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


@needs_tsc
def test_typescript_declarations_reject_wrong_use(tmp_path: Path) -> None:
    """Each wrong use of a command's args or result is a type error (the types are not
    ``any`` or ``unknown``).

    Mutation: emit ``any`` for a ``$ref`` (or ``string`` for an ``enum``) in ``_ts`` →
    tsc accepts some wrong lines → the set of error lines differs → fails. Dropping
    the results (all ``{}`` → ``unknown``) fails here too: the result lines then
    error for the wrong reason and the good-use test fails.
    """
    lines = "\n".join(f"  {line}" for line in _BAD)
    body = (
        'import type { TypedCommands } from "./commands";\n'
        "export async function wrong(typed: TypedCommands): Promise<void> {\n" + lines + "\n}\n"
    )
    cmd = _write_project(tmp_path, body)
    p = subprocess.run([*cmd, "commands.ts", "use.ts"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    bad_lines = {int(m) for m in re.findall(r"use\.ts\((\d+),\d+\): error TS", p.stdout)}
    assert bad_lines == set(range(3, 3 + len(_BAD))), p.stdout


class _Opaque:
    """A type msgspec has no schema for."""


def _opaque_app() -> rtcore.App:
    app = rtcore.App("opaque")

    @app.command("odd")
    async def odd(ctx: rtcore.Context) -> _Opaque:
        return _Opaque()

    @app.command("even")
    async def even(ctx: rtcore.Context, args: int) -> list[int]:
        return [args]

    return app


def test_a_result_type_msgspec_cannot_describe_is_any() -> None:
    """A handler annotated with a type msgspec has no schema for documents ``{}`` for
    that result; the other commands keep theirs, and nothing raises.

    Mutation: drop the one-at-a-time fallback in ``_components`` (or the ``except
    TypeError`` in ``_type_schema``) → ``TypeError`` escapes and this fails.
    """
    app = _opaque_app()
    assert gen.command_types(app.commands["odd"])[1] is _Opaque
    assert gen.schema(app)["results"] == {"even": {"type": "array", "items": {"type": "integer"}}, "odd": {}}
    doc = gen.asyncapi(app)
    messages = doc["channels"]["ws"]["messages"]
    assert messages["ok.odd"]["payload"]["properties"]["result"] == {}
    assert messages["ok.even"]["payload"]["properties"]["result"] == {"type": "array", "items": {"type": "integer"}}
    assert '"odd": { args: null; result: unknown };' in gen.typescript(app)


_SAME = """\
import type { ServerFrame, ClientFrame } from "./commands";
import type { ServerFrame as HandServer, ClientFrame as HandClient } from "./rtcore";
export function a(x: ServerFrame): HandServer { return x; }
export function b(x: HandServer): ServerFrame { return x; }
export function c(x: ClientFrame): HandClient { return x; }
export function d(x: HandClient): ClientFrame { return x; }
"""


@needs_tsc
def test_generated_frames_and_the_js_clients_frames_are_the_same_types(tmp_path: Path) -> None:
    """The frames the JavaScript client declares by hand (``rtcore.d.ts``) and the
    generated ones are assignable both ways, so code typed with either fits the other.

    Mutation: mark ``recovered`` optional in rtcore.d.ts's ``SubbedFrame`` (or drop a
    frame from its ``ServerFrame`` union) → ``b`` (or ``d``) fails in tsc.
    """
    cmd = _write_project(tmp_path, _SAME)
    p = subprocess.run([*cmd, "commands.ts", "use.ts"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr

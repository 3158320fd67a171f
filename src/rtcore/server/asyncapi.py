"""Machine-readable descriptions of an app's protocol for client authors.

Three views of one source of truth (the frame types in
:mod:`rtcore.protocol.frames` and each command handler's annotations):

* :func:`schema` -- the JSON Schema bundle served at ``GET /v1/schema``:
  client frames, server frames, each command's ``args`` and ``result``;
* :func:`asyncapi` -- an `AsyncAPI 3.0.0 <https://www.asyncapi.com/docs/reference/specification/v3.0.0>`_
  document of the WebSocket protocol and the app's commands, served at
  ``GET /v1/asyncapi.json``;
* :func:`typescript` -- TypeScript declarations of the frames and of a
  ``Commands`` interface (``{ name: { args; result } }``).

``rtcore schema MODULE:APP --format asyncapi|jsonschema|typescript`` writes
any of them. The schemas come from :func:`msgspec.json.schema_components`
(the same library that decodes the frames, so they cannot drift from what the
server accepts). A command's result schema comes from its handler's return
annotation; a missing or ``Any`` annotation gives ``{}`` (any value).

The TypeScript converter handles the subset of JSON Schema msgspec emits
(objects, arrays, tuples, ``anyOf`` unions, ``enum``/``const``, ``$ref`` to
components, ``null``, scalars, ``additionalProperties``); anything else
becomes ``unknown`` rather than a wrong type.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

import msgspec

from ..engine.app import App, CommandSpec
from ..protocol import frames

__all__ = ["SUBPROTOCOLS", "asyncapi", "command_types", "schema", "typescript"]

#: WebSocket subprotocols the server speaks (``Sec-WebSocket-Protocol``).
SUBPROTOCOLS = ("rtcore.v1.json", "rtcore.v1.msgpack")

_REF = "#/components/schemas/{name}"


class Cmd(msgspec.Struct, frozen=True, tag_field="t", tag="cmd"):
    """Run a command. ``key`` makes it idempotent for the session's principal.

    Schema twin of :class:`~rtcore.protocol.frames.Cmd`, whose ``args`` stay raw bytes.
    """

    id: frames.RequestId
    name: str
    args: Any = None
    key: str | None = None


_CLIENT = (frames.Hello, frames.Auth, frames.Sub, frames.Unsub, Cmd, frames.Ack, frames.Ping)
_SERVER = (
    frames.Welcome,
    frames.Ok,
    frames.Err,
    frames.Subbed,
    frames.Evt,
    frames.Snap,
    frames.Sync,
    frames.Msg,
    frames.Pong,
    frames.Bye,
)
_CLIENT_DOC = frames.Hello | frames.Auth | frames.Sub | frames.Unsub | Cmd | frames.Ack | frames.Ping


def _tag(tp: type[msgspec.Struct]) -> str:
    return str(tp.__struct_config__.tag)


def command_types(spec: CommandSpec) -> tuple[Any, Any]:
    """The (args type, result type) of a command; ``None`` args = takes none.

    The result type is the handler's return annotation (``Any`` when missing
    or not resolvable: the handler was accepted, so it must still be documented).
    """
    try:
        hints = typing.get_type_hints(spec.handler)
    except Exception:  # an unresolvable forward reference in the return annotation
        hints = {}
    return spec.args_type, hints.get("return", Any)


def _type_schema(tp: Any) -> dict[str, Any]:
    try:
        return msgspec.json.schema(tp)
    except TypeError:  # a type msgspec cannot describe (it encodes only what it knows)
        return {}


def schema(app: App) -> dict[str, Any]:
    """JSON Schema of the wire frames and of every command's arguments and result.

    Args:
        app: The app whose commands to describe.

    Returns:
        ``{"protocol", "client_frames", "server_frames", "commands", "results"}``;
        ``commands[name]`` is the schema of ``args`` (``{"type": "null"}`` when
        the handler takes none), ``results[name]`` the schema of the ``ok``
        reply's ``result``.
    """
    commands: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name, spec in sorted(app.commands.items()):
        args_type, result_type = command_types(spec)
        commands[name] = _type_schema(args_type) if args_type is not None else {"type": "null"}
        results[name] = _type_schema(result_type)
    return {
        "protocol": frames.PROTOCOL_VERSION,
        "client_frames": msgspec.json.schema(_CLIENT_DOC),
        "server_frames": msgspec.json.schema(frames.ServerFrame),
        "commands": commands,
        "results": results,
    }


_Components = tuple[dict[type[msgspec.Struct], Any], dict[str, Any], dict[str, Any], dict[str, Any]]


def _components(app: App) -> _Components:
    """(frame refs by class, args schemas, result schemas, component schemas)."""
    specs = sorted(app.commands.items())
    types: list[Any] = [*_CLIENT, *_SERVER]
    for _, spec in specs:
        args_type, result_type = command_types(spec)
        types += [args_type if args_type is not None else None, result_type]
    out: list[Any] = []
    components: dict[str, Any] = {}
    try:
        found, components = msgspec.json.schema_components(types, ref_template=_REF)
        out = list(found)
    except TypeError:
        # One command's result type is not describable: fall back to one at a time.
        for tp in types:
            try:
                one, comps = msgspec.json.schema_components([tp], ref_template=_REF)
            except TypeError:
                one, comps = ({},), {}
            out += one
            components.update(comps)
    out = [_asyncapi_schema(s) for s in out]
    n = len(_CLIENT) + len(_SERVER)
    frame_refs: dict[type[msgspec.Struct], Any] = dict(zip([*_CLIENT, *_SERVER], out[:n], strict=True))
    args = {name: out[n + 2 * i] for i, (name, _) in enumerate(specs)}
    results = {name: out[n + 2 * i + 1] for i, (name, _) in enumerate(specs)}
    return frame_refs, args, results, {k: _asyncapi_schema(v) for k, v in components.items()}


def _asyncapi_schema(node: Any) -> Any:
    """msgspec's JSON Schema as an AsyncAPI Schema Object.

    AsyncAPI's Schema Object extends JSON Schema draft 07; msgspec writes draft
    2020-12 and OpenAPI's discriminator. Two differences matter: ``discriminator``
    is the property name (a string), not ``{"propertyName", "mapping"}``; and a
    tuple is ``items: [...]`` plus ``additionalItems``, not ``prefixItems`` (a
    draft-07 validator ignores ``prefixItems`` and reads ``items: false`` as
    "no items at all").
    """
    if isinstance(node, dict):
        out = {k: _asyncapi_schema(v) for k, v in node.items()}
        disc = out.get("discriminator")
        if isinstance(disc, dict):
            out["discriminator"] = disc["propertyName"]
        if "prefixItems" in out:
            rest = out.pop("items", None)
            out["items"] = out.pop("prefixItems")
            if rest is not None:
                out["additionalItems"] = rest
        return out
    if isinstance(node, list):
        return [_asyncapi_schema(v) for v in node]
    return node


_ID_RE = re.compile(r"[^A-Za-z0-9_.\-]")


def _message_ids(names: list[str]) -> dict[str, str]:
    # AsyncAPI map keys must match ^[\w\d.\-_]+$; command names may hold ':' or '/'.
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = _ID_RE.sub("_", name) or "_"
        key, n = base, 2
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        ids[name] = key
    return ids


def asyncapi(app: App, *, host: str = "localhost:8000") -> dict[str, Any]:
    """The app's AsyncAPI 3.0.0 document (the server is the application described).

    Client frames are operations the server *receives*, server frames
    operations it *sends*; each command is a ``receive`` operation whose
    message is ``cmd`` with that ``name`` and its ``args`` schema, and whose
    reply is ``ok`` with the handler's ``result`` schema (or ``err``).

    Args:
        app: The app.
        host: ``host:port`` for the server entry's default.

    Returns:
        The document, JSON-ready.
    """
    frame_refs, args, results, schemas = _components(app)
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    channel_ref = {"$ref": "#/channels/ws"}

    def msg_ref(key: str) -> dict[str, str]:
        return {"$ref": f"#/channels/ws/messages/{key}"}

    for tp, ref in frame_refs.items():
        tag = _tag(tp)
        doc = (tp.__doc__ or "").strip().split("\n\n")[0]
        messages[tag] = {"name": tag, "title": f"{tag} frame", "summary": " ".join(doc.split()), "payload": ref}
        client = tp in _CLIENT
        operations[f"{'receive' if client else 'send'}_{tag}"] = {
            "action": "receive" if client else "send",
            "channel": channel_ref,
            "summary": f"{'client -> server' if client else 'server -> client'}: {tag}",
            "messages": [msg_ref(tag)],
        }
    ids = _message_ids(sorted(app.commands))
    cmd_props = schemas[str(frame_refs[Cmd]["$ref"]).rsplit("/", 1)[-1]]["properties"]
    for name, key in ids.items():
        has_args = app.commands[name].args_type is not None
        cmd_key, ok_key = f"cmd.{key}", f"ok.{key}"
        messages[cmd_key] = {
            "name": cmd_key,
            "title": f"cmd {name}",
            "summary": f"run the command {name!r}",
            "payload": {
                "type": "object",
                "properties": {
                    "t": {"enum": ["cmd"]},
                    "id": cmd_props["id"],
                    "name": {"const": name},
                    "args": args[name] if has_args else {"type": "null", "default": None},
                    "key": cmd_props["key"],
                },
                "required": ["t", "id", "name", *(["args"] if has_args else [])],
            },
        }
        messages[ok_key] = {
            "name": ok_key,
            "title": f"ok {name}",
            "summary": f"successful reply to {name!r}",
            "payload": {
                "type": "object",
                "properties": {
                    "t": {"enum": ["ok"]},
                    "id": {"type": "integer"},
                    "result": results[name],
                    "replayed": {"type": "boolean", "default": False},
                },
                "required": ["t", "id"],
            },
        }
        operations[f"command_{key}"] = {
            "action": "receive",
            "channel": channel_ref,
            "summary": f"command {name!r} (also POST /v1/cmd/{name})",
            "messages": [msg_ref(cmd_key)],
            "reply": {"channel": channel_ref, "messages": [msg_ref(ok_key), msg_ref("err")]},
        }
    subprotocols = " or ".join(f"`{p}`" for p in SUBPROTOCOLS)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": app.name,
            "version": str(frames.PROTOCOL_VERSION),
            "description": f"rtcore wire protocol v{frames.PROTOCOL_VERSION} of the app {app.name!r}: one WebSocket "
            "message is one frame, a map with the tag field `t`. Subprotocol "
            f"{subprotocols} (JSON text frames or MessagePack binary frames; JSON without one).",
        },
        "defaultContentType": "application/json",
        "servers": {
            "rtcore": {
                "host": "{host}",
                "protocol": "ws",
                "description": f"WebSocket and HTTP on one port; subprotocols {subprotocols}. Use wss with TLS.",
                "variables": {"host": {"default": host, "description": "host:port of the server"}},
            }
        },
        "channels": {
            "ws": {
                "address": "/v1/ws",
                "title": "rtcore session",
                "description": "The session: hello, then sub/cmd/ack/ping; the server answers and pushes events.",
                "messages": messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {"token": {"type": "string", "description": "for browsers, which cannot set headers"}},
                        },
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Sec-WebSocket-Protocol": {"type": "string", "enum": list(SUBPROTOCOLS)},
                                "Authorization": {"type": "string", "description": "Bearer <token>"},
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": operations,
        "components": {"schemas": schemas},
    }


# --- TypeScript ------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _ts_name(name: str) -> str:
    # msgspec names generic instantiations like ``Page[int]``: not TS identifiers.
    out = re.sub(r"[^A-Za-z0-9_$]", "_", name)
    return out if _IDENT.match(out) and not out[0].isdigit() else f"_{out}"


def _ts_key(key: str) -> str:
    return key if _IDENT.match(key) else json.dumps(key)


def _ts(node: Any, indent: str = "") -> str:
    """TypeScript for one schema (the msgspec subset; ``unknown`` for anything else)."""
    if not isinstance(node, dict):
        return "unknown"
    if "$ref" in node:
        return _ts_name(str(node["$ref"]).rsplit("/", 1)[-1])
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"]) or "never"
    for union in ("anyOf", "oneOf"):
        if union in node:
            return " | ".join(_wrap(_ts(v, indent)) for v in node[union]) or "never"
    if "allOf" in node:
        return " & ".join(_wrap(_ts(v, indent)) for v in node["allOf"]) or "unknown"
    kind = node.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts({**node, "type": k}, indent) for k in kind) or "never"
    if kind == "null":
        return "null"
    if kind == "string":
        return "string"
    if kind in ("integer", "number"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if isinstance(node.get("items"), list):  # a draft-07 tuple (see _asyncapi_schema)
            items = [_ts(v, indent) for v in node["items"]]
            rest = node.get("additionalItems")
            if isinstance(rest, dict):
                items.append(f"...{_wrap(_ts(rest, indent))}[]")
            return f"[{', '.join(items)}]"
        return f"{_wrap(_ts(node.get('items', {}), indent))}[]"
    if kind == "object":
        return _ts_object(node, indent)
    return "unknown"


def _wrap(ts: str) -> str:
    # ``A | B`` inside ``[]`` or ``&`` needs parentheses (harmless around ``{ a: A | B }``).
    return f"({ts})" if " | " in ts or " & " in ts else ts


def _ts_object(node: dict[str, Any], indent: str) -> str:
    props: dict[str, Any] = node.get("properties", {})
    required = set(node.get("required", []))
    extra = node.get("additionalProperties")
    inner = indent + "  "
    lines = [f"{inner}{_ts_key(k)}{'' if k in required else '?'}: {_ts(v, inner)};" for k, v in props.items()]
    if isinstance(extra, dict) or (extra is None and not props):
        value = _ts(extra, inner) if isinstance(extra, dict) else "unknown"
        if props:  # an index signature must admit the declared properties too
            value = " | ".join(dict.fromkeys([value, *(_ts(v, inner) for v in props.values()), "undefined"]))
        lines.append(f"{inner}[key: string]: {value};")
    if not lines:
        return "{}"
    return "{\n" + "\n".join(lines) + f"\n{indent}}}"


def typescript(app: App) -> str:
    """TypeScript declarations of the wire frames and of the app's commands.

    Declares every component schema as an exported type, ``ClientFrame`` and
    ``ServerFrame`` unions, and ``interface Commands { "name": { args; result } }``
    with helpers ``CommandName``, ``CommandArgs<N>``, ``CommandResult<N>`` and
    ``TypedCommands`` (a typed ``command()`` to cast a client to).

    Args:
        app: The app whose commands to describe.

    Returns:
        The text of a ``.ts`` file (types only; it type-checks with ``tsc --strict``).
    """
    frame_refs, args, results, schemas = _components(app)
    out = [
        f"// TypeScript declarations of the rtcore protocol v{frames.PROTOCOL_VERSION} and of the app {app.name!r}.",
        "// Generated by `rtcore schema MODULE:APP --format typescript`; do not edit by hand.",
        "",
    ]
    for name, spec in sorted(schemas.items()):
        desc = " ".join(str(spec.get("description", "")).split())
        if desc:
            out.append(f"/** {desc.replace('*/', '* /')} */")
        body = _ts({k: v for k, v in spec.items() if k not in ("title", "description")})
        if spec.get("type") == "object" and body.startswith("{"):
            out.append(f"export interface {_ts_name(name)} {body}")
        else:
            out.append(f"export type {_ts_name(name)} = {body};")
    client = " | ".join(_ts(frame_refs[tp]) for tp in _CLIENT)
    server = " | ".join(_ts(frame_refs[tp]) for tp in _SERVER)
    out += ["", f"export type ClientFrame = {client};", f"export type ServerFrame = {server};", ""]
    out.append("/** Each command's arguments and the `result` of its `ok` reply. */")
    out.append("export interface Commands {")
    for name in sorted(app.commands):
        a = _ts(args[name], "  ") if app.commands[name].args_type is not None else "null"
        r = _ts(results[name], "  ")
        out.append(f"  {json.dumps(name)}: {{ args: {a}; result: {r} }};")
    out += [
        "}",
        "export type CommandName = keyof Commands;",
        'export type CommandArgs<N extends CommandName> = Commands[N]["args"];',
        'export type CommandResult<N extends CommandName> = Commands[N]["result"];',
        "/** A typed view of `Client.command` from rtcore.js: `client as unknown as TypedCommands`. */",
        "export interface TypedCommands {",
        "  command<N extends CommandName>(",
        "    name: N, args: CommandArgs<N>, opts?: { key?: string | null; timeout?: number },",
        "  ): Promise<CommandResult<N>>;",
        "}",
        "",
    ]
    return "\n".join(out)

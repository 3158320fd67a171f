"""docs/protocol.md must stay in step with the code.

* every code of :data:`rtcore.errors.ERROR_CODES` is in the error table, with
  the same ``retryable`` and HTTP status (and the table lists no other code);
* every frame tag of :data:`rtcore.protocol.frames.ClientFrame` and
  :data:`rtcore.protocol.frames.ServerFrame` has its own ``### `tag``` section;
* every field of a frame Struct (and of the Structs nested in it, such as
  ``Position`` in ``sub`` and ``Limits`` in ``welcome``) is mentioned, in
  backticks, in that frame's section.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import msgspec
import pytest

from rtcore.errors import ERROR_CODES
from rtcore.protocol import frames

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

_ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|\s*(yes|no)\s*\|\s*(\d{3})\s*\|", re.MULTILINE)
_FRAME_HEADING = re.compile(r"^###\s+`([a-z_]+)`\s*$", re.MULTILINE)


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _section(text: str, heading: re.Pattern[str]) -> str:
    """The text under the first heading matching ``heading`` up to the next heading of the same or higher level."""
    match = heading.search(text)
    assert match is not None, f"docs/protocol.md has no heading matching {heading.pattern!r}"
    level = len(match.group(0)) - len(match.group(0).lstrip("#"))
    end = re.compile(rf"^#{{1,{level}}}\s", re.MULTILINE).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def _error_table() -> dict[str, tuple[bool, int]]:
    section = _section(_text(), re.compile(r"^##\s+\d*\.?\s*Error codes\s*$", re.MULTILINE))
    rows: dict[str, tuple[bool, int]] = {}
    for code, retryable, status in _ROW.findall(section):
        assert code not in rows, f"error code {code!r} is listed twice in docs/protocol.md"
        rows[code] = (retryable == "yes", int(status))
    return rows


def _frame_sections() -> dict[str, str]:
    text = _text()
    out: dict[str, str] = {}
    for match in _FRAME_HEADING.finditer(text):
        out.setdefault(match.group(1), _section(text[match.start() :], _FRAME_HEADING))
    return out


def _frame_types() -> list[type[msgspec.Struct]]:
    return [*typing.get_args(frames.ClientFrame), *typing.get_args(frames.ServerFrame)]


def _tag(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _nested_structs(annotation: object) -> list[type[msgspec.Struct]]:
    """Struct types inside an annotation (``Position | None`` → ``[Position]``)."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return [annotation]
    if typing.get_origin(annotation) is typing.Annotated:
        return _nested_structs(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [s for arg in typing.get_args(annotation) for s in _nested_structs(arg)]
    return []


def _field_names(cls: type[msgspec.Struct], prefix: str = "") -> list[str]:
    """Dotted paths of the fields of ``cls`` and of every Struct nested in them (``since.epoch``)."""
    names: list[str] = []
    for field in msgspec.structs.fields(cls):
        path = prefix + field.name
        names.append(path)
        for nested in _nested_structs(field.type):
            names.extend(_field_names(nested, path + "."))
    return names


def _mentioned(path: str, section: str) -> bool:
    """A field counts as documented when its dotted path or its own name appears in backticks."""
    return f"`{path}`" in section or f"`{path.rsplit('.', 1)[-1]}`" in section


def test_error_table_lists_every_code_with_its_facts() -> None:
    table = _error_table()
    missing = sorted(set(ERROR_CODES) - set(table))
    assert not missing, f"error codes missing from the table in docs/protocol.md: {missing}"
    wrong = {
        code: {"doc": table[code], "code": (info.retryable, info.http_status)}
        for code, info in ERROR_CODES.items()
        if table[code] != (info.retryable, info.http_status)
    }
    assert not wrong, f"retryable/HTTP status differ between docs/protocol.md and ERROR_CODES: {wrong}"
    extra = sorted(set(table) - set(ERROR_CODES))
    assert not extra, f"docs/protocol.md lists codes that are not in ERROR_CODES: {extra}"


def test_every_frame_tag_has_a_section() -> None:
    sections = _frame_sections()
    missing = [_tag(cls) for cls in _frame_types() if _tag(cls) not in sections]
    assert not missing, f"frames without a '### `tag`' section in docs/protocol.md: {missing}"


@pytest.mark.parametrize("cls", _frame_types(), ids=_tag)
def test_every_field_is_documented_in_its_frame_section(cls: type[msgspec.Struct]) -> None:
    section = _frame_sections().get(_tag(cls))
    assert section is not None, f"no section for frame {_tag(cls)!r}"
    missing = [path for path in _field_names(cls) if not _mentioned(path, section)]
    assert not missing, f"fields of {_tag(cls)!r} not mentioned in its section of docs/protocol.md: {missing}"


def test_parser_finds_the_tables() -> None:
    """Guard against the checks passing vacuously after a formatting change."""
    assert len(_error_table()) >= len(ERROR_CODES)
    assert len(_frame_sections()) >= len(_frame_types())
    assert {"since", "since.epoch", "since.offset"} <= set(_field_names(frames.Sub))
    assert "limits.idle_timeout" in _field_names(frames.Welcome)
